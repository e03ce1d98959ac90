// One MaMe / ToMe / pruning step (mame::TokenMerge), one kernel for PyTorch and TensorRT.
//
// Plain CUDA C++ with no headers, so NVRTC compiles it as it is; nvcc -arch=sm_90 too. The
// definition it follows is mame_deploy/ops/token_merge/reference.py; every variant and work
// split is a -D define supplied by mame_deploy/plugins/merge_launch.py (compile_options), which
// also gives the grid, block and argument order. The node's attributes are int32 arguments
// (lam as the bits of a float32), so one compiled variant serves every method:
//
//   r            patches removed                 prune        1: drop the r least informative
//   split        0: the n // 2 least informative patches are sources; 1: even positions
//   arrangement  0: survivors in scan order; 1: [unmerged sources; destinations]
//   weighting    0: merge weights size x score; 1: size alone
//   metric       0: similarity on hidden; 1: on residual + hidden
//   lam_bits     lam's float32 bits (0: rank by similarity alone)
//   score_scale_bits  the float32 bits of the factor the summed score parts are multiplied by
//
// The defines:
//
//   TM_KERNEL_NAME        extern "C" name of the kernel
//   TM_HIDDEN_DTYPE       0 float32, 1 float16, 2 bfloat16 (hidden, hidden_out)
//   TM_RESIDUAL_DTYPE     same codes (residual, residual_out): float32 or the hidden's type
//   TM_CLUSTER            thread blocks per sample (a thread-block cluster when > 1); 16 is a
//                         non-portable cluster size: the launcher must allow it on the function
//   TM_DST_GROUPS         groups the cluster splits the destinations into (divides TM_CLUSTER);
//                         the sources are split into TM_CLUSTER / TM_DST_GROUPS groups
//   TM_THREADS            threads per block (a multiple of 32, 128 to 1024)
//   TM_MATCH_THREADS      threads of the block that compute the matching tile (a multiple of 32, at
//                         most TM_THREADS); the others keep the norms and wait
//   TM_TY, TM_MY, TM_MX   matching tile: TY x (MATCH_THREADS / TY) threads, MY sources x MX destinations each
//   TM_KT                 channels staged in shared memory at a time for the matching
//   TM_N_CAP              most patches (length - 1) the decision arrays hold
//   TM_MIN_BLOCKS         blocks per SM the register allocation must allow (__launch_bounds__)
//   TM_TRACE              optional: compile in the phase timeline (benchmarks/profile_merge.py)
//
// One launch does the whole step. Grid (CLUSTER * batch): the CLUSTER blocks of a sample form a
// cluster (compile-time __cluster_dims__, so a plain cuLaunchKernel launches it, as TensorRT
// does; up to 8 blocks, 16 once the function allows non-portable clusters). Per sample:
//   1. the blocks share the informativeness: each sums the score's parts for a slice of the
//      tokens (SCORE_LANES interleaved lanes, then the lanes pairwise: the contract's order) and
//      writes it into every block of the cluster; every block then rounds the scores to float16
//      (decision keys) and ranks them stably (equal keys by position) with integer compares:
//      the split into sources and destinations, or the pruned patches;
//   2. the blocks split the sources into groups and the destinations into groups, a pair per
//      block; each computes the cosine similarity of its sources to its destinations as a
//      register-tiled float32 product over channels staged in shared memory (each dot product is
//      one fused multiply-add chain in channel order, the norms likewise, so every work split
//      gives the same bits; for float16 / bfloat16 hidden states with the hidden metric,
//      m16n8k16 tensor-core MMAs of the 16-bit values over 16-channel steps in channel order),
//      rounds it to float16 and keeps the first maximum per source; the
//      blocks then write their sources' best matches into every block of the cluster
//      (distributed shared memory), meet at one cluster barrier, and each takes the best over
//      the destination groups (exact: the higher key, on a tie the first destination);
//   3. every block ranks the sources by the lam-adjusted key (IEEE operations in the
//      reference's order, no contraction; lam's extremes are step 1's first and last ranks),
//      stably and descending with the integer compares of step 1, picks the top r, and lays out
//      the output: survivor order, class-token slot, each destination's merge weights;
//   4. the blocks share the output rows: the threads copy the rows no source merges into, both
//      streams, several 16- or 8-byte accesses in flight each, and fold each destination's
//      sources into its row with float32 weights, a (merge group, 4-channel unit) pair a thread.
// No atomics, no inter-block ordering beyond the two barriers: results are deterministic and a
// sample's result does not depend on its batch or on the work split. Static shared memory only
// (under 48 KB): TensorRT's AOT launch cannot opt a kernel in to more.

#if !defined(TM_KERNEL_NAME) || !defined(TM_HIDDEN_DTYPE) || !defined(TM_RESIDUAL_DTYPE) ||     \
    !defined(TM_CLUSTER) || !defined(TM_TY) || !defined(TM_MY) || !defined(TM_MX) ||          \
    !defined(TM_KT) || !defined(TM_N_CAP) || !defined(TM_MIN_BLOCKS) || !defined(TM_DST_GROUPS) ||          \
    !defined(TM_THREADS) || !defined(TM_MATCH_THREADS)
#error "compile with the -D options of mame_deploy.plugins.merge_launch.compile_options()"
#endif

