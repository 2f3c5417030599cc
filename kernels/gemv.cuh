// Batch-1 linear layers for decode, one warp per output row: the warp streams the weight row with 16-byte loads,
// U loads in flight per lane, and reduces with shuffles; x (a single row, at most tens of KB) stays in L1/L2.
// Every kernel comes in U = 8, 12 and 16 (entry NAME_uU; defined in gemv.cu, gemv_fused.cu and gemv_norm.cu): a deeper unroll keeps more loads in flight per lane (a
// pruned K of 2656 bf16 is 332 loads: 2 rounds at U 8, one at 12) but holds more registers, so fewer warps fit on an
// SM (ptxas 11.8, bf16 gemv: 126 registers at U 8, two blocks of 256 per SM; 167 at 12 and 248 at 16, one). The host
// times them per shape (CudaDevice.LaunchGemv); each lane sums its loads in the same order whatever U is, so the
// variants give bit-identical results.
// Needs k a multiple of 16 / sizeof(T) and 16-byte aligned x and w (the caller checks; cuBLASLt takes the rest).
// Grid ceil(rows / warps per block); the streamed forms of the plain, q/k/v and gate/up GEMVs (gemv_streamed*, chosen
// per shape against these by timing) a grid of resident blocks instead (the fused decode norms', below: their own grid).
// Besides the plain GEMV, the decode step's fusions:
//   gemv (out_index set): y[out_index[row]] += dot - the pruned o_proj/down GEMM and DISP's index-add in one pass;
//   gemv_qkv: the q, k and v projections of one input in one launch;
//   gemv_swiglu: out[row] = silu(x.w_gate[row]) * (x.w_up[row]) - gate, up and the activation in one pass.
#pragma once
#include "common.cuh"

#define GEMV_WARPS 8   // warps (rows) per block, as the host launches them (CudaDevice.GemvWarps)

// The streamed entry points (gemv_streamed_*, not the by-row ones) keep to 128 registers up to unroll 12, so that two
// blocks of 256 fit an SM (NVRTC 11.8 and 12.4 give them 126-128 unbounded at 12, none spilled bounded); at 16 one fits.
#define STREAMED_BLOCKS_8 2
#define STREAMED_BLOCKS_12 2
#define STREAMED_BLOCKS_16 1

template <typename T>
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b)
{
    constexpr int N = 16 / sizeof(T);
    float fa[N], fb[N], s = 0.f;
    unpack16<T>(a, fa);
    unpack16<T>(b, fb);
#pragma unroll
    for (int e = 0; e < N; e++) s += fa[e] * fb[e];
    return s;
}

// A lane's first U 16-byte loads of a weight row (zero past the row's end). Issued before grid_dependency_wait():
// under a programmatic launch they stream while the previous kernel (which produces x) finishes. Through L2 only
// (ld.global.cg; a weight is read once per step): where w was const __restrict__ (gemv_swiglu), plain loads became
// non-coherent ones, which ptxas 11.8 moved after the wait and issued one at a time, each waiting for the one before.
template <int U, typename T>
__device__ __forceinline__ void load_first(const T* __restrict__ w, int k, uint4* a)
{
    int lane = threadIdx.x & 31, nv = k / (int)(16 / sizeof(T));
    const uint4* wr = reinterpret_cast<const uint4*>(w);
#pragma unroll
    for (int u = 0; u < U; u++)
    {
        int e = lane + u * 32;
        a[u] = e < nv ? __ldcg(wr + e) : make_uint4(0, 0, 0, 0);
    }
}

// A lane's U 16-byte loads of round `base` of a weight row of nv vectors: unconditional (addresses clamped into the
// row), the values past its end zeroed after the load.
template <int U>
__device__ __forceinline__ void load_round(const uint4* wr, int nv, int base, uint4* a)
{
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < U; u++)
    {
        int e = base + lane + u * 32;
        uint4 v = __ldcg(wr + min(e, nv - 1));
        a[u] = e < nv ? v : make_uint4(0, 0, 0, 0);
    }
}

