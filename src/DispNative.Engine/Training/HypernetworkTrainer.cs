using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using DispNative.Engine.Autograd;
using DispNative.Engine.Disp;
using DispNative.Engine.IO;
using DispNative.Engine.Models;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DispNative.Engine.Training;

/// <summary>Hypernetwork training settings; defaults follow DISP-LLM.</summary>
public sealed record TrainingOptions
{
    public double PruneRatio { get; init; } = 0.5;
    public PruningMode Mode { get; init; } = PruningMode.Disp;
    /// <summary>Regularizer weight λ (the paper: 6; the released code: 16).</summary>
    public double Lambda { get; init; } = 6;
    public int Steps { get; init; } = 300;
    /// <summary>Blocks per step; their gradients are averaged.</summary>
    public int BatchSize { get; init; } = 1;
    public double LearningRate { get; init; } = 1e-3;
    public double WeightDecay { get; init; } = 0.05;
    public ulong Seed { get; init; }
    public int LogEvery { get; init; } = 10;
    public int CheckpointEvery { get; init; } = 50;
    /// <summary>Cosine decay of the learning rate to 0 over <see cref="Steps"/> (default: constant).</summary>
    public bool CosineSchedule { get; init; }
    /// <summary>Global gradient-norm clipping (default: none).</summary>
    public double? ClipNorm { get; init; }

    /// <summary>Every problem, each naming its setting; empty when valid.</summary>
    public List<string> Problems()
    {
        var p = new List<string>();
        if (!(PruneRatio > 0 && PruneRatio < 1)) p.Add($"prune ratio must be in (0, 1) (got {PruneRatio})");
        if (!(Lambda > 0) || double.IsInfinity(Lambda)) p.Add($"lambda must be a positive number (got {Lambda})");
        if (Steps < 1) p.Add($"steps must be at least 1 (got {Steps})");
        if (BatchSize < 1) p.Add($"batch size must be at least 1 (got {BatchSize})");
        if (!(LearningRate > 0) || double.IsInfinity(LearningRate)) p.Add($"learning rate must be a positive number (got {LearningRate})");
        if (!(WeightDecay >= 0) || double.IsInfinity(WeightDecay)) p.Add($"weight decay must be ≥ 0 (got {WeightDecay})");
        if (LogEvery < 1) p.Add($"log interval must be at least 1 (got {LogEvery})");
        if (CheckpointEvery < 1) p.Add($"checkpoint interval must be at least 1 (got {CheckpointEvery})");
        if (ClipNorm is double c && !(c > 0)) p.Add($"gradient clipping norm must be positive (got {c})");
        return p;
    }

    public void Validate()
    {
        var p = Problems();
        if (p.Count > 0) throw new InvalidSettingException(string.Join("; ", p));
    }
}

/// <summary>One line of <c>train_log.jsonl</c>.</summary>
public sealed record TrainLogEntry(int Step, double CrossEntropy, double RegLoss, double Ratio, double LearningRate,
    double GradNorm, double TokensPerSecond, double Seconds);

/// <summary>train_log.jsonl's serializer, generated at build time (no reflection: safe in trimmed publishes).</summary>
[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower)]
[JsonSerializable(typeof(TrainLogEntry))]
internal sealed partial class TrainLogJson : JsonSerializerContext;

/// <summary>What one optimisation step saw.</summary>
public sealed record StepResult(double CrossEntropy, double RegLoss, double Ratio);

public sealed record TrainingResult(int Steps, int ResumedFrom, double Seconds, IReadOnlyList<TrainLogEntry> Log, string HypernetworkPath);

/// <summary>Trains the DISP-LLM hypernetwork with the LLM frozen: per step, mask logits from the hypernetwork,
/// Gumbel-Sigmoid soft masks for the LM loss, their straight-through hard masks for the parameter-ratio
/// regularizer, backward through the frozen model to the masks and on into the hypernetwork, AdamW.
/// Checkpoints (hypernetwork, optimizer, step, RNG state) resume a run exactly.</summary>
public sealed class HypernetworkTrainer
{
    public const string CheckpointFile = "checkpoint.safetensors", LogFile = "train_log.jsonl", HypernetworkFile = "hypernetwork.safetensors";
    private const string CheckpointMeta = "dispnative-checkpoint";

    private readonly IMaskedLanguageModel _model;
    private readonly AdamW _optimizer;
    private readonly ILogger _logger;
    private Rng _noise;
    private int[]? _order;
    private int _orderEpoch = -1;

    public ModelConfig Config { get; }
    public TrainingOptions Options { get; }
    public SiteLayout Layout { get; }
    public Hypernetwork<float> Network { get; }
    /// <summary>Completed optimisation steps.</summary>
    public int Step { get; private set; }

