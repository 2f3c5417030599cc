// DISP gather-norm: statistics over the full f32 residual row, output only the selected channels:
//   out[r, j] = norm(x[r])[idx[j]] * gamma[idx[j]] (+ beta[idx[j]] for LayerNorm), j < width;
//   out[r, j] = 0 for width <= j < out_stride (the zero padding that keeps pruned GEMM operands 16-byte aligned).
// idx == nullptr means the dense norm (width == d). One block per row, one launch; when shared memory holds the
// row (row_in_smem != 0, dynamic size d floats) the row is read from HBM exactly once. Each thread keeps UNROLL
// loads in flight: the row is short (16 KB at d 4096), so latency, not bandwidth, limits a one-load-per-step loop.
// add_rmsnorm_gather first applies the previous block's write-back, x[r, add_idx[j]] += add_scale * (y[r, j] + bias[j])
// (index_add_row, as residual.cu's index_add), to the row staged in shared memory, writes the row back and then
// normalizes it: the residual is read and written once for both, where the two kernels read it twice and write it once.
// rmsnorm_masked and add_masked_rmsnorm are DISP training's dense norms with a column-masked copy of the output.
#include "common.cuh"

// One thread's UNROLL output channels j = base + u * blockDim.x: c = idx[j] (-1 past width), gamma[c], beta[c] and
// mask[j] (a column mask for a masked copy of the output; null: none). The first chunk is loaded before the row, so
// the dependent idx -> gamma loads overlap the row's loads and its reduction instead of following them (with one row
// per block, as in decode, those latencies are most of the kernel).
template <typename T>
struct GatherChunk
{
    int c[NORM_UNROLL];
    float g[NORM_UNROLL], b[NORM_UNROLL], m[NORM_UNROLL];

    __device__ __forceinline__ void load(int base, const int* __restrict__ idx, const T* __restrict__ gamma, const T* __restrict__ beta,
        const float* __restrict__ mask, int width)
    {
        load_index(base, idx, width);
        load_values(base, gamma, beta, mask);
    }

    __device__ __forceinline__ void load_index(int base, const int* __restrict__ idx, int width)
    {
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++)
        {
            int j = base + u * blockDim.x;
            c[u] = j < width ? (idx ? idx[j] : j) : -1;
        }
    }

    __device__ __forceinline__ void load_values(int base, const T* __restrict__ gamma, const T* __restrict__ beta, const float* __restrict__ mask)
    {
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++)
        {
            g[u] = c[u] >= 0 ? to_f32(gamma[c[u]]) : 0.f;
            b[u] = c[u] >= 0 && beta ? to_f32(beta[c[u]]) : 0.f;
            m[u] = c[u] >= 0 && mask ? mask[base + u * blockDim.x] : 0.f;
        }
    }
};

// From the row's sums: the normalized selected channels of src, zero-padded to out_stride, into this block's out row.
// chunk holds the first chunk (base threadIdx.x), loaded by the caller. With masked set, also masked[r, j] = out[r, j] *
// mask[j] (from the f32 value, rounded once).
template <typename T, bool LAYER>
__device__ __forceinline__ void store_gathered(const float* src, float s, float ss, GatherChunk<T>& chunk, const T* __restrict__ gamma,
    const T* __restrict__ beta, const int* __restrict__ idx, T* __restrict__ out, int d, int width, int out_stride, float eps,
    const float* __restrict__ mask = nullptr, T* __restrict__ masked = nullptr)
{
    float mean = 0.f, scale;
    if (LAYER)
    {
        mean = block_sum(s) / d;
        float var = fmaxf(block_sum(ss) / d - mean * mean, 0.f);
        scale = 1.f / sqrtf(var + eps);
    }
    else scale = rms_scale(block_sum(ss), d, eps);
    __syncthreads();
    T* o = out + (long long)blockIdx.x * out_stride;
    T* om = masked ? masked + (long long)blockIdx.x * out_stride : nullptr;
    for (int base = threadIdx.x; base < out_stride; base += NORM_UNROLL * blockDim.x)
    {
        if (base != (int)threadIdx.x) chunk.load(base, idx, gamma, beta, mask, width);
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++)
        {
            int j = base + u * blockDim.x;
            if (j >= out_stride) break;
            float y = 0.f;
            if (chunk.c[u] >= 0) y = norm_affine(src[chunk.c[u]], mean, scale, chunk.g[u], chunk.b[u]);
            o[j] = from_f32<T>(y);
            if (om) om[j] = from_f32<T>(y * chunk.m[u]);
        }
    }
}

