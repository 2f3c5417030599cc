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

extern "C" __global__ void chain_link_step(float* slots) { chain_link(slots); }
extern "C" __global__ void grid_barrier_links(float* slots, unsigned* count, int links) { grid_barrier_chain(slots, count, links); }