namespace mame_merge {

constexpr int THREADS = TM_THREADS;
constexpr int WARPS = THREADS / 32;
constexpr int CLUSTER = TM_CLUSTER;
constexpr int DST_GROUPS = TM_DST_GROUPS;
constexpr int SRC_GROUPS = CLUSTER / DST_GROUPS;
constexpr int TY = TM_TY;
// The threads that compute the tile. Fewer threads with larger tiles can be faster: at batch 1
// (H200) 4 x 2 products on 128 of 256 threads took 6.27 us of stages where 4 x 1 on all 256
// took 8.93, and 4 x 4 on 64 threads 9.22 (docs/perf-notes.md, "Fewer threads match").
constexpr int MATCH_THREADS = TM_MATCH_THREADS;
constexpr int TX = MATCH_THREADS / TY;
constexpr int MY = TM_MY;
constexpr int MX = TM_MX;
constexpr int TILE_S = TY * MY;  // sources per matching pass
constexpr int TILE_D = TX * MX;  // destinations per matching pass
constexpr int KT = TM_KT;
constexpr int U = KT / 4;  // 4-channel units per staged row
// Unrolled channel units of the matching loop: a small register tile (the few-sample splits) has
// few independent FMAs per unit to cover its shared-memory loads, and unrolling lets the next
// units' loads go out early (H200, batch 1: 9.98 -> 9.66 us for 4 x 1 tiles, 10.50 -> 9.18 us
// for the 8-block split's 4 x 4); a large tile has enough FMAs per unit, and unrolling it would spill.
constexpr int TILE_UNROLL = MY * MX <= 16 ? 4 : 1;
// Row stride of the staged tiles: KT plus 4 floats, an odd number of 16-byte units, so that the
// 16-byte reads of 8 consecutive rows fall in different banks.
constexpr int ROW = KT + 4;
constexpr int N_CAP = TM_N_CAP;
constexpr int S_CAP = (N_CAP + 1) / 2;  // most sources (and destinations)
constexpr int SCORE_LANES = 8;           // contract.SCORE_LANES: the score's parts add up in 8 lanes

static_assert(THREADS % 32 == 0 && THREADS >= 128 && THREADS <= 1024, "TM_THREADS must be a multiple of 32 in 128..1024");
static_assert(MATCH_THREADS % 32 == 0 && MATCH_THREADS <= THREADS, "TM_MATCH_THREADS must be a multiple of 32, at most TM_THREADS");
static_assert(MATCH_THREADS % TY == 0 && TX <= 32, "TM_TY must divide TM_MATCH_THREADS, at most 32 threads per source row (one warp)");
static_assert(TILE_S + TILE_D <= THREADS, "one thread per staged row keeps its norm: TILE_S + TILE_D <= TM_THREADS");
// The threads that keep the norms: those that do not match where there are enough of them (so
// the norms' reads overlap the tile's on other schedulers), else the first ones.
constexpr int NORM_BASE = THREADS - MATCH_THREADS >= TILE_S + TILE_D ? MATCH_THREADS : 0;
// The half types' similarity on tensor cores: m16n8k16 MMAs of the 16-bit values as loaded, with
// float32 accumulation (a product of two float16 or two bfloat16 values is exact in float32);
// every split computes a pair's dot product as the same MMAs over 16-channel steps in channel
// order (so the same bits). The stream metric (residual + hidden in float32) is not a 16-bit value
// and keeps the FMA chains, as float32 does.
constexpr bool TC_MATCH = TM_HIDDEN_DTYPE != 0;
// A tensor-core stage holds twice KT channels: 16-bit values, in the bytes (shared memory and
// staging registers) of KT float32 ones. Its rows are padded to a count of 32-bit words that is 4
// modulo 8 (KT is a multiple of 8: KT words and 4 more), so that a fragment load's 8 rows x 4
// words fall in 32 banks.
constexpr int KT16 = 2 * KT;
constexpr int ROW16 = KT16 + 8;  // in 16-bit elements
constexpr int MATCH_WARPS = MATCH_THREADS / 32;
constexpr int STRIPS = TILE_S / 16;  // rows of 16 x 8 pieces
constexpr int COLS = TILE_D / 8;     // pieces per row
// Each warp takes SPW whole strips (more strips than warps) or a run of CPW pieces of one strip
// (WPS warps a strip), so that its pieces lie at fixed offsets from one source row and one
// destination row: a handful of address registers, as the FMA tile's, and one A fragment a strip.
constexpr int WPS = MATCH_WARPS >= STRIPS ? MATCH_WARPS / STRIPS : 1;
constexpr int SPW = MATCH_WARPS >= STRIPS ? 1 : (STRIPS + MATCH_WARPS - 1) / MATCH_WARPS;
constexpr int CPW = (COLS + WPS - 1) / WPS;
static_assert(TILE_S % 16 == 0 && TILE_D % 8 == 0, "the matching tile must be whole 16 x 8 pieces: TM_TY * TM_MY a multiple of 16, destinations a multiple of 8");
static_assert(KT % 8 == 0, "TM_KT must be a multiple of 8 (a tensor-core stage is whole 16-channel steps)");
static_assert(ROW16 / 2 % 8 == 4, "16-bit row stride must be 4 modulo 8 words");
static_assert(ROW / 4 % 2 == 1, "row stride must be an odd number of 16-byte units");
static_assert(N_CAP % 32 == 0 && N_CAP <= 1024, "TM_N_CAP must be a multiple of 32, at most 1024");
static_assert(CLUSTER == 1 || CLUSTER == 2 || CLUSTER == 4 || CLUSTER == 8 || CLUSTER == 16,
              "TM_CLUSTER must be 1, 2, 4, 8 or 16");
static_assert(DST_GROUPS >= 1 && CLUSTER % DST_GROUPS == 0, "TM_DST_GROUPS must divide TM_CLUSTER");

// ---------------------------------------------------------------------------------------------
// Element types: raw 16-bit patterns for the half types, so no cuda_fp16.h / cuda_bf16.h.

__device__ __forceinline__ float half_to_float(unsigned short v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ unsigned short float_to_half(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));  // round to nearest even, as __float2half_rn
    return h;
}
__device__ __forceinline__ float bf16_to_float(unsigned short v) {
    return __int_as_float(static_cast<int>(v) << 16);  // bfloat16 is float32's top half
}
__device__ __forceinline__ unsigned short float_to_bf16(float v) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

// The decision key: x rounded to float16 (nearest even) and back (reference.decision_key).
__device__ __forceinline__ float decision_key(float x) { return half_to_float(float_to_half(x)); }

template <int DT>
struct Elem;

template <>
struct Elem<0> {
    typedef float T;
    typedef float4 Raw4;  // four elements, one 16-byte access
    static __device__ __forceinline__ float4 widen(float4 v) { return v; }
    static __device__ __forceinline__ float4 narrow(float4 v) { return v; }
};

template <int DT>
struct Half16 {
    typedef unsigned short T;
    typedef uint2 Raw4;  // four elements, one 8-byte access
    static __device__ __forceinline__ float one(unsigned v) {
        return DT == 1 ? half_to_float(static_cast<unsigned short>(v)) : bf16_to_float(static_cast<unsigned short>(v));
    }
    static __device__ __forceinline__ unsigned back(float v) {
        return DT == 1 ? float_to_half(v) : float_to_bf16(v);
    }
    static __device__ __forceinline__ float4 widen(uint2 v) {
        return make_float4(one(v.x & 0xffffu), one(v.x >> 16), one(v.y & 0xffffu), one(v.y >> 16));
    }
    static __device__ __forceinline__ uint2 narrow(float4 v) {
        return make_uint2(back(v.x) | (back(v.y) << 16), back(v.z) | (back(v.w) << 16));
    }
};

template <>
struct Elem<1> : Half16<1> {};
template <>
struct Elem<2> : Half16<2> {};

typedef Elem<TM_HIDDEN_DTYPE> HE;
typedef Elem<TM_RESIDUAL_DTYPE> RE;
typedef HE::T hid_t;
typedef RE::T res_t;

template <class E>
__device__ __forceinline__ float4 load4(const typename E::T* p) {
    return E::widen(*reinterpret_cast<const typename E::Raw4*>(p));
}
template <class E>
__device__ __forceinline__ void store4(typename E::T* p, float4 v) {
    *reinterpret_cast<typename E::Raw4*>(p) = E::narrow(v);
}

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90): rank, distributed shared memory stores, the barrier.

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r = 0;
    if constexpr (CLUSTER > 1) asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned a;
    asm("{ .reg .u64 g; cvta.to.shared.u64 g, %1; cvt.u32.u64 %0, g; }" : "=r"(a) : "l"(p));
    return a;
}
// Store v at the same shared-memory location of cluster block `rank`.
__device__ __forceinline__ void store_remote(const void* local, unsigned rank, unsigned v) {
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(shared_address(local)), "r"(rank));
    asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(remote), "r"(v) : "memory");
}
// Split barrier: arrive early (relaxed: orders nothing), wait before the first remote access, so
// that every block of the cluster has started before its shared memory is written.
__device__ __forceinline__ void cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// ---------------------------------------------------------------------------------------------
// Phase timeline (benchmarks/profile_merge.py timeline), compiled in only with -DTM_TRACE: thread
// 0 of each block of the first sample stamps %globaltimer and clock64 at each numbered mark, into
// a ring of TRACE_LAUNCHES launches that the host reads with cuModuleGetGlobal.

