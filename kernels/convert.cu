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

// KernelBench's ceiling for a gather-norm's traffic at its size: reads rows × d f32 and writes each row's first w
// columns as bf16, no reduction and no gather (d a multiple of 4).
extern "C" __global__ void stream_prefix_f32_to_bf16(const float4* __restrict__ x, bf16* __restrict__ out, long long rows, int d, int w)
{
    int quads = d / 4;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < rows * quads; i += (long long)gridDim.x * blockDim.x)
    {
        float4 v = x[i];
        long long r = i / quads;
        int c = (int)(i - r * quads) * 4;
        bf16* o = out + r * w + c;
        if (c < w) o[0] = from_f32<bf16>(v.x);
        if (c + 1 < w) o[1] = from_f32<bf16>(v.y);
        if (c + 2 < w) o[2] = from_f32<bf16>(v.z);
        if (c + 3 < w) o[3] = from_f32<bf16>(v.w);
    }
}
