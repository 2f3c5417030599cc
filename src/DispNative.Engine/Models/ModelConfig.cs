using System.Text.Json;
using System.Text.Json.Nodes;
using DispNative.Engine.IO;

namespace DispNative.Engine.Models;

/// <summary>RoPE frequency scaling (Hugging Face <c>rope_scaling</c>/<c>rope_parameters</c>).</summary>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositions);

/// <summary>The <c>disp</c> section of a pruned model's config: kept width of each site of each layer
/// ([layer][attn_in, attn_out, mlp_in, mlp_mid, mlp_out]) and where the model came from.</summary>
public sealed record DispInfo(int FormatVersion, int[][] Widths, string Mode, double PruneRatioTarget, string? SourceModel)
{
    public const int CurrentFormatVersion = 1;
    public static readonly string[] SiteKeys = ["attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out"];

    public JsonObject ToJson() => new()
    {
        ["format_version"] = FormatVersion,
        ["mode"] = Mode,
        ["prune_ratio_target"] = PruneRatioTarget,
        ["source_model"] = SourceModel,
        ["widths"] = new JsonArray(Widths.Select(w =>
        {
            var o = new JsonObject();
            for (int i = 0; i < SiteKeys.Length; i++) o[SiteKeys[i]] = w[i];
            return (JsonNode)o;
        }).ToArray()),
    };

    public static DispInfo Parse(JsonObject o, ModelConfig c, string source)
    {
        ModelFormatException Error(string what) => new($"{source}: disp section: {what}");
        int version = o["format_version"] is JsonValue v && v.TryGetValue(out int fv) ? fv : throw Error("missing format_version");
        if (version != CurrentFormatVersion) throw Error($"format_version {version} is not supported (this build reads {CurrentFormatVersion})");
        if (o["widths"] is not JsonArray arr || arr.Count != c.NumLayers) throw Error($"widths must list all {c.NumLayers} layers");
        var widths = new int[c.NumLayers][];
        for (int l = 0; l < c.NumLayers; l++)
        {
            widths[l] = new int[SiteKeys.Length];
            for (int i = 0; i < SiteKeys.Length; i++)
            {
                int full = SiteKeys[i] == "mlp_mid" ? c.IntermediateSize : c.HiddenSize;
                int w = arr[l] is JsonObject lo && lo[SiteKeys[i]] is JsonValue wv && wv.TryGetValue(out int x) ? x : throw Error($"layer {l} lacks an integer {SiteKeys[i]}");
                if (w < 1 || w > full) throw Error($"layer {l} {SiteKeys[i]} width {w} is outside 1..{full}");
                widths[l][i] = w;
            }
        }
        string where = $"{source}: disp section";
        return new DispInfo(version, widths, JsonFields.OptionalString(o, "mode", where) ?? "disp",
            JsonFields.Optional<double>(o, "prune_ratio_target", where) ?? double.NaN, JsonFields.OptionalString(o, "source_model", where));
    }
}

/// <summary>Architecture of a LLaMA-family decoder (LLaMA, Mistral, Qwen2 share this layout).</summary>
public sealed record ModelConfig
{
    public static readonly string[] SupportedArchitectures = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

    public required string Architecture { get; init; }
    public required int HiddenSize { get; init; }
    public required int IntermediateSize { get; init; }
    public required int NumLayers { get; init; }
    public required int NumHeads { get; init; }
    public required int NumKvHeads { get; init; }
    public required int HeadDim { get; init; }
    public required int VocabSize { get; init; }
    public float RmsNormEps { get; init; } = 1e-5f;
    public double RopeTheta { get; init; } = 10000.0;
    public RopeScaling? RopeScaling { get; init; }
    public bool TieWordEmbeddings { get; init; }
    /// <summary>q/k/v projections carry biases (Qwen2; LLaMA with attention_bias).</summary>
    public bool QkvBias { get; init; }
    /// <summary>o_proj carries a bias (LLaMA with attention_bias).</summary>
    public bool OutputBias { get; init; }
    public int MaxPositionEmbeddings { get; init; } = 2048;
    /// <summary>Sliding attention window (Mistral); null means full causal attention.</summary>
    public int? SlidingWindow { get; init; }
    public int? BosTokenId { get; init; }
    public int[] EosTokenIds { get; init; } = [];
    public string WeightDType { get; init; } = "float32";
    /// <summary>Set for DISP-pruned models.</summary>
    public DispInfo? Disp { get; init; }

    public int QDim => NumHeads * HeadDim;
    public int KvDim => NumKvHeads * HeadDim;

