// The q/k/v GEMV (one input, three outputs) and the gate/up GEMV with SwiGLU (gemv.cuh) for each storage type and
// unroll: a block per 8 rows or streamed (gemv_streamed_*), and in bf16 the streamed ones by row.
#include "gemv.cuh"

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
#define GEMV_FUSED_BY_ROW_U(U) \
    extern "C" __global__ void gemv_streamed_byrow_qkv_bf16_u##U(const bf16* x, const bf16* w0, bf16* y0, int n0, const bf16* w1, bf16* y1, int n1, const bf16* w2, bf16* y2, int n2, int k) \
    { gemv_streamed_qkv<U, bf16, RowInput<bf16>, true>(RowInput<bf16>{x}, w0, y0, n0, w1, y1, n1, w2, y2, n2, k); } \
    extern "C" __global__ void gemv_streamed_byrow_swiglu_bf16_u##U(const bf16* x, const bf16* w_gate, const bf16* w_up, bf16* out, int n, int k) \
    { gemv_streamed_swiglu<U, bf16, RowInput<bf16>, true>(RowInput<bf16>{x}, w_gate, w_up, out, n, k); }
GEMV_FUSED_BY_ROW_U(8) GEMV_FUSED_BY_ROW_U(12) GEMV_FUSED_BY_ROW_U(16)
