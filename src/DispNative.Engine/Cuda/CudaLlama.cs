using DispNative.Engine.Inference;
using DispNative.Engine.IO;
using DispNative.Engine.Models;
using DispNative.Interop;

namespace DispNative.Engine.Cuda;

/// <summary>KV cache of one sequence on the device: [capacity, kvDim] keys and values per layer, storage type of the model.</summary>
public sealed class CudaKvCache : IInferenceCache, IDisposable
{
    internal DeviceTensor[] K { get; }
    internal DeviceTensor[] V { get; }
    public int Capacity { get; }
    public int Length { get; internal set; }

    internal CudaKvCache(CudaDevice device, ModelConfig c, DType dtype, int capacity)
    {
        if (capacity <= 0) throw new InvalidSettingException($"KV cache capacity must be positive (got {capacity})");
        Capacity = capacity;
        K = new DeviceTensor[c.NumLayers];
        V = new DeviceTensor[c.NumLayers];
        try
        {
            for (int l = 0; l < c.NumLayers; l++)
            {
                K[l] = device.Allocate(dtype, (long)capacity * c.KvDim);
                V[l] = device.Allocate(dtype, (long)capacity * c.KvDim);
            }
        }
        catch { Dispose(); throw; }
    }

    public void Reset() => Length = 0;

    public void Dispose()
    {
        foreach (var t in K) t?.Dispose();
        foreach (var t in V) t?.Dispose();
    }
}

/// <summary>GPU forward of a dense or DISP-pruned LLaMA-family model, mirroring <see cref="LlamaModel"/> op for op:
/// embedding → [gather-norm → q/k/v GEMMs → RoPE → causal GQA attention → o_proj → residual (or index-add) →
/// gather-norm → gate/up GEMMs → SwiGLU → down → residual (or index-add)] × L → RMSNorm → LM head.
/// Weights and activations use the storage type (f32, bf16 or f16); the residual stream and logits are f32;
/// every GEMM accumulates in f32 (cuBLASLt).</summary>
public sealed class CudaLlama : ICausalLanguageModel, IDisposable
{
    private sealed class Layer
    {
        public required DeviceTensor AttnNorm, Wq, Wk, Wv, Wo, MlpNorm, WGate, WUp, WDown;
        public DeviceTensor? Bq, Bk, Bv, Bo, AttnIn, AttnOut, MlpIn, MlpMid, MlpOut;
        public IEnumerable<DeviceTensor?> All => [AttnNorm, Wq, Wk, Wv, Wo, MlpNorm, WGate, WUp, WDown, Bq, Bk, Bv, Bo, AttnIn, AttnOut, MlpIn, MlpMid, MlpOut];
    }

    private readonly CudaDevice _device;
    private readonly CudaOps _ops;
    private readonly Layer[] _layers;
    private readonly DeviceTensor _embedding, _finalNorm, _lmHead, _invFreq;
    private readonly bool _ownsDevice;
    private readonly object _lock = new();

    public ModelConfig Config { get; }
    public DType DType { get; }
    public string DeviceName => $"cuda:{_device.Info.Ordinal} {DType.ToString().ToLowerInvariant()}";