    public void Validate(string source)
    {
        void Require(bool ok, string what) { if (!ok) throw new ModelFormatException($"{source}: {what}"); }
        Require(HiddenSize > 0, $"hidden_size must be positive (got {HiddenSize})");
        Require(IntermediateSize > 0, $"intermediate_size must be positive (got {IntermediateSize})");
        Require(NumLayers > 0, $"num_hidden_layers must be positive (got {NumLayers})");
        Require(NumHeads > 0, $"num_attention_heads must be positive (got {NumHeads})");
        Require(NumKvHeads > 0 && NumHeads % NumKvHeads == 0, $"num_key_value_heads ({NumKvHeads}) must divide num_attention_heads ({NumHeads})");
        Require(HeadDim > 0 && HeadDim % 2 == 0, $"head_dim must be a positive even number (got {HeadDim})");
        Require(VocabSize > 0, $"vocab_size must be positive (got {VocabSize})");
        Require(RmsNormEps > 0, $"rms_norm_eps must be positive (got {RmsNormEps})");
        Require(RopeTheta > 0, $"rope_theta must be positive (got {RopeTheta})");
        Require(MaxPositionEmbeddings > 0, $"max_position_embeddings must be positive (got {MaxPositionEmbeddings})");
        Require(SlidingWindow is null or > 0, $"sliding_window must be positive (got {SlidingWindow})");
        if (RopeScaling is { } s)
        {
            Require(s.Factor > 0 && double.IsFinite(s.Factor), $"rope_scaling factor must be a positive number (got {s.Factor})");
            if (s.Type == "llama3")
            {
                Require(s.LowFreqFactor > 0 && s.HighFreqFactor > s.LowFreqFactor,
                    $"rope_scaling needs 0 < low_freq_factor < high_freq_factor (got {s.LowFreqFactor} and {s.HighFreqFactor})");
                Require(s.OriginalMaxPositions > 0, $"rope_scaling original_max_position_embeddings must be positive (got {s.OriginalMaxPositions})");
            }
        }
    }

    /// <summary>Rejects a sequence longer than the positions the model was trained for (max_position_embeddings):
    /// what a model scores or generates past its context is not meaningful.</summary>
    /// <param name="positions">the sequence length asked for</param>
    /// <param name="what">the setting that asked for <paramref name="positions"/>, e.g. "Calibration:BlockSize 2048"</param>
    public void RequireContext(int positions, string what)
    {
        if (positions > MaxPositionEmbeddings)
            throw new InvalidSettingException($"{what} exceeds the model's context of {MaxPositionEmbeddings} positions (max_position_embeddings)");
    }

    /// <summary>Kept widths of layer l: [attn_in, attn_out, mlp_in, mlp_mid, mlp_out] (full widths when dense).</summary>
    public int[] LayerWidths(int layer) => Disp?.Widths[layer] ?? [HiddenSize, HiddenSize, HiddenSize, IntermediateSize, HiddenSize];

    /// <summary>The widest MLP middle of any layer: what activation buffers need (a pruned model's is below
    /// <see cref="IntermediateSize"/>, which then only bounds its indices).</summary>
    public int WidestMlpMiddle => Disp?.Widths.Max(w => w[3]) ?? IntermediateSize;

    /// <summary>Parameter counts by kind (embedding, attention, MLP, norms, LM head if untied).</summary>
    public IReadOnlyDictionary<string, long> ParameterCounts()
    {
        long d = HiddenSize, L = NumLayers, attn = 0, mlp = 0;
        for (int l = 0; l < NumLayers; l++)
        {
            var w = LayerWidths(l);
            attn += (long)w[0] * (QDim + 2 * KvDim) + (QkvBias ? QDim + 2 * KvDim : 0) + (long)w[1] * QDim + (OutputBias ? w[1] : 0);
            mlp += (long)w[2] * w[3] * 2 + (long)w[3] * w[4];
        }
        return new Dictionary<string, long>
        {
            ["embedding"] = (long)VocabSize * d,
            ["attention"] = attn,
            ["mlp"] = mlp,
            ["norms"] = (2 * L + 1) * d,
            ["lm_head"] = TieWordEmbeddings ? 0 : (long)VocabSize * d,
        };
    }

