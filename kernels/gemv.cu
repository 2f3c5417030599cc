// Batch-1 linear layer for decode: y[j] = alpha * sum_i x[i] * w[j, i] + beta * y[j], w row-major [n, k].
// One warp per output row streams the row with 16-byte loads, UNROLL loads in flight per lane, and reduces with
// shuffles; x (a single row, at most tens of KB) stays in L1/L2. Needs k a multiple of 16 / sizeof(T) and 16-byte
// aligned x and w (the caller checks; cuBLASLt takes the rest). Grid ceil(n / warps per block).
#include "common.cuh"

#define GEMV_UNROLL 4

template <typename T>
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b)
{
    constexpr int N = 16 / sizeof(T);
    float fa[N], fb[N], s = 0.f;
    unpack16<T>(a, fa);
    unpack16<T>(b, fb);
#pragma unroll
    for (int e = 0; e < N; e++) s += fa[e] * fb[e];
    return s;
}

template <typename T, typename OUT>
__device__ void gemv(const T* __restrict__ x, const T* __restrict__ w, OUT* __restrict__ y, int n, int k, float alpha, float beta)
{
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)row * k);
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    int nv = k / (int)(16 / sizeof(T));
    float acc = 0.f;
    int i = lane;
    for (; i + (GEMV_UNROLL - 1) * 32 < nv; i += GEMV_UNROLL * 32)
    {
        uint4 a[GEMV_UNROLL], b[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) { a[u] = wr[i + u * 32]; b[u] = xv[i + u * 32]; }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) acc += dot16<T>(a[u], b[u]);
    }
    for (; i < nv; i += 32) acc += dot16<T>(wr[i], xv[i]);
    acc = warp_sum(acc);
    if (lane == 0)
    {
        float v = alpha * acc;
        if (beta != 0.f) v += beta * to_f32(y[row]);
        y[row] = from_f32<OUT>(v);
    }
}

// gemv_<input>_to_<output>: output in the input's type, or f32 (the residual stream, deltas, logits).
#define GEMV(T, OUT, S, O) \
    extern "C" __global__ void gemv_##S##_to_##O(const T* x, const T* w, OUT* y, int n, int k, float alpha, float beta) \
    { gemv<T, OUT>(x, w, y, n, k, alpha, beta); }
GEMV(float, float, f32, f32)
GEMV(bf16, bf16, bf16, bf16)
GEMV(f16, f16, f16, f16)
GEMV(bf16, float, bf16, f32)
GEMV(f16, float, f16, f32)
