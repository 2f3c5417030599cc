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

// Gradient of a column mask: dmask[j] (+)= sum_r dy[r, j] * x[r, j] (x = the activation before masking; summed into
// dmask when accumulate != 0, e.g. for one mask shared by several sites). Naive baseline (KernelBench): one thread per
// column walks every row, so a 4096-wide site runs 4096 threads, too few loads in flight for the GPU's bandwidth.
#define MASK_COLUMNS_GRAD(T, S) \
    extern "C" __global__ void mask_columns_grad_##S(const float* __restrict__ dy, const T* __restrict__ x, \
        float* __restrict__ dmask, int rows, int width, int accumulate) \
    { \
        int j = blockIdx.x * blockDim.x + threadIdx.x; \
        if (j >= width) return; \
        float s = 0.f; \
        for (int r = 0; r < rows; r++) s += dy[(long long)r * width + j] * to_f32(x[(long long)r * width + j]); \
        dmask[j] = accumulate ? dmask[j] + s : s; \
    }
FOR_EACH_STORAGE(MASK_COLUMNS_GRAD)

// The same sum, tiled: a block of MASK_GRAD_WARPS warps owns 32 consecutive columns (one per lane); warp w sums rows
// w, w + MASK_GRAD_WARPS, ..., four rows' loads in flight at a time, and the warps' partial sums are then added in
// shared memory in a fixed order, so the result does not depend on scheduling. A 4096-wide site runs 2048 warps.
#define MASK_GRAD_WARPS 16
#define MASK_COLUMNS_GRAD_TILED(T, S) \
    extern "C" __global__ __launch_bounds__(32 * MASK_GRAD_WARPS) void mask_columns_grad_tiled_##S(const float* __restrict__ dy, \
        const T* __restrict__ x, float* __restrict__ dmask, int rows, int width, int accumulate) \
    { \
        __shared__ float partial[MASK_GRAD_WARPS][32]; \
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5; \
        int j = blockIdx.x * 32 + lane; \
        float s = 0.f; \
        if (j < width) \
        { \
            const int step = MASK_GRAD_WARPS; \
            int r = warp; \
            for (; r + 3 * step < rows; r += 4 * step) \
            { \
                long long i = (long long)r * width + j, st = (long long)step * width; \
                float d0 = dy[i], d1 = dy[i + st], d2 = dy[i + 2 * st], d3 = dy[i + 3 * st]; \
                float x0 = to_f32(x[i]), x1 = to_f32(x[i + st]), x2 = to_f32(x[i + 2 * st]), x3 = to_f32(x[i + 3 * st]); \
                s += d0 * x0; s += d1 * x1; s += d2 * x2; s += d3 * x3; \
            } \
            for (; r < rows; r += step) s += dy[(long long)r * width + j] * to_f32(x[(long long)r * width + j]); \
        } \
        partial[warp][lane] = s; \
        __syncthreads(); \
        if (warp == 0 && j < width) \
        { \
            float t = 0.f; \
            for (int k = 0; k < MASK_GRAD_WARPS; k++) t += partial[k][lane]; \
            dmask[j] = accumulate ? dmask[j] + t : t; \
        } \
    }
FOR_EACH_STORAGE(MASK_COLUMNS_GRAD_TILED)

// out[r, j] = x[r, j] * mask[j] (mask == nullptr: a copy), converting the storage type: f32 to any, or S to S.
// out may be x (in place).
#define SCALE_COLUMNS(TI, TO, NAME) \
    extern "C" __global__ void scale_columns_##NAME(const TI* x, const float* __restrict__ mask, TO* out, int width) \
    { \
        long long off = (long long)blockIdx.x * width; \
        for (int j = threadIdx.x; j < width; j += blockDim.x) \
            out[off + j] = from_f32<TO>(to_f32(x[off + j]) * (mask ? mask[j] : 1.f)); \
    }
SCALE_COLUMNS(float, float, f32_f32)
SCALE_COLUMNS(float, bf16, f32_bf16)
SCALE_COLUMNS(float, f16, f32_f16)
SCALE_COLUMNS(bf16, bf16, bf16_bf16)
SCALE_COLUMNS(f16, f16, f16_f16)

// x[r, j] += y[r, j] * mask[j]: a masked block's write into the f32 residual stream.
extern "C" __global__ void add_scaled_columns_f32(float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ mask, int width)
{
    long long off = (long long)blockIdx.x * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) x[off + j] += y[off + j] * mask[j];
}
