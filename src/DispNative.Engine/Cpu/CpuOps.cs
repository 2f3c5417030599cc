using System.Numerics.Tensors;
using System.Runtime.Intrinsics;

namespace DispNative.Engine.Cpu;

/// <summary>fp32 reference ops on row-major [rows, width] activations. Each is the CPU twin of a GPU kernel.</summary>
public static unsafe class CpuOps
{
    /// <summary>y[r] = x[r] / sqrt(mean(x[r]²) + eps) · gamma.</summary>
    public static void RmsNorm(float[] x, float[] gamma, float[] y, int rows, int d, float eps)
    {
        fixed (float* px = x, pg = gamma, py = y)
            for (int r = 0; r < rows; r++)
            {
                float* xr = px + (long)r * d, yr = py + (long)r * d;
                float ms = Simd.Dot(xr, xr, d) / d;
                float scale = 1f / MathF.Sqrt(ms + eps);
                for (int i = 0; i < d; i++) yr[i] = xr[i] * scale * pg[i];
            }
    }

    /// <summary>DISP gather-norm: y[r, j] = x[r, idx[j]] / sqrt(mean(x[r]²) + eps) · gamma[idx[j]] — the statistics
    /// come from the whole residual row, only the selected channels are written (y is [rows, idx.Length]).</summary>
    public static void GatherRmsNorm(float[] x, float[] gamma, int[] idx, float[] y, int rows, int d, float eps)
    {
        int w = idx.Length;
        fixed (float* px = x, pg = gamma, py = y)
        fixed (int* pi = idx)
            for (int r = 0; r < rows; r++)
            {
                float* xr = px + (long)r * d, yr = py + (long)r * w;
                float scale = 1f / MathF.Sqrt(Simd.Dot(xr, xr, d) / d + eps);
                for (int j = 0; j < w; j++) yr[j] = xr[pi[j]] * scale * pg[pi[j]];
            }
    }

    /// <summary>Gather LayerNorm (OPT/Phi): mean and variance over the whole row, selected channels written:
    /// y[r, j] = (x[r, idx[j]] − μ) / sqrt(σ² + eps) · gamma[idx[j]] + beta[idx[j]]; idx null = dense.</summary>
    public static void GatherLayerNorm(float[] x, float[] gamma, float[]? beta, int[]? idx, float[] y, int rows, int d, float eps)
    {
        int w = idx?.Length ?? d;
        for (int r = 0; r < rows; r++)
        {
            var xr = x.AsSpan(r * d, d);
            double s = 0, ss = 0;
            foreach (var v in xr) { s += v; ss += (double)v * v; }
            float mean = (float)(s / d), scale = 1f / MathF.Sqrt((float)Math.Max(ss / d - (s / d) * (s / d), 0) + eps);
            for (int j = 0; j < w; j++)
            {
                int c = idx?[j] ?? j;
                y[r * w + j] = (xr[c] - mean) * scale * gamma[c] + (beta?[c] ?? 0f);
            }
        }
    }

    /// <summary>Exact GELU: 0.5·x·(1 + erf(x/√2)).</summary>
    public static void Gelu(float[] x, float[] y, int length)
    {
        for (int i = 0; i < length; i++) y[i] = (float)(0.5 * x[i] * (1 + Autograd.SpecialFunctions.Erf(x[i] / Math.Sqrt(2))));
    }

    /// <summary>DISP index-add: x[r, idx[j]] += y[r, j] for unique indices (y is [rows, idx.Length]).</summary>
    public static void IndexAdd(float[] x, float[] y, int[] idx, int rows, int d)
    {
        int w = idx.Length;
        fixed (float* px = x, py = y)
        fixed (int* pi = idx)
            for (int r = 0; r < rows; r++)
            {
                float* xr = px + (long)r * d, yr = py + (long)r * w;
                for (int j = 0; j < w; j++) xr[pi[j]] += yr[j];
            }
    }

    /// <summary>y += x (same length).</summary>
    public static void Add(float[] x, float[] y, int length)
    {
        fixed (float* px = x, py = y) Simd.Axpy(1f, px, py, length);
    }