// ROW_FIRST (a KernelBench variant): only idx is loaded before the row; gamma's loads, which wait for idx, are issued
// after the row's first loads instead of holding them back by a memory latency.
template <typename T, bool LAYER, bool ROW_FIRST = false>
__device__ void gather_norm(const float* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
    const int* __restrict__ idx, T* __restrict__ out, int d, int width, int out_stride, float eps, int row_in_smem)
{
    extern __shared__ float4 row4[];
    float* row = reinterpret_cast<float*>(row4);
    const float* xr = x + (long long)blockIdx.x * d;
    GatherChunk<T> chunk;
    if (ROW_FIRST) chunk.load_index(threadIdx.x, idx, width);
    else chunk.load(threadIdx.x, idx, gamma, LAYER ? beta : nullptr, nullptr, width);
    allow_dependents_launch();
    grid_dependency_wait();
    xr = opaque(xr);
    float s = 0.f, ss = 0.f;
    if (ROW_FIRST)
        stream_row<NORM_UNROLL, true>(xr, row_in_smem ? row : nullptr, d, s, ss,
            [&] { chunk.load_values(threadIdx.x, gamma, LAYER ? beta : nullptr, nullptr); });
    else stream_row<NORM_UNROLL, true>(xr, row_in_smem ? row : nullptr, d, s, ss);
    store_gathered<T, LAYER>(row_in_smem ? row : xr, s, ss, chunk, gamma, LAYER ? beta : nullptr, idx, out, d, width, out_stride, eps);
}

// Needs d floats of dynamic shared memory. y is f32 (a GEMM's output), bias the storage type; add_idx == nullptr: the
// dense add (add_width == d).
template <typename T>
__device__ void add_rmsnorm_gather(float* __restrict__ x, const float* __restrict__ y, const int* __restrict__ add_idx,
    const T* __restrict__ bias, float add_scale, int add_width, int y_stride, const T* __restrict__ gamma,
    const int* __restrict__ idx, T* __restrict__ out, int d, int width, int out_stride, float eps)
{
    extern __shared__ float4 row4[];
    float* row = reinterpret_cast<float*>(row4);
    float* xr = x + (long long)blockIdx.x * d;
    GatherChunk<T> chunk;
    chunk.load(threadIdx.x, idx, gamma, nullptr, nullptr, width);
    float s = 0.f, ss = 0.f;
    index_add_staged_row<NORM_UNROLL, true>(xr, row, y + (long long)blockIdx.x * y_stride, add_idx, bias, add_scale, add_width, d, s, ss);
    store_gathered<T, false>(row, s, ss, chunk, gamma, nullptr, idx, out, d, width, out_stride, eps);
}

// DISP training's masked norms (dense, the row in shared memory): out = RMSNorm(row) * gamma and, when masked is set,
// masked = out * mask (the next GEMM's input; out stays for the mask's gradient), where row is x (rmsnorm_masked) or
// x + y * add_mask, written to x_out (add_masked_rmsnorm: a masked block's write-back into a new residual, x kept).
template <typename T>
__device__ void masked_norm(const float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ add_mask,
    float* __restrict__ x_out, const T* __restrict__ gamma, T* __restrict__ out, const float* __restrict__ mask,
    T* __restrict__ masked, int d, float eps)
{
    extern __shared__ float4 row4[];
    float* row = reinterpret_cast<float*>(row4);
    long long off = (long long)blockIdx.x * d;
    GatherChunk<T> chunk;
    chunk.load(threadIdx.x, nullptr, gamma, nullptr, mask, d);
    float s = 0.f, ss = 0.f;
    if (!y) stream_row<NORM_UNROLL, true>(x + off, row, d, s, ss);
    else if ((d & 3) == 0)
    {
        const float4* x4 = reinterpret_cast<const float4*>(x + off);
        const float4* y4 = reinterpret_cast<const float4*>(y + off);
        float4* o4 = reinterpret_cast<float4*>(x_out + off);
        int n4 = d >> 2;
        for (int base = threadIdx.x; base < n4; base += NORM_UNROLL * blockDim.x)
        {
            // The rows' loads all in flight first; the mask (the same d floats for every row, mostly cached, and
            // not 16-byte aligned) is read as it is used, which keeps the thread within 64 registers.
            float4 a[NORM_UNROLL], b[NORM_UNROLL];
#pragma unroll
            for (int u = 0; u < NORM_UNROLL; u++)
            {
                int i = base + u * blockDim.x;
                if (i >= n4) continue;
                a[u] = x4[i]; b[u] = y4[i];
            }
#pragma unroll
            for (int u = 0; u < NORM_UNROLL; u++)
            {
                int i = base + u * blockDim.x;
                if (i >= n4) continue;
                const float* m = add_mask + 4 * i;
                float4 v = make_float4(a[u].x + b[u].x * m[0], a[u].y + b[u].y * m[1], a[u].z + b[u].z * m[2], a[u].w + b[u].w * m[3]);
                row4[i] = v;
                o4[i] = v;
                ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
        }
    }
    else
    {
        for (int i = threadIdx.x; i < d; i += blockDim.x)
        {
            float v = x[off + i] + y[off + i] * add_mask[i];
            row[i] = v;
            x_out[off + i] = v;
            ss += v * v;
        }
    }
    __syncthreads();
    store_gathered<T, false>(row, s, ss, chunk, gamma, nullptr, nullptr, out, d, d, d, eps, mask, masked);
}

#define NORMS(T, S) \
    extern "C" __global__ void rmsnorm_gather_##S(const float* x, const T* gamma, const int* idx, T* out, int d, int width, int out_stride, float eps, int row_in_smem) \
    { gather_norm<T, false>(x, gamma, nullptr, idx, out, d, width, out_stride, eps, row_in_smem); } \
    extern "C" __global__ void layernorm_gather_##S(const float* x, const T* gamma, const T* beta, const int* idx, T* out, int d, int width, int out_stride, float eps, int row_in_smem) \
    { gather_norm<T, true>(x, gamma, beta, idx, out, d, width, out_stride, eps, row_in_smem); } \
    extern "C" __global__ void add_rmsnorm_gather_##S(float* x, const float* y, const int* add_idx, const T* bias, float add_scale, int add_width, \
        int y_stride, const T* gamma, const int* idx, T* out, int d, int width, int out_stride, float eps) \
    { add_rmsnorm_gather<T>(x, y, add_idx, bias, add_scale, add_width, y_stride, gamma, idx, out, d, width, out_stride, eps); }
