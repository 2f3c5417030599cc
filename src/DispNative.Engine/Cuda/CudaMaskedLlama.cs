using DispNative.Engine.Disp;
using DispNative.Engine.IO;
using DispNative.Engine.Models;
using DispNative.Interop;

namespace DispNative.Engine.Cuda;

/// <summary>The DISP-masked LM pass of hypernetwork training on the GPU, op for op the CPU <see cref="MaskedLlama{T}"/>:
/// <code>
/// h = RMSNorm(x) · m_attn_in → q, k, v → RoPE → attention → o_proj · m_attn_out;  x += that
/// h = RMSNorm(x) · m_mlp_in  → down(silu(gate(h)) · up(h) · m_mlp_mid) · m_mlp_out; x += that
/// </code>
/// with a hand-written backward to the masks only (the weights stay frozen). The forward keeps every layer's input
/// residual and, unless layers are checkpointed, the activations that are costly to recompute (q, k, v, the attention
/// output and its log-sum-exp, o_proj's output, gate, up, down's output); the backward recomputes the cheap rest (norms,
/// the masked residual, SwiGLU) from them. With per-layer checkpointing only the input residuals are kept and the
/// backward re-runs one layer's forward at a time: less memory, one more forward of GEMMs. Weights and activations use
/// the model's storage type, the residual stream, gradients, masks and logits f32 (bf16 weights with f32 accumulation
/// and f32 masks). Uses the device weights of a dense <see cref="CudaLlama"/>.</summary>
public sealed class CudaMaskedLlama : IMaskedLanguageModel, IDisposable
{
    private readonly CudaLlama _model;
    private readonly bool _ownsModel;
    private readonly CudaDevice _device;
    private readonly CudaOps _ops;
    private Buffers? _buffers;
    private readonly bool? _checkpointLayers;
    private static readonly int Sites = Enum.GetValues<SiteKind>().Length;

    public ModelConfig Config => _model.Config;
    /// <summary>The device and storage type, and after the first step how activations are held for the backward.</summary>
    public string DeviceName => _model.DeviceName + CheckpointsLayers switch
    {
        true => ", layers checkpointed", false => ", activations kept", null => "",
    };

    /// <param name="model">a dense model (the masks act on the full widths)</param>
    /// <param name="ownsModel">dispose <paramref name="model"/> with this</param>
    /// <param name="checkpointLayers">true: per-layer checkpointing; false: keep every layer's activations; null: keep
    /// them when they fit in device memory, else checkpoint</param>
    public CudaMaskedLlama(CudaLlama model, bool ownsModel = false, bool? checkpointLayers = null)
    {
        _checkpointLayers = checkpointLayers;
        if (model.Layers.Any(l => l.AttnIn != null))
            throw new InvalidSettingException("hypernetwork training needs the dense model; this one is already pruned");
        _model = model;
        _ownsModel = ownsModel;
        _device = model.Device;
        _ops = new CudaOps(_device);
    }

    /// <summary>One layer's activations that the backward reads and that cost GEMMs or attention to recompute.</summary>
    private sealed record Stored(DeviceTensor Q, DeviceTensor K, DeviceTensor V, DeviceTensor Att, DeviceTensor Lse, DeviceTensor O,
        DeviceTensor G, DeviceTensor U, DeviceTensor Dn);

    /// <summary>Device buffers for blocks of <c>Rows</c> tokens and masks of <c>MaskLength</c> values in all: one
    /// <see cref="Stored"/> per layer, or a single shared one when <c>Checkpointed</c>.</summary>
    private sealed class Buffers : IDisposable
    {
        private readonly List<DeviceTensor> _all = [];
        public readonly int Rows;
        public readonly long MaskLength;
        public readonly bool Checkpointed;
        public readonly DeviceTensor Tokens, Targets, Loss, X1, DX, H1, Hm1, H2, Hm2, Am,
            Hf, Logits, DLogits, DLogitsS, GradS, GradF, GradD, DQ, DK, DV, DSum, DG, DU, Masks, MaskGrads;
        public readonly DeviceTensor[] Xs;
        private readonly Stored[] _stored;

        public Stored Layer(int l) => _stored[Checkpointed ? 0 : l];

