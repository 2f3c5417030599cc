// Residual updates of the f32 stream.
//   index_add: x[r, idx[j]] += scale * (y[r, j] + bias[j]) - DISP's write-back of a pruned block. Indices are unique
//   within a row, so no atomics; idx == nullptr is the dense residual add (width == d); bias may be nullptr.
//   y rows are y_stride apart (>= width: a pruned GEMM's output keeps its zero padding).
#include "common.cuh"

#define RESIDUAL_UNROLL 4

template <typename T>
__device__ void index_add(float* __restrict__ x, const T* __restrict__ y, const int* __restrict__ idx,
    const T* __restrict__ bias, float scale, int d, int width, int y_stride)
{
    float* xr = x + (long long)blockIdx.x * d;
    const T* yr = y + (long long)blockIdx.x * y_stride;
    // Loads of UNROLL elements are issued before their stores: one latency per UNROLL elements, not per element.
    for (int base = threadIdx.x; base < width; base += RESIDUAL_UNROLL * blockDim.x)
    {
        float v[RESIDUAL_UNROLL], old[RESIDUAL_UNROLL];
        int c[RESIDUAL_UNROLL];
#pragma unroll
        for (int u = 0; u < RESIDUAL_UNROLL; u++)
        {
            int j = base + u * blockDim.x;
            c[u] = -1;
            if (j < width)
            {
                v[u] = to_f32(yr[j]);
                if (bias) v[u] += to_f32(bias[j]);
                c[u] = idx ? idx[j] : j;
            }
        }
#pragma unroll
        for (int u = 0; u < RESIDUAL_UNROLL; u++) if (c[u] >= 0) old[u] = xr[c[u]];
#pragma unroll
        for (int u = 0; u < RESIDUAL_UNROLL; u++) if (c[u] >= 0) xr[c[u]] = old[u] + scale * v[u];
    }
}

#define INDEX_ADD(T, S) \
    extern "C" __global__ void index_add_##S(float* x, const T* y, const int* idx, const T* bias, float scale, int d, int width, int y_stride) \
    { index_add<T>(x, y, idx, bias, scale, d, width, y_stride); }
FOR_EACH_STORAGE(INDEX_ADD)

// Bias added to every row of a [rows, n] activation.
#define ADD_BIAS(T, S) \
    extern "C" __global__ void add_bias_##S(T* y, const T* bias, int n) \
    { \
        T* yr = y + (long long)blockIdx.x * n; \
        for (int j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_f32<T>(to_f32(yr[j]) + to_f32(bias[j])); \
    }
FOR_EACH_STORAGE(ADD_BIAS)
