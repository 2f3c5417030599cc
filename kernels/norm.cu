// DISP gather-norm: statistics over the full f32 residual row, output only the selected channels:
//   out[r, j] = norm(x[r])[idx[j]] * gamma[idx[j]] (+ beta[idx[j]] for LayerNorm), j < width;
//   out[r, j] = 0 for width <= j < out_stride (the zero padding that keeps pruned GEMM operands 16-byte aligned).
// idx == nullptr means the dense norm (width == d). One block per row, one launch; when shared memory holds the
// row (row_in_smem != 0, dynamic size d floats) the row is read from HBM exactly once. Each thread keeps UNROLL
// loads in flight: the row is short (16 KB at d 4096), so latency, not bandwidth, limits a one-load-per-step loop.
// add_rmsnorm_gather first applies the previous block's write-back, x[r, add_idx[j]] += add_scale * (y[r, j] + bias[j])
// (index_add_row, as residual.cu's index_add), to the row staged in shared memory, writes the row back and then
// normalizes it: the residual is read and written once for both, where the two kernels read it twice and write it once.
#include "common.cuh"

#define NORM_UNROLL 4

// Streams src[0..d) into copy (when set) with UNROLL loads in flight per thread; with SUMS, also adds the values to s and
// their squares to ss.
template <bool SUMS>
__device__ __forceinline__ void row_pass(const float* __restrict__ src, float* __restrict__ copy, int d, float& s, float& ss)
{
    if ((d & 3) == 0)
    {
        const float4* src4 = reinterpret_cast<const float4*>(src);
        float4* copy4 = reinterpret_cast<float4*>(copy);
        int n4 = d >> 2;
        for (int base = threadIdx.x; base < n4; base += NORM_UNROLL * blockDim.x)
        {
            float4 v[NORM_UNROLL];
#pragma unroll
            for (int u = 0; u < NORM_UNROLL; u++)
            {
                int i = base + u * blockDim.x;
                v[u] = i < n4 ? src4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < NORM_UNROLL; u++)
            {
                int i = base + u * blockDim.x;
                if (copy && i < n4) copy4[i] = v[u];
                if (SUMS)
                {
                    s += v[u].x + v[u].y + v[u].z + v[u].w;
                    ss += v[u].x * v[u].x + v[u].y * v[u].y + v[u].z * v[u].z + v[u].w * v[u].w;
                }
            }
        }
    }
    else
    {
        for (int i = threadIdx.x; i < d; i += blockDim.x)
        {
            float v = src[i];
            if (copy) copy[i] = v;
            if (SUMS) { s += v; ss += v * v; }
        }
    }
}

// From the row's sums: the normalized selected channels of src, zero-padded to out_stride, into this block's out row.
template <typename T, bool LAYER>
__device__ __forceinline__ void store_gathered(const float* src, float s, float ss, const T* __restrict__ gamma, const T* __restrict__ beta,
    const int* __restrict__ idx, T* __restrict__ out, int d, int width, int out_stride, float eps)
{
    float mean = 0.f, scale;
    if (LAYER)
    {
        mean = block_sum(s) / d;
        float var = fmaxf(block_sum(ss) / d - mean * mean, 0.f);
        scale = 1.f / sqrtf(var + eps);
    }
    else scale = 1.f / sqrtf(block_sum(ss) / d + eps);
    __syncthreads();
    T* o = out + (long long)blockIdx.x * out_stride;
    for (int base = threadIdx.x; base < out_stride; base += NORM_UNROLL * blockDim.x)
    {
        int c[NORM_UNROLL];
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++)
        {
            int j = base + u * blockDim.x;
            c[u] = j < width ? (idx ? idx[j] : j) : -1;
        }
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++)
        {
            int j = base + u * blockDim.x;
            if (j >= out_stride) break;
            float y = 0.f;
            if (c[u] >= 0)
            {
                y = (src[c[u]] - mean) * scale * to_f32(gamma[c[u]]);
                if (LAYER && beta) y += to_f32(beta[c[u]]);
            }
            o[j] = from_f32<T>(y);
        }
    }
}

