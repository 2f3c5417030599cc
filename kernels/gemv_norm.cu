// Decode's gather-RMSNorm fused into the q/k/v and gate/up GEMVs that read it (gemv.cuh's DecodeNorm), for each
// storage type and unroll: warps looping over rows (gemv_norm_*) or streaming them (gemv_streamed_norm_*).
#include "gemv.cuh"

#define GEMV_NORM_U(T, S, U) \
    extern "C" __global__ void gemv_norm_qkv_##S##_u##U(const float* x, const T* gamma, const int* idx, int d, int width, int norm_threads, \
        float eps, const T* w0, T* y0, int n0, const T* w1, T* y1, int n1, const T* w2, T* y2, int n2, int k) \
    { gemv_norm_qkv<U, T>(DecodeNorm<T>{x, gamma, idx, d, width, norm_threads, eps}, w0, y0, n0, w1, y1, n1, w2, y2, n2, k); } \
    extern "C" __global__ void gemv_norm_swiglu_##S##_u##U(const float* x, const T* gamma, const int* idx, int d, int width, int norm_threads, \
        float eps, const T* w_gate, const T* w_up, T* out, int n, int k) \
    { gemv_norm_swiglu<U, T>(DecodeNorm<T>{x, gamma, idx, d, width, norm_threads, eps}, w_gate, w_up, out, n, k); } \
    extern "C" __global__ __launch_bounds__(GEMV_WARPS * 32, STREAMED_BLOCKS_##U) void gemv_streamed_norm_qkv_##S##_u##U(const float* x, const T* gamma, const int* idx, int d, int width, \
        int norm_threads, float eps, const T* w0, T* y0, int n0, const T* w1, T* y1, int n1, const T* w2, T* y2, int n2, int k) \
    { gemv_streamed_qkv<U, T>(NormalizedInput<T>{{x, gamma, idx, d, width, norm_threads, eps}, k}, w0, y0, n0, w1, y1, n1, w2, y2, n2, k); } \
    extern "C" __global__ __launch_bounds__(GEMV_WARPS * 32, STREAMED_BLOCKS_##U) void gemv_streamed_norm_swiglu_##S##_u##U(const float* x, const T* gamma, const int* idx, int d, int width, \
        int norm_threads, float eps, const T* w_gate, const T* w_up, T* out, int n, int k) \
    { gemv_streamed_swiglu<U, T>(NormalizedInput<T>{{x, gamma, idx, d, width, norm_threads, eps}, k}, w_gate, w_up, out, n, k); }
#define GEMV_NORM(T, S) GEMV_NORM_U(T, S, 8) GEMV_NORM_U(T, S, 12) GEMV_NORM_U(T, S, 16)
FOR_EACH_STORAGE(GEMV_NORM)
