// Causal attention with grouped-query heads against a KV cache ([capacity, kv_heads * head_dim] per tensor).
// Query row t of a call has absolute position start + t and sees keys first..start + t, where first is 0 or, with
// a sliding window w > 0, start + t - w + 1. Scores never exist as a [T, T] matrix: online softmax (flash style).
// Single-query decode is in attention_decode.cu; rope.cu's rope_kv_append fills the cache.
#include "common.cuh"

#define MAX_HEAD_DIM 128
#define KEYS 32            // keys per tile: one per lane when scoring
#define PREFILL_WARPS 8     // query rows per block in prefill (one per warp)

// Stages keys and values tile..tile+KEYS-1 of kv head kvh ([rows, kv_dim] tensors) in shared memory as f32, zeros
// past `last`. Rows are padded by one float: lanes reading one key each hit distinct banks.
template <typename T>
__device__ __forceinline__ void load_kv_tile(float (*ks)[MAX_HEAD_DIM + 1], float (*vs)[MAX_HEAD_DIM + 1], const T* __restrict__ k,
    const T* __restrict__ v, int tile, int last, int kv_dim, int kvh, int head_dim)
{
    for (int i = threadIdx.x; i < KEYS * head_dim; i += blockDim.x)
    {
        int j = i / head_dim, c = i % head_dim, key = tile + j;
        bool ok = key <= last;
        ks[j][c] = ok ? to_f32(k[(long long)key * kv_dim + kvh * head_dim + c]) : 0.f;
        vs[j][c] = ok ? to_f32(v[(long long)key * kv_dim + kvh * head_dim + c]) : 0.f;
    }
}

// Prefill: grid (ceil(tq / PREFILL_WARPS), heads), block PREFILL_WARPS * 32. Each warp owns one query row; the
// block stages tiles of 32 keys and values in shared memory. Scoring: lane j computes the score of key j;
// accumulation: lane owns output dims lane, lane + 32, ... With lse != nullptr it also writes each row's log-sum-exp
// of the scaled scores (what the backward pass needs to recompute the probabilities).
template <typename T>
__device__ void attention_prefill(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, float* __restrict__ lse, int tq, int start, int heads, int kv_heads, int head_dim, int window, float scale)
{
    __shared__ float ks[KEYS][MAX_HEAD_DIM + 1];
    __shared__ float vs[KEYS][MAX_HEAD_DIM + 1];
    __shared__ float qs[PREFILL_WARPS][MAX_HEAD_DIM];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int h = blockIdx.y, kvh = h / (heads / kv_heads);
    int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    int t0 = blockIdx.x * PREFILL_WARPS, t = t0 + warp;
    bool active = t < tq;
    int pos = start + t;
    int first = window > 0 ? max(0, pos - window + 1) : 0;
    for (int i = lane; i < head_dim; i += 32)
        qs[warp][i] = active ? to_f32(q[(long long)t * q_dim + h * head_dim + i]) * scale : 0.f;

    int last_t = min(tq, t0 + PREFILL_WARPS) - 1;
    int block_first = window > 0 ? max(0, start + t0 - window + 1) : 0;
    int block_last = start + last_t;
    float m = NEG_INF, l = 0.f, acc[MAX_HEAD_DIM / 32];
    int per_lane = (head_dim + 31) / 32;
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++) acc[e] = 0.f;

    for (int tile = block_first - block_first % KEYS; tile <= block_last; tile += KEYS)
    {
        __syncthreads();
        load_kv_tile(ks, vs, kc, vc, tile, block_last, kv_dim, kvh, head_dim);
        __syncthreads();
        if (!active) continue;
        int key = tile + lane;
        bool valid = key >= first && key <= pos;
        float s = NEG_INF;
        if (valid)
        {
            s = 0.f;
            for (int c = 0; c < head_dim; c++) s += qs[warp][c] * ks[lane][c];
        }
        float m_new = fmaxf(m, warp_max(s));
        if (m_new == NEG_INF) continue;  // nothing visible yet in this tile
        float p = valid ? expf(s - m_new) : 0.f;
        float corr = expf(m - m_new);   // 0 when m is still -inf
        l = l * corr + warp_sum(p);
        for (int e = 0; e < per_lane; e++) acc[e] *= corr;
        for (int j = 0; j < KEYS; j++)
        {
            float pj = __shfl_sync(0xffffffffu, p, j);
            for (int e = 0; e < per_lane; e++)
            {
                int c = lane + 32 * e;
                if (c < head_dim) acc[e] += pj * vs[j][c];
            }
        }
        m = m_new;
    }
    if (!active) return;
    float inv = 1.f / l;
    for (int e = 0; e < per_lane; e++)
    {
        int c = lane + 32 * e;
        if (c < head_dim) out[(long long)t * q_dim + h * head_dim + c] = from_f32<T>(acc[e] * inv);
    }
    if (lse && lane == 0) lse[(long long)h * tq + t] = m + logf(l);   // for the backward pass: [heads, tq]
}

