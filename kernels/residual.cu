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

// The same with the row staged in shared memory (d floats of dynamic shared memory): read whole with 16-byte loads,
// the adds applied there, written back whole. With more than a few percent of the channels selected, every 32-byte
// sector of the row is read and written anyway, so DRAM traffic is unchanged; what changes is that the row's loads
// are dense, coalesced and issued at once instead of each waiting for its idx[j].
template <typename T>
__device__ void index_add_staged(float* __restrict__ x, const T* __restrict__ y, const int* __restrict__ idx,
    const T* __restrict__ bias, float scale, int d, int width, int y_stride)
{
    extern __shared__ float4 row4[];
    float* row = reinterpret_cast<float*>(row4);
    float* xr = x + (long long)blockIdx.x * d;
    float s = 0.f, ss = 0.f;
    index_add_staged_row<RESIDUAL_UNROLL, false>(xr, row, y + (long long)blockIdx.x * y_stride, idx, bias, scale, width, d, s, ss);
}

#define INDEX_ADD(T, S) \
    extern "C" __global__ void index_add_##S(float* x, const T* y, const int* idx, const T* bias, float scale, int d, int width, int y_stride) \
    { index_add<T>(x, y, idx, bias, scale, d, width, y_stride); } \
    extern "C" __global__ void index_add_staged_##S(float* x, const T* y, const int* idx, const T* bias, float scale, int d, int width, int y_stride) \
    { index_add_staged<T>(x, y, idx, bias, scale, d, width, y_stride); }
FOR_EACH_STORAGE(INDEX_ADD)

// Bias added to every row of a [rows, n] activation.
#define ADD_BIAS(T, S) \
    extern "C" __global__ void add_bias_##S(T* y, const T* bias, int n) \
    { \
        T* yr = y + (long long)blockIdx.x * n; \
        for (int j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_f32<T>(to_f32(yr[j]) + to_f32(bias[j])); \
    }
FOR_EACH_STORAGE(ADD_BIAS)
