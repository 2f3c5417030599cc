using System.Text.Json;
using DispNative.Engine.Autograd;
using DispNative.Engine.IO;
using DispNative.Engine.Models;

namespace DispNative.Engine.Disp;

/// <summary>Kept channels per layer and site: <c>Indices[layer][site]</c>, sorted, in <see cref="SiteKind"/> order.</summary>
public sealed record PruningPlan(int[][][] Indices)
{
    public int[][] Widths => Indices.Select(l => l.Select(i => i.Length).ToArray()).ToArray();

    /// <summary>From one 0/1 mask per hypernetwork output.</summary>
    public static PruningPlan FromMasks(SiteLayout layout, IReadOnlyList<bool[]> masks)
    {
        if (masks.Count != layout.OutputWidths.Count) throw new ArgumentException($"{masks.Count} masks for {layout.OutputWidths.Count} outputs");
        var idx = new int[layout.Config.NumLayers][][];
        for (int l = 0; l < idx.Length; l++)
            idx[l] = SiteLayout.Kinds.Select(kind =>
            {
                var m = masks[layout.OutputOf(l, kind)];
                return Enumerable.Range(0, m.Length).Where(i => m[i]).ToArray();
            }).ToArray();
        return new PruningPlan(idx);
    }

    /// <summary>Hard masks of a trained hypernetwork: with Gumbel noise drawn from <paramref name="seed"/> (as the
    /// reference code does), or with g = 0 when <paramref name="deterministic"/>.</summary>
    public static PruningPlan FromHypernetwork(Hypernetwork<float> net, SiteLayout layout, bool deterministic, ulong seed)
    {
        var logits = net.Forward(new Tape<float>());
        var rng = new Rng(seed);
        var masks = logits.Select(l => GumbelSigmoid.Hard<float>(l.Data, deterministic ? default : GumbelSigmoid.Noise<float>(rng, l.Cols))).ToList();
        return FromMasks(layout, masks);
    }

    /// <summary>The 0/1 mask of (layer, site) over the full width, for the masked model.</summary>
    public float[] Mask(int layer, SiteKind kind, int fullWidth)
    {
        var m = new float[fullWidth];
        foreach (var i in Indices[layer][(int)kind]) m[i] = 1;
        return m;
    }
}

/// <summary>A hypernetwork saved by training (<c>train</c>, <c>run</c>), with what pruning takes from its metadata:
/// the mode and target it was trained for and the seed of its Gumbel noise.</summary>
public sealed record SavedHypernetwork(Hypernetwork<float> Network, SiteLayout Layout, PruningMode Mode, double PruneRatio, ulong Seed)
{
    /// <summary>Loads <paramref name="path"/> for a model of <paramref name="config"/>; its outputs must fit that model
    /// in the mode it was trained in.</summary>
    public static SavedHypernetwork Load(string path, ModelConfig config)
    {
        FilePaths.RequireInput(path, "hypernetwork file");
        var meta = Hypernetwork<float>.ReadMetadata(path);
        var mode = JsonFields.OptionalString(meta, "mode", path) switch
        {
            "disp" => PruningMode.Disp,
            "same" => PruningMode.Same,
            var other => throw new ModelFormatException($"{path}: metadata field 'mode' is {(other == null ? "missing" : $"'{other}'")} (expected disp or same)"),
        };
        double ratio = JsonFields.Required<double>(meta, "prune_ratio", path);
        if (!(ratio > 0 && ratio < 1)) throw new ModelFormatException($"{path}: metadata field 'prune_ratio' is {ratio}, outside (0, 1)");
        var layout = new SiteLayout(config, mode);
        return new SavedHypernetwork(Hypernetwork<float>.Load(path, layout.OutputWidths), layout, mode, ratio,
            JsonFields.Optional<ulong>(meta, "seed", path) ?? 0);
    }

    /// <summary>The hard masks as <see cref="PruningPlan.FromHypernetwork"/> draws them in the <c>run</c> job.</summary>
    public PruningPlan Plan(bool deterministic) => PruningPlan.FromHypernetwork(Network, Layout, deterministic, Seed);
}

