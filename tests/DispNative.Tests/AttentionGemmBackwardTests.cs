using DispNative.Engine;
using DispNative.Engine.Autograd;

namespace DispNative.Tests;

/// <summary>The GEMM formulation of attention's backward (<see cref="AttentionGemmBackward"/>: the strides, GQA head
/// mapping, accumulation over a group and chunking that the CUDA path hands to cuBLASLt) executed with plain loops, and
/// the fp32 tape that runs it on the CPU GEMM, both compared with the float64 tape's row-by-row attention backward.</summary>
public class AttentionGemmBackwardTests
{
    /// <summary>Runs the steps on float arrays with exactly the layout contract of <see cref="BatchedGemm"/>.</summary>
    private sealed class LoopBackend(Dictionary<AttentionBuffer, float[]> buffers, float[] lse, float[] rowdot) : IAttentionGemmBackend
    {
        public int Gemms { get; private set; }
        public long MultiplyAdds { get; private set; }

        public void Gemm(in BatchedGemm g)
        {
            Gemms++;
            MultiplyAdds += (long)g.M * g.N * g.K * g.Batch;
            float[] a = buffers[g.A], b = buffers[g.B], d = buffers[g.D];
            for (int n = 0; n < g.Batch; n++)
            for (int i = 0; i < g.M; i++)
            for (int j = 0; j < g.N; j++)
            {
                double sum = 0;
                for (int k = 0; k < g.K; k++)
                {
                    float x = a[g.OffsetA + n * g.StrideA + (g.TransposeA ? (long)k * g.Lda + i : (long)i * g.Lda + k)];
                    float y = b[g.OffsetB + n * g.StrideB + (g.TransposeB ? (long)j * g.Ldb + k : (long)k * g.Ldb + j)];
                    sum += x * y;
                }
                long at = g.OffsetD + n * g.StrideD + (long)i * g.Ldd + j;
                d[at] = (float)(g.Alpha * sum + (g.Beta == 0 ? 0 : g.Beta * d[at]));   // β = 0 never reads D (cuBLASLt's rule)
            }
        }

        public void ProbabilityGradients(in ProbabilityGradients p)
        {
            float[] s = buffers[AttentionBuffer.Scores], dp = buffers[AttentionBuffer.DProbs];
            float[] probs = buffers[AttentionBuffer.Probs], ds = buffers[AttentionBuffer.DScores];
            for (int n = 0; n < p.Batch; n++)
            {
                int h = p.FirstHead + n * p.HeadStep;
                for (int i = 0; i < p.T; i++)
                for (int j = 0; j < AttentionGemmBackward.RowEnd(i, p.T, p.RowBlock); j++)
                {
                    long at = ((long)n * p.T + i) * p.T + j;
                    bool visible = j <= i && (p.Window == 0 || j > i - p.Window);
                    float pv = visible ? MathF.Exp(p.Scale * s[at] - lse[h * p.T + i]) : 0;
                    probs[at] = pv;
                    ds[at] = visible ? pv * (dp[at] - rowdot[h * p.T + i]) : 0;
                }
            }
        }
    }

