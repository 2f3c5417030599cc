// Single-query (decode) causal GQA attention against a KV cache ([capacity, kv_heads * head_dim] per tensor): the query
// at position `start` (or *position, for CUDA graph replay) sees keys first..start, first = 0 or, with a sliding
// window w > 0, start - w + 1. Online softmax in f32, rescaled once per RESCALE_KEYS keys; nothing of size [keys] is stored.
//
// Split-KV ("flash decoding"): grid (heads, splits). Block (h, s) takes the s-th contiguous share of the visible keys;
// a group of G lanes scores one key, each lane holding 16 bytes of the head (one uint4 load of K and of V per key),
// so a warp reads 32 / G whole rows per step, UNROLL steps in flight. With one share the block writes the output;
// otherwise it writes its unnormalised state (acc[head_dim], m, l) to `partial`, and the shares are merged either by
// the last block of the head to finish (arrivals set: a per-head counter that block counts up and resets to zero, so
// the launch after it finds it zero again) or by a second kernel, attention_decode_combine (arrivals null). Both merge
// the shares in index order, so the output does not depend on which block finishes last. Merged by the last block,
// the keys are split into as few shares as keep each within one round of loads (up to the grid's splits; a captured
// step's grid is for the cache's capacity): a short context uses one block per head and no merge. Needs head_dim a
// multiple of 16 / sizeof(T) and 16-byte aligned q and caches (the caller checks).
//
// With inv_freq set the kernel also does decode's RoPE and cache append (rope.cu's rope_kv_append, one launch fewer):
// q arrives unrotated and every block rotates its head's q; the step's own key and value (position start) come from
// k_new/v_new, rotated, rounded to T as the cache would hold them, and scored by the block whose share ends there,
// which (for the first query head of each KV head) also appends them to the caches. Needs head_dim / 2 a multiple of
// 16 / sizeof(T) (a lane's 16 bytes pair with one other lane's).
//
// attention_decode_naive is the first version (kept as the KernelBench baseline and for head sizes the vector layout
// does not fit): one block per head, a lane per key reading its row element by element.
#pragma once
#include "common.cuh"

#define MAX_HEAD_DIM 128
#define DECODE_WARPS 4
#define DECODE_UNROLL 8
#define RESCALE_KEYS 4   // keys of a round scored before each rescale (a divisor of DECODE_UNROLL; _rescaleN entries: N)

// Weight of a softmax state with running max m once the common max is mn (0 for an empty state).
__device__ __forceinline__ float rescale(float m, float mn) { return m == NEG_INF ? 0.f : expf(m - mn); }

// The online-softmax step for one key with score sc and value vf.
template <int V>
__device__ __forceinline__ void attend(float sc, const float* vf, float& m, float& l, float* acc)
{
    float mn = fmaxf(m, sc), corr = rescale(m, mn), p = expf(sc - mn);
    l = l * corr + p;
#pragma unroll
    for (int i = 0; i < V; i++) acc[i] = acc[i] * corr + p * vf[i];
    m = mn;
}

// The sines and cosines rope.cu's rotate_pair uses for channels c0.. (16 bytes of T) of a head at position pos.
template <typename T>
__device__ __forceinline__ void rope_angles(int c0, int half, float pos, const float* __restrict__ inv_freq, float* sn, float* cs)
{
    constexpr int V = 16 / sizeof(T);
    int f0 = c0 < half ? c0 : c0 - half;
#pragma unroll
    for (int i = 0; i < V; i++) sincosf(pos * inv_freq[f0 + i], &sn[i], &cs[i]);
}

// Channels c0.. (16 bytes) of one head row x and their pair partners: half (head_dim / 2) is a multiple of the chunk,
// so the partners of the chunk are the chunk half away.
template <typename T>
__device__ __forceinline__ void load_rope_pair(const T* x, int c0, int half, uint4& own, uint4& other)
{
    own = *reinterpret_cast<const uint4*>(x + c0);
    other = *reinterpret_cast<const uint4*>(x + (c0 < half ? c0 + half : c0 - half));
}

