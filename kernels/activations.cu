// MLP activations: SwiGLU (out = silu(gate) * up) and exact (erf) GELU; elementwise, grid-stride.
// silu_mul_backward: from dout (f32), dgate = dout * up * silu'(gate) and dup = dout * silu(gate), with
// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
#include "common.cuh"

#define ACTIVATIONS(T, S) \
    extern "C" __global__ void silu_mul_##S(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, long long n) \
    { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) \
        { \
            float g = to_f32(gate[i]); \
            out[i] = from_f32<T>(g / (1.f + expf(-g)) * to_f32(up[i])); \
        } \
    } \
    extern "C" __global__ void silu_mul_backward_##S(const T* __restrict__ gate, const T* __restrict__ up, const float* __restrict__ dout, \
        T* __restrict__ dgate, T* __restrict__ dup, long long n) \
    { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) \
        { \
            float g = to_f32(gate[i]), u = to_f32(up[i]), d = dout[i]; \
            float s = 1.f / (1.f + expf(-g)); \
            dgate[i] = from_f32<T>(d * u * s * (1.f + g * (1.f - s))); \
            dup[i] = from_f32<T>(d * g * s); \
        } \
    } \
    extern "C" __global__ void gelu_##S(const T* __restrict__ in, T* __restrict__ out, long long n) \
    { \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) \
        { \
            float v = to_f32(in[i]); \
            out[i] = from_f32<T>(0.5f * v * (1.f + erff(v * 0.70710678118654752f))); \
        } \
    }
FOR_EACH_STORAGE(ACTIVATIONS)
