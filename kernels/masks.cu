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

// out[r, j] = x[r, j] + y[r, j] * mask[j]: a masked block's write into the f32 residual stream (out == x: in place).
extern "C" __global__ void add_scaled_columns_f32(const float* x, const float* __restrict__ y, const float* __restrict__ mask, float* out, int width)
{
    long long off = (long long)blockIdx.x * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) out[off + j] = x[off + j] + y[off + j] * mask[j];
}

#define MASK_GRAD_WARPS 16

// Tiled column sums: a block of MASK_GRAD_WARPS warps owns 32 consecutive columns (one per lane); warp w takes rows
// w, w + MASK_GRAD_WARPS, ..., four rows' loads in flight at a time, and the warps' partial sums are then added in
// shared memory in a fixed order, so the result does not depend on scheduling. A 4096-wide site runs 2048 warps.
// element: init(j) once per column (before any row), load(u, i) issues row u's reads into slot u (u < 4, a
// compile-time constant after unrolling, so the slots are registers), finish(u, i) writes that row's outputs and
// returns its term. Four rows' loads are issued before the first finish: the stores may alias dy (in place), so the
// compiler could not move later loads above them itself.
template <typename EL>
__device__ __forceinline__ void mask_columns_tiled(int rows, int width, float* __restrict__ dmask, int accumulate, EL element)
{
    __shared__ float partial[MASK_GRAD_WARPS][32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int j = blockIdx.x * 32 + lane;
    float s = 0.f;
    if (j < width)
    {
        element.init(j);
        int r = warp;
        for (; r + 3 * MASK_GRAD_WARPS < rows; r += 4 * MASK_GRAD_WARPS)
        {
#pragma unroll
            for (int u = 0; u < 4; u++) element.load(u, (long long)(r + u * MASK_GRAD_WARPS) * width + j);
#pragma unroll
            for (int u = 0; u < 4; u++) s += element.finish(u, (long long)(r + u * MASK_GRAD_WARPS) * width + j);
        }
        for (; r < rows; r += MASK_GRAD_WARPS)
        {
            long long i = (long long)r * width + j;
            element.load(0, i);
            s += element.finish(0, i);
        }
    }
    partial[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && j < width)
    {
        float t = 0.f;
        for (int k = 0; k < MASK_GRAD_WARPS; k++) t += partial[k][lane];
        dmask[j] = accumulate ? dmask[j] + t : t;
    }
}

// mask_columns_grad_tiled: the column mask gradient above, tiled.
template <typename TX>
struct MaskGrad
{
    const float* dy; const TX* x;
    float d[4], v[4];
    __device__ __forceinline__ void init(int) {}
    __device__ __forceinline__ void load(int u, long long i) { d[u] = dy[i]; v[u] = to_f32(x[i]); }
    __device__ __forceinline__ float finish(int u, long long) { return d[u] * v[u]; }
};

#define MASK_COLUMNS_GRAD_TILED(T, S) \
    extern "C" __global__ __launch_bounds__(32 * MASK_GRAD_WARPS) void mask_columns_grad_tiled_##S(const float* __restrict__ dy, \
        const T* __restrict__ x, float* __restrict__ dmask, int rows, int width, int accumulate) \
    { mask_columns_tiled(rows, width, dmask, accumulate, MaskGrad<T>{dy, x}); }
FOR_EACH_STORAGE(MASK_COLUMNS_GRAD_TILED)

