// The plain GEMV kernels (gemv.cuh) for each storage type and unroll. The q/k/v and gate/up GEMVs are in gemv_fused.cu
// and the fused decode norms in gemv_norm.cu (CudaDevice.GemvFile), which NVRTC compiles side by side: all in one file
// took 24 s (NVRTC 11.8, sm_90), the longest of the three 10.
#include "gemv.cuh"

// gemv_<input>_to_<output>_u<U>: output in the input's type, or f32 (the residual stream, deltas, logits); a block per
// 8 rows. gemv_streamed_<input>_to_<output>_u<U>: the same on a grid of resident blocks (the faster chosen per shape,
// CudaDevice.StreamGemvs); gemv_fused.cu's gemv_streamed_qkv and gemv_streamed_swiglu and gemv_norm.cu's
// gemv_streamed_norm_* likewise.
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

// The by-row forms (CudaDevice.StreamGemvsByRow, timed per shape against the others): the streamed bf16 GEMVs with
// each round of loads inside one row, as before rounds ran across row ends (stream_rows_by_row).
#define GEMV_BY_ROW_U(U) \
    extern "C" __global__ void gemv_streamed_byrow_bf16_to_bf16_u##U(const bf16* x, const bf16* w, bf16* y, const int* out_index, int n, int k, float alpha, float beta) \
    { gemv_streamed<U, bf16, bf16, true>(x, w, y, out_index, n, k, alpha, beta); } \
    extern "C" __global__ void gemv_streamed_byrow_bf16_to_f32_u##U(const bf16* x, const bf16* w, float* y, const int* out_index, int n, int k, float alpha, float beta) \
    { gemv_streamed<U, bf16, float, true>(x, w, y, out_index, n, k, alpha, beta); }
GEMV_BY_ROW_U(8) GEMV_BY_ROW_U(12) GEMV_BY_ROW_U(16)
