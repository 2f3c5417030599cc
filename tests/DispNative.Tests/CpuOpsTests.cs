using DispNative.Engine;
using DispNative.Engine.Cpu;

namespace DispNative.Tests;

/// <summary>Each optimized CPU op against a plain double-precision reference.</summary>
public class CpuOpsTests
{
    private static float[] Rand(int n, ulong seed)
    {
        var r = new Rng(seed);
        return Enumerable.Range(0, n).Select(_ => r.NextGaussian()).ToArray();
    }

    [TestCase(1, 1, 1)]
    [TestCase(1, 37, 19)]
    [TestCase(7, 100, 300)]
    [TestCase(8, 32, 16)]
    [TestCase(13, 384, 384)]
    [TestCase(9, 33, 17)]
    [TestCase(64, 172, 64)]
    [TestCase(100, 1000, 600)]
    public void Gemm_MatchesNaive(int m, int n, int k)
    {
        var x = Rand(m * k, 1); var w = Rand(n * k, 2); var bias = Rand(m * n, 3);
        foreach (bool accumulate in new[] { false, true })
        {
            var y = accumulate ? (float[])bias.Clone() : Rand(m * n, 4);
            Gemm.MatMulT(x, w, y, m, n, k, accumulate);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                {
                    double s = accumulate ? bias[i * n + j] : 0;
                    for (int t = 0; t < k; t++) s += (double)x[i * k + t] * w[j * k + t];
                    Assert.That(y[i * n + j], Is.EqualTo(s).Within(1e-5 * Math.Sqrt(k) * 4), $"({i},{j}) accumulate={accumulate}");
                }
        }
    }

    [TestCase(37, 100)]     // rows in fours and a remainder; a vector tail and a scalar tail
    [TestCase(1024, 384)]   // above the size where GEMV splits the rows across threads
    public unsafe void Gemv_EqualsOneDotProductPerRow_BitForBit(int n, int k)
    {
        var x = Rand(k, 7); var w = Rand(n * k, 8); var y = new float[n];
        Gemm.MatMulT(x, w, y, 1, n, k);
        fixed (float* px = x, pw = w)
            for (int j = 0; j < n; j++)
                Assert.That(y[j], Is.EqualTo(Simd.Dot(px, pw + (long)j * k, k)), $"row {j}");
    }

    [TestCase(1)]    // GEMV, four rows per pass
    [TestCase(5)]    // GEMV, a dot product per row
    [TestCase(21)]   // packed micro-kernels
    public void Gemm_WithStridedW_EqualsThePackedCopy_BitForBit(int m)
    {
        // W's 37 rows of 19 floats sit 45 apart after an offset of 7, as one KV head does in a [keys, kvDim] cache.
        int n = 37, k = 19, ld = 45, offset = 7;
        var x = Rand(m * k, 11); var strided = Rand(offset + n * ld, 12);
        var packed = new float[n * k];
        for (int r = 0; r < n; r++) Array.Copy(strided, offset + r * ld, packed, r * k, k);
        var expected = new float[m * n]; var actual = new float[m * n];
        Gemm.MatMulT(x, packed, expected, m, n, k);
        Gemm.MatMulT(x, 0, strided, offset, actual, 0, m, n, k, ldw: ld);
        Assert.That(actual, Is.EqualTo(expected), "X·Wᵀ");

        // Not transposed: W is [k rows of n]; here k = 37 rows of n = 19.
        var xn = Rand(m * n, 13);
        var expectedN = new float[m * k]; var actualN = new float[m * k];
        Gemm.MatMul(xn, packed, expectedN, m, k, n);
        Gemm.MatMul(xn, 0, strided, offset, actualN, 0, m, k, n, ldw: ld);
        Assert.That(actualN, Is.EqualTo(expectedN), "X·W");

        Assert.Throws<ArgumentException>(() => Gemm.MatMulT(x, 0, strided, offset + ld, actual, 0, m, n, k, ldw: ld), "the last row runs past W");
        Assert.Throws<ArgumentException>(() => Gemm.MatMulT(x, 0, strided, 0, actual, 0, m, n, k, ldw: k - 1), "a stride shorter than a row");
    }

    [Test]
    public void Gemm_SingleThread_EqualsMultiThread()
    {
        int m = 40, n = 200, k = 700;
        var x = Rand(m * k, 5); var w = Rand(n * k, 6);
        var a = new float[m * n]; var b = new float[m * n];
        int saved = Gemm.Threads;
        try { Gemm.Threads = 1; Gemm.MatMulT(x, w, a, m, n, k); Gemm.Threads = 4; Gemm.MatMulT(x, w, b, m, n, k); }
        finally { Gemm.Threads = saved; }
        Assert.That(b, Is.EqualTo(a), "blocking does not depend on the thread count's split of N");
    }

