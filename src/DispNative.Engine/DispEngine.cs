using System.Runtime.CompilerServices;
using DispNative.Engine.Builtin;
using DispNative.Engine.Evaluation;
using DispNative.Engine.Inference;
using DispNative.Engine.Jobs;
using DispNative.Engine.Models;
using DispNative.Engine.Tokenization;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DispNative.Engine;

/// <summary>How <see cref="DispEngine.Load"/> opens a model.</summary>
public sealed record DispEngineOptions
{
    /// <summary>cpu | cuda | auto.</summary>
    public string Device { get; init; } = "auto";
    /// <summary>auto | f32 | bf16 | f16: storage type on CUDA (auto: bf16); the CPU computes in f32.</summary>
    public string DType { get; init; } = "auto";
    /// <summary>Tokenizer file, for llama2.c checkpoints.</summary>
    public string? TokenizerPath { get; init; }
    public ILoggerFactory? LoggerFactory { get; init; }
}

/// <summary>The engine as a library: load a dense or DISP-pruned model once, then score, evaluate and generate from
/// any number of threads (the loaded weights are read-only; each call keeps its own KV cache). <see cref="Prune"/>
/// runs the whole pruning job.</summary>
public sealed class DispEngine : IDisposable
{
    private readonly ILogger _logger;
    private LoadedModel? _model;

    private DispEngine(LoadedModel model, string device, ILogger logger)
    {
        _model = model;
        Device = device;
        _logger = logger;
    }

    /// <summary>Loads a Hugging Face directory (dense or pruned), a llama2.c <c>.bin</c>, or <c>builtin:tiny</c>.</summary>
    public static DispEngine Load(string path, DispEngineOptions? options = null)
    {
        options ??= new DispEngineOptions();
        var logger = options.LoggerFactory?.CreateLogger<DispEngine>() ?? (ILogger)NullLogger.Instance;
        string device = Devices.Resolve(options.Device);
        var dtype = Devices.ParseDType(options.DType);
        var model = Devices.Load(TinyModel.Resolve(path), options.TokenizerPath, device, dtype);
        logger.LogInformation("loaded {Path} ({Layers} layers, {Kind}) on {Device}", path, model.Config.NumLayers,
            model.Config.Disp != null ? "DISP-pruned" : "dense", model.Runner.DeviceName);
        return new DispEngine(model, device, logger);
    }

    private LoadedModel Model => _model ?? throw new ObjectDisposedException(nameof(DispEngine));

    public string Device { get; }
    public ModelConfig Config => Model.Config;
    public ITokenizer Tokenizer => Model.Tokenizer;
    public bool IsPruned => Model.Config.Disp != null;

    /// <summary>Total log-probability of <paramref name="text"/> (after BOS) under the model, and its token count.</summary>
    public (double LogProb, int Tokens) Score(string text, CancellationToken cancellationToken = default)
    {
        var m = Model;
        var ids = m.EncodeForScoring(text);
        if (ids.Length < 2) throw new InvalidSettingException("the text is too short to score (it needs at least one token after BOS)");
        m.Config.RequireContext(ids.Length, $"the text ({ids.Length} tokens with BOS; Perplexity scores longer texts in blocks)");
        cancellationToken.ThrowIfCancellationRequested();
        return (-Evaluation.Perplexity.BlockNll(m.Runner.Logits(ids), ids, m.Config.VocabSize), ids.Length - 1);
    }

    /// <summary>Perplexity with the DISP-LLM/SliceGPT protocol (see <see cref="Evaluation.Perplexity"/>).</summary>
    public PerplexityResult Perplexity(string text, int blockSize, int? maxBlocks = null, IProgress<PerplexityProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        var m = Model;
        var ids = m.EncodeForScoring(text);
        return Evaluation.Perplexity.Evaluate(m.Runner, ids, blockSize, maxBlocks, progress, cancellationToken);
    }

    /// <summary>Streams the continuation of <paramref name="prompt"/> as text pieces, one per generated token.</summary>
    public async IAsyncEnumerable<string> GenerateAsync(string prompt, int maxNewTokens, SamplingOptions? sampling = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var m = Model;
        var ids = m.Tokenizer.Encode(prompt);
        var streamer = new TextStreamer(m.Tokenizer, ids);
        using var tokens = Generator.Stream(m, ids, maxNewTokens, sampling ?? new SamplingOptions(), cancellationToken).GetEnumerator();
        while (await Task.Run(tokens.MoveNext, cancellationToken).ConfigureAwait(false))
        {
            string piece = streamer.Push(tokens.Current);
            if (piece.Length > 0) yield return piece;
        }
    }

    /// <summary>Runs the pruning job (see <see cref="PruneJob"/>).</summary>
    public static PruneJobResult Prune(PruneJobOptions options, IProgress<JobProgress>? progress = null, ILoggerFactory? loggerFactory = null,
        CancellationToken cancellationToken = default)
        => PruneJob.Run(options, progress, loggerFactory?.CreateLogger(typeof(PruneJob)), cancellationToken);

    public void Dispose()
    {
        if (_model == null) return;
        _logger.LogDebug("unloading {Path}", _model.Source);
        _model.Dispose();
        _model = null;
    }
}
