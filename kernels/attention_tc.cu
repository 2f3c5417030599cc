// Tensor-core causal GQA prefill attention for bf16/f16 storage (FlashAttention-2 style, mma.sync m16n8k16,
// f32 accumulation). Same contract as attention_prefill in attention.cu: query row t is at position start + t and
// sees keys first..start + t of the KV cache ([capacity, kv_heads * D] per tensor); no [T, T] matrix is stored. With
// lse != nullptr it also writes each row's natural log-sum-exp of the scaled scores ([heads, tq], for the backward).
//
// Grid (ceil(tq / TC_M), heads), block TC_WARPS * 32. Each warp owns 16 query rows, kept as mma A fragments in
// registers; the block streams tiles of TC_N keys and values through shared memory with cp.async (the next K tile
// loads while P·V runs, the next V tile while Q·Kᵀ runs). Scores go through an online softmax in the exp2 domain
// and are fed back to the P·V mma straight from the accumulator registers (their layouts coincide).
#include "common.cuh"

#define TC_WARPS 4
#define TC_M (TC_WARPS * 16)   // query rows per block
#define TC_N 64                // keys per tile

__device__ __forceinline__ unsigned smem_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16-byte global → shared copy; fill == false writes zeros without reading (keys past the last visible one).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_address(dst)), "l"(src), "r"(fill ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
// Waits until every committed group has landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// Two f32 values as one register of two 16-bit elements, the lower column in the low half, rounded to nearest even
// by the pair conversion (one instruction per pair; sm_80+, as the bf16 mma).
template <typename T> __device__ __forceinline__ unsigned pack_pair(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack_pair<bf16>(float lo, float hi)
{
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ unsigned pack_pair<f16>(float lo, float hi)
{
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// The same, each value rounded by common.cuh's from_f32 (for bf16 a handful of integer instructions per value): the
// same bits for every value but NaN. The former softmax's, kept for KernelBench's baseline.
template <typename T> __device__ __forceinline__ unsigned pack_each(float lo, float hi)
{
    return (unsigned)from_f32<T>(lo).bits | ((unsigned)from_f32<T>(hi).bits << 16);
}

// c[16x8] += a[16x16] · b[16x8], f32 accumulation.
template <typename T> __device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<bf16>(float* c, const unsigned* a, unsigned b0, unsigned b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16>(float* c, const unsigned* a, unsigned b0, unsigned b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 16-bit matrices from shared memory: lane i addresses row i % 8 of matrix i / 8 and gets, from each
// matrix, row i / 4 columns 2(i % 4), 2(i % 4) + 1 (the A/B fragment layout of mma m16n8k16).
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
}
// The same, transposed: from each matrix, rows 2(i % 4), 2(i % 4) + 1 of column i / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
}

// 2^x with the hardware's ex2.approx.ftz: the instruction exp2f also uses, without the scaling it wraps around it for
// results below 2^-126 (which flush to zero here: a probability that small is zero in the output's 16-bit type and
// in the row's f32 sum). One instruction per score in the softmax, the attention kernel's only non-tensor-core
// work, where ptxas expands the non-ftz form with a range check and two predicated multiplies. BASELINE: exp2f
// itself (the former softmax, KernelBench's baseline, which times the two).
template <bool BASELINE>
__device__ __forceinline__ float exp2_scores(float x)
{
    if (BASELINE) return exp2f(x);
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float quad_max(float v)
{
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v)
{
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Rows first .. first + ROWS - 1 of one head's D columns (row stride ld, the head's columns from col) into a shared
// tile of rows D + 8 elements long, with cp.async; rows past last are zero-filled without a read.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void copy_rows_async(unsigned short* dst, const T* src, int first, int last, long long ld, int col)
{
    constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS)
    {
        int j = i / CHUNKS, c = (i % CHUNKS) * 8, row = first + j;
        bool ok = row <= last;
        cp_async16(dst + j * (D + 8) + c, ok ? src + row * ld + col + c : src, ok);
    }
}

// A 16-row slab's raw scores with the keys a row must not see at -inf (softmax_tile scales them). Key tile + j is
// visible to the row at position p when 0 <= p - tile - j < span (span: the window, or 2^31 - 1 without one;
// unsigned, so one compare); distance_g is p - tile for this thread's row g (row g + 8 is 8 further on). Callers skip
// it on interior tiles (every key visible to every row of the slab).
template <int N>
__device__ __forceinline__ void mask_scores(float (&s)[N / 8][4], int distance_g, unsigned span)
{
    int tg = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < N / 8; n++)
#pragma unroll
        for (int e = 0; e < 2; e++)
        {
            int distance = distance_g - (n * 8 + 2 * tg + e);
            if ((unsigned)distance >= span) s[n][e] = NEG_INF;
            if ((unsigned)(distance + 8) >= span) s[n][2 + e] = NEG_INF;
        }
}

// One tile of the online softmax for a 16-row slab (this thread's rows g and g + 8): updates the running maxima m
// (log2 domain) and this thread's partial sums l (its quad adds them up at the end), rescales the output accumulators
// and packs the probabilities as P·V's A fragments: the accumulators of key groups 2k and 2k + 1 are exactly the A
// fragment of k-step k.
// LAZY: m is a reference, not the exact maximum. It moves (and o and l are rescaled) only on tiles where some row of
// the warp sees a score more than LAZY_MARGIN above its reference; otherwise the tile's probabilities are taken
// relative to the stale reference (at most 2^LAZY_MARGIN, well inside f32 and bf16/f16 range) and the D/4 rescaling
// multiplies per thread are skipped. m + log2(l) is the same log-sum-exp either way. Once a causal row's maximum
// settles, most tiles skip the rescale (the trick FlashAttention-4 uses).
#define LAZY_MARGIN 8.f
// BASELINE_SOFTMAX: exp2f and probabilities rounded one at a time (exp2_scores, pack_each), KernelBench's baseline.
template <typename T, int N, int D, bool LAZY, bool BASELINE_SOFTMAX = false>
__device__ __forceinline__ void softmax_tile(float (&s)[N / 8][4], float (&m)[2], float (&l)[2], float (&o)[D / 8][4],
    unsigned (&pf)[N / 16][4], float scale_log2)
{
    // Raw scores s; the maxima and probabilities in log2 units (scale_log2 > 0, so the maximum commutes with it).
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int n = 0; n < N / 8; n++) { mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1])); mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3])); }
    mx0 = fmaxf(m[0], quad_max(mx0) * scale_log2); mx1 = fmaxf(m[1], quad_max(mx1) * scale_log2);
    // m = -inf (nothing visible yet) moves on the first finite score: -inf + margin is -inf.
    bool rescale = !LAZY || __any_sync(0xffffffffu, mx0 > m[0] + LAZY_MARGIN || mx1 > m[1] + LAZY_MARGIN);
    if (!rescale) { mx0 = m[0]; mx1 = m[1]; }
    // A row with nothing visible yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
    float base0 = mx0 == NEG_INF ? 0.f : mx0, base1 = mx1 == NEG_INF ? 0.f : mx1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < N / 8; n++)
    {
        s[n][0] = exp2_scores<BASELINE_SOFTMAX>(fmaf(s[n][0], scale_log2, -base0)); s[n][1] = exp2_scores<BASELINE_SOFTMAX>(fmaf(s[n][1], scale_log2, -base0));
        s[n][2] = exp2_scores<BASELINE_SOFTMAX>(fmaf(s[n][2], scale_log2, -base1)); s[n][3] = exp2_scores<BASELINE_SOFTMAX>(fmaf(s[n][3], scale_log2, -base1));
        sum0 += s[n][0] + s[n][1];
        sum1 += s[n][2] + s[n][3];
    }
    if (rescale)
    {
        float corr0 = exp2_scores<BASELINE_SOFTMAX>(m[0] - base0), corr1 = exp2_scores<BASELINE_SOFTMAX>(m[1] - base1);
        l[0] = l[0] * corr0 + sum0;
        l[1] = l[1] * corr1 + sum1;
        m[0] = mx0; m[1] = mx1;
#pragma unroll
        for (int d = 0; d < D / 8; d++) { o[d][0] *= corr0; o[d][1] *= corr0; o[d][2] *= corr1; o[d][3] *= corr1; }
    }
    else { l[0] += sum0; l[1] += sum1; }