FOR_EACH_STORAGE(NORMS)

// KernelBench variants (bf16, blocks of at most 256 threads): the same code compiled for 8 resident blocks of 256
// threads per SM, which caps it at 32 registers per thread (NVRTC 11.8 spills up to 72 bytes to fit). Whether
// register-limited occupancy (fewer, longer waves of the 2048 one-row blocks) is what holds the row kernels below the
// bandwidth of a plain residual add.
extern "C" __global__ __launch_bounds__(256, 8) void rmsnorm_gather_occupancy_bf16(const float* x, const bf16* gamma, const int* idx, bf16* out,
    int d, int width, int out_stride, float eps, int row_in_smem)
{ gather_norm<bf16, false>(x, gamma, nullptr, idx, out, d, width, out_stride, eps, row_in_smem); }
extern "C" __global__ __launch_bounds__(256, 8) void add_rmsnorm_gather_occupancy_bf16(float* x, const float* y, const int* add_idx, const bf16* bias,
    float add_scale, int add_width, int y_stride, const bf16* gamma, const int* idx, bf16* out, int d, int width, int out_stride, float eps)
{ add_rmsnorm_gather<bf16>(x, y, add_idx, bias, add_scale, add_width, y_stride, gamma, idx, out, d, width, out_stride, eps); }
// The gather-norm with gamma's loads issued after the row's (ROW_FIRST): is the idx -> gamma chain ahead of the
// row a latency every one-row block pays?
extern "C" __global__ void rmsnorm_gather_row_first_bf16(const float* x, const bf16* gamma, const int* idx, bf16* out,
    int d, int width, int out_stride, float eps, int row_in_smem)
{ gather_norm<bf16, false, true>(x, gamma, nullptr, idx, out, d, width, out_stride, eps, row_in_smem); }

// Launched with up to 1024 threads (one pass over a 4096-wide row, CudaOps.NormThreads): the bound keeps
// add_masked_rmsnorm within 64 registers per thread (it took 80-96, and a block of 1024 would not launch).
#define MASKED_NORMS(T, S) \
    extern "C" __global__ __launch_bounds__(1024) void rmsnorm_masked_##S(const float* x, const T* gamma, T* out, const float* mask, T* masked, int d, float eps) \
    { masked_norm<T>(x, nullptr, nullptr, nullptr, gamma, out, mask, masked, d, eps); } \
    extern "C" __global__ __launch_bounds__(1024) void add_masked_rmsnorm_##S(const float* x, const float* y, const float* add_mask, float* x_out, const T* gamma, \
        T* out, const float* mask, T* masked, int d, float eps) \
    { masked_norm<T>(x, y, add_mask, x_out, gamma, out, mask, masked, d, eps); }
FOR_EACH_STORAGE(MASKED_NORMS)

// Backward of the RMSNorm y = x * r * gamma, r = 1 / sqrt(mean(x^2) + eps), to its f32 input, accumulated:
//   dx[i] += r * gamma[i] * dy[i] - x[i] * r^3 / d * sum_j gamma[j] * dy[j] * x[j].
// gamma is frozen (no gradient). One block per row.
template <typename T>
__device__ void rmsnorm_backward(const float* __restrict__ x, const T* __restrict__ gamma, const float* __restrict__ dy,
    float* __restrict__ dx, int d, float eps)
{
    long long off = (long long)blockIdx.x * d;
    const float* xr = x + off;
    const float* gr = dy + off;
    float ss = 0.f, dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
    {
        float v = xr[i];
        ss += v * v;
        dot += to_f32(gamma[i]) * gr[i] * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    float r = 1.f / sqrtf(ss / d + eps);
    float k = dot * r * r * r / d;
    float* o = dx + off;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] += r * to_f32(gamma[i]) * gr[i] - xr[i] * k;
}

#define NORM_BACKWARD(T, S) \
    extern "C" __global__ void rmsnorm_backward_##S(const float* x, const T* gamma, const float* dy, float* dx, int d, float eps) \
    { rmsnorm_backward<T>(x, gamma, dy, dx, d, eps); }
FOR_EACH_STORAGE(NORM_BACKWARD)
