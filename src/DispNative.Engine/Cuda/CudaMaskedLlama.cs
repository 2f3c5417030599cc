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
/// with a hand-written backward to the masks only (the weights stay frozen). Memory is bounded by per-layer activation
/// checkpointing: the forward keeps only each layer's input residual; the backward recomputes one layer's activations
/// at a time. Weights and activations use the model's storage type, the residual stream, gradients, masks and logits
/// f32 (bf16 weights with f32 accumulation and f32 masks). Uses the device weights of a dense <see cref="CudaLlama"/>.</summary>
public sealed class CudaMaskedLlama : IMaskedLanguageModel, IDisposable
{
    private readonly CudaLlama _model;
    private readonly bool _ownsModel;
    private readonly CudaDevice _device;
    private readonly CudaOps _ops;
    private Buffers? _buffers;
    private static readonly int Sites = Enum.GetValues<SiteKind>().Length;

    public ModelConfig Config => _model.Config;
    public string DeviceName => _model.DeviceName;

    /// <param name="model">a dense model (the masks act on the full widths)</param>
    /// <param name="ownsModel">dispose <paramref name="model"/> with this</param>
    public CudaMaskedLlama(CudaLlama model, bool ownsModel = false)
    {
        if (model.Layers.Any(l => l.AttnIn != null))
            throw new InvalidSettingException("hypernetwork training needs the dense model; this one is already pruned");
        _model = model;
        _ownsModel = ownsModel;
        _device = model.Device;
        _ops = new CudaOps(_device);
    }

    /// <summary>Device buffers for blocks of <c>Rows</c> tokens and masks of <c>MaskLength</c> values in all.</summary>
    private sealed class Buffers : IDisposable
    {
        private readonly List<DeviceTensor> _all = [];
        public readonly int Rows;
        public readonly long MaskLength;
        public readonly DeviceTensor Tokens, Targets, Loss, X1, DX, H1, Hm1, Q, K, V, Att, Lse, O, H2, Hm2, G, U, A, Am, Dn,
            Hf, Logits, DLogits, DLogitsS, GradS, GradF, GradD, DQ, DK, DV, DSum, DG, DU, Masks, MaskGrads;
        public readonly DeviceTensor[] Xs;

