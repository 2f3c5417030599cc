// Batch-1 linear layers for decode, one warp per output row: the warp streams the weight row with 16-byte loads,
// U loads in flight per lane, and reduces with shuffles; x (a single row, at most tens of KB) stays in L1/L2.
// Every kernel comes in U = 8, 12 and 16 (entry NAME_uU): a deeper unroll covers a row in fewer memory round trips
// (a pruned K of 2656 bf16 is 332 loads: 2 rounds at U 8, one at 12) but holds more registers, so fewer warps fit on
// an SM. The host times them per shape (CudaDevice.LaunchGemv); each lane sums its loads in the same order whatever
// U is, so the variants give bit-identical results.
// Needs k a multiple of 16 / sizeof(T) and 16-byte aligned x and w (the caller checks; cuBLASLt takes the rest).
// Grid ceil(rows / warps per block). Besides the plain GEMV, the decode step's fusions:
//   gemv (out_index set): y[out_index[row]] += dot - the pruned o_proj/down GEMM and DISP's index-add in one pass;
//   gemv_qkv: the q, k and v projections of one input in one launch;
//   gemv_swiglu: out[row] = silu(x.w_gate[row]) * (x.w_up[row]) - gate, up and the activation in one pass.
#include "common.cuh"

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

// A lane's first U 16-byte loads of a weight row (zero past the row's end). Issued before grid_dependency_wait():
// under a programmatic launch they stream while the previous kernel (which produces x) finishes.
template <int U, typename T>
__device__ __forceinline__ void load_first(const T* __restrict__ w, int k, uint4* a)
{
    int lane = threadIdx.x & 31, nv = k / (int)(16 / sizeof(T));
    const uint4* wr = reinterpret_cast<const uint4*>(w);
#pragma unroll
    for (int u = 0; u < U; u++)
    {
        int e = lane + u * 32;
        a[u] = e < nv ? wr[e] : make_uint4(0, 0, 0, 0);
    }
}

// x . w for one weight row of k elements, summed over the warp (every lane gets it); first holds the lane's first
// U loads of w (load_first).
template <int U, typename T>
__device__ __forceinline__ float warp_dot(const T* __restrict__ x, const T* __restrict__ w, int k, const uint4* first)
{
    int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    int nv = k / (int)(16 / sizeof(T));
    float acc = 0.f;
#pragma unroll
    for (int u = 0; u < U; u++)
    {
        int e = lane + u * 32;
        acc += dot16<T>(first[u], e < nv ? xv[e] : make_uint4(0, 0, 0, 0));
    }
    // Predicated rather than a scalar tail loop: a row whose length is not a multiple of U·32 loads (a pruned
    // width such as 2680) still costs ceil(nv / (U·32)) memory latencies, not a few more one load at a time.
    for (int i = lane + U * 32; i < nv; i += U * 32)
    {
        uint4 a[U], b[U];
#pragma unroll
        for (int u = 0; u < U; u++)
        {
            int e = i + u * 32;
            a[u] = e < nv ? wr[e] : make_uint4(0, 0, 0, 0);
            b[u] = e < nv ? xv[e] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) acc += dot16<T>(a[u], b[u]);
    }
    return warp_sum(acc);
}

__device__ __forceinline__ int gemv_row() { return blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); }

// y[o] = alpha * x . w[row] + beta * y[o], o = out_index ? out_index[row] : row; w row-major [n, k].
template <int U, typename T, typename OUT>
__device__ void gemv(const T* __restrict__ x, const T* __restrict__ w, OUT* __restrict__ y, const int* __restrict__ out_index,
    int n, int k, float alpha, float beta)
{
    allow_dependents_launch();
    int row = gemv_row();
    if (row >= n) return;
    uint4 first[U];
    load_first<U>(w + (long long)row * k, k, first);
    grid_dependency_wait();
    x = opaque(x);
    float acc = warp_dot<U>(x, w + (long long)row * k, k, first);
    if ((threadIdx.x & 31) == 0)
    {
        int o = out_index ? out_index[row] : row;
        float v = alpha * acc;
        if (beta != 0.f) v += beta * to_f32(y[o]);
        y[o] = from_f32<OUT>(v);
    }
}

