using System.Numerics;
using DispNative.Engine.Autograd;
using DispNative.Engine.Cpu;
using DispNative.Engine.Models;

namespace DispNative.Engine.Disp;

/// <summary>The frozen LLaMA with DISP-LLM masks on its five sites per layer, recorded on a tape so that
/// gradients reach the masks (never the weights):
/// <code>
/// h = RMSNorm(x) · m_attn_in → q, k, v → RoPE → attention → o_proj · m_attn_out;  x += that
/// h = RMSNorm(x) · m_mlp_in  → down(silu(gate(h)) · up(h) · m_mlp_mid) · m_mlp_out; x += that
/// </code>
/// RMSNorm statistics always use the full residual row. The reference code multiplies m_mlp_mid into both
/// silu(gate) and up; for 0/1 masks that is the same product, so it is applied once here.</summary>
public sealed class MaskedLlama<T> where T : unmanaged, IFloatingPointIeee754<T>
{
    private sealed record Layer(T[] AttnNorm, T[] Wq, T[] Wk, T[] Wv, T[] Wo, T[]? Bq, T[]? Bk, T[]? Bv, T[]? Bo,
        T[] MlpNorm, T[] WGate, T[] WUp, T[] WDown);

    private readonly Layer[] _layers;
    private readonly T[] _embedding, _finalNorm, _lmHead;
    private readonly Rope _rope;

    public ModelConfig Config { get; }

    /// <summary>Gradient buffer of a weight array, or null to keep it frozen (the default: all frozen). Used to
    /// train small models from scratch with the same code.</summary>
    public Func<T[], T[]?>? GradientOf { get; init; }

    public MaskedLlama(ModelConfig config, ModelWeights w)
    {
        Config = config;
        _rope = new Rope(config.HeadDim, config.RopeTheta, config.RopeScaling);
        _layers = w.Layers.Select(l => new Layer(Cast(l.AttnNorm), Cast(l.Wq), Cast(l.Wk), Cast(l.Wv), Cast(l.Wo),
            CastOpt(l.Bq), CastOpt(l.Bk), CastOpt(l.Bv), CastOpt(l.Bo), Cast(l.MlpNorm), Cast(l.WGate), Cast(l.WUp), Cast(l.WDown))).ToArray();
        _embedding = Cast(w.Embedding);
        _finalNorm = Cast(w.FinalNorm);
        _lmHead = ReferenceEquals(w.LmHead, w.Embedding) ? _embedding : Cast(w.LmHead);
    }

    /// <summary>fp32 weights are used in place; other precisions get a converted copy.</summary>
    private static T[] Cast(float[] a) => (object)a is T[] same ? same : a.Select(v => T.CreateChecked(v)).ToArray();

    private static T[]? CastOpt(float[]? a) => a == null ? null : Cast(a);

    /// <summary>Per-layer activation checkpointing (<see cref="Tape{T}.Checkpoint"/>): the tape keeps each layer's input
    /// only and runs the layer's forward again in the backward, so a pass holds one layer's intermediates instead of
    /// all of them, for one more forward. Off by default.</summary>
    public bool CheckpointLayers { get; init; }

    /// <summary>Logits [n, vocab] of one sequence from position 0. <paramref name="mask"/> gives the [1, width]
    /// mask of a (layer, site), or null for an unmasked site.</summary>
    public Var<T> Logits(Tape<T> tape, ReadOnlySpan<int> ids, Func<int, SiteKind, Var<T>?> mask)
    {
        var c = Config;
        int d = c.HiddenSize;
        var x = tape.Embedding(Weight(tape, _embedding, c.VocabSize, d), ids);
        for (int l = 0; l < _layers.Length; l++)
        {
            int layer = l;
            x = CheckpointLayers ? tape.Checkpoint(x, (t, input) => Block(t, input, layer, mask)) : Block(tape, x, layer, mask);
        }
        var final = tape.RmsNorm(x, Weight(tape, _finalNorm, 1, d), c.RmsNormEps);
        return tape.Linear(final, Weight(tape, _lmHead, c.VocabSize, d));
    }

    /// <summary>A frozen weight as a constant, or a leaf when <see cref="GradientOf"/> trains it.</summary>
    private Var<T> Weight(Tape<T> tape, T[] a, int rows, int cols)
        => GradientOf?.Invoke(a) is { } g ? tape.Leaf(a, rows, cols, g) : tape.Constant(a, rows, cols);