    [Test]
    public void RmsNorm_MatchesNaive()
    {
        int rows = 3, d = 37;
        var x = Rand(rows * d, 7); var g = Rand(d, 8); var y = new float[rows * d];
        CpuOps.RmsNorm(x, g, y, rows, d, 1e-5f);
        for (int r = 0; r < rows; r++)
        {
            double ms = 0;
            for (int i = 0; i < d; i++) ms += (double)x[r * d + i] * x[r * d + i];
            double inv = 1 / Math.Sqrt(ms / d + 1e-5);
            for (int i = 0; i < d; i++) Assert.That(y[r * d + i], Is.EqualTo(x[r * d + i] * inv * g[i]).Within(1e-5));
        }
    }

    [Test]
    public void Rope_RotatesHalves_ByPositionTimesFrequency()
    {
        int hd = 8, heads = 2, rows = 3, start = 5;
        var x = Rand(rows * heads * hd, 9);
        var y = (float[])x.Clone();
        new Rope(hd, 10000).Apply(y, rows, heads, start);
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < hd / 2; i++)
                {
                    double angle = (start + r) * Math.Pow(10000, -2.0 * i / hd);
                    int o = (r * heads + h) * hd;
                    double a = x[o + i], b = x[o + i + hd / 2];
                    Assert.That(y[o + i], Is.EqualTo(a * Math.Cos(angle) - b * Math.Sin(angle)).Within(1e-5));
                    Assert.That(y[o + i + hd / 2], Is.EqualTo(b * Math.Cos(angle) + a * Math.Sin(angle)).Within(1e-5));
                }
    }

    [TestCase(null)]
    [TestCase(3)]
    public void Attention_MatchesNaiveCausalGqa(int? window)
    {
        int heads = 4, kvHeads = 2, hd = 5, start = 2, tq = 4, total = start + tq;
        var q = Rand(tq * heads * hd, 10); var k = Rand(total * kvHeads * hd, 11); var v = Rand(total * kvHeads * hd, 12);
        var o = new float[tq * heads * hd];
        CpuOps.Attention(q, k, v, o, tq, start, heads, kvHeads, hd, window);
        for (int t = 0; t < tq; t++)
            for (int h = 0; h < heads; h++)
            {
                int kvh = h / (heads / kvHeads), pos = start + t, first = window is int w ? Math.Max(0, pos - w + 1) : 0;
                var scores = new double[pos + 1];
                for (int s = first; s <= pos; s++)
                {
                    double dot = 0;
                    for (int i = 0; i < hd; i++) dot += (double)q[(t * heads + h) * hd + i] * k[(s * kvHeads + kvh) * hd + i];
                    scores[s] = dot / Math.Sqrt(hd);
                }
                double max = scores.Skip(first).Max(), sum = scores.Skip(first).Sum(z => Math.Exp(z - max));
                for (int i = 0; i < hd; i++)
                {
                    double acc = 0;
                    for (int s = first; s <= pos; s++) acc += Math.Exp(scores[s] - max) / sum * v[(s * kvHeads + kvh) * hd + i];
                    Assert.That(o[(t * heads + h) * hd + i], Is.EqualTo(acc).Within(1e-5));
                }
            }
    }

    [TestCase(37, 0, 6, 2, 64, null)]        // one partial tile, GQA
    [TestCase(150, 0, 4, 4, 48, null)]       // three tiles, the last partial
    [TestCase(70, 20, 6, 3, 5, null)]        // after cached positions, odd head_dim
    [TestCase(130, 10, 4, 1, 32, 16)]        // sliding window shorter than a tile
    [TestCase(100, 0, 2, 1, 16, 90)]         // sliding window longer than a tile
    public void AttentionOnGemms_MatchesTheReference(int tq, int start, int heads, int kvHeads, int hd, int? window)
    {
        int total = start + tq;
        var q = Rand(tq * heads * hd, 20); var k = Rand(total * kvHeads * hd, 21); var v = Rand(total * kvHeads * hd, 22);
        var expected = new float[tq * heads * hd];
        CpuOps.Attention(q, k, v, expected, tq, start, heads, kvHeads, hd, window);
        var actual = Enumerable.Repeat(float.NaN, expected.Length).ToArray();
        CpuOps.AttentionOnGemms(q, k, v, actual, tq, start, heads, kvHeads, hd, window);
        for (int i = 0; i < expected.Length; i++) Assert.That(actual[i], Is.EqualTo(expected[i]).Within(2e-6), $"element {i}");
    }

    [Test]
    public void LogSumExp_IsStable()
    {
        Assert.That(CpuOps.LogSumExp([1000f, 1000f]), Is.EqualTo(1000 + Math.Log(2)).Within(1e-3));
        Assert.That(CpuOps.LogSumExp([-1f, 0f, 2f]), Is.EqualTo(Math.Log(Math.Exp(-1) + 1 + Math.Exp(2))).Within(1e-6));
        var rng = new Rng(3);
        foreach (int n in new[] { 8, 37, 32000 })   // the vector loop alone, with a tail, a vocabulary
        {
            var row = Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() - 0.5) * 40).ToArray();
            double max = row.Max(), reference = max + Math.Log(row.Sum(v => Math.Exp(v - max)));
            Assert.That(CpuOps.LogSumExp(row), Is.EqualTo((float)reference).Within(1e-6 * Math.Abs(reference)), $"n = {n}");
        }
        Assert.That(CpuOps.LogSumExp([1f, float.NaN, 2f]), Is.NaN);
    }

    /// <summary>The twins that only the GPU self-test uses: GELU against x·Φ(x) at known values, the gather LayerNorm
    /// against its definition in double (statistics over the whole row, beta optional, every channel when idx is null).</summary>
    [Test]
    public void Gelu_AndGatherLayerNorm_MatchTheirDefinitions()
    {
        float[] x = [-1f, 0.5f, 1f, 2f];
        var y = new float[4];
        CpuOps.Gelu(x, y, 4);
        Assert.That(y, Is.EqualTo(new[] { -0.15865525393145707f, 0.34573123063700656f, 0.8413447460685429f, 1.9544997361036416f }).Within(1e-6f));

        int rows = 3, d = 11;
        var v = Rand(rows * d, 30); var gamma = Rand(d, 31); var beta = Rand(d, 32);
        foreach (int[]? idx in new[] { new[] { 0, 4, 5, 10 }, null })
            foreach (var b in new[] { beta, null })
            {
                int w = idx?.Length ?? d;
                var actual = new float[rows * w];
                CpuOps.GatherLayerNorm(v, gamma, b, idx, actual, rows, d, 1e-5f);
                for (int r = 0; r < rows; r++)
                {
                    var row = v.Skip(r * d).Take(d).Select(e => (double)e).ToArray();
                    double mean = row.Average(), variance = row.Select(e => (e - mean) * (e - mean)).Average();
                    for (int j = 0; j < w; j++)
                    {
                        int c = idx?[j] ?? j;
                        double expected = (row[c] - mean) / Math.Sqrt(variance + 1e-5) * gamma[c] + (b?[c] ?? 0);
                        Assert.That(actual[r * w + j], Is.EqualTo(expected).Within(1e-5), $"row {r} channel {c}, beta {b != null}");
                    }
                }
            }
    }

    [Test]
    public void Embed_RejectsOutOfRangeIds()
    {
        var table = Rand(12, 13);
        Assert.Throws<DispNativeException>(() => CpuOps.Embed(table, [4], new float[3], 3, 4));
        Assert.Throws<DispNativeException>(() => CpuOps.Embed(table, [-1], new float[3], 3, 4));
    }

    /// <summary>transformers' <c>_compute_llama3_parameters</c>: wavelengths shorter than original/high_freq_factor keep
    /// their frequency, longer than original/low_freq_factor are divided by the factor, and the band between is
    /// interpolated. Llama-3.1's values, so all three bands occur.</summary>
    [Test]
    public void Rope_Llama3Scaling_FollowsTransformers()
    {
        var scaling = new Engine.Models.RopeScaling("llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositions: 8192);
        var scaled = new Rope(128, 500000, scaling);
        var plain = new Rope(128, 500000);
        var bands = new int[3];
        for (int i = 0; i < 64; i++)
        {
            double inv = plain.InverseFrequency(i), wavelen = 2 * Math.PI / inv, expected;
            if (wavelen < 8192 / 4.0) { expected = inv; bands[0]++; }
            else if (wavelen > 8192 / 1.0) { expected = inv / 8; bands[2]++; }
            else
            {
                double smooth = (8192 / wavelen - 1) / (4 - 1);
                expected = (1 - smooth) * inv / 8 + smooth * inv;
                bands[1]++;
            }
            Assert.That(scaled.InverseFrequency(i), Is.EqualTo(expected).Within(1e-6 * expected), $"pair {i}");
        }
        Assert.That(bands, Is.All.GreaterThan(0), "high-frequency, interpolated and low-frequency pairs");
        Assert.That(plain.InverseFrequency(1), Is.EqualTo(Math.Pow(500000, -2.0 / 128)).Within(1e-6), "θ^(−2i/d)");
    }

    [Test]
    public void Rope_LinearScaling_DividesEveryFrequencyByTheFactor()
    {
        var scaled = new Rope(64, 10000, new Engine.Models.RopeScaling("linear", 4, 1, 4, 8192));
        var plain = new Rope(64, 10000);
        for (int i = 0; i < 32; i++)
            Assert.That(scaled.InverseFrequency(i), Is.EqualTo(plain.InverseFrequency(i) / 4.0).Within(1e-6 * plain.InverseFrequency(i)), $"pair {i}");
    }
}
