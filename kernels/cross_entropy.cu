// Softmax cross-entropy fused with the log-sum-exp over the vocabulary. One block per row of f32 logits.
//   loss[r] = logsumexp(logits[r]) - logits[r, target[r]]; target < 0 means "ignore" (loss 0, gradient 0).
//   When dlogits != nullptr: dlogits[r] = (softmax(logits[r]) - onehot(target[r])) * grad_scale.
#include "common.cuh"

extern "C" __global__ void cross_entropy_f32(const float* __restrict__ logits, const int* __restrict__ targets,
    float* __restrict__ loss, float* __restrict__ dlogits, int vocab, float grad_scale)
{
    const float* row = logits + (long long)blockIdx.x * vocab;
    int target = targets[blockIdx.x];
    float m = NEG_INF, s = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
    {
        float v = row[i];
        if (v > m) { s = s * expf(m - v) + 1.f; m = v; }
        else s += expf(v - m);
    }
    float gm = block_max(m);
    float gs = block_sum(m == NEG_INF ? 0.f : s * expf(m - gm));
    float lse = gm + logf(gs);
    if (threadIdx.x == 0) loss[blockIdx.x] = target < 0 ? 0.f : lse - row[target];
    if (!dlogits) return;
    float* drow = dlogits + (long long)blockIdx.x * vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        drow[i] = target < 0 ? 0.f : (expf(row[i] - lse) - (i == target ? 1.f : 0.f)) * grad_scale;
}
