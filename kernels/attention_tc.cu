// Tensor-core causal GQA prefill attention for bf16/f16 storage (FlashAttention-2 style, mma.sync m16n8k16,
// f32 accumulation). Same contract as attention_prefill in attention.cu: query row t is at position start + t and
// sees keys first..start + t of the KV cache ([capacity, kv_heads * D] per tensor); no [T, T] matrix is stored. With
// lse != nullptr it also writes each row's natural log-sum-exp of the scaled scores ([heads, tq], for the backward).
//
// Grid (ceil(tq / TC_M), heads), block TC_WARPS * 32. Each warp owns 16 query rows, kept as mma A fragments in
// registers; the block streams tiles of TC_N keys and values through shared memory with cp.async (the next K tile
// loads while P·V runs, the next V tile while Q·Kᵀ runs). Scores go through an online softmax in the exp2 domain
// and are fed back to the P·V mma straight from the accumulator registers (their layouts coincide).
#include "attention_tc.cuh"

#define TC_WARPS 4
#define TC_M (TC_WARPS * 16)   // query rows per block
#define TC_N 64                // keys per tile

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
