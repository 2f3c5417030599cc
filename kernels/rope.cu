// Rotary position embedding, half rotation (pairs i and i + head_dim/2), in place on q or k.
// Row r has absolute position start + r (start read from device memory when position is not null, so a captured
// CUDA graph can replay it); angle = position * inv_freq[i] in f32, as on the CPU. direction -1 rotates by the
// negative angle: the backward of the rotation (its transpose) applied to a gradient.
// rope_kv_append is the inference step's form: q rotated in place, k rotated into the key cache and v copied into
// the value cache at rows start.. ([capacity, kv_heads * head_dim] caches), one launch. k == nullptr: the new keys
// are already at those cache rows (prefill's projection writes them there) and are rotated in place; v == nullptr:
// the values are already there too.
#include "common.cuh"

__device__ __forceinline__ int rope_start(int start, const int* position) { return position ? *position : start; }

// (out[0], out[half]) = the pair (in[0], in[half]) rotated by the angle with sine s and cosine c.
template <typename TI, typename TO>
__device__ __forceinline__ void rotate_pair(const TI* in, TO* out, int half, float s, float c)
{
    float a = to_f32(in[0]), b = to_f32(in[half]);
    out[0] = from_f32<TO>(a * c - b * s);
    out[half] = from_f32<TO>(b * c + a * s);
}

// Grid (rows, slices): row r's (head, pair) items are dealt over the row's gridDim.y blocks (thread t of block y takes
// items y * blockDim.x + t, then every gridDim.y * blockDim.x). Many rows (prefill, training) run one block per row;
// a single row (decode) spreads over enough blocks that each thread rotates about one pair, instead of one block's
// threads walking every head in a serial loop of memory latencies. Any block size.
__device__ __forceinline__ int rope_item() { return blockIdx.y * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int rope_stride() { return gridDim.y * blockDim.x; }

// Calls f(h, i, sin, cos) for this thread's items t = rope_item() + k · rope_stride() below heads · half (head h = t / half,
// pair i = t % half), stepping h and i without a division. The angle depends on i only, so sin and cos are
// recomputed only when i changes: never when the stride is a multiple of half (128 threads, head_dim 128 or 64),
// one sincos per thread and row instead of one per head.
template <typename F>
__device__ __forceinline__ void for_each_pair(int heads, int half, float pos, const float* __restrict__ inv_freq, F&& f)
{
    int t = rope_item(), stride = rope_stride();
    int h = t / half, i = t % half, dh = stride / half, di = stride % half, cached = -1;
    float s = 0.f, c = 1.f;
    while (h < heads)
    {
        if (i != cached) { sincosf(pos * inv_freq[i], &s, &c); cached = i; }
        f(h, i, s, c);
        h += dh; i += di;
        if (i >= half) { i -= half; h++; }
    }
}

// out may be x (in place); rope_f32_to_<T> writes an f32 input's rotation in T (training's backward: the rotated
// gradient is the next GEMM's operand).
template <typename TI, typename TO>
__device__ void rope(const TI* x, TO* out, const float* __restrict__ inv_freq, int heads, int head_dim, int start, const int* position,
    float direction)
{
    start = rope_start(start, position);
    int half = head_dim / 2;
    float pos = (float)(start + (int)blockIdx.x);
    long long row = (long long)blockIdx.x * heads * head_dim;
    for_each_pair(heads, half, pos, inv_freq, [&](int h, int i, float s, float c)
    {
        long long off = row + h * head_dim + i;
        rotate_pair(x + off, out + off, half, s * direction, c);
    });
}

template <typename T>
__device__ void rope_kv_append(T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
    T* __restrict__ v_cache, const float* __restrict__ inv_freq, int heads, int kv_heads, int head_dim, int start, const int* position)
{
    allow_dependents_launch();
    grid_dependency_wait();
    q = opaque(q); k = opaque(k); v = opaque(v);
    start = rope_start(start, position);
    int half = head_dim / 2, kv_dim = kv_heads * head_dim;
    float pos = (float)(start + (int)blockIdx.x);
    T* qr = q + (long long)blockIdx.x * heads * head_dim;
    long long dst = (long long)(start + (int)blockIdx.x) * kv_dim;
    const T* kr = k ? k + (long long)blockIdx.x * kv_dim : k_cache + dst;
    for_each_pair(heads + kv_heads, half, pos, inv_freq, [&](int h, int i, float s, float c)
    {
        if (h < heads) rotate_pair(qr + h * head_dim + i, qr + h * head_dim + i, half, s, c);
        else
        {
            int off = (h - heads) * head_dim + i;
            rotate_pair(kr + off, k_cache + dst + off, half, s, c);
        }
    });
    if (!v) return;
    const T* vr = v + (long long)blockIdx.x * kv_dim;
    for (int i = rope_item(); i < kv_dim; i += rope_stride()) v_cache[dst + i] = vr[i];
}

#define ROPE(T, S) \
    extern "C" __global__ void rope_##S(T* x, const float* inv_freq, int heads, int head_dim, int start, const int* position, float direction) \
    { rope<T, T>(x, x, inv_freq, heads, head_dim, start, position, direction); } \
    extern "C" __global__ void rope_f32_to_##S(const float* x, T* out, const float* inv_freq, int heads, int head_dim, int start, \
        const int* position, float direction) \
    { rope<float, T>(x, out, inv_freq, heads, head_dim, start, position, direction); } \
    extern "C" __global__ void rope_kv_append_##S(T* q, const T* k, const T* v, T* k_cache, T* v_cache, const float* inv_freq, \
        int heads, int kv_heads, int head_dim, int start, const int* position) \
    { rope_kv_append<T>(q, k, v, k_cache, v_cache, inv_freq, heads, kv_heads, head_dim, start, position); }
FOR_EACH_STORAGE(ROPE)
