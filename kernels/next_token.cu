// Greedy decoding on the device (CudaLlama.DecodeGreedy): the step's next token is the argmax of its logits, the
// lowest id among equal maxima (Generator.ArgMax's choice), chosen by one block at the end of the step. It goes where
// the next step's embedding reads its token, the device-held position advances by one, and produced[position] (pinned
// host memory the device writes directly) tells the host: the token, or -1 where a logit is not finite (the next step
// then reads token 0, a valid id, and the host stops at the -1).
#include "common.cuh"

#define NEXT_TOKEN_THREADS 1024
#define NEXT_TOKEN_UNROLL 8

// (value, id) pairs: the larger value, the lower id on a tie.
__device__ __forceinline__ void keep_best(float& best, int& id, float v, int i)
{
    if (v > best || (v == best && i < id)) { best = v; id = i; }
}

extern "C" __global__ __launch_bounds__(NEXT_TOKEN_THREADS) void greedy_next_token(const float* logits, int vocab, int* token,
    int* position, int* produced)
{
    __shared__ float best_of[NEXT_TOKEN_THREADS / 32];
    __shared__ int id_of[NEXT_TOKEN_THREADS / 32];
    __shared__ int finite_of[NEXT_TOKEN_THREADS / 32];
    allow_dependents_launch();
    grid_dependency_wait();
    const float* l = opaque(logits);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float best = NEG_INF;
    int id = vocab;   // none yet: loses every tie
    bool finite = true;
    auto take = [&](float v, int i)
    {
        finite &= (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
        keep_best(best, id, v, i);
    };
    // 16-byte loads (logits is a whole buffer: 16-byte aligned) in rounds of NEXT_TOKEN_UNROLL per thread, issued
    // before any is used (a vocabulary of up to 32K in one round; addresses clamped into the row, values past its end
    // ignored: predicated loads would go one at a time); then the tail of vocab % 4.
    int n4 = vocab / 4;
    const float4* l4 = reinterpret_cast<const float4*>(l);
    for (int base = threadIdx.x; base < n4; base += NEXT_TOKEN_UNROLL * blockDim.x)
    {
        float4 v[NEXT_TOKEN_UNROLL];
#pragma unroll
        for (int u = 0; u < NEXT_TOKEN_UNROLL; u++) v[u] = l4[min(base + u * (int)blockDim.x, n4 - 1)];
#pragma unroll
        for (int u = 0; u < NEXT_TOKEN_UNROLL; u++)
        {
            int j = base + u * blockDim.x;
            if (j < n4) { take(v[u].x, 4 * j); take(v[u].y, 4 * j + 1); take(v[u].z, 4 * j + 2); take(v[u].w, 4 * j + 3); }
        }
    }
    for (int i = 4 * n4 + threadIdx.x; i < vocab; i += blockDim.x) take(l[i], i);
    for (int o = 16; o > 0; o >>= 1)
        keep_best(best, id, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, id, o));
    finite = __all_sync(0xffffffffu, finite);
    if (lane == 0) { best_of[warp] = best; id_of[warp] = id; finite_of[warp] = finite; }
    __syncthreads();
    if (warp != 0) return;
    best = lane < warps ? best_of[lane] : NEG_INF;
    id = lane < warps ? id_of[lane] : vocab;
    finite = __all_sync(0xffffffffu, lane < warps ? finite_of[lane] : 1);
    for (int o = 16; o > 0; o >>= 1)
        keep_best(best, id, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, id, o));
    if (lane != 0) return;
    int* pos = opaque(position);
    int p = *pos;
    bool ok = finite && id < vocab;
    *opaque(token) = ok ? id : 0;
    *pos = p + 1;
    produced[p] = ok ? id : -1;
    __threadfence_system();
}