// x . w for one weight row of k elements, summed over the warp (every lane gets it); first holds the lane's first
// U loads of w (load_first). x is not __restrict__: a persistent kernel's x was written earlier in the same launch, which
// the non-coherent loads a const __restrict__ pointer may be compiled to would not see.
// A row longer than one round of U loads per lane (a down projection's K of 11008 or 7160) is software-pipelined: the
// next round's weight loads are issued before this round is summed, so U loads stay in flight to the row's end. (The
// plain loop - load a round, sum it - ptxas 11.8 compiled to one load in flight per lane, each waiting for the last.)
// The next round's loads are unconditional (addresses clamped into the row, values past its end zeroed after the
// load): predicated loads in a loop were among what ptxas issued one at a time.
template <int U, typename T>
__device__ __forceinline__ float warp_dot(const T* x, const T* __restrict__ w, int k, const uint4* first)
{
    int lane = threadIdx.x & 31;
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    int nv = k / (int)(16 / sizeof(T));
    float acc = 0.f;
    uint4 cur[U];
#pragma unroll
    for (int u = 0; u < U; u++) cur[u] = first[u];
    for (int base = 0; base < nv; base += U * 32)   // the same rounds for the whole warp
    {
        bool more = base + U * 32 < nv;
        uint4 next[U];
        if (more) load_round<U>(wr, nv, base + U * 32, next);
#pragma unroll
        for (int u = 0; u < U; u++)
        {
            int e = base + lane + u * 32;
            acc += dot16<T>(cur[u], e < nv ? xv[e] : make_uint4(0, 0, 0, 0));
        }
        if (more)
        {
#pragma unroll
            for (int u = 0; u < U; u++) cur[u] = next[u];
        }
    }
    return warp_sum(acc);
}

__device__ __forceinline__ int gemv_row() { return blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); }

// y[o] = alpha * x . w[row] + beta * y[o], o = out_index ? out_index[row] : row; w row-major [n, k]. A warp takes rows
// gemv_row(), then every gridDim.x * warps-per-block rows on (one row in the GEMV's own grid; several on a persistent
// kernel's, where sync is a grid barrier: every warp takes part, rows or not).
template <int U, typename T, typename OUT, typename Sync = DependencySync>
__device__ void gemv(const T* x, const T* __restrict__ w, OUT* __restrict__ y, const int* __restrict__ out_index,
    int n, int k, float alpha, float beta, Sync sync = {})
{
    allow_dependents_launch();
    int first_row = gemv_row(), step = gridDim.x * (blockDim.x >> 5);
    sync.arrive();
    uint4 first[U];
    if (first_row < n) load_first<U>(w + (long long)first_row * k, k, first);
    sync.wait();
    x = opaque(x);
    y = opaque(y);   // with beta set, y[o] is read: the residual the previous kernel wrote
    for (int row = first_row; row < n; row += step)
    {
        if (row != first_row) load_first<U>(w + (long long)row * k, k, first);
        float acc = warp_dot<U>(x, w + (long long)row * k, k, first);
        if ((threadIdx.x & 31) == 0)
        {
            int o = out_index ? out_index[row] : row;
            float v = alpha * acc;
            if (beta != 0.f) v += beta * to_f32(y[o]);
            y[o] = from_f32<OUT>(v);
        }
    }
}

// The GEMVs as one stream of loads per warp (gemv_streamed*, on a grid of resident blocks): a warp takes outputs
// gemv_row(), + step, ..., each of `per` weight rows (1; 2 for gate and up), and reads them as one sequence of steps of
// 32 vectors (16 bytes each, one per lane; a row of nv vectors is ceil(nv / 32) steps, its last one partial). A round
// is U steps, wherever rows begin and end in it (a pruned row of 2688 bf16 is 11 steps: at U 16 a round holds the rest
// of one row and the start of the next, where a round per row would leave 5 of 16 loads per lane idle), and each
// round's loads are issued before the round before is summed, so U loads per lane stay in flight from the warp's first
// row to its last (the kernels above issue a row's first loads only after the row before is summed, and a block per 8
// rows waits for its slowest warp). Row j of output i starts at row(i, j); done(i, j, dot) gets each row's dot in every
// lane. Once the first round is issued, every thread runs input.before_wait(), the grid-dependency wait, then
// input.after_wait(), which returns x (k elements). Step t of a row holds vectors 32t + lane, and each lane sums them
// in step order, as warp_dot does: the outputs are the other kernels' bit for bit.