#ifdef TM_TRACE
constexpr int TRACE_MARKS = 16, TRACE_LAUNCHES = 8;
}  // namespace mame_merge
// At global scope, so their names are not mangled.
__device__ unsigned long long tm_trace_time[mame_merge::TRACE_LAUNCHES][TM_CLUSTER][mame_merge::TRACE_MARKS];
__device__ unsigned long long tm_trace_clock[mame_merge::TRACE_LAUNCHES][TM_CLUSTER][mame_merge::TRACE_MARKS];
__device__ unsigned tm_trace_count;  // launches so far; block 0 counts its launch at its end
namespace mame_merge {
__device__ __forceinline__ void trace_mark(unsigned launch, int mark) {
    if (threadIdx.x != 0 || blockIdx.x >= CLUSTER) return;
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    tm_trace_time[launch % TRACE_LAUNCHES][blockIdx.x][mark] = t;
    tm_trace_clock[launch % TRACE_LAUNCHES][blockIdx.x][mark] = clock64();
}
#define TM_MARK(k) trace_mark(sh.trace_launch, k)
#else
#define TM_MARK(k)
#endif

// ---------------------------------------------------------------------------------------------
// Shared memory.

struct Tiles {
    float a[TILE_S][ROW];  // sources' metric, KT channels
    float b[TILE_D][ROW];  // destinations' metric
};

// The tensor-core path's tiles: KT16 channels of the hidden state as loaded (16-bit patterns).
struct Tiles16 {
    unsigned short a[TILE_S][ROW16];
    unsigned short b[TILE_D][ROW16];
};

// The tensor-core path's best match per source and 8-destination piece, after the last stage.
struct Candidates {
    float key[TC_MATCH ? TILE_S : 1][COLS];  // (float32 has no tensor-core path)
    int dst[TC_MATCH ? TILE_S : 1][COLS];
};

// What only the matching uses, and what only the layout after it uses, share memory.
struct Matching {
    union {
        Tiles tiles;
        Tiles16 tiles16;
        Candidates cand;
    };
    float den_a[TILE_S];  // max(||metric||, 1e-12) of the staged sources
    float den_b[TILE_D];  // ... and destinations
    int row_a[TILE_S];    // sequence positions of the staged rows
    int row_b[TILE_D];
};
struct Layout {
    unsigned rank_order[S_CAP + 4];  // descending() of each source's rank key, padded (count_below)
    int pos[N_CAP];          // position of each survivor among the survivors (output order)
    int out_seq[N_CAP + 1];  // sequence position read by each output slot
    int first[N_CAP + 1];    // merge group (its first chosen source) writing each slot, -1: none
    int chosen[S_CAP];       // sources by descending rank key (the first r merge)
    int m_seq[S_CAP];        // per chosen source c: its sequence position
    int m_slot[S_CAP];       // output slot of its destination
    float m_w[S_CAP];        // its merge weight
    float m_size[S_CAP];     // its size
    float m_fold[S_CAP];     // its share of its destination's total weight
    float m_keep[S_CAP];     // for a group's first source: the destination's share
    float m_new_size[S_CAP]; // ... the destination's new size
};

struct Ranking {
    unsigned order[N_CAP];  // ascending() of each patch's key
};

struct Scoring {
    float lane[SCORE_LANES][N_CAP + 1];  // each lane's sum of the score's parts, by sequence position
};

struct Shared {
    union {  // 16-byte aligned: count_below reads the rank order as uint4
        Scoring sc;   // step 1, the informativeness
        Ranking rk;   // step 1, the ranks
        Matching mt;  // step 2 (this block's own tiles: no other block writes them)
        Layout ly;    // steps 3 and 4
    };
    float score_seq[N_CAP + 1];  // the sample's score by sequence position
    float size_seq[N_CAP + 1];   // ... and size
    float key[N_CAP];        // decision key of each patch's score
    int rank[N_CAP];         // stable ascending rank of key (informativeness split, pruning)
    int slot[N_CAP];         // output slot of each patch (-1: removed)
    short src[S_CAP];        // source candidates (patch indices, ascending)
    short dst[S_CAP];        // destination candidates
    // Each destination group's best match per source: written by the blocks of that group, into
    // every block of the cluster, so outside the union.
    float part_key[DST_GROUPS][S_CAP];
    int part_dst[DST_GROUPS][S_CAP];
    float best_key[S_CAP];   // each source's best similarity key over all destinations
    int best_dst[S_CAP];     // ... and that destination (index into dst)
    int warp_total[WARPS];
    float lo, hi;
#ifdef TM_TRACE
    unsigned trace_launch;  // thread 0's only
#endif
};
static_assert(sizeof(Shared) <= 48 * 1024, "shared memory exceeds 48 KB: use a smaller tile or TM_N_CAP");

// Exclusive prefix count of flag(i) over i in [0, n): calls out(i, position) for each flagged i,
// and other(i, position among the unflagged) for the rest, and returns the count. Every thread
// of the block must call it.
struct NoOut {
    __device__ void operator()(int, int) const {}
};

template <class Flag, class Out, class Other = NoOut>
__device__ int block_prefix(Shared& sh, int n, Flag flag, Out out, Other other = Other()) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int base = 0;
    for (int start = 0; start < n; start += THREADS) {
        const int i = start + threadIdx.x;
        const bool f = i < n && flag(i);
        const unsigned mask = __ballot_sync(0xffffffffu, f);
        if (lane == 0) sh.warp_total[warp] = __popc(mask);
        __syncthreads();
        int before = base, total = base;
        for (int w = 0; w < WARPS; ++w) {
            before += w < warp ? sh.warp_total[w] : 0;
            total += sh.warp_total[w];
        }
        const int p = before + __popc(mask & ((1u << lane) - 1u));
        if (f) out(i, p);
        else if (i < n) other(i, i - p);  // flagged before i: p; the others before i: i - p
        __syncthreads();
        base = total;
    }
    return base;
}

// One token's score parts: those of score, then those of score_b (the contract's concatenation),
// read where they lie: concatenating them first would be a copy per merge block. Offsets within a
// sample are 32-bit (merge_launch.check_shape bounds parts x length): 64-bit index arithmetic
// is several instructions per load, and at batch 1 the step waits on fetching its own code.
struct TokenParts {
    const float* __restrict__ a;  // score's part 0 of the token
    const float* __restrict__ b;  // score_b's part 0 of the token
    int parts_a, L;
    __device__ __forceinline__ float operator[](int k) const { return k < parts_a ? a[k * L] : b[(k - parts_a) * L]; }
};

// acc += parts k, k + SCORE_LANES, ... (N of them, in that order), all N loads in flight first.
template <int N>
__device__ __forceinline__ void add_parts(float& acc, const TokenParts& at, int& k) {
    float v[N];
#pragma unroll
    for (int u = 0; u < N; ++u) v[u] = at[k + u * SCORE_LANES];
#pragma unroll
    for (int u = 0; u < N; ++u) acc = __fadd_rn(acc, v[u]);
    k += N * SCORE_LANES;
}

// The informativeness of token l from its lane sums: lanes added pairwise, neighbours first,
// then scaled (reference.informativeness, operation for operation).
__device__ __forceinline__ float score_of_lanes(const Shared& sh, int l, float scale) {
    float v[SCORE_LANES];
#pragma unroll
    for (int c = 0; c < SCORE_LANES; ++c) v[c] = sh.sc.lane[c][l];
#pragma unroll
    for (int w = SCORE_LANES; w > 1; w /= 2)
#pragma unroll
        for (int i = 0; i < w / 2; ++i) v[i] = __fadd_rn(v[2 * i], v[2 * i + 1]);
    return __fmul_rn(v[0], scale);
}

// Stable ranks through integers: a decision key (a float16 value) as a 16-bit unsigned integer
// of the same order, -0 as +0 (they compare equal) and NaN above +inf (where torch.sort puts it);
// with the position in the low 16 bits every value is unique, so a key's stable rank is the
// count of values below its own: one unsigned compare per pair instead of four float tests.
__device__ __forceinline__ unsigned ordered16(float key) {
    if (key != key) return 0xffffu;
    const unsigned h = float_to_half(key + 0.f);  // + 0: -0 becomes +0
    return (h & 0x8000u) ? (~h & 0xffffu) : (h | 0x8000u);
}
__device__ __forceinline__ unsigned ascending(float key, int i) { return (ordered16(key) << 16) | i; }
// Ascending order of these is descending key order, equal keys by position (NaN first, as
// torch.sort(descending=True) puts it).
__device__ __forceinline__ unsigned descending(float key, int i) { return ((~ordered16(key) & 0xffffu) << 16) | i; }
// The key of an ordered16 value (-0 comes back as +0, a NaN as a NaN).
__device__ __forceinline__ float key_of_ordered16(unsigned u) {
    return half_to_float(static_cast<unsigned short>((u & 0x8000u) ? (u & 0x7fffu) : (~u & 0xffffu)));
}

// The count of values[0, n) below v; values is 16-byte aligned and padded with 0xffffffff up to a
// multiple of 4 entries (pad_order). Eight loads in flight: a rank is a chain of them, on the
// critical path of every step.
__device__ __forceinline__ int count_below(const unsigned* values, int n, unsigned v) {
    const uint4* v4 = reinterpret_cast<const uint4*>(values);
    int c = 0;
#pragma unroll 8
    for (int j = 0; j < (n + 3) / 4; ++j) {
        const uint4 w = v4[j];
        c += (w.x < v) + (w.y < v) + (w.z < v) + (w.w < v);
    }
    return c;
}
__device__ __forceinline__ void pad_order(unsigned* values, int n) {
    if (threadIdx.x < 3 && n + static_cast<int>(threadIdx.x) < (n + 3) / 4 * 4) values[n + threadIdx.x] = 0xffffffffu;
}