    /// <summary>A trainer whose LM pass runs on the fp32 CPU reference.</summary>
    public HypernetworkTrainer(ModelConfig config, ModelWeights weights, TrainingOptions options, ILogger? logger = null)
        : this(new CpuMaskedLanguageModel(config, weights), options, logger) { }

    /// <summary>A trainer whose LM pass runs on <paramref name="model"/> (which the caller disposes).</summary>
    public HypernetworkTrainer(IMaskedLanguageModel model, TrainingOptions options, ILogger? logger = null)
    {
        options.Validate();
        var config = model.Config;
        Config = config;
        Options = options;
        _logger = logger ?? NullLogger.Instance;
        Layout = new SiteLayout(config, options.Mode);
        Network = new Hypernetwork<float>(Layout.OutputWidths, options.Seed);
        _model = model;
        _optimizer = new AdamW(Network.Parameters) { WeightDecay = options.WeightDecay, ClipNorm = options.ClipNorm };
        _noise = new Rng(options.Seed ^ 0x6A09E667F3BCC909UL);
    }

    public double LearningRateAt(int step) => Options.CosineSchedule
        ? Options.LearningRate * 0.5 * (1 + Math.Cos(Math.PI * step / Options.Steps))
        : Options.LearningRate;

    /// <summary>Blocks of step <paramref name="step"/> (0-based): a seeded permutation of all blocks per epoch.</summary>
    public int[][] BatchAt(IReadOnlyList<int[]> blocks, int step)
    {
        var batch = new int[Options.BatchSize][];
        for (int b = 0; b < batch.Length; b++)
        {
            long sample = (long)step * Options.BatchSize + b;
            int epoch = (int)(sample / blocks.Count);
            if (epoch != _orderEpoch)
            {
                var rng = new Rng(Options.Seed * 0x9E3779B97F4A7C15UL + (ulong)epoch + 1);
                _order = Enumerable.Range(0, blocks.Count).ToArray();
                rng.Shuffle<int>(_order);
                _orderEpoch = epoch;
            }
            batch[b] = blocks[_order![(int)(sample % blocks.Count)]];
        }
        return batch;
    }

    /// <summary>Forward and backward of one step; leaves the gradients on <see cref="Network"/> (no update).</summary>
    public StepResult ComputeGradients(IReadOnlyList<int[]> batch)
    {
        Network.ZeroGrad();
        var tape = new Tape<float>();
        var logits = Network.Forward(tape);
        var soft = new Var<float>[logits.Count];
        var hard = new Var<float>[logits.Count];
        for (int o = 0; o < logits.Count; o++)
        {
            soft[o] = GumbelSigmoid.Soft(tape, logits[o], GumbelSigmoid.Noise<float>(_noise, logits[o].Cols));
            hard[o] = tape.RoundStraightThrough(soft[o]);
        }
        var reg = Layout.Regularizer(tape, hard, 1 - Options.PruneRatio, Options.Lambda, out double ratio);

        // The LM pass's mask gradients accumulate straight into the soft masks' gradients.
        double ce = 0;
        var masks = soft.Select(s => s.Data).ToArray();
        var grads = soft.Select(s => s.G).ToArray();
        foreach (var block in batch)
            ce += _model.LossAndMaskGradients(block, masks, Layout.OutputOf, grads, 1.0 / batch.Count) / batch.Count;
        tape.Backward(reg);
        return new StepResult(ce, reg.Scalar, ratio);
    }

    /// <summary>Refuses calibration blocks this model and these options cannot train on: none, longer than the model's
    /// context, or fewer than one batch (a step would repeat a block, with the same masks: work for nothing).</summary>
    public static void CheckBlocks(ModelConfig config, TrainingOptions options, IReadOnlyList<int[]> blocks)
    {
        if (blocks.Count == 0) throw new InvalidSettingException("no calibration blocks to train on");
        int longest = blocks.Max(b => b.Length);
        config.RequireContext(longest, $"a calibration block of {longest} tokens");
        if (options.BatchSize > blocks.Count)
            throw new InvalidSettingException($"batch size {options.BatchSize} exceeds the {blocks.Count} calibration blocks; " +
                "give more calibration text or a smaller batch size");
    }