    /// <summary>Adds a bias row to each of <paramref name="rows"/> rows.</summary>
    public static void AddBias(float[] y, float[] bias, int rows)
    {
        int n = bias.Length;
        fixed (float* py = y, pb = bias)
            for (int r = 0; r < rows; r++) Simd.Axpy(1f, pb, py + (long)r * n, n);
    }

    /// <summary>gate ← silu(gate) · up.</summary>
    public static void SiluMul(float[] gate, float[] up, int length)
    {
        for (int i = 0; i < length; i++)
        {
            float g = gate[i];
            gate[i] = g / (1f + MathF.Exp(-g)) * up[i];
        }
    }

    /// <summary>Output row firstRow + i = embedding row tokens[i].</summary>
    public static void Embed(float[] table, ReadOnlySpan<int> tokens, float[] y, int d, int vocab, int firstRow = 0)
    {
        for (int i = 0; i < tokens.Length; i++)
        {
            int t = tokens[i];
            if ((uint)t >= (uint)vocab) throw new DispNativeException($"token id {t} is outside the vocabulary (size {vocab})");
            Array.Copy(table, (long)t * d, y, (long)(firstRow + i) * d, d);
        }
    }

    /// <summary>log Σ exp(x) over one row, computed stably.</summary>
    /// <remarks>exp and the sum in double, eight values at a time (2.8× the scalar loop over a 32000 vocabulary; the
    /// same results to the float). A NaN anywhere gives NaN.</remarks>
    public static float LogSumExp(ReadOnlySpan<float> row)
    {
        float max = TensorPrimitives.Max(row);
        var shift = Vector256.Create((double)max);
        var sum = Vector256<double>.Zero;
        int i = 0;
        for (; i + 8 <= row.Length; i += 8)
        {
            var (lo, hi) = Vector256.Widen(Vector256.Create(row.Slice(i, 8)));
            sum += Vector256.Exp(lo - shift) + Vector256.Exp(hi - shift);
        }
        double s = Vector256.Sum(sum);
        for (; i < row.Length; i++) s += Math.Exp(row[i] - max);
        return max + (float)Math.Log(s);
    }

    /// <summary>Causal attention of <paramref name="tq"/> new queries (absolute positions start..start+tq-1)
    /// against keys/values 0..start+tq-1 in the cache. GQA: query head h reads kv head h / (heads/kvHeads).
    /// A sliding window, when given, limits each query to the last <paramref name="window"/> keys.</summary>
    public static void Attention(float[] q, float[] kCache, float[] vCache, float[] output, int tq, int start,
        int heads, int kvHeads, int headDim, int? window = null)
    {
        int qDim = heads * headDim, kvDim = kvHeads * headDim, group = heads / kvHeads;
        float scale = 1f / MathF.Sqrt(headDim);
        int total = tq * heads;
        void Body(int item, float[] scores)
        {
            int t = item / heads, h = item % heads, kvh = h / group;
            int pos = start + t;
            int first = window is int w ? Math.Max(0, pos - w + 1) : 0;
            fixed (float* pq = q, pk = kCache, pv = vCache, po = output, ps = scores)
            {
                float* qv = pq + (long)t * qDim + h * headDim;
                float max = float.NegativeInfinity;
                for (int s = first; s <= pos; s++)
                {
                    float sc = Simd.Dot(qv, pk + (long)s * kvDim + kvh * headDim, headDim) * scale;
                    ps[s - first] = sc;
                    if (sc > max) max = sc;
                }
                float sum = 0;
                for (int s = 0; s <= pos - first; s++) { float e = MathF.Exp(ps[s] - max); ps[s] = e; sum += e; }
                float inv = 1f / sum;
                float* ov = po + (long)t * qDim + h * headDim;
                new Span<float>(ov, headDim).Clear();
                for (int s = first; s <= pos; s++) Simd.Axpy(ps[s - first] * inv, pv + (long)s * kvDim + kvh * headDim, ov, headDim);
            }
        }
        int maxKeys = start + tq;
        if ((long)total * maxKeys * headDim < 1 << 18)
        {
            var scores = new float[maxKeys];
            for (int i = 0; i < total; i++) Body(i, scores);
        }
        else
        {
            Parallel.For(0, total, new ParallelOptions { MaxDegreeOfParallelism = Gemm.Threads },
                () => new float[maxKeys], (i, _, scores) => { Body(i, scores); return scores; }, _ => { });
        }
    }

