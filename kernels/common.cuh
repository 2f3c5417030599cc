// Shared helpers for every DispNative kernel: storage types, conversions, reductions.
// Storage is f32, bf16 or f16; arithmetic and accumulation are always f32.
#pragma once

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned)v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits)); return f; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, NaN kept quiet: the same rule as the host's DType conversion.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v)
{
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{(unsigned short)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16{(unsigned short)(u >> 16)};
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v)
{
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return f16{h};
}

// The 16 / sizeof(T) storage elements of one 16-byte load, as f32.
template <typename T> __device__ __forceinline__ void unpack16(const uint4& raw, float* out)
{
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < (int)(16 / sizeof(T)); i++) out[i] = to_f32(e[i]);
}

// Programmatic dependent launch (sm_90+). A kernel launched with programmatic stream serialization (CudaDevice's
// ProgrammaticLaunch, decode steps) may start while the previous kernel in the stream still runs, once that kernel has
// called allow_dependents_launch() in all its blocks; grid_dependency_wait() then blocks until the previous kernel has
// finished and its writes are visible. Before the wait a kernel may only read what no earlier kernel writes (weights)
// and must write no global memory (its own shared memory is free). Both are no-ops for a normal launch and below
// sm_90. Kernels that wait are listed in CudaDevice.WaitsForGridDependency.
__device__ __forceinline__ void allow_dependents_launch()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void grid_dependency_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Where a kernel waits for its inputs, in two steps: arrive() once the block's earlier writes are done, wait() before it
// reads what others wrote. For a kernel that is the grid-dependency wait alone (its launch boundary is the arrival).
// Device functions that a persistent kernel also runs take it as a parameter and are given a grid barrier's two halves
// there; between the two they load weights and fill shared memory, which delays neither the arrival nor the others.
struct DependencySync
{
    __device__ __forceinline__ void arrive() const {}
    __device__ __forceinline__ void wait() const { grid_dependency_wait(); }
};
// The body of a spin-wait loop: nothing on a GPU; the CUDA emulator (g++, no __CUDA_ARCH__), whose threads switch only
// where they wait, runs the others there.
__device__ __forceinline__ void spin_pause()
{
#if !defined(__CUDA_ARCH__)
    __nanosleep(0);
#endif
}
// A grid-wide barrier in two halves. grid_arrive counts the block in on *count once its writes so far are visible to
// the whole device; grid_wait waits until `target` arrivals have been counted (the count only grows: barrier i of a
// launch waits for (i + 1) * gridDim.x). The arriving thread issues no loads in between, so its fence waits for no
// load in flight. Every block of the grid must be resident at once (a cooperative launch); should one not be, the
// wait gives up after about 2^22 polls (seconds) and returns false instead of hanging. Each grid_wait follows a
// grid_arrive (whose block barrier keeps the shared flag from being overwritten while still read).
__device__ __forceinline__ void grid_arrive(unsigned* count)
{
    __syncthreads();   // the block's writes are done
    if (threadIdx.x == 0)
    {
        __threadfence();   // ... and visible to the whole device before the arrival is
        atomicAdd(count, 1u);
    }
}

__device__ __forceinline__ bool grid_wait(unsigned* count, unsigned target)
{
    __shared__ bool arrived;
    if (threadIdx.x == 0)
    {
        unsigned polls = 0;
        while (*(volatile unsigned*)count < target && ++polls < (1u << 22)) spin_pause();
        arrived = polls < (1u << 22);
        __threadfence();   // the others' writes are read after their arrivals were seen
    }
    __syncthreads();
    return arrived;
}

__device__ __forceinline__ bool grid_barrier(unsigned* count, unsigned target)
{
    grid_arrive(count);
    return grid_wait(count, target);
}

// p, with its value hidden from the optimizer by an empty asm: loads through the result depend on the asm, so they
// stay after it. Loads through a const __restrict__ pointer may be compiled as invariant (ld.global.nc) and scheduled
// freely across a memory clobber; a kernel reads the previous kernel's output through opaque(p) after
// grid_dependency_wait() (volatile asm statements keep their order).
template <typename T>
__device__ __forceinline__ T* opaque(T* p)
{
    asm volatile("" : "+l"(p));
    return p;
}

// silu(g) * u, the SwiGLU activation (forward kernels and the backward that recomputes it use this one expression).
struct SiluMulOp { __device__ __forceinline__ float operator()(float g, float u) const { return g / (1.f + expf(-g)) * u; } };
// The same with the hardware's approximate exp and divide (a few ulp): the engine's for bf16 and f16 (CudaOps.SiluMul).
struct SiluMulFastOp { __device__ __forceinline__ float operator()(float g, float u) const { return __fdividef(g, 1.f + __expf(-g)) * u; } };

#define NEG_INF __int_as_float(0xff800000)

struct SumOp { __device__ __forceinline__ float operator()(float a, float b) const { return a + b; } };
struct MaxOp { __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); } };

template <typename Op> __device__ __forceinline__ float warp_reduce(float v, Op op)
{
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp()); }

// Reduction over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename Op> __device__ __forceinline__ float block_reduce(float v, Op op, float identity)
{
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();   // partial[] may still be read by a previous reduction
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : identity;
    return warp_reduce(v, op);
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, SumOp(), 0.f); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, MaxOp(), NEG_INF); }