// Those channels (own, with their partners other) rotated as rope.cu's rotate_pair does with the angles of
// rope_angles, and rounded to T as the rope kernel stores them.
template <typename T>
__device__ __forceinline__ void rotate_chunk(uint4 own, uint4 other, int c0, int half, const float* sn, const float* cs, float* out)
{
    constexpr int V = 16 / sizeof(T);
    bool low = c0 < half;
    float o[V], p[V];
    unpack16<T>(own, o);
    unpack16<T>(other, p);
#pragma unroll
    for (int i = 0; i < V; i++) out[i] = to_f32(from_f32<T>(low ? o[i] * cs[i] - p[i] * sn[i] : o[i] * cs[i] + p[i] * sn[i]));
}

#define MERGE_IN_REGISTERS 16   // shares whose states the decode attention kernels' merge holds in registers

// Head h's output from the states of its first `used` of `splits` splits in partial (read through L2: other blocks
// wrote them in this launch), by `threads` threads of which this is thread t. Up to R shares, each share's maximum,
// sum and first channel are loaded together (one round trip through L2, where the loops below take three) and every
// share's weight is computed once; the arithmetic and its order are the loops', so the bits are too. (R = 0: the
// loops only, for the persistent decode kernel, whose registers are taken.)
template <typename T, int R = MERGE_IN_REGISTERS>
__device__ void merge_splits(const float* partial, T* __restrict__ out, int h, int splits, int used, int head_dim, int t, int threads)
{
    int stride = head_dim + 2;
    const float* part = partial + (long long)h * splits * stride;
    if (R > 0 && used <= R)
    {
        float w[R > 0 ? R : 1], l[R > 0 ? R : 1], a[R > 0 ? R : 1];
#pragma unroll
        for (int s = 0; s < R; s++)
            if (s < used)
            {
                w[s] = __ldcg(part + s * stride + head_dim);
                l[s] = __ldcg(part + s * stride + head_dim + 1);
                a[s] = t < head_dim ? __ldcg(part + s * stride + t) : 0.f;
            }
        float gm = NEG_INF, gsum = 0.f;
#pragma unroll
        for (int s = 0; s < R; s++) if (s < used) gm = fmaxf(gm, w[s]);
#pragma unroll
        for (int s = 0; s < R; s++)
            if (s < used) { w[s] = rescale(w[s], gm); gsum += l[s] * w[s]; }
        for (int c = t; c < head_dim; c += threads)
        {
            float v = 0.f;
#pragma unroll
            for (int s = 0; s < R; s++)
                if (s < used) v += (c == t ? a[s] : __ldcg(part + s * stride + c)) * w[s];
            out[(long long)h * head_dim + c] = from_f32<T>(v / gsum);
        }
        return;
    }
    float gm = NEG_INF, gsum = 0.f;
    for (int s = 0; s < used; s++) gm = fmaxf(gm, __ldcg(part + s * stride + head_dim));
    for (int s = 0; s < used; s++) gsum += __ldcg(part + s * stride + head_dim + 1) * rescale(__ldcg(part + s * stride + head_dim), gm);
    for (int c = t; c < head_dim; c += threads)
    {
        float v = 0.f;
        for (int s = 0; s < used; s++) v += __ldcg(part + s * stride + c) * rescale(__ldcg(part + s * stride + head_dim), gm);
        out[(long long)h * head_dim + c] = from_f32<T>(v / gsum);
    }
}

// The shared memory of one group of WARPS warps working on one share of one head.
template <int WARPS = DECODE_WARPS>
struct DecodeGroupShared
{
    float wm[WARPS], wl[WARPS];
    float wacc[WARPS][MAX_HEAD_DIM];
    float angles[16][32];   // warp 0's RoPE sines and cosines for the step's own key, [i][lane] (16 / sizeof(T) of each)
    int used;   // the shares used: read back after the key loop rather than held in a register through it
    bool last;
};

// Where the split-KV decode runs: its inputs and outputs and the shapes; see the file comment. attend_share reads what
// an earlier kernel or phase wrote through opaque() after its wait.
template <typename T>
struct DecodeAttention
{
    const T* q; const T* kc; const T* vc;
    T* out; float* partial; unsigned* arrivals;
    const T* k_new; const T* v_new; const float* inv_freq; T* k_append; T* v_append;
    int start, heads, kv_heads, head_dim, window;
    float scale;
};