    /// <summary>Trains to <see cref="TrainingOptions.Steps"/> in <paramref name="directory"/>, resuming from its checkpoint
    /// when there is one. Cancelling saves a checkpoint before <see cref="OperationCanceledException"/> propagates.</summary>
    public TrainingResult Train(IReadOnlyList<int[]> blocks, string directory, IProgress<TrainLogEntry>? progress = null,
        CancellationToken cancellationToken = default)
    {
        CheckBlocks(Config, Options, blocks);
        FilePaths.RequireOutputDirectory(directory, "training directory");
        if (File.Exists(directory)) throw new InvalidSettingException($"the output directory {directory} is a file");
        Directory.CreateDirectory(directory);
        string fingerprint = Fingerprint(blocks);
        string ckptPath = Path.Combine(directory, CheckpointFile), logPath = Path.Combine(directory, LogFile);
        int resumedFrom = 0;
        var log = new List<TrainLogEntry>();
        if (File.Exists(ckptPath))
        {
            try { LoadCheckpoint(ckptPath, fingerprint); }
            catch (ModelFormatException e)
            {
                string why = e.Message.StartsWith(ckptPath, StringComparison.Ordinal) ? e.Message : $"{ckptPath}: {e.Message}";
                throw new ModelFormatException($"{why}; to train from step 0 instead of resuming, delete the checkpoint");
            }
            resumedFrom = Step;
            log = ReadLog(logPath).Where(e => e.Step <= Step).ToList();
            _logger.LogInformation("resuming from step {Step} ({Path})", Step, ckptPath);
        }
        WriteLog(logPath, log);

        var total = Stopwatch.StartNew();
        var interval = Stopwatch.StartNew();
        long intervalTokens = 0;
        int lastCheckpoint = Step;
        try
        {
            while (Step < Options.Steps)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var batch = BatchAt(blocks, Step);
                var r = ComputeGradients(batch);
                RequireFinite("cross-entropy", r.CrossEntropy, lastCheckpoint);
                double lr = LearningRateAt(Step);
                double gradNorm = _optimizer.Step(lr);
                RequireFinite("gradient norm", gradNorm, lastCheckpoint);
                Step++;
                intervalTokens += batch.Sum(b => (long)b.Length);
                if (Step % Options.LogEvery == 0 || Step == Options.Steps || Step == resumedFrom + 1)
                {
                    double secs = interval.Elapsed.TotalSeconds;
                    var entry = new TrainLogEntry(Step, r.CrossEntropy, r.RegLoss, r.Ratio, lr, gradNorm, intervalTokens / Math.Max(secs, 1e-9), total.Elapsed.TotalSeconds);
                    log.Add(entry);
                    File.AppendAllText(logPath, JsonSerializer.Serialize(entry, TrainLogJson.Default.TrainLogEntry) + "\n");
                    progress?.Report(entry);
                    _logger.LogInformation("step {Step}: ce {Ce:F4} reg {Reg:F4} r {Ratio:F4} ({Tps:F0} tokens/s)", Step, r.CrossEntropy, r.RegLoss, r.Ratio, entry.TokensPerSecond);
                    interval.Restart();
                    intervalTokens = 0;
                }
                if (Step % Options.CheckpointEvery == 0) { SaveCheckpoint(ckptPath, fingerprint); lastCheckpoint = Step; }
            }
        }
        catch (OperationCanceledException)
        {
            if (Step > lastCheckpoint) SaveCheckpoint(ckptPath, fingerprint);
            _logger.LogWarning("training interrupted at step {Step}; checkpoint saved", Step);
            throw;
        }
        if (Step > lastCheckpoint) SaveCheckpoint(ckptPath, fingerprint);
        string hyperPath = Path.Combine(directory, HypernetworkFile);
        Network.Save(hyperPath, new JsonObject
        {
            ["mode"] = Options.Mode.ToString().ToLowerInvariant(),
            ["prune_ratio"] = Options.PruneRatio,
            ["lambda"] = Options.Lambda,
            ["steps"] = Step,
            ["seed"] = Options.Seed,
            ["num_layers"] = Config.NumLayers,
            ["hidden_size"] = Config.HiddenSize,
            ["intermediate_size"] = Config.IntermediateSize,
        });
        return new TrainingResult(Step, resumedFrom, total.Elapsed.TotalSeconds, log, hyperPath);
    }

    /// <summary>Stops a run whose loss or gradients are no longer numbers, before they reach the hypernetwork (AdamW skips a
    /// non-finite gradient), so that neither it nor a checkpoint holds NaNs.</summary>
    private void RequireFinite(string what, double value, int lastCheckpoint)
    {
        if (double.IsFinite(value)) return;
        throw new DispNativeException($"training diverged at step {Step + 1}: the {what} is {value}; the hypernetwork was not updated " +
            (lastCheckpoint > 0 ? $"(its last checkpoint is step {lastCheckpoint}). " : "and no checkpoint was written. ") +
            "Check that the model's outputs are finite (its dtype's range) and try a lower learning rate");
    }

    public static List<TrainLogEntry> ReadLog(string path)
    {
        if (!File.Exists(path)) return [];
        var entries = new List<TrainLogEntry>();
        foreach (var line in File.ReadLines(path))
        {
            if (string.IsNullOrWhiteSpace(line)) continue;
            TrainLogEntry? e;
            try { e = JsonSerializer.Deserialize(line, TrainLogJson.Default.TrainLogEntry); }
            catch (JsonException) { break; }   // a line cut short by an interruption ends the log
            // So does one no run writes (damage): steps rise, values are numbers.
            if (e == null || e.Step <= (entries.Count > 0 ? entries[^1].Step : 0) ||
                !new[] { e.CrossEntropy, e.RegLoss, e.Ratio, e.LearningRate, e.GradNorm, e.TokensPerSecond, e.Seconds }.All(double.IsFinite))
                break;
            entries.Add(e);
        }
        return entries;
    }

    private static void WriteLog(string path, IEnumerable<TrainLogEntry> entries)
    {
        string tmp = path + ".tmp";
        File.WriteAllLines(tmp, entries.Select(e => JsonSerializer.Serialize(e, TrainLogJson.Default.TrainLogEntry)));
        File.Move(tmp, path, overwrite: true);
    }

    /// <summary>What must match for a checkpoint to be resumed: model shape, data, and every option that changes
    /// the trajectory (not the step count or the logging/checkpoint intervals).</summary>
    private string Fingerprint(IReadOnlyList<int[]> blocks)
    {
        ulong h = 14695981039346656037UL;
        foreach (var b in blocks) foreach (var t in b) { h ^= (uint)t; h *= 1099511628211UL; }
        var o = Options;
        return string.Join("|", Config.ToJson().ToJsonString(), blocks.Count, h.ToString("x16"), o.PruneRatio.ToString("R", CultureInfo.InvariantCulture),
            o.Mode, o.Lambda.ToString("R", CultureInfo.InvariantCulture), o.BatchSize, o.LearningRate.ToString("R", CultureInfo.InvariantCulture),
            o.WeightDecay.ToString("R", CultureInfo.InvariantCulture), o.Seed, o.CosineSchedule ? o.Steps : 0, o.ClipNorm);
    }

    private void SaveCheckpoint(string path, string fingerprint)
    {
        var tensors = new List<TensorData> { TensorData.FromFloat("inputs", Network.Inputs, [Network.Inputs.Length]) };
        tensors.AddRange(Network.Parameters.Select(p => TensorData.FromFloat(p.Name, p.Value, [p.Value.Length])));
        tensors.AddRange(_optimizer.StateTensors());
        var meta = new JsonObject
        {
            ["step"] = Step,
            ["rng"] = new JsonArray(_noise.GetState().Select(s => (JsonNode)s.ToString("x16")).ToArray()),
            ["fingerprint"] = fingerprint,
        };
        SafeTensorsWriter.Write(path, tensors, new Dictionary<string, string> { [CheckpointMeta] = meta.ToJsonString() });
    }

    private void LoadCheckpoint(string path, string fingerprint)
    {
        using var file = SafeTensorsFile.Open(path);
        JsonObject? meta = null;
        if (file.Metadata.TryGetValue(CheckpointMeta, out var json))
            try { meta = JsonNode.Parse(json, null, JsonFields.Strict) as JsonObject; } catch (JsonException) { }
        if (meta == null) throw new ModelFormatException($"{path}: not a DispNative training checkpoint");
        if (JsonFields.OptionalString(meta, "fingerprint", path) != fingerprint)
            throw new InvalidSettingException($"{path} was written by a run with a different model, calibration data or training settings; " +
                                              "use a new output directory (or restore the original settings to resume)");
        int step = JsonFields.Required<int>(meta, "step", path);
        if (step < 0) throw new ModelFormatException($"{path}: field 'step' is {step}");
        var rng = (meta["rng"] as JsonArray)?.Select(n => JsonFields.Element<string>(n, "rng", path)).ToArray();
        var state = new ulong[4];
        if (rng is not { Length: 4 } || Enumerable.Range(0, 4).Any(i => !ulong.TryParse(rng[i], NumberStyles.HexNumber, null, out state[i])))
            throw new ModelFormatException($"{path}: field 'rng' must be the 4 words of the noise generator's state in hexadecimal");
        Hypernetwork<float>.Fill(file, "inputs", Network.Inputs, path);
        foreach (var p in Network.Parameters) Hypernetwork<float>.Fill(file, p.Name, p.Value, path);
        Step = step;
        _optimizer.LoadState(file, Step);
        _noise = new Rng(0);
        _noise.SetState(state);
    }
}