// ---------------------------------------------------------------------------------------------
// Matching: for sources [s_begin, s_end) of the candidate list, the first destination of maximal
// similarity key among destinations [d_begin, d_end), into best_key / best_dst (this block's
// destination group's row of sh.part_key / sh.part_dst).

// A stage of KS channels of every staged row: U 4-channel units a row, PER a thread.
template <int KS>
struct Stage {
    static constexpr int U = KS / 4;
    static constexpr int UNITS = (TILE_S + TILE_D) * U;
    static constexpr int PER = (UNITS + THREADS - 1) / THREADS;
};

// The next stage's elements in flight. The tensor-core path (TC) holds the hidden state's bits as
// loaded and stores them as they are, after the products, so that its loads stay in flight over
// them (a conversion right after the load held each warp there: 1.8 us of a bf16 batch-1 step,
// docs/perf-notes.md, thirteenth session). The FMA path widens at the load: its products are
// longer, and holding float16 residuals as loaded made its two-blocks-an-SM split spill.
template <bool TC, int KS>
struct Staged {
    typedef float4 Elem;
    Elem v[Stage<KS>::PER];
    Elem w[Stage<KS>::PER];  // the residual, for the stream metric
};
template <int KS>
struct Staged<true, KS> {  // the hidden metric only: no residual
    typedef HE::Raw4 Elem;
    Elem v[Stage<KS>::PER];
};

template <bool TC, int KS>
__device__ __forceinline__ void load_chunk(const Shared& sh, const hid_t* __restrict__ hidden,
                                           const res_t* __restrict__ residual, bool stream_metric,
                                           long long sample_row, int E, int k0, Staged<TC, KS>& st) {
    constexpr int U = Stage<KS>::U, UNITS = Stage<KS>::UNITS;
#pragma unroll
    for (int p = 0; p < Stage<KS>::PER; ++p) {
        const int unit = threadIdx.x + p * THREADS;
        const int row = unit / U, k = k0 + 4 * (unit % U);
        typename Staged<TC, KS>::Elem v = {};  // zero bits: 0.0 in every type
        float4 w = {};
        if (unit < UNITS && k < E) {
            const int seq = row < TILE_S ? sh.mt.row_a[row] : sh.mt.row_b[row - TILE_S];
            const long long off = (sample_row + seq) * E + k;
            if constexpr (TC) {
                v = *reinterpret_cast<const HE::Raw4*>(hidden + off);
            } else {
                v = load4<HE>(hidden + off);
                if (stream_metric) w = load4<RE>(residual + off);
            }
        }
        st.v[p] = v;
        if constexpr (!TC) st.w[p] = w;
    }
}

// TC: into the 16-bit tiles as loaded (the hidden metric of a half type); else float32 tiles.
template <bool TC, int KS>
__device__ __forceinline__ void store_chunk(Shared& sh, bool stream_metric, const Staged<TC, KS>& st) {
    constexpr int U = Stage<KS>::U, UNITS = Stage<KS>::UNITS;
#pragma unroll
    for (int p = 0; p < Stage<KS>::PER; ++p) {
        const int unit = threadIdx.x + p * THREADS;
        if (unit < UNITS) {
            const int row = unit / U, c = 4 * (unit % U);
            if constexpr (TC) {
                unsigned short* dst = row < TILE_S ? &sh.mt.tiles16.a[row][c] : &sh.mt.tiles16.b[row - TILE_S][c];
                *reinterpret_cast<HE::Raw4*>(dst) = st.v[p];
            } else {
                // The metric of the reference: residual.float() + hidden.float() (one rounding).
                const float4 v = stream_metric ? add4(st.w[p], st.v[p]) : st.v[p];
                float* dst = row < TILE_S ? &sh.mt.tiles.a[row][c] : &sh.mt.tiles.b[row - TILE_S][c];
                *reinterpret_cast<float4*>(dst) = v;
            }
        }
    }
}

// One 4-channel unit of a staged row's norm: sumsq += its squares, in channel order.
__device__ __forceinline__ void norm_fma4(float& sumsq, float4 v) {
    sumsq = fmaf(v.x, v.x, sumsq);
    sumsq = fmaf(v.y, v.y, sumsq);
    sumsq = fmaf(v.z, v.z, sumsq);
    sumsq = fmaf(v.w, v.w, sumsq);
}
__device__ __forceinline__ void norm_unit(float& sumsq, const float* own, int c) {
    norm_fma4(sumsq, *reinterpret_cast<const float4*>(own + 4 * c));
}
// ... of a 16-bit row (the tensor-core path): the same float32 values, the same chain.
__device__ __forceinline__ void norm_unit(float& sumsq, const unsigned short* own, int c) {
    norm_fma4(sumsq, HE::widen(*reinterpret_cast<const HE::Raw4*>(own + 4 * c)));
}

// One 4-channel unit of this thread's MY x MX dot products, each one FMA chain in channel order.
__device__ __forceinline__ void tile_unit(float (&acc)[MY][MX], const Shared& sh, int ty, int tx, int c) {
    float4 av[MY];
#pragma unroll
    for (int i = 0; i < MY; ++i) av[i] = *reinterpret_cast<const float4*>(&sh.mt.tiles.a[ty + TY * i][4 * c]);
#pragma unroll
    for (int j = 0; j < MX; ++j) {
        const float4 bv = *reinterpret_cast<const float4*>(&sh.mt.tiles.b[tx + TX * j][4 * c]);
#pragma unroll
        for (int i = 0; i < MY; ++i) {
            acc[i][j] = fmaf(av[i].x, bv.x, acc[i][j]);
            acc[i][j] = fmaf(av[i].y, bv.y, acc[i][j]);
            acc[i][j] = fmaf(av[i].z, bv.z, acc[i][j]);
            acc[i][j] = fmaf(av[i].w, bv.w, acc[i][j]);
        }
    }
}

// D += A B for one 16 x 8 piece and 16 channels of the hidden state's type: A's rows are
// sources, B's destinations; each register holds two 16-bit values, the lower channel low.
__device__ __forceinline__ void mma_16bit(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
#if TM_HIDDEN_DTYPE == 1
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// The strip and column of a warp's first piece (strip >= STRIPS: the warp has none).
__device__ __forceinline__ int first_strip(int warp) { return MATCH_WARPS >= STRIPS ? warp / WPS : warp * SPW; }
__device__ __forceinline__ int first_col(int warp) { return MATCH_WARPS >= STRIPS ? warp % WPS * CPW : 0; }

// Two adjacent 16-bit values of a tile as one register.
__device__ __forceinline__ unsigned pair_at(const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); }

// The 16 channels at k of this warp's pieces (PTX's m16n8k16 fragments: lane g * 4 + t holds A's
// rows g, g + 8 at channels 2t, 2t + 1 and 2t + 8, 2t + 9, B's row g at the same channels, and D's
// rows g, g + 8 at columns 2t, 2t + 1).
__device__ __forceinline__ void tc_unit(float (&c)[SPW][CPW][4], const Shared& sh, int warp, int lane, int k) {
    const int g = lane >> 2, t = lane & 3, strip0 = first_strip(warp), col0 = first_col(warp);
    const unsigned short* a = &sh.mt.tiles16.a[strip0 * 16 + g][k + 2 * t];
    const unsigned short* b = &sh.mt.tiles16.b[col0 * 8 + g][k + 2 * t];
#pragma unroll
    for (int i = 0; i < SPW; ++i) {
        if (strip0 + i >= STRIPS) break;
        const unsigned short* ai = a + i * 16 * ROW16;
        const unsigned a0 = pair_at(ai), a1 = pair_at(ai + 8 * ROW16);
        const unsigned a2 = pair_at(ai + 8), a3 = pair_at(ai + 8 * ROW16 + 8);
#pragma unroll
        for (int j = 0; j < CPW; ++j) {
            if (col0 + j >= COLS) break;
            const unsigned short* bj = b + j * 8 * ROW16;
            mma_16bit(c[i][j], a0, a1, a2, a3, pair_at(bj), pair_at(bj + 8));
        }
    }
}