// A position in a warp's stream: output i, its row j, step t of that row, which starts at p.
struct StreamPos { int i, j, t; const uint4* p; };

// The next step's i, j and t from s (rows of `steps` steps, `per` rows an output, outputs `step` apart); whether a row
// begins there.
__device__ __forceinline__ bool next_index(StreamPos& s, int steps, int per, int step)
{
    if (++s.t < steps) return false;
    s.t = 0;
    if (++s.j == per) { s.j = 0; s.i += step; }
    return true;
}

// The next step of the stream from s, p included. Past the last output p stays on the last row, so a round's loads stay
// in bounds (their values unused).
template <typename Row>
__device__ __forceinline__ void next_step(StreamPos& s, int steps, int per, int step, int outputs, Row row)
{
    if (next_index(s, steps, per, step) && s.i < outputs) s.p = row(s.i, s.j);
}

// The U steps of a round from s into a: unconditional loads (addresses past a row's end clamped into it, their products
// dropped when summed: zeroing the values here would wait for the loads). Returns the position after the round.
template <int U, typename Row>
__device__ __forceinline__ StreamPos load_steps(StreamPos s, int nv, int steps, int per, int step, int outputs, Row row, uint4* a)
{
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < U; u++)
    {
        a[u] = __ldcg(s.p + min(s.t * 32 + lane, nv - 1));
        next_step(s, steps, per, step, outputs, row);
    }
    return s;
}

template <int U, typename T, typename Input, typename Row, typename Done>
__device__ __forceinline__ void stream_rows(Input input, int outputs, int per, int k, Row row, Done done)
{
    allow_dependents_launch();
    int lane = threadIdx.x & 31, step = gridDim.x * (blockDim.x >> 5);
    int nv = k / (int)(16 / sizeof(T)), steps = (nv + 31) / 32;
    StreamPos pos{gemv_row(), 0, 0, nullptr}, after = pos;   // the current round's first step; the next round's
    uint4 cur[U];
    if (pos.i < outputs)
    {
        pos.p = row(pos.i, 0);
        after = load_steps<U>(pos, nv, steps, per, step, outputs, row, cur);
    }
    input.before_wait();
    grid_dependency_wait();
    const uint4* xv = reinterpret_cast<const uint4*>(input.after_wait());
    float acc = 0.f;
    while (pos.i < outputs)
    {
        uint4 next[U];
        StreamPos later = after;
        if (after.i < outputs) later = load_steps<U>(after, nv, steps, per, step, outputs, row, next);
#pragma unroll
        for (int u = 0; u < U; u++)
        {
            // Past the row's end a zero is added for the clamped load, as warp_dot does; the zeros warp_dot adds for a
            // round's idle loads change nothing (acc, begun at +0, is never -0). (Choosing between cur[u] and a zero
            // vector instead, ptxas 11.8 kept cur in local memory, each load waited for.)
            int e = pos.t * 32 + lane;
            float d = dot16<T>(cur[u], xv[min(e, nv - 1)]);
            acc += e < nv ? d : 0.f;
            if (pos.t == steps - 1)   // the row is summed (uniform over the warp)
            {
                if (pos.i < outputs) done(pos.i, pos.j, warp_sum(acc));
                acc = 0.f;
            }
            next_index(pos, steps, per, step);   // pos.p is not needed here: pos moves to after below
        }
#pragma unroll
        for (int u = 0; u < U; u++) cur[u] = next[u];
        pos = after;
        after = later;
    }
}