    /// <summary>Uploads <paramref name="weights"/> to <paramref name="device"/> in <paramref name="dtype"/>.
    /// With <paramref name="ownsDevice"/> the device is disposed with the model.</summary>
    public CudaLlama(CudaDevice device, ModelConfig config, ModelWeights weights, DType dtype, bool ownsDevice = false)
    {
        if (dtype is not (DType.F32 or DType.BF16 or DType.F16)) throw new InvalidSettingException($"CUDA storage type must be f32, bf16 or f16 (got {dtype})");
        if (config.HeadDim > CudaOps.MaxHeadDim) throw new DispNativeException($"head_dim {config.HeadDim} is above the CUDA attention kernel's limit {CudaOps.MaxHeadDim}");
        _device = device;
        _ops = new CudaOps(device);
        _ownsDevice = ownsDevice;
        Config = config;
        DType = dtype;
        var rope = new Cpu.Rope(config.HeadDim, config.RopeTheta, config.RopeScaling);
        var invFreq = new float[config.HeadDim / 2];
        for (int i = 0; i < invFreq.Length; i++) invFreq[i] = rope.InverseFrequency(i);
        _invFreq = device.Upload(invFreq);
        _embedding = device.Upload(weights.Embedding, dtype);
        _finalNorm = device.Upload(weights.FinalNorm, dtype);
        _lmHead = ReferenceEquals(weights.LmHead, weights.Embedding) ? _embedding : device.Upload(weights.LmHead, dtype);
        _layers = new Layer[config.NumLayers];
        for (int l = 0; l < config.NumLayers; l++)
        {
            var w = weights.Layers[l];
            DeviceTensor? Opt(float[]? v, DType t) => v == null ? null : device.Upload(v, t);
            DeviceTensor? Idx(int[]? v) => v == null ? null : device.Upload(v);
            _layers[l] = new Layer
            {
                AttnNorm = device.Upload(w.AttnNorm, dtype), Wq = device.Upload(w.Wq, dtype), Wk = device.Upload(w.Wk, dtype),
                Wv = device.Upload(w.Wv, dtype), Wo = device.Upload(w.Wo, dtype), MlpNorm = device.Upload(w.MlpNorm, dtype),
                WGate = device.Upload(w.WGate, dtype), WUp = device.Upload(w.WUp, dtype), WDown = device.Upload(w.WDown, dtype),
                Bq = Opt(w.Bq, dtype), Bk = Opt(w.Bk, dtype), Bv = Opt(w.Bv, dtype), Bo = Opt(w.Bo, DType.F32),
                AttnIn = Idx(w.AttnInIdx), AttnOut = Idx(w.AttnOutIdx), MlpIn = Idx(w.MlpInIdx), MlpMid = Idx(w.MlpMidIdx), MlpOut = Idx(w.MlpOutIdx),
            };
        }
        device.Synchronize();
    }

    IInferenceCache ICausalLanguageModel.NewCache(int capacity) => NewCache(capacity);

    public CudaKvCache NewCache(int capacity) => new(_device, Config, DType, capacity);

    float[] ICausalLanguageModel.Forward(ReadOnlySpan<int> tokens, IInferenceCache cache, bool lastOnly)
        => Forward(tokens, cache as CudaKvCache ?? throw new ArgumentException("the CUDA model needs a CUDA KV cache"), lastOnly);