    /// <summary>Multiply-add FLOPs (2 per weight per row) that a prefill of <paramref name="tokens"/> tokens from position 0
    /// needs for the last row's logits: every layer's key and value projections for every row; the queries, causal
    /// attention (no window), output projection and MLP for every row except in the last layer, which needs them for the
    /// last row only; the LM head for the last row. Biases and norms aside. The CPU forward does exactly this work; the
    /// CUDA one also projects the last layer's queries for every row. The layers' widths
    /// are <paramref name="widths"/>' where given (as <see cref="LayerWidths"/>), else this config's.</summary>
    public double LastRowPrefillFlops(int tokens, Func<int, int[]>? widths = null)
    {
        double t = tokens, flops = 0;
        for (int l = 0; l < NumLayers; l++)
        {
            var w = (widths ?? LayerWidths)(l);
            double queryRows = l == NumLayers - 1 ? 1 : t;
            double keysSeen = l == NumLayers - 1 ? t : t * (t + 1) / 2;   // summed over the query rows
            flops += 2.0 * w[0] * 2 * KvDim * t
                     + 2.0 * queryRows * ((double)w[0] * QDim + (double)QDim * w[1] + 2.0 * w[2] * w[3] + (double)w[3] * w[4])
                     + 4.0 * NumHeads * HeadDim * keysSeen;
        }
        return flops + 2.0 * VocabSize * HiddenSize;
    }

    /// <summary>The parameters DISP-LLM prunes: attention and MLP projections (with their biases).</summary>
    public long PrunableParameters()
    {
        var counts = ParameterCounts();
        return counts["attention"] + counts["mlp"];
    }

    public static ModelConfig Load(string configPath)
    {
        if (!File.Exists(configPath)) throw new ModelFormatException($"config not found: {configPath}");
        JsonNode? root;
        try { root = JsonNode.Parse(File.ReadAllText(configPath), null, JsonFields.Strict); }
        catch (JsonException e) { throw new ModelFormatException($"{configPath}: not valid JSON ({e.Message})"); }
        if (root is not JsonObject obj) throw new ModelFormatException($"{configPath}: not a JSON object");
        return Parse(obj, configPath);
    }

    public static ModelConfig Parse(JsonObject c, string source)
    {
        string arch = c["architectures"] is JsonArray a && a.Count > 0 && a[0] is JsonValue av && av.TryGetValue(out string? name) ? name : "";
        if (arch == "")
            throw new ModelFormatException($"{source}: missing 'architectures'; supported: {string.Join(", ", SupportedArchitectures)}");
        if (!SupportedArchitectures.Contains(arch))
            throw new ModelFormatException($"{source}: unsupported architecture '{arch}'; supported: {string.Join(", ", SupportedArchitectures)}");

        int RequiredInt(string key) => JsonFields.Required<int>(c, key, source);
        int? OptInt(string key) => JsonFields.Optional<int>(c, key, source);
        double? OptDouble(string key, JsonObject? o = null) => JsonFields.Optional<double>(o ?? c, key, source);
        bool OptBool(string key, bool dflt) => JsonFields.Optional<bool>(c, key, source) ?? dflt;
        string? OptString(string key, JsonObject? o = null) => JsonFields.OptionalString(o ?? c, key, source);

        int hidden = RequiredInt("hidden_size");
        int heads = RequiredInt("num_attention_heads");
        string act = OptString("hidden_act") ?? "silu";
        if (act != "silu") throw new ModelFormatException($"{source}: unsupported hidden_act '{act}' (only silu/SwiGLU)");
        if (OptBool("mlp_bias", false)) throw new ModelFormatException($"{source}: mlp_bias=true is not supported");

        // rope theta: top-level rope_theta (transformers 4) or rope_parameters.rope_theta (transformers 5).
        var ropeParams = JsonFields.OptionalObject(c, "rope_parameters", source);
        double theta = OptDouble("rope_theta") ?? (ropeParams != null ? OptDouble("rope_theta", ropeParams) : null) ?? 10000.0;
        var scalingObj = JsonFields.OptionalObject(c, "rope_scaling", source) ?? ropeParams;
        RopeScaling? scaling = null;
        if (scalingObj != null)
        {
            string type = OptString("rope_type", scalingObj) ?? OptString("type", scalingObj) ?? "default";
            if (type is "linear" or "llama3")
                scaling = new RopeScaling(type, OptDouble("factor", scalingObj) ?? 1.0, OptDouble("low_freq_factor", scalingObj) ?? 1.0,
                    OptDouble("high_freq_factor", scalingObj) ?? 4.0, JsonFields.Optional<int>(scalingObj, "original_max_position_embeddings", source) ?? 8192);
            else if (type != "default")
                throw new ModelFormatException($"{source}: unsupported RoPE scaling type '{type}' (supported: default, linear, llama3)");
        }

        int[] eos = c["eos_token_id"] switch
        {
            null => [],
            JsonArray list => list.Select(x => JsonFields.Element<int>(x, "eos_token_id", source)).ToArray(),
            var single => [JsonFields.Element<int>(single, "eos_token_id", source)],
        };
        bool isQwen = arch == "Qwen2ForCausalLM";
        bool attnBias = OptBool("attention_bias", false);
        int layers = RequiredInt("num_hidden_layers");
        // transformers' defaults: Mistral's window is 4096 unless given (null: none); Qwen2's applies only with
        // use_sliding_window, and then only to the layers from max_window_layers (default 28) on.
        int? window = arch switch
        {
            "MistralForCausalLM" => c.ContainsKey("sliding_window") ? OptInt("sliding_window") : 4096,
            "Qwen2ForCausalLM" when OptBool("use_sliding_window", false) => (OptInt("max_window_layers") ?? 28) switch
            {
                0 => OptInt("sliding_window") ?? 4096,
                var from when from >= layers => null,
                var from => throw new ModelFormatException($"{source}: a sliding window on layers {from} to {layers - 1} only " +
                    "(max_window_layers) is not supported; the engine applies one window to every layer"),
            },
            _ => null,
        };
        var cfg = new ModelConfig
        {
            Architecture = arch,
            HiddenSize = hidden,
            IntermediateSize = RequiredInt("intermediate_size"),
            NumLayers = layers,
            NumHeads = heads,
            NumKvHeads = OptInt("num_key_value_heads") ?? heads,
            HeadDim = OptInt("head_dim") ?? (heads > 0 ? hidden / heads : 0),
            VocabSize = RequiredInt("vocab_size"),
            RmsNormEps = (float)(OptDouble("rms_norm_eps") ?? 1e-6),
            RopeTheta = theta,
            RopeScaling = scaling,
            TieWordEmbeddings = OptBool("tie_word_embeddings", false),
            QkvBias = isQwen || attnBias,
            OutputBias = !isQwen && attnBias,
            MaxPositionEmbeddings = OptInt("max_position_embeddings") ?? arch switch { "MistralForCausalLM" => 131072, "Qwen2ForCausalLM" => 32768, _ => 2048 },
            SlidingWindow = window,
            BosTokenId = OptInt("bos_token_id"),
            EosTokenIds = eos,
            WeightDType = OptString("torch_dtype") ?? OptString("dtype") ?? "float32",
        };
        cfg.Validate(source);
        if (JsonFields.OptionalObject(c, "disp", source) is { } disp) cfg = cfg with { Disp = DispInfo.Parse(disp, cfg, source) };
        return cfg;
    }

