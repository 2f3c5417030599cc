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
    /// <summary>The split-KV decode's per-split states and arrival counters (<see cref="CudaOps.NewDecodeScratch"/>), shared by the layers.</summary>
    internal DecodeScratch? DecodeScratch { get; }
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
            DecodeScratch = new CudaOps(device).NewDecodeScratch(c.NumHeads, c.HeadDim);
        }
        catch { Dispose(); throw; }
    }

    /// <summary>The captured single-token decode step for this cache (its buffers and K/V pointers are baked in).</summary>
    internal CudaLlama.DecodeGraph? Graph { get; set; }

    /// <summary>The same step followed by the device's choice of the next token (<see cref="CudaLlama.DecodeGreedy"/>).</summary>
    internal CudaLlama.DecodeGraph? GreedyGraph { get; set; }

    /// <summary>The greedy decoder running on this cache, if any: until it is disposed, nothing else extends the cache.</summary>
    internal GreedyDecoder? Decoder { get; set; }

    /// <summary>The persistent decode kernel's layer table (with this cache's K/V pointers) and barrier counter.</summary>
    internal CudaLlama.PersistentDecodeState? Persistent { get; set; }

    /// <summary>Whether the persistent decode kernel applies to this cache's model; null until a decode step has asked.</summary>
    internal bool? PersistentDecodeApplies { get; set; }

    public void Reset()
    {
        RequireNoDecoder();
        Length = 0;
    }

    /// <summary>Refuses what would extend or rewind the cache while a greedy decoder runs on it.</summary>
    internal void RequireNoDecoder()
    {
        if (Decoder != null) throw new InvalidOperationException("the KV cache is in use by a greedy decoder; dispose the decoder first");
    }

    public void Dispose()
    {
        Decoder?.Dispose();   // its steps finish before the buffers they write go
        Graph?.Dispose();
        GreedyGraph?.Dispose();
        Persistent?.Dispose();
        foreach (var t in K) t?.Dispose();
        foreach (var t in V) t?.Dispose();
        DecodeScratch?.Dispose();
    }
}

/// <summary>GPU forward of a dense or DISP-pruned LLaMA-family model, mirroring <see cref="LlamaModel"/> op for op:
/// embedding → [gather-norm → q/k/v GEMMs → RoPE → causal GQA attention → o_proj → residual (or index-add) →
/// gather-norm → gate/up GEMMs → SwiGLU → down → residual (or index-add)] × L → RMSNorm → LM head.
/// Weights and activations use the storage type (f32, bf16 or f16); the residual stream and logits are f32;
/// every GEMM accumulates in f32 (cuBLASLt).</summary>
public sealed class CudaLlama : ICausalLanguageModel, IGreedyDecoding, IDisposable
{
    /// <summary>One decoder layer's device weights. A pruned site is stored at <see cref="CudaOps.Padded"/> of its
    /// width (to <see cref="Padding"/>) with zero rows/columns (16-byte aligned GEMM operands); a dense site at its full
    /// width.</summary>
    internal sealed class Layer
    {
        public required DeviceTensor AttnNorm, Wq, Wk, Wv, Wo, MlpNorm, WGate, WUp, WDown;
        public DeviceTensor? Bq, Bk, Bv, Bo, AttnIn, AttnOut, MlpIn, MlpMid, MlpOut;
        public IEnumerable<DeviceTensor?> All => [AttnNorm, Wq, Wk, Wv, Wo, MlpNorm, WGate, WUp, WDown, Bq, Bk, Bv, Bo, AttnIn, AttnOut, MlpIn, MlpMid, MlpOut];
    }

    /// <summary>Stored width of a site: full when dense (idx null), else its kept channels padded to a multiple of
    /// <paramref name="padding"/>.</summary>
    private static int Stored(int[]? idx, int full, int padding) => idx == null ? full : CudaOps.Padded(idx.Length, padding);
    private int Stored(DeviceTensor? idx, int full) => idx == null ? full : CudaOps.Padded((int)idx.Length, Padding);

    private readonly CudaDevice _device;
    private readonly CudaOps _ops;
    private readonly Layer[] _layers;
    private readonly DeviceTensor _embedding, _finalNorm, _lmHead, _invFreq;

    // The device weights, shared with the masked training model (CudaMaskedLlama).
    internal CudaDevice Device => _device;
    internal IReadOnlyList<Layer> Layers => _layers;
    internal DeviceTensor EmbeddingTable => _embedding;
    internal DeviceTensor FinalNorm => _finalNorm;
    internal DeviceTensor LmHead => _lmHead;
    internal DeviceTensor InverseFrequencies => _invFreq;
    private readonly bool _ownsDevice;
    private readonly object _lock = new();
    private bool _released;

    public ModelConfig Config { get; }
    public DType DType { get; }

    /// <summary>Pruned sites are stored padded to a multiple of this many channels (<see cref="CudaOps.Padded"/>; unless
    /// the model is built with another, <see cref="CudaOps.DefaultPadding"/>).</summary>
    public int Padding { get; }
    public string DeviceName => $"cuda:{_device.Info.Ordinal} {DType.ToString().ToLowerInvariant()}";

    /// <summary>Uploads <paramref name="weights"/> to <paramref name="device"/> in <paramref name="dtype"/>.
    /// With <paramref name="ownsDevice"/> the device is disposed with the model.</summary>
    public CudaLlama(CudaDevice device, ModelConfig config, ModelWeights weights, DType dtype, bool ownsDevice = false,
        int? padding = null)
        : this(device, config, LayerwiseWeights.Of(weights), dtype, ownsDevice, padding) { }

    /// <summary>Uploads <paramref name="weights"/> one part at a time (a layer's at most): from a checkpoint
    /// (<see cref="LayerwiseWeights.Read"/>) the host never holds the whole model. With <paramref name="ownsDevice"/> the
    /// device is disposed with the model. <paramref name="padding"/>: see <see cref="Padding"/>.</summary>
    public CudaLlama(CudaDevice device, ModelConfig config, LayerwiseWeights weights, DType dtype, bool ownsDevice = false,
        int? padding = null)
        : this(device, config, dtype, ownsDevice, new UploadedWeights(device, config, dtype, weights, padding ?? CudaOps.DefaultPadding(config))) { }

    /// <summary>A model with N(0, 0.02²) weights and unit norms made on the device (nothing crosses the bus), for
    /// benchmarks at real shapes. With <paramref name="keep"/> &lt; 1 it is DISP-pruned: every layer keeps a random
    /// sorted <paramref name="keep"/> share of the channels of each of its five sites.</summary>
    public static CudaLlama RandomWeights(CudaDevice device, ModelConfig config, DType dtype, ulong seed, double keep = 1,
        int? padding = null)
    {
        if (keep is <= 0 or > 1) throw new InvalidSettingException($"kept share must be in (0, 1] (got {keep})");
        return new CudaLlama(device, config, dtype, false, new RandomDeviceWeights(device, config, dtype, seed, keep, padding ?? CudaOps.DefaultPadding(config)));
    }