    /// <summary>Appends tokens to the sequence in <paramref name="cache"/> and returns f32 logits, [tokens, vocab] or [1, vocab].
    /// Calls are serialised (one stream).</summary>
    public float[] Forward(ReadOnlySpan<int> tokens, CudaKvCache cache, bool lastOnly = false)
    {
        var c = Config;
        int rows = tokens.Length, start = cache.Length;
        if (rows == 0) throw new InvalidSettingException("the sequence is empty");
        if (start + rows > cache.Capacity)
            throw new InvalidSettingException($"{start + rows} positions exceed the KV cache capacity {cache.Capacity}");
        foreach (int t in tokens)
            if ((uint)t >= (uint)c.VocabSize) throw new DispNativeException($"token id {t} is outside the vocabulary (size {c.VocabSize})");
        lock (_lock)
        {
            var d = _device;
            int dm = c.HiddenSize, f = c.IntermediateSize, qd = c.QDim, kvd = c.KvDim;
            using var tok = d.Upload(tokens);
            using var x = d.Allocate(DType.F32, (long)rows * dm);
            using var h = d.Allocate(DType, (long)rows * dm);
            using var q = d.Allocate(DType, (long)rows * qd);
            using var k = d.Allocate(DType, (long)rows * kvd);
            using var v = d.Allocate(DType, (long)rows * kvd);
            using var att = d.Allocate(DType, (long)rows * qd);
            using var gate = d.Allocate(DType, (long)rows * f);
            using var up = d.Allocate(DType, (long)rows * f);
            using var delta = d.Allocate(DType.F32, (long)rows * dm);
            _ops.Embedding(_embedding, tok, x, rows, dm);
            long elem = DType.Size();
            for (int l = 0; l < c.NumLayers; l++)
            {
                var w = _layers[l];
                int attnIn = (int)(w.AttnIn?.Length ?? dm);
                _ops.GatherRmsNorm(x, w.AttnNorm, w.AttnIn, h, rows, dm, c.RmsNormEps);
                d.Gemm(h, w.Wq, q, rows, qd, attnIn);
                d.Gemm(h, w.Wk, k, rows, kvd, attnIn);
                d.Gemm(h, w.Wv, v, rows, kvd, attnIn);
                if (w.Bq != null) { _ops.AddBias(q, w.Bq, rows); _ops.AddBias(k, w.Bk!, rows); _ops.AddBias(v, w.Bv!, rows); }
                _ops.Rope(q, _invFreq, rows, c.NumHeads, c.HeadDim, start);
                _ops.Rope(k, _invFreq, rows, c.NumKvHeads, c.HeadDim, start);
                nint stream = d.Stream.DangerousGetHandle();
                CudaDriver.CopyDtoD(cache.K[l].Pointer + (ulong)(start * kvd * elem), k.Pointer, rows * kvd * elem, stream);
                CudaDriver.CopyDtoD(cache.V[l].Pointer + (ulong)(start * kvd * elem), v.Pointer, rows * kvd * elem, stream);
                _ops.Attention(q, cache.K[l], cache.V[l], att, rows, start, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
                Residual(x, att, w.Wo, w.Bo, w.AttnOut, delta, rows, qd);

                int mlpIn = (int)(w.MlpIn?.Length ?? dm), mid = (int)(w.MlpMid?.Length ?? f);
                _ops.GatherRmsNorm(x, w.MlpNorm, w.MlpIn, h, rows, dm, c.RmsNormEps);
                d.Gemm(h, w.WGate, gate, rows, mid, mlpIn);
                d.Gemm(h, w.WUp, up, rows, mid, mlpIn);
                _ops.SiluMul(gate, up, gate, (long)rows * mid);
                Residual(x, gate, w.WDown, null, w.MlpOut, delta, rows, mid);
            }
            cache.Length += rows;
            _ops.GatherRmsNorm(x, _finalNorm, null, h, rows, dm, c.RmsNormEps);
            int first = lastOnly ? rows - 1 : 0, n = rows - first;
            using var logits = d.Allocate(DType.F32, (long)n * c.VocabSize);
            d.Gemm(h, _lmHead, logits, n, c.VocabSize, dm, offsetA: (long)first * dm);
            return d.Download(logits);
        }
    }

    /// <summary>x += input·Wᵀ (+ b): one GEMM accumulating into the f32 residual when dense; a GEMM into the f32
    /// <paramref name="delta"/> and an index-add into the selected channels when pruned (or with a bias).</summary>
    private void Residual(DeviceTensor x, DeviceTensor input, DeviceTensor w, DeviceTensor? bias, DeviceTensor? idx, DeviceTensor delta, int rows, int k)
    {
        int dm = Config.HiddenSize;
        if (idx == null && bias == null) { _device.Gemm(input, w, x, rows, dm, k, beta: 1); return; }
        int width = (int)(idx?.Length ?? dm);
        _device.Gemm(input, w, delta, rows, width, k);
        _ops.IndexAdd(x, delta, idx, bias, rows, dm);
    }

    public void Dispose()
    {
        lock (_lock)
        {
            foreach (var layer in _layers) if (layer != null) foreach (var t in layer.All) t?.Dispose();
            _embedding.Dispose(); _finalNorm.Dispose(); _invFreq.Dispose();
            if (!ReferenceEquals(_lmHead, _embedding)) _lmHead.Dispose();
            if (_ownsDevice) _device.Dispose();
        }
    }
}