    [TestCase(37, 6, 2, 16, null, 1, 8)]     // GQA groups of 3, one KV head per chunk, a short last row block
    [TestCase(37, 6, 2, 16, null, 2, 37)]    // both KV heads in one chunk, one row block
    [TestCase(29, 4, 4, 8, 7, 3, 8)]         // no GQA, a sliding window, an uneven last chunk
    [TestCase(20, 4, 1, 12, null, 1, 1)]     // every head shares one KV head; a row per block
    [TestCase(45, 4, 2, 64, null, 1, 16)]    // head_dim above T
    [TestCase(128, 4, 2, 32, null, 2, 64)]   // the built-in tiny model's attention at its block size, the CPU's blocks
    public void MatchesTheTapeBackward(int t, int heads, int kvHeads, int hd, int? window, int chunk, int rowBlock)
    {
        var rng = new Rng(23);
        int qd = heads * hd, kvd = kvHeads * hd;
        float[] Rand(int n) => Enumerable.Range(0, n).Select(_ => rng.NextGaussian()).ToArray();
        float[] q = Rand(t * qd), k = Rand(t * kvd), v = Rand(t * kvd), dOut = Rand(t * qd);

        // The reference: the float64 tape, whose backward goes row by row (no GEMMs).
        double[] D(float[] a) => a.Select(x => (double)x).ToArray();
        var tape = new Tape<double>();
        var qv = tape.Leaf(D(q), t, qd); var kv = tape.Leaf(D(k), t, kvd); var vv = tape.Leaf(D(v), t, kvd);
        var o = tape.Attention(qv, kv, vv, heads, kvHeads, hd, window);
        D(dOut).CopyTo(o.G, 0);
        tape.Backward();
        float[] F(double[] a) => a.Select(x => (float)x).ToArray();
        float[] wantQ = F(qv.Grad!), wantK = F(kv.Grad!), wantV = F(vv.Grad!);

        // What the forward kernel leaves for the backward: lse[h, i] of the scaled, visible scores; rowdot = dO·O per head.
        var lse = new float[heads * t];
        var rowdot = new float[heads * t];
        double scale = 1 / Math.Sqrt(hd);
        for (int h = 0; h < heads; h++)
        for (int i = 0; i < t; i++)
        {
            int g = h / (heads / kvHeads), first = window is int w ? Math.Max(0, i - w + 1) : 0;
            var scores = Enumerable.Range(first, i - first + 1)
                .Select(j => scale * Enumerable.Range(0, hd).Sum(c => (double)q[i * qd + h * hd + c] * k[j * kvd + g * hd + c])).ToArray();
            double max = scores.Max();
            lse[h * t + i] = (float)(max + Math.Log(scores.Sum(x => Math.Exp(x - max))));
            rowdot[h * t + i] = (float)Enumerable.Range(0, hd).Sum(c => dOut[i * qd + h * hd + c] * o.Data[i * qd + h * hd + c]);
        }

        float[] Garbage(long n) => Enumerable.Repeat(1e30f, (int)n).ToArray();   // dq, dk, dv must be overwritten
        float[] Unwritten(long n) => Enumerable.Repeat(float.NaN, (int)n).ToArray();   // a read of what no step wrote shows
        long tt = (long)chunk * t * t;
        var buffers = new Dictionary<AttentionBuffer, float[]>
        {
            [AttentionBuffer.Q] = q, [AttentionBuffer.K] = k, [AttentionBuffer.V] = v, [AttentionBuffer.DOut] = dOut,
            [AttentionBuffer.Scores] = Unwritten(tt), [AttentionBuffer.DProbs] = Unwritten(tt), [AttentionBuffer.Probs] = Unwritten(tt),
            [AttentionBuffer.DScores] = Unwritten(tt), [AttentionBuffer.DQ] = Garbage(t * qd), [AttentionBuffer.DK] = Garbage(t * kvd),
            [AttentionBuffer.DV] = Garbage(t * kvd),
        };
        var backend = new LoopBackend(buffers, lse, rowdot);
        AttentionGemmBackward.Enqueue(backend, t, heads, kvHeads, hd, window, chunk, rowBlock);

        int chunks = (kvHeads + chunk - 1) / chunk, blocks = (t + rowBlock - 1) / rowBlock;
        Assert.That(backend.Gemms, Is.EqualTo(5 * blocks * chunks * (heads / kvHeads)));
        // Each of the five products covers the block triangle: Σ over row blocks of rows × (keys up to the block's end).
        long triangle = 0;
        for (int i0 = 0; i0 < t; i0 += rowBlock) triangle += (long)Math.Min(rowBlock, t - i0) * Math.Min(t, i0 + rowBlock);
        Assert.That(backend.MultiplyAdds, Is.EqualTo(5 * triangle * hd * heads), "multiply-adds: the block triangle, no more");
        AssertClose(buffers[AttentionBuffer.DQ], wantQ, "dq");
        AssertClose(buffers[AttentionBuffer.DK], wantK, "dk");
        AssertClose(buffers[AttentionBuffer.DV], wantV, "dv");

        // The fp32 tape runs the same steps on the CPU GEMM (CpuAttentionGemmBackend) and adds into existing gradients.
        var tape32 = new Tape<float>();
        var q32 = tape32.Leaf(q, t, qd, Enumerable.Repeat(1f, t * qd).ToArray());
        var k32 = tape32.Leaf(k, t, kvd); var v32 = tape32.Leaf(v, t, kvd);
        var o32 = tape32.Attention(q32, k32, v32, heads, kvHeads, hd, window);
        dOut.CopyTo(o32.G, 0);
        tape32.Backward();
        AssertClose(q32.Grad!.Select(x => x - 1).ToArray(), wantQ, "fp32 tape dq");
        AssertClose(k32.Grad!, wantK, "fp32 tape dk");
        AssertClose(v32.Grad!, wantV, "fp32 tape dv");
    }

    private static void AssertClose(float[] got, float[] want, string what)
    {
        double scale = want.Max(Math.Abs);
        Assert.That(scale, Is.GreaterThan(1e-3), $"{what}: the reference gradient is zero");
        for (int i = 0; i < want.Length; i++)
            Assert.That(Math.Abs(got[i] - want[i]), Is.LessThan(1e-4 * scale), $"{what}[{i}]: {got[i]} vs {want[i]}");
    }

    [Test]
    public void ChunkKvHeads_FitsTheBudgetAndKeepsAtLeastOne()
    {
        // 2048² · (8 + 2·2) bytes = 48 MiB per KV head in bf16.
        Assert.That(AttentionGemmBackward.ChunkKvHeads(2048, 32, 2, 2L << 30), Is.EqualTo(32));
        Assert.That(AttentionGemmBackward.ChunkKvHeads(2048, 32, 2, 480L << 20), Is.EqualTo(10));
        Assert.That(AttentionGemmBackward.ChunkKvHeads(65536, 8, 2, 2L << 30), Is.EqualTo(1));
    }
}
