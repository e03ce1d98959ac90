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
// there once per (channel, step) instead of once per state. Each scanning thread stores its
// partial sums over its states to shared memory (4 steps per 16-byte store); the epilogue adds
// the LANES partials of a (channel, step), so the scan loop has no cross-thread chain. The next
// chunk's global loads are issued before the current chunk is scanned (register prefetch),
// which hides memory latency when there are few blocks per SM.

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

static_assert(LANES == 1 || LANES == 2 || LANES == 4 || LANES == 8 || LANES == 16 || LANES == 32,
              "SCAN_LANES must be a power of two up to 32");
static_assert(N % LANES == 0, "SCAN_DSTATE must be a multiple of SCAN_LANES");
static_assert(CHUNK % 4 == 0 && CHUNK % LANES == 0, "SCAN_CHUNK must be a multiple of 4 and LANES");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block must be whole warps, at most 1024");
static_assert(THREADS % CHUNK == 0, "SCAN_CHUNK must divide the block size");
static_assert(4 * ROW * (2 * CHANNELS + 2 * N + THREADS) + 8 * CHANNELS <= 48 * 1024,
              "shared tiles exceed 48 KB: use fewer channels or a shorter chunk");

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

// Sum of v[0, W) pairwise: a dependency chain of log2(W) adds instead of W.
template <int W>
__device__ __forceinline__ float tree_sum(float* v) {
    if constexpr (W == 1) {
        return v[0];
    } else {
#pragma unroll
        for (int q = 0; q < W / 2; ++q) v[q] += v[q + W / 2];
        return tree_sum<W / 2>(v);
    }
}

// One scan thread's shared-memory operands for 4 consecutive steps: dt and dt * u of its
// channel, B and C of its states.
struct Group {
    float4 dt, dtu;
    float4 B[STATES_PER_LANE], C[STATES_PER_LANE];
};

__device__ __forceinline__ Group load_group(int c, int r, int g, const float (*s_dt)[ROW],
                                            const float (*s_dtu)[ROW], const float (*s_B)[ROW],
                                            const float (*s_C)[ROW]) {
    Group grp;
    grp.dt = *reinterpret_cast<const float4*>(&s_dt[c][g]);
    grp.dtu = *reinterpret_cast<const float4*>(&s_dtu[c][g]);
#pragma unroll
    for (int j = 0; j < STATES_PER_LANE; ++j) {
        grp.B[j] = *reinterpret_cast<const float4*>(&s_B[r + LANES * j][g]);
        grp.C[j] = *reinterpret_cast<const float4*>(&s_C[r + LANES * j][g]);
    }
    return grp;
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
    __shared__ __align__(16) float s_part[THREADS][ROW];  // per scan thread: sum over its states
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
    __syncthreads();  // s_bias, s_D
    for (int s0 = 0; s0 < length; s0 += CHUNK) {
        // Stage this chunk (the previous scan finished at the last barrier): dt and dt * u once
        // per (channel, step). Steps past the end get dt = 0 and no input, which leaves the
        // state untouched (exp(0) = 1), so the scan below always runs whole chunks.
        const bool step_ok = s0 + s_mine < length;
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

        // Scan, 4 steps at a time: p[i] = this thread's states' share of y at step g + i. With
        // one or two states per thread (the small-batch split) the shared-memory reads of group
        // g + 4 are issued before group g is computed (and before its partial sums are stored,
        // which the compiler would not move loads across), so their latency overlaps the
        // arithmetic even with one warp per scheduler.
        // With several states per thread the group itself has enough independent work and the
        // extra registers would cost occupancy: those splits read each group where it is used.
        constexpr bool READ_AHEAD = STATES_PER_LANE <= 2;
        Group cur = load_group(c, r, 0, s_dt, s_dtu, s_B, s_C);
#pragma unroll
        for (int g = 0; g < CHUNK; g += 4) {
            Group next;
            if (READ_AHEAD && g + 4 < CHUNK) next = load_group(c, r, g + 4, s_dt, s_dtu, s_B, s_C);
            if (!READ_AHEAD && g > 0) cur = load_group(c, r, g, s_dt, s_dtu, s_B, s_C);
            const float dtv[4] = {cur.dt.x, cur.dt.y, cur.dt.z, cur.dt.w};
            const float dtuv[4] = {cur.dtu.x, cur.dtu.y, cur.dtu.z, cur.dtu.w};
            float p[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < STATES_PER_LANE; ++j) {
                const float bb[4] = {cur.B[j].x, cur.B[j].y, cur.B[j].z, cur.B[j].w};
                const float cc4[4] = {cur.C[j].x, cur.C[j].y, cur.C[j].z, cur.C[j].w};
                float decay[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) decay[i] = fast_exp2(dtv[i] * A2[j]);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    h[j] = fmaf(decay[i], h[j], dtuv[i] * bb[i]);
                    p[i] = fmaf(h[j], cc4[i], p[i]);
                }
            }
            *reinterpret_cast<float4*>(&s_part[tid][g]) = make_float4(p[0], p[1], p[2], p[3]);
            if (READ_AHEAD && g + 4 < CHUNK) cur = next;
        }
        __syncthreads();

        // Epilogue on the staging layout: y = sum of the LANES partials; coalesced stores of
        // (y + D u) * silu(z).
        if (step_ok) {
            const size_t t = time_index(s0 + s_mine, length);
#pragma unroll
            for (int k = 0; k < TILE_PER_THREAD; ++k) {
                const int cc = row_mine + k * ROW_STEP;
                float part[LANES];
#pragma unroll
                for (int q = 0; q < LANES; ++q) part[q] = s_part[cc * LANES + q][s_mine];
                const float y = tree_sum<LANES>(part);
                if (d0 + cc < dim)
                    out[(tile_row0 + k * ROW_STEP) * length + t] = from_float(fmaf(y, gate[k], dug[k]));
            }
        }
    }
}
