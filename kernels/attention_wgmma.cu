// Hopper (sm_90a) causal GQA prefill attention on warpgroup MMA (wgmma.mma_async), where attention_tc.cu's kernels
// use mma.sync, which on Hopper falls well short of the tensor cores' rate (only wgmma reaches it); the same contract,
// softmax and output store (attention_tc.cuh). A block is WGS warpgroups (4 warps each, 16 query rows per warp, WG_M
// rows per warpgroup; with two, both share each K/V tile: half the loads per FLOP) and streams tiles of WG_N keys:
// S = Q·Kᵀ with Q and K read by the tensor cores from shared memory, the online softmax on the accumulators (per warp
// mma.sync's layout), then O += P·V with P from registers and V from shared memory. Shared tiles use the 128-byte
// swizzle wgmma reads: rows of 64 elements (128 bytes), the 16-byte chunk c of row r stored at chunk c ^ (r % 8),
// 8-row groups 1024 bytes apart, a tile's columns 64.. in a second such block. K is K-major for Q·Kᵀ; V, with the head dimension contiguous,
// is N-major (transposed by the instruction) for P·V. K and V are double-buffered.
// Only this file is built for sm_90a (KernelCompiler.ArchitectureFor: on sm_90 with NVRTC 12+; CudaDevice.
// SupportsWgmma), so a compiler that rejected it would cost these kernels alone; for any other target it is empty.
// The CUDA emulator implements the instructions, descriptors and swizzle from the PTX ISA.
#include "attention_tc.cuh"

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_M 64   // query rows per warpgroup
#define WG_N 64   // keys per tile

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Orders this thread's generic-proxy writes to shared memory (cp.async) before the tensor cores' async-proxy reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Keeps the compiler from moving accumulator reads or writes across a wgmma issue or wait (CUTLASS's operand fence).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4])
{
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) asm volatile("" : "+f"(d[i][j]) :: "memory");
}

// A shared-memory matrix descriptor with the 128-byte swizzle: start address, leading- and stride-dimension byte
// offsets (each >> 4), swizzle mode 1 in bits 62-63.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned address, unsigned leading, unsigned stride)
{
    return (unsigned long long)((address & 0x3ffffu) >> 4) | ((unsigned long long)(leading >> 4) << 16)
        | ((unsigned long long)(stride >> 4) << 32) | (1ull << 62);
}

