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

// Two f32 values as one register of two 16-bit elements, the lower column in the low half.
template <typename T> __device__ __forceinline__ unsigned pack_pair(float lo, float hi)
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

// Four 8x8 16-bit matrices from shared memory, transposed: lane i addresses row i % 8 of matrix i / 8.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
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

template <typename T, int D>
__device__ __forceinline__ void attention_prefill_tc(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, float* __restrict__ lse, int tq, int start, int heads, int kv_heads, int window, float scale)
{
    constexpr int STRIDE = D + 8;   // shared row in elements: 16-byte aligned, fragment loads free of bank conflicts
    constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
    __shared__ __align__(16) unsigned short ks[TC_N * STRIDE];
    __shared__ __align__(16) unsigned short vs[TC_N * STRIDE];

    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
    int h = blockIdx.y, kvh = h / (heads / kv_heads);
    int q_dim = heads * D, kv_dim = kv_heads * D;
    int q0 = (gridDim.x - 1 - blockIdx.x) * TC_M;   // the longest causal rows start first
    int warp_row = q0 + warp * 16;
    int row0 = warp_row + g, row1 = row0 + 8;        // this thread's two query rows (accumulator rows g and g + 8)
    int pos0 = start + row0, pos1 = start + row1;
    int first0 = window > 0 ? max(0, pos0 - window + 1) : 0, first1 = window > 0 ? max(0, pos1 - window + 1) : 0;

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
        for (int i = threadIdx.x; i < TC_N * CHUNKS; i += TC_WARPS * 32)
        {
            int j = i / CHUNKS, c = (i % CHUNKS) * 8, key = tile + j;
            bool ok = key <= block_last;
            cp_async16(dst + j * STRIDE + c, ok ? src + (long long)key * kv_dim + kvh * D + c : src, ok);
        }
        cp_async_commit();
    };

    float o[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
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

        unsigned pf[TC_N / 16][4];
        if (compute)
        {
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int n = 0; n < TC_N / 8; n++)
            {
#pragma unroll
                for (int e = 0; e < 2; e++)
                {
                    int key = tile + n * 8 + 2 * tg + e;
                    s[n][e] = key >= first0 && key <= pos0 ? s[n][e] * scale_log2 : NEG_INF;
                    s[n][2 + e] = key >= first1 && key <= pos1 ? s[n][2 + e] * scale_log2 : NEG_INF;
                    mx0 = fmaxf(mx0, s[n][e]);
                    mx1 = fmaxf(mx1, s[n][2 + e]);
                }
            }
            mx0 = quad_max(mx0); mx1 = quad_max(mx1);
            // A row with nothing visible yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
            float base0 = mx0 == NEG_INF ? 0.f : mx0, base1 = mx1 == NEG_INF ? 0.f : mx1;
            float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int n = 0; n < TC_N / 8; n++)
            {
                s[n][0] = exp2f(s[n][0] - base0); s[n][1] = exp2f(s[n][1] - base0);
                s[n][2] = exp2f(s[n][2] - base1); s[n][3] = exp2f(s[n][3] - base1);
                sum0 += s[n][0] + s[n][1];
                sum1 += s[n][2] + s[n][3];
            }
            l0 = l0 * corr0 + sum0;   // per-thread partial sums; the quad adds them up at the end
            l1 = l1 * corr1 + sum1;
            m0 = mx0; m1 = mx1;
#pragma unroll
            for (int d = 0; d < D / 8; d++) { o[d][0] *= corr0; o[d][1] *= corr0; o[d][2] *= corr1; o[d][3] *= corr1; }
            // The accumulators of key groups 2k and 2k + 1 are exactly the A fragment of k-step k of P·V.
#pragma unroll
            for (int k = 0; k < TC_N / 16; k++)
            {
                pf[k][0] = pack_pair<T>(s[2 * k][0], s[2 * k][1]);
                pf[k][1] = pack_pair<T>(s[2 * k][2], s[2 * k][3]);
                pf[k][2] = pack_pair<T>(s[2 * k + 1][0], s[2 * k + 1][1]);
                pf[k][3] = pack_pair<T>(s[2 * k + 1][2], s[2 * k + 1][3]);
            }
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

    l0 = quad_sum(l0); l1 = quad_sum(l1);
    float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (lse && tg == 0)   // m and the scores are in the log2 domain
    {
        const float ln2 = 0.6931471805599453f;
        if (row0 < tq) lse[(long long)h * tq + row0] = (m0 + log2f(l0)) * ln2;
        if (row1 < tq) lse[(long long)h * tq + row1] = (m1 + log2f(l1)) * ln2;
    }
    T* or0 = out + (long long)row0 * q_dim + h * D;
    T* or1 = out + (long long)row1 * q_dim + h * D;
#pragma unroll
    for (int d = 0; d < D / 8; d++)
    {
        int c = d * 8 + 2 * tg;
        if (row0 < tq) *reinterpret_cast<unsigned*>(or0 + c) = pack_pair<T>(o[d][0] * inv0, o[d][1] * inv0);
        if (row1 < tq) *reinterpret_cast<unsigned*>(or1 + c) = pack_pair<T>(o[d][2] * inv1, o[d][3] * inv1);
    }
}

#define ATTENTION_TC(T, S, D) \
    extern "C" __global__ __launch_bounds__(TC_WARPS * 32) void attention_prefill_tc##D##_##S(const T* q, const T* kc, const T* vc, T* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale) \
    { attention_prefill_tc<T, D>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); }
ATTENTION_TC(bf16, bf16, 64) ATTENTION_TC(bf16, bf16, 128)
ATTENTION_TC(f16, f16, 64) ATTENTION_TC(f16, f16, 128)
