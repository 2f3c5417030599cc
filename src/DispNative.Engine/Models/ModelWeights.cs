using DispNative.Engine.IO;

namespace DispNative.Engine.Models;

/// <summary>fp32 weights of one decoder layer. Matrices are row-major [out, in] (Hugging Face layout). In a DISP-pruned
/// layer the matrices are sliced and the index arrays (sorted channel ids of the full embedding / MLP width) say
/// which channels each one reads or writes; dense layers have no indices.</summary>
public sealed class LayerWeights
{
    public required float[] AttnNorm { get; init; }
    public required float[] Wq { get; init; }
    public required float[] Wk { get; init; }
    public required float[] Wv { get; init; }
    public required float[] Wo { get; init; }
    public float[]? Bq { get; init; }
    public float[]? Bk { get; init; }
    public float[]? Bv { get; init; }
    public float[]? Bo { get; init; }
    public required float[] MlpNorm { get; init; }
    public required float[] WGate { get; init; }
    public required float[] WUp { get; init; }
    public required float[] WDown { get; init; }
    public int[]? AttnInIdx { get; init; }
    public int[]? AttnOutIdx { get; init; }
    public int[]? MlpInIdx { get; init; }
    public int[]? MlpMidIdx { get; init; }
    public int[]? MlpOutIdx { get; init; }

    public bool IsPruned => AttnInIdx != null;

    /// <summary>The index arrays in site order (attn_in, attn_out, mlp_in, mlp_mid, mlp_out), or null when dense.</summary>
    public int[][]? Indices => IsPruned ? [AttnInIdx!, AttnOutIdx!, MlpInIdx!, MlpMidIdx!, MlpOutIdx!] : null;
}

/// <summary>All fp32 weights of a LLaMA-family model, dense or DISP-pruned.</summary>
public sealed class ModelWeights
{
    public required float[] Embedding { get; init; }
    public required LayerWeights[] Layers { get; init; }
    public required float[] FinalNorm { get; init; }
    /// <summary>[vocab, d]; the same array as <see cref="Embedding"/> when tied.</summary>
    public required float[] LmHead { get; init; }

    /// <summary>Names of the per-layer index tensors of a pruned model, in site order.</summary>
    public static readonly string[] IndexTensorNames = ["disp.attn_in_idx", "disp.attn_out_idx", "disp.mlp_in_idx", "disp.mlp_mid_idx", "disp.mlp_out_idx"];

    /// <summary>The one table of a layer's Hugging Face tensors: name, shape for the layer's widths, and which array of
    /// <see cref="LayerWeights"/> holds it.</summary>
    internal static IEnumerable<(string Name, long[] Shape, Func<LayerWeights, float[]?> Value)> LayerTensors(ModelConfig c, int layer)
    {
        var widths = c.LayerWidths(layer);
        long ai = widths[0], ao = widths[1], mi = widths[2], mm = widths[3], mo = widths[4], d = c.HiddenSize, q = c.QDim, kv = c.KvDim;
        yield return ("input_layernorm.weight", [d], w => w.AttnNorm);
        yield return ("self_attn.q_proj.weight", [q, ai], w => w.Wq);
        yield return ("self_attn.k_proj.weight", [kv, ai], w => w.Wk);
        yield return ("self_attn.v_proj.weight", [kv, ai], w => w.Wv);
        yield return ("self_attn.o_proj.weight", [ao, q], w => w.Wo);
        if (c.QkvBias)
        {
            yield return ("self_attn.q_proj.bias", [q], w => w.Bq);
            yield return ("self_attn.k_proj.bias", [kv], w => w.Bk);
            yield return ("self_attn.v_proj.bias", [kv], w => w.Bv);
        }
        if (c.OutputBias) yield return ("self_attn.o_proj.bias", [ao], w => w.Bo);
        yield return ("post_attention_layernorm.weight", [d], w => w.MlpNorm);
        yield return ("mlp.gate_proj.weight", [mm, mi], w => w.WGate);
        yield return ("mlp.up_proj.weight", [mm, mi], w => w.WUp);
        yield return ("mlp.down_proj.weight", [mo, mm], w => w.WDown);
    }

    /// <summary>The layer index of a tensor named <c>model.layers.N.…</c>, else -1.</summary>
    private static int LayerOf(string name)
    {
        const string prefix = "model.layers.";
        if (!name.StartsWith(prefix, StringComparison.Ordinal)) return -1;
        int end = name.IndexOf('.', prefix.Length);
        return end > prefix.Length && int.TryParse(name.AsSpan(prefix.Length, end - prefix.Length), out int l) ? l : -1;
    }

    /// <summary>Loads the Hugging Face tensor names, checking every shape against the config; a pruned model's
    /// index tensors are validated (unique, sorted, in range, matching the widths).</summary>
    public static ModelWeights Load(SafeTensorsCheckpoint ckpt, ModelConfig c) => Load(LayerwiseWeights.Read(ckpt, c), c);

