namespace DispNative.Engine.Autograd;

/// <summary>The tensors of <see cref="AttentionGemmBackward"/>. Q/K/V/DOut/Probs/DScores are in the storage type (DOut
/// is dO converted to it); the rest are f32. Scores, DProbs, Probs and DScores hold one chunk of heads: [chunk, T, T].</summary>
public enum AttentionBuffer { Q, K, V, DOut, Scores, DProbs, Probs, DScores, DQ, DK, DV }

/// <summary>One strided batched row-major GEMM: for b &lt; Batch, D_b = α·op(A_b)·op(B_b) + β·D_b with X_b starting at
/// offset + b·stride (elements) and rows ld apart. op(A_b) is A_b [M,K], or with TransposeA the stored [K,M] read
/// transposed; op(B_b) is B_b [N,K] read transposed (TransposeB) or B_b [K,N].</summary>
public readonly record struct BatchedGemm(int M, int N, int K, int Batch,
    AttentionBuffer A, long OffsetA, int Lda, long StrideA, bool TransposeA,
    AttentionBuffer B, long OffsetB, int Ldb, long StrideB, bool TransposeB,
    AttentionBuffer D, long OffsetD, int Ldd, long StrideD, float Alpha, float Beta);

/// <summary>For heads h = FirstHead + b·HeadStep (b &lt; Batch) and query rows i &lt; T, over the keys j &lt; RowEnd(i), the end
/// of i's row block (<see cref="AttentionGemmBackward.RowEnd"/>; later keys are neither read nor written):
/// Probs[b,i,j] = exp(Scale·Scores[b,i,j] − lse[h,i]) where j is visible from i (causal, window), else 0;
/// DScores[b,i,j] = Probs[b,i,j]·(DProbs[b,i,j] − rowdot[h,i]).</summary>
public readonly record struct ProbabilityGradients(int T, int Batch, int FirstHead, int HeadStep, int Window, float Scale, int RowBlock);

/// <summary>Executes the steps of <see cref="AttentionGemmBackward"/>: cuBLASLt and a kernel on the GPU, the CPU GEMM for the fp32
/// tape (<see cref="CpuAttentionGemmBackend"/>), plain loops in the test that checks the formulation.</summary>
public interface IAttentionGemmBackend
{
    void Gemm(in BatchedGemm gemm);
    void ProbabilityGradients(in ProbabilityGradients step);
}

/// <summary>The backward of causal GQA attention (training: T queries and keys at positions 0..T-1) as GEMMs (tensor cores on the GPU):
/// per chunk of KV heads and per head of their groups, S = Q·Kᵀ and dP = dO·Vᵀ (f32), one kernel for P (recomputed
/// from the forward's log-sum-exp) and dS = P∘(dP − rowsum(dO∘O)), then dV += Pᵀ·dO, dK += scale·dSᵀ·Q and
/// dQ = scale·dS·K. The [T, T] matrices exist only for the chunk being processed (transient, never kept on the tape).
/// Rows and keys are cut into blocks of <c>rowBlock</c>: a query block's GEMMs stop at its last key and a key block's
/// start at its first query, so only the block triangle on and below the diagonal is computed: (n+1)/2n of the square
/// for n blocks (56% for 8). The masked part of the diagonal blocks is computed and discarded.</summary>
public static class AttentionGemmBackward
{
    /// <summary>KV heads per chunk so that the chunk's two f32 and two storage-type [T, T] buffers fit in
    /// <paramref name="maxBytes"/> (at least one).</summary>
    public static int ChunkKvHeads(int t, int kvHeads, int storageBytes, long maxBytes) =>
        (int)Math.Clamp(maxBytes / ((long)t * t * (8 + 2 * storageBytes)), 1, kvHeads);

    /// <summary>Rows per block: at most 8 blocks, at least <paramref name="minimum"/> rows, a multiple of 8 (16-byte
    /// aligned sub-matrices in 16-bit storage).</summary>
    public static int RowBlock(int t, int minimum) => Math.Max(minimum, ((t + 7) / 8 + 7) / 8 * 8);