#pragma unroll
    for (int k = 0; k < N / 16; k++)
    {
        auto pack = [](float lo, float hi) { return BASELINE_SOFTMAX ? pack_each<T>(lo, hi) : pack_pair<T>(lo, hi); };
        pf[k][0] = pack(s[2 * k][0], s[2 * k][1]);
        pf[k][1] = pack(s[2 * k][2], s[2 * k][3]);
        pf[k][2] = pack(s[2 * k + 1][0], s[2 * k + 1][1]);
        pf[k][3] = pack(s[2 * k + 1][2], s[2 * k + 1][3]);
    }
}

// A 16-row slab's normalised output rows (this thread's rows row_g and row_g + 8 of head h, those below tq) and,
// with lse, their natural log-sum-exp.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&o)[D / 8][4], const float (&m)[2], const float (&l)[2], int row_g, int tq,
    int h, int q_dim, T* __restrict__ out, float* __restrict__ lse)
{
    int tg = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < 2; j++)
    {
        float sum = quad_sum(l[j]), inv = sum > 0.f ? 1.f / sum : 0.f;
        int r = row_g + 8 * j;
        if (r >= tq) continue;
        if (lse && tg == 0) lse[(long long)h * tq + r] = (m[j] + log2f(sum)) * 0.6931471805599453f;   // log2 → natural
        T* orow = out + (long long)r * q_dim + h * D;
#pragma unroll
        for (int d = 0; d < D / 8; d++)
            *reinterpret_cast<unsigned*>(orow + d * 8 + 2 * tg) = pack_pair<T>(o[d][2 * j] * inv, o[d][2 * j + 1] * inv);
    }
}

