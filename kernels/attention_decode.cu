// The decode attention kernels (attention_decode.cuh).
#include "attention_decode.cuh"

// The split kernel at most 128 registers a thread (4 blocks' worth per SM): its blocks start while the GEMV before them
// still runs, on the registers that GEMV leaves (ptxas 12.4: 125-127 without spills, about 150 unbounded).
// attention_decode_split8: blocks of 8 warps, twice the keys per round (128 at head_dim 128 in bf16), so a context up
// to that length needs no merge (CudaDevice.DecodeAttentionWarps). attention_decode_split_rescaleN: 4 warps rescaling
// once per N keys of a round instead of RESCALE_KEYS (8: once a round; 1: every key, with the shares merged in loops
// and the own key's RoPE angles computed again: the kernel the H200 timed on 2026-12-04), timed against it by
// KernelBench (CudaDevice.DecodeAttentionRescaleKeys).
#define ATTENTION_DECODE_RESCALE(T, S, N) \
    extern "C" __global__ __launch_bounds__(DECODE_WARPS * 32, 4) void attention_decode_split_rescale##N##_##S(const T* q, const T* kc, const T* vc, T* out, \
        float* partial, unsigned* arrivals, const T* k_new, const T* v_new, const float* inv_freq, T* k_append, T* v_append, int start, \
        const int* position, int heads, int kv_heads, int head_dim, int window, float scale) \
    { attention_decode_split<T, DECODE_WARPS, N, N == 1 ? 0 : MERGE_IN_REGISTERS, N != 1>(q, kc, vc, out, partial, arrivals, k_new, v_new, inv_freq, k_append, v_append, start, position, \
        heads, kv_heads, head_dim, window, scale); }
#define ATTENTION_DECODE(T, S) \
    ATTENTION_DECODE_RESCALE(T, S, 1) \
    ATTENTION_DECODE_RESCALE(T, S, 8) \
    extern "C" __global__ __launch_bounds__(DECODE_WARPS * 32, 4) void attention_decode_split_##S(const T* q, const T* kc, const T* vc, T* out, float* partial, unsigned* arrivals, \
        const T* k_new, const T* v_new, const float* inv_freq, T* k_append, T* v_append, int start, const int* position, int heads, \
        int kv_heads, int head_dim, int window, float scale) \
    { attention_decode_split<T, DECODE_WARPS>(q, kc, vc, out, partial, arrivals, k_new, v_new, inv_freq, k_append, v_append, start, position, heads, \
        kv_heads, head_dim, window, scale); } \
    extern "C" __global__ __launch_bounds__(2 * DECODE_WARPS * 32, 2) void attention_decode_split8_##S(const T* q, const T* kc, const T* vc, T* out, float* partial, unsigned* arrivals, \
        const T* k_new, const T* v_new, const float* inv_freq, T* k_append, T* v_append, int start, const int* position, int heads, \
        int kv_heads, int head_dim, int window, float scale) \
    { attention_decode_split<T, 2 * DECODE_WARPS>(q, kc, vc, out, partial, arrivals, k_new, v_new, inv_freq, k_append, v_append, start, position, heads, \
        kv_heads, head_dim, window, scale); } \
    extern "C" __global__ void attention_decode_combine_##S(const float* partial, T* out, int splits, int head_dim) \
    { attention_decode_combine<T>(partial, out, splits, head_dim); } \
    extern "C" __global__ void attention_decode_naive_##S(const T* q, const T* kc, const T* vc, T* out, int start, const int* position, int heads, int kv_heads, int head_dim, int window, float scale) \
    { attention_decode_naive<T>(q, kc, vc, out, start, position, heads, kv_heads, head_dim, window, scale); }
FOR_EACH_STORAGE(ATTENTION_DECODE)