struct NoHook { __device__ __forceinline__ void operator()() const {} };

// 16-byte loads in flight per thread of the norm kernels (norm.cu) and of the decode norm fused into the GEMVs
// (gemv.cu), which repeats their loop.
#define NORM_UNROLL 4

// A norm's running sums over one float4 of its row: s += the values, ss += their squares. stream_row and the decode
// norm fused into the GEMVs add in this one order, so both get the same bits.
__device__ __forceinline__ void add_sums(float& s, float& ss, const float4& v)
{
    s += v.x + v.y + v.z + v.w;
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
}

// RMSNorm's 1 / rms of a d-wide row from its sum of squares.
__device__ __forceinline__ float rms_scale(float sum_squares, int d, float eps) { return 1.f / sqrtf(sum_squares / d + eps); }

// One normalized output channel: (x - mean) * scale * gamma + beta (RMSNorm: mean 0, beta 0).
__device__ __forceinline__ float norm_affine(float x, float mean, float scale, float gamma, float beta) { return (x - mean) * scale * gamma + beta; }

// Streams one row src[0..d) into copy (when set; global or shared memory) with UNROLL 16-byte loads in flight per
// thread; with SUMS, also adds the values to s and their squares to ss. after_issue runs once in every thread, when
// its first UNROLL loads are issued and before they are used: loads it issues wait behind the row's, not the row's
// behind them.
template <int UNROLL, bool SUMS, typename Hook = NoHook>
__device__ __forceinline__ void stream_row(const float* __restrict__ src, float* __restrict__ copy, int d, float& s, float& ss,
    Hook after_issue = {})
{
    if ((d & 3) == 0)
    {
        const float4* src4 = reinterpret_cast<const float4*>(src);
        float4* copy4 = reinterpret_cast<float4*>(copy);
        int n4 = d >> 2;
        bool issued = false;
        for (int base = threadIdx.x; base < n4; base += UNROLL * blockDim.x)
        {
            float4 v[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++)
            {
                int i = base + u * blockDim.x;
                v[u] = i < n4 ? src4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            }
            if (!issued) { after_issue(); issued = true; }
#pragma unroll
            for (int u = 0; u < UNROLL; u++)
            {
                int i = base + u * blockDim.x;
                if (copy && i < n4) copy4[i] = v[u];
                if (SUMS) add_sums(s, ss, v[u]);
            }
        }
        if (!issued) after_issue();   // a thread past the row's end
    }
    else
    {
        after_issue();
        for (int i = threadIdx.x; i < d; i += blockDim.x)
        {
            float v = src[i];
            if (copy) copy[i] = v;
            if (SUMS) { s += v; ss += v * v; }
        }
    }
}

// row[idx[j]] += scale * (y[j] + bias[j]) for j < width (idx null: j; bias may be null): DISP's write-back into one
// residual row, in global or shared memory. Indices are unique, so no two threads touch one element; each thread
// issues UNROLL loads before their stores (one latency per UNROLL elements, not per element).
template <int UNROLL, typename Y, typename B>
__device__ __forceinline__ void index_add_row(float* __restrict__ row, const Y* __restrict__ y, const int* __restrict__ idx,
    const B* __restrict__ bias, float scale, int width)
{
    for (int base = threadIdx.x; base < width; base += UNROLL * blockDim.x)
    {
        float v[UNROLL], old[UNROLL];
        int c[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
        {
            int j = base + u * blockDim.x;
            c[u] = -1;
            if (j < width)
            {
                v[u] = to_f32(y[j]);
                if (bias) v[u] += to_f32(bias[j]);
                c[u] = idx ? idx[j] : j;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) if (c[u] >= 0) old[u] = row[c[u]];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) if (c[u] >= 0) row[c[u]] = old[u] + scale * v[u];
    }
}

// A residual row xr staged in shared memory (row, d floats): read whole, row[idx[j]] += scale * (y[j] + bias[j]) applied
// there, written back whole; with SUMS the written values and their squares are added to s and ss (a norm's statistics).
template <int UNROLL, bool SUMS, typename Y, typename B>
__device__ __forceinline__ void index_add_staged_row(float* __restrict__ xr, float* __restrict__ row, const Y* __restrict__ y,
    const int* __restrict__ idx, const B* __restrict__ bias, float scale, int width, int d, float& s, float& ss)
{
    stream_row<UNROLL, false>(xr, row, d, s, ss);
    __syncthreads();
    index_add_row<UNROLL>(row, y, idx, bias, scale, width);
    __syncthreads();
    stream_row<UNROLL, SUMS>(row, xr, d, s, ss);
}

// Uniform (0, 1) from a counter-based hash (splitmix64 of seed + golden-ratio step · (counter + 1)), 24 bits.
__device__ __forceinline__ float hash_uniform(unsigned long long seed, unsigned long long counter)
{
    unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (counter + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * (1.f / 16777216.f);
}

// Declares one extern "C" entry point per storage type: NAME_f32, NAME_bf16, NAME_f16.
#define FOR_EACH_STORAGE(MACRO) MACRO(float, f32) MACRO(bf16, bf16) MACRO(f16, f16)
