using DispNative.Engine.Inference;
using DispNative.Engine.IO;
using DispNative.Engine.Tokenization;

namespace DispNative.Engine.Models;

/// <summary>A model ready to run: config, tokenizer, the fp32 weights in a <see cref="LlamaModel"/> (the CPU reference),
/// and the <see cref="Runner"/> that scores and generates (the CPU model, or a GPU copy from <see cref="Devices.Place"/>).
/// A model placed on the GPU has no host weights: they went there as they were read.</summary>
public sealed record LoadedModel(string Source, ModelConfig Config, ITokenizer Tokenizer) : IDisposable
{
    private readonly LlamaModel? _host;
    private readonly ICausalLanguageModel? _runner;

    /// <summary>The fp32 CPU model.</summary>
    public LlamaModel Model
    {
        get => _host ?? throw new InvalidOperationException($"{Source} was streamed to the GPU: it has no host weights (load it with ModelLoader.Load)");
        init => _host = value;
    }

    public ICausalLanguageModel Runner { get => _runner ?? Model; init => _runner = value; }

    /// <summary>Releases the GPU copy, if any.</summary>
    public void Dispose() { if (_runner is IDisposable d) d.Dispose(); }

    /// <summary>BOS from the config, else from the tokenizer.</summary>
    public int? BosId => Config.BosTokenId ?? Tokenizer.BosId;

    public IReadOnlyList<int> EosIds => Config.EosTokenIds.Length > 0 ? Config.EosTokenIds : Tokenizer.EosIds;

    /// <summary>Ids of a text to score: BOS at the very start only (the perplexity protocol), no other specials.</summary>
    public int[] EncodeForScoring(string text)
    {
        var ids = Tokenizer.Encode(text, addSpecialTokens: false);
        return BosId is int bos ? [bos, .. ids] : ids;
    }
}

/// <summary>A model opened by <see cref="ModelLoader.Open"/>: its weights are read when asked for, while this is not disposed.</summary>
public sealed record OpenedModel(string Source, ModelConfig Config, ITokenizer Tokenizer, LayerwiseWeights Weights, IDisposable? Checkpoint) : IDisposable
{
    /// <summary>The whole model in host memory as f32, refused up front where it would not fit (on Linux, running out of
    /// memory is the kernel killing the process without a word).</summary>
    public LoadedModel ToHost()
    {
        long parameters = Config.ParameterCounts().Values.Sum();
        HostMemory.Require(4 * parameters, $"{Source}: loading its {parameters / 1e9:0.###} billion parameters as f32");
        return new LoadedModel(Source, Config, Tokenizer) { Model = new LlamaModel(Config, ModelWeights.Load(Weights, Config)) };
    }

    public void Dispose() => Checkpoint?.Dispose();
}

public enum ModelFormat { HuggingFace, Llama2c }

public static class ModelLoader
{
    /// <summary>Loads a Hugging Face directory (config.json + safetensors + tokenizer.json) or a llama2.c
    /// <c>.bin</c> (its tokenizer given by <paramref name="tokenizerPath"/>).</summary>
    public static LoadedModel Load(string path, string? tokenizerPath = null)
    {
        using var opened = Open(path, tokenizerPath);
        return opened.ToHost();
    }

    /// <summary>Opens a model (config, tokenizer, checkpoint headers) to read its weights part by part: a Hugging Face
    /// checkpoint stays open and each tensor is read when it is asked for; a llama2.c <c>.bin</c> (small) loads whole.</summary>
    public static OpenedModel Open(string path, string? tokenizerPath = null)
    {
        if (FormatOf(path) == ModelFormat.Llama2c)
        {
            if (tokenizerPath == null)
                throw new ModelFormatException($"{path}: a llama2.c checkpoint needs its tokenizer (--tokenizer tokenizer.bin)");
            var (c, weights) = Llama2cImport.Load(path);
            return new OpenedModel(path, c, LoadTokenizer(path, tokenizerPath, c), LayerwiseWeights.Of(weights), null);
        }
        var config = LoadConfig(path);
        var tokenizer = LoadTokenizer(path, tokenizerPath, config);
        var checkpoint = SafeTensorsCheckpoint.Open(path);
        try { return new OpenedModel(path, config, tokenizer, LayerwiseWeights.Read(checkpoint, config), checkpoint); }
        catch { checkpoint.Dispose(); throw; }
    }

    /// <summary>What <paramref name="path"/> holds: a Hugging Face directory or a llama2.c <c>.bin</c> file; anything
    /// else (nothing, another kind of file) is an error.</summary>
    public static ModelFormat FormatOf(string path)
    {
        if (Directory.Exists(path)) return ModelFormat.HuggingFace;
        if (!File.Exists(path)) throw new ModelFormatException($"model not found: {path}");
        if (!path.EndsWith(".bin", StringComparison.OrdinalIgnoreCase))
            throw new ModelFormatException($"{path}: expected a Hugging Face model directory or a llama2.c .bin checkpoint");
        return ModelFormat.Llama2c;
    }

    /// <summary>The config.json of a model directory; a directory holding a llama2.c <c>.bin</c> instead says how to load it.</summary>
    public static ModelConfig LoadConfig(string dir)
    {
        string configPath = Path.Combine(dir, "config.json");
        if (!File.Exists(configPath) && Directory.GetFiles(dir, "*.bin") is [var bin, ..])
            throw new ModelFormatException(
                $"{dir}: no config.json; for a llama2.c checkpoint pass the .bin file and its tokenizer (--model {bin} --tokenizer TOKENIZER.bin)");
        return ModelConfig.Load(configPath);
    }

    /// <summary>The model's tokenizer (<paramref name="tokenizerPath"/>, else the one in the model's directory), which must
    /// not name more tokens than the model's vocabulary.</summary>
    private static ITokenizer LoadTokenizer(string path, string? tokenizerPath, ModelConfig config)
    {
        var tokenizer = TokenizerLoader.Load(tokenizerPath ?? path);
        if (tokenizer.VocabSize > config.VocabSize)
            throw new ModelFormatException($"{path}: the tokenizer has {tokenizer.VocabSize} tokens but the model's vocabulary is {config.VocabSize}");
        return tokenizer;
    }
}
