using System.Collections.Concurrent;
using DispNative.Engine.Cpu;
using DispNative.Engine.Models;

namespace DispNative.Engine.Inference;

/// <summary>fp32 CPU forward pass of a LLaMA-family decoder: embedding → [RMSNorm → q/k/v → RoPE → causal GQA
/// attention → o_proj → residual → RMSNorm → SwiGLU MLP → residual] × L → RMSNorm → LM head.
/// DISP-pruned layers read their channels with a gather-norm, run sliced GEMMs and index-add their outputs
/// into the full residual stream.
/// Weights are read-only and every forward takes its own activation workspace: concurrent forwards are safe, each
/// with its own <see cref="KvCache"/>.</summary>
public sealed class LlamaModel : ICausalLanguageModel
{
    private readonly Rope _rope;

    public ModelConfig Config { get; }
    public ModelWeights Weights { get; }

    public LlamaModel(ModelConfig config, ModelWeights weights)
    {
        Config = config;
        Weights = weights;
        _rope = new Rope(config.HeadDim, config.RopeTheta, config.RopeScaling);
    }

    /// <summary>Query rows from which attention runs as GEMMs (<see cref="CpuOps.AttentionOnGemms"/>); decode steps use the
    /// row-by-row reference.</summary>
    public const int GemmAttentionMinRows = 16;

    public KvCache NewCache(int capacity) => new(Config, capacity);

    public string DeviceName => "cpu";

    IInferenceCache ICausalLanguageModel.NewCache(int capacity) => NewCache(capacity);

    float[] ICausalLanguageModel.Forward(ReadOnlySpan<int> tokens, IInferenceCache cache, bool lastOnly)
        => Forward(tokens, cache as KvCache ?? throw new ArgumentException("the CPU model needs a CPU KV cache"), lastOnly);

    /// <summary>Appends <paramref name="tokens"/> to one sequence and returns its logits,
    /// [tokens, vocab] or, with <paramref name="lastOnly"/>, [1, vocab].</summary>
    public float[] Forward(ReadOnlySpan<int> tokens, KvCache cache, bool lastOnly = false)
        => Forward([tokens.ToArray()], [cache], lastOnly)[0];

    /// <summary>Appends each token list to its own cache. All rows go through the GEMMs together;
    /// attention stays per sequence. Returns logits per sequence.</summary>
    public float[][] Forward(IReadOnlyList<int[]> batch, IReadOnlyList<KvCache> caches, bool lastOnly = false)
    {
        if (batch.Count != caches.Count) throw new ArgumentException("one KV cache per sequence is required");
        var offsets = new int[batch.Count + 1];
        for (int b = 0; b < batch.Count; b++)
        {
            int len = batch[b].Length;
            if (len == 0) throw new InvalidSettingException($"sequence {b} of the batch is empty");
            if (caches[b].Length + len > caches[b].Capacity)
                throw new InvalidSettingException($"sequence {b}: {caches[b].Length + len} positions exceed the KV cache capacity {caches[b].Capacity}");
            offsets[b + 1] = offsets[b] + len;
        }
        int rows = offsets[^1];

        var ws = RentWorkspace(rows);
        try { return Forward(batch, caches, lastOnly, offsets, ws); }
        finally { ReturnWorkspace(ws); }
    }