    /// <summary>All parts of <paramref name="source"/>, the layers read in parallel. A tied model's checkpoint that also
    /// stores <c>lm_head.weight</c> keeps it where it differs from the embedding, and drops an identical copy (as
    /// transformers' tie_weights does).</summary>
    public static ModelWeights Load(LayerwiseWeights source, ModelConfig c)
    {
        var layers = new LayerWeights[c.NumLayers];
        ParallelRethrow(c.NumLayers, l => layers[l] = source.Layer(l));
        var embed = source.Embedding();
        var head = source.OwnLmHead?.Invoke();
        if (head != null && c.TieWordEmbeddings && head.AsSpan().SequenceEqual(embed)) head = null;
        return new ModelWeights { Embedding = embed, Layers = layers, FinalNorm = source.FinalNorm(), LmHead = head ?? embed };
    }

    /// <summary>A checkpoint with more layers than the config names is refused (they would be ignored silently).</summary>
    public static void CheckLayerCount(SafeTensorsCheckpoint ckpt, ModelConfig c)
    {
        int layersInCheckpoint = ckpt.Names.Select(LayerOf).DefaultIfEmpty(-1).Max() + 1;
        if (layersInCheckpoint > c.NumLayers)
            throw new ModelFormatException($"{ckpt.Source}: the checkpoint holds {layersInCheckpoint} layers, config.json's num_hidden_layers says {c.NumLayers}");
    }

    /// <summary>Layer <paramref name="l"/>'s tensors, shapes checked, and a pruned layer's validated index tensors.</summary>
    public static LayerWeights LoadLayer(SafeTensorsCheckpoint ckpt, ModelConfig c, int l)
    {
        string p = $"model.layers.{l}.";
        var t = LayerTensors(c, l).ToDictionary(e => e.Name, e => ckpt.ReadFloat32(p + e.Name, e.Shape));
        int[][]? idx = null;
        if (c.Disp != null)
        {
            var widths = c.LayerWidths(l);
            idx = new int[IndexTensorNames.Length][];
            for (int i = 0; i < idx.Length; i++)
            {
                string name = p + IndexTensorNames[i];
                if (!ckpt.Contains(name)) throw new ModelFormatException($"{ckpt.Source}: pruned model lacks index tensor '{name}'");
                idx[i] = ckpt.ReadInt32(name);
                int full = i == 3 ? c.IntermediateSize : c.HiddenSize;
                ValidateIndices(idx[i], widths[i], full, $"{ckpt.Source}: '{name}'");
            }
        }
        return new LayerWeights
        {
            AttnNorm = t["input_layernorm.weight"], Wq = t["self_attn.q_proj.weight"], Wk = t["self_attn.k_proj.weight"],
            Wv = t["self_attn.v_proj.weight"], Wo = t["self_attn.o_proj.weight"],
            Bq = t.GetValueOrDefault("self_attn.q_proj.bias"), Bk = t.GetValueOrDefault("self_attn.k_proj.bias"),
            Bv = t.GetValueOrDefault("self_attn.v_proj.bias"), Bo = t.GetValueOrDefault("self_attn.o_proj.bias"),
            MlpNorm = t["post_attention_layernorm.weight"], WGate = t["mlp.gate_proj.weight"], WUp = t["mlp.up_proj.weight"],
            WDown = t["mlp.down_proj.weight"],
            AttnInIdx = idx?[0], AttnOutIdx = idx?[1], MlpInIdx = idx?[2], MlpMidIdx = idx?[3], MlpOutIdx = idx?[4],
        };
    }

    /// <summary>Indices must be strictly increasing (sorted and unique), within [0, full), and as many as the width.</summary>
    public static void ValidateIndices(int[] idx, int width, int full, string what)
    {
        if (idx.Length != width) throw new ModelFormatException($"{what} has {idx.Length} indices but the config says width {width}");
        for (int i = 0; i < idx.Length; i++)
        {
            if (idx[i] < 0 || idx[i] >= full) throw new ModelFormatException($"{what}: index {idx[i]} at position {i} is outside 0..{full - 1}");
            if (i > 0 && idx[i] <= idx[i - 1])
                throw new ModelFormatException($"{what}: indices must be sorted and unique ({idx[i - 1]} then {idx[i]} at position {i})");
        }
    }