// No wait: the inputs are already visible (the persistent decode kernel's barrier came before).
struct NoWait
{
    static constexpr bool loads_first = false;
    __device__ void operator()() const {}
};
// The wait of a programmatic launch (attention_decode_split).
struct GridDependencyWait
{
    static constexpr bool loads_first = true;
    __device__ void operator()() const { grid_dependency_wait(); }
};

// Share `split` of `splits` of head h, by a group of WARPS warps (t: the thread's index in the group) with the
// shared memory sh. Every thread of the block calls this the same number of times, its group active or not (the
// block synchronizes inside); an inactive group only takes part in those barriers.
//
// wait() makes the earlier kernel's outputs visible (q, k_new, v_new; the partial states and arrivals of the merge).
// With RoPE fused, the keys the share reads from the caches precede this step's (no kernel of the step writes them),
// so where Wait::loads_first the first round of them and RoPE's angles for q are loaded before wait(), overlapping
// the kernel before; without RoPE fused the step's own key comes from the kernel before, and everything waits.
// (decode_step.cu has passed its grid barrier before it calls this: it loads nothing first.)
template <typename T, typename Wait = NoWait, int WARPS = DECODE_WARPS, int RESCALE = RESCALE_KEYS, int MERGE_REGISTERS = 0,
    bool KEEP_ANGLES = true>