    /// <summary>Rows of queries per tile in <see cref="AttentionOnGemms"/>: each tile computes the scores of every key its
    /// last row sees, so larger tiles waste more of the causal triangle.</summary>
    public const int AttentionTileRows = 64;

    /// <summary><see cref="Attention"/> as GEMMs, for prefill: for each KV head and tile of up to
    /// <see cref="AttentionTileRows"/> query positions, the scores of the group's query rows against the keys the tile can
    /// see (S = Q·Kᵀ), a row softmax within each row's causal (and window) limits, then O = P·V. The (KV head, tile) items
    /// run in parallel, each on one thread. Same result as the reference up to rounding; the reference's dot product
    /// and axpy per (query, key) pair cost more in overhead than these GEMMs spend in arithmetic.</summary>
    public static void AttentionOnGemms(float[] q, float[] kCache, float[] vCache, float[] output, int tq, int start,
        int heads, int kvHeads, int headDim, int? window = null)
    {
        int qDim = heads * headDim, kvDim = kvHeads * headDim, group = heads / kvHeads, keys = start + tq;
        float scale = 1f / MathF.Sqrt(headDim);
        int tiles = (tq + AttentionTileRows - 1) / AttentionTileRows, maxRows = group * Math.Min(tq, AttentionTileRows);
        void Tile(int item, float[] qt, float[] scores, float[] ot)
        {
            // The last tiles see the most keys: they go first.
            int kvh = item % kvHeads, t0 = (tiles - 1 - item / kvHeads) * AttentionTileRows;
            int rows = Math.Min(AttentionTileRows, tq - t0), m = group * rows;
            // Keys [k0, k1) cover every row of the tile; row (g, t) uses [first(t), start + t0 + t].
            int k0 = window is int w0 ? Math.Max(0, start + t0 - w0 + 1) : 0, k1 = start + t0 + rows, n = k1 - k0;
            for (int g = 0; g < group; g++)
                for (int t = 0; t < rows; t++)
                    Array.Copy(q, (long)(t0 + t) * qDim + (kvh * group + g) * headDim, qt, (long)(g * rows + t) * headDim, headDim);
            // The GEMMs read the KV head's keys and values in place: rows kvDim apart in the cache.
            Gemm.MatMulT(qt, 0, kCache, k0 * kvDim + kvh * headDim, scores, 0, m, n, headDim, parallel: false, ldw: kvDim);
            for (int r = 0; r < m; r++)
            {
                int pos = start + t0 + r % rows;
                int first = (window is int w ? Math.Max(0, pos - w + 1) : 0) - k0, last = pos - k0;
                var row = scores.AsSpan(r * n, n);
                row[..first].Clear();
                row[(last + 1)..].Clear();
                var live = row[first..(last + 1)];
                TensorPrimitives.Multiply(live, scale, live);
                TensorPrimitives.Subtract(live, TensorPrimitives.Max(live), live);
                TensorPrimitives.Exp(live, live);
                TensorPrimitives.Multiply(live, 1f / TensorPrimitives.Sum(live), live);
            }
            Gemm.MatMul(scores, 0, vCache, k0 * kvDim + kvh * headDim, ot, 0, m, headDim, n, parallel: false, ldw: kvDim);
            for (int g = 0; g < group; g++)
                for (int t = 0; t < rows; t++)
                    Array.Copy(ot, (long)(g * rows + t) * headDim, output, (long)(t0 + t) * qDim + (kvh * group + g) * headDim, headDim);
        }
        WorkTeam.For(kvHeads * tiles, Gemm.Threads, item =>
            Tile(item, Gemm.ThreadBuffer(ref _tileQ, maxRows * headDim), Gemm.ThreadBuffer(ref _tileScores, (long)maxRows * keys),
                Gemm.ThreadBuffer(ref _tileO, maxRows * headDim)));
    }

    // Per-thread tiles of AttentionOnGemms, kept between calls: fresh arrays for every layer's prefill cost more in page
    // faults and clearing than the tiles' arithmetic.
    [ThreadStatic] private static float[]? _tileQ, _tileScores, _tileO;
}

