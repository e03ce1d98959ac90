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
//   SCAN_CHANNELS        channels per block (block = SEGMENTS * CHANNELS * LANES threads)
//   SCAN_CHUNK           time steps staged in shared memory at a time
//   SCAN_MIN_BLOCKS      blocks per SM to fit in registers (__launch_bounds__)
//   SCAN_SEGMENTS        time segments scanned in parallel per channel (1: one pass over time)
//
// Math, per batch b, channel d, state n, step t (float32 whatever the input type):
//   dt = softplus(delta + delta_bias[d]);  h[n] = exp(dt * A[d, n]) * h[n] + dt * B[n, t] * u
//   out = (sum_n h[n] * C[n, t] + D[d] * u) * silu(z)
// D, z and delta_bias may be null pointers (no skip term, no gate, no bias).
// Second output, for MaMe's informativeness: dt_sums[b, g, t] = sum of dt over the channels
// 8g .. 8g + 7 (those below dim), added pairwise in one fixed order. A block with whole groups
// (8, 16, 32 channels, one pass over time) adds them from its dt tile; in a split with fewer
// channels per block (or segments) the block holding channel 8g computes the group's dt from
// delta once more. Both use the same float operations, so every split writes the same bits.
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
//
// Time segments (SCAN_SEGMENTS = S > 1, for few channels, e.g. batch 1): there are too few
// channels to fill the GPU, and the time is one warp's chain of chunks. The block then holds S
// copies of the layout above, copy k for the k-th of S consecutive stretches of time. Pass 1
// scans each stretch from h = 0, keeping only its final state and sum of dt; the state entering
// stretch k is then the fold over earlier stretches of h_in <- exp(A * sum dt) * h_in + h_end
// (the decay across a stretch is exp(A * its sum of dt)); pass 2 scans each stretch again from
// its h_in and writes out. When a stretch fits in one chunk (L <= S * CHUNK) pass 2 rescans the
// tiles pass 1 staged, so each warp stages one chunk and scans two instead of staging and
// scanning ceil(L / CHUNK) (restaging per pass was measured slower than one pass: device call
// 8 in docs/perf-notes.md). To fit the whole sequence in 48 KB, segmented splits add the LANES
// partial sums with warp shuffles (one float per channel-step in shared memory, not LANES).

#if !defined(SCAN_KERNEL_NAME) || !defined(SCAN_DTYPE) || !defined(SCAN_DSTATE) ||             \
    !defined(SCAN_DELTA_SOFTPLUS) || !defined(SCAN_REVERSE) || !defined(SCAN_LANES) ||         \
    !defined(SCAN_CHANNELS) || !defined(SCAN_CHUNK) || !defined(SCAN_MIN_BLOCKS) ||          \
    !defined(SCAN_SEGMENTS)
#error "compile with the -D options of mame_deploy.plugins.launch.compile_options()"
#endif

