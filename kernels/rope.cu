// Rotary position embedding, half rotation (pairs i and i + head_dim/2), in place on q or k.
// Row r has absolute position start + r (start read from device memory when position is not null, so a captured
// CUDA graph can replay it); angle = position * inv_freq[i] in f32, as on the CPU. direction -1 rotates by the
// negative angle: the backward of the rotation (its transpose) applied to a gradient.
#include "common.cuh"

template <typename T>
__device__ void rope(T* __restrict__ x, const float* __restrict__ inv_freq, int heads, int head_dim, int start, const int* position,
    float direction)
{
    if (position) start = *position;
    int half = head_dim / 2;
    float pos = (float)(start + (int)blockIdx.x);
    T* row = x + (long long)blockIdx.x * heads * head_dim;
    for (int t = threadIdx.x; t < heads * half; t += blockDim.x)
    {
        int h = t / half, i = t % half;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        s *= direction;
        T* p = row + h * head_dim;
        float a = to_f32(p[i]), b = to_f32(p[i + half]);
        p[i] = from_f32<T>(a * c - b * s);
        p[i + half] = from_f32<T>(b * c + a * s);
    }
}

#define ROPE(T, S) \
    extern "C" __global__ void rope_##S(T* x, const float* inv_freq, int heads, int head_dim, int start, const int* position, float direction) \
    { rope<T>(x, inv_freq, heads, head_dim, start, position, direction); }
FOR_EACH_STORAGE(ROPE)