template <typename T, int D>
__device__ __forceinline__ void attention_prefill_tc(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, float* __restrict__ lse, int tq, int start, int heads, int kv_heads, int window, float scale)
{
    constexpr int STRIDE = D + 8;   // shared row in elements: 16-byte aligned, fragment loads free of bank conflicts
    __shared__ __align__(16) unsigned short ks[TC_N * STRIDE];
    __shared__ __align__(16) unsigned short vs[TC_N * STRIDE];

    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
    int h = blockIdx.y, kvh = h / (heads / kv_heads);
    int q_dim = heads * D, kv_dim = kv_heads * D;
    int q0 = (gridDim.x - 1 - blockIdx.x) * TC_M;   // the longest causal rows start first
    int warp_row = q0 + warp * 16;
    int row0 = warp_row + g, row1 = row0 + 8;        // this thread's two query rows (accumulator rows g and g + 8)
    unsigned span = window > 0 ? (unsigned)window : 0x7fffffffu;

    bool warp_active = warp_row < tq;
    int warp_last_key = start + min(warp_row + 15, tq - 1);
    int warp_first_key = window > 0 ? max(0, start + warp_row - window + 1) : 0;
    int block_last = start + min(tq, q0 + TC_M) - 1;
    int block_first = window > 0 ? max(0, start + q0 - window + 1) : 0;

    // Q as A fragments: qf[k][0..3] = rows (g, g+8) × columns (2tg, 2tg+1) and (2tg+8, 2tg+9) of k-step k.
    unsigned qf[D / 16][4];
    const T* qr0 = q + (long long)row0 * q_dim + h * D;
    const T* qr1 = q + (long long)row1 * q_dim + h * D;
#pragma unroll
    for (int k = 0; k < D / 16; k++)
    {
        int c = k * 16 + 2 * tg;
        qf[k][0] = row0 < tq ? *reinterpret_cast<const unsigned*>(qr0 + c) : 0u;
        qf[k][1] = row1 < tq ? *reinterpret_cast<const unsigned*>(qr1 + c) : 0u;
        qf[k][2] = row0 < tq ? *reinterpret_cast<const unsigned*>(qr0 + c + 8) : 0u;
        qf[k][3] = row1 < tq ? *reinterpret_cast<const unsigned*>(qr1 + c + 8) : 0u;
    }

    auto load_tile = [&](unsigned short* dst, const T* src, int tile)
    {
        copy_rows_async<T, D, TC_N, TC_WARPS * 32>(dst, src, tile, block_last, kv_dim, kvh * D);
        cp_async_commit();
    };

    float o[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const float scale_log2 = scale * 1.4426950408889634f;

    int tile_begin = block_first - block_first % TC_N;
    load_tile(ks, kc, tile_begin);
    load_tile(vs, vc, tile_begin);
    for (int tile = tile_begin; tile <= block_last; tile += TC_N)
    {
        bool has_next = tile + TC_N <= block_last;
        bool compute = warp_active && tile <= warp_last_key && tile + TC_N - 1 >= warp_first_key;
        cp_async_wait_all_but_one();   // K(tile) has landed; V(tile) may be in flight
        __syncthreads();

        float s[TC_N / 8][4];
        if (compute)
        {
#pragma unroll
            for (int n = 0; n < TC_N / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int k = 0; k < D / 16; k++)
            {
#pragma unroll
                for (int n = 0; n < TC_N / 8; n++)
                {
                    // B fragment: keys n·8 + g, head dims k·16 + 2tg (+1) and + 8 (+9).
                    const unsigned short* kr = ks + (n * 8 + g) * STRIDE + k * 16 + 2 * tg;
                    mma16816<T>(s[n], qf[k], *reinterpret_cast<const unsigned*>(kr), *reinterpret_cast<const unsigned*>(kr + 8));
                }
            }
        }
        __syncthreads();   // every warp is done with K(tile)
        if (has_next) load_tile(ks, kc, tile + TC_N); else cp_async_commit();

        // Every key of the tile visible to every row of the warp: no masking.
        bool interior = tile + TC_N - 1 <= start + warp_row && (window <= 0 || start + warp_row + 15 - tile < window);
        unsigned pf[TC_N / 16][4];
        if (compute)
        {
            if (!interior) mask_scores<TC_N>(s, start + row0 - tile, span);
            softmax_tile<T, TC_N, D, false>(s, m, l, o, pf, scale_log2);
        }

        cp_async_wait_all_but_one();   // V(tile) has landed; K(tile + 1) may be in flight
        __syncthreads();
        if (compute)
        {
#pragma unroll
            for (int k = 0; k < TC_N / 16; k++)
            {
#pragma unroll
                for (int d = 0; d < D / 8; d += 2)
                {
                    // Keys k·16 + (0..7 | 8..15) × head dims d·8 + (0..7 | 8..7+8): B fragments of dim groups d, d + 1.
                    unsigned b[4];
                    ldmatrix_x4_trans(b, vs + (k * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * STRIDE + d * 8 + (lane >> 4) * 8);
                    mma16816<T>(o[d], pf[k], b[0], b[1]);
                    mma16816<T>(o[d + 1], pf[k], b[2], b[3]);
                }
            }
        }
        __syncthreads();   // every warp is done with V(tile)
        if (has_next) load_tile(vs, vc, tile + TC_N); else cp_async_commit();
    }
    if (!warp_active) return;

    store_rows<T, D>(o, m, l, row0, tq, h, q_dim, out, lse);
}

#define ATTENTION_TC(T, S, D) \
    extern "C" __global__ __launch_bounds__(TC_WARPS * 32) void attention_prefill_tc##D##_##S(const T* q, const T* kc, const T* vc, T* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale) \
    { attention_prefill_tc<T, D>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); }
ATTENTION_TC(bf16, bf16, 64) ATTENTION_TC(bf16, bf16, 128)
ATTENTION_TC(f16, f16, 64) ATTENTION_TC(f16, f16, 128)

// The same contract with 32 query rows per warp (FlashAttention-2's tiling): every K and V fragment loaded from
// shared memory feeds two mma (one per 16-row half), where the kernel above uses each once. Q no longer fits in
// registers beside the doubled accumulators, so the block stages its FA_M rows of Q in shared memory once and reads
// the A fragments with ldmatrix at every k-step; K's B fragments come through ldmatrix too (one instruction for two
// key groups). At D = 128 the tiles hold 32 keys: with 64, ptxas (sm_90) spills the accumulators.
// STAGES 2 (the engine's): K and V tiles double-buffered, one barrier per tile; at its top the tile's K and V have
// landed and every warp is done with the other buffers, so the next tile's K and V load into them at once, a whole
// tile ahead. STAGES 1 (KernelBench's baseline): single buffers and four barriers per tile (K landed; done with K,
// next K issued; V landed; done with V, next V issued). Dynamic shared memory: (FA_M + 2·STAGES·FA_N) rows of D + 8
// elements (69,632 bytes at D = 128 with two stages; the launch opts in above 48 KiB).
#define FA_WARPS 4
#define FA_M (FA_WARPS * 32)   // query rows per block
#define FA_KEYS(D) ((D) > 64 ? 32 : 64)   // keys per tile (CudaOps.WidePrefillSharedBytes mirrors it)
#define FA_STAGES 2                        // the engine's (CudaOps.WidePrefillStages mirrors it)

// FA_N: keys per tile; LAZY, BASELINE_SOFTMAX: see softmax_tile; STAGES: buffers per K and V tile
template <typename T, int D, int FA_N, bool LAZY, int STAGES, bool BASELINE_SOFTMAX = false>
__device__ __forceinline__ void attention_prefill_fa(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, float* __restrict__ lse, int tq, int start, int heads, int kv_heads, int window, float scale)
{
    constexpr int STRIDE = D + 8;
    extern __shared__ __align__(16) unsigned short fa_shared[];
    constexpr int TILE = FA_N * STRIDE;         // elements of one K or V tile
    unsigned short* qs = fa_shared;             // [FA_M][STRIDE]
    unsigned short* ks = qs + FA_M * STRIDE;    // STAGES × [FA_N][STRIDE]
    unsigned short* vs = ks + STAGES * TILE;    // STAGES × [FA_N][STRIDE]

    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    int h = blockIdx.y, kvh = h / (heads / kv_heads);
    int q_dim = heads * D, kv_dim = kv_heads * D;
    int q0 = (gridDim.x - 1 - blockIdx.x) * FA_M;   // the longest causal rows start first
    int warp_row = q0 + warp * 32;
    // This thread's query rows: half i (rows warp_row + 16i ..) has accumulator rows g and g + 8, at positions
    // pos_g + 16i (+ 8); mask_scores tells which keys they see.
    int pos_g = start + warp_row + g;
    unsigned span = window > 0 ? (unsigned)window : 0x7fffffffu;
    bool warp_active = warp_row < tq;
    int warp_last_key = start + min(warp_row + 31, tq - 1);
    int warp_first_key = window > 0 ? max(0, start + warp_row - window + 1) : 0;
    int block_last = start + min(tq, q0 + FA_M) - 1;
    int block_first = window > 0 ? max(0, start + q0 - window + 1) : 0;

    // Q rows past tq are zeros; they go in the first K tile's cp.async group.
    copy_rows_async<T, D, FA_M, FA_WARPS * 32>(qs, q, q0, tq - 1, q_dim, h * D);
    auto copy_tile = [&](unsigned short* dst, const T* src, int tile)
    {
        copy_rows_async<T, D, FA_N, FA_WARPS * 32>(dst, src, tile, block_last, kv_dim, kvh * D);
    };
    auto load_tile = [&](unsigned short* dst, const T* src, int tile) { copy_tile(dst, src, tile); cp_async_commit(); };

    float o[2][D / 8][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int d = 0; d < D / 8; d++) o[i][d][0] = o[i][d][1] = o[i][d][2] = o[i][d][3] = 0.f;
    float m[2][2] = {{NEG_INF, NEG_INF}, {NEG_INF, NEG_INF}}, l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    const float scale_log2 = scale * 1.4426950408889634f;
    // ldmatrix row addresses of this lane: Q (matrices: rows 0-7 | 8-15 × columns 0-7 | 8-15 of a 16×16 block),
    // K (keys 0-7 | 8-15 of a 16-key pair of groups × columns 0-7 | 8-15), V (as in the kernel above).
    const unsigned short* q_lane = qs + (warp * 32 + (lane & 7) + ((lane >> 3) & 1) * 8) * STRIDE + (lane >> 4) * 8;
    const unsigned short* k_lane = ks + ((lane & 7) + (lane >> 4) * 8) * STRIDE + ((lane >> 3) & 1) * 8;
    const unsigned short* v_lane = vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * STRIDE + (lane >> 4) * 8;

    int tile_begin = block_first - block_first % FA_N;
    load_tile(ks, kc, tile_begin);
    load_tile(vs, vc, tile_begin);
    for (int tile = tile_begin, stage = 0; tile <= block_last; tile += FA_N, stage ^= STAGES - 1)
    {
        bool has_next = tile + FA_N <= block_last;
        bool compute = warp_active && tile <= warp_last_key && tile + FA_N - 1 >= warp_first_key;
        const unsigned short* k_tile = k_lane + stage * TILE;
        const unsigned short* v_tile = v_lane + stage * TILE;
        if (STAGES == 2)
        {
            cp_async_wait_all();   // this thread's copies of Q, K(tile) and V(tile) have landed
            __syncthreads();       // everyone's have, and every warp is done with the other stage's tiles
            if (has_next)
            {
                copy_tile(ks + (stage ^ 1) * TILE, kc, tile + FA_N);
                load_tile(vs + (stage ^ 1) * TILE, vc, tile + FA_N);   // one cp.async group for both
            }
        }
        else
        {
            cp_async_wait_all_but_one();   // Q and K(tile) have landed; V(tile) may be in flight
            __syncthreads();
        }

        float s[2][FA_N / 8][4];
        if (compute)
        {
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int n = 0; n < FA_N / 8; n++) s[i][n][0] = s[i][n][1] = s[i][n][2] = s[i][n][3] = 0.f;
#pragma unroll
            for (int k = 0; k < D / 16; k++)
            {
                unsigned a[2][4];
                ldmatrix_x4(a[0], q_lane + k * 16);
                ldmatrix_x4(a[1], q_lane + 16 * STRIDE + k * 16);
#pragma unroll
                for (int n = 0; n < FA_N / 8; n += 2)
                {
                    unsigned b[4];   // B fragments of key groups n (b0, b1) and n + 1 (b2, b3) at k-step k
                    ldmatrix_x4(b, k_tile + n * 8 * STRIDE + k * 16);
#pragma unroll
                    for (int i = 0; i < 2; i++)
                    {
                        mma16816<T>(s[i][n], a[i], b[0], b[1]);
                        mma16816<T>(s[i][n + 1], a[i], b[2], b[3]);
                    }
                }
            }
        }
        if (STAGES == 1)
        {
            __syncthreads();   // every warp is done with K(tile)
            if (has_next) load_tile(ks, kc, tile + FA_N); else cp_async_commit();
        }

        // Every key of the tile visible to every row of the warp: no masking.
        bool interior = tile + FA_N - 1 <= start + warp_row && (window <= 0 || start + warp_row + 31 - tile < window);
        unsigned pf[2][FA_N / 16][4];
        if (compute)
        {
#pragma unroll
            for (int i = 0; i < 2; i++)
            {
                if (!interior) mask_scores<FA_N>(s[i], pos_g + 16 * i - tile, span);
                softmax_tile<T, FA_N, D, LAZY, BASELINE_SOFTMAX>(s[i], m[i], l[i], o[i], pf[i], scale_log2);
            }
        }

        if (STAGES == 1)
        {
            cp_async_wait_all_but_one();   // V(tile) has landed; K(tile + 1) may be in flight
            __syncthreads();
        }
        if (compute)
        {
#pragma unroll
            for (int k = 0; k < FA_N / 16; k++)
            {
#pragma unroll
                for (int d = 0; d < D / 8; d += 2)
                {
                    unsigned b[4];
                    ldmatrix_x4_trans(b, v_tile + k * 16 * STRIDE + d * 8);
#pragma unroll
                    for (int i = 0; i < 2; i++)
                    {
                        mma16816<T>(o[i][d], pf[i][k], b[0], b[1]);
                        mma16816<T>(o[i][d + 1], pf[i][k], b[2], b[3]);
                    }
                }
            }
        }
        if (STAGES == 1)
        {
            __syncthreads();   // every warp is done with V(tile)
            if (has_next) load_tile(vs, vc, tile + FA_N); else cp_async_commit();
        }
    }
    if (!warp_active) return;

#pragma unroll
    for (int i = 0; i < 2; i++) store_rows<T, D>(o[i], m[i], l[i], warp_row + 16 * i + g, tq, h, q_dim, out, lse);
}