// Backward of causal GQA attention for training (queries and keys are the same tq rows, positions 0..tq-1),
// flash style: probabilities are recomputed from the forward's log-sum-exp, never stored as [T, T].
//   p_ij = exp(scale q_i.k_j - lse_i), dp_ij = dO_i.v_j, D_i = dO_i.O_i, ds_ij = p_ij (dp_ij - D_i)
//   dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i;  dv_j = sum_i p_ij dO_i   (i over every head of j's group)
// Two kernels: dq (a warp per query row, key tiles in shared memory; also writes D) and then dk/dv (a warp per key
// row, query tiles in shared memory). Gradients in and out are f32.
template <typename T>
__device__ void attention_backward_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ o, const float* __restrict__ dout, const float* __restrict__ lse, float* __restrict__ dq,
    float* __restrict__ dsum, int tq, int heads, int kv_heads, int head_dim, int window, float scale)
{
    __shared__ float ks[KEYS][MAX_HEAD_DIM + 1];
    __shared__ float vs[KEYS][MAX_HEAD_DIM + 1];
    __shared__ float qs[PREFILL_WARPS][MAX_HEAD_DIM];
    __shared__ float dos[PREFILL_WARPS][MAX_HEAD_DIM];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int h = blockIdx.y, kvh = h / (heads / kv_heads);
    int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    int t0 = blockIdx.x * PREFILL_WARPS, t = t0 + warp;
    bool active = t < tq;
    int first = window > 0 ? max(0, t - window + 1) : 0;
    float dpart = 0.f;
    for (int i = lane; i < head_dim; i += 32)
    {
        long long at = (long long)t * q_dim + h * head_dim + i;
        qs[warp][i] = active ? to_f32(q[at]) * scale : 0.f;
        float g = active ? dout[at] : 0.f;
        dos[warp][i] = g;
        if (active) dpart += g * to_f32(o[at]);
    }
    float dd = warp_sum(dpart);
    float row_lse = active ? lse[(long long)h * tq + t] : 0.f;
    if (active && lane == 0) dsum[(long long)h * tq + t] = dd;

    int last_t = min(tq, t0 + PREFILL_WARPS) - 1;
    int block_first = window > 0 ? max(0, t0 - window + 1) : 0;
    int per_lane = (head_dim + 31) / 32;
    float acc[MAX_HEAD_DIM / 32];
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++) acc[e] = 0.f;
    for (int tile = block_first - block_first % KEYS; tile <= last_t; tile += KEYS)
    {
        __syncthreads();
        load_kv_tile(ks, vs, k, v, tile, last_t, kv_dim, kvh, head_dim);
        __syncthreads();
        if (!active) continue;
        int key = tile + lane;
        float ds = 0.f;
        if (key >= first && key <= t)
        {
            float sc = 0.f, dp = 0.f;
            for (int c = 0; c < head_dim; c++) { sc += qs[warp][c] * ks[lane][c]; dp += dos[warp][c] * vs[lane][c]; }
            ds = expf(sc - row_lse) * (dp - dd);
        }
        for (int j = 0; j < KEYS; j++)
        {
            float dsj = __shfl_sync(0xffffffffu, ds, j);
            for (int e = 0; e < per_lane; e++)
            {
                int c = lane + 32 * e;
                if (c < head_dim) acc[e] += dsj * ks[j][c];
            }
        }
    }
    if (!active) return;
    for (int e = 0; e < per_lane; e++)
    {
        int c = lane + 32 * e;
        if (c < head_dim) dq[(long long)t * q_dim + h * head_dim + c] = acc[e] * scale;
    }
}

