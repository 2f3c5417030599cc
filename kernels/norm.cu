// DISP gather-norm: statistics over the full f32 residual row, output only the selected channels:
//   out[r, j] = norm(x[r])[idx[j]] * gamma[idx[j]] (+ beta[idx[j]] for LayerNorm).
// idx == nullptr means the dense norm (width == d). One block per row, one launch; when shared memory holds the
// row (row_in_smem != 0, dynamic size d floats) the row is read from HBM exactly once.
#include "common.cuh"

template <typename T, bool LAYER>
__device__ void gather_norm(const float* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
    const int* __restrict__ idx, T* __restrict__ out, int d, int width, float eps, int row_in_smem)
{
    extern __shared__ float row[];
    const float* xr = x + (long long)blockIdx.x * d;
    float s = 0.f, ss = 0.f;
    if ((d & 3) == 0)
    {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (int i = threadIdx.x; i < d / 4; i += blockDim.x)
        {
            float4 v = x4[i];
            if (row_in_smem) reinterpret_cast<float4*>(row)[i] = v;
            s += v.x + v.y + v.z + v.w;
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    }
    else
    {
        for (int i = threadIdx.x; i < d; i += blockDim.x)
        {
            float v = xr[i];
            if (row_in_smem) row[i] = v;
            s += v; ss += v * v;
        }
    }
    float mean = 0.f, scale;
    if (LAYER)
    {
        mean = block_sum(s) / d;
        float var = fmaxf(block_sum(ss) / d - mean * mean, 0.f);
        scale = 1.f / sqrtf(var + eps);
    }
    else scale = 1.f / sqrtf(block_sum(ss) / d + eps);
    __syncthreads();
    const float* src = row_in_smem ? row : xr;
    T* o = out + (long long)blockIdx.x * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x)
    {
        int c = idx ? idx[j] : j;
        float y = (src[c] - mean) * scale * to_f32(gamma[c]);
        if (LAYER && beta) y += to_f32(beta[c]);
        o[j] = from_f32<T>(y);
    }
}

#define NORMS(T, S) \
    extern "C" __global__ void rmsnorm_gather_##S(const float* x, const T* gamma, const int* idx, T* out, int d, int width, float eps, int row_in_smem) \
    { gather_norm<T, false>(x, gamma, nullptr, idx, out, d, width, eps, row_in_smem); } \
    extern "C" __global__ void layernorm_gather_##S(const float* x, const T* gamma, const T* beta, const int* idx, T* out, int d, int width, float eps, int row_in_smem) \
    { gather_norm<T, true>(x, gamma, beta, idx, out, d, width, eps, row_in_smem); }
FOR_EACH_STORAGE(NORMS)