    /// <summary>The kernel files inference launches (training's masks and loss, and the persistent decode kernel, which
    /// is off by default, build at their first launch). <c>attention_wgmma</c> only where the device runs wgmma.</summary>
    internal static IEnumerable<string> InferenceKernels(bool wgmma) =>
        ["activations", "attention", "attention_decode", "attention_tc", .. wgmma ? ["attention_wgmma"] : Array.Empty<string>(),
         "convert", "embedding", "gemv", "gemv_fused", "gemv_norm", "init", "next_token", "norm", "residual", "rope"];

    private CudaLlama(CudaDevice device, ModelConfig config, DType dtype, bool ownsDevice, WeightSource source)
    {
        if (dtype is not (DType.F32 or DType.BF16 or DType.F16)) throw new InvalidSettingException($"CUDA storage type must be f32, bf16 or f16 (got {dtype})");
        if (!CudaOps.ValidPadding(source.Padding)) throw new InvalidSettingException($"padding of pruned widths must be a power of two from 8 to 256 (got {source.Padding})");
        if (config.HeadDim > CudaOps.MaxHeadDim) throw new DispNativeException($"head_dim {config.HeadDim} is above the CUDA attention kernel's limit {CudaOps.MaxHeadDim}");
        _device = device;
        _ops = new CudaOps(device);
        _ownsDevice = ownsDevice;
        Config = config;
        DType = dtype;
        Padding = source.Padding;
        var rope = new Cpu.Rope(config.HeadDim, config.RopeTheta, config.RopeScaling);
        var invFreq = new float[config.HeadDim / 2];
        for (int i = 0; i < invFreq.Length; i++) invFreq[i] = rope.InverseFrequency(i);
        _layers = new Layer[config.NumLayers];
        // While the weights upload, the kernel files inference needs are compiled (or read from the cache) on all cores,
        // so that no first call waits for NVRTC one file at a time.
        var kernels = Task.Run(() => device.Compiler.CompileAll(InferenceKernels(device.SupportsWgmma)));
        try
        {
            _invFreq = device.Upload(invFreq);
            _embedding = source.Embedding();
            _finalNorm = source.FinalNorm();
            _lmHead = source.LmHead(_embedding);
            for (int l = 0; l < config.NumLayers; l++)
            {
                try { _layers[l] = source.Layer(l); }
                catch { source.ReleaseUnfinishedLayer(); throw; }
            }
            device.Synchronize();
        }
        catch { Release(); throw; }
        // A file that did not build is named by its first launch, which compiles it again.
        try { kernels.Wait(); } catch (AggregateException) { }
    }

    /// <summary>Where the device weights come from. A layer's tensors are tracked until the layer is complete, so that a
    /// failure halfway through one (out of device memory) releases what it had made.</summary>
    private abstract class WeightSource(int padding)
    {
        private readonly List<DeviceTensor> _layerTensors = [];

        /// <summary>The multiple pruned sites are padded to (the model's <see cref="CudaLlama.Padding"/>).</summary>
        public int Padding => padding;
        public abstract DeviceTensor Embedding();
        public abstract DeviceTensor FinalNorm();
        public abstract DeviceTensor LmHead(DeviceTensor embedding);

        public Layer Layer(int l)
        {
            _layerTensors.Clear();   // the previous layer's tensors belong to it now
            return BuildLayer(l);
        }

        protected abstract Layer BuildLayer(int l);

        protected DeviceTensor Track(DeviceTensor t) { _layerTensors.Add(t); return t; }

        public void ReleaseUnfinishedLayer()
        {
            foreach (var t in _layerTensors) t.Dispose();
            _layerTensors.Clear();
        }
    }

    /// <summary>f32 host weights, uploaded as each is asked for.</summary>
    private sealed class UploadedWeights(CudaDevice device, ModelConfig c, DType dtype, LayerwiseWeights host, int padding) : WeightSource(padding)
    {
        public override DeviceTensor Embedding() => device.Upload(host.Embedding(), dtype, "model.embed_tokens.weight");
        public override DeviceTensor FinalNorm() => device.Upload(host.FinalNorm(), dtype, "model.norm.weight");
        public override DeviceTensor LmHead(DeviceTensor embedding) => host.OwnLmHead is { } lmHead ? device.Upload(lmHead(), dtype, "lm_head.weight") : embedding;

        protected override Layer BuildLayer(int l)
        {
            var w = host.Layer(l);
            int d = c.HiddenSize, f = c.IntermediateSize;
            int ai = Stored(w.AttnInIdx, d, Padding), ao = Stored(w.AttnOutIdx, d, Padding), mi = Stored(w.MlpInIdx, d, Padding),
                mm = Stored(w.MlpMidIdx, f, Padding), mo = Stored(w.MlpOutIdx, d, Padding);
            int wo = w.AttnOutIdx?.Length ?? d, wm = w.MlpMidIdx?.Length ?? f, wdo = w.MlpOutIdx?.Length ?? d;
            string Name(string module) => $"model.layers.{l}.{module}";
            DeviceTensor? Opt(float[]? v, DType t, string module) => v == null ? null : Track(device.Upload(v, t, Name(module)));
            DeviceTensor? Idx(int[]? v) => v == null ? null : Track(device.Upload(v));
            // A weight [rows, cols] stored as [storedRows, storedCols] with zeros in the padding.
            DeviceTensor Pad(float[] v, int rows, int storedRows, int storedCols, string module)
            {
                int cols = v.Length / rows;
                if (rows == storedRows && cols == storedCols) return Track(device.Upload(v, dtype, Name(module)));
                var p = new float[(long)storedRows * storedCols];
                for (int r = 0; r < rows; r++) Array.Copy(v, (long)r * cols, p, (long)r * storedCols, cols);
                return Track(device.Upload(p, dtype, Name(module)));
            }
            return new Layer
            {
                AttnNorm = Track(device.Upload(w.AttnNorm, dtype, Name("input_layernorm.weight"))),
                Wq = Pad(w.Wq, c.QDim, c.QDim, ai, "self_attn.q_proj.weight"), Wk = Pad(w.Wk, c.KvDim, c.KvDim, ai, "self_attn.k_proj.weight"),
                Wv = Pad(w.Wv, c.KvDim, c.KvDim, ai, "self_attn.v_proj.weight"), Wo = Pad(w.Wo, wo, ao, c.QDim, "self_attn.o_proj.weight"),
                MlpNorm = Track(device.Upload(w.MlpNorm, dtype, Name("post_attention_layernorm.weight"))),
                WGate = Pad(w.WGate, wm, mm, mi, "mlp.gate_proj.weight"), WUp = Pad(w.WUp, wm, mm, mi, "mlp.up_proj.weight"),
                WDown = Pad(w.WDown, wdo, mo, mm, "mlp.down_proj.weight"),
                Bq = Opt(w.Bq, dtype, "self_attn.q_proj.bias"), Bk = Opt(w.Bk, dtype, "self_attn.k_proj.bias"), Bv = Opt(w.Bv, dtype, "self_attn.v_proj.bias"),
                Bo = Opt(w.Bo, DType.F32, "self_attn.o_proj.bias"),
                AttnIn = Idx(w.AttnInIdx), AttnOut = Idx(w.AttnOutIdx), MlpIn = Idx(w.MlpInIdx), MlpMid = Idx(w.MlpMidIdx), MlpOut = Idx(w.MlpOutIdx),
            };
        }
    }

