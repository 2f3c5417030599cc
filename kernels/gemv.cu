// The GEMV kernels (gemv.cuh) for each storage type and unroll.
#include "gemv.cuh"

// The streamed forms below (not the by-row ones) keep to 128 registers up to unroll 12, so that two blocks
// of 256 fit an SM (NVRTC 11.8 and 12.4 give them 126-128 unbounded at 12, none spilled bounded); at 16 one block fits.
#define STREAMED_BLOCKS_8 2
#define STREAMED_BLOCKS_12 2
#define STREAMED_BLOCKS_16 1

// gemv_<input>_to_<output>_u<U>: output in the input's type, or f32 (the residual stream, deltas, logits); a block per
// 8 rows. gemv_streamed_<input>_to_<output>_u<U>: the same on a grid of resident blocks (the faster chosen per shape,
// CudaDevice.StreamGemvs); gemv_streamed_qkv, gemv_streamed_swiglu and the fused norms' gemv_streamed_norm_* below
// likewise.
#define GEMV_U(T, OUT, S, O, U) \
    extern "C" __global__ void gemv_##S##_to_##O##_u##U(const T* x, const T* w, OUT* y, const int* out_index, int n, int k, float alpha, float beta) \
    { gemv<U, T, OUT>(x, w, y, out_index, n, k, alpha, beta); } \
    extern "C" __global__ __launch_bounds__(GEMV_WARPS * 32, STREAMED_BLOCKS_##U) void gemv_streamed_##S##_to_##O##_u##U(const T* x, const T* w, OUT* y, const int* out_index, int n, int k, float alpha, float beta) \
    { gemv_streamed<U, T, OUT>(x, w, y, out_index, n, k, alpha, beta); }
#define GEMV(T, OUT, S, O) GEMV_U(T, OUT, S, O, 8) GEMV_U(T, OUT, S, O, 12) GEMV_U(T, OUT, S, O, 16)
GEMV(float, float, f32, f32)
GEMV(bf16, bf16, bf16, bf16)
GEMV(f16, f16, f16, f16)
GEMV(bf16, float, bf16, f32)
GEMV(f16, float, f16, f32)


#define GEMV_FUSED_U(T, S, U) \
    extern "C" __global__ void gemv_qkv_##S##_u##U(const T* x, const T* w0, T* y0, int n0, const T* w1, T* y1, int n1, const T* w2, T* y2, int n2, int k) \
    { gemv_qkv<U, T>(x, w0, y0, n0, w1, y1, n1, w2, y2, n2, k); } \
    extern "C" __global__ void gemv_swiglu_##S##_u##U(const T* x, const T* w_gate, const T* w_up, T* out, int n, int k) \
    { gemv_swiglu<U, T>(x, w_gate, w_up, out, n, k); } \
    extern "C" __global__ __launch_bounds__(GEMV_WARPS * 32, STREAMED_BLOCKS_##U) void gemv_streamed_qkv_##S##_u##U(const T* x, const T* w0, T* y0, int n0, const T* w1, T* y1, int n1, const T* w2, T* y2, int n2, int k) \
    { gemv_streamed_qkv<U, T>(RowInput<T>{x}, w0, y0, n0, w1, y1, n1, w2, y2, n2, k); } \
    extern "C" __global__ __launch_bounds__(GEMV_WARPS * 32, STREAMED_BLOCKS_##U) void gemv_streamed_swiglu_##S##_u##U(const T* x, const T* w_gate, const T* w_up, T* out, int n, int k) \
    { gemv_streamed_swiglu<U, T>(RowInput<T>{x}, w_gate, w_up, out, n, k); }
#define GEMV_FUSED(T, S) GEMV_FUSED_U(T, S, 8) GEMV_FUSED_U(T, S, 12) GEMV_FUSED_U(T, S, 16)
FOR_EACH_STORAGE(GEMV_FUSED)

// The by-row forms (CudaDevice.StreamGemvsByRow, timed per shape against the others): the streamed bf16 GEMVs with
// each round of loads inside one row, as before rounds ran across row ends (stream_rows_by_row).
#define GEMV_BY_ROW_U(U) \
    extern "C" __global__ void gemv_streamed_byrow_bf16_to_bf16_u##U(const bf16* x, const bf16* w, bf16* y, const int* out_index, int n, int k, float alpha, float beta) \
    { gemv_streamed<U, bf16, bf16, true>(x, w, y, out_index, n, k, alpha, beta); } \
    extern "C" __global__ void gemv_streamed_byrow_bf16_to_f32_u##U(const bf16* x, const bf16* w, float* y, const int* out_index, int n, int k, float alpha, float beta) \
    { gemv_streamed<U, bf16, float, true>(x, w, y, out_index, n, k, alpha, beta); } \
    extern "C" __global__ void gemv_streamed_byrow_qkv_bf16_u##U(const bf16* x, const bf16* w0, bf16* y0, int n0, const bf16* w1, bf16* y1, int n1, const bf16* w2, bf16* y2, int n2, int k) \
    { gemv_streamed_qkv<U, bf16, RowInput<bf16>, true>(RowInput<bf16>{x}, w0, y0, n0, w1, y1, n1, w2, y2, n2, k); } \
    extern "C" __global__ void gemv_streamed_byrow_swiglu_bf16_u##U(const bf16* x, const bf16* w_gate, const bf16* w_up, bf16* out, int n, int k) \
    { gemv_streamed_swiglu<U, bf16, RowInput<bf16>, true>(RowInput<bf16>{x}, w_gate, w_up, out, n, k); }
GEMV_BY_ROW_U(8) GEMV_BY_ROW_U(12) GEMV_BY_ROW_U(16)

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
