// Device-side initialisation, for models built on the GPU (benchmarks at real shapes without a host copy):
// a constant, or N(0, std) by Box-Muller from the counter hash (element i uses counters 2i and 2i + 1).
#include "common.cuh"

#define INIT(T, S) \
    extern "C" __global__ void fill_constant_##S(T* __restrict__ x, long long n, float value) \
    { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) \
            x[i] = from_f32<T>(value); \
    } \
    extern "C" __global__ void fill_normal_##S(T* __restrict__ x, long long n, unsigned long long seed, float std) \
    { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) \
        { \
            float u1 = hash_uniform(seed, 2 * (unsigned long long)i), u2 = hash_uniform(seed, 2 * (unsigned long long)i + 1); \
            x[i] = from_f32<T>(std * sqrtf(-2.f * logf(u1)) * cospif(2.f * u2)); \
        } \
    }
FOR_EACH_STORAGE(INIT)

// Reads n 16-byte words, evicting the L2 without leaving dirty lines (CudaDevice.EvictL2). The loads stay because a
// thread whose xor of them hits one arbitrary value writes it back (to a scratch buffer: harmless).
extern "C" __global__ void read_through(uint4* __restrict__ p, long long n)
{
    unsigned acc = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    {
        uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) p[0].x = acc;
}