// The by-row form (CudaDevice.StreamGemvsByRow, timed per shape): stream_rows as it was before rounds ran across row
// ends, each round of U loads per lane inside one row (a row of 11 steps at U 16 leaves 5 loads per lane of its round
// idle). The same bits.
template <int U, typename T, typename Input, typename Row, typename Done>
__device__ __forceinline__ void stream_rows_by_row(Input input, int outputs, int per, int k, Row row, Done done)
{
    allow_dependents_launch();
    int lane = threadIdx.x & 31, i = gemv_row(), step = gridDim.x * (blockDim.x >> 5), j = 0;
    int nv = k / (int)(16 / sizeof(T));
    uint4 cur[U];
    if (i < outputs) load_round<U>(row(i, 0), nv, 0, cur);
    input.before_wait();
    grid_dependency_wait();
    const uint4* xv = reinterpret_cast<const uint4*>(input.after_wait());
    float acc = 0.f;
    for (int base = 0; i < outputs;)
    {
        int next_base = base + U * 32, next_i = i, next_j = j;
        if (next_base >= nv)
        {
            next_base = 0;
            if (++next_j == per) { next_j = 0; next_i += step; }
        }
        uint4 next[U];
        if (next_i < outputs) load_round<U>(row(next_i, next_j), nv, next_base, next);
#pragma unroll
        for (int u = 0; u < U; u++)
        {
            int e = base + lane + u * 32;
            acc += dot16<T>(cur[u], e < nv ? xv[e] : make_uint4(0, 0, 0, 0));
        }
        if (next_base == 0)   // the row is summed
        {
            done(i, j, warp_sum(acc));
            acc = 0.f;
        }
#pragma unroll
        for (int u = 0; u < U; u++) cur[u] = next[u];
        i = next_i;
        j = next_j;
        base = next_base;
    }
}

// stream_rows, or with BY_ROW stream_rows_by_row.
template <int U, typename T, bool BY_ROW, typename Input, typename Row, typename Done>
__device__ __forceinline__ void stream(Input input, int outputs, int per, int k, Row row, Done done)
{
    if constexpr (BY_ROW) stream_rows_by_row<U, T>(input, outputs, per, k, row, done);
    else stream_rows<U, T>(input, outputs, per, k, row, done);
}

// stream_rows' input for a GEMV of x, the previous kernel's output.
template <typename T>
struct RowInput
{
    const T* x;
    __device__ __forceinline__ void before_wait() const {}
    __device__ __forceinline__ const T* after_wait() const { return opaque(x); }
};

// gemv, streamed (BY_ROW: the by-row form, stream_rows_by_row).
template <int U, typename T, typename OUT, bool BY_ROW = false>
__device__ void gemv_streamed(const T* x, const T* __restrict__ w, OUT* __restrict__ y, const int* __restrict__ out_index,
    int n, int k, float alpha, float beta)
{
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    long long nv = k / (int)(16 / sizeof(T));
    stream<U, T, BY_ROW>(RowInput<T>{x}, n, 1, k, [&](int i, int) { return wr + i * nv; }, [&](int i, int, float dot)
    {
        if ((threadIdx.x & 31) != 0) return;
        OUT* yo = opaque(y);   // with beta set, y[o] is read: the residual the previous kernel wrote
        int o = out_index ? out_index[i] : i;
        float v = alpha * dot;
        if (beta != 0.f) v += beta * to_f32(yo[o]);
        yo[o] = from_f32<OUT>(v);
    });
}

// Rows [0, n0) of the output are x . w0 into y0, the next n1 x . w1 into y1, the last n2 x . w2 into y2.
template <int U, typename T>
__device__ void gemv_qkv(const T* __restrict__ x, const T* __restrict__ w0, T* __restrict__ y0, int n0,
    const T* __restrict__ w1, T* __restrict__ y1, int n1, const T* __restrict__ w2, T* __restrict__ y2, int n2, int k)
{
    allow_dependents_launch();
    int row = gemv_row();
    const T* w = w0; T* y = y0;
    if (row >= n0) { row -= n0; w = w1; y = y1; if (row >= n1) { row -= n1; w = w2; y = y2; if (row >= n2) return; } }
    uint4 first[U];
    load_first<U>(w + (long long)row * k, k, first);
    grid_dependency_wait();
    x = opaque(x);
    float acc = warp_dot<U>(x, w + (long long)row * k, k, first);
    if ((threadIdx.x & 31) == 0) y[row] = from_f32<T>(acc);
}

