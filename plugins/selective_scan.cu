// Forward selective scan (Vision Mamba's operator), one kernel for PyTorch and TensorRT.
//
// Plain CUDA C++ with no headers at all, so NVRTC compiles it as it is; nvcc -arch=sm_90 too.
// Every variant and tuning knob is a -D define supplied by mame_deploy/plugins/launch.py
// (compile_options), which is also where the grid, block and argument order are defined:
//
//   SCAN_KERNEL_NAME     extern "C" name of the kernel
//   SCAN_DTYPE           0 float32, 1 float16, 2 bfloat16 (u, delta, B, C, z, out)
//   SCAN_DSTATE          N, the state size (a multiple of SCAN_LANES)
//   SCAN_DELTA_SOFTPLUS  1: dt = softplus(delta + delta_bias), 0: dt = delta + delta_bias
//   SCAN_REVERSE         1: the recurrence runs from t = L-1 down to 0
//   SCAN_LANES           threads that share one channel, each holding N / LANES states
//   SCAN_CHANNELS        channels per block (block = CHANNELS * LANES threads)
//   SCAN_CHUNK           time steps staged in shared memory at a time
//   SCAN_MIN_BLOCKS      blocks per SM to fit in registers (__launch_bounds__)
//
// Math, per batch b, channel d, state n, step t (float32 whatever the input type):
//   dt = softplus(delta + delta_bias[d]);  h[n] = exp(dt * A[d, n]) * h[n] + dt * B[n, t] * u
//   out = (sum_n h[n] * C[n, t] + D[d] * u) * silu(z)
// D, z and delta_bias may be null pointers (no skip term, no gate, no bias).
//
// Work split (why it is fast for short sequences and many channels): block (batch, channel
// group); each channel is scanned by LANES threads of one warp, each keeping N / LANES states
// in registers, so the only serial chain per step is one FMA per state. Each chunk of time is
// staged in shared memory with coalesced loads, and dt = softplus(.) and dt * u are computed
// there once per (channel, step) instead of once per state. The partial sums over states of
// LANES consecutive steps are reduce-scattered across the LANES threads with shuffles, so each
// thread finishes one step. The next chunk's global loads are issued before the current chunk is
// scanned (register prefetch), which hides memory latency when there are few blocks per SM.

#if !defined(SCAN_KERNEL_NAME) || !defined(SCAN_DTYPE) || !defined(SCAN_DSTATE) ||             \
    !defined(SCAN_DELTA_SOFTPLUS) || !defined(SCAN_REVERSE) || !defined(SCAN_LANES) ||         \
    !defined(SCAN_CHANNELS) || !defined(SCAN_CHUNK) || !defined(SCAN_MIN_BLOCKS)
#error "compile with the -D options of mame_deploy.plugins.launch.compile_options()"
#endif