__device__ void attend_share(const DecodeAttention<T>& a, bool active, int t, DecodeGroupShared<WARPS>& sh, int h, int split, int splits,
    Wait wait = Wait())
{
    constexpr int V = 16 / sizeof(T);
    int start = a.start, head_dim = a.head_dim;
    int warp = t >> 5, lane = t & 31;
    int kvh = h / (a.heads / a.kv_heads), kv_dim = a.kv_heads * head_dim;

    int vecs = head_dim / V, group = 1;
    while (group < vecs) group <<= 1;              // lanes per key: a power of two, so xor shuffles stay inside it
    int per_warp = 32 / group, slot = lane / group, gl = lane % group;
    bool has = gl < vecs;                          // lanes past the head's width only pad the group
    int c0 = gl * V;

    const int step = WARPS * per_warp;
    int first = a.window > 0 ? max(0, start - a.window + 1) : 0, keys = start - first + 1;
    // The shares used (see the file comment); the rest of the grid has nothing to do.
    int used = a.arrivals ? min(splits, (keys + step * DECODE_UNROLL - 1) / (step * DECODE_UNROLL)) : splits;
    active = active && split < used;
    int share = (keys + used - 1) / used;
    if (t == 0) sh.used = used;
    int kbeg = first + split * share, kend = min(start + 1, kbeg + share);

    bool rope = a.inv_freq != nullptr;
    int half = head_dim / 2, loop_end = rope ? min(kend, start) : kend;   // rope: key start is not in the cache yet
    long long col = (long long)kvh * head_dim + c0;
    // base is uniform over the warp (its shuffles need every lane); the warp's slots take keys base + slot + u * step.
    int base = kbeg + warp * per_warp;
    const T* kc = a.kc;
    const T* vc = a.vc;
    uint4 kr[DECODE_UNROLL], vr[DECODE_UNROLL];
    auto load_round = [&]()
    {
#pragma unroll
        for (int u = 0; u < DECODE_UNROLL; u++)
        {
            int key = base + slot + u * step;
            if (has && key < loop_end)
            {
                kr[u] = *reinterpret_cast<const uint4*>(kc + (long long)key * kv_dim + col);
                vr[u] = *reinterpret_cast<const uint4*>(vc + (long long)key * kv_dim + col);
            }
            else kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
        }
    };
    bool early = Wait::loads_first && rope;
    float sn[V], cs[V];
    if (early)
    {
        load_round();
        // inv_freq through opaque(): read through a __restrict__ pointer, its loads would be non-coherent (ld.global.nc),
        // which ptxas may move past the wait (common.cuh).
        if (active && has) rope_angles<T>(c0, half, (float)start, opaque(a.inv_freq), sn, cs);
    }
    wait();
    if (Wait::loads_first)   // later rounds (and, without RoPE fused, the first) load after the wait, and stay there
    {
        kc = opaque(kc);
        vc = opaque(vc);
    }
    if (active)
    {
        const T* q = opaque(a.q);
        // The step's own key (and value), scored after the share's keys by slot 0 of warp 0 of the block whose share
        // ends there (the whole warp shuffles) and appended once per KV head. Loading first, its loads go with q's.
        auto own_key = [&] { return rope && warp == 0 && kbeg <= start && start < kend; };   // uniform over the warp
        uint4 k_own, k_other, v_own;
        if (early && own_key() && has)
        {
            load_rope_pair<T>(opaque(a.k_new) + (long long)kvh * head_dim, c0, half, k_own, k_other);
            v_own = *reinterpret_cast<const uint4*>(opaque(a.v_new) + (long long)kvh * head_dim + c0);
        }
        float qv[V], acc[V];
        if (has && rope)
        {
            uint4 q_own, q_other;
            load_rope_pair<T>(q + (long long)h * head_dim, c0, half, q_own, q_other);
            if (!early) rope_angles<T>(c0, half, (float)start, a.inv_freq, sn, cs);   // after q's loads: before them, it spilled
            rotate_chunk<T>(q_own, q_other, c0, half, sn, cs, qv);
            if (KEEP_ANGLES && warp == 0)   // the own key's angles are q's: kept for it in shared memory (in registers they spilled)
#pragma unroll
                for (int i = 0; i < V; i++) { sh.angles[i][lane] = sn[i]; sh.angles[V + i][lane] = cs[i]; }
        }
        else if (has) unpack16<T>(*reinterpret_cast<const uint4*>(q + (long long)h * head_dim + c0), qv);
#pragma unroll
        for (int i = 0; i < V; i++) { qv[i] = has ? qv[i] * a.scale : 0.f; acc[i] = 0.f; }
        float m = NEG_INF, l = 0.f;

        for (bool loaded = early; base < loop_end; base += step * DECODE_UNROLL, loaded = false)
        {
            if (!loaded) load_round();
            // The scores of RESCALE of the round's keys first (their shuffles independent of each other), then one
            // rescale to their maximum: the exponentials and the accumulation do not wait on each other key by key.
            static_assert(DECODE_UNROLL % RESCALE == 0, "keys per rescale must divide a round");
            int k0 = base + slot;
#pragma unroll
            for (int u0 = 0; u0 < DECODE_UNROLL; u0 += RESCALE)
            {
                float s[RESCALE];
#pragma unroll
                for (int u = 0; u < RESCALE; u++)
                {
                    float kf[V];
                    unpack16<T>(kr[u0 + u], kf);
                    s[u] = 0.f;
#pragma unroll
                    for (int i = 0; i < V; i++) s[u] += qv[i] * kf[i];
                }
                for (int o = group >> 1; o > 0; o >>= 1)
#pragma unroll
                    for (int u = 0; u < RESCALE; u++) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
                float mn = m;
#pragma unroll
                for (int u = 0; u < RESCALE; u++)
                    if (k0 + (u0 + u) * step < loop_end) mn = fmaxf(mn, s[u]);   // uniform over the group
                float corr = rescale(m, mn);
                l *= corr;
#pragma unroll
                for (int i = 0; i < V; i++) acc[i] *= corr;
#pragma unroll
                for (int u = 0; u < RESCALE; u++)
                    if (k0 + (u0 + u) * step < loop_end)
                    {
                        float vf[V], p = expf(s[u] - mn);
                        unpack16<T>(vr[u0 + u], vf);
                        l += p;
#pragma unroll
                        for (int i = 0; i < V; i++) acc[i] += p * vf[i];
                    }
                m = mn;
            }
        }
        if (own_key())
        {
            long long own_row = (long long)kvh * head_dim;
            float kf[V], vf[V], s = 0.f;
            if (has)
            {
                if (!early)
                {
                    load_rope_pair<T>(opaque(a.k_new) + own_row, c0, half, k_own, k_other);
                    v_own = *reinterpret_cast<const uint4*>(opaque(a.v_new) + own_row + c0);
                }
                if (KEEP_ANGLES)
#pragma unroll
                    for (int i = 0; i < V; i++) { sn[i] = sh.angles[i][lane]; cs[i] = sh.angles[V + i][lane]; }   // this lane's own
                else rope_angles<T>(c0, half, (float)start, a.inv_freq, sn, cs);   // computed again
                rotate_chunk<T>(k_own, k_other, c0, half, sn, cs, kf);
                unpack16<T>(v_own, vf);
#pragma unroll
                for (int i = 0; i < V; i++) s += qv[i] * kf[i];
            }
            for (int o = group >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (slot == 0 && has)
            {
                attend<V>(s, vf, m, l, acc);
                if (h % (a.heads / a.kv_heads) == 0)
                {
                    long long dst = (long long)start * kv_dim + own_row + c0;
#pragma unroll
                    for (int i = 0; i < V; i++) { a.k_append[dst + i] = from_f32<T>(kf[i]); a.v_append[dst + i] = from_f32<T>(vf[i]); }
                }
            }
        }

        // Merge the warp's key slots (lanes with the same gl hold the same channels), then the warps.
        for (int o = group; o < 32; o <<= 1)
        {
            float mo = __shfl_xor_sync(0xffffffffu, m, o), lo = __shfl_xor_sync(0xffffffffu, l, o);
            float mn = fmaxf(m, mo), x = rescale(m, mn), y = rescale(mo, mn);
#pragma unroll
            for (int i = 0; i < V; i++) acc[i] = acc[i] * x + __shfl_xor_sync(0xffffffffu, acc[i], o) * y;
            l = l * x + lo * y;
            m = mn;
        }
        if (lane == 0) { sh.wm[warp] = m; sh.wl[warp] = l; }
        if (slot == 0 && has)
        {
#pragma unroll
            for (int i = 0; i < V; i++) sh.wacc[warp][c0 + i] = acc[i];
        }
    }
    __syncthreads();
    used = sh.used;
    float* part = a.partial + ((long long)h * splits + split) * (head_dim + 2);
    if (active)
    {
        float gm = NEG_INF, gsum = 0.f;
        for (int w = 0; w < WARPS; w++) gm = fmaxf(gm, sh.wm[w]);
        for (int w = 0; w < WARPS; w++) gsum += sh.wl[w] * rescale(sh.wm[w], gm);
        for (int c = t; c < head_dim; c += WARPS * 32)
        {
            float v = 0.f;
            for (int w = 0; w < WARPS; w++) v += sh.wacc[w][c] * rescale(sh.wm[w], gm);
            if (used == 1) a.out[(long long)h * head_dim + c] = from_f32<T>(v / gsum);
            else part[c] = v;
        }
        if (used > 1 && t == 0) { part[head_dim] = gm; part[head_dim + 1] = gsum; }
    }
    if (used == 1 || !a.arrivals) return;   // uniform over the block

    // The last of the head's groups to get here merges: each thread's writes are made visible device-wide before
    // thread 0 counts the group in, and the merging group reads the states only after seeing the full count.
    __threadfence();
    __syncthreads();
    if (active && t == 0)
    {
        sh.last = atomicAdd(a.arrivals + h, 1u) == (unsigned)used - 1;
        if (sh.last) a.arrivals[h] = 0;
    }
    __syncthreads();
    if (!active || !sh.last) return;
    __threadfence();
    merge_splits<T, MERGE_REGISTERS>(opaque(a.partial), a.out, h, splits, used, head_dim, t, WARPS * 32);
}

// Grid (heads, splits), block WARPS warps: block (h, s) takes share s of head h, rescaling once per RESCALE keys,
// merging up to MERGE_REGISTERS shares in registers (merge_splits) and keeping q's RoPE angles for the own key
// (KEEP_ANGLES) or computing them again.
template <typename T, int WARPS, int RESCALE = RESCALE_KEYS, int MERGE_REGISTERS = MERGE_IN_REGISTERS, bool KEEP_ANGLES = true>
__device__ void attention_decode_split(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, float* __restrict__ partial, unsigned* __restrict__ arrivals, const T* __restrict__ k_new,
    const T* __restrict__ v_new, const float* __restrict__ inv_freq, T* __restrict__ k_append, T* __restrict__ v_append,
    int start, const int* position, int heads, int kv_heads, int head_dim, int window, float scale)
{
    allow_dependents_launch();
    __shared__ DecodeGroupShared<WARPS> sh;
    if (position) start = *position;   // copied from the host before the step: no kernel writes it
    DecodeAttention<T> a{q, kc, vc, out, partial, arrivals, k_new, v_new, inv_freq, k_append, v_append, start, heads, kv_heads,
        head_dim, window, scale};
    attend_share<T, GridDependencyWait, WARPS, RESCALE, MERGE_REGISTERS, KEEP_ANGLES>(a, true, threadIdx.x, sh, blockIdx.x, blockIdx.y, gridDim.y);
}

// Merges the splits' states of each head: grid (heads), block 128.
template <typename T>
__device__ void attention_decode_combine(const float* __restrict__ partial, T* __restrict__ out, int splits, int head_dim)
{
    allow_dependents_launch();
    grid_dependency_wait();
    merge_splits<T>(opaque(partial), out, blockIdx.x, splits, splits, head_dim, threadIdx.x, blockDim.x);
}

#define NAIVE_KEYS 32

// Grid (heads), block DECODE_WARPS * 32. Warps take interleaved tiles of 32 keys (lane j scores key j) with their own
// online-softmax state, merged at the end.
template <typename T>
__device__ void attention_decode_naive(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    T* __restrict__ out, int start, const int* position, int heads, int kv_heads, int head_dim, int window, float scale)
{
    allow_dependents_launch();
    grid_dependency_wait();
    q = opaque(q); kc = opaque(kc); vc = opaque(vc);
    if (position) start = *position;
    __shared__ float qs[MAX_HEAD_DIM];
    __shared__ float wm[DECODE_WARPS], wl[DECODE_WARPS];
    __shared__ float wacc[DECODE_WARPS][MAX_HEAD_DIM];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int h = blockIdx.x, kvh = h / (heads / kv_heads);
    int kv_dim = kv_heads * head_dim;
    int pos = start, first = window > 0 ? max(0, pos - window + 1) : 0;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) qs[i] = to_f32(q[h * head_dim + i]) * scale;
    __syncthreads();
    int per_lane = (head_dim + 31) / 32;
    float m = NEG_INF, l = 0.f, acc[MAX_HEAD_DIM / 32];
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++) acc[e] = 0.f;
    for (int tile = first + warp * NAIVE_KEYS; tile <= pos; tile += DECODE_WARPS * NAIVE_KEYS)
    {
        int key = tile + lane;
        bool valid = key <= pos;
        float s = NEG_INF;
        if (valid)
        {
            const T* kr = kc + (long long)key * kv_dim + kvh * head_dim;
            s = 0.f;
            for (int c = 0; c < head_dim; c++) s += qs[c] * to_f32(kr[c]);
        }
        float m_new = fmaxf(m, warp_max(s));
        float p = valid ? expf(s - m_new) : 0.f;
        float corr = expf(m - m_new);
        l = l * corr + warp_sum(p);
        for (int e = 0; e < per_lane; e++) acc[e] *= corr;
        int count = min(NAIVE_KEYS, pos - tile + 1);
        for (int j = 0; j < count; j++)
        {
            float pj = __shfl_sync(0xffffffffu, p, j);
            const T* vr = vc + (long long)(tile + j) * kv_dim + kvh * head_dim;
            for (int e = 0; e < per_lane; e++)
            {
                int c = lane + 32 * e;
                if (c < head_dim) acc[e] += pj * to_f32(vr[c]);
            }
        }
        m = m_new;
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
    for (int e = 0; e < per_lane; e++)
    {
        int c = lane + 32 * e;
        if (c < head_dim) wacc[warp][c] = acc[e];
    }
    __syncthreads();
    float gm = NEG_INF;
    for (int w = 0; w < DECODE_WARPS; w++) gm = fmaxf(gm, wm[w]);
    float gl = 0.f;
    for (int w = 0; w < DECODE_WARPS; w++) if (wm[w] != NEG_INF) gl += wl[w] * expf(wm[w] - gm);
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x)
    {
        float v = 0.f;
        for (int w = 0; w < DECODE_WARPS; w++) if (wm[w] != NEG_INF) v += wacc[w][c] * expf(wm[w] - gm);
        out[h * head_dim + c] = from_f32<T>(v / gl);
    }
}