// The gate row's first loads go before the wait; the up row's after the gate's dot (both at once would double the
// registers the first loads hold).
template <int U, typename T>
__device__ void gemv_swiglu(const T* __restrict__ x, const T* __restrict__ w_gate, const T* __restrict__ w_up, T* __restrict__ out,
    int n, int k)
{
    allow_dependents_launch();
    int row = gemv_row();
    if (row >= n) return;
    uint4 first[U];
    load_first<U>(w_gate + (long long)row * k, k, first);
    grid_dependency_wait();
    x = opaque(x);
    float g = warp_dot<U>(x, w_gate + (long long)row * k, k, first);
    load_first<U>(w_up + (long long)row * k, k, first);
    float u = warp_dot<U>(x, w_up + (long long)row * k, k, first);
    if ((threadIdx.x & 31) == 0) out[row] = from_f32<T>(SiluMulOp()(g, u));
}

// gemv_qkv, streamed. input: stream_rows' - RowInput<T>{x}, or NormalizedInput (gemv_streamed_norm_qkv).
template <int U, typename T, typename Input, bool BY_ROW = false>
__device__ void gemv_streamed_qkv(Input input, const T* __restrict__ w0, T* __restrict__ y0, int n0,
    const T* __restrict__ w1, T* __restrict__ y1, int n1, const T* __restrict__ w2, T* __restrict__ y2, int n2, int k)
{
    stream<U, T, BY_ROW>(input, n0 + n1 + n2, 1, k, [&](int i, int)
    {
        const T* w = i < n0 ? w0 + (long long)i * k : i < n0 + n1 ? w1 + (long long)(i - n0) * k : w2 + (long long)(i - n0 - n1) * k;
        return reinterpret_cast<const uint4*>(w);
    }, [&](int i, int, float dot)
    {
        if ((threadIdx.x & 31) != 0) return;
        T* y = i < n0 ? y0 + i : i < n0 + n1 ? y1 + (i - n0) : y2 + (i - n0 - n1);
        *y = from_f32<T>(dot);
    });
}

// gemv_swiglu, streamed: the gate row, then the up row of each output. input: as gemv_streamed_qkv's.
template <int U, typename T, typename Input, bool BY_ROW = false>
__device__ void gemv_streamed_swiglu(Input input, const T* __restrict__ w_gate, const T* __restrict__ w_up,
    T* __restrict__ out, int n, int k)
{
    const uint4* wg = reinterpret_cast<const uint4*>(w_gate);
    const uint4* wu = reinterpret_cast<const uint4*>(w_up);
    long long nv = k / (int)(16 / sizeof(T));
    float g = 0.f;
    stream<U, T, BY_ROW>(input, n, 2, k, [&](int i, int j) { return (j == 0 ? wg : wu) + i * nv; }, [&](int i, int j, float dot)
    {
        if (j == 0) g = dot;
        else if ((threadIdx.x & 31) == 0) out[i] = from_f32<T>(SiluMulOp()(g, dot));
    });
}