// The better of two candidate matches: the higher key, on equal keys the first destination (the
// reference's first maximum). Exact, and the same whatever order candidates are combined in.
__device__ __forceinline__ void keep_better(float& bk, int& bd, float k, int d) {
    if (k > bk || (k == bk && d < bd)) {
        bk = k;
        bd = d;
    }
}

// The decision key of a pair's cosine similarity from its dot product and the two norms.
__device__ __forceinline__ float similarity_key(float dot, float den_a, float den_b) {
    return decision_key(__fdiv_rn(__fdiv_rn(dot, den_a), den_b));
}

// The tensor-core path's first maximum per source of the tile: over the lane's two columns of a
// piece (ascending), the piece's four lanes of the row, then the tile's pieces, through shared
// memory (pieces of one row may lie in different warps). keep_better is exact in any order.
__device__ __forceinline__ void tc_best_matches(Shared& sh, const float (&c)[SPW][CPW][4], int warp, int lane, int ns,
                                                int nd, int ts, int td, int d_begin, float* best_key, int* best_dst) {
    const int g = lane >> 2, t = lane & 3, strip0 = first_strip(warp), col0 = first_col(warp);
    if (warp < MATCH_WARPS) {
#pragma unroll
        for (int i = 0; i < SPW; ++i) {
            if (strip0 + i >= STRIPS) break;
#pragma unroll
            for (int j = 0; j < CPW; ++j) {
                const int col = col0 + j;
                if (col >= COLS) break;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = (strip0 + i) * 16 + g + 8 * h;
                    float bk = -__int_as_float(0x7f800000);
                    int bd = 0x7fffffff;
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int d = col * 8 + 2 * t + e;
                        if (m < ns && d < nd) {
                            const float k = similarity_key(c[i][j][2 * h + e], sh.mt.den_a[m], sh.mt.den_b[d]);
                            if (k > bk) {
                                bk = k;
                                bd = td + d;
                            }
                        }
                    }
#pragma unroll
                    for (int o = 1; o < 4; o <<= 1)
                        keep_better(bk, bd, __shfl_xor_sync(0xffffffffu, bk, o), __shfl_xor_sync(0xffffffffu, bd, o));
                    if (t == 0 && m < ns) {
                        sh.mt.cand.key[m][col] = bk;
                        sh.mt.cand.dst[m][col] = bd;
                    }
                }
            }
        }
    }
    __syncthreads();
    for (int m = threadIdx.x; m < ns; m += THREADS) {
        float bk = -__int_as_float(0x7f800000);
        int bd = 0x7fffffff;
        for (int col = 0; col < COLS; ++col) keep_better(bk, bd, sh.mt.cand.key[m][col], sh.mt.cand.dst[m][col]);
        if (td > d_begin) keep_better(bk, bd, best_key[ts + m], best_dst[ts + m]);
        best_key[ts + m] = bk;
        best_dst[ts + m] = bd;
    }
}

// One matching pass: sources [ts, ts + ns) of the candidate list against destinations [td, td +
// nd), their rows staged KT channels at a time; each source's first maximum is folded into
// best_key / best_dst. TC: the products on tensor cores (the half types' hidden metric).
template <bool TC>
__device__ __forceinline__ void match_pass(Shared& sh, const hid_t* __restrict__ hidden,
                                           const res_t* __restrict__ residual, bool stream_metric,
                                           long long sample_row, int E, int ts, int ns, int td, int nd, int d_begin,
                                           bool first_pass, float* best_key, int* best_dst) {
    constexpr int KS = TC ? KT16 : KT;  // channels a stage
    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX, warp = tid >> 5, lane = tid & 31;
    // The products: FMA chains (float32, the stream metric), or tensor-core pieces (TC).
    float acc[TC ? 1 : MY][TC ? 1 : MX];
    float c[TC ? SPW : 1][TC ? CPW : 1][4];
#pragma unroll
    for (int i = 0; i < (TC ? 1 : MY); ++i)
#pragma unroll
        for (int j = 0; j < (TC ? 1 : MX); ++j) acc[i][j] = 0.f;
#pragma unroll
    for (int i = 0; i < (TC ? SPW : 1); ++i)
#pragma unroll
        for (int j = 0; j < (TC ? CPW : 1); ++j) c[i][j][0] = c[i][j][1] = c[i][j][2] = c[i][j][3] = 0.f;
    float sumsq = 0.f;  // of the staged row whose norm this thread keeps, if any
    Staged<TC, KS> st;
    load_chunk(sh, hidden, residual, stream_metric, sample_row, E, 0, st);
    for (int k0 = 0; k0 < E; k0 += KS) {
        store_chunk(sh, stream_metric, st);
        __syncthreads();
        if (k0 == 0 && first_pass) TM_MARK(14);
        if (k0 + KS < E) load_chunk(sh, hidden, residual, stream_metric, sample_row, E, k0 + KS, st);  // in flight meanwhile
        // The norms' chains run inside the tile's loop, not before it: a warp that keeps a
        // norm no longer walks its row alone while the block waits at the next barrier.
        const int nt = tid - NORM_BASE;  // the staged row whose norm this thread keeps
        const bool keeps_norm = nt >= 0 && nt < TILE_S + TILE_D, matches = tid < MATCH_THREADS;
        const int own_row = nt < TILE_S ? max(nt, 0) : min(nt - TILE_S, TILE_D - 1);
        const float* own = nt < TILE_S ? sh.mt.tiles.a[own_row] : sh.mt.tiles.b[own_row];
        if constexpr (TC) {
            if (matches) {  // whole warps (MATCH_THREADS is a multiple of 32)
#pragma unroll
                for (int k = 0; k < KS; k += 16) tc_unit(c, sh, warp, lane, k);
            }
            if (keeps_norm) {
                const unsigned short* own16 = nt < TILE_S ? sh.mt.tiles16.a[own_row] : sh.mt.tiles16.b[own_row];
#pragma unroll TILE_UNROLL
                for (int u = 0; u < KS / 4; ++u) norm_unit(sumsq, own16, u);
            }
        } else if constexpr (NORM_BASE > 0) {  // the norms and the tile on different warps
            if (keeps_norm) {
#pragma unroll TILE_UNROLL
                for (int u = 0; u < U; ++u) norm_unit(sumsq, own, u);
            } else if (matches) {
#pragma unroll TILE_UNROLL
                for (int u = 0; u < U; ++u) tile_unit(acc, sh, ty, tx, u);
            }
        } else {
#pragma unroll TILE_UNROLL
            for (int u = 0; u < U; ++u) {
                if (keeps_norm) norm_unit(sumsq, own, u);
                if (matches) tile_unit(acc, sh, ty, tx, u);
            }
        }
        __syncthreads();
    }
    if (first_pass) TM_MARK(15);
    // F.normalize divides by max(||x||, 1e-12).
    const int nt = tid - NORM_BASE;
    if (nt >= 0 && nt < TILE_S) {
        sh.mt.den_a[nt] = fmaxf(sqrtf(sumsq), 1e-12f);
    } else if (nt >= TILE_S && nt < TILE_S + TILE_D) {
        sh.mt.den_b[nt - TILE_S] = fmaxf(sqrtf(sumsq), 1e-12f);
    }
    __syncthreads();
    if constexpr (TC) {
        tc_best_matches(sh, c, warp, lane, ns, nd, ts, td, d_begin, best_key, best_dst);
    } else {
        // Each thread's first maximum over its destinations (ascending), then over the TX
        // threads of the source's row: consecutive lanes of one warp (TX <= 32). Only the
        // matching threads hold products (whole warps: MATCH_THREADS is a multiple of 32).
#pragma unroll
        for (int i = 0; i < MY; ++i) {
            if (tid >= MATCH_THREADS) break;
            const int m = ty + TY * i;
            float bk = -__int_as_float(0x7f800000);
            int bd = 0x7fffffff;
#pragma unroll
            for (int j = 0; j < MX; ++j) {
                const int d = tx + TX * j;
                if (m < ns && d < nd) {
                    const float k = similarity_key(acc[i][j], sh.mt.den_a[m], sh.mt.den_b[d]);
                    if (k > bk) {
                        bk = k;
                        bd = td + d;
                    }
                }
            }
#pragma unroll
            for (int o = TX / 2; o > 0; o >>= 1)
                keep_better(bk, bd, __shfl_xor_sync(0xffffffffu, bk, o), __shfl_xor_sync(0xffffffffu, bd, o));
            if (tx == 0 && m < ns) {
                if (td > d_begin) keep_better(bk, bd, best_key[ts + m], best_dst[ts + m]);
                best_key[ts + m] = bk;
                best_dst[ts + m] = bd;
            }
        }
    }
    __syncthreads();
}