#define ATTENTION_FA(T, S, D) \
    extern "C" __global__ __launch_bounds__(FA_WARPS * 32) void attention_prefill_fa##D##_##S(const T* q, const T* kc, const T* vc, T* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale) \
    { attention_prefill_fa<T, D, FA_KEYS(D), true, FA_STAGES>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); }
ATTENTION_FA(bf16, bf16, 64) ATTENTION_FA(bf16, bf16, 128)
ATTENTION_FA(f16, f16, 64) ATTENTION_FA(f16, f16, 128)

// KernelBench's baselines, each one change away from the engine's: the output rescaled on every key tile; single
// K and V buffers with four barriers per tile; the former softmax (exp2f, probabilities rounded one at a time).
extern "C" __global__ __launch_bounds__(FA_WARPS * 32) void attention_prefill_fa_rescale_always128_bf16(const bf16* q, const bf16* kc,
    const bf16* vc, bf16* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale)
{ attention_prefill_fa<bf16, 128, FA_KEYS(128), false, FA_STAGES>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); }
extern "C" __global__ __launch_bounds__(FA_WARPS * 32) void attention_prefill_fa_single_buffer128_bf16(const bf16* q, const bf16* kc,
    const bf16* vc, bf16* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale)
{ attention_prefill_fa<bf16, 128, FA_KEYS(128), true, 1>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); }
extern "C" __global__ __launch_bounds__(FA_WARPS * 32) void attention_prefill_fa_baseline_softmax128_bf16(const bf16* q, const bf16* kc,
    const bf16* vc, bf16* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale)
{ attention_prefill_fa<bf16, 128, FA_KEYS(128), true, FA_STAGES, true>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); }