/// <summary>Slices a dense model by a <see cref="PruningPlan"/>: q/k/v keep the columns attn_in; o_proj the rows
/// attn_out; gate/up the rows mlp_mid and columns mlp_in; down the rows mlp_out and columns mlp_mid. Norm weights
/// stay full length (statistics come from the full row); biases follow their rows.</summary>
public static class Pruner
{
    /// <summary>The pruned model in memory: its config and sliced weights.</summary>
    public static (ModelConfig Config, ModelWeights Weights) Apply(ModelConfig config, ModelWeights dense, PruningPlan plan,
        string mode, double pruneRatioTarget, string? sourceModel)
    {
        var pruned = PrunedConfig(config, plan, mode, pruneRatioTarget, sourceModel);
        var layers = new LayerWeights[config.NumLayers];
        for (int l = 0; l < layers.Length; l++) layers[l] = SliceLayer(config, dense.Layers[l], plan.Indices[l]);
        return (pruned, new ModelWeights { Embedding = dense.Embedding, Layers = layers, FinalNorm = dense.FinalNorm, LmHead = dense.LmHead });
    }

    /// <summary>The pruned model's weights, each layer sliced when it is asked for: saved from these, the host holds one
    /// dense and one pruned layer at a time.</summary>
    public static LayerwiseWeights Slicing(ModelConfig config, LayerwiseWeights dense, PruningPlan plan)
        => dense with { Layer = l => SliceLayer(config, dense.Layer(l), plan.Indices[l]) };

    /// <summary>The config of the dense <paramref name="config"/> pruned by <paramref name="plan"/>, whose indices are
    /// checked here (sorted, unique, in range), before anything is sliced or written.</summary>
    public static ModelConfig PrunedConfig(ModelConfig config, PruningPlan plan, string mode, double pruneRatioTarget, string? sourceModel)
    {
        if (config.Disp != null) throw new InvalidSettingException("the model is already pruned; prune its dense source instead");
        if (plan.Indices.Length != config.NumLayers) throw new ArgumentException($"plan has {plan.Indices.Length} layers, the model {config.NumLayers}");
        for (int l = 0; l < plan.Indices.Length; l++)
        {
            var idx = plan.Indices[l];
            for (int s = 0; s < idx.Length; s++)
                ModelWeights.ValidateIndices(idx[s], idx[s].Length, s == (int)SiteKind.MlpMid ? config.IntermediateSize : config.HiddenSize,
                    $"layer {l} {SiteLayout.SiteName((SiteKind)s)}");
        }
        return config with { Disp = new DispInfo(DispInfo.CurrentFormatVersion, plan.Widths, mode, pruneRatioTarget, sourceModel) };
    }

    /// <summary>One dense layer sliced by its indices <paramref name="idx"/> (site order).</summary>
    public static LayerWeights SliceLayer(ModelConfig config, LayerWeights w, int[][] idx)
    {
        int d = config.HiddenSize, f = config.IntermediateSize, qd = config.QDim, kvd = config.KvDim;
        int[] ai = idx[0], ao = idx[1], mi = idx[2], mm = idx[3], mo = idx[4];
        return new LayerWeights
        {
            AttnNorm = w.AttnNorm,
            Wq = Slice(w.Wq, d, null, ai, qd), Wk = Slice(w.Wk, d, null, ai, kvd), Wv = Slice(w.Wv, d, null, ai, kvd),
            Wo = Slice(w.Wo, qd, ao, null, d),
            Bq = w.Bq, Bk = w.Bk, Bv = w.Bv,
            Bo = w.Bo == null ? null : ao.Select(i => w.Bo[i]).ToArray(),
            MlpNorm = w.MlpNorm,
            WGate = Slice(w.WGate, d, mm, mi, f), WUp = Slice(w.WUp, d, mm, mi, f),
            WDown = Slice(w.WDown, f, mo, mm, d),
            AttnInIdx = ai, AttnOutIdx = ao, MlpInIdx = mi, MlpMidIdx = mm, MlpOutIdx = mo,
        };
    }