        public Buffers(CudaDevice d, ModelConfig c, DType s, int rows, long maskLength, bool checkpointed)
        {
            (Rows, MaskLength, Checkpointed) = (rows, maskLength, checkpointed);
            long t = rows, dm = c.HiddenSize, f = c.IntermediateSize, qd = c.QDim, kvd = c.KvDim, v = c.VocabSize;
            DeviceTensor A_(DType type, long n) { var x = d.Allocate(type, n); _all.Add(x); return x; }
            try
            {
                Tokens = A_(DType.I32, t); Targets = A_(DType.I32, t); Loss = A_(DType.F32, t);
                Xs = new DeviceTensor[c.NumLayers + 1];
                for (int l = 0; l <= c.NumLayers; l++) Xs[l] = A_(DType.F32, t * dm);
                X1 = A_(DType.F32, t * dm); DX = A_(DType.F32, t * dm);
                H1 = A_(s, t * dm); Hm1 = A_(s, t * dm); H2 = A_(s, t * dm); Hm2 = A_(s, t * dm); Am = A_(s, t * f);
                _stored = new Stored[checkpointed ? 1 : c.NumLayers];
                for (int l = 0; l < _stored.Length; l++)
                    _stored[l] = new Stored(A_(s, t * qd), A_(s, t * kvd), A_(s, t * kvd), A_(s, t * qd), A_(DType.F32, c.NumHeads * t),
                        A_(DType.F32, t * dm), A_(s, t * f), A_(s, t * f), A_(DType.F32, t * dm));
                Hf = A_(s, t * dm);
                Logits = A_(DType.F32, t * v); DLogits = A_(DType.F32, t * v);
                DLogitsS = s == DType.F32 ? DLogits : A_(s, t * v);
                GradS = A_(s, t * Math.Max(dm, qd)); GradF = A_(DType.F32, t * Math.Max(Math.Max(dm, f), qd)); GradD = A_(DType.F32, t * dm);
                DQ = A_(DType.F32, t * qd); DK = A_(DType.F32, t * kvd); DV = A_(DType.F32, t * kvd); DSum = A_(DType.F32, c.NumHeads * t);
                DG = A_(s, t * f); DU = A_(s, t * f);
                Masks = A_(DType.F32, maskLength); MaskGrads = A_(DType.F32, maskLength);
            }
            catch { Dispose(); throw; }
        }

        public void Dispose()
        {
            foreach (var x in _all) x.Dispose();
            _all.Clear();
        }
    }

    public double LossAndMaskGradients(ReadOnlySpan<int> block, IReadOnlyList<float[]> masks, Func<int, SiteKind, int> outputOf,
        IReadOnlyList<float[]> maskGradients, double gradScale)
    {
        var c = Config;
        int t = block.Length;
        if (t < 2) throw new InvalidSettingException("a training block needs at least 2 tokens");
        foreach (int id in block)
            if ((uint)id >= (uint)c.VocabSize) throw new DispNativeException($"token id {id} is outside the vocabulary (size {c.VocabSize})");
        if (masks.Count != maskGradients.Count) throw new ArgumentException("one gradient buffer per mask is required");

        // Masks side by side in one f32 buffer; each site reads its output's slice.
        var offsets = new long[masks.Count];
        long total = 0;
        for (int o = 0; o < masks.Count; o++) { offsets[o] = total; total += masks[o].Length; }
        var site = new long[c.NumLayers, Sites];
        for (int l = 0; l < c.NumLayers; l++)
            for (int k = 0; k < Sites; k++)
            {
                int o = outputOf(l, (SiteKind)k);
                int want = (SiteKind)k == SiteKind.MlpMid ? c.IntermediateSize : c.HiddenSize;
                if (masks[o].Length != want) throw new ArgumentException($"mask of layer {l} site {(SiteKind)k} has {masks[o].Length} values, expected {want}");
                site[l, k] = offsets[o];
            }

        lock (_ops)
        {
            var flat = new float[total];
            for (int o = 0; o < masks.Count; o++) masks[o].CopyTo(flat, offsets[o]);
            var targets = new int[t];
            for (int i = 0; i + 1 < t; i++) targets[i] = block[i + 1];
            targets[t - 1] = -1;
            Buffers buf;
            try
            {
                if (_buffers is { } b && b.Rows == t && b.MaskLength == total) buf = b;
                else
                {
                    _buffers?.Dispose();
                    _buffers = null;
                    _buffers = buf = new Buffers(_device, c, _model.DType, t, total, checkpointed: _checkpointLayers == true);
                }
                Step(buf, flat, block, targets, site, gradScale);
            }
            catch (CudaOutOfMemoryException) when (_checkpointLayers == null && _buffers?.Checkpointed != true)
            {
                // Keeping every layer's activations does not fit (or leaves too little for a step's temporaries):
                // checkpoint layers from now on. Work already enqueued runs before anything that reuses its memory.
                _buffers?.Dispose();
                _buffers = null;
                _device.Allocator.Trim();
                _buffers = buf = new Buffers(_device, c, _model.DType, t, total, checkpointed: true);
                Step(buf, flat, block, targets, site, gradScale);
            }

            var loss = _device.Download(buf.Loss);
            var grads = _device.Download(buf.MaskGrads);
            for (int o = 0; o < masks.Count; o++)
            {
                var g = maskGradients[o];
                for (int j = 0; j < g.Length; j++) g[j] += grads[offsets[o] + j];
            }
            double sum = 0;
            foreach (float v in loss) sum += v;
            return sum / (t - 1);
        }
    }