    private sealed class RandomDeviceWeights(CudaDevice device, ModelConfig c, DType dtype, ulong seed, double keep, int padding) : WeightSource(padding)
    {
        private readonly CudaOps _ops = new(device);
        private readonly Rng _rng = new(seed);
        private ulong _next = seed;

        private DeviceTensor Normal(long n)
        {
            var t = Track(device.Allocate(dtype, n));
            _ops.FillNormal(t, _next++ * 0x100000001B3UL, 0.02f);
            return t;
        }

        private DeviceTensor Ones(long n)
        {
            var t = Track(device.Allocate(dtype, n));
            _ops.FillConstant(t, 1f);
            return t;
        }

        /// <summary>A random sorted subset of round(keep·full) of 0..full-1, or null (dense) when keep is 1.</summary>
        private int[]? Subset(int full)
        {
            if (keep >= 1) return null;
            var all = Enumerable.Range(0, full).ToArray();
            _rng.Shuffle<int>(all);
            var kept = all[..Math.Max(1, (int)Math.Round(keep * full))];
            Array.Sort(kept);
            return kept;
        }

        public override DeviceTensor Embedding() => Normal((long)c.VocabSize * c.HiddenSize);
        public override DeviceTensor FinalNorm() => Ones(c.HiddenSize);
        public override DeviceTensor LmHead(DeviceTensor embedding) => c.TieWordEmbeddings ? embedding : Normal((long)c.VocabSize * c.HiddenSize);

        protected override Layer BuildLayer(int l)
        {
            int d = c.HiddenSize, f = c.IntermediateSize;
            int[]? attnIn = Subset(d), attnOut = Subset(d), mlpIn = Subset(d), mid = Subset(f), mlpOut = Subset(d);
            int ai = Stored(attnIn, d, Padding), ao = Stored(attnOut, d, Padding), mi = Stored(mlpIn, d, Padding), mm = Stored(mid, f, Padding),
                mo = Stored(mlpOut, d, Padding);
            DeviceTensor? Idx(int[]? v) => v == null ? null : Track(device.Upload(v));
            // The padding only has to keep SwiGLU's padded columns zero: up's padding rows are zero (the norm zeroes the
            // padded input columns, and the padded output rows are never added to the residual).
            var up = Normal((long)mm * mi);
            if (mid != null) _ops.FillConstant(up, 0f, (long)mid.Length * mi);
            return new Layer
            {
                AttnNorm = Ones(d), Wq = Normal((long)c.QDim * ai), Wk = Normal((long)c.KvDim * ai), Wv = Normal((long)c.KvDim * ai),
                Wo = Normal((long)ao * c.QDim), MlpNorm = Ones(d), WGate = Normal((long)mm * mi), WUp = up,
                WDown = Normal((long)mo * mm),
                AttnIn = Idx(attnIn), AttnOut = Idx(attnOut), MlpIn = Idx(mlpIn), MlpMid = Idx(mid), MlpOut = Idx(mlpOut),
            };
        }
    }

    /// <summary>Weight bytes one decode step reads at least: every layer (with its index tensors), the final norm and
    /// the LM head (the embedding table only through its one row, unless it is the tied LM head).</summary>
    public long DecodeWeightBytes
    {
        get
        {
            long b = _finalNorm.Bytes + _lmHead.Bytes;
            foreach (var layer in _layers) foreach (var t in layer.All) b += t?.Bytes ?? 0;
            return b;
        }
    }

    /// <summary>Kept widths of layer <paramref name="layer"/> as stored here, padding aside: [attn_in, attn_out, mlp_in,
    /// mlp_mid, mlp_out] (<see cref="ModelConfig.LayerWidths"/>; a random pruned model's config is the dense one).</summary>
    public int[] LayerWidths(int layer)
    {
        var w = _layers[layer];
        int d = Config.HiddenSize;
        return [(int)(w.AttnIn?.Length ?? d), (int)(w.AttnOut?.Length ?? d), (int)(w.MlpIn?.Length ?? d),
            (int)(w.MlpMid?.Length ?? Config.IntermediateSize), (int)(w.MlpOut?.Length ?? d)];
    }

    /// <summary>Parameters of the layers' GEMMs (q/k/v/o, gate/up/down) as stored, padding included: what prefill multiplies per token.</summary>
    public long LayerGemmParameters
    {
        get
        {
            long n = 0;
            foreach (var w in _layers) foreach (var t in new[] { w.Wq, w.Wk, w.Wv, w.Wo, w.WGate, w.WUp, w.WDown }) n += t.Length;
            return n;
        }
    }

    /// <summary>Replay single-token decode steps as one captured CUDA graph per cache (removes the per-kernel launch
    /// cost); off runs every step eagerly. The two give the same logits.</summary>
    public bool UseCudaGraphs { get; set; } = true;

    /// <summary>Kernels a forward leaves out, for timing only (KernelBench's ablations): what a decode step or a
    /// prefill costs without them is what they cost inside the pipelined sequence, overlap included, which timing
    /// them alone does not tell. The logits are meaningless with anything skipped.</summary>
    [Flags]
    internal enum Skipped
    {
        None = 0,
        /// <summary>Single-row calls: the gather-norms (decode's index-adds are in the GEMVs, so the residual still updates).</summary>
        DecodeNorms = 1,
        /// <summary>RoPE, the KV-cache append and attention (the output projection reads a stale attention output).</summary>
        Attention = 2,
    }

    /// <summary>See <see cref="Skipped"/>; KernelBench only. A captured decode graph keeps what it captured: use a new cache.</summary>
    internal Skipped SkipForTiming { get; set; }

    /// <summary>Decode steps run their decoder layers as one persistent kernel (kernels/decode_step.cu: one cooperative
    /// launch, a grid barrier where a kernel boundary was) where it applies (no biases, every GEMV and fused norm in the
    /// kernels' reach), eagerly: embedding, that kernel, the final norm and the LM head, no CUDA graph (where it does not
    /// apply, decode goes on as without it). Off (the default; on the H200 it ran 0.69-0.82x the CUDA graphs' speed):
    /// five kernels per layer. The two give the same logits, bit for bit.</summary>
    public bool UsePersistentDecode { get; set; }

    /// <summary>Decode steps launch their kernels programmatically (<see cref="CudaDevice.ProgrammaticLaunch"/>); off:
    /// plain stream order (the self-test compares the two).</summary>
    public bool UseProgrammaticLaunch { get; set; } = true;