// ---------------------------------------------------------------------------------------------------------------
// Hopper (sm_90a): the same contract on warpgroup MMA (wgmma.mma_async), where mma.sync reaches about half of the
// tensor cores' rate. A block is WGS warpgroups (4 warps each, 16 query rows per warp, WG_M rows per warpgroup; with
// two, both share each K/V tile, half the loads per FLOP) and streams tiles of WG_N keys: S = Q·Kᵀ with Q and K read by the tensor cores from shared memory, then the online softmax above on
// the accumulators (per warp the same layout as mma.sync's), then O += P·V with P from registers and V from shared
// memory. Shared tiles use the 128-byte swizzle wgmma reads: rows of 64 elements (128 bytes), the 16-byte chunk c
// of row r stored at chunk c ^ (r % 8), 8-row groups 1024 bytes apart, a tile's columns 64.. in a second such block
// (row-major tiles would serialize the tensor cores' reads on bank conflicts). K is K-major for Q·Kᵀ; V, with the
// head dimension contiguous, is N-major (transposed) for P·V. K and V are double-buffered as in the kernel above.
// Compiled for sm_90a only (CudaOps.UsesWgmma; the engine's NVRTC 12+ builds attention_tc for sm_90a on sm_90); the
// CUDA emulator implements the instructions (and the swizzle) from the PTX ISA.
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_M 64   // query rows per warpgroup
#define WG_N 64   // keys per tile

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Orders this thread's generic-proxy writes to shared memory (cp.async) before the tensor cores' async-proxy reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Keeps the compiler from moving accumulator reads or writes across a wgmma issue or wait (CUTLASS's operand fence).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4])
{
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) asm volatile("" : "+f"(d[i][j]) :: "memory");
}