    private void Step(Buffers buf, float[] masks, ReadOnlySpan<int> block, int[] targets, long[,] site, double gradScale)
    {
        Upload(buf.Masks, masks);
        Upload(buf.Tokens, block);
        Upload(buf.Targets, targets);
        _ops.FillConstant(buf.MaskGrads, 0f);
        Forward(buf, site);
        Backward(buf, site, (float)(gradScale / (buf.Rows - 1)));
    }

    /// <summary>Whether the current buffers checkpoint layers (null before the first step).</summary>
    public bool? CheckpointsLayers => _buffers?.Checkpointed;

    /// <summary>Copies host values into an existing device tensor (same element size).</summary>
    private unsafe void Upload<T>(DeviceTensor dst, ReadOnlySpan<T> values) where T : unmanaged
    {
        fixed (T* p = values) CudaDriver.CopyHtoD(dst.Pointer, p, values.Length * (long)sizeof(T), _device.Stream.DangerousGetHandle());
        _device.Synchronize();   // the host span must outlive the copy
    }

    /// <summary>Embedding, every layer (keeping its input residual), final norm, LM head, and the cross-entropy with its
    /// gradient (unscaled here; <see cref="Backward"/> scales).</summary>
    private void Forward(Buffers b, long[,] site)
    {
        var c = Config;
        int t = b.Rows;
        _ops.Embedding(_model.EmbeddingTable, b.Tokens, b.Xs[0], t, c.HiddenSize);
        for (int l = 0; l < c.NumLayers; l++) LayerForward(b, site, l, b.Xs[l + 1]);
        _ops.GatherRmsNorm(b.Xs[c.NumLayers], _model.FinalNorm, null, b.Hf, t, c.HiddenSize, c.RmsNormEps);
        _device.Gemm(b.Hf, _model.LmHead, b.Logits, t, c.VocabSize, c.HiddenSize);
    }