    /// <summary>Activations of one forward call of <c>Rows</c> tokens (logits for the last <c>LogitRows</c>).</summary>
    internal sealed class Activations : IDisposable
    {
        public readonly int Rows, LogitRows;
        public readonly DeviceTensor Tokens, X, H, Q, Att, Gate, Up, Delta, Logits;
        /// <summary>A single row's new key and value (several rows' projections write theirs straight into the cache).</summary>
        public readonly DeviceTensor? K, V;

        public Activations(CudaDevice d, ModelConfig c, DType dtype, int padding, int rows, int logitRows)
        {
            (Rows, LogitRows) = (rows, logitRows);
            var all = new List<DeviceTensor>();
            DeviceTensor A(DType t, long n) { var x = d.Allocate(t, n); all.Add(x); return x; }
            try
            {
                Tokens = A(DType.I32, rows);
                // H, Gate, Up and Delta hold pruned sites at their padded width: at most the padded full (or widest) width.
                X = A(DType.F32, (long)rows * c.HiddenSize); H = A(dtype, (long)rows * CudaOps.Padded(c.HiddenSize, padding));
                Q = A(dtype, (long)rows * c.QDim);
                if (rows == 1) { K = A(dtype, c.KvDim); V = A(dtype, c.KvDim); }
                Att = A(dtype, (long)rows * c.QDim);
                Gate = A(dtype, (long)rows * CudaOps.Padded(c.WidestMlpMiddle, padding)); Up = A(dtype, (long)rows * CudaOps.Padded(c.WidestMlpMiddle, padding));
                Delta = A(DType.F32, (long)rows * CudaOps.Padded(c.HiddenSize, padding));
                Logits = A(DType.F32, (long)logitRows * c.VocabSize);
            }
            catch { foreach (var x in all) x.Dispose(); throw; }
        }

        public void Dispose()
        {
            foreach (var t in new[] { Tokens, X, H, Q, K, V, Att, Gate, Up, Delta, Logits }) t?.Dispose();
        }
    }

    /// <summary>A captured decode step: its activations, the device-held token and position it reads, pinned staging
    /// for them, and the executable graph; for greedy decoding (<see cref="DecodeGreedy"/>), also the mapped host
    /// memory where the step's kernel writes each position's next token.</summary>
    internal sealed class DecodeGraph(Activations act, DeviceTensor position, PinnedHostBuffer staging, PinnedHostBuffer? produced = null) : IDisposable
    {
        public Activations Act { get; } = act;
        public DeviceTensor Position { get; } = position;
        public PinnedHostBuffer Staging { get; } = staging;
        public PinnedHostBuffer? Produced { get; } = produced;
        public CudaGraphHandle? Exec { get; set; }

        public void Dispose() { Exec?.Dispose(); Act.Dispose(); Position.Dispose(); Staging.Dispose(); Produced?.Dispose(); }
    }

    IInferenceCache ICausalLanguageModel.NewCache(int capacity) => NewCache(capacity);

    public CudaKvCache NewCache(int capacity)
    {
        ObjectDisposedException.ThrowIf(_released, this);
        return new(_device, Config, DType, capacity);
    }

    float[] ICausalLanguageModel.Forward(ReadOnlySpan<int> tokens, IInferenceCache cache, bool lastOnly)
        => Forward(tokens, cache as CudaKvCache ?? throw new ArgumentException("the CUDA model needs a CUDA KV cache"), lastOnly);

    /// <summary>Appends tokens to the sequence in <paramref name="cache"/> and returns f32 logits, [tokens, vocab] or [1, vocab].
    /// Calls are serialised (one stream).</summary>
    public float[] Forward(ReadOnlySpan<int> tokens, CudaKvCache cache, bool lastOnly = false)
    {
        var logits = new float[(long)(lastOnly ? 1 : tokens.Length) * Config.VocabSize];
        ForwardInto(tokens, cache, logits);
        return logits;
    }

    void ICausalLanguageModel.ForwardLast(ReadOnlySpan<int> tokens, IInferenceCache cache, Span<float> logits)
        => ForwardLast(tokens, cache as CudaKvCache ?? throw new ArgumentException("the CUDA model needs a CUDA KV cache"), logits);

    /// <summary>Appends tokens as <see cref="Forward(ReadOnlySpan{int}, CudaKvCache, bool)"/> does and writes the last row's
    /// logits into <paramref name="logits"/> (vocab values; <see cref="ICausalLanguageModel.ForwardLast"/>).</summary>
    public void ForwardLast(ReadOnlySpan<int> tokens, CudaKvCache cache, Span<float> logits)
    {
        ICausalLanguageModel.NeedLogitsBuffer(Config, logits.Length);
        ForwardInto(tokens, cache, logits);
    }

