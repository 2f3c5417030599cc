// A decode step's decoder layers in one persistent kernel: the work of decode's five kernels per layer (gemv_norm_qkv,
// attention_decode_split with RoPE and the cache append, the o_proj index-add GEMV, gemv_norm_swiglu, the down
// index-add GEMV) as phases of one cooperative launch, a grid barrier where a kernel boundary was. Each phase runs the
// same device functions as those kernels (gemv.cuh, attention_decode.cuh), so the outputs are bit for bit theirs; what
// changes is the price of a dependency (KernelBench gpu measures both) and that a block loads its next weight rows
// between its arrival at the barrier and its wait there, as a programmatically launched kernel does before its
// grid-dependency wait.
// What one phase wrote, a later one reads after the barrier through plain pointers (never const __restrict__, whose
// loads may be compiled as non-coherent and miss another SM's writes in the same launch); the barrier's fences order the
// writes before the arrival and the reads after it, as cooperative groups' grid sync does.
// Launch: cooperative, blocks of 2 x DECODE_WARPS warps (the GEMVs' 8; attention runs a share per group of 4 warps), at
// most as many blocks as are resident at once; *barrier zero; the embedding kernel before it writes x, the final norm
// after it reads x. Dynamic shared memory: the larger of the two fused norms' (gemv.cuh).
#include "gemv.cuh"
#include "attention_decode.cuh"

// One decoder layer as the kernel reads it; CudaLlama writes the same layout (every field 8 bytes). Index pointers are
// null for a dense site; widths: the norms' kept channels and the stored (padded) K of the GEMVs that read them.
struct DecodeLayer
{
    const void* attn_norm; const int* attn_in; const void* wq; const void* wk; const void* wv; void* k_cache; void* v_cache;
    const void* wo; const int* attn_out; const void* mlp_norm; const int* mlp_in; const void* w_gate; const void* w_up;
    const void* w_down; const int* mlp_out;
    long long attn_in_width, attn_in_k, attn_norm_threads, attn_out_rows, mlp_in_width, mlp_in_k, mlp_norm_threads, mid_rows, mlp_out_rows;
};

// The grid barriers of one launch, in order: barrier i waits for (i + 1) * gridDim.x arrivals. One that gives up (a grid
// not all resident: cannot happen under a cooperative launch) writes NaN into the residual, so the step's logits show
// it, and the block takes part in no later barrier. skip: the barrier before the first layer, which has none.
struct StepBarrier
{
    unsigned* count;
    float* poison;
    unsigned target;
    bool ok;
    bool skip;

    __device__ void arrive()
    {
        if (skip) return;
        target += gridDim.x;
        if (ok) grid_arrive(count);
    }
    __device__ void wait()
    {
        if (skip || !ok) return;
        if (!grid_wait(count, target))
        {
            ok = false;
            if (threadIdx.x == 0) *poison = __int_as_float(0x7fc00000);
        }
    }
};

// The barrier as the device functions take it (their Sync parameter): by reference, as it counts.
struct StepSync
{
    StepBarrier* bar;
    __device__ void arrive() const { bar->arrive(); }
    __device__ void wait() const { bar->wait(); }
};

template <int U, typename T>
__device__ void decode_layers(const DecodeLayer* __restrict__ layers, int n_layers, float* x, T* q, T* k_new, T* v_new, T* att, T* gate,
    const float* __restrict__ inv_freq, float* partial, unsigned* arrivals, unsigned* barrier, int start, int d, int heads, int kv_heads,
    int head_dim, int window, int splits, float scale, float eps)
{
    __shared__ DecodeGroupShared<> groups[2];
    StepBarrier bar{barrier, x, 0u, true, true};
    StepSync sync{&bar};
    int qd = heads * head_dim, kvd = kv_heads * head_dim;
    int group = threadIdx.x / (DECODE_WARPS * 32), t = threadIdx.x % (DECODE_WARPS * 32);
    for (int l = 0; l < n_layers; l++)
    {
        const DecodeLayer& L = layers[l];
        const T* k_cache = static_cast<const T*>(L.k_cache);
        const T* v_cache = static_cast<const T*>(L.v_cache);

        // The first layer's input is the embedding kernel's output: launched before this kernel, nothing to wait for.
        bar.skip = l == 0;
        gemv_norm_qkv<U, T>(DecodeNorm<T>{x, static_cast<const T*>(L.attn_norm), L.attn_in, d, (int)L.attn_in_width, (int)L.attn_norm_threads, eps},
            static_cast<const T*>(L.wq), q, qd, static_cast<const T*>(L.wk), k_new, kvd, static_cast<const T*>(L.wv), v_new, kvd, (int)L.attn_in_k,
            sync);
        bar.skip = false;

        bar.arrive();
        bar.wait();
        DecodeAttention<T> a{opaque(q), opaque(k_cache), opaque(v_cache), att, opaque(partial), opaque(arrivals), opaque(k_new), opaque(v_new),
            inv_freq, static_cast<T*>(L.k_cache), static_cast<T*>(L.v_cache), start, heads, kv_heads, head_dim, window, scale};
        int items = heads * splits;
        for (int base = 2 * blockIdx.x; base < items; base += 2 * gridDim.x)   // the same trips for the whole block
        {
            __syncthreads();   // the group's shared memory is free again
            int item = base + group;
            bool active = item < items;
            attend_share<T>(a, active, t, groups[group], active ? item / splits : 0, active ? item % splits : 0, splits);
        }

        gemv<U, T, float>(att, static_cast<const T*>(L.wo), x, L.attn_out, (int)L.attn_out_rows, qd, 1.f, 1.f, sync);

        gemv_norm_swiglu<U, T>(DecodeNorm<T>{x, static_cast<const T*>(L.mlp_norm), L.mlp_in, d, (int)L.mlp_in_width, (int)L.mlp_norm_threads, eps},
            static_cast<const T*>(L.w_gate), static_cast<const T*>(L.w_up), gate, (int)L.mid_rows, (int)L.mlp_in_k, sync);

        gemv<U, T, float>(gate, static_cast<const T*>(L.w_down), x, L.mlp_out, (int)L.mlp_out_rows, (int)L.mid_rows, 1.f, 1.f, sync);
    }
}

#define DECODE_LAYERS_U(T, S, U) \
    extern "C" __global__ __launch_bounds__(256) void decode_layers_##S##_u##U(const DecodeLayer* layers, int n_layers, float* x, T* q, \
        T* k_new, T* v_new, T* att, T* gate, const float* inv_freq, float* partial, unsigned* arrivals, unsigned* barrier, int start, int d, \
        int heads, int kv_heads, int head_dim, int window, int splits, float scale, float eps) \
    { decode_layers<U, T>(layers, n_layers, x, q, k_new, v_new, att, gate, inv_freq, partial, arrivals, barrier, start, d, heads, kv_heads, \
        head_dim, window, splits, scale, eps); }
// Unrolls 8 and 12 (CudaLlama.PersistentDecodeUnrolls): each entry holds all of a layer's phases in registers (ptxas 11.8,
// sm_90: 217 and 249 per thread, one block of 256 per SM); at 16 it spilled. f32 and bf16 only
// (CudaLlama.PersistentDecodeShape); NVRTC compiles the file whole on first use.
#define DECODE_LAYERS(T, S) DECODE_LAYERS_U(T, S, 8) DECODE_LAYERS_U(T, S, 12)
DECODE_LAYERS(float, f32)
DECODE_LAYERS(bf16, bf16)
