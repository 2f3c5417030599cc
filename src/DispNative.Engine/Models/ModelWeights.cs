using DispNative.Engine.IO;

namespace DispNative.Engine.Models;

/// <summary>fp32 weights of one decoder layer. Matrices are row-major [out, in] (Hugging Face layout).</summary>
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
}

/// <summary>All fp32 weights of a LLaMA-family model.</summary>
public sealed class ModelWeights
{
    public required float[] Embedding { get; init; }
    public required LayerWeights[] Layers { get; init; }
    public required float[] FinalNorm { get; init; }
    /// <summary>[vocab, d]; the same array as <see cref="Embedding"/> when tied.</summary>
    public required float[] LmHead { get; init; }

    /// <summary>Loads the Hugging Face tensor names, checking every shape against the config.</summary>
    public static ModelWeights Load(SafeTensorsCheckpoint ckpt, ModelConfig c)
    {
        long d = c.HiddenSize, f = c.IntermediateSize, q = c.QDim, kv = c.KvDim;
        var layers = new LayerWeights[c.NumLayers];
        ParallelRethrow(c.NumLayers, l =>
        {
            string p = $"model.layers.{l}.";
            float[]? Bias(string name, long n, bool present) => present ? ckpt.ReadFloat32(p + name, n) : null;
            layers[l] = new LayerWeights
            {
                AttnNorm = ckpt.ReadFloat32(p + "input_layernorm.weight", d),
                Wq = ckpt.ReadFloat32(p + "self_attn.q_proj.weight", q, d),
                Wk = ckpt.ReadFloat32(p + "self_attn.k_proj.weight", kv, d),
                Wv = ckpt.ReadFloat32(p + "self_attn.v_proj.weight", kv, d),
                Wo = ckpt.ReadFloat32(p + "self_attn.o_proj.weight", d, q),
                Bq = Bias("self_attn.q_proj.bias", q, c.QkvBias),
                Bk = Bias("self_attn.k_proj.bias", kv, c.QkvBias),
                Bv = Bias("self_attn.v_proj.bias", kv, c.QkvBias),
                Bo = Bias("self_attn.o_proj.bias", d, c.OutputBias),
                MlpNorm = ckpt.ReadFloat32(p + "post_attention_layernorm.weight", d),
                WGate = ckpt.ReadFloat32(p + "mlp.gate_proj.weight", f, d),
                WUp = ckpt.ReadFloat32(p + "mlp.up_proj.weight", f, d),
                WDown = ckpt.ReadFloat32(p + "mlp.down_proj.weight", d, f),
            };
        });
        var embed = ckpt.ReadFloat32("model.embed_tokens.weight", c.VocabSize, d);
        float[] head = c.TieWordEmbeddings && !ckpt.Contains("lm_head.weight")
            ? embed
            : ckpt.ReadFloat32("lm_head.weight", c.VocabSize, d);
        return new ModelWeights
        {
            Embedding = embed,
            Layers = layers,
            FinalNorm = ckpt.ReadFloat32("model.norm.weight", d),
            LmHead = head,
        };
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

    /// <summary>The weights as Hugging Face named tensors, stored in <paramref name="dtype"/>.</summary>
    public IEnumerable<TensorData> ToTensors(ModelConfig c, DType dtype)
    {
        long d = c.HiddenSize, f = c.IntermediateSize, q = c.QDim, kv = c.KvDim;
        yield return TensorData.FromFloat("model.embed_tokens.weight", Embedding, [c.VocabSize, d], dtype);
        for (int l = 0; l < Layers.Length; l++)
        {
            var w = Layers[l];
            string p = $"model.layers.{l}.";
            yield return TensorData.FromFloat(p + "input_layernorm.weight", w.AttnNorm, [d], dtype);
            yield return TensorData.FromFloat(p + "self_attn.q_proj.weight", w.Wq, [q, d], dtype);
            yield return TensorData.FromFloat(p + "self_attn.k_proj.weight", w.Wk, [kv, d], dtype);
            yield return TensorData.FromFloat(p + "self_attn.v_proj.weight", w.Wv, [kv, d], dtype);
            yield return TensorData.FromFloat(p + "self_attn.o_proj.weight", w.Wo, [d, q], dtype);
            if (w.Bq != null) yield return TensorData.FromFloat(p + "self_attn.q_proj.bias", w.Bq, [q], dtype);
            if (w.Bk != null) yield return TensorData.FromFloat(p + "self_attn.k_proj.bias", w.Bk, [kv], dtype);
            if (w.Bv != null) yield return TensorData.FromFloat(p + "self_attn.v_proj.bias", w.Bv, [kv], dtype);
            if (w.Bo != null) yield return TensorData.FromFloat(p + "self_attn.o_proj.bias", w.Bo, [d], dtype);
            yield return TensorData.FromFloat(p + "post_attention_layernorm.weight", w.MlpNorm, [d], dtype);
            yield return TensorData.FromFloat(p + "mlp.gate_proj.weight", w.WGate, [f, d], dtype);
            yield return TensorData.FromFloat(p + "mlp.up_proj.weight", w.WUp, [f, d], dtype);
            yield return TensorData.FromFloat(p + "mlp.down_proj.weight", w.WDown, [d, f], dtype);
        }
        yield return TensorData.FromFloat("model.norm.weight", FinalNorm, [d], dtype);
        if (!ReferenceEquals(LmHead, Embedding))
            yield return TensorData.FromFloat("lm_head.weight", LmHead, [c.VocabSize, d], dtype);
    }

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