// Every matching pass of this block's sources and destinations, on one path (TC: the tensor
// cores); one loop per path, so that neither path's registers hold the other's loop invariants.
template <bool TC>
__device__ __forceinline__ void match_tiles(Shared& sh, const hid_t* __restrict__ hidden,
                                            const res_t* __restrict__ residual, bool stream_metric,
                                            long long sample_row, int E, int cls_pos, int s_begin, int s_end,
                                            int d_begin, int d_end, float* best_key, int* best_dst) {
    const int tid = threadIdx.x;
    for (int ts = s_begin; ts < s_end; ts += TILE_S) {
        const int ns = min(TILE_S, s_end - ts);
        for (int td = d_begin; td < d_end; td += TILE_D) {
            const int nd = min(TILE_D, d_end - td);
            // Rows past the tile's end repeat its last row; their results are ignored.
            if (tid < TILE_S) {
                const int p = sh.src[ts + min(tid, ns - 1)];
                sh.mt.row_a[tid] = p + (p >= cls_pos);
            } else if (tid < TILE_S + TILE_D) {
                const int p = sh.dst[td + min(tid - TILE_S, nd - 1)];
                sh.mt.row_b[tid - TILE_S] = p + (p >= cls_pos);
            }
            __syncthreads();
            match_pass<TC>(sh, hidden, residual, stream_metric, sample_row, E, ts, ns, td, nd, d_begin,
                           ts == s_begin && td == d_begin, best_key, best_dst);
        }
    }
}

__device__ void match_sources(Shared& sh, const hid_t* __restrict__ hidden, const res_t* __restrict__ residual,
                              bool stream_metric, long long sample_row, int E, int cls_pos, int s_begin, int s_end,
                              int d_begin, int d_end, float* best_key, int* best_dst) {
    if (d_begin >= d_end) {  // no destinations in this group: no candidate for any source
        for (int m = s_begin + threadIdx.x; m < s_end; m += THREADS) {
            best_key[m] = -__int_as_float(0x7f800000);
            best_dst[m] = 0x7fffffff;
        }
        return;
    }
    if constexpr (TC_MATCH) {
        if (!stream_metric) {
            match_tiles<true>(sh, hidden, residual, false, sample_row, E, cls_pos, s_begin, s_end, d_begin, d_end,
                              best_key, best_dst);
            return;
        }
    }
    match_tiles<false>(sh, hidden, residual, stream_metric, sample_row, E, cls_pos, s_begin, s_end, d_begin, d_end,
                       best_key, best_dst);
}

// ---------------------------------------------------------------------------------------------
// Output rows: a copy of the row the slot reads, or, for a destination, the weighted mean of it
// and its sources in float32.

// (row, unit) of a flat index over rows of `units` 4-channel units, without an integer division
// (a run-time divisor costs ~20 instructions per item): floor((item + 0.5) / units) in float32
// is exact while its rounding error, at most rows * 2^-23, stays below the 0.5 / units that
// separates the quotient from an integer: true for rows <= 513 and units <= 1024 (dim <= 4096,
// both checked by merge_launch.check_shape).
struct FlatIndex {
    int units;
    float inv_units;
    __device__ explicit FlatIndex(int u) : units(u), inv_units(1.f / static_cast<float>(u)) {}
    __device__ __forceinline__ int row(int item) const {
        return static_cast<int>((static_cast<float>(item) + 0.5f) * inv_units);
    }
};

// Copies of the rows of slots [q_begin, q_end) that no source merges into, both streams: the
// block's threads walk (slot, 4-channel unit) pairs, COPY_DEPTH of them with all loads in flight
// before the stores (a row at a time leaves too few bytes in flight to cover the latency): 6 with
// a block per SM, 4 where two blocks share an SM's registers (five spill there). Not more: each
// unrolled pair is code that a batch-1 step runs once and must fetch (H200, batch 1: the copies
// took 1.34 us with 12 and 64-bit offsets, 1.02 us with 6 and 32-bit ones; docs/perf-notes.md).
constexpr int COPY_DEPTH = TM_MIN_BLOCKS > 1 ? 4 : 6;

// One sample's rows of both streams, in and out; offsets within them are 32-bit (check_shape
// bounds length x dim).
struct SampleRows {
    const hid_t* __restrict__ hs;
    const res_t* __restrict__ rs;
    hid_t* __restrict__ ho;
    res_t* __restrict__ ro;
};

__device__ __forceinline__ void copy_rows(const Shared& sh, const SampleRows& rows, int q_begin, int q_end,
                                          int E_dim) {
    const int units = E_dim / 4, total = (q_end - q_begin) * units;
    const FlatIndex at(units);
    for (int base = threadIdx.x; base < total; base += COPY_DEPTH * THREADS) {
        HE::Raw4 h[COPY_DEPTH] = {};
        RE::Raw4 s[COPY_DEPTH] = {};
        int to[COPY_DEPTH];
#pragma unroll
        for (int d = 0; d < COPY_DEPTH; ++d) {
            const int item = base + d * THREADS;
            to[d] = -1;
            if (item < total) {
                const int row = at.row(item), q = q_begin + row, k = 4 * (item - row * units);
                if (sh.ly.first[q] < 0) {
                    const int from = sh.ly.out_seq[q] * E_dim + k;
                    h[d] = *reinterpret_cast<const HE::Raw4*>(rows.hs + from);
                    s[d] = *reinterpret_cast<const RE::Raw4*>(rows.rs + from);
                    to[d] = q * E_dim + k;
                }
            }
        }
#pragma unroll
        for (int d = 0; d < COPY_DEPTH; ++d)
            if (to[d] >= 0) {
                *reinterpret_cast<HE::Raw4*>(rows.ho + to[d]) = h[d];
                *reinterpret_cast<RE::Raw4*>(rows.ro + to[d]) = s[d];
            }
    }
}

__device__ __forceinline__ void fma4(float4& acc, float f, float4 s) {
    acc.x = fmaf(f, s.x, acc.x);
    acc.y = fmaf(f, s.y, acc.y);
    acc.z = fmaf(f, s.z, acc.z);
    acc.w = fmaf(f, s.w, acc.w);
}
__device__ __forceinline__ float4 keep_plus(float4 d, float keep, float4 acc) {
    return make_float4(__fadd_rn(__fmul_rn(d.x, keep), acc.x), __fadd_rn(__fmul_rn(d.y, keep), acc.y),
                       __fadd_rn(__fmul_rn(d.z, keep), acc.z), __fadd_rn(__fmul_rn(d.w, keep), acc.w));
}

// The rows of slots [q_begin, q_end) that sources merge into, both streams: each thread takes
// (merge group, 4-channel unit) pairs, the weighted mean of the destination and its sources in
// float32 (sources in chosen order, then the destination's share: the reference's order).
__device__ __forceinline__ void fold_rows(const Shared& sh, const SampleRows& rows, int q_begin, int q_end, int r,
                                          int E_dim) {
    const int units = E_dim / 4, total = r * units;
    const FlatIndex at(units);
    for (int item = threadIdx.x; item < total; item += THREADS) {
        const int c = at.row(item), k = 4 * (item - c * units);
        const int q = sh.ly.m_slot[c];
        if (sh.ly.first[q] != c || q < q_begin || q >= q_end) continue;  // not a group's first source
        const int in = sh.ly.out_seq[q] * E_dim + k;
        const float4 dh = load4<HE>(rows.hs + in), dr = load4<RE>(rows.rs + in);
        float4 ah = make_float4(0.f, 0.f, 0.f, 0.f), ar = ah;
        for (int j = c; j < r; ++j) {
            if (sh.ly.m_slot[j] != q) continue;
            const float f = sh.ly.m_fold[j];
            const int from = sh.ly.m_seq[j] * E_dim + k;
            fma4(ah, f, load4<HE>(rows.hs + from));
            fma4(ar, f, load4<RE>(rows.rs + from));
        }
        const float keep = sh.ly.m_keep[c];
        const int to = q * E_dim + k;
        store4<HE>(rows.ho + to, keep_plus(dh, keep, ah));
        store4<RE>(rows.ro + to, keep_plus(dr, keep, ar));
    }
}

}  // namespace mame_merge