// Decode's gather-RMSNorm fused into the GEMV that reads it (gemv_norm_qkv, gemv_norm_swiglu; streamed: the
// gemv_streamed_* kernels with a NormalizedInput): every block normalizes the f32 residual row x into shared memory
// itself - h[j] = x[idx[j]] / rms(x) * gamma[idx[j]] for j < width, zero to k - and its warps then stream weight rows
// against h, several rows each (a grid of a few resident blocks per SM, CudaDevice.PersistentBlocksPerSM, so the row
// is normalized that many times per SM). No launch of the norm, no h
// written to memory and read back; before the grid-dependency wait a block loads its first weight rows and the
// norm's idx and gamma.
// The arithmetic repeats rmsnorm_gather's as the engine launches it with norm_threads threads: each of those
// threads' sums in its order (stream_row), reduced as block_sum does, the same rms_scale and norm_affine - so h, and
// with it every output, is bit for bit what the two launches give.
// Dynamic shared memory: d floats (the row), k ints when idx is set (idx), k T (gamma[idx], then h); d a multiple of 4.
template <typename T>
struct DecodeNorm
{
    const float* x;         // the residual row, written by the previous kernel
    const T* gamma;
    const int* idx;         // the selected channels (null: all d)
    int d, width, norm_threads;
    float eps;
};

// Before the grid-dependency wait: the selected channels and their gamma values (weights) into shared memory.
template <typename T>
__device__ __forceinline__ void stage_norm_weights(const DecodeNorm<T>& n, int* cs, T* gs, int k)
{
#pragma unroll 4
    for (int j = threadIdx.x; j < k; j += blockDim.x)
    {
        int c = j < n.width ? (n.idx ? n.idx[j] : j) : -1;
        if (n.idx) cs[j] = c;
        gs[j] = c >= 0 ? n.gamma[c] : T{};
    }
}

// After the wait: x into xs, its sum of squares as rmsnorm_gather's norm_threads threads take it, and h over gs.
template <typename T>
__device__ __forceinline__ void normalize_row(const DecodeNorm<T>& n, float* xs, const int* cs, T* hs, int k)
{
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int nt = n.norm_threads, n4 = n.d >> 2;
    const float4* src4 = reinterpret_cast<const float4*>(opaque(n.x));
    float4* xs4 = reinterpret_cast<float4*>(xs);
    // Warp vw of the norm kernel's block, lane for lane (stream_row<NORM_UNROLL, true> with blockDim nt).
    for (int vw = warp; vw < nt / 32; vw += warps)
    {
        int v = vw * 32 + lane;
        float s = 0.f, ss = 0.f;
        for (int base = v; base < n4; base += NORM_UNROLL * nt)
        {
            float4 val[NORM_UNROLL];
#pragma unroll
            for (int u = 0; u < NORM_UNROLL; u++)
            {
                int i = base + u * nt;
                val[u] = i < n4 ? src4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < NORM_UNROLL; u++)
            {
                int i = base + u * nt;
                if (i < n4) xs4[i] = val[u];
                add_sums(s, ss, val[u]);
            }
        }
        ss = warp_sum(ss);
        if (lane == 0) partial[vw] = ss;
    }
    __syncthreads();
    float scale = rms_scale(warp_sum(lane < nt / 32 ? partial[lane] : 0.f), n.d, n.eps);   // block_sum's second step
    for (int j = threadIdx.x; j < k; j += blockDim.x)
    {
        int c = n.idx ? cs[j] : (j < n.width ? j : -1);
        float y = 0.f;
        if (c >= 0) y = norm_affine(xs[c], 0.f, scale, to_f32(hs[j]), 0.f);
        hs[j] = from_f32<T>(y);
    }
    __syncthreads();
}

// The shared-memory arrays of a fused decode norm: xs (d floats), cs (k ints, when idx is set), hs (k T).
template <typename T> struct DecodeNormSmem { float* xs; int* cs; T* hs; };
template <typename T>
__device__ __forceinline__ DecodeNormSmem<T> decode_norm_smem(const DecodeNorm<T>& n, int k)
{
    extern __shared__ float4 fused_norm_smem[];
    float* xs = reinterpret_cast<float*>(fused_norm_smem);
    int* cs = reinterpret_cast<int*>(xs + n.d);
    return {xs, cs, reinterpret_cast<T*>(cs + (n.idx ? k : 0))};
}