    /// <summary>The config as Hugging Face <c>config.json</c> (for saving models).</summary>
    public JsonObject ToJson()
    {
        var o = new JsonObject
        {
            ["architectures"] = new JsonArray(Architecture),
            ["model_type"] = Architecture switch { "MistralForCausalLM" => "mistral", "Qwen2ForCausalLM" => "qwen2", _ => "llama" },
            ["hidden_size"] = HiddenSize,
            ["intermediate_size"] = IntermediateSize,
            ["num_hidden_layers"] = NumLayers,
            ["num_attention_heads"] = NumHeads,
            ["num_key_value_heads"] = NumKvHeads,
            ["head_dim"] = HeadDim,
            ["vocab_size"] = VocabSize,
            ["rms_norm_eps"] = RmsNormEps,
            ["rope_theta"] = RopeTheta,
            ["hidden_act"] = "silu",
            ["tie_word_embeddings"] = TieWordEmbeddings,
            ["max_position_embeddings"] = MaxPositionEmbeddings,
            ["torch_dtype"] = WeightDType,
        };
        if (Architecture == "LlamaForCausalLM") o["attention_bias"] = QkvBias;
        if (RopeScaling is { } s)
            o["rope_scaling"] = new JsonObject
            {
                ["rope_type"] = s.Type, ["factor"] = s.Factor, ["low_freq_factor"] = s.LowFreqFactor,
                ["high_freq_factor"] = s.HighFreqFactor, ["original_max_position_embeddings"] = s.OriginalMaxPositions,
            };
        if (SlidingWindow is { } w)
        {
            o["sliding_window"] = w;
            if (Architecture == "Qwen2ForCausalLM") { o["use_sliding_window"] = true; o["max_window_layers"] = 0; }
        }
        else if (Architecture == "MistralForCausalLM") o["sliding_window"] = null;
        if (Disp != null) o["disp"] = Disp.ToJson();
        if (BosTokenId is { } b) o["bos_token_id"] = b;
        if (EosTokenIds.Length == 1) o["eos_token_id"] = EosTokenIds[0];
        else if (EosTokenIds.Length > 1) o["eos_token_id"] = new JsonArray(EosTokenIds.Select(e => (JsonNode)e).ToArray());
        return o;
    }
}
