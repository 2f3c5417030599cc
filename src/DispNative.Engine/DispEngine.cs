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
/// runs the whole pruning job. <see cref="Dispose"/> may race with calls: it stops the calls in progress at their next
/// block or token (they throw <see cref="ObjectDisposedException"/>), waits for them to leave the model, then frees
/// it; calls made after it began throw <see cref="ObjectDisposedException"/>.</summary>
public sealed class DispEngine : IDisposable
{
    private readonly ILogger _logger;
    private LoadedModel? _model;
    private readonly object _gate = new();
    private bool _closing;
    private int _calls;
    private readonly ThreadLocal<int> _callsOnThisThread = new();
    private readonly CancellationTokenSource _closed = new();

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
        using var call = Begin(cancellationToken);
        var m = call.Model;
        var ids = m.EncodeForScoring(text);
        if (ids.Length < 2) throw new InvalidSettingException("the text is too short to score (it needs at least one token after BOS)");
        m.Config.RequireContext(ids.Length, $"the text ({ids.Length} tokens with BOS; Perplexity scores longer texts in blocks)");
        call.ThrowIfStopped();
        return (-Evaluation.Perplexity.BlockNll(m.Runner, ids), ids.Length - 1);
    }

    /// <summary>Perplexity with the DISP-LLM/SliceGPT protocol (see <see cref="Evaluation.Perplexity"/>).</summary>
    public PerplexityResult Perplexity(string text, int blockSize, int? maxBlocks = null, IProgress<PerplexityProgress>? progress = null,
        CancellationToken cancellationToken = default)
    {
        using var call = Begin(cancellationToken);
        var ids = call.Model.EncodeForScoring(text);
        return call.Run(token => Evaluation.Perplexity.Evaluate(call.Model.Runner, ids, blockSize, maxBlocks, progress, token));
    }

    /// <summary>Streams the continuation of <paramref name="prompt"/> as text pieces, one per generated token. Each step
    /// is a call of its own: between pieces the stream holds its KV cache but does not keep <see cref="Dispose"/> waiting.</summary>
    public async IAsyncEnumerable<string> GenerateAsync(string prompt, int maxNewTokens, SamplingOptions? sampling = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _closed.Token);
        IEnumerator<int> tokens;
        TextStreamer streamer;
        using (var call = Begin(cancellationToken, onThisThread: false))
        {
            var ids = call.Model.Tokenizer.Encode(prompt);
            streamer = new TextStreamer(call.Model.Tokenizer, ids);
            tokens = Generator.Stream(call.Model, ids, maxNewTokens, sampling ?? new SamplingOptions(), stop.Token).GetEnumerator();
        }
        try
        {
            while (true)
            {
                bool more;
                using (var call = Begin(cancellationToken, onThisThread: false))
                    more = await call.Run(() => Task.Run(tokens.MoveNext, cancellationToken)).ConfigureAwait(false);
                if (!more) break;
                string piece = streamer.Push(tokens.Current);
                if (piece.Length > 0) yield return piece;
            }
        }
        finally
        {
            // The KV cache goes back as a call; once the engine is disposed it went with the model's device memory.
            if (TryBegin(onThisThread: false, default, out var call)) using (call) tokens.Dispose();
        }
    }

    /// <summary>Runs the pruning job (see <see cref="PruneJob"/>).</summary>
    public static PruneJobResult Prune(PruneJobOptions options, IProgress<JobProgress>? progress = null, ILoggerFactory? loggerFactory = null,
        CancellationToken cancellationToken = default)
        => PruneJob.Run(options, progress, loggerFactory?.CreateLogger(typeof(PruneJob)), cancellationToken);

    /// <summary>Stops the calls in progress, waits until they have left the model, and frees it. Calling it from inside
    /// one of this engine's calls (a progress callback) would wait for itself, and throws instead.</summary>
    public void Dispose()
    {
        lock (_gate)
        {
            if (_closing) return;
            if (_callsOnThisThread.Value > 0)
                throw new InvalidOperationException("DispEngine.Dispose was called from inside one of its own calls (a progress callback?); dispose after the call returns");
            _closing = true;
        }
        _closed.Cancel();
        lock (_gate)
            while (_calls > 0) Monitor.Wait(_gate);
        _logger.LogDebug("unloading {Path}", _model!.Source);
        _model.Dispose();
        _model = null;
        _callsOnThisThread.Dispose();
    }

    /// <summary>Enters a call, or throws <see cref="ObjectDisposedException"/> once Dispose has begun.
    /// <paramref name="onThisThread"/>: the call begins and ends on this thread (so Dispose can tell it is inside it).</summary>
    private Call Begin(CancellationToken cancellationToken, bool onThisThread = true) =>
        TryBegin(onThisThread, cancellationToken, out var call) ? call : throw new ObjectDisposedException(nameof(DispEngine));

    private bool TryBegin(bool onThisThread, CancellationToken cancellationToken, out Call call)
    {
        lock (_gate)
        {
            if (_closing) { call = null!; return false; }
            _calls++;
        }
        if (onThisThread) _callsOnThisThread.Value++;
        call = new Call(this, _model!, onThisThread, cancellationToken);
        return true;
    }

    private void End(bool onThisThread)
    {
        if (onThisThread) _callsOnThisThread.Value--;
        lock (_gate)
            if (--_calls == 0) Monitor.PulseAll(_gate);
    }

    /// <summary>One call in progress on the model. <see cref="Dispose"/> cancels it and waits for it to end; a stop by
    /// Dispose surfaces as <see cref="ObjectDisposedException"/>, a stop by the caller's token as cancellation.</summary>
    private sealed class Call(DispEngine engine, LoadedModel model, bool onThisThread, CancellationToken caller) : IDisposable
    {
        private CancellationTokenSource? _stop;   // made when a step asks for the token
        private bool _ended;

        public LoadedModel Model { get; } = model;

        public void ThrowIfStopped()
        {
            caller.ThrowIfCancellationRequested();
            if (engine._closed.IsCancellationRequested) throw Disposed();
        }

        /// <summary>Runs <paramref name="work"/> with a token that the caller or Dispose cancels.</summary>
        public T Run<T>(Func<CancellationToken, T> work)
        {
            _stop ??= CancellationTokenSource.CreateLinkedTokenSource(caller, engine._closed.Token);
            try { return work(_stop.Token); }
            catch (OperationCanceledException) when (StoppedByDispose) { throw Disposed(); }
        }

        /// <summary>Awaits <paramref name="work"/>, which watches its own token (a generation stream's).</summary>
        public async Task<T> Run<T>(Func<Task<T>> work)
        {
            try { return await work().ConfigureAwait(false); }
            catch (OperationCanceledException) when (StoppedByDispose) { throw Disposed(); }
        }

        private bool StoppedByDispose => engine._closed.IsCancellationRequested && !caller.IsCancellationRequested;

        private static ObjectDisposedException Disposed() => new(nameof(DispEngine), "the engine was disposed while this call ran");

        public void Dispose()
        {
            if (_ended) return;
            _ended = true;
            _stop?.Dispose();
            engine.End(onThisThread);
        }
    }
}