// A shared-memory matrix descriptor with the 128-byte swizzle: start address, leading- and stride-dimension byte
// offsets (each >> 4), swizzle mode 1 in bits 62-63.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned address, unsigned leading, unsigned stride)
{
    return (unsigned long long)((address & 0x3ffffu) >> 4) | ((unsigned long long)(leading >> 4) << 16)
        | ((unsigned long long)(stride >> 4) << 32) | (1ull << 62);
}

// d[64 × 64] += A[64 × 16] · B[16 × 64], A and B K-major in shared memory (this warp: rows 16·warp.. of d).
template <typename T> __device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b, int accumulate);
// d[64 × N] += A[64 × 16] · B[16 × N], A from registers (mma.sync's A fragment per warp), B N-major in shared memory.
template <typename T, int N> __device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long desc_b);
template <> __device__ __forceinline__ void wgmma_ss_n64<bf16>(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
template <> __device__ __forceinline__ void wgmma_rs<bf16, 64>(float (&d)[8][4], const unsigned (&a)[4], unsigned long long desc_b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<bf16, 128>(float (&d)[16][4], const unsigned (&a)[4], unsigned long long desc_b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_ss_n64<f16>(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
template <> __device__ __forceinline__ void wgmma_rs<f16, 64>(float (&d)[8][4], const unsigned (&a)[4], unsigned long long desc_b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<f16, 128>(float (&d)[16][4], const unsigned (&a)[4], unsigned long long desc_b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// Rows first .. first + ROWS - 1 of one head's D columns into the swizzled layout above (ROWS a multiple of 8; blocks
// of 64 columns ROWS · 128 bytes apart), with cp.async by THREADS threads; rows past last are zero-filled without a read.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void copy_rows_swizzled(unsigned short* dst, const T* src, int first, int last, long long ld, int col)
{
    constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS)
    {
        int j = i / CHUNKS, c = i % CHUNKS, row = first + j;
        bool ok = row <= last;
        cp_async16(dst + (c >> 3) * ROWS * 64 + j * 64 + (((c & 7) ^ (j & 7)) << 3), ok ? src + row * ld + col + c * 8 : src, ok);
    }
}

template <typename T, int D, int WGS>
__device__ __forceinline__ void attention_prefill_wgmma(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, float* __restrict__ lse, int tq, int start, int heads, int kv_heads, int window, float scale)
{
    constexpr int ROWS = WGS * WG_M, THREADS = WGS * 128;
    constexpr int TILE = WG_N * D;   // elements of one K or V tile
    extern __shared__ __align__(16) unsigned short wg_shared[];
    // The swizzle is a function of the shared address: the tiles start on a 1024-byte boundary (1 KB of slack).
    unsigned short* qs = wg_shared + ((1024u - (smem_address(wg_shared) & 1023u)) & 1023u) / 2;   // [ROWS × D]
    unsigned short* ks = qs + ROWS * D;   // 2 × [WG_N × D]
    unsigned short* vs = ks + 2 * TILE;   // 2 × [WG_N × D]
    unsigned k_addr = smem_address(ks), v_addr = smem_address(vs);

    int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2;
    int h = blockIdx.y, kvh = h / (heads / kv_heads);
    int q_dim = heads * D, kv_dim = kv_heads * D;
    int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS;   // the longest causal rows start first
    int wg_row = q0 + wg * WG_M, warp_row = wg_row + warp * 16;
    int pos_g = start + warp_row + g;                 // this thread's rows g and g + 8
    unsigned span = window > 0 ? (unsigned)window : 0x7fffffffu;
    int block_last = start + min(tq, q0 + ROWS) - 1;
    int block_first = window > 0 ? max(0, start + q0 - window + 1) : 0;
    // The keys this warpgroup's rows see (uniform across it, as its wgmma must be): tiles outside are skipped.
    int wg_last = start + min(tq - 1, wg_row + WG_M - 1);
    int wg_first = window > 0 ? max(0, start + wg_row - window + 1) : 0;
    unsigned q_addr = smem_address(qs) + wg * WG_M * 128;   // this warpgroup's rows: 8-row groups 1024 bytes apart

    auto load_tiles = [&](int stage, int tile)
    {
        copy_rows_swizzled<T, D, WG_N, THREADS>(ks + stage * TILE, kc, tile, block_last, kv_dim, kvh * D);
        copy_rows_swizzled<T, D, WG_N, THREADS>(vs + stage * TILE, vc, tile, block_last, kv_dim, kvh * D);
        cp_async_commit();
    };
    // Q rows past tq are zeros; they go in the first tiles' cp.async group.
    copy_rows_swizzled<T, D, ROWS, THREADS>(qs, q, q0, tq - 1, q_dim, h * D);
    int tile_begin = block_first - block_first % WG_N;
    load_tiles(0, tile_begin);

    float o[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const float scale_log2 = scale * 1.4426950408889634f;

    for (int tile = tile_begin, stage = 0; tile <= block_last; tile += WG_N, stage ^= 1)
    {
        cp_async_wait_all();   // this thread's copies of the tile (and Q) have landed
        fence_proxy_async();
        __syncthreads();       // every thread's copies are in and every warp is done with the other stage
        if (tile + WG_N <= block_last) load_tiles(stage ^ 1, tile + WG_N);
        if (tile > wg_last || tile + WG_N - 1 < wg_first) continue;

        float s[WG_N / 8][4];   // written by the first k-step (accumulate 0)
        wgmma_fence();
        unsigned k_stage = k_addr + stage * TILE * 2;
#pragma unroll
        for (int k = 0; k < D / 16; k++)   // k-step k: columns 16k.. = block k / 4, bytes 32 (k % 4) into its rows
            wgmma_ss_n64<T>(s, wgmma_desc(q_addr + (k >> 2) * ROWS * 128 + (k & 3) * 32, 16, 1024),
                wgmma_desc(k_stage + (k >> 2) * WG_N * 128 + (k & 3) * 32, 16, 1024), k > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_operands(s);
        fence_operands(o);

        // Every key of the tile visible to every row of the warp: no masking.
        bool interior = tile + WG_N - 1 <= start + warp_row && (window <= 0 || start + warp_row + 15 - tile < window);
        if (!interior) mask_scores<WG_N>(s, pos_g - tile, span);
        unsigned pf[WG_N / 16][4];
        softmax_tile<T, WG_N, D, true>(s, m, l, o, pf, scale_log2);

        fence_operands(o);
        wgmma_fence();
        unsigned v_stage = v_addr + stage * TILE * 2;
#pragma unroll
        for (int k = 0; k < WG_N / 16; k++)   // keys 16k..16k + 15: rows 16k.. of every 64-column block
            wgmma_rs<T, D>(o, pf[k], wgmma_desc(v_stage + k * 16 * 128, WG_N * 128, 1024));
        wgmma_commit();
        // Waited for here, not at the next tile's top: with P·V in flight across the loop's back edge, ptxas
        // serializes every wgmma of the kernel (its C7515 "Potential Performance Loss"). The other block on the SM
        // keeps the tensor cores busy meanwhile.
        wgmma_wait_all();
        fence_operands(o);
    }
    store_rows<T, D>(o, m, l, warp_row + g, tq, h, q_dim, out, lse);
}

// attention_prefill_wgmma: one warpgroup per block (CudaOps: PrefillKernel.Wgmma); _2wg: two (PrefillKernel.Wgmma2Warpgroups).
#define ATTENTION_WGMMA(T, S, D) \
    extern "C" __global__ __launch_bounds__(128) void attention_prefill_wgmma##D##_##S(const T* q, const T* kc, const T* vc, T* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale) \
    { attention_prefill_wgmma<T, D, 1>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); } \
    extern "C" __global__ __launch_bounds__(256) void attention_prefill_wgmma_2wg##D##_##S(const T* q, const T* kc, const T* vc, T* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale) \
    { attention_prefill_wgmma<T, D, 2>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); }
ATTENTION_WGMMA(bf16, bf16, 64) ATTENTION_WGMMA(bf16, bf16, 128)
ATTENTION_WGMMA(f16, f16, 64) ATTENTION_WGMMA(f16, f16, 128)
#endif