namespace mame_scan {

constexpr int N = SCAN_DSTATE;
constexpr int LANES = SCAN_LANES;
constexpr int CHANNELS = SCAN_CHANNELS;
constexpr int CHUNK = SCAN_CHUNK;
constexpr int THREADS = CHANNELS * LANES;
constexpr int STATES_PER_LANE = N / LANES;
// Rows of the shared tiles are CHUNK floats plus padding: a multiple of 4 (16-byte vector reads)
// with an odd number of 16-byte units, so rows read together fall in different banks.
constexpr int ROW = CHUNK + ((CHUNK / 4) % 2 == 0 ? 4 : 0);
// Staging: thread tid always handles step tid % CHUNK of the chunk, in rows (channels of the
// (CHANNELS x CHUNK) tile, states of the (N x CHUNK) B and C tiles) tid / CHUNK + k * ROW_STEP.
// Consecutive threads touch consecutive steps, so global loads and stores are coalesced.
constexpr int ROW_STEP = THREADS / CHUNK;
constexpr int TILE_PER_THREAD = CHANNELS / ROW_STEP;
constexpr int BC_PER_THREAD = (N + ROW_STEP - 1) / ROW_STEP;
constexpr float LOG2E = 1.4426950408889634f;

static_assert(LANES == 4 || LANES == 8 || LANES == 16 || LANES == 32,
              "SCAN_LANES must be 4, 8, 16 or 32 (steps are read as float4)");
static_assert(N % LANES == 0, "SCAN_DSTATE must be a multiple of SCAN_LANES");
static_assert(CHUNK % 4 == 0 && CHUNK % LANES == 0, "SCAN_CHUNK must be a multiple of 4 and LANES");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block must be whole warps, at most 1024");
static_assert(THREADS % CHUNK == 0, "SCAN_CHUNK must divide the block size");

// Element type: raw 16-bit patterns for half types, so no cuda_fp16.h / cuda_bf16.h is needed.
#if SCAN_DTYPE == 0
typedef float elem_t;
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float from_float(float v) { return v; }
#elif SCAN_DTYPE == 1
typedef unsigned short elem_t;
__device__ __forceinline__ float to_float(unsigned short v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ unsigned short from_float(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#elif SCAN_DTYPE == 2
typedef unsigned short elem_t;
__device__ __forceinline__ float to_float(unsigned short v) {
    return __int_as_float(static_cast<int>(v) << 16);  // bfloat16 is float32's top half
}
__device__ __forceinline__ unsigned short from_float(float v) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#else
#error "SCAN_DTYPE must be 0 (float32), 1 (float16) or 2 (bfloat16)"
#endif

// 2^x and 1/x on the special-function unit: one instruction each, relative error about 2^-22.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float fast_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with
// log1p(e) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), s = e / (2 + e) <= 1/3: eight terms
// reach float32 precision (the next is below 2e-9 relative) without the cancellation of
// log(1 + e) for small e, and without branches. Matches torch's softplus (threshold 20) to a
// few ulp: above 20 the log1p term is under 2e-9.
__device__ __forceinline__ float softplus(float x) {
    const float e = fast_exp2(-fabsf(x) * LOG2E);
    const float s = e * fast_rcp(2.f + e);
    const float s2 = s * s;
    float p = 1.f / 15.f;
    p = fmaf(p, s2, 1.f / 13.f);
    p = fmaf(p, s2, 1.f / 11.f);
    p = fmaf(p, s2, 1.f / 9.f);
    p = fmaf(p, s2, 1.f / 7.f);
    p = fmaf(p, s2, 1.f / 5.f);
    p = fmaf(p, s2, 1.f / 3.f);
    p = fmaf(p, s2, 1.f);
    return fmaxf(x, 0.f) + 2.f * s * p;
}

// silu(x) = x * sigmoid(x); exp(-x) overflowing to inf gives the right limit 0.
__device__ __forceinline__ float silu(float x) {
    return x * fast_rcp(1.f + fast_exp2(-x * LOG2E));
}

// Logical step s of the scan is time index t; a reverse scan walks t backwards.
__device__ __forceinline__ int time_index(int s, int length) {
    return SCAN_REVERSE ? length - 1 - s : s;
}

}  // namespace mame_scan

using namespace mame_scan;

extern "C" __global__ void __launch_bounds__(THREADS, SCAN_MIN_BLOCKS) SCAN_KERNEL_NAME(
    const elem_t* __restrict__ u,           // (batch, dim, length)
    const elem_t* __restrict__ delta,       // (batch, dim, length)
    const float* __restrict__ A,            // (dim, N)
    const elem_t* __restrict__ Bmat,        // (batch, N, length)
    const elem_t* __restrict__ Cmat,        // (batch, N, length)
    const float* __restrict__ Dskip,        // (dim,) or null
    const elem_t* __restrict__ z,           // (batch, dim, length) or null
    const float* __restrict__ delta_bias,   // (dim,) or null
    int batch, int dim, int length,
    elem_t* __restrict__ out)               // (batch, dim, length)
{
    __shared__ __align__(16) float s_dt[CHANNELS][ROW];   // dt of each staged step
    __shared__ __align__(16) float s_dtu[CHANNELS][ROW];  // dt * u
    __shared__ __align__(16) float s_B[N][ROW];
    __shared__ __align__(16) float s_C[N][ROW];
    __shared__ float s_y[CHANNELS][ROW];                  // sum_n h * C, per step
    __shared__ float s_bias[CHANNELS];
    __shared__ float s_D[CHANNELS];

    const int tid = threadIdx.x;
    const int b = blockIdx.x;                // grid: (batch, ceil(dim / CHANNELS), 1)
    const int d0 = blockIdx.y * CHANNELS;
    if (b >= batch) return;  // whole block: no barrier is skipped by part of it

    if (tid < CHANNELS) {
        const int d = d0 + tid;
        s_bias[tid] = (d < dim && delta_bias != nullptr) ? delta_bias[d] : 0.f;
        s_D[tid] = (d < dim && Dskip != nullptr) ? Dskip[d] : 0.f;
    }

    // Scan role: channel c of the block, lane r of its LANES threads, states r + LANES * j
    // (interleaved so the LANES rows read together sit in different banks).
    const int c = tid / LANES;
    const int r = tid % LANES;
    const int d_scan = d0 + c;
    float A2[STATES_PER_LANE];  // A * log2(e): exp(dt * A) = 2^(dt * A2)
    float h[STATES_PER_LANE];
#pragma unroll
    for (int j = 0; j < STATES_PER_LANE; ++j) {
        A2[j] = d_scan < dim ? A[(size_t)d_scan * N + r + LANES * j] * LOG2E : 0.f;
        h[j] = 0.f;
    }

    // Staging role (see ROW_STEP): step s_mine of each chunk, rows row_mine + k * ROW_STEP.
    const int s_mine = tid % CHUNK;
    const int row_mine = tid / CHUNK;
    const size_t tile_row0 = (size_t)b * dim + d0 + row_mine;  // (b, d) row of element k = 0
    const size_t bc_row0 = (size_t)b * N + row_mine;            // (b, n) row of element k = 0
    const elem_t zero = from_float(0.f);

    // Raw inputs of one chunk, loaded a chunk ahead (register prefetch).
    elem_t ru[TILE_PER_THREAD], rdelta[TILE_PER_THREAD], rz[TILE_PER_THREAD];
    elem_t rB[BC_PER_THREAD], rC[BC_PER_THREAD];

    auto load_chunk = [&](int s0) {
        const bool step_ok = s0 + s_mine < length;
        const size_t t = step_ok ? time_index(s0 + s_mine, length) : 0;
#pragma unroll
        for (int k = 0; k < TILE_PER_THREAD; ++k) {
            const bool ok = step_ok && d0 + row_mine + k * ROW_STEP < dim;
            const size_t idx = (tile_row0 + k * ROW_STEP) * length + t;
            ru[k] = ok ? u[idx] : zero;
            rdelta[k] = ok ? delta[idx] : zero;
            rz[k] = (ok && z != nullptr) ? z[idx] : zero;
        }
#pragma unroll
        for (int k = 0; k < BC_PER_THREAD; ++k) {
            const bool ok = step_ok && row_mine + k * ROW_STEP < N;
            const size_t idx = (bc_row0 + k * ROW_STEP) * length + t;
            rB[k] = ok ? Bmat[idx] : zero;
            rC[k] = ok ? Cmat[idx] : zero;
        }
    };

    float gate[TILE_PER_THREAD], dug[TILE_PER_THREAD];  // silu(z) and D * u * silu(z)

    load_chunk(0);
    for (int s0 = 0; s0 < length; s0 += CHUNK) {
        const int steps = min(CHUNK, length - s0);
        __syncthreads();  // the previous chunk's scan and epilogue are done with the tiles

        // Stage this chunk: dt and dt * u once per (channel, step). Steps past the end get
        // dt = 0 and no input, which leaves the state untouched (exp(0) = 1).
        const bool step_ok = s_mine < steps;
#pragma unroll
        for (int k = 0; k < TILE_PER_THREAD; ++k) {
            const int cc = row_mine + k * ROW_STEP;
            const float uf = to_float(ru[k]);
            float dt = to_float(rdelta[k]) + s_bias[cc];
            if (SCAN_DELTA_SOFTPLUS) dt = softplus(dt);
            dt = step_ok ? dt : 0.f;
            s_dt[cc][s_mine] = dt;
            s_dtu[cc][s_mine] = dt * uf;
            gate[k] = z != nullptr ? silu(to_float(rz[k])) : 1.f;
            dug[k] = s_D[cc] * uf * gate[k];
        }
#pragma unroll
        for (int k = 0; k < BC_PER_THREAD; ++k) {
            const int n = row_mine + k * ROW_STEP;
            if (n < N) {
                s_B[n][s_mine] = to_float(rB[k]);
                s_C[n][s_mine] = to_float(rC[k]);
            }
        }
        __syncthreads();

        if (s0 + CHUNK < length) load_chunk(s0 + CHUNK);  // in flight during the scan

        // Scan: LANES steps at a time; p[i] = this lane's share of y at step g + i.
        for (int g = 0; g < steps; g += LANES) {
            float dtv[LANES], dtuv[LANES];
#pragma unroll
            for (int i = 0; i < LANES; i += 4) {
                const float4 a = *reinterpret_cast<const float4*>(&s_dt[c][g + i]);
                const float4 w = *reinterpret_cast<const float4*>(&s_dtu[c][g + i]);
                dtv[i] = a.x; dtv[i + 1] = a.y; dtv[i + 2] = a.z; dtv[i + 3] = a.w;
                dtuv[i] = w.x; dtuv[i + 1] = w.y; dtuv[i + 2] = w.z; dtuv[i + 3] = w.w;
            }
            float p[LANES];
#pragma unroll
            for (int i = 0; i < LANES; ++i) p[i] = 0.f;
#pragma unroll
            for (int j = 0; j < STATES_PER_LANE; ++j) {
                const int n = r + LANES * j;
#pragma unroll
                for (int i = 0; i < LANES; i += 4) {
                    const float4 bv = *reinterpret_cast<const float4*>(&s_B[n][g + i]);
                    const float4 cv = *reinterpret_cast<const float4*>(&s_C[n][g + i]);
                    const float bb[4] = {bv.x, bv.y, bv.z, bv.w};
                    const float cc4[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float decay = fast_exp2(dtv[i + q] * A2[j]);
                        h[j] = fmaf(decay, h[j], dtuv[i + q] * bb[q]);
                        p[i + q] = fmaf(h[j], cc4[q], p[i + q]);
                    }
                }
            }
            // Reduce-scatter over the LANES threads of the channel: at width w each thread keeps
            // the half of p[0, 2w) that its bit w selects and adds its partner's copy of it, so at
            // the end p[0] holds, summed over all LANES threads, step g + r.
#pragma unroll
            for (int w = LANES / 2; w >= 1; w /= 2) {
                const bool upper = r & w;
#pragma unroll
                for (int i = 0; i < w; ++i) {
                    const float keep = upper ? p[i + w] : p[i];
                    const float send = upper ? p[i] : p[i + w];
                    p[i] = keep + __shfl_xor_sync(0xffffffffu, send, w);
                }
            }
            s_y[c][g + r] = p[0];
        }
        __syncthreads();

        // Epilogue on the staging layout: coalesced stores of (y + D u) * silu(z).
        if (step_ok) {
            const size_t t = time_index(s0 + s_mine, length);
#pragma unroll
            for (int k = 0; k < TILE_PER_THREAD; ++k) {
                const int cc = row_mine + k * ROW_STEP;
                if (d0 + cc < dim)
                    out[(tile_row0 + k * ROW_STEP) * length + t] =
                        from_float(fmaf(s_y[cc][s_mine], gate[k], dug[k]));
            }
        }
    }
}