// The tiled column sum fused with what the backward does next to the same gradient (DISP training's mask sites):
//   mask_grad_scale: dmask[j] (+)= sum_r dy[r, j] * x[r, j] and out[r, j] = dy[r, j] * mask[j] (out may be dy: in place);
//   swiglu_mask_backward: for the MLP's middle mask, where the masked activation is silu(gate) * up * mask, with dy its
//   gradient: dmask[j] (+)= sum_r dy * silu(gate) * up (the activation recomputed, not stored), and from d = dy * mask[j]
//   dgate = d * up * silu'(gate), dup = d * silu(gate), with silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
// Each element is read once where separate kernels read dy twice.
template <typename TX, typename TO>
struct MaskGradScale
{
    const float* dy; const TX* x; const float* mask; TO* out;
    float m, d[4], v[4];
    __device__ __forceinline__ void init(int j) { m = mask[j]; }
    __device__ __forceinline__ void load(int u, long long i) { d[u] = dy[i]; v[u] = to_f32(x[i]); }
    __device__ __forceinline__ float finish(int u, long long i) { out[i] = from_f32<TO>(d[u] * m); return d[u] * v[u]; }
};

template <typename T>
struct SwigluMaskBackward
{
    const T* gate; const T* up; const float* dy; const float* mask; T* dgate; T* dup;
    float m, g[4], up_[4], d[4];
    __device__ __forceinline__ void init(int j) { m = mask[j]; }
    __device__ __forceinline__ void load(int u, long long i) { g[u] = to_f32(gate[i]); up_[u] = to_f32(up[i]); d[u] = dy[i]; }
    __device__ __forceinline__ float finish(int u, long long i)
    {
        float s = 1.f / (1.f + expf(-g[u])), dm = d[u] * m;
        dgate[i] = from_f32<T>(dm * up_[u] * s * (1.f + g[u] * (1.f - s)));
        dup[i] = from_f32<T>(dm * g[u] * s);
        return d[u] * SiluMulOp()(g[u], up_[u]);
    }
};

#define MASK_GRAD_SCALE(TX, TO, NAME) \
    extern "C" __global__ __launch_bounds__(32 * MASK_GRAD_WARPS) void mask_grad_scale_##NAME(const float* dy, const TX* __restrict__ x, \
        float* __restrict__ dmask, const float* __restrict__ mask, TO* out, int rows, int width, int accumulate) \
    { mask_columns_tiled(rows, width, dmask, accumulate, MaskGradScale<TX, TO>{dy, x, mask, out}); }
MASK_GRAD_SCALE(float, float, f32_f32)
MASK_GRAD_SCALE(float, bf16, f32_bf16)
MASK_GRAD_SCALE(float, f16, f32_f16)
MASK_GRAD_SCALE(bf16, float, bf16_f32)
MASK_GRAD_SCALE(f16, float, f16_f32)

#define SWIGLU_MASK_BACKWARD(T, S) \
    extern "C" __global__ __launch_bounds__(32 * MASK_GRAD_WARPS) void swiglu_mask_backward_##S(const T* __restrict__ gate, \
        const T* __restrict__ up, const float* __restrict__ dy, const float* __restrict__ mask, float* __restrict__ dmask, \
        T* __restrict__ dgate, T* __restrict__ dup, int rows, int width, int accumulate) \
    { mask_columns_tiled(rows, width, dmask, accumulate, SwigluMaskBackward<T>{gate, up, dy, mask, dgate, dup}); }
FOR_EACH_STORAGE(SWIGLU_MASK_BACKWARD)

// masked[r, j] = silu(gate) * up (as silu_mul) * mask[j] ([rows, width], grid rows): the unmasked activation is not
// stored (the backward recomputes it in swiglu_mask_backward).
#define SILU_MUL_MASKED(T, S) \
    extern "C" __global__ void silu_mul_masked_##S(const T* __restrict__ gate, const T* __restrict__ up, const float* __restrict__ mask, \
        T* __restrict__ masked, int width) \
    { \
        long long off = (long long)blockIdx.x * width; \
        for (int j = threadIdx.x; j < width; j += blockDim.x) \
            masked[off + j] = from_f32<T>(SiluMulOp()(to_f32(gate[off + j]), to_f32(up[off + j])) * mask[j]); \
    }
FOR_EACH_STORAGE(SILU_MUL_MASKED)