    /// <summary>The end (exclusive) of the keys that row i's block reaches.</summary>
    public static int RowEnd(int i, int t, int rowBlock) => Math.Min(t, (i / rowBlock + 1) * rowBlock);

    /// <summary>Issues the steps. rowdot[h, i] = dO_i·O_i of head h must already exist (the backend holds it, with lse).
    /// dQ, dK and dV are overwritten.</summary>
    public static void Enqueue(IAttentionGemmBackend backend, int t, int heads, int kvHeads, int headDim, int? window, int chunk, int rowBlock)
    {
        if (rowBlock <= 0) throw new ArgumentOutOfRangeException(nameof(rowBlock), rowBlock, "a row block needs at least one row");
        int group = heads / kvHeads, qd = heads * headDim, kvd = kvHeads * headDim;
        long tt = (long)t * t;
        float scale = 1f / MathF.Sqrt(headDim);
        for (int kv0 = 0; kv0 < kvHeads; kv0 += chunk)
        {
            int batch = Math.Min(chunk, kvHeads - kv0);
            long kvOffset = (long)kv0 * headDim, headStride = (long)group * headDim;
            for (int j = 0; j < group; j++)
            {
                int firstHead = kv0 * group + j;
                long qOffset = (long)firstHead * headDim;
                float accumulate = j == 0 ? 0 : 1;   // dK and dV sum over the heads of a group
                // Query rows [i0, i1) against keys [0, i1): S = Q_h·K_gᵀ and dP = dO_h·V_gᵀ, f32, rows t apart.
                for (int i0 = 0; i0 < t; i0 += rowBlock)
                {
                    int m = Math.Min(rowBlock, t - i0), i1 = i0 + m;
                    backend.Gemm(new BatchedGemm(m, i1, headDim, batch, AttentionBuffer.Q, qOffset + (long)i0 * qd, qd, headStride, false,
                        AttentionBuffer.K, kvOffset, kvd, headDim, true, AttentionBuffer.Scores, (long)i0 * t, t, tt, 1, 0));
                    backend.Gemm(new BatchedGemm(m, i1, headDim, batch, AttentionBuffer.DOut, qOffset + (long)i0 * qd, qd, headStride, false,
                        AttentionBuffer.V, kvOffset, kvd, headDim, true, AttentionBuffer.DProbs, (long)i0 * t, t, tt, 1, 0));
                }
                backend.ProbabilityGradients(new ProbabilityGradients(t, batch, firstHead, group, window ?? 0, scale, rowBlock));
                // Keys [k0, k1) from queries [k0, t): dV_g += Pᵀ·dO_h, dK_g += scale·dSᵀ·Q_h.
                for (int k0 = 0; k0 < t; k0 += rowBlock)
                {
                    int n = Math.Min(rowBlock, t - k0), rows = t - k0;
                    long corner = (long)k0 * t + k0;
                    backend.Gemm(new BatchedGemm(n, headDim, rows, batch, AttentionBuffer.Probs, corner, t, tt, true,
                        AttentionBuffer.DOut, qOffset + (long)k0 * qd, qd, headStride, false,
                        AttentionBuffer.DV, kvOffset + (long)k0 * kvd, kvd, headDim, 1, accumulate));
                    backend.Gemm(new BatchedGemm(n, headDim, rows, batch, AttentionBuffer.DScores, corner, t, tt, true,
                        AttentionBuffer.Q, qOffset + (long)k0 * qd, qd, headStride, false,
                        AttentionBuffer.DK, kvOffset + (long)k0 * kvd, kvd, headDim, scale, accumulate));
                }
                // Query rows [i0, i1) from keys [0, i1): dQ_h = scale·dS·K_g.
                for (int i0 = 0; i0 < t; i0 += rowBlock)
                {
                    int m = Math.Min(rowBlock, t - i0), i1 = i0 + m;
                    backend.Gemm(new BatchedGemm(m, headDim, i1, batch, AttentionBuffer.DScores, (long)i0 * t, t, tt, false,
                        AttentionBuffer.K, kvOffset, kvd, headDim, false, AttentionBuffer.DQ, qOffset + (long)i0 * qd, qd, headStride, scale, 0));
                }
            }
        }
    }
}