// d[64 × 64] += A[64 × 16] · B[16 × 64], A and B K-major in shared memory (this warp: rows 16·warp.. of d).
template <typename T> __device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b, int accumulate);
// d[64 × N] += A[64 × 16] · B[16 × N], A from registers (mma.sync's A fragment per warp), B N-major in shared memory.
template <typename T, int N> __device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long desc_b);
template <> __device__ __forceinline__ void wgmma_ss_n64<bf16>(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
template <> __device__ __forceinline__ void wgmma_rs<bf16, 64>(float (&d)[8][4], const unsigned (&a)[4], unsigned long long desc_b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<bf16, 128>(float (&d)[16][4], const unsigned (&a)[4], unsigned long long desc_b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_ss_n64<f16>(float (&d)[8][4], unsigned long long desc_a, unsigned long long desc_b, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
template <> __device__ __forceinline__ void wgmma_rs<f16, 64>(float (&d)[8][4], const unsigned (&a)[4], unsigned long long desc_b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
template <> __device__ __forceinline__ void wgmma_rs<f16, 128>(float (&d)[16][4], const unsigned (&a)[4], unsigned long long desc_b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// Rows first .. first + ROWS - 1 of one head's D columns into the swizzled layout above (ROWS a multiple of 8; blocks
// of 64 columns ROWS · 128 bytes apart), with cp.async by THREADS threads; rows past last are zero-filled without a read.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void copy_rows_swizzled(unsigned short* dst, const T* src, int first, int last, long long ld, int col)
{
    constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS)
    {
        int j = i / CHUNKS, c = i % CHUNKS, row = first + j;
        bool ok = row <= last;
        cp_async16(dst + (c >> 3) * ROWS * 64 + j * 64 + (((c & 7) ^ (j & 7)) << 3), ok ? src + row * ld + col + c * 8 : src, ok);
    }
}

template <typename T, int D, int WGS>
__device__ __forceinline__ void attention_prefill_wgmma(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, float* __restrict__ lse, int tq, int start, int heads, int kv_heads, int window, float scale)
{
    constexpr int ROWS = WGS * WG_M, THREADS = WGS * 128;
    constexpr int TILE = WG_N * D;   // elements of one K or V tile
    extern __shared__ __align__(16) unsigned short wg_shared[];
    // The swizzle is a function of the shared address: the tiles start on a 1024-byte boundary (1 KB of slack).
    unsigned short* qs = wg_shared + ((1024u - (smem_address(wg_shared) & 1023u)) & 1023u) / 2;   // [ROWS × D]
    unsigned short* ks = qs + ROWS * D;   // 2 × [WG_N × D]
    unsigned short* vs = ks + 2 * TILE;   // 2 × [WG_N × D]
    unsigned k_addr = smem_address(ks), v_addr = smem_address(vs);

    int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2;
    int h = blockIdx.y, kvh = h / (heads / kv_heads);
    int q_dim = heads * D, kv_dim = kv_heads * D;
    int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS;   // the longest causal rows start first
    int wg_row = q0 + wg * WG_M, warp_row = wg_row + warp * 16;
    int pos_g = start + warp_row + g;                 // this thread's rows g and g + 8
    unsigned span = window > 0 ? (unsigned)window : 0x7fffffffu;
    int block_last = start + min(tq, q0 + ROWS) - 1;
    int block_first = window > 0 ? max(0, start + q0 - window + 1) : 0;
    // The keys this warpgroup's rows see (uniform across it, as its wgmma must be): tiles outside are skipped.
    int wg_last = start + min(tq - 1, wg_row + WG_M - 1);
    int wg_first = window > 0 ? max(0, start + wg_row - window + 1) : 0;
    unsigned q_addr = smem_address(qs) + wg * WG_M * 128;   // this warpgroup's rows: 8-row groups 1024 bytes apart

    auto load_tiles = [&](int stage, int tile)
    {
        copy_rows_swizzled<T, D, WG_N, THREADS>(ks + stage * TILE, kc, tile, block_last, kv_dim, kvh * D);
        copy_rows_swizzled<T, D, WG_N, THREADS>(vs + stage * TILE, vc, tile, block_last, kv_dim, kvh * D);
        cp_async_commit();
    };
    // Q rows past tq are zeros; they go in the first tiles' cp.async group.
    copy_rows_swizzled<T, D, ROWS, THREADS>(qs, q, q0, tq - 1, q_dim, h * D);
    int tile_begin = block_first - block_first % WG_N;
    load_tiles(0, tile_begin);

    float o[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const float scale_log2 = scale * 1.4426950408889634f;

    for (int tile = tile_begin, stage = 0; tile <= block_last; tile += WG_N, stage ^= 1)
    {
        cp_async_wait_all();   // this thread's copies of the tile (and Q) have landed
        fence_proxy_async();
        __syncthreads();       // every thread's copies are in and every warp is done with the other stage
        if (tile + WG_N <= block_last) load_tiles(stage ^ 1, tile + WG_N);
        if (tile > wg_last || tile + WG_N - 1 < wg_first) continue;

        float s[WG_N / 8][4];   // written by the first k-step (accumulate 0)
        wgmma_fence();
        unsigned k_stage = k_addr + stage * TILE * 2;
#pragma unroll
        for (int k = 0; k < D / 16; k++)   // k-step k: columns 16k.. = block k / 4, bytes 32 (k % 4) into its rows
            wgmma_ss_n64<T>(s, wgmma_desc(q_addr + (k >> 2) * ROWS * 128 + (k & 3) * 32, 16, 1024),
                wgmma_desc(k_stage + (k >> 2) * WG_N * 128 + (k & 3) * 32, 16, 1024), k > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_operands(s);
        fence_operands(o);

        // Every key of the tile visible to every row of the warp: no masking.
        bool interior = tile + WG_N - 1 <= start + warp_row && (window <= 0 || start + warp_row + 15 - tile < window);
        if (!interior) mask_scores<WG_N>(s, pos_g - tile, span);
        unsigned pf[WG_N / 16][4];
        softmax_tile<T, WG_N, D, true>(s, m, l, o, pf, scale_log2);

        fence_operands(o);
        wgmma_fence();
        unsigned v_stage = v_addr + stage * TILE * 2;
#pragma unroll
        for (int k = 0; k < WG_N / 16; k++)   // keys 16k..16k + 15: rows 16k.. of every 64-column block
            wgmma_rs<T, D>(o, pf[k], wgmma_desc(v_stage + k * 16 * 128, WG_N * 128, 1024));
        wgmma_commit();
        // Waited for here, not at the next tile's top: with P·V in flight across the loop's back edge, ptxas
        // serializes every wgmma of the kernel (its C7515 "Potential Performance Loss"). The SM's other warpgroups
        // keep the tensor cores busy meanwhile.
        wgmma_wait_all();
        fence_operands(o);
    }
    store_rows<T, D>(o, m, l, warp_row + g, tq, h, q_dim, out, lse);
}

// attention_prefill_wgmma: one warpgroup per block (CudaOps: PrefillKernel.Wgmma); _2wg: two (PrefillKernel.Wgmma2Warpgroups).
#define ATTENTION_WGMMA(T, S, D) \
    extern "C" __global__ __launch_bounds__(128) void attention_prefill_wgmma##D##_##S(const T* q, const T* kc, const T* vc, T* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale) \
    { attention_prefill_wgmma<T, D, 1>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); } \
    extern "C" __global__ __launch_bounds__(256) void attention_prefill_wgmma_2wg##D##_##S(const T* q, const T* kc, const T* vc, T* out, float* lse, int tq, int start, int heads, int kv_heads, int window, float scale) \
    { attention_prefill_wgmma<T, D, 2>(q, kc, vc, out, lse, tq, start, heads, kv_heads, window, scale); }
ATTENTION_WGMMA(bf16, bf16, 64) ATTENTION_WGMMA(bf16, bf16, 128)
ATTENTION_WGMMA(f16, f16, 64) ATTENTION_WGMMA(f16, f16, 128)
#endif