    /// <summary>The storage type of a pruned model: <paramref name="requested"/>, else the dense model's own.</summary>
    public static DType SavedDType(ModelConfig dense, DType? requested)
        => requested ?? (dense.WeightDType switch { "bfloat16" => DType.BF16, "float16" => DType.F16, _ => DType.F32 });

    /// <summary>Rows <paramref name="rows"/> (all when null) and columns <paramref name="cols"/> (all when null) of a
    /// row-major matrix with <paramref name="rowCount"/> rows of <paramref name="width"/>.</summary>
    private static float[] Slice(float[] w, int width, int[]? rows, int[]? cols, int rowCount)
    {
        int nr = rows?.Length ?? rowCount, nc = cols?.Length ?? width;
        var r = new float[(long)nr * nc];
        for (int i = 0; i < nr; i++)
        {
            long src = (long)(rows?[i] ?? i) * width;
            if (cols == null) Array.Copy(w, src, r, (long)i * nc, nc);
            else for (int j = 0; j < nc; j++) r[(long)i * nc + j] = w[src + cols[j]];
        }
        return r;
    }

    /// <summary>The tokenizer (and generation) files of a model to copy next to its pruned version: those of a
    /// Hugging Face directory, or a llama2.c tokenizer saved as <c>tokenizer.bin</c>.</summary>
    public static List<(string Source, string Name)> TokenizerFilesOf(string modelPath, string? tokenizerPath)
    {
        var files = new List<(string, string)>();
        if (tokenizerPath != null)
            files.Add((tokenizerPath, tokenizerPath.EndsWith(".json", StringComparison.OrdinalIgnoreCase) ? "tokenizer.json" : "tokenizer.bin"));
        else if (Directory.Exists(modelPath))
            foreach (var name in new[] { "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json", "tokenizer.bin" })
                if (File.Exists(Path.Combine(modelPath, name))) files.Add((Path.Combine(modelPath, name), name));
        return files;
    }

    public static void Save(string directory, ModelConfig config, ModelWeights weights, DType dtype, IEnumerable<(string Source, string Name)> tokenizerFiles,
        long maxShardBytes = 2L << 30)
        => Save(directory, config, LayerwiseWeights.Of(weights), dtype, tokenizerFiles, maxShardBytes);

    /// <summary>Saves a model directory (config.json, sharded safetensors, tokenizer files) atomically: it is
    /// written beside <paramref name="directory"/> and moved into place, which must not exist yet. The weights are
    /// asked for layer by layer as the shards are written.</summary>
    public static void Save(string directory, ModelConfig config, LayerwiseWeights weights, DType dtype, IEnumerable<(string Source, string Name)> tokenizerFiles,
        long maxShardBytes = 2L << 30)
    {
        FilePaths.RequireOutputDirectory(directory, "pruned model directory");
        if (Directory.Exists(directory) || File.Exists(directory)) throw new InvalidSettingException($"{directory} already exists; not overwriting it");
        string full = Path.GetFullPath(directory);
        string tmp = full.TrimEnd(Path.DirectorySeparatorChar) + ".tmp-" + Environment.ProcessId;
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        try
        {
            SafeTensorsWriter.WriteSharded(tmp, weights.Tensors(config, dtype).ToList(), maxShardBytes);
            var json = config with { WeightDType = dtype switch { DType.BF16 => "bfloat16", DType.F16 => "float16", _ => "float32" } };
            File.WriteAllText(Path.Combine(tmp, "config.json"), json.ToJson().ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            foreach (var (source, name) in tokenizerFiles) File.Copy(source, Path.Combine(tmp, name));
            Directory.Move(tmp, full);
        }
        catch
        {
            try { Directory.Delete(tmp, true); } catch (IOException) { }
            throw;
        }
    }
}