template <typename T>
__device__ void attention_backward_dkv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum,
    float* __restrict__ dk, float* __restrict__ dv, int tq, int heads, int kv_heads, int head_dim, int window, float scale)
{
    __shared__ float qs[KEYS][MAX_HEAD_DIM + 1];
    __shared__ float dos[KEYS][MAX_HEAD_DIM + 1];
    __shared__ float ls[KEYS], ds_row[KEYS];
    __shared__ float kr[PREFILL_WARPS][MAX_HEAD_DIM];
    __shared__ float vr[PREFILL_WARPS][MAX_HEAD_DIM];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int kvh = blockIdx.y, group = heads / kv_heads;
    int q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    int j0 = blockIdx.x * PREFILL_WARPS, j = j0 + warp;
    bool active = j < tq;
    for (int i = lane; i < head_dim; i += 32)
    {
        long long at = (long long)j * kv_dim + kvh * head_dim + i;
        kr[warp][i] = active ? to_f32(k[at]) : 0.f;
        vr[warp][i] = active ? to_f32(v[at]) : 0.f;
    }
    int last_j = min(tq, j0 + PREFILL_WARPS) - 1;
    int block_last = window > 0 ? min(tq - 1, last_j + window - 1) : tq - 1;   // last query that sees a key of this block
    int per_lane = (head_dim + 31) / 32;
    float gk[MAX_HEAD_DIM / 32], gv[MAX_HEAD_DIM / 32];
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++) gk[e] = gv[e] = 0.f;
    for (int h = kvh * group; h < (kvh + 1) * group; h++)
    {
        for (int tile = j0 - j0 % KEYS; tile <= block_last; tile += KEYS)
        {
            __syncthreads();
            for (int i = threadIdx.x; i < KEYS * head_dim; i += blockDim.x)
            {
                int r = i / head_dim, c = i % head_dim, qi = tile + r;
                bool ok = qi <= block_last;
                long long at = (long long)qi * q_dim + h * head_dim + c;
                qs[r][c] = ok ? to_f32(q[at]) * scale : 0.f;
                dos[r][c] = ok ? dout[at] : 0.f;
            }
            if (threadIdx.x < KEYS)
            {
                int qi = tile + threadIdx.x;
                bool ok = qi <= block_last;
                ls[threadIdx.x] = ok ? lse[(long long)h * tq + qi] : 0.f;
                ds_row[threadIdx.x] = ok ? dsum[(long long)h * tq + qi] : 0.f;
            }
            __syncthreads();
            if (!active) continue;
            int qi = tile + lane;
            float p = 0.f, ds = 0.f;
            if (qi >= j && qi <= block_last && (window <= 0 || qi <= j + window - 1))
            {
                float sc = 0.f, dp = 0.f;
                for (int c = 0; c < head_dim; c++) { sc += qs[lane][c] * kr[warp][c]; dp += dos[lane][c] * vr[warp][c]; }
                p = expf(sc - ls[lane]);
                ds = p * (dp - ds_row[lane]);
            }
            for (int r = 0; r < KEYS; r++)
            {
                float pr = __shfl_sync(0xffffffffu, p, r), dsr = __shfl_sync(0xffffffffu, ds, r);
                for (int e = 0; e < per_lane; e++)
                {
                    int c = lane + 32 * e;
                    if (c < head_dim) { gv[e] += pr * dos[r][c]; gk[e] += dsr * qs[r][c]; }
                }
            }
        }
    }
    if (!active) return;
    for (int e = 0; e < per_lane; e++)
    {
        int c = lane + 32 * e;
        long long at = (long long)j * kv_dim + kvh * head_dim + c;
        if (c < head_dim) { dk[at] = gk[e]; dv[at] = gv[e]; }   // qs already carries the scale
    }
}