        public Buffers(CudaDevice d, ModelConfig c, DType s, int rows, long maskLength)
        {
            (Rows, MaskLength) = (rows, maskLength);
            long t = rows, dm = c.HiddenSize, f = c.IntermediateSize, qd = c.QDim, kvd = c.KvDim, v = c.VocabSize;
            DeviceTensor A_(DType type, long n) { var x = d.Allocate(type, n); _all.Add(x); return x; }
            try
            {
                Tokens = A_(DType.I32, t); Targets = A_(DType.I32, t); Loss = A_(DType.F32, t);
                Xs = new DeviceTensor[c.NumLayers + 1];
                for (int l = 0; l <= c.NumLayers; l++) Xs[l] = A_(DType.F32, t * dm);
                X1 = A_(DType.F32, t * dm); DX = A_(DType.F32, t * dm);
                H1 = A_(s, t * dm); Hm1 = A_(s, t * dm); Q = A_(s, t * qd); K = A_(s, t * kvd); V = A_(s, t * kvd);
                Att = A_(s, t * qd); Lse = A_(DType.F32, c.NumHeads * t); O = A_(DType.F32, t * dm);
                H2 = A_(s, t * dm); Hm2 = A_(s, t * dm); G = A_(s, t * f); U = A_(s, t * f); A = A_(s, t * f); Am = A_(s, t * f);
                Dn = A_(DType.F32, t * dm); Hf = A_(s, t * dm);
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
            if (_buffers is not { } b || b.Rows != t || b.MaskLength != total)
            {
                _buffers?.Dispose();
                _buffers = null;
                _buffers = new Buffers(_device, c, _model.DType, t, total);
            }
            var buf = _buffers;
            var flat = new float[total];
            for (int o = 0; o < masks.Count; o++) masks[o].CopyTo(flat, offsets[o]);
            var targets = new int[t];
            for (int i = 0; i + 1 < t; i++) targets[i] = block[i + 1];
            targets[t - 1] = -1;
            Upload(buf.Masks, flat);
            Upload(buf.Tokens, block);
            Upload(buf.Targets, targets);
            _ops.FillConstant(buf.MaskGrads, 0f);

            Forward(buf, site);
            Backward(buf, site, (float)(gradScale / (t - 1)));

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
        _ops.GatherRmsNorm(x, w.AttnNorm, null, b.H1, t, dm, c.RmsNormEps);
        _ops.ScaleColumns(b.H1, b.Masks, b.Hm1, t, dm, site[l, (int)SiteKind.AttnIn]);
        d.Gemm(b.Hm1, w.Wq, b.Q, t, qd, dm);
        d.Gemm(b.Hm1, w.Wk, b.K, t, kvd, dm);
        d.Gemm(b.Hm1, w.Wv, b.V, t, kvd, dm);
        if (w.Bq != null) { _ops.AddBias(b.Q, w.Bq, t); _ops.AddBias(b.K, w.Bk!, t); _ops.AddBias(b.V, w.Bv!, t); }
        _ops.Rope(b.Q, _model.InverseFrequencies, t, c.NumHeads, c.HeadDim, 0);
        _ops.Rope(b.K, _model.InverseFrequencies, t, c.NumKvHeads, c.HeadDim, 0);
        _ops.AttentionForTraining(b.Q, b.K, b.V, b.Att, b.Lse, t, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
        d.Gemm(b.Att, w.Wo, b.O, t, dm, qd);
        if (w.Bo != null) _ops.AddBias(b.O, w.Bo, t);
        _ops.ScaleColumns(x, null, b.X1, t, dm);
        _ops.AddScaledColumns(b.X1, b.O, b.Masks, t, dm, site[l, (int)SiteKind.AttnOut]);

        _ops.GatherRmsNorm(b.X1, w.MlpNorm, null, b.H2, t, dm, c.RmsNormEps);
        _ops.ScaleColumns(b.H2, b.Masks, b.Hm2, t, dm, site[l, (int)SiteKind.MlpIn]);
        d.Gemm(b.Hm2, w.WGate, b.G, t, f, dm);
        d.Gemm(b.Hm2, w.WUp, b.U, t, f, dm);
        _ops.SiluMul(b.G, b.U, b.A, (long)t * f);
        _ops.ScaleColumns(b.A, b.Masks, b.Am, t, f, site[l, (int)SiteKind.MlpMid]);
        d.Gemm(b.Am, w.WDown, b.Dn, t, dm, f);
        if (output == null) return;
        _ops.ScaleColumns(b.X1, null, output, t, dm);
        _ops.AddScaledColumns(output, b.Dn, b.Masks, t, dm, site[l, (int)SiteKind.MlpOut]);
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
            LayerForward(b, site, l, null);
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

        // MLP: out = X1 + Dn·m_mlp_out, Dn = Am·Wdownᵀ, Am = silu(G)·U·m_mlp_mid, G/U = (H2·m_mlp_in)·W{gate,up}ᵀ
        _ops.MaskColumnsGrad(b.DX, b.Dn, b.MaskGrads, t, dm, accumulate: true, mo);
        _ops.ScaleColumns(b.DX, b.Masks, b.GradS, t, dm, mo);
        d.Gemm(b.GradS, w.WDown, b.GradF, t, f, dm, transposeB: false);
        _ops.MaskColumnsGrad(b.GradF, b.A, b.MaskGrads, t, f, accumulate: true, mm);
        _ops.ScaleColumns(b.GradF, b.Masks, b.GradF, t, f, mm);
        _ops.SiluMulBackward(b.G, b.U, b.GradF, b.DG, b.DU, (long)t * f);
        d.Gemm(b.DG, w.WGate, b.GradD, t, dm, f, transposeB: false);
        d.Gemm(b.DU, w.WUp, b.GradD, t, dm, f, beta: 1, transposeB: false);
        _ops.MaskColumnsGrad(b.GradD, b.H2, b.MaskGrads, t, dm, accumulate: true, mi);
        _ops.ScaleColumns(b.GradD, b.Masks, b.GradD, t, dm, mi);
        _ops.RmsNormBackward(b.X1, w.MlpNorm, b.GradD, b.DX, t, dm, c.RmsNormEps);

        // Attention: X1 = x + O·m_attn_out, O = Att·Woᵀ, Att = attention(rope(Hm1·Wqᵀ), rope(Hm1·Wkᵀ), Hm1·Wvᵀ)
        _ops.MaskColumnsGrad(b.DX, b.O, b.MaskGrads, t, dm, accumulate: true, ao);
        _ops.ScaleColumns(b.DX, b.Masks, b.GradS, t, dm, ao);
        d.Gemm(b.GradS, w.Wo, b.GradF, t, qd, dm, transposeB: false);
        _ops.AttentionBackward(b.Q, b.K, b.V, b.Att, b.GradF, b.Lse, b.DQ, b.DK, b.DV, b.DSum, t, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
        _ops.Rope(b.DQ, _model.InverseFrequencies, t, c.NumHeads, c.HeadDim, 0, inverse: true);
        _ops.Rope(b.DK, _model.InverseFrequencies, t, c.NumKvHeads, c.HeadDim, 0, inverse: true);
        _ops.ScaleColumns(b.DQ, null, b.GradS, t, qd);
        d.Gemm(b.GradS, w.Wq, b.GradD, t, dm, qd, transposeB: false);
        _ops.ScaleColumns(b.DK, null, b.GradS, t, kvd);
        d.Gemm(b.GradS, w.Wk, b.GradD, t, dm, kvd, beta: 1, transposeB: false);
        _ops.ScaleColumns(b.DV, null, b.GradS, t, kvd);
        d.Gemm(b.GradS, w.Wv, b.GradD, t, dm, kvd, beta: 1, transposeB: false);
        _ops.MaskColumnsGrad(b.GradD, b.H1, b.MaskGrads, t, dm, accumulate: true, ai);
        _ops.ScaleColumns(b.GradD, b.Masks, b.GradD, t, dm, ai);
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