    /// <summary>Layer l from b.Xs[l]: every activation its backward needs (X1 = the residual after attention), and,
    /// when <paramref name="output"/> is given, the layer's output residual.</summary>
    private void LayerForward(Buffers b, long[,] site, int l, DeviceTensor? output)
    {
        var c = Config;
        var w = _model.Layers[l];
        var d = _device;
        int t = b.Rows, dm = c.HiddenSize, f = c.IntermediateSize, qd = c.QDim, kvd = c.KvDim;
        var x = b.Xs[l];
        var s = b.Layer(l);
        _ops.RmsNormMasked(x, w.AttnNorm, b.H1, b.Masks, site[l, (int)SiteKind.AttnIn], b.Hm1, t, dm, c.RmsNormEps);
        d.Gemm(b.Hm1, w.Wq, s.Q, t, qd, dm);
        d.Gemm(b.Hm1, w.Wk, s.K, t, kvd, dm);
        d.Gemm(b.Hm1, w.Wv, s.V, t, kvd, dm);
        if (w.Bq != null) { _ops.AddBias(s.Q, w.Bq, t); _ops.AddBias(s.K, w.Bk!, t); _ops.AddBias(s.V, w.Bv!, t); }
        _ops.Rope(s.Q, _model.InverseFrequencies, t, c.NumHeads, c.HeadDim, 0);
        _ops.Rope(s.K, _model.InverseFrequencies, t, c.NumKvHeads, c.HeadDim, 0);
        _ops.AttentionForTraining(s.Q, s.K, s.V, s.Att, s.Lse, t, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
        d.Gemm(s.Att, w.Wo, s.O, t, dm, qd);
        if (w.Bo != null) _ops.AddBias(s.O, w.Bo, t);
        MaskedResidual(b, site, l, maskedCopy: true);

        d.Gemm(b.Hm2, w.WGate, s.G, t, f, dm);
        d.Gemm(b.Hm2, w.WUp, s.U, t, f, dm);
        _ops.SiluMulMasked(s.G, s.U, b.Masks, site[l, (int)SiteKind.MlpMid], b.Am, t, f);
        d.Gemm(b.Am, w.WDown, s.Dn, t, dm, f);
        if (output == null) return;
        _ops.AddScaledColumns(b.X1, s.Dn, b.Masks, t, dm, site[l, (int)SiteKind.MlpOut], output);
    }

    /// <summary>X1 = x + O·m_attn_out and H2 = RMSNorm(X1) (with <paramref name="maskedCopy"/> also Hm2 = H2·m_mlp_in, the
    /// MLP's input): the residual after attention and the MLP's norm, one launch.</summary>
    private void MaskedResidual(Buffers b, long[,] site, int l, bool maskedCopy)
    {
        var c = Config;
        _ops.AddMaskedRmsNorm(b.Xs[l], b.Layer(l).O, b.Masks, site[l, (int)SiteKind.AttnOut], b.X1, _model.Layers[l].MlpNorm, b.H2,
            b.Masks, site[l, (int)SiteKind.MlpIn], maskedCopy ? b.Hm2 : null, b.Rows, c.HiddenSize, c.RmsNormEps);
    }

    /// <summary>With stored activations, what layer l's backward reads besides them, recomputed by the same ops as the
    /// forward (the norms and the masked residual): no GEMMs, no attention. (The SwiGLU activation the middle mask's
    /// gradient needs is recomputed inside <see cref="CudaOps.SwiGluMaskBackward"/>.)</summary>
    private void RecomputeCheap(Buffers b, long[,] site, int l)
    {
        var c = Config;
        _ops.GatherRmsNorm(b.Xs[l], _model.Layers[l].AttnNorm, null, b.H1, b.Rows, c.HiddenSize, c.RmsNormEps);
        MaskedResidual(b, site, l, maskedCopy: false);
    }

    /// <summary>From the scaled cross-entropy gradient back through the LM head, the final norm and every layer (each
    /// recomputed first), accumulating the mask gradients.</summary>
    private void Backward(Buffers b, long[,] site, float ceGradScale)
    {
        var c = Config;
        var d = _device;
        int t = b.Rows, dm = c.HiddenSize;
        _ops.CrossEntropy(b.Logits, b.Targets, b.Loss, b.DLogits, t, c.VocabSize, ceGradScale);
        if (!ReferenceEquals(b.DLogitsS, b.DLogits)) _ops.ScaleColumns(b.DLogits, null, b.DLogitsS, t, c.VocabSize);
        d.Gemm(b.DLogitsS, _model.LmHead, b.GradD, t, dm, c.VocabSize, transposeB: false);
        _ops.FillConstant(b.DX, 0f);
        _ops.RmsNormBackward(b.Xs[c.NumLayers], _model.FinalNorm, b.GradD, b.DX, t, dm, c.RmsNormEps);
        for (int l = c.NumLayers - 1; l >= 0; l--)
        {
            if (b.Checkpointed) LayerForward(b, site, l, null);
            else RecomputeCheap(b, site, l);
            LayerBackward(b, site, l);
        }
    }

    /// <summary>b.DX holds ∂loss/∂(layer l's output); leaves ∂loss/∂(its input) there. Stream order makes the reuse of
    /// GradS/GradF/GradD between steps safe.</summary>
    private void LayerBackward(Buffers b, long[,] site, int l)
    {
        var c = Config;
        var w = _model.Layers[l];
        var d = _device;
        int t = b.Rows, dm = c.HiddenSize, f = c.IntermediateSize, qd = c.QDim, kvd = c.KvDim;
        long ai = site[l, (int)SiteKind.AttnIn], ao = site[l, (int)SiteKind.AttnOut], mi = site[l, (int)SiteKind.MlpIn],
            mm = site[l, (int)SiteKind.MlpMid], mo = site[l, (int)SiteKind.MlpOut];
        var s = b.Layer(l);

        // MLP: out = X1 + Dn·m_mlp_out, Dn = Am·Wdownᵀ, Am = silu(G)·U·m_mlp_mid, G/U = (H2·m_mlp_in)·W{gate,up}ᵀ
        _ops.MaskColumnsGradAndScale(b.DX, s.Dn, b.Masks, b.MaskGrads, mo, b.GradS, t, dm);
        d.Gemm(b.GradS, w.WDown, b.GradF, t, f, dm, transposeB: false);
        _ops.SwiGluMaskBackward(s.G, s.U, b.GradF, b.Masks, b.MaskGrads, mm, b.DG, b.DU, t, f);
        d.Gemm(b.DG, w.WGate, b.GradD, t, dm, f, transposeB: false);
        d.Gemm(b.DU, w.WUp, b.GradD, t, dm, f, beta: 1, transposeB: false);
        _ops.MaskColumnsGradAndScale(b.GradD, b.H2, b.Masks, b.MaskGrads, mi, b.GradD, t, dm);
        _ops.RmsNormBackward(b.X1, w.MlpNorm, b.GradD, b.DX, t, dm, c.RmsNormEps);

        // Attention: X1 = x + O·m_attn_out, O = Att·Woᵀ, Att = attention(rope(Hm1·Wqᵀ), rope(Hm1·Wkᵀ), Hm1·Wvᵀ)
        _ops.MaskColumnsGradAndScale(b.DX, s.O, b.Masks, b.MaskGrads, ao, b.GradS, t, dm);
        d.Gemm(b.GradS, w.Wo, b.GradF, t, qd, dm, transposeB: false);
        _ops.AttentionBackward(s.Q, s.K, s.V, s.Att, b.GradF, s.Lse, b.DQ, b.DK, b.DV, b.DSum, t, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
        _ops.Rope(b.DQ, _model.InverseFrequencies, t, c.NumHeads, c.HeadDim, 0, inverse: true, output: b.GradS);
        d.Gemm(b.GradS, w.Wq, b.GradD, t, dm, qd, transposeB: false);
        _ops.Rope(b.DK, _model.InverseFrequencies, t, c.NumKvHeads, c.HeadDim, 0, inverse: true, output: b.GradS);
        d.Gemm(b.GradS, w.Wk, b.GradD, t, dm, kvd, beta: 1, transposeB: false);
        _ops.ScaleColumns(b.DV, null, b.GradS, t, kvd);
        d.Gemm(b.GradS, w.Wv, b.GradD, t, dm, kvd, beta: 1, transposeB: false);
        _ops.MaskColumnsGradAndScale(b.GradD, b.H1, b.Masks, b.MaskGrads, ai, b.GradD, t, dm);
        _ops.RmsNormBackward(b.Xs[l], w.AttnNorm, b.GradD, b.DX, t, dm, c.RmsNormEps);
    }

    /// <summary>Peak device memory reserved by the engine's allocator so far (weights included).</summary>
    public long PeakReservedBytes => _device.Allocator.Stats.PeakReservedBytes;

    public void Dispose()
    {
        lock (_ops)
        {
            _buffers?.Dispose();
            _buffers = null;
            if (_ownsModel) _model.Dispose();
        }
    }
}