// Rows [0, n0) of the output are x . w0 into y0, the next n1 x . w1 into y1, the last n2 x . w2 into y2.
template <int U, typename T>
__device__ void gemv_qkv(const T* __restrict__ x, const T* __restrict__ w0, T* __restrict__ y0, int n0,
    const T* __restrict__ w1, T* __restrict__ y1, int n1, const T* __restrict__ w2, T* __restrict__ y2, int n2, int k)
{
    allow_dependents_launch();
    int row = gemv_row();
    const T* w = w0; T* y = y0;
    if (row >= n0) { row -= n0; w = w1; y = y1; if (row >= n1) { row -= n1; w = w2; y = y2; if (row >= n2) return; } }
    uint4 first[U];
    load_first<U>(w + (long long)row * k, k, first);
    grid_dependency_wait();
    x = opaque(x);
    float acc = warp_dot<U>(x, w + (long long)row * k, k, first);
    if ((threadIdx.x & 31) == 0) y[row] = from_f32<T>(acc);
}

// The gate row's first loads go before the wait; the up row's after the gate's dot (both at once would double the
// registers the first loads hold).
template <int U, typename T>
__device__ void gemv_swiglu(const T* __restrict__ x, const T* __restrict__ w_gate, const T* __restrict__ w_up, T* __restrict__ out,
    int n, int k)
{
    allow_dependents_launch();
    int row = gemv_row();
    if (row >= n) return;
    uint4 first[U];
    load_first<U>(w_gate + (long long)row * k, k, first);
    grid_dependency_wait();
    x = opaque(x);
    float g = warp_dot<U>(x, w_gate + (long long)row * k, k, first);
    load_first<U>(w_up + (long long)row * k, k, first);
    float u = warp_dot<U>(x, w_up + (long long)row * k, k, first);
    if ((threadIdx.x & 31) == 0) out[row] = from_f32<T>(g / (1.f + expf(-g)) * u);
}

// gemv_<input>_to_<output>_u<U>: output in the input's type, or f32 (the residual stream, deltas, logits).
#define GEMV_U(T, OUT, S, O, U) \
    extern "C" __global__ void gemv_##S##_to_##O##_u##U(const T* x, const T* w, OUT* y, const int* out_index, int n, int k, float alpha, float beta) \
    { gemv<U, T, OUT>(x, w, y, out_index, n, k, alpha, beta); }
#define GEMV(T, OUT, S, O) GEMV_U(T, OUT, S, O, 8) GEMV_U(T, OUT, S, O, 12) GEMV_U(T, OUT, S, O, 16)
GEMV(float, float, f32, f32)
GEMV(bf16, bf16, bf16, bf16)
GEMV(f16, f16, f16, f16)
GEMV(bf16, float, bf16, f32)
GEMV(f16, float, f16, f32)

#define GEMV_FUSED_U(T, S, U) \
    extern "C" __global__ void gemv_qkv_##S##_u##U(const T* x, const T* w0, T* y0, int n0, const T* w1, T* y1, int n1, const T* w2, T* y2, int n2, int k) \
    { gemv_qkv<U, T>(x, w0, y0, n0, w1, y1, n1, w2, y2, n2, k); } \
    extern "C" __global__ void gemv_swiglu_##S##_u##U(const T* x, const T* w_gate, const T* w_up, T* out, int n, int k) \
    { gemv_swiglu<U, T>(x, w_gate, w_up, out, n, k); }
#define GEMV_FUSED(T, S) GEMV_FUSED_U(T, S, 8) GEMV_FUSED_U(T, S, 12) GEMV_FUSED_U(T, S, 16)
FOR_EACH_STORAGE(GEMV_FUSED)