// stream_rows' input for the streamed forms of the fused decode norms (gemv_streamed_norm_*, on a grid of a few resident
// blocks per SM as the others): as those, it stages the norm's weights before the wait, then normalizes the row into hs.
template <typename T>
struct NormalizedInput
{
    DecodeNorm<T> n;
    int k;
    __device__ __forceinline__ void before_wait() const
    {
        DecodeNormSmem<T> sm = decode_norm_smem(n, k);
        stage_norm_weights(n, sm.cs, sm.hs, k);
    }
    __device__ __forceinline__ const T* after_wait() const
    {
        DecodeNormSmem<T> sm = decode_norm_smem(n, k);
        normalize_row(n, sm.xs, sm.cs, sm.hs, k);
        return sm.hs;
    }
};

// gemv_qkv of the normalized row: rows [0, n0) x . w0 into y0, the next n1 into y1, the last n2 into y2.
// sync: where the kernel waits for x (DependencySync: the grid-dependency wait; a persistent decode kernel's grid barrier).
template <int U, typename T, typename Sync = DependencySync>
__device__ void gemv_norm_qkv(const DecodeNorm<T> n, const T* __restrict__ w0, T* __restrict__ y0, int n0,
    const T* __restrict__ w1, T* __restrict__ y1, int n1, const T* __restrict__ w2, T* __restrict__ y2, int n2, int k, Sync sync = {})
{
    DecodeNormSmem<T> sm = decode_norm_smem(n, k);
    allow_dependents_launch();
    int warps = blockDim.x >> 5, total = n0 + n1 + n2;
    int first_row = blockIdx.x * warps + (threadIdx.x >> 5), step = gridDim.x * warps;
    auto weight_row = [&](int row, T*& y, int& r) -> const T*
    {
        if (row < n0) { y = y0; r = row; return w0 + (long long)row * k; }
        if (row < n0 + n1) { y = y1; r = row - n0; return w1 + (long long)r * k; }
        y = y2; r = row - n0 - n1; return w2 + (long long)r * k;
    };
    sync.arrive();
    uint4 first[U];
    if (first_row < total) { T* y; int r; load_first<U>(weight_row(first_row, y, r), k, first); }
    stage_norm_weights(n, sm.cs, sm.hs, k);
    sync.wait();
    normalize_row(n, sm.xs, sm.cs, sm.hs, k);
    for (int row = first_row; row < total; row += step)
    {
        T* y; int r;
        const T* w = weight_row(row, y, r);
        if (row != first_row) load_first<U>(w, k, first);
        float acc = warp_dot<U>(sm.hs, w, k, first);
        if ((threadIdx.x & 31) == 0) y[r] = from_f32<T>(acc);
    }
}

// gemv_swiglu of the normalized row.
template <int U, typename T, typename Sync = DependencySync>
__device__ void gemv_norm_swiglu(const DecodeNorm<T> n, const T* __restrict__ w_gate, const T* __restrict__ w_up, T* __restrict__ out,
    int rows, int k, Sync sync = {})
{
    DecodeNormSmem<T> sm = decode_norm_smem(n, k);
    allow_dependents_launch();
    int warps = blockDim.x >> 5;
    int first_row = blockIdx.x * warps + (threadIdx.x >> 5), step = gridDim.x * warps;
    sync.arrive();
    uint4 first[U];
    if (first_row < rows) load_first<U>(w_gate + (long long)first_row * k, k, first);
    stage_norm_weights(n, sm.cs, sm.hs, k);
    sync.wait();
    normalize_row(n, sm.xs, sm.cs, sm.hs, k);
    for (int row = first_row; row < rows; row += step)
    {
        if (row != first_row) load_first<U>(w_gate + (long long)row * k, k, first);
        float g = warp_dot<U>(sm.hs, w_gate + (long long)row * k, k, first);
        load_first<U>(w_up + (long long)row * k, k, first);
        float u = warp_dot<U>(sm.hs, w_up + (long long)row * k, k, first);
        if ((threadIdx.x & 31) == 0) out[row] = from_f32<T>(SiluMulOp()(g, u));
    }
}