using namespace mame_merge;

#if TM_CLUSTER > 1
#define TM_CLUSTER_ATTR __cluster_dims__(TM_CLUSTER, 1, 1)
#else
#define TM_CLUSTER_ATTR
#endif

// Arguments (TensorRT's AOT order: the inputs, int32 scalars, the outputs). Layouts, contiguous:
// hidden, residual (batch, length, dim); score (batch, parts, length), score_b (batch, parts_b,
// length); size, origin (batch, length);
// cls (batch,);
// outputs the same with length - r tokens. dim must be a multiple of 4.
extern "C" __global__ void __launch_bounds__(THREADS, TM_MIN_BLOCKS) TM_CLUSTER_ATTR TM_KERNEL_NAME(
    const hid_t* __restrict__ hidden, const res_t* __restrict__ residual, const float* __restrict__ score,
    const float* __restrict__ score_b, const float* __restrict__ size, const long long* __restrict__ origin,
    const long long* __restrict__ cls, int batch, int length, int dim, int parts, int parts_b, int r, int prune_flag,
    int split, int arrangement, int weighting, int metric, int lam_bits, int score_scale_bits,
    hid_t* __restrict__ hidden_out, res_t* __restrict__ residual_out, float* __restrict__ size_out,
    long long* __restrict__ origin_out, long long* __restrict__ cls_out) {
    __shared__ __align__(16) Shared sh;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int b = blockIdx.x / CLUSTER;
    const unsigned crank = cluster_rank();
    const int L = length, n = L - 1, E = dim, Q = L - r;
    const bool PRUNE = prune_flag != 0, ALTERNATE = split == 1, CONCAT = arrangement == 1 && !PRUNE;
    const bool SIZE_WEIGHTS = weighting == 1, STREAM_METRIC = metric == 1;
    const bool LAM_ON = (lam_bits & 0x7fffffff) != 0;
    const long long row0 = static_cast<long long>(b) * L;  // first row of the sample
    const long long cls_in = cls[b];
    const int cls_pos = static_cast<int>(cls_in < 0 ? 0 : (cls_in > n ? n : cls_in));
    // Sequence position of patch k (scan order, class token skipped).
    auto seq_of = [&](int k) { return k + (k >= cls_pos); };
#ifdef TM_TRACE
    // Read before the first cluster barrier; block 0 adds this launch after the second.
    if (tid == 0) sh.trace_launch = *static_cast<volatile unsigned*>(&tm_trace_count);
#endif
    TM_MARK(0);
    if constexpr (CLUSTER > 1) cluster_arrive_relaxed();  // waited on before the first remote store

    // 1. The informativeness, decision keys, and the stable ascending ranks the split and pruning use.
    for (int i = tid; i < L; i += THREADS) sh.size_seq[i] = size[row0 + i];
    {
        // This block's slice of the tokens: each warp sums one lane (every SCORE_LANES-th part,
        // in order) for 32 consecutive tokens, up to 24 loads in flight per thread.
        const int per_l = (L + CLUSTER - 1) / CLUSTER;
        const int l_begin = min(L, static_cast<int>(crank) * per_l), l_end = min(L, l_begin + per_l);
        const int chunks = (l_end - l_begin + 31) / 32;
        const float* __restrict__ sample_a = score + static_cast<long long>(b) * parts * L;
        const float* __restrict__ sample_b = score_b + static_cast<long long>(b) * parts_b * L;
        const int all_parts = parts + parts_b;
        for (int item = warp; item < chunks * SCORE_LANES; item += WARPS) {
            const int c = item % SCORE_LANES, l = l_begin + item / SCORE_LANES * 32 + lane;
            if (l >= l_end) continue;
            const TokenParts at{sample_a + l, sample_b + l, parts, L};
            float acc = 0.f;
            int k = c;
            while (k + 23 * SCORE_LANES < all_parts) add_parts<24>(acc, at, k);  // vim_s: one round trip
            if (k + 7 * SCORE_LANES < all_parts) add_parts<8>(acc, at, k);
            for (; k < all_parts; k += SCORE_LANES) acc = __fadd_rn(acc, at[k]);
            sh.sc.lane[c][l] = acc;
        }
        __syncthreads();
        TM_MARK(1);
        const float scale = __int_as_float(score_scale_bits);
        for (int l = l_begin + tid; l < l_end; l += THREADS) sh.score_seq[l] = score_of_lanes(sh, l, scale);
        if constexpr (CLUSTER > 1) {
            cluster_wait();  // every block of the cluster has started
            for (int l = l_begin + tid; l < l_end; l += THREADS)
                for (unsigned q = 0; q < CLUSTER; ++q)
                    if (q != crank) store_remote(&sh.score_seq[l], q, __float_as_uint(sh.score_seq[l]));
            cluster_sync();
        } else {
            __syncthreads();
        }
    }
    TM_MARK(2);
    // Decision keys, ranks and the split.
    // lo and hi (the keys' extremes, for lam) are the keys ranked first and last (NaN last).
    const bool RANKED = PRUNE || !ALTERNATE;
    for (int i = tid; i < n; i += THREADS) {
        const float k = decision_key(sh.score_seq[seq_of(i)]);
        sh.key[i] = k;
        if (RANKED) sh.rk.order[i] = ascending(k, i);
    }
    if (RANKED) pad_order(sh.rk.order, n);
    __syncthreads();
    if (RANKED) {
        for (int i = tid; i < n; i += THREADS) {
            const unsigned own = sh.rk.order[i];
            const int rank = count_below(sh.rk.order, n, own);
            sh.rank[i] = rank;
            if (rank == 0) sh.lo = key_of_ordered16(own >> 16);
            if (rank == n - 1) sh.hi = key_of_ordered16(own >> 16);
        }
        __syncthreads();
    }
    TM_MARK(3);
    const int half = n / 2;
    auto is_source = [&](int i) { return ALTERNATE ? (i % 2 == 0) : (sh.rank[i] < half); };
    int S = 0, D = 0;
    if (!PRUNE) {
        S = block_prefix(sh, n, is_source, [&](int i, int p) { sh.src[p] = static_cast<short>(i); },
                         [&](int i, int p) { sh.dst[p] = static_cast<short>(i); });
        D = n - S;
    }
    TM_MARK(4);

    // 2. Matching: the cluster's blocks split the sources into SRC_GROUPS and the destinations
    // into DST_GROUPS; each block matches one pair and hands its best matches to every block.
    const bool matching = !PRUNE && r > 0 && S > 0 && D > 0;
    const int sg = static_cast<int>(crank) / DST_GROUPS, dg = static_cast<int>(crank) % DST_GROUPS;
    const int s_per = (S + SRC_GROUPS - 1) / SRC_GROUPS, d_per = (D + DST_GROUPS - 1) / DST_GROUPS;
    const int s_begin = min(S, sg * s_per), s_end = min(S, s_begin + s_per);
    const int d_begin = min(D, dg * d_per), d_end = min(D, d_begin + d_per);
    if (matching)
        match_sources(sh, hidden, residual, STREAM_METRIC, row0, E, cls_pos, s_begin, s_end, d_begin, d_end,
                      sh.part_key[dg], sh.part_dst[dg]);
    TM_MARK(5);
    if constexpr (CLUSTER > 1) {
        if (matching)
            for (int i = s_begin + tid; i < s_end; i += THREADS)
                for (unsigned q = 0; q < CLUSTER; ++q) {
                    if (q == crank) continue;
                    store_remote(&sh.part_key[dg][i], q, __float_as_uint(sh.part_key[dg][i]));
                    store_remote(&sh.part_dst[dg][i], q, static_cast<unsigned>(sh.part_dst[dg][i]));
                }
        cluster_sync();  // every block of the cluster, whatever its path
    } else {
        __syncthreads();
    }
    TM_MARK(6);
    if (matching) {  // the best over the destination groups, in any order (keep_better is exact)
        for (int m = tid; m < S; m += THREADS) {
            float bk = -__int_as_float(0x7f800000);
            int bd = 0x7fffffff;
#pragma unroll
            for (int g = 0; g < DST_GROUPS; ++g) keep_better(bk, bd, sh.part_key[g][m], sh.part_dst[g][m]);
            sh.best_key[m] = bk;
            sh.best_dst[m] = bd == 0x7fffffff ? 0 : bd;  // no finite similarity (NaN input): stay in range
        }
        __syncthreads();
    }
    TM_MARK(7);

    // 3. Which sources go (the top r by rank key), then the output layout.
    if (LAM_ON && matching && !RANKED) {  // no ranks (alternate split): the extremes by a reduction
        if (warp == 0) {                  // of the ordered values, exact in any order
            unsigned lo = 0xffffu, hi = 0u;
            for (int i = lane; i < n; i += 32) {
                const unsigned u = ordered16(sh.key[i]);
                lo = min(lo, u);
                hi = max(hi, u);
            }
            for (int o = 16; o > 0; o >>= 1) {
                lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
                hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
            }
            if (lane == 0) {
                sh.lo = key_of_ordered16(lo);
                sh.hi = key_of_ordered16(hi);
            }
        }
        __syncthreads();
    }
    // 0: survives, -1: removed (ordered before the writes below by their first barrier).
    // (Here, not in step 1's loops: written there, the default split spills registers.)
    for (int i = tid; i < n; i += THREADS) sh.slot[i] = PRUNE && sh.rank[i] < r ? -1 : 0;
    if (matching) {
        const float lam = __int_as_float(lam_bits);
        for (int m = tid; m < S; m += THREADS) {
            float k = sh.best_key[m];
            if (LAM_ON) {
                // decision_key(best - lam * (s_key - lo) / clamp_min(hi - lo, 1e-12)), op by op.
                const float t = __fdiv_rn(__fsub_rn(sh.key[sh.src[m]], sh.lo), fmaxf(__fsub_rn(sh.hi, sh.lo), 1e-12f));
                k = decision_key(__fsub_rn(k, __fmul_rn(lam, t)));
            }
            sh.ly.rank_order[m] = descending(k, m);
        }
        pad_order(sh.ly.rank_order, S);
        __syncthreads();
        // Stable descending ranks (equal keys by position); the top r leave.
        for (int m = tid; m < S; m += THREADS) {
            const int c = count_below(sh.ly.rank_order, S, sh.ly.rank_order[m]);
            if (c < r) {
                sh.ly.chosen[c] = m;
                sh.slot[sh.src[m]] = -1;
            }
        }
    }
    __syncthreads();
    TM_MARK(8);
    // Output positions among the survivors: scan order, or ToMe's [unmerged sources; destinations].
    auto group_of = [&](int i) { return sh.slot[i] < 0 ? 2 : (CONCAT && !is_source(i) ? 1 : 0); };
    int new_cls;
    {
        const int first_count = block_prefix(sh, n, [&](int i) { return group_of(i) == 0; },
                                             [&](int i, int p) { sh.ly.pos[i] = p; });
        if (CONCAT) {
            block_prefix(sh, n, [&](int i) { return group_of(i) == 1; },
                         [&](int i, int p) { sh.ly.pos[i] = first_count + p; });
            new_cls = (n - r) / 2;  // Vim's convention: the middle
        } else {
            int before = 0;
            for (int start = 0; start < n; start += THREADS) {
                const int i = start + tid;
                before += __syncthreads_count(i < n && i < cls_pos && sh.slot[i] == 0);
            }
            new_cls = before;
        }
    }
    for (int i = tid; i < n; i += THREADS)
        if (sh.slot[i] == 0) {
            const int p = sh.ly.pos[i];
            const int q = p + (p >= new_cls);
            sh.slot[i] = q;
            sh.ly.out_seq[q] = seq_of(i);
        }
    for (int q = tid; q < Q; q += THREADS) sh.ly.first[q] = -1;
    if (tid == 0) sh.ly.out_seq[new_cls] = cls_pos;
    __syncthreads();
    TM_MARK(9);
    if (matching) {
        for (int c = tid; c < r; c += THREADS) {
            const int m = sh.ly.chosen[c];
            const int sseq = seq_of(sh.src[m]);
            const int q = sh.slot[sh.dst[sh.best_dst[m]]];
            const float sz = sh.size_seq[sseq];
            sh.ly.m_seq[c] = sseq;
            sh.ly.m_slot[c] = q;
            sh.ly.m_size[c] = sz;
            sh.ly.m_w[c] = SIZE_WEIGHTS ? sz : __fmul_rn(sz, sh.score_seq[sseq]);
        }
        __syncthreads();
        // The serial loops below stay rolled (unroll 1): a few threads walk r entries once, and
        // unrolled copies (with their divisions inlined) are only more code for the step to fetch.
        for (int c = tid; c < r; c += THREADS) {
            const int q = sh.ly.m_slot[c];
            bool first = true;
#pragma unroll 1
            for (int j = 0; j < c; ++j) first = first && sh.ly.m_slot[j] != q;
            if (!first) continue;
            const int dseq = sh.ly.out_seq[q];
            const float dsize = sh.size_seq[dseq];
            const float wd = SIZE_WEIGHTS ? dsize : __fmul_rn(dsize, sh.score_seq[dseq]);
            float wsum = 0.f, ssum = 0.f;
#pragma unroll 1
            for (int j = c; j < r; ++j)
                if (sh.ly.m_slot[j] == q) {
                    wsum = __fadd_rn(wsum, sh.ly.m_w[j]);
                    ssum = __fadd_rn(ssum, sh.ly.m_size[j]);
                }
            const float total = __fadd_rn(wd, wsum);
            sh.ly.m_keep[c] = __fdiv_rn(wd, total);
#pragma unroll 1
            for (int j = c; j < r; ++j)
                if (sh.ly.m_slot[j] == q) sh.ly.m_fold[j] = __fdiv_rn(sh.ly.m_w[j], total);
            sh.ly.m_new_size[c] = __fadd_rn(dsize, ssum);
            sh.ly.first[q] = c;
        }
        __syncthreads();
    }
    TM_MARK(10);

    // 4. Output rows, shared among the cluster's blocks; then the per-token state.
    const int per_q = (Q + CLUSTER - 1) / CLUSTER;
    const int q_begin = min(Q, static_cast<int>(crank) * per_q), q_end = min(Q, q_begin + per_q);
    const long long out0 = static_cast<long long>(b) * Q;
    // origin's loads go out first (no smem copy of it: int64 would overflow 48 KB at n_cap 512)
    // and are stored after the rows, so their latency hides behind the copies.
    const int q_own = q_begin + tid;
    const long long origin_own = q_own < q_end ? origin[row0 + sh.ly.out_seq[q_own]] : 0;
    const SampleRows rows{hidden + row0 * E, residual + row0 * E, hidden_out + out0 * E, residual_out + out0 * E};
    if (matching) fold_rows(sh, rows, q_begin, q_end, r, E);
    TM_MARK(11);
    copy_rows(sh, rows, q_begin, q_end, E);
    TM_MARK(12);
    for (int q = q_own; q < q_end; q += THREADS) {
        const int seq = sh.ly.out_seq[q], group = sh.ly.first[q];
        size_out[out0 + q] = group < 0 ? sh.size_seq[seq] : sh.ly.m_new_size[group];
        origin_out[out0 + q] = q == q_own ? origin_own : origin[row0 + seq];
    }
    if (crank == 0 && tid == 0) cls_out[b] = new_cls;
#ifdef TM_TRACE
    __syncthreads();  // the block's end, not thread 0's
    TM_MARK(13);
    if (blockIdx.x == 0 && tid == 0) atomicAdd(&tm_trace_count, 1u);
#endif
}
