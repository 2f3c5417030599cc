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
    index_add_row<RESIDUAL_UNROLL>(x + (long long)blockIdx.x * d, y + (long long)blockIdx.x * y_stride, idx, bias, scale, width);
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