    /// <summary>The forward of <paramref name="tokens"/> with the logits of its last logits.Length / vocab rows written
    /// into <paramref name="logits"/>.</summary>
    private void ForwardInto(ReadOnlySpan<int> tokens, CudaKvCache cache, Span<float> logits)
    {
        int rows = tokens.Length, start = cache.Length;
        Validate(tokens, cache);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_released, this);
            bool graph = rows == 1 && UseCudaGraphs && !(UsePersistentDecode && cache.PersistentDecodeApplies != false);
            if (graph) DecodeWithGraph(tokens[0], cache, start, logits);
            else
            {
                using var a = ForwardEager(tokens, cache, start, logits.Length / Config.VocabSize);
                _device.Download(a.Logits, logits);
            }
            cache.Length += rows;
        }
    }

    /// <summary>−log p(tokens[t+1] | tokens[..t]) for t = 0..n-2 (<see cref="ICausalLanguageModel.TokenNll"/>), on the
    /// device: the logits stay there, the cross-entropy kernel scores each row against the next token and n - 1 f32
    /// values come back, not the n × vocab logits (262 MB for a block of 2048 over a 32000-token vocabulary) whose
    /// log-sum-exp the host would otherwise compute.</summary>
    public double[] TokenNll(int[] tokens)
    {
        int scored = tokens.Length - 1, vocab = Config.VocabSize;
        if (scored <= 0) return [];
        using var cache = NewCache(tokens.Length);
        Validate(tokens, cache);
        float[] nll;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_released, this);
            using var targets = _device.Upload(tokens.AsSpan(1));   // before the forward: its synchronization waits for nothing
            using var loss = _device.Allocate(DType.F32, scored);
            using var a = ForwardEager(tokens, cache, 0, tokens.Length);
            _ops.CrossEntropy(a.Logits, targets, loss, null, scored, vocab, 0);
            nll = _device.Download(loss);
            int bad = Array.FindIndex(nll, v => !float.IsFinite(v));
            if (bad >= 0)
            {
                Generator.RequireFiniteLogits(_device.Download(a.Logits).AsSpan(bad * vocab, vocab), $"position {bad} of a block");
                throw new DispNativeException($"the loss at position {bad} of a block is not finite ({nll[bad]})");
            }
        }
        return Array.ConvertAll(nll, v => (double)v);
    }

    private void Validate(ReadOnlySpan<int> tokens, CudaKvCache cache)
    {
        cache.RequireNoDecoder();
        if (tokens.Length == 0) throw new InvalidSettingException("the sequence is empty");
        if (cache.Length + tokens.Length > cache.Capacity)
            throw new InvalidSettingException($"{cache.Length + tokens.Length} positions exceed the KV cache capacity {cache.Capacity}");
        foreach (int t in tokens)
            if ((uint)t >= (uint)Config.VocabSize) throw new DispNativeException($"token id {t} is outside the vocabulary (size {Config.VocabSize})");
    }

    /// <summary>Enqueues the forward of <paramref name="tokens"/> at positions start.. with the logits of the last
    /// <paramref name="logitRows"/> rows, kernel by kernel, in activations the caller reads and then disposes (the first
    /// download waits for the stream, so the tokens' host span outlives its copy).</summary>
    private unsafe Activations ForwardEager(ReadOnlySpan<int> tokens, CudaKvCache cache, int start, int logitRows)
    {
        var a = new Activations(_device, Config, DType, Padding, tokens.Length, logitRows);
        try
        {
            fixed (int* p = tokens) CudaDriver.CopyHtoD(a.Tokens.Pointer, p, tokens.Length * 4L, _device.Stream.DangerousGetHandle());
            Enqueue(a, cache, start, null);
            return a;
        }
        catch { a.Dispose(); throw; }
    }

    /// <summary>One decode step through the cache's graph. The first step runs eagerly with the graph's buffers (which
    /// also loads every kernel and GEMM plan the capture will record) and is then captured; later steps only copy the
    /// token and position to the device and replay it.</summary>
    private void DecodeWithGraph(int token, CudaKvCache cache, int start, Span<float> logits)
    {
        var g = cache.Graph;
        bool first = g == null;
        g ??= NewDecodeGraph();
        try
        {
            UploadTokenAndPosition(g, token, start);   // the staging is free: the previous step's Download waited for the stream
            if (first) Enqueue(g.Act, cache, start, g.Position);
            else g.Exec!.Launch(_device.Stream);
            _device.Download(g.Act.Logits, logits);
            if (first)
            {
                g.Exec = new CudaGraphHandle(_device.Stream, () => Enqueue(g.Act, cache, start, g.Position));
                cache.Graph = g;
            }
        }
        catch { if (first) g.Dispose(); throw; }
    }

    /// <summary>Enqueues the whole forward of <c>a.Rows</c> tokens at positions start.. (or, for a captured decode step,
    /// at the device-held <paramref name="position"/>): embedding, the layers with K/V appended to the cache, the final
    /// norm and the LM head for the last <c>a.LogitRows</c> rows; with <paramref name="produced"/> (greedy decoding, a
    /// position given), then the next token chosen on the device into <c>a.Tokens</c> and produced[position], and the
    /// position advanced (<see cref="CudaOps.GreedyNextToken"/>).</summary>
    private void Enqueue(Activations a, CudaKvCache cache, int start, DeviceTensor? position, PinnedHostBuffer? produced = null)
    {
        // A decode step is a chain of short kernels: each starts while the previous one finishes (CudaDevice.ProgrammaticLaunch).
        _device.ProgrammaticLaunch = a.Rows == 1 && UseProgrammaticLaunch;
        try
        {
            EnqueueLayers(a, cache, start, position);
            if (produced != null) _ops.GreedyNextToken(a.Logits, Config.VocabSize, a.Tokens, position!, produced.DevicePointer);
        }
        finally { _device.ProgrammaticLaunch = false; }
    }

    /// <summary>Greedy decoding of up to <paramref name="steps"/> tokens after <paramref name="firstToken"/> (the
    /// argmax of the prompt's last logits), each chosen on the device at the end of its step and fed to the next
    /// there: the host queues step i + 1 before it reads step i's token, so the GPU never waits for the host (no
    /// logits copied back, no host argmax between steps). The tokens are those of argmax over <see cref="Forward"/>'s
    /// logits, step for step. Steps run through a CUDA graph of their own per cache (<see cref="UseCudaGraphs"/>; off:
    /// eagerly). Until the decoder is disposed, the cache is its own; it then holds the positions of the tokens read
    /// (<see cref="GreedyDecoder.Next"/>): a step queued ahead and not read is not counted.</summary>
    public GreedyDecoder DecodeGreedy(CudaKvCache cache, int firstToken, int steps)
    {
        if (steps < 0) throw new InvalidSettingException($"greedy decoding needs a non-negative number of steps (got {steps})");
        Validate([firstToken], cache);   // the first step's input
        if (cache.Length + steps > cache.Capacity)
            throw new InvalidSettingException($"{cache.Length} positions + {steps} steps exceed the KV cache capacity {cache.Capacity}");
        return new GreedyDecoder(this, cache, firstToken, steps);
    }

    IGreedyDecoder IGreedyDecoding.DecodeGreedy(IInferenceCache cache, int firstToken, int steps)
        => DecodeGreedy(cache as CudaKvCache ?? throw new ArgumentException("the CUDA model needs a CUDA KV cache"), firstToken, steps);

    /// <summary>The device's token and position set for a greedy decoder's first step (the cache's greedy graph made
    /// where it has none), <paramref name="uploaded"/> recorded after.</summary>
    internal void StartGreedy(CudaKvCache cache, int token, CudaEventHandle uploaded)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_released, this);
            var g = cache.GreedyGraph ??= NewDecodeGraph(producedPositions: cache.Capacity);
            UploadTokenAndPosition(g, token, cache.Length);   // the staging is free: the last decoder's disposal waited for its uploads and steps
            uploaded.Record(_device.Stream);
        }
    }

    /// <summary>An event for a greedy decoder, and its wait: each with the device's context current on the calling
    /// thread (a stream's consumer may move between threads).</summary>
    internal CudaEventHandle NewEvent() { _device.MakeCurrent(); return new CudaEventHandle(); }
    internal void Wait(CudaEventHandle e) { _device.MakeCurrent(); e.Synchronize(); }

    /// <summary>A decode graph's buffers, nothing captured yet; with <paramref name="producedPositions"/>, greedy
    /// decoding's mapped host memory for that many positions' tokens too.</summary>
    private DecodeGraph NewDecodeGraph(int producedPositions = 0)
    {
        var act = new Activations(_device, Config, DType, Padding, 1, 1);
        DeviceTensor? position = null;
        PinnedHostBuffer? staging = null;
        try
        {
            position = _device.Allocate(DType.I32, 1);
            staging = new PinnedHostBuffer(8);
            return new DecodeGraph(act, position, staging, producedPositions > 0 ? new PinnedHostBuffer(4L * producedPositions, mapped: true) : null);
        }
        catch { act.Dispose(); position?.Dispose(); staging?.Dispose(); throw; }
    }

    /// <summary>Queues the copies of a step's token and position into the graph's device buffers (through its pinned
    /// staging, which the caller knows to be free).</summary>
    private unsafe void UploadTokenAndPosition(DecodeGraph g, int token, int position)
    {
        _device.MakeCurrent();   // the caller may be on a thread that has not used this device yet
        var stream = _device.Stream.DangerousGetHandle();
        int* host = (int*)g.Staging.Pointer;
        host[0] = token; host[1] = position;
        CudaDriver.CopyHtoD(g.Act.Tokens.Pointer, host, 4, stream);
        CudaDriver.CopyHtoD(g.Position.Pointer, host + 1, 4, stream);
    }

    /// <summary>Queues a greedy decoder's step at <paramref name="start"/> (its graph's replay, or, the first time and
    /// without CUDA graphs, the kernels; the first is then captured) and records <paramref name="done"/> after it.</summary>
    internal void LaunchGreedyStep(CudaKvCache cache, int start, CudaEventHandle done)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_released, this);
            _device.MakeCurrent();   // the decoder's consumer may be on another thread than the last step's
            var g = cache.GreedyGraph!;
            if (UseCudaGraphs && g.Exec != null) g.Exec.Launch(_device.Stream);
            else
            {
                Enqueue(g.Act, cache, start, g.Position, g.Produced);
                if (UseCudaGraphs)
                {
                    _device.Synchronize();   // the step's first run loaded (and timed) what the capture records
                    g.Exec = new CudaGraphHandle(_device.Stream, () => Enqueue(g.Act, cache, start, g.Position, g.Produced));
                }
            }
            done.Record(_device.Stream);
        }
    }

    private void EnqueueLayers(Activations a, CudaKvCache cache, int start, DeviceTensor? position)
    {
        var c = Config;
        var d = _device;
        int rows = a.Rows, dm = c.HiddenSize, f = c.IntermediateSize, qd = c.QDim, kvd = c.KvDim;
        _ops.Embedding(_embedding, a.Tokens, a.X, rows, dm);
        WriteBack? pending = null;
        if (rows == 1 && position == null && UsePersistentDecode)
        {
            uint? sharedBytes = PersistentDecodeShape(a, cache);
            cache.PersistentDecodeApplies = sharedBytes != null;
            if (sharedBytes != null)
            {
                if (PersistentLayers(a, cache, start, sharedBytes.Value))
                {
                    Norm(a.X, _finalNorm, null, a.H, rows, dm, ref pending);
                    d.Gemm(a.H, _lmHead, a.Logits, 1, c.VocabSize, dm);
                    return;
                }
                _ops.Embedding(_embedding, a.Tokens, a.X, rows, dm);   // refused: the step again, a kernel per phase
            }
        }
        for (int l = 0; l < c.NumLayers; l++)
        {
            var w = _layers[l];
            int attnIn = Stored(w.AttnIn, dm);
            bool attention = !SkipForTiming.HasFlag(Skipped.Attention);
            if (rows == 1)
            {
                var (k, v) = (a.K!, a.V!);
                bool gemv = w.Bq == null && d.GemvApplies(a.H, w.Wq, attnIn);
                if (gemv && NormFusable(pending))
                    _ops.NormGemvQkv(a.X, w.AttnNorm, w.AttnIn, dm, c.RmsNormEps, a.H, w.Wq, a.Q, qd, w.Wk, k, kvd, w.Wv, v, kvd, attnIn);
                else
                {
                    Norm(a.X, w.AttnNorm, w.AttnIn, a.H, rows, attnIn, ref pending);
                    if (gemv) _ops.GemvQkv(a.H, w.Wq, a.Q, qd, w.Wk, k, kvd, w.Wv, v, kvd, attnIn);
                    else Project(a.H, w, a.Q, k, v, 0, 1, attnIn);
                }
                if (attention)
                    _ops.RopeKvAppendAttention(a.Q, k, v, cache.K[l], cache.V[l], _invFreq, a.Att, start, c.NumHeads, c.NumKvHeads, c.HeadDim,
                        c.SlidingWindow, position, cache.DecodeScratch);
            }
            else
            {
                Norm(a.X, w.AttnNorm, w.AttnIn, a.H, rows, attnIn, ref pending);
                // The keys and values go straight to their cache rows, where RoPE rotates the keys in place.
                Project(a.H, w, a.Q, cache.K[l], cache.V[l], (long)start * kvd, rows, attnIn);
                if (attention) _ops.RopeKvAppend(a.Q, null, null, cache.K[l], cache.V[l], _invFreq, rows, c.NumHeads, c.NumKvHeads, c.HeadDim, start);
                // Where only the last row's logits are wanted, the last layer needs every row's keys and values (for the
                // cache) but the rest only for that row: its query and residual move to row 0, and the layer goes on
                // as a decode step at the last position.
                int queryStart = start;
                if (l == c.NumLayers - 1 && a.LogitRows < rows)
                {
                    d.CopyRow(a.Q, rows - 1, 0, qd);
                    d.CopyRow(a.X, rows - 1, 0, dm);
                    queryStart = start + rows - 1;
                    rows = 1;
                }
                if (attention) _ops.Attention(a.Q, cache.K[l], cache.V[l], a.Att, rows, queryStart, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow);
            }
            pending = Residual(a.X, a.Att, w.Wo, w.Bo, w.AttnOut, a.Delta, rows, qd);

            int mlpIn = Stored(w.MlpIn, dm), mid = Stored(w.MlpMid, f);
            bool mlpGemv = rows == 1 && d.GemvApplies(a.H, w.WGate, mlpIn);
            if (mlpGemv && NormFusable(pending)) _ops.NormGemvSwiGlu(a.X, w.MlpNorm, w.MlpIn, dm, c.RmsNormEps, a.H, w.WGate, w.WUp, a.Gate, mid, mlpIn);
            else if (mlpGemv)
            {
                Norm(a.X, w.MlpNorm, w.MlpIn, a.H, rows, mlpIn, ref pending);
                _ops.GemvSwiGlu(a.H, w.WGate, w.WUp, a.Gate, mid, mlpIn);
            }
            else
            {
                Norm(a.X, w.MlpNorm, w.MlpIn, a.H, rows, mlpIn, ref pending);
                d.Gemm(a.H, w.WGate, a.Gate, rows, mid, mlpIn);
                d.Gemm(a.H, w.WUp, a.Up, rows, mid, mlpIn);
                _ops.SiluMul(a.Gate, a.Up, a.Gate, (long)rows * mid);
            }
            pending = Residual(a.X, a.Gate, w.WDown, null, w.MlpOut, a.Delta, rows, mid);
        }
        Norm(a.X, _finalNorm, null, a.H, rows, dm, ref pending);
        d.Gemm(a.H, _lmHead, a.Logits, a.LogitRows, c.VocabSize, dm, offsetA: (long)(rows - a.LogitRows) * dm);
    }

    /// <summary>A persistent decode kernel's per-cache state: the layer table it reads (kernels/decode_step.cu's
    /// DecodeLayer, 8-byte fields) and its barrier counter.</summary>
    internal sealed class PersistentDecodeState(DeviceTensor layers, DeviceTensor barrier) : IDisposable
    {
        public DeviceTensor Layers { get; } = layers;
        public DeviceTensor Barrier { get; } = barrier;

        public void Dispose() { Layers.Dispose(); Barrier.Dispose(); }
    }

    /// <summary>The persistent decode kernel's unroll and blocks per SM (as launched: at most what fits): timed on the
    /// model's first persistent step (<see cref="PersistentLayers"/>) unless <see cref="CudaDevice.GemvUnroll"/> forces
    /// the unroll; null before.</summary>
    internal (int Unroll, int BlocksPerSM)? PersistentDecodeForm { get; private set; }

    /// <summary>The unrolls decode_step.cu is compiled with (its GEMV phases' loads in flight per lane): those of
    /// <see cref="CudaDevice.GemvUnrolls"/> whose registers fit without spilling; a forced larger unroll runs the largest.</summary>
    internal static readonly IReadOnlyList<int> PersistentDecodeUnrolls = [8, 12];

    /// <summary>Fields per layer of decode_step.cu's DecodeLayer: 15 pointers, then 9 widths.</summary>
    internal const int DecodeLayerFields = 24;

    /// <summary>Threads per block of the persistent decode kernel: two groups of the decode attention's 4 warps, and the
    /// GEMVs' 8 warps.</summary>
    private const int PersistentDecodeThreads = CudaDevice.GemvWarps * 32;

    /// <summary>The dynamic shared memory of the persistent decode kernel (its larger fused norm's), or null where the
    /// kernel does not apply: a bias, a GEMV or fused norm out of the kernels' reach, no split-KV layout with RoPE fused,
    /// anything skipped for timing, an f16 model (decode_step.cu is compiled for f32 and bf16).</summary>
    private uint? PersistentDecodeShape(Activations a, CudaKvCache cache)
    {
        var c = Config;
        var d = _device;
        int dm = c.HiddenSize, f = c.IntermediateSize;
        if (SkipForTiming != Skipped.None || cache.DecodeScratch == null || DType is not (DType.F32 or DType.BF16)) return null;
        uint shared = 0;
        for (int l = 0; l < c.NumLayers; l++)
        {
            var w = _layers[l];
            if (w.Bq != null || w.Bo != null) return null;
            if (!CudaOps.RopeFusesIntoDecode(a.Q, a.K!, a.V!, cache.K[l], cache.V[l], c.HeadDim)) return null;
            int attnIn = Stored(w.AttnIn, dm), mlpIn = Stored(w.MlpIn, dm), mid = Stored(w.MlpMid, f);
            if (!d.GemvApplies(a.H, w.Wq, attnIn) || !d.GemvApplies(a.H, w.Wk, attnIn) || !d.GemvApplies(a.H, w.Wv, attnIn)
                || !d.GemvApplies(a.Att, w.Wo, c.QDim) || !d.GemvApplies(a.H, w.WGate, mlpIn) || !d.GemvApplies(a.H, w.WUp, mlpIn)
                || !d.GemvApplies(a.Gate, w.WDown, mid)) return null;
            if (_ops.FusedNorm(a.X, w.AttnIn, a.H, dm, attnIn) is not { } attnNorm || _ops.FusedNorm(a.X, w.MlpIn, a.H, dm, mlpIn) is not { } mlpNorm)
                return null;
            shared = Math.Max(shared, Math.Max(attnNorm.SharedBytes, mlpNorm.SharedBytes));
        }
        return shared;
    }

    /// <summary>The layers of one decode step at position <paramref name="start"/> as one cooperative launch of
    /// decode_step.cu. The model's first such step times every compiled unroll at each of
    /// <see cref="CudaDevice.PersistentBlocksPerSM"/> (the whole step from the embedding on, which gives the same result
    /// however often it runs) and keeps the fastest (<see cref="PersistentDecodeForm"/>); models under
    /// <see cref="CudaDevice.MinTunedGemvElements"/> weight elements take the first of each, and
    /// <see cref="CudaDevice.GemvUnroll"/> forces the unroll (at the first blocks per SM; above 12, 12). False where the driver refuses the cooperative launch (a device without
    /// it, or a grid it will not hold): the cache then decodes without the kernel from this step on.</summary>
    private bool PersistentLayers(Activations a, CudaKvCache cache, int start, uint sharedBytes)
    {
        try { PersistentLayersOrThrow(a, cache, start, sharedBytes); return true; }
        catch (CudaException e) when (e.Code is CooperativeLaunchTooLarge or NotSupported)
        {
            cache.PersistentDecodeApplies = false;
            return false;
        }
    }

    private const int CooperativeLaunchTooLarge = 720, NotSupported = 801;   // CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, CUDA_ERROR_NOT_SUPPORTED

    private void PersistentLayersOrThrow(Activations a, CudaKvCache cache, int start, uint sharedBytes)
    {
        var c = Config;
        var d = _device;
        var state = cache.Persistent ??= NewPersistentState(a, cache);
        var scratch = cache.DecodeScratch!;
        int splits = CudaOps.DecodeSplits(cache.Capacity, c.SlidingWindow ?? 0);
        string Entry(int unroll) => $"decode_layers_{CudaDevice.Suffix(DType)}_u{unroll}";
        // The blocks per SM a form gets: fewer where fewer fit (each entry holds all phases' registers: ptxas 11.8 gave
        // them 203-249 per thread, one block of 256 per SM).
        (int Unroll, int BlocksPerSM) Fitted(int unroll, int blocksPerSM) =>
            (unroll, Math.Min(blocksPerSM, d.ResidentBlocks("decode_step", Entry(unroll), PersistentDecodeThreads, sharedBytes)));
        void Launch((int Unroll, int BlocksPerSM) form)
        {
            long resident = (long)form.BlocksPerSM * d.Info.Multiprocessors;
            uint grid = (uint)Math.Max(1, Math.Min(resident, d.PersistentGridLimit ?? long.MaxValue));
            _ops.FillConstant(state.Barrier, 0f);
            d.LaunchCooperative("decode_step", Entry(form.Unroll), (grid, 1, 1), (PersistentDecodeThreads, 1, 1), sharedBytes,
                state.Layers, c.NumLayers, a.X, a.Q, a.K, a.V, a.Att, a.Gate, _invFreq, scratch.States, scratch.Counters, state.Barrier,
                start, c.HiddenSize, c.NumHeads, c.NumKvHeads, c.HeadDim, c.SlidingWindow ?? 0, splits, 1f / MathF.Sqrt(c.HeadDim), c.RmsNormEps);
        }
        if (d.GemvUnroll is int forced)
        {
            Launch(Fitted(PersistentDecodeUnrolls.Last(u => u <= forced), CudaDevice.PersistentBlocksPerSM[0]));
            return;
        }
        if (PersistentDecodeForm == null)
        {
            bool tune = LayerGemmParameters >= d.MinTunedGemvElements;
            var forms = (tune ? PersistentDecodeUnrolls : [PersistentDecodeUnrolls[0]])
                .SelectMany(u => (tune ? CudaDevice.PersistentBlocksPerSM : [CudaDevice.PersistentBlocksPerSM[0]]).Select(b => Fitted(u, b)))
                .Distinct().ToList();   // forms that fit the same blocks are timed once
            if (forms.Count > 1)
            {
                void Step((int, int) form) { _ops.Embedding(_embedding, a.Tokens, a.X, 1, c.HiddenSize); Launch(form); }
                foreach (var form in forms) Step(form);   // untimed: first-use costs
                PersistentDecodeForm = forms.MinBy(form =>
                {
                    var ms = Enumerable.Range(0, 5).Select(_ => d.Time(() => Step(form))).Order().ToList();
                    return ms[2];
                });
                _ops.Embedding(_embedding, a.Tokens, a.X, 1, c.HiddenSize);   // the residual as the step began
            }
            else PersistentDecodeForm = forms[0];
        }
        Launch(PersistentDecodeForm.Value);
    }

    /// <summary>The layer table of <paramref name="cache"/> (decode_step.cu's DecodeLayer per layer) on the device, and a
    /// barrier counter; <see cref="PersistentDecodeShape"/> has accepted the model.</summary>
    private PersistentDecodeState NewPersistentState(Activations a, CudaKvCache cache)
    {
        var c = Config;
        int dm = c.HiddenSize, f = c.IntermediateSize;
        var table = new long[c.NumLayers * DecodeLayerFields];
        for (int l = 0; l < c.NumLayers; l++)
        {
            var w = _layers[l];
            int attnIn = Stored(w.AttnIn, dm), mlpIn = Stored(w.MlpIn, dm);
            long P(DeviceTensor? t) => (long)(t?.Pointer ?? 0);
            long[] fields =
            [
                P(w.AttnNorm), P(w.AttnIn), P(w.Wq), P(w.Wk), P(w.Wv), P(cache.K[l]), P(cache.V[l]),
                P(w.Wo), P(w.AttnOut), P(w.MlpNorm), P(w.MlpIn), P(w.WGate), P(w.WUp), P(w.WDown), P(w.MlpOut),
                w.AttnIn?.Length ?? dm, attnIn, _ops.FusedNorm(a.X, w.AttnIn, a.H, dm, attnIn)!.Value.NormThreads,
                w.AttnOut?.Length ?? dm,
                w.MlpIn?.Length ?? dm, mlpIn, _ops.FusedNorm(a.X, w.MlpIn, a.H, dm, mlpIn)!.Value.NormThreads,
                Stored(w.MlpMid, f), w.MlpOut?.Length ?? dm,
            ];
            fields.CopyTo(table, l * DecodeLayerFields);
        }
        var layers = _device.Upload(System.Runtime.InteropServices.MemoryMarshal.Cast<long, int>(table));
        DeviceTensor? barrier = null;
        try { barrier = _device.Allocate(DType.F32, 1); return new PersistentDecodeState(layers, barrier); }
        catch { layers.Dispose(); barrier?.Dispose(); throw; }
    }

    /// <summary>Whether a decode norm may go into the GEMV that reads it (<see cref="CudaOps.NormGemvQkv"/>): no
    /// write-back to apply first, and the norms not left out for timing.</summary>
    private bool NormFusable(WriteBack? pending) => pending == null && !SkipForTiming.HasFlag(Skipped.DecodeNorms);

    /// <summary>The q, k and v projections (and biases) of <paramref name="rows"/> rows of h: q into
    /// <paramref name="q"/>, k and v into <paramref name="k"/> and <paramref name="v"/> from element <paramref name="kvOffset"/>.</summary>
    private void Project(DeviceTensor h, Layer w, DeviceTensor q, DeviceTensor k, DeviceTensor v, long kvOffset, int rows, int attnIn)
    {
        int qd = Config.QDim, kvd = Config.KvDim;
        _device.Gemm(h, w.Wq, q, rows, qd, attnIn);
        _device.Gemm(h, w.Wk, k, rows, kvd, attnIn, offsetD: kvOffset);
        _device.Gemm(h, w.Wv, v, rows, kvd, attnIn, offsetD: kvOffset);
        if (w.Bq == null) return;
        _ops.AddBias(q, w.Bq, rows);
        _ops.AddBias(k, w.Bk!, rows, kvOffset);
        _ops.AddBias(v, w.Bv!, rows, kvOffset);
    }

    /// <summary>An index-add into the residual that the next norm applies (<see cref="CudaOps.IndexAddRmsNorm"/>):
    /// x[:, Idx] += Delta (+ Bias), Delta's rows Stride apart.</summary>
    private sealed record WriteBack(DeviceTensor Delta, DeviceTensor? Idx, DeviceTensor? Bias, int Stride);

    /// <summary>x += input·Wᵀ (+ b): one GEMM accumulating into the f32 residual when dense, or for a single row
    /// without bias (decode: a GEMV writing the selected channels); otherwise a GEMM into the f32
    /// <paramref name="delta"/>, and the index-add into the selected channels is returned for the next norm.</summary>
    private WriteBack? Residual(DeviceTensor x, DeviceTensor input, DeviceTensor w, DeviceTensor? bias, DeviceTensor? idx, DeviceTensor delta, int rows, int k)
    {
        int dm = Config.HiddenSize;
        if (idx == null && bias == null) { _device.Gemm(input, w, x, rows, dm, k, beta: 1); return null; }
        if (rows == 1 && bias == null && _device.GemvApplies(input, w, k)) { _ops.GemvIndexAdd(input, w, x, idx, dm, k); return null; }
        int stored = Stored(idx, dm);
        _device.Gemm(input, w, delta, rows, stored, k);
        return new WriteBack(delta, idx, bias, stored);
    }

    /// <summary>The gather-RMSNorm of x into <paramref name="output"/> (rows <paramref name="outputStride"/> apart),
    /// applying the <paramref name="pending"/> write-back first, in the same launch.</summary>
    private void Norm(DeviceTensor x, DeviceTensor gamma, DeviceTensor? idx, DeviceTensor output, int rows, int outputStride, ref WriteBack? pending)
    {
        if (rows == 1 && pending == null && SkipForTiming.HasFlag(Skipped.DecodeNorms)) return;
        int dm = Config.HiddenSize;
        float eps = Config.RmsNormEps;
        if (pending is { } p) _ops.IndexAddRmsNorm(x, p.Delta, p.Idx, p.Bias, p.Stride, gamma, idx, output, rows, dm, eps, outputStride: outputStride);
        else _ops.GatherRmsNorm(x, gamma, idx, output, rows, dm, eps, outputStride);
        pending = null;
    }

    public void Dispose()
    {
        lock (_lock) Release();
    }

    private void Release()
    {
        if (_released) return;
        _released = true;
        // A greedy decoder's steps queued ahead read the weights.
        try { _device.Synchronize(); } catch (Exception e) when (e is CudaException or ObjectDisposedException) { /* failed or gone: release what we can */ }
        foreach (var layer in _layers) if (layer != null) foreach (var t in layer.All) t?.Dispose();
        _embedding?.Dispose(); _finalNorm?.Dispose(); _invFreq?.Dispose();
        if (!ReferenceEquals(_lmHead, _embedding)) _lmHead?.Dispose();
        if (_ownsDevice) _device.Dispose();
    }
}