    /// <summary>Decoder layer <paramref name="l"/> on the residual stream x, every value recorded on <paramref name="tape"/>.</summary>
    private Var<T> Block(Tape<T> tape, Var<T> x, int l, Func<int, SiteKind, Var<T>?> mask)
    {
        var c = Config;
        int d = c.HiddenSize, f = c.IntermediateSize, qd = c.QDim, kvd = c.KvDim;
        var w = _layers[l];
        Var<T> K(T[] a, int rows, int cols) => Weight(tape, a, rows, cols);
        Var<T>? B(T[]? a) => a == null ? null : K(a, 1, a.Length);
        Var<T> Mask(Var<T> v, SiteKind kind) => mask(l, kind) is { } m ? tape.MaskColumns(v, m) : v;

        var h = Mask(tape.RmsNorm(x, K(w.AttnNorm, 1, d), c.RmsNormEps), SiteKind.AttnIn);
        var q = tape.Rope(tape.Linear(h, K(w.Wq, qd, d), B(w.Bq)), c.NumHeads, _rope);
        var k = tape.Rope(tape.Linear(h, K(w.Wk, kvd, d), B(w.Bk)), c.NumKvHeads, _rope);
        var v = tape.Linear(h, K(w.Wv, kvd, d), B(w.Bv));
        var a = tape.Attention(q, k, v, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
        x = tape.Add(x, Mask(tape.Linear(a, K(w.Wo, d, qd), B(w.Bo)), SiteKind.AttnOut));

        h = Mask(tape.RmsNorm(x, K(w.MlpNorm, 1, d), c.RmsNormEps), SiteKind.MlpIn);
        var mid = Mask(tape.SiluMul(tape.Linear(h, K(w.WGate, f, d)), tape.Linear(h, K(w.WUp, f, d))), SiteKind.MlpMid);
        return tape.Add(x, Mask(tape.Linear(mid, K(w.WDown, d, f)), SiteKind.MlpOut));
    }

    /// <summary>Mean next-token cross-entropy over positions 0..n-2 of one block.</summary>
    public Var<T> Loss(Tape<T> tape, ReadOnlySpan<int> ids, Func<int, SiteKind, Var<T>?> mask)
    {
        if (ids.Length < 2) throw new InvalidSettingException("a training block needs at least 2 tokens");
        var targets = new int[ids.Length];
        for (int t = 0; t + 1 < ids.Length; t++) targets[t] = ids[t + 1];
        targets[^1] = -1;
        return tape.CrossEntropy(Logits(tape, ids, mask), targets);
    }
}

/// <summary>The frozen LLM under DISP masks as the hypernetwork trainer sees it, on any backend: one block's mean
/// next-token cross-entropy, with ∂(scale·loss)/∂mask added into each mask output's gradient. Disposing releases
/// device resources (none on the CPU).</summary>
public interface IMaskedLanguageModel : IDisposable
{
    /// <summary>Where the LM pass runs, e.g. "cpu" or "cuda:0 bf16".</summary>
    string DeviceName { get; }

    /// <summary>The frozen model's architecture.</summary>
    ModelConfig Config { get; }

    /// <summary>Loss of <paramref name="block"/> with site (l, kind) masked by <c>masks[outputOf(l, kind)]</c>; adds
    /// <paramref name="gradScale"/>·∂loss/∂masks[o] into <c>maskGradients[o]</c>.</summary>
    double LossAndMaskGradients(ReadOnlySpan<int> block, IReadOnlyList<float[]> masks, Func<int, SiteKind, int> outputOf,
        IReadOnlyList<float[]> maskGradients, double gradScale);
}

/// <summary>The fp32 CPU reference: <see cref="MaskedLlama{T}"/> recorded on a tape and run backward.</summary>
/// <param name="config">the frozen model's architecture</param>
/// <param name="weights">its weights (read, never changed)</param>
/// <param name="checkpointLayers">true: per-layer activation checkpointing; false: the tape keeps every layer's
/// activations; null (the default): keep them unless <see cref="ActivationBytes"/> of a block exceeds a quarter of the
/// memory the runtime may use.</param>
public sealed class CpuMaskedLanguageModel(ModelConfig config, ModelWeights weights, bool? checkpointLayers = null) : IMaskedLanguageModel
{
    private readonly MaskedLlama<float> _model = new(config, weights);
    private readonly MaskedLlama<float> _checkpointed = new(config, weights) { CheckpointLayers = true };
    private readonly TapeBufferPool<float> _buffers = new();
    private bool _checkpointedLast;

    public ModelConfig Config => config;

    /// <summary>"cpu", with ", layers checkpointed" once a step has run so.</summary>
    public string DeviceName => _checkpointedLast ? "cpu, layers checkpointed" : "cpu";

    public void Dispose() { }

    /// <summary>About the bytes of the intermediates the tape keeps for a block of <paramref name="tokens"/> when no
    /// layer is checkpointed: per layer and token, the norm outputs, q/k/v before and after RoPE, attention output,
    /// gate, up, their product and the masked copies, in f32.</summary>
    public static long ActivationBytes(ModelConfig c, int tokens)
        => 4L * tokens * c.NumLayers * (8L * c.HiddenSize + 3L * (c.QDim + 2L * c.KvDim) + 5L * c.IntermediateSize);

    /// <summary>Whether a block of <paramref name="tokens"/> runs with per-layer checkpointing.</summary>
    public bool Checkpoints(int tokens)
        => checkpointLayers ?? ActivationBytes(config, tokens) > HostMemory.Limit / 4;

    public double LossAndMaskGradients(ReadOnlySpan<int> block, IReadOnlyList<float[]> masks, Func<int, SiteKind, int> outputOf,
        IReadOnlyList<float[]> maskGradients, double gradScale)
    {
        var tape = new Tape<float>(_buffers);
        try
        {
            var leaves = masks.Select((m, o) => tape.Leaf(m, 1, m.Length, maskGradients[o])).ToArray();
            _checkpointedLast = Checkpoints(block.Length);
            var model = _checkpointedLast ? _checkpointed : _model;
            var loss = model.Loss(tape, block, (l, kind) => leaves[outputOf(l, kind)]);
            tape.Backward(tape.Affine(loss, gradScale, 0));
            return loss.Scalar;
        }
        finally { tape.ReturnBuffers(); }
    }
}
