// Device functions of the tensor-core prefill attention kernels (attention_tc.cu: mma.sync; attention_wgmma.cu:
// Hopper's warpgroup MMA): cp.async staging, mma.sync and ldmatrix, the online softmax of a 16-row slab of scores in
// mma.sync's accumulator layout (which wgmma's accumulators share per warp), and the output rows' store.
#pragma once
#include "common.cuh"

__device__ __forceinline__ unsigned smem_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16-byte global → shared copy; fill == false writes zeros without reading (keys past the last visible one).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool fill)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_address(dst)), "l"(src), "r"(fill ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
// Waits until every committed group has landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// Two f32 values as one register of two 16-bit elements, the lower column in the low half, rounded to nearest even
// by the pair conversion (one instruction per pair; sm_80+, as the bf16 mma).
template <typename T> __device__ __forceinline__ unsigned pack_pair(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack_pair<bf16>(float lo, float hi)
{
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <> __device__ __forceinline__ unsigned pack_pair<f16>(float lo, float hi)
{
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// The same, each value rounded by common.cuh's from_f32 (for bf16 a handful of integer instructions per value): the
// same bits for every value but NaN. The former softmax's, kept for KernelBench's baseline.
template <typename T> __device__ __forceinline__ unsigned pack_each(float lo, float hi)
{
    return (unsigned)from_f32<T>(lo).bits | ((unsigned)from_f32<T>(hi).bits << 16);
}

// c[16x8] += a[16x16] · b[16x8], f32 accumulation.
template <typename T> __device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<bf16>(float* c, const unsigned* a, unsigned b0, unsigned b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16>(float* c, const unsigned* a, unsigned b0, unsigned b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 16-bit matrices from shared memory: lane i addresses row i % 8 of matrix i / 8 and gets, from each
// matrix, row i / 4 columns 2(i % 4), 2(i % 4) + 1 (the A/B fragment layout of mma m16n8k16).
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
}
// The same, transposed: from each matrix, rows 2(i % 4), 2(i % 4) + 1 of column i / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
}

// 2^x with the hardware's ex2.approx.ftz: the instruction exp2f also uses, without the scaling it wraps around it for
// results below 2^-126 (which flush to zero here: a probability that small is zero in the output's 16-bit type and
// in the row's f32 sum). One instruction per score in the softmax, the attention kernel's only non-tensor-core
// work, where ptxas expands the non-ftz form with a range check and two predicated multiplies. BASELINE: exp2f
// itself (the former softmax, KernelBench's baseline, which times the two).
template <bool BASELINE>
__device__ __forceinline__ float exp2_scores(float x)
{
    if (BASELINE) return exp2f(x);
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float quad_max(float v)
{
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v)
{
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Rows first .. first + ROWS - 1 of one head's D columns (row stride ld, the head's columns from col) into a shared
// tile of rows D + 8 elements long, with cp.async; rows past last are zero-filled without a read.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void copy_rows_async(unsigned short* dst, const T* src, int first, int last, long long ld, int col)
{
    constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS)
    {
        int j = i / CHUNKS, c = (i % CHUNKS) * 8, row = first + j;
        bool ok = row <= last;
        cp_async16(dst + j * (D + 8) + c, ok ? src + row * ld + col + c : src, ok);
    }
}

// A 16-row slab's raw scores with the keys a row must not see at -inf (softmax_tile scales them). Key tile + j is
// visible to the row at position p when 0 <= p - tile - j < span (span: the window, or 2^31 - 1 without one;
// unsigned, so one compare); distance_g is p - tile for this thread's row g (row g + 8 is 8 further on). Callers skip
// it on interior tiles (every key visible to every row of the slab).
template <int N>
__device__ __forceinline__ void mask_scores(float (&s)[N / 8][4], int distance_g, unsigned span)
{
    int tg = threadIdx.x & 3;
#pragma unroll
    for (int n = 0; n < N / 8; n++)
#pragma unroll
        for (int e = 0; e < 2; e++)
        {
            int distance = distance_g - (n * 8 + 2 * tg + e);
            if ((unsigned)distance >= span) s[n][e] = NEG_INF;
            if ((unsigned)(distance + 8) >= span) s[n][2 + e] = NEG_INF;
        }
}

// One tile of the online softmax for a 16-row slab (this thread's rows g and g + 8): updates the running maxima m
// (log2 domain) and this thread's partial sums l (its quad adds them up at the end), rescales the output accumulators
// and packs the probabilities as P·V's A fragments: the accumulators of key groups 2k and 2k + 1 are exactly the A
// fragment of k-step k.
// LAZY: m is a reference, not the exact maximum. It moves (and o and l are rescaled) only on tiles where some row of
// the warp sees a score more than LAZY_MARGIN above its reference; otherwise the tile's probabilities are taken
// relative to the stale reference (at most 2^LAZY_MARGIN, well inside f32 and bf16/f16 range) and the D/4 rescaling
// multiplies per thread are skipped. m + log2(l) is the same log-sum-exp either way. Once a causal row's maximum
// settles, most tiles skip the rescale (the trick FlashAttention-4 uses).
#define LAZY_MARGIN 8.f
// BASELINE_SOFTMAX: exp2f and probabilities rounded one at a time (exp2_scores, pack_each), KernelBench's baseline.
template <typename T, int N, int D, bool LAZY, bool BASELINE_SOFTMAX = false>
__device__ __forceinline__ void softmax_tile(float (&s)[N / 8][4], float (&m)[2], float (&l)[2], float (&o)[D / 8][4],
    unsigned (&pf)[N / 16][4], float scale_log2)
{
    // Raw scores s; the maxima and probabilities in log2 units (scale_log2 > 0, so the maximum commutes with it).
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int n = 0; n < N / 8; n++) { mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1])); mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3])); }
    mx0 = fmaxf(m[0], quad_max(mx0) * scale_log2); mx1 = fmaxf(m[1], quad_max(mx1) * scale_log2);
    // m = -inf (nothing visible yet) moves on the first finite score: -inf + margin is -inf.
    bool rescale = !LAZY || __any_sync(0xffffffffu, mx0 > m[0] + LAZY_MARGIN || mx1 > m[1] + LAZY_MARGIN);
    if (!rescale) { mx0 = m[0]; mx1 = m[1]; }
    // A row with nothing visible yet keeps m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
    float base0 = mx0 == NEG_INF ? 0.f : mx0, base1 = mx1 == NEG_INF ? 0.f : mx1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < N / 8; n++)
    {
        s[n][0] = exp2_scores<BASELINE_SOFTMAX>(fmaf(s[n][0], scale_log2, -base0)); s[n][1] = exp2_scores<BASELINE_SOFTMAX>(fmaf(s[n][1], scale_log2, -base0));
        s[n][2] = exp2_scores<BASELINE_SOFTMAX>(fmaf(s[n][2], scale_log2, -base1)); s[n][3] = exp2_scores<BASELINE_SOFTMAX>(fmaf(s[n][3], scale_log2, -base1));
        sum0 += s[n][0] + s[n][1];
        sum1 += s[n][2] + s[n][3];
    }
    if (rescale)
    {
        float corr0 = exp2_scores<BASELINE_SOFTMAX>(m[0] - base0), corr1 = exp2_scores<BASELINE_SOFTMAX>(m[1] - base1);
        l[0] = l[0] * corr0 + sum0;
        l[1] = l[1] * corr1 + sum1;
        m[0] = mx0; m[1] = mx1;
#pragma unroll
        for (int d = 0; d < D / 8; d++) { o[d][0] *= corr0; o[d][1] *= corr0; o[d][2] *= corr1; o[d][3] *= corr1; }
    }
    else { l[0] += sum0; l[1] += sum1; }
