// Causal attention with grouped-query heads against a KV cache ([capacity, kv_heads * head_dim] per tensor).
// Query row t of a call has absolute position start + t and sees keys first..start + t, where first is 0 or, with
// a sliding window w > 0, start + t - w + 1. Scores never exist as a [T, T] matrix: online softmax (flash style).
// Decode and kv_append take the position from device memory when `position` is not null (CUDA graph replay).
#include "common.cuh"

#define MAX_HEAD_DIM 128
#define KEYS 32            // keys per tile: one per lane when scoring
#define PREFILL_WARPS 8     // query rows per block in prefill (one per warp)

// Prefill: grid (ceil(tq / PREFILL_WARPS), heads), block PREFILL_WARPS * 32. Each warp owns one query row; the
// block stages tiles of 32 keys and values in shared memory. Scoring: lane j computes the score of key j;
// accumulation: lane owns output dims lane, lane + 32, ...
template <typename T>
__device__ void attention_prefill(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, int tq, int start, int heads, int kv_heads, int head_dim, int window, float scale)
{
    __shared__ float ks[KEYS][MAX_HEAD_DIM + 1];
    __shared__ float vs[KEYS][MAX_HEAD_DIM];
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
        for (int i = threadIdx.x; i < KEYS * head_dim; i += blockDim.x)
        {
            int j = i / head_dim, c = i % head_dim, key = tile + j;
            bool ok = key <= block_last;
            ks[j][c] = ok ? to_f32(kc[(long long)key * kv_dim + kvh * head_dim + c]) : 0.f;
            vs[j][c] = ok ? to_f32(vc[(long long)key * kv_dim + kvh * head_dim + c]) : 0.f;
        }
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
}

#define DECODE_WARPS 4

// Decode: one query row (position start) per head against the cache. Grid (heads), block DECODE_WARPS * 32.
// Warps take interleaved tiles of 32 keys with their own online-softmax state, merged at the end.
template <typename T>
__device__ void attention_decode(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, int start, const int* position, int heads, int kv_heads, int head_dim, int window, float scale)
{
    if (position) start = *position;
    __shared__ float qs[MAX_HEAD_DIM];
    __shared__ float wm[DECODE_WARPS], wl[DECODE_WARPS];
    __shared__ float wacc[DECODE_WARPS][MAX_HEAD_DIM];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int h = blockIdx.x, kvh = h / (heads / kv_heads);
    int kv_dim = kv_heads * head_dim;
    int pos = start, first = window > 0 ? max(0, pos - window + 1) : 0;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) qs[i] = to_f32(q[h * head_dim + i]) * scale;
    __syncthreads();
    int per_lane = (head_dim + 31) / 32;
    float m = NEG_INF, l = 0.f, acc[MAX_HEAD_DIM / 32];
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++) acc[e] = 0.f;
    for (int tile = first + warp * KEYS; tile <= pos; tile += DECODE_WARPS * KEYS)
    {
        int key = tile + lane;
        bool valid = key <= pos;
        float s = NEG_INF;
        if (valid)
        {
            const T* kr = kc + (long long)key * kv_dim + kvh * head_dim;
            s = 0.f;
            for (int c = 0; c < head_dim; c++) s += qs[c] * to_f32(kr[c]);
        }
        float m_new = fmaxf(m, warp_max(s));
        float p = valid ? expf(s - m_new) : 0.f;
        float corr = expf(m - m_new);
        l = l * corr + warp_sum(p);
        for (int e = 0; e < per_lane; e++) acc[e] *= corr;
        int count = min(KEYS, pos - tile + 1);
        for (int j = 0; j < count; j++)
        {
            float pj = __shfl_sync(0xffffffffu, p, j);
            const T* vr = vc + (long long)(tile + j) * kv_dim + kvh * head_dim;
            for (int e = 0; e < per_lane; e++)
            {
                int c = lane + 32 * e;
                if (c < head_dim) acc[e] += pj * to_f32(vr[c]);
            }
        }
        m = m_new;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
    for (int e = 0; e < per_lane; e++)
    {
        int c = lane + 32 * e;
        if (c < head_dim) wacc[warp][c] = acc[e];
    }
    __syncthreads();
    float gm = NEG_INF;
    for (int w = 0; w < DECODE_WARPS; w++) gm = fmaxf(gm, wm[w]);
    float gl = 0.f;
    for (int w = 0; w < DECODE_WARPS; w++) if (wm[w] != NEG_INF) gl += wl[w] * expf(wm[w] - gm);
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x)
    {
        float v = 0.f;
        for (int w = 0; w < DECODE_WARPS; w++) if (wm[w] != NEG_INF) v += wacc[w][c] * expf(wm[w] - gm);
        out[h * head_dim + c] = from_f32<T>(v / gl);
    }
}

// Appends rows of k and v ([rows, kv_dim]) to the caches at row start. Grid (rows), block 256.
template <typename T>
__device__ void kv_append(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ kc, T* __restrict__ vc,
    int kv_dim, int start, const int* position)
{
    if (position) start = *position;
    long long src = (long long)blockIdx.x * kv_dim, dst = (long long)(start + (int)blockIdx.x) * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) { kc[dst + i] = k[src + i]; vc[dst + i] = v[src + i]; }
}

#define ATTENTION(T, S) \
    extern "C" __global__ void attention_prefill_##S(const T* q, const T* kc, const T* vc, T* out, int tq, int start, int heads, int kv_heads, int head_dim, int window, float scale) \
    { attention_prefill<T>(q, kc, vc, out, tq, start, heads, kv_heads, head_dim, window, scale); } \
    extern "C" __global__ void attention_decode_##S(const T* q, const T* kc, const T* vc, T* out, int start, const int* position, int heads, int kv_heads, int head_dim, int window, float scale) \
    { attention_decode<T>(q, kc, vc, out, start, position, heads, kv_heads, head_dim, window, scale); } \
    extern "C" __global__ void kv_append_##S(const T* k, const T* v, T* kc, T* vc, int kv_dim, int start, const int* position) \
    { kv_append<T>(k, v, kc, vc, kv_dim, start, position); }
FOR_EACH_STORAGE(ATTENTION)
