// MLP activations: SwiGLU (out = silu(gate) * up) and exact (erf) GELU; elementwise, grid-stride.
// The forward maps read and write 16 bytes per thread per step (8 bf16/f16 or 4 f32) when the buffers are 16-byte
// aligned, the elements past the last whole 16 bytes one by one; out may be one of the inputs (in place).
// The SwiGLU backward is masks.cu's swiglu_mask_backward (training always has the middle mask).
#include "common.cuh"

struct GeluOp { __device__ __forceinline__ float operator()(float v, float) const { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); } };

// out[i] = op(a[i], b[i]) (b null: op(a[i], 0)).
template <typename T, typename Op>
__device__ void elementwise(const T* a, const T* b, T* out, long long n, Op op)
{
    constexpr int N = 16 / sizeof(T);
    long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    bool aligned = (((unsigned long long)a | (unsigned long long)b | (unsigned long long)out) & 15) == 0;
    long long vectors = aligned ? n / N : 0;
    for (long long i = first; i < vectors; i += stride)
    {
        float fa[N], fb[N];
        unpack16<T>(reinterpret_cast<const uint4*>(a)[i], fa);
        if (b) unpack16<T>(reinterpret_cast<const uint4*>(b)[i], fb);
        uint4 r;
        T* re = reinterpret_cast<T*>(&r);
#pragma unroll
        for (int e = 0; e < N; e++) re[e] = from_f32<T>(op(fa[e], b ? fb[e] : 0.f));
        reinterpret_cast<uint4*>(out)[i] = r;
    }
    for (long long i = vectors * N + first; i < n; i += stride) out[i] = from_f32<T>(op(to_f32(a[i]), b ? to_f32(b[i]) : 0.f));
}

#define ACTIVATIONS(T, S) \
    extern "C" __global__ void silu_mul_##S(const T* gate, const T* up, T* out, long long n) \
    { elementwise<T>(gate, up, out, n, SiluMulOp()); } \
    extern "C" __global__ void silu_mul_fast_##S(const T* gate, const T* up, T* out, long long n) \
    { elementwise<T>(gate, up, out, n, SiluMulFastOp()); } \
    extern "C" __global__ void gelu_##S(const T* in, T* out, long long n) \
    { elementwise<T>(in, (const T*)nullptr, out, n, GeluOp()); }
FOR_EACH_STORAGE(ACTIVATIONS)