template <typename T, bool LAYER>
__device__ void gather_norm(const float* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
    const int* __restrict__ idx, T* __restrict__ out, int d, int width, int out_stride, float eps, int row_in_smem)
{
    extern __shared__ float4 row4[];
    float* row = reinterpret_cast<float*>(row4);
    const float* xr = x + (long long)blockIdx.x * d;
    float s = 0.f, ss = 0.f;
    row_pass<true>(xr, row_in_smem ? row : nullptr, d, s, ss);
    store_gathered<T, LAYER>(row_in_smem ? row : xr, s, ss, gamma, beta, idx, out, d, width, out_stride, eps);
}

// Needs d floats of dynamic shared memory. y is f32 (a GEMM's output), bias the storage type; add_idx == nullptr: the
// dense add (add_width == d).
template <typename T>
__device__ void add_rmsnorm_gather(float* __restrict__ x, const float* __restrict__ y, const int* __restrict__ add_idx,
    const T* __restrict__ bias, float add_scale, int add_width, int y_stride, const T* __restrict__ gamma,
    const int* __restrict__ idx, T* __restrict__ out, int d, int width, int out_stride, float eps)
{
    extern __shared__ float4 row4[];
    float* row = reinterpret_cast<float*>(row4);
    float* xr = x + (long long)blockIdx.x * d;
    float s = 0.f, ss = 0.f;
    row_pass<false>(xr, row, d, s, ss);
    __syncthreads();
    index_add_row<NORM_UNROLL>(row, y + (long long)blockIdx.x * y_stride, add_idx, bias, add_scale, add_width);
    __syncthreads();
    row_pass<true>(row, xr, d, s, ss);
    store_gathered<T, false>(row, s, ss, gamma, nullptr, idx, out, d, width, out_stride, eps);
}

#define NORMS(T, S) \
    extern "C" __global__ void rmsnorm_gather_##S(const float* x, const T* gamma, const int* idx, T* out, int d, int width, int out_stride, float eps, int row_in_smem) \
    { gather_norm<T, false>(x, gamma, nullptr, idx, out, d, width, out_stride, eps, row_in_smem); } \
    extern "C" __global__ void layernorm_gather_##S(const float* x, const T* gamma, const T* beta, const int* idx, T* out, int d, int width, int out_stride, float eps, int row_in_smem) \
    { gather_norm<T, true>(x, gamma, beta, idx, out, d, width, out_stride, eps, row_in_smem); } \
    extern "C" __global__ void add_rmsnorm_gather_##S(float* x, const float* y, const int* add_idx, const T* bias, float add_scale, int add_width, \
        int y_stride, const T* gamma, const int* idx, T* out, int d, int width, int out_stride, float eps) \
    { add_rmsnorm_gather<T>(x, y, add_idx, bias, add_scale, add_width, y_stride, gamma, idx, out, d, width, out_stride, eps); }
FOR_EACH_STORAGE(NORMS)

// Backward of the RMSNorm y = x * r * gamma, r = 1 / sqrt(mean(x^2) + eps), to its f32 input, accumulated:
//   dx[i] += r * gamma[i] * dy[i] - x[i] * r^3 / d * sum_j gamma[j] * dy[j] * x[j].
// gamma is frozen (no gradient). One block per row.
template <typename T>
__device__ void rmsnorm_backward(const float* __restrict__ x, const T* __restrict__ gamma, const float* __restrict__ dy,
    float* __restrict__ dx, int d, float eps)
{
    long long off = (long long)blockIdx.x * d;
    const float* xr = x + off;
    const float* gr = dy + off;
    float ss = 0.f, dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
    {
        float v = xr[i];
        ss += v * v;
        dot += to_f32(gamma[i]) * gr[i] * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float r = 1.f / sqrtf(ss / d + eps);
    float k = dot * r * r * r / d;
    float* o = dx + off;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] += r * to_f32(gamma[i]) * gr[i] - xr[i] * k;
}

#define NORM_BACKWARD(T, S) \
    extern "C" __global__ void rmsnorm_backward_##S(const float* x, const T* gamma, const float* dy, float* dx, int d, float eps) \
    { rmsnorm_backward<T>(x, gamma, dy, dx, d, eps); }
FOR_EACH_STORAGE(NORM_BACKWARD)