    private float[][] Forward(IReadOnlyList<int[]> batch, IReadOnlyList<KvCache> caches, bool lastOnly, int[] offsets, Workspace ws)
    {
        var c = Config;
        int d = c.HiddenSize, f = c.IntermediateSize, qd = c.QDim, kvd = c.KvDim, rows = offsets[^1];
        var (x, h, q, k, v, att, gate, up, delta) = (ws.X, ws.H, ws.Q, ws.K, ws.V, ws.Att, ws.Gate, ws.Up, ws.Delta);
        for (int b = 0; b < batch.Count; b++) CpuOps.Embed(Weights.Embedding, batch[b], x, d, c.VocabSize, offsets[b]);

        for (int l = 0; l < c.NumLayers; l++)
        {
            var w = Weights.Layers[l];
            // With lastOnly, the last layer needs every row's keys and values (for the cache) but the rest of the layer
            // only for each sequence's last row: its queries, attention, output projection and MLP run on those rows
            // (nothing to do where every sequence is one row: a decode step).
            bool lastRowsOnly = lastOnly && l == c.NumLayers - 1 && rows > batch.Count;
            int attnIn = w.AttnInIdx?.Length ?? d;
            Norm(x, w.AttnNorm, w.AttnInIdx, h, rows);
            Gemm.MatMulT(h, w.Wk, k, rows, kvd, attnIn);
            Gemm.MatMulT(h, w.Wv, v, rows, kvd, attnIn);
            if (lastRowsOnly)
            {
                KeepLastRows(h, offsets, attnIn);
                KeepLastRows(x, offsets, d);
            }
            int qRows = lastRowsOnly ? batch.Count : rows;
            Gemm.MatMulT(h, w.Wq, q, qRows, qd, attnIn);
            if (w.Bq != null) { CpuOps.AddBias(q, w.Bq, qRows); CpuOps.AddBias(k, w.Bk!, rows); CpuOps.AddBias(v, w.Bv!, rows); }
            for (int b = 0; b < batch.Count; b++)
            {
                var cache = caches[b];
                int start = cache.Length, len = offsets[b + 1] - offsets[b];
                // The queries: every row of the sequence, or its last one (row b of q, at position start + len - 1).
                int qRow = lastRowsOnly ? b : offsets[b], qLen = lastRowsOnly ? 1 : len, qStart = start + len - qLen;
                // One sequence works on the batch buffers themselves; several copy their rows out and back.
                bool whole = batch.Count == 1;
                var qs = whole ? q : Slice(q, qRow, qLen, qd);
                var ks = whole ? k : Slice(k, offsets[b], len, kvd);
                _rope.Apply(qs, qLen, c.NumHeads, qStart);
                _rope.Apply(ks, len, c.NumKvHeads, start);
                Array.Copy(ks, 0, cache.K[l], (long)start * kvd, (long)len * kvd);
                Array.Copy(v, (long)offsets[b] * kvd, cache.V[l], (long)start * kvd, (long)len * kvd);
                var ao = whole ? att : new float[(long)qLen * qd];
                if (qLen >= GemmAttentionMinRows) CpuOps.AttentionOnGemms(qs, cache.K[l], cache.V[l], ao, qLen, qStart, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
                else CpuOps.Attention(qs, cache.K[l], cache.V[l], ao, qLen, qStart, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
                if (!whole) Array.Copy(ao, 0, att, (long)qRow * qd, ao.Length);
            }
            rows = qRows;
            Residual(x, att, w.Wo, w.Bo, w.AttnOutIdx, delta, rows, qd);

            int mlpIn = w.MlpInIdx?.Length ?? d, mid = w.MlpMidIdx?.Length ?? f;
            Norm(x, w.MlpNorm, w.MlpInIdx, h, rows);
            Gemm.MatMulT(h, w.WGate, gate, rows, mid, mlpIn);
            Gemm.MatMulT(h, w.WUp, up, rows, mid, mlpIn);
            CpuOps.SiluMul(gate, up, rows * mid);
            Residual(x, gate, w.WDown, null, w.MlpOutIdx, delta, rows, mid);
        }
        for (int b = 0; b < batch.Count; b++) caches[b].Length += batch[b].Length;

        // x holds every row, or with lastOnly each sequence's last row as row b (a config has at least one layer).
        CpuOps.RmsNorm(x, Weights.FinalNorm, h, rows, d, c.RmsNormEps);
        var result = new float[batch.Count][];
        for (int b = 0; b < batch.Count; b++)
        {
            int first = lastOnly ? b : offsets[b], n = lastOnly ? 1 : offsets[b + 1] - first;
            result[b] = new float[(long)n * c.VocabSize];
            Gemm.MatMulT(h, first * d, Weights.LmHead, 0, result[b], 0, n, c.VocabSize, d);
        }
        return result;
    }

    /// <summary>Moves each sequence's last row (row offsets[b + 1] - 1 of rows <paramref name="width"/> wide) to row b.
    /// Row b is never after its source, and sources only grow with b, so no source is overwritten before it is read.</summary>
    private static void KeepLastRows(float[] a, int[] offsets, int width)
    {
        for (int b = 0; b + 1 < offsets.Length; b++)
            Array.Copy(a, (long)(offsets[b + 1] - 1) * width, a, (long)b * width, width);
    }

    /// <summary>The activations of one forward, for up to <see cref="Rows"/> rows: every op writes the rows it uses before
    /// reading them, so a reused workspace needs no clearing.</summary>
    private sealed class Workspace
    {
        public readonly int Rows;
        public readonly float[] X, H, Q, K, V, Att, Gate, Up, Delta;

        public Workspace(ModelConfig c, int rows)
        {
            Rows = rows;
            long r = rows;
            X = new float[r * c.HiddenSize]; H = new float[r * c.HiddenSize]; Delta = new float[r * c.HiddenSize];
            Q = new float[r * c.QDim]; Att = new float[r * c.QDim];
            K = new float[r * c.KvDim]; V = new float[r * c.KvDim];
            Gate = new float[r * c.WidestMlpMiddle]; Up = new float[r * c.WidestMlpMiddle];
        }

        public long Bytes => 4L * (X.Length + H.Length + Delta.Length + Q.Length + Att.Length + K.Length + V.Length + Gate.Length + Up.Length);
    }

    /// <summary>Workspaces kept between forwards (each forward takes its own, so concurrent ones never share): fresh
    /// multi-MiB arrays every call cost the kernel a page fault per 4 KiB and the GC a clear.</summary>
    private readonly ConcurrentBag<Workspace> _workspaces = [];
    private const int MaxPooledWorkspaces = 4;
    private const long MaxPooledWorkspaceBytes = 256L << 20;

    private Workspace RentWorkspace(int rows)
    {
        // Smaller ones than needed are dropped: the pool keeps the sizes this model is actually run at.
        while (_workspaces.TryTake(out var ws)) if (ws.Rows >= rows) return ws;
        return new Workspace(Config, rows);
    }

    private void ReturnWorkspace(Workspace ws)
    {
        if (ws.Bytes <= MaxPooledWorkspaceBytes && _workspaces.Count < MaxPooledWorkspaces) _workspaces.Add(ws);
    }

    /// <summary>RMSNorm of the full rows, or the DISP gather-norm of the selected channels.</summary>
    private void Norm(float[] x, float[] gamma, int[]? idx, float[] h, int rows)
    {
        if (idx == null) CpuOps.RmsNorm(x, gamma, h, rows, Config.HiddenSize, Config.RmsNormEps);
        else CpuOps.GatherRmsNorm(x, gamma, idx, h, rows, Config.HiddenSize, Config.RmsNormEps);
    }

    /// <summary>x += input · Wᵀ (+ b): straight into the residual when dense; through <paramref name="delta"/> and an
    /// index-add into the selected channels when pruned.</summary>
    private void Residual(float[] x, float[] input, float[] w, float[]? bias, int[]? idx, float[] delta, int rows, int k)
    {
        int d = Config.HiddenSize;
        if (idx == null)
        {
            Gemm.MatMulT(input, w, x, rows, d, k, accumulate: true);
            if (bias != null) CpuOps.AddBias(x, bias, rows);
            return;
        }
        Gemm.MatMulT(input, w, delta, rows, idx.Length, k);
        if (bias != null) CpuOps.AddBias(delta, bias, rows);
        CpuOps.IndexAdd(x, delta, idx, rows, d);
    }

    private static float[] Slice(float[] src, int row, int rows, int width)
    {
        var r = new float[(long)rows * width];
        Array.Copy(src, (long)row * width, r, 0, r.Length);
        return r;
    }
}
