// Storage conversions between f32 and bf16/f16 (weights are uploaded as f32 and narrowed on the device).
#include "common.cuh"

#define CONVERT(T, S) \
    extern "C" __global__ void convert_f32_to_##S(const float* __restrict__ in, T* __restrict__ out, long long n) \
    { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) \
            out[i] = from_f32<T>(in[i]); \
    } \
    extern "C" __global__ void convert_##S##_to_f32(const T* __restrict__ in, float* __restrict__ out, long long n) \
    { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) \
            out[i] = to_f32(in[i]); \
    }
CONVERT(bf16, bf16)
CONVERT(f16, f16)