/// <summary>Rotary position embedding with half rotation (Hugging Face): pair (i, i + headDim/2).
/// Frequencies follow transformers in fp32, including linear and llama3 scaling.</summary>
public sealed class Rope
{
    private readonly float[] _invFreq;
    private readonly int _headDim;

    public Rope(int headDim, double theta, Models.RopeScaling? scaling = null)
    {
        _headDim = headDim;
        int half = headDim / 2;
        _invFreq = new float[half];
        for (int i = 0; i < half; i++)
        {
            float exponent = (float)(2 * i) / headDim;
            double inv = (float)(1.0 / Math.Pow(theta, exponent));
            if (scaling is { Type: "linear" } lin) inv /= lin.Factor;
            else if (scaling is { Type: "llama3" } l3)
            {
                double lowWavelen = l3.OriginalMaxPositions / l3.LowFreqFactor, highWavelen = l3.OriginalMaxPositions / l3.HighFreqFactor;
                double wavelen = 2 * Math.PI / inv;
                if (wavelen > lowWavelen) inv /= l3.Factor;
                else if (wavelen >= highWavelen)
                {
                    double smooth = (l3.OriginalMaxPositions / wavelen - l3.LowFreqFactor) / (l3.HighFreqFactor - l3.LowFreqFactor);
                    inv = (1 - smooth) * inv / l3.Factor + smooth * inv;
                }
            }
            _invFreq[i] = (float)inv;
        }
    }

    public int HeadDim => _headDim;

    /// <summary>Inverse frequency of rotation pair i (what the GPU kernel multiplies the position by).</summary>
    public float InverseFrequency(int i) => _invFreq[i];

    /// <summary>cos and sin of angle (position · inverse frequency) for one position, as the forward uses them (from the
    /// cached table).</summary>
    public void Angles(int position, Span<float> cos, Span<float> sin)
    {
        var table = TableFor(position + 1);
        int half = _invFreq.Length;
        table.Cos.AsSpan(position * half, half).CopyTo(cos);
        table.Sin.AsSpan(position * half, half).CopyTo(sin);
    }

    private void ComputeAngles(int position, Span<float> cos, Span<float> sin)
    {
        float pos = position;
        for (int i = 0; i < _invFreq.Length; i++)
        {
            float angle = pos * _invFreq[i];
            cos[i] = MathF.Cos(angle);
            sin[i] = MathF.Sin(angle);
        }
    }

    /// <summary>cos and sin of every pair for positions [0, Positions), row-major.</summary>
    private sealed record AngleTable(int Positions, float[] Cos, float[] Sin);

    private AngleTable _table = new(0, [], []);

    /// <summary>A table covering <paramref name="positions"/>, grown by doubling. Concurrent callers may each build one;
    /// they hold the same values, and the reference swap publishes a whole table.</summary>
    private AngleTable TableFor(int positions)
    {
        var table = _table;
        if (table.Positions >= positions) return table;
        int n = Math.Max(positions, Math.Max(256, 2 * table.Positions)), half = _invFreq.Length;
        var (cos, sin) = (new float[(long)n * half], new float[(long)n * half]);
        for (int p = 0; p < n; p++) ComputeAngles(p, cos.AsSpan(p * half, half), sin.AsSpan(p * half, half));
        return _table = new AngleTable(n, cos, sin);
    }

    /// <summary>Rotates each head of each row in place; row r has absolute position start + r.</summary>
    public void Apply(float[] x, int rows, int heads, int start)
    {
        int half = _headDim / 2, width = heads * _headDim;
        var table = TableFor(start + rows);
        for (int r = 0; r < rows; r++)
        {
            var cos = table.Cos.AsSpan((start + r) * half, half);
            var sin = table.Sin.AsSpan((start + r) * half, half);
            for (int h = 0; h < heads; h++)
            {
                int o = r * width + h * _headDim;
                for (int i = 0; i < half; i++)
                {
                    float a = x[o + i], b = x[o + i + half];
                    x[o + i] = a * cos[i] - b * sin[i];
                    x[o + i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}
