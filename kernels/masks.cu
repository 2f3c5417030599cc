// DISP-LLM mask kernels (f32: masks and their gradients stay in full precision).
#include "common.cuh"

// Gumbel-Sigmoid: soft = sigmoid((logits + g + offset) / temperature), hard = round(soft) = (logits + g + offset > 0).
// noise == nullptr means g = 0 (deterministic masks).
extern "C" __global__ void gumbel_sigmoid(const float* __restrict__ logits, const float* __restrict__ noise,
    float* __restrict__ soft, float* __restrict__ hard, int n, float offset, float temperature)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float z = logits[i] + (noise ? noise[i] : 0.f);
    float a = z * (1.f / temperature) + offset / temperature;
    soft[i] = 1.f / (1.f + expf(-a));
    if (hard) hard[i] = z + offset > 0.f ? 1.f : 0.f;
}

// Backward of the soft mask: dlogits = dsoft * s * (1 - s) / temperature.
extern "C" __global__ void gumbel_sigmoid_backward(const float* __restrict__ soft, const float* __restrict__ dsoft,
    float* __restrict__ dlogits, int n, float temperature)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = soft[i];
    dlogits[i] = dsoft[i] * s * (1.f - s) * (1.f / temperature);
}

// Gumbel(0, 1) noise from a counter-based hash (seed, counter): -log(-log u), u in (0, 1).
extern "C" __global__ void gumbel_noise(float* __restrict__ out, int n, unsigned long long seed, unsigned long long counter)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float u = hash_uniform(seed, counter + (unsigned long long)i);
    out[i] = -logf(-logf(u));
}

// y[r, j] *= mask[j] (mask multiply of a [rows, width] activation).
#define MASK_COLUMNS(T, S) \
    extern "C" __global__ void mask_columns_##S(T* __restrict__ y, const float* __restrict__ mask, int width) \
    { \
        T* yr = y + (long long)blockIdx.x * width; \
        for (int j = threadIdx.x; j < width; j += blockDim.x) yr[j] = from_f32<T>(to_f32(yr[j]) * mask[j]); \
    }
FOR_EACH_STORAGE(MASK_COLUMNS)

// Gradient of a column mask: dmask[j] = sum_r dy[r, j] * x[r, j] (x = the activation before masking).
// One thread per column; consecutive threads read consecutive columns.
extern "C" __global__ void mask_columns_grad_f32(const float* __restrict__ dy, const float* __restrict__ x,
    float* __restrict__ dmask, int rows, int width)
{
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= width) return;
    float s = 0.f;
    for (int r = 0; r < rows; r++) s += dy[(long long)r * width + j] * x[(long long)r * width + j];
    dmask[j] = s;
}
