using System.Numerics.Tensors;
using DispNative.Engine.Cpu;

namespace DispNative.Engine.Autograd;

/// <summary>The fp32 tape's attention backward as GEMMs (<see cref="AttentionGemmBackward"/>, the formulation the CUDA path
/// gives cuBLASLt) on the CPU <see cref="Gemm"/>: B is read in place, A packed into a contiguous block where it is not. The
/// row-by-row loop it replaces (several dot products and axpys of head_dim elements per (query, key) pair) spent more
/// in call overhead than these GEMMs spend in arithmetic, though they also compute the masked part of the diagonal blocks.</summary>
internal sealed class CpuAttentionGemmBackend(Dictionary<AttentionBuffer, float[]> buffers, float[] lse, float[] rowdot,
    float[] packedA, float[] product) : IAttentionGemmBackend
{
    /// <summary>Smaller blocks lose more to the CPU GEMM's packing and short loops than the triangle saves (KernelBench cpu).</summary>
    public const int MinimumRowBlock = 64;

    /// <summary>dq, dk and dv (overwritten) of causal GQA attention over q [t, heads·hd], k and v [t, kvHeads·hd], from
    /// the output o, its gradient dOut and the forward's log-sum-exp [heads, t] (of the scaled scores). Scratch comes
    /// from <paramref name="allocate"/> (the tape's buffers). <paramref name="rowBlock"/>: rows per block of the block
    /// triangle (default <see cref="AttentionGemmBackward.RowBlock"/> with <see cref="MinimumRowBlock"/> rows at least; t
    /// computes the whole square).</summary>
    public static void Run(float[] q, float[] k, float[] v, float[] o, float[] dOut, float[] lse, float[] dq, float[] dk, float[] dv,
        int t, int heads, int kvHeads, int headDim, int? window, Func<long, float[]> allocate, int? rowBlock = null)
    {
        int qd = heads * headDim;
        var rowdot = allocate(heads * t);
        Parallel.For(0, t, new ParallelOptions { MaxDegreeOfParallelism = Cpu.Gemm.Threads }, i =>
        {
            for (int h = 0; h < heads; h++)
                rowdot[h * t + i] = TensorPrimitives.Dot(dOut.AsSpan(i * qd + h * headDim, headDim), o.AsSpan(i * qd + h * headDim, headDim));
        });
        int chunk = AttentionGemmBackward.ChunkKvHeads(t, kvHeads, sizeof(float), 256L << 20);
        long tt = (long)chunk * t * t;
        var buffers = new Dictionary<AttentionBuffer, float[]>
        {
            [AttentionBuffer.Q] = q, [AttentionBuffer.K] = k, [AttentionBuffer.V] = v, [AttentionBuffer.DOut] = dOut,
            [AttentionBuffer.Scores] = allocate(tt), [AttentionBuffer.DProbs] = allocate(tt), [AttentionBuffer.Probs] = allocate(tt),
            [AttentionBuffer.DScores] = allocate(tt), [AttentionBuffer.DQ] = dq, [AttentionBuffer.DK] = dk, [AttentionBuffer.DV] = dv,
        };
        // Scratch: A packed, [t, headDim] (Q, dO) or [t, t] (P, dS); the product, [t, t] or [t, headDim].
        long wide = (long)t * Math.Max(t, headDim);
        var backend = new CpuAttentionGemmBackend(buffers, lse, rowdot, allocate(wide), allocate(wide));
        AttentionGemmBackward.Enqueue(backend, t, heads, kvHeads, headDim, window, chunk, rowBlock ?? AttentionGemmBackward.RowBlock(t, MinimumRowBlock));
    }

    public void Gemm(in BatchedGemm g)
    {
        float[] a = buffers[g.A], b = buffers[g.B], d = buffers[g.D];
        for (int n = 0; n < g.Batch; n++)
        {
            // A as a contiguous [M, K] (packed unless it already is); B read in place, [N, K] when transposed
            // (Gemm.MatMulT) or [K, N] (Gemm.MatMul), its rows Ldb apart.
            long offsetA = g.OffsetA + n * g.StrideA;
            var x = a;
            if (g.TransposeA || g.Lda != g.K) { Pack(a, offsetA, g.Lda, g.M, g.K, g.TransposeA, packedA); (x, offsetA) = (packedA, 0); }
            int offsetB = checked((int)(g.OffsetB + n * g.StrideB));
            if (g.TransposeB) Cpu.Gemm.MatMulT(x, checked((int)offsetA), b, offsetB, product, 0, g.M, g.N, g.K, ldw: g.Ldb);
            else Cpu.Gemm.MatMul(x, checked((int)offsetA), b, offsetB, product, 0, g.M, g.N, g.K, ldw: g.Ldb);
            long at = g.OffsetD + n * g.StrideD;
            for (int i = 0; i < g.M; i++)
            {
                var dst = d.AsSpan((int)(at + (long)i * g.Ldd), g.N);
                var src = product.AsSpan(i * g.N, g.N);
                if (g.Beta == 0) TensorPrimitives.Multiply(src, g.Alpha, dst);   // β = 0 never reads D
                else
                {
                    TensorPrimitives.Multiply(dst, g.Beta, dst);
                    TensorPrimitives.MultiplyAdd(src, g.Alpha, dst, dst);
                }
            }
        }
    }

    public void ProbabilityGradients(in ProbabilityGradients p)
    {
        float[] s = buffers[AttentionBuffer.Scores], dp = buffers[AttentionBuffer.DProbs];
        float[] probs = buffers[AttentionBuffer.Probs], ds = buffers[AttentionBuffer.DScores];
        var step = p;
        Parallel.For(0, p.Batch * p.T, new ParallelOptions { MaxDegreeOfParallelism = Cpu.Gemm.Threads }, row =>
        {
            int n = row / step.T, i = row % step.T, h = step.FirstHead + n * step.HeadStep;
            int first = step.Window > 0 ? Math.Max(0, i - step.Window + 1) : 0;
            int end = AttentionGemmBackward.RowEnd(i, step.T, step.RowBlock);
            long at = (long)row * step.T;
            float l = lse[h * step.T + i], rd = rowdot[h * step.T + i];
            probs.AsSpan((int)at, end).Clear();
            ds.AsSpan((int)at, end).Clear();
            for (int j = first; j <= i; j++)
            {
                float pv = MathF.Exp(step.Scale * s[at + j] - l);
                probs[at + j] = pv;
                ds[at + j] = pv * (dp[at + j] - rd);
            }
        });
    }

    /// <summary>Copies the [rows, cols] matrix at <paramref name="offset"/> with rows <paramref name="ld"/> apart (with
    /// <paramref name="transposed"/>: the stored [cols, rows] read transposed) into the contiguous <paramref name="dst"/>.</summary>
    private static void Pack(float[] src, long offset, int ld, int rows, int cols, bool transposed, float[] dst)
    {
        if (transposed)
        {
            // In 16×16 blocks, so that the strided side of the copy stays within a few cache lines.
            const int B = 16;
            for (int c0 = 0; c0 < cols; c0 += B)
                for (int r0 = 0; r0 < rows; r0 += B)
                {
                    int c1 = Math.Min(cols, c0 + B), r1 = Math.Min(rows, r0 + B);
                    for (int c = c0; c < c1; c++)
                    {
                        long line = offset + (long)c * ld;
                        for (int r = r0; r < r1; r++) dst[r * cols + c] = src[line + r];
                    }
                }
            return;
        }
        for (int r = 0; r < rows; r++) src.AsSpan((int)(offset + (long)r * ld), cols).CopyTo(dst.AsSpan(r * cols, cols));
    }
}