namespace mame_scan {

constexpr int N = SCAN_DSTATE;
constexpr int LANES = SCAN_LANES;
constexpr int CHANNELS = SCAN_CHANNELS;
constexpr int CHUNK = SCAN_CHUNK;
constexpr int SEGMENTS = SCAN_SEGMENTS;
constexpr int SEG_THREADS = CHANNELS * LANES;  // threads of one time segment
constexpr int THREADS = SEGMENTS * SEG_THREADS;
constexpr int STATES_PER_LANE = N / LANES;
// Rows of the shared tiles are CHUNK floats plus padding: a multiple of 4 (16-byte vector reads)
// with an odd number of 16-byte units, so rows read together fall in different banks.
constexpr int ROW = CHUNK + ((CHUNK / 4) % 2 == 0 ? 4 : 0);
// Staging: thread lt of a segment always handles step lt % CHUNK of the chunk, in rows (channels
// of the (CHANNELS x CHUNK) tile, states of the (N x CHUNK) B and C tiles) lt / CHUNK + k *
// ROW_STEP. Consecutive threads touch consecutive steps, so global loads and stores are coalesced.
constexpr int ROW_STEP = SEG_THREADS / CHUNK;
constexpr int TILE_PER_THREAD = CHANNELS / ROW_STEP;
constexpr int BC_PER_THREAD = (N + ROW_STEP - 1) / ROW_STEP;
constexpr float LOG2E = 1.4426950408889634f;
constexpr int DT_GROUP = 8;  // channels per dt_sums group (contract.DT_GROUP)
// dt_sums from the dt tiles (whole groups per block, one pass over time), else recomputed.
constexpr bool TILE_DT_SUMS = SEGMENTS == 1 && CHANNELS % DT_GROUP == 0;
static_assert(CHANNELS % DT_GROUP == 0 || DT_GROUP % CHANNELS == 0,
              "SCAN_CHANNELS must be a multiple or a divisor of 8 (the dt_sums groups)");

static_assert(LANES == 1 || LANES == 2 || LANES == 4 || LANES == 8 || LANES == 16 || LANES == 32,
              "SCAN_LANES must be a power of two up to 32");
static_assert(N % LANES == 0, "SCAN_DSTATE must be a multiple of SCAN_LANES");
static_assert(CHUNK % 4 == 0 && CHUNK % LANES == 0, "SCAN_CHUNK must be a multiple of 4 and LANES");
static_assert(SEGMENTS >= 1 && SEGMENTS <= 16, "SCAN_SEGMENTS must be 1..16");
constexpr bool SEGMENTED = SEGMENTS > 1;
static_assert(!SEGMENTED || LANES >= 4, "segmented splits need at least 4 lanes (shuffle reduction)");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block must be whole warps, at most 1024");
static_assert(SEG_THREADS % CHUNK == 0, "SCAN_CHUNK must divide LANES * CHANNELS");
// Shared memory per block: the tiles of every segment, the partial sums (LANES per channel-step,
// or one when segmented), bias and D, the segments' carries. Unused arrays get one row.
constexpr int PART_ROWS = SEGMENTED ? 1 : SEG_THREADS;
constexpr int Y_ROWS = SEGMENTED ? SEGMENTS * CHANNELS : 1;
constexpr int CARRY_ROWS = SEGMENTED ? THREADS : 1;
static_assert(4 * ROW * (SEGMENTS * (2 * CHANNELS + 2 * N) + PART_ROWS + Y_ROWS) + 8 * CHANNELS +
                  4 * CARRY_ROWS * (STATES_PER_LANE + 1) <= 48 * 1024,
              "shared tiles exceed 48 KB: use fewer channels, segments or a shorter chunk");

template <bool V>
struct Flag {  // a compile-time bool passed to a generic lambda (no <type_traits> under NVRTC)
    static constexpr bool value = V;
};

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

// Sum over the LANES lanes of a channel (lane r = threadIdx % LANES) of p[0..3], 4 steps:
// returns the sum of p[r % 4] (reduce-scatter: 2 + log2(LANES / 4) shuffle rounds).
__device__ __forceinline__ float lane_sum4(const float (&p)[4], int r) {
    constexpr unsigned FULL = 0xffffffffu;
    const bool hi2 = r & 2, hi1 = r & 1;
    // Lanes with bit 1 clear keep steps 0, 1 and send 2, 3 to their partner; the others the reverse.
    float keep0 = hi2 ? p[2] : p[0], keep1 = hi2 ? p[3] : p[1];
    keep0 += __shfl_xor_sync(FULL, hi2 ? p[0] : p[2], 2);
    keep1 += __shfl_xor_sync(FULL, hi2 ? p[1] : p[3], 2);
    float mine = hi1 ? keep1 : keep0;  // step (r & 2) + (r & 1)
    mine += __shfl_xor_sync(FULL, hi1 ? keep0 : keep1, 1);
#pragma unroll
    for (int m = 4; m < LANES; m *= 2) mine += __shfl_xor_sync(FULL, mine, m);
    return mine;
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
    elem_t* __restrict__ out,               // (batch, dim, length)
    float* __restrict__ dt_sums)            // (batch, ceil(dim / 8), length)
{
    __shared__ __align__(16) float s_dt[SEGMENTS][CHANNELS][ROW];   // dt of each staged step
    __shared__ __align__(16) float s_dtu[SEGMENTS][CHANNELS][ROW];  // dt * u
    __shared__ __align__(16) float s_B[SEGMENTS][N][ROW];
    __shared__ __align__(16) float s_C[SEGMENTS][N][ROW];
    __shared__ __align__(16) float s_part[PART_ROWS][ROW];  // per scan thread: sum over its states
    __shared__ __align__(16) float s_y[Y_ROWS][ROW];        // segmented: y of each channel-step
    __shared__ float s_carry[CARRY_ROWS][STATES_PER_LANE + 1];  // pass 1: final states, sum of dt
    __shared__ float s_bias[CHANNELS];
    __shared__ float s_D[CHANNELS];

    const int tid = threadIdx.x;
    const int b = blockIdx.x;                // grid: (batch, ceil(dim / CHANNELS), 1)
    const int d0 = blockIdx.y * CHANNELS;
    if (b >= batch) return;  // whole block: no barrier is skipped by part of it
    const int groups = (dim + DT_GROUP - 1) / DT_GROUP;  // rows of dt_sums per sample

    // dt of channel d at time t, as staging computes it (one definition: the same bits).
    auto step_size = [&](float delta_v, float bias_v) {
        const float dt = delta_v + bias_v;
        return SCAN_DELTA_SOFTPLUS ? softplus(dt) : dt;
    };

    if (tid < CHANNELS) {
        const int d = d0 + tid;
        s_bias[tid] = (d < dim && delta_bias != nullptr) ? delta_bias[d] : 0.f;
        s_D[tid] = (d < dim && Dskip != nullptr) ? Dskip[d] : 0.f;
    }

    // Time segment of this thread: logical steps [seg_begin, seg_begin + seg_len), cut at length.
    // Every segment runs the same number of chunks, so the block's barriers line up.
    const int seg = tid / SEG_THREADS;
    const int lt = tid % SEG_THREADS;  // thread within its segment
    const int seg_len = (length + SEGMENTS - 1) / SEGMENTS;
    const int seg_begin = seg * seg_len;
    float (*const t_dt)[ROW] = s_dt[seg];
    float (*const t_dtu)[ROW] = s_dtu[seg];
    float (*const t_B)[ROW] = s_B[seg];
    float (*const t_C)[ROW] = s_C[seg];
    float (*const t_y)[ROW] = s_y + (SEGMENTED ? seg * CHANNELS : 0);

    // Scan role: channel c of the block, lane r of its LANES threads, states r + LANES * j
    // (interleaved so the LANES rows read together sit in different banks).
    const int c = lt / LANES;
    const int r = lt % LANES;
    const int d_scan = d0 + c;
    float A2[STATES_PER_LANE];  // A * log2(e): exp(dt * A) = 2^(dt * A2)
    float h[STATES_PER_LANE];
#pragma unroll
    for (int j = 0; j < STATES_PER_LANE; ++j) {
        A2[j] = d_scan < dim ? A[(size_t)d_scan * N + r + LANES * j] * LOG2E : 0.f;
        h[j] = 0.f;
    }

    // Staging role (see ROW_STEP): step s_mine of each chunk, rows row_mine + k * ROW_STEP.
    const int s_mine = lt % CHUNK;
    const int row_mine = lt / CHUNK;
    const size_t tile_row0 = (size_t)b * dim + d0 + row_mine;  // (b, d) row of element k = 0
    const size_t bc_row0 = (size_t)b * N + row_mine;            // (b, n) row of element k = 0
    const elem_t zero = from_float(0.f);

    // Raw inputs of one chunk, loaded a chunk ahead (register prefetch).
    elem_t ru[TILE_PER_THREAD], rdelta[TILE_PER_THREAD], rz[TILE_PER_THREAD];
    elem_t rB[BC_PER_THREAD], rC[BC_PER_THREAD];

    // Is step s0 + s_mine of this segment a real step (inside the segment and the sequence)?
    auto step_ok_at = [&](int s0) { return s0 + s_mine < seg_len && seg_begin + s0 + s_mine < length; };

    // full false (pass 1 of a segmented scan that restages): only what the state needs, no z, no C.
    auto load_chunk = [&](int s0, bool full) {
        const bool step_ok = step_ok_at(s0);
        const size_t t = step_ok ? time_index(seg_begin + s0 + s_mine, length) : 0;
#pragma unroll
        for (int k = 0; k < TILE_PER_THREAD; ++k) {
            const bool ok = step_ok && d0 + row_mine + k * ROW_STEP < dim;
            const size_t idx = (tile_row0 + k * ROW_STEP) * length + t;
            ru[k] = ok ? u[idx] : zero;
            rdelta[k] = ok ? delta[idx] : zero;
            if (full) rz[k] = (ok && z != nullptr) ? z[idx] : zero;
        }
#pragma unroll
        for (int k = 0; k < BC_PER_THREAD; ++k) {
            const bool ok = step_ok && row_mine + k * ROW_STEP < N;
            const size_t idx = (bc_row0 + k * ROW_STEP) * length + t;
            rB[k] = ok ? Bmat[idx] : zero;
            if (full) rC[k] = ok ? Cmat[idx] : zero;
        }
    };

    float gate[TILE_PER_THREAD], dug[TILE_PER_THREAD];  // silu(z) and D * u * silu(z)
    float dt_sum = 0.f;  // pass 1: sum of dt over the segment (this thread's channel)

    // Segments of one chunk: pass 1 stages everything, pass 2 rescans those tiles.
    const bool one_chunk = SEGMENTED && seg_len <= CHUNK;

    // Stage the chunk at s0 from the registers load_chunk filled (the previous scan finished at
    // the last barrier): dt and dt * u once per (channel, step). Steps past the end get dt = 0
    // and no input, which leaves the state untouched (exp(0) = 1), so scans run whole chunks.
    auto stage_chunk = [&](int s0, bool full) {
        const bool step_ok = step_ok_at(s0);
#pragma unroll
        for (int k = 0; k < TILE_PER_THREAD; ++k) {
            const int cc = row_mine + k * ROW_STEP;
            const float uf = to_float(ru[k]);
            const float dt = step_ok ? step_size(to_float(rdelta[k]), s_bias[cc]) : 0.f;
            t_dt[cc][s_mine] = dt;
            t_dtu[cc][s_mine] = dt * uf;
            if (full) {
                gate[k] = z != nullptr ? silu(to_float(rz[k])) : 1.f;
                dug[k] = s_D[cc] * uf * gate[k];
            }
        }
#pragma unroll
        for (int k = 0; k < BC_PER_THREAD; ++k) {
            const int n = row_mine + k * ROW_STEP;
            if (n < N) {
                t_B[n][s_mine] = to_float(rB[k]);
                if (full) t_C[n][s_mine] = to_float(rC[k]);
            }
        }
    };

    // One pass over this thread's segment, chunk by chunk, continuing from h. With EMIT the
    // outputs are written; without, h ends as the segment's final state and dt_sum its sum of dt.
    // stage false: the tiles already hold the (single) chunk; reload: chunk 0 is not in the
    // prefetch registers yet (pass 2 of a restaging split).
    auto scan_pass = [&](auto emit, bool stage, bool reload) {
        constexpr bool EMIT = decltype(emit)::value;
        const bool full = EMIT || one_chunk;  // stage C and z too
        if (reload) load_chunk(0, full);
        for (int s0 = 0; s0 < seg_len; s0 += CHUNK) {
            const bool step_ok = step_ok_at(s0);
            if (stage) {
                stage_chunk(s0, full);
                __syncthreads();
                if (s0 + CHUNK < seg_len) load_chunk(s0 + CHUNK, full);  // in flight during the scan
            }

            // Scan, 4 steps at a time: p[i] = this thread's states' share of y at step g + i.
            // With one or two states per thread (the small-batch splits) the shared-memory reads
            // of group g + 4 are issued before group g is computed (and before its partial sums
            // are stored, which the compiler would not move loads across), so their latency
            // overlaps the arithmetic even with one warp per scheduler. With several states per
            // thread the group itself has enough independent work and the extra registers would
            // cost occupancy: those splits read each group where it is used.
            constexpr bool READ_AHEAD = STATES_PER_LANE <= 2;
            Group cur = load_group(c, r, 0, t_dt, t_dtu, t_B, t_C);
#pragma unroll
            for (int g = 0; g < CHUNK; g += 4) {
                Group next;
                if (READ_AHEAD && g + 4 < CHUNK) next = load_group(c, r, g + 4, t_dt, t_dtu, t_B, t_C);
                if (!READ_AHEAD && g > 0) cur = load_group(c, r, g, t_dt, t_dtu, t_B, t_C);
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
                        if (EMIT) p[i] = fmaf(h[j], cc4[i], p[i]);
                    }
                }
                if (EMIT && SEGMENTED) {
                    const float y = lane_sum4(p, r);
                    if (r < 4) t_y[c][g + r] = y;
                } else if (EMIT) {
                    *reinterpret_cast<float4*>(&s_part[lt][g]) = make_float4(p[0], p[1], p[2], p[3]);
                } else {
                    dt_sum += (dtv[0] + dtv[1]) + (dtv[2] + dtv[3]);
                }
                if (READ_AHEAD && g + 4 < CHUNK) cur = next;
            }
            if constexpr (EMIT && TILE_DT_SUMS) {
                // The tile is read-only until the barrier below: each (group, step) of the chunk.
                for (int i = lt; i < (CHANNELS / DT_GROUP) * CHUNK; i += SEG_THREADS) {
                    const int gi = i / CHUNK, st = i % CHUNK;
                    if (s0 + st < length) {
                        float v[DT_GROUP];
#pragma unroll
                        for (int k = 0; k < DT_GROUP; ++k)
                            v[k] = d0 + gi * DT_GROUP + k < dim ? t_dt[gi * DT_GROUP + k][st] : 0.f;
                        const size_t row = (size_t)b * groups + d0 / DT_GROUP + gi;
                        if (d0 + gi * DT_GROUP < dim) dt_sums[row * length + time_index(s0 + st, length)] = tree_sum<DT_GROUP>(v);
                    }
                }
            }
            __syncthreads();

            // Epilogue on the staging layout: y = sum of the LANES partials; coalesced stores of
            // (y + D u) * silu(z).
            if (EMIT && step_ok) {
                const size_t t = time_index(seg_begin + s0 + s_mine, length);
#pragma unroll
                for (int k = 0; k < TILE_PER_THREAD; ++k) {
                    const int cc = row_mine + k * ROW_STEP;
                    float y;
                    if constexpr (SEGMENTED) {
                        y = t_y[cc][s_mine];
                    } else {
                        float part[LANES];
#pragma unroll
                        for (int q = 0; q < LANES; ++q) part[q] = s_part[cc * LANES + q][s_mine];
                        y = tree_sum<LANES>(part);
                    }
                    if (d0 + cc < dim)
                        out[(tile_row0 + k * ROW_STEP) * length + t] = from_float(fmaf(y, gate[k], dug[k]));
                }
            }
        }
    };

    // The first chunk's loads are in flight across the barrier (a second memory round trip
    // after the bias / D loads costs about a microsecond at batch 1).
    load_chunk(0, !SEGMENTED || one_chunk);
    __syncthreads();  // s_bias, s_D
    if constexpr (SEGMENTED) {
        scan_pass(Flag<false>{}, true, false);
        // Carry in: fold the final states of the earlier segments of this (channel, state).
#pragma unroll
        for (int j = 0; j < STATES_PER_LANE; ++j) s_carry[tid][j] = h[j];
        s_carry[tid][STATES_PER_LANE] = dt_sum;
        __syncthreads();
#pragma unroll
        for (int j = 0; j < STATES_PER_LANE; ++j) h[j] = 0.f;
        for (int q = 0; q < seg; ++q) {
            const float* carry = s_carry[q * SEG_THREADS + lt];
#pragma unroll
            for (int j = 0; j < STATES_PER_LANE; ++j)
                h[j] = fmaf(fast_exp2(carry[STATES_PER_LANE] * A2[j]), h[j], carry[j]);
        }
    }
    scan_pass(Flag<true>{}, !one_chunk, SEGMENTED && !one_chunk);

    if constexpr (!TILE_DT_SUMS) {
        // The groups whose first channel is in this block: dt from delta, for every step.
        const int g0 = (d0 + DT_GROUP - 1) / DT_GROUP;
        const int g_end = min((d0 + CHANNELS + DT_GROUP - 1) / DT_GROUP, groups);
        for (int i = tid; i < (g_end - g0) * length; i += THREADS) {
            const int g = g0 + i / length, t = i % length;
            float v[DT_GROUP];
#pragma unroll
            for (int k = 0; k < DT_GROUP; ++k) {
                const int d = g * DT_GROUP + k;
                const float bias_v = delta_bias != nullptr && d < dim ? delta_bias[d] : 0.f;
                v[k] = d < dim ? step_size(to_float(delta[((size_t)b * dim + d) * length + t]), bias_v) : 0.f;
            }
            dt_sums[((size_t)b * groups + g) * length + t] = tree_sum<DT_GROUP>(v);
        }
    }
}