    /// <summary>Parallel.For that rethrows the first error itself rather than an AggregateException, so a
    /// checkpoint problem reaches the user as the clear message it was raised with.</summary>
    private static void ParallelRethrow(int count, Action<int> body)
    {
        try { Parallel.For(0, count, body); }
        catch (AggregateException e) when (e.InnerExceptions.Count > 0)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e.InnerExceptions[0]).Throw();
        }
    }

    /// <summary>The weights as Hugging Face named tensors (plus the index tensors of pruned layers), stored in <paramref name="dtype"/>.</summary>
    public IEnumerable<TensorData> ToTensors(ModelConfig c, DType dtype) => LayerwiseWeights.Of(this).Tensors(c, dtype).Select(t => t.Produce());

    /// <summary>Random weights (N(0, std)) with unit norms, for tests and benchmarks.</summary>
    public static ModelWeights Random(ModelConfig c, ulong seed, float std = 0.02f)
    {
        var rng = new Rng(seed);
        float[] R(long n) { var a = new float[n]; for (long i = 0; i < n; i++) a[i] = std * rng.NextGaussian(); return a; }
        float[] Ones(long n) { var a = new float[n]; Array.Fill(a, 1f); return a; }
        long d = c.HiddenSize, f = c.IntermediateSize, q = c.QDim, kv = c.KvDim;
        var layers = new LayerWeights[c.NumLayers];
        for (int l = 0; l < c.NumLayers; l++)
            layers[l] = new LayerWeights
            {
                AttnNorm = Ones(d), Wq = R(q * d), Wk = R(kv * d), Wv = R(kv * d), Wo = R(d * q),
                Bq = c.QkvBias ? R(q) : null, Bk = c.QkvBias ? R(kv) : null, Bv = c.QkvBias ? R(kv) : null,
                Bo = c.OutputBias ? R(d) : null,
                MlpNorm = Ones(d), WGate = R(f * d), WUp = R(f * d), WDown = R(d * f),
            };
        var embed = R(c.VocabSize * d);
        return new ModelWeights { Embedding = embed, Layers = layers, FinalNorm = Ones(d), LmHead = c.TieWordEmbeddings ? embed : R(c.VocabSize * d) };
    }
}

/// <summary>A model's f32 weights handed out part by part, each part made when it is asked for: from a
/// <see cref="ModelWeights"/> in memory, or read from a checkpoint, so that what goes layer by layer (the upload to a GPU,
/// the pruner's save) never holds the whole model on the host. <see cref="OwnLmHead"/> null: the head is the embedding.</summary>
public sealed record LayerwiseWeights(Func<float[]> Embedding, Func<int, LayerWeights> Layer, Func<float[]> FinalNorm, Func<float[]>? OwnLmHead)
{
    public static LayerwiseWeights Of(ModelWeights w) =>
        new(() => w.Embedding, l => w.Layers[l], () => w.FinalNorm, ReferenceEquals(w.LmHead, w.Embedding) ? null : () => w.LmHead);

    /// <summary>Parts read from <paramref name="ckpt"/> (open while they are asked for), shapes and index tensors checked as
    /// each is read; the checkpoint's layer count is checked against the config here.</summary>
    public static LayerwiseWeights Read(SafeTensorsCheckpoint ckpt, ModelConfig c)
    {
        ModelWeights.CheckLayerCount(ckpt, c);
        // The LM head is a tensor of its own unless tied with no separate copy stored.
        bool ownLmHead = !c.TieWordEmbeddings || ckpt.Contains("lm_head.weight");
        return new(() => ckpt.ReadFloat32("model.embed_tokens.weight", c.VocabSize, c.HiddenSize), l => ModelWeights.LoadLayer(ckpt, c, l),
            () => ckpt.ReadFloat32("model.norm.weight", c.HiddenSize),
            ownLmHead ? () => ckpt.ReadFloat32("lm_head.weight", c.VocabSize, c.HiddenSize) : null);
    }

    /// <summary>The Hugging Face named tensors of a model of <paramref name="c"/> (plus a pruned model's index tensors) in
    /// file order, each made in <paramref name="dtype"/> when its bytes are asked for. Asked for in that order, each layer is
    /// made once, at its first tensor, and let go of at the next layer's.</summary>
    public IEnumerable<PendingTensor> Tensors(ModelConfig c, DType dtype)
    {
        int current = -1;
        LayerWeights? held = null;
        LayerWeights LayerAt(int l)
        {
            if (current != l) { held = null; held = Layer(l); current = l; }
            return held!;
        }
        long d = c.HiddenSize;
        yield return PendingTensor.FromFloat("model.embed_tokens.weight", Embedding, [c.VocabSize, d], dtype);
        for (int l = 0; l < c.NumLayers; l++)
        {
            int layer = l;
            string p = $"model.layers.{l}.";
            foreach (var (name, shape, value) in ModelWeights.LayerTensors(c, l))
                yield return PendingTensor.FromFloat(p + name, () => value(LayerAt(layer)) ?? throw new InvalidOperationException($"layer {layer} lacks {name}"), shape, dtype);
            if (c.Disp == null) continue;
            var widths = c.LayerWidths(l);
            for (int i = 0; i < ModelWeights.IndexTensorNames.Length; i++)
            {
                int site = i;
                yield return PendingTensor.FromInt32(p + ModelWeights.IndexTensorNames[i],
                    () => LayerAt(layer).Indices?[site] ?? throw new InvalidOperationException($"layer {layer} has no indices"), [widths[i]]);
            }
        }
        yield return PendingTensor.FromFloat("model.norm.weight", FinalNorm, [d], dtype);
        if (OwnLmHead != null) yield return PendingTensor.FromFloat("lm_head.weight", OwnLmHead, [c.VocabSize, d], dtype);
    }
}