// The GEMM formulation of the backward (src/DispNative.Engine/Cuda/AttentionGemmBackward.cs) runs Q·Kᵀ, dO·Vᵀ and the
// gradient products on cuBLASLt; these two kernels do the rest.
// rowdot[h, i] = dO_i · O_i over head h (dO f32, O storage). Grid (tq), block 256: a warp per head at a time.
template <typename T>
__device__ void attention_row_dot(const float* __restrict__ dout, const T* __restrict__ o, float* __restrict__ rowdot, int tq, int heads, int head_dim)
{
    int i = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int h = warp; h < heads; h += blockDim.x >> 5)
    {
        long long at = ((long long)i * heads + h) * head_dim;
        float s = 0.f;
        for (int c = lane; c < head_dim; c += 32) s += dout[at + c] * to_f32(o[at + c]);
        s = warp_sum(s);
        if (lane == 0) rowdot[(long long)h * tq + i] = s;
    }
}

// For one chunk of heads ([batch, tq, tq] f32 scores S and dP; head of batch b = first_head + b * head_step):
//   p[b, i, j] = exp(scale * s - lse[h, i]) where key j is visible from query i, else 0;  ds = p * (dp - rowdot[h, i]),
// for the keys j before the end of i's block of row_block rows (the GEMMs computed no more).
// p and ds are written in the storage type (the next GEMMs' inputs). Grid (tq, batch), block 256.
template <typename T>
__device__ void attention_probs_grad(const float* __restrict__ s, const float* __restrict__ dp, const float* __restrict__ lse,
    const float* __restrict__ rowdot, T* __restrict__ p, T* __restrict__ ds, int tq, int first_head, int head_step, int window, float scale,
    int row_block)
{
    int i = blockIdx.x, h = first_head + (int)blockIdx.y * head_step;
    long long row = ((long long)blockIdx.y * tq + i) * tq;
    float L = lse[(long long)h * tq + i], D = rowdot[(long long)h * tq + i];
    int first = window > 0 ? max(0, i - window + 1) : 0;
    int end = min(tq, (i / row_block + 1) * row_block);
    for (int j = threadIdx.x; j < end; j += blockDim.x)
    {
        bool visible = j >= first && j <= i;
        float pv = visible ? expf(scale * s[row + j] - L) : 0.f;
        p[row + j] = from_f32<T>(pv);
        ds[row + j] = from_f32<T>(visible ? pv * (dp[row + j] - D) : 0.f);
    }
}

#define ATTENTION(T, S) \
    extern "C" __global__ void attention_prefill_##S(const T* q, const T* kc, const T* vc, T* out, float* lse, int tq, int start, int heads, int kv_heads, int head_dim, int window, float scale) \
    { attention_prefill<T>(q, kc, vc, out, lse, tq, start, heads, kv_heads, head_dim, window, scale); } \
    extern "C" __global__ void attention_backward_dq_##S(const T* q, const T* k, const T* v, const T* o, const float* dout, const float* lse, float* dq, float* dsum, int tq, int heads, int kv_heads, int head_dim, int window, float scale) \
    { attention_backward_dq<T>(q, k, v, o, dout, lse, dq, dsum, tq, heads, kv_heads, head_dim, window, scale); } \
    extern "C" __global__ void attention_backward_dkv_##S(const T* q, const T* k, const T* v, const float* dout, const float* lse, const float* dsum, float* dk, float* dv, int tq, int heads, int kv_heads, int head_dim, int window, float scale) \
    { attention_backward_dkv<T>(q, k, v, dout, lse, dsum, dk, dv, tq, heads, kv_heads, head_dim, window, scale); } \
    extern "C" __global__ void attention_row_dot_##S(const float* dout, const T* o, float* rowdot, int tq, int heads, int head_dim) \
    { attention_row_dot<T>(dout, o, rowdot, tq, heads, head_dim); } \
    extern "C" __global__ void attention_probs_grad_##S(const float* s, const float* dp, const float* lse, const float* rowdot, T* p, T* ds, int tq, int first_head, int head_step, int window, float scale, int row_block) \
    { attention_probs_grad<T>(s, dp, lse, rowdot, p, ds, tq, first_head, head_step, window, scale, row_block); }
FOR_EACH_STORAGE(ATTENTION)
