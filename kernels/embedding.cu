// Embedding gather into the f32 residual stream: out[r, :] = table[tokens[r], :]. Token ids are validated on the host.
#include "common.cuh"

template <typename T>
__device__ void embedding(const T* __restrict__ table, const int* __restrict__ tokens, float* __restrict__ out, int d)
{
    allow_dependents_launch();
    grid_dependency_wait();
    const T* src = table + (long long)opaque(tokens)[blockIdx.x] * d;
    float* dst = out + (long long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = to_f32(src[i]);
}

#define EMBEDDING(T, S) \
    extern "C" __global__ void embedding_##S(const T* table, const int* tokens, float* out, int d) { embedding<T>(table, tokens, out, d); }
FOR_EACH_STORAGE(EMBEDDING)