#pragma unroll
    for (int k = 0; k < N / 16; k++)
    {
        auto pack = [](float lo, float hi) { return BASELINE_SOFTMAX ? pack_each<T>(lo, hi) : pack_pair<T>(lo, hi); };
        pf[k][0] = pack(s[2 * k][0], s[2 * k][1]);
        pf[k][1] = pack(s[2 * k][2], s[2 * k][3]);
        pf[k][2] = pack(s[2 * k + 1][0], s[2 * k + 1][1]);
        pf[k][3] = pack(s[2 * k + 1][2], s[2 * k + 1][3]);
    }
}

// A 16-row slab's normalised output rows (this thread's rows row_g and row_g + 8 of head h, those below tq) and,
// with lse, their natural log-sum-exp.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const float (&o)[D / 8][4], const float (&m)[2], const float (&l)[2], int row_g, int tq,
    int h, int q_dim, T* __restrict__ out, float* __restrict__ lse)
{
    int tg = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < 2; j++)
    {
        float sum = quad_sum(l[j]), inv = sum > 0.f ? 1.f / sum : 0.f;
        int r = row_g + 8 * j;
        if (r >= tq) continue;
        if (lse && tg == 0) lse[(long long)h * tq + r] = (m[j] + log2f(sum)) * 0.6931471805599453f;   // log2 → natural
        T* orow = out + (long long)r * q_dim + h * D;
#pragma unroll
        for (int d = 0; d < D / 8; d++)
            *reinterpret_cast<unsigned*>(orow + d * 8 + 2 * tg) = pack_pair<T>(o[d][2 * j] * inv, o[d][2 * j + 1] * inv);
    }
}
