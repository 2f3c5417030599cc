// KernelBench's price of a dependency between steps of a decode: the same chain of dependent links run as one kernel
// per link (in a CUDA graph, in stream order or launched programmatically) or as one persistent kernel with a
// grid-wide barrier between links. A link is one increment per block of a slot that an earlier link wrote, so the
// chain's result (every slot counted once per link) shows whether each dependency was honoured.
#include "common.cuh"

// One link as a kernel: block b's slot, written by the previous link, plus one.
__device__ void chain_link(float* slots)
{
    allow_dependents_launch();
    grid_dependency_wait();
    float* s = opaque(slots);
    if (threadIdx.x == 0) s[blockIdx.x] += 1.f;
}

// `links` links in one launch: at link i block b increments slot (b + i) mod gridDim.x, a slot another block
// incremented at the link before, so a missing barrier loses increments. *count starts at zero. A block whose
// barrier gave up writes NaN into its own slot and leaves.
__device__ void grid_barrier_chain(float* slots, unsigned* count, int links)
{
    for (int i = 0; i < links; i++)
    {
        int j = (blockIdx.x + i) % gridDim.x;
        if (threadIdx.x == 0) slots[j] = __ldcg(slots + j) + 1.f;   // through L2: another SM wrote it
        if (!grid_barrier(count, (unsigned)(i + 1) * gridDim.x))
        {
            if (threadIdx.x == 0) slots[blockIdx.x] = __int_as_float(0x7fc00000);
            return;
        }
    }
}

#define CHAIN_LOADS 8

// The same chain with loads across each barrier, as the persistent decode kernel has: every thread loads CHAIN_LOADS
// 16-byte words of src (a new stretch each link, wrapping at `words`, like a phase's first weight rows) and uses them
// after the barrier. split 0: issued before the block arrives (a barrier in one piece, whose arriving thread's fence
// waits for its own loads to land); 1: between the arrival and the wait (grid_arrive, grid_wait).
__device__ void grid_barrier_chain_loading(float* slots, unsigned* count, int links, const uint4* __restrict__ src, long long words, int split)
{
    long long threads = (long long)gridDim.x * blockDim.x, me = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned sum = 0;
    for (int i = 0; i < links; i++)
    {
        int j = (blockIdx.x + i) % gridDim.x;
        if (threadIdx.x == 0) slots[j] = __ldcg(slots + j) + 1.f;
        unsigned target = (unsigned)(i + 1) * gridDim.x;
        if (split) grid_arrive(count);
        uint4 v[CHAIN_LOADS];
#pragma unroll
        for (int u = 0; u < CHAIN_LOADS; u++) v[u] = src[((long long)i * CHAIN_LOADS * threads + u * threads + me) % words];
        bool arrived = split ? grid_wait(count, target) : grid_barrier(count, target);
#pragma unroll
        for (int u = 0; u < CHAIN_LOADS; u++) sum += v[u].x ^ v[u].w;
        if (!arrived)
        {
            if (threadIdx.x == 0) slots[blockIdx.x] = __int_as_float(0x7fc00000);
            return;
        }
    }
    if (sum == 0x9e3779b9u) slots[blockIdx.x] = -1.f;   // keeps the loads; the check would show it (never with the bench's buffer)
}

extern "C" __global__ void chain_link_step(float* slots) { chain_link(slots); }
extern "C" __global__ void grid_barrier_links(float* slots, unsigned* count, int links) { grid_barrier_chain(slots, count, links); }
extern "C" __global__ void grid_barrier_links_loading(float* slots, unsigned* count, int links, const uint4* src, long long words, int split)
{ grid_barrier_chain_loading(slots, count, links, src, words, split); }
