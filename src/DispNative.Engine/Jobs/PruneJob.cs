using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using DispNative.Engine.Builtin;
using DispNative.Engine.Cuda;
using DispNative.Engine.Disp;
using DispNative.Engine.Evaluation;
using DispNative.Engine.IO;
using DispNative.Engine.Inference;
using DispNative.Engine.Models;
using DispNative.Engine.Training;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DispNative.Engine.Jobs;

/// <summary>Progress of one phase of a job: <paramref name="Done"/> of <paramref name="Total"/> units.</summary>
public readonly record struct JobProgress(string Phase, double Done, double Total, string? Detail = null);

/// <summary>Perplexities, sizes and speeds (prefill and decode on the job's device, dense and pruned timed in the same
/// run; null when the evaluation text is under two tokens) of a finished job (also written as <c>metrics.json</c>).</summary>
public sealed record PruneJobResult(double DensePerplexity, double PrunedPerplexity, double KeptRatioPrunable, long DenseParams,
    long PrunedParams, string OutputDirectory, string ModelDirectory, JsonObject Metrics, SpeedResult? DenseSpeed, SpeedResult? PrunedSpeed);

/// <summary>The main job: load → calibrate → train the hypernetwork → prune → save → evaluate dense and pruned →
/// report. An interrupted job resumes from its training checkpoint; an output directory is never replaced
/// unless <see cref="PruneJobOptions.Overwrite"/> is set.</summary>
public static class PruneJob
{
    public const string RunFile = "run.json", MetricsFile = "metrics.json", ReportFile = "report.md", ModelDir = "model";
    private static readonly string[] Produced =
    [
        RunFile, MetricsFile, ReportFile, ModelDir, HypernetworkTrainer.HypernetworkFile, HypernetworkTrainer.CheckpointFile,
        HypernetworkTrainer.LogFile, "widths.svg", "loss.svg",
    ];

    /// <summary>The entry of <paramref name="outputDirectory"/> that the job writes (or, with Overwrite, deletes) and that
    /// <paramref name="path"/> is or lies in; null when the job leaves <paramref name="path"/> alone.</summary>
    public static string? ProducedEntryHolding(string outputDirectory, string path)
    {
        var comparison = OperatingSystem.IsWindows() || OperatingSystem.IsMacOS() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal;
        string full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(path));
        foreach (var name in Produced)
        {
            string entry = Path.GetFullPath(Path.Combine(outputDirectory, name));
            if (string.Equals(full, entry, comparison) || full.StartsWith(entry + Path.DirectorySeparatorChar, comparison)) return name;
        }
        return null;
    }

    public static PruneJobResult Run(PruneJobOptions o, IProgress<JobProgress>? progress = null, ILogger? logger = null,
        CancellationToken cancellationToken = default)
    {
        logger ??= NullLogger.Instance;
        if (o.Problems() is { Count: > 0 } problems) throw new InvalidSettingException("invalid options:\n  " + string.Join("\n  ", problems));
        string outDir = o.OutputDirectory;
        CheckOutput(o);
        string device = Devices.Resolve(o.Device);

        string Resolve(string path) => TinyModel.Resolve(path,
            new SyncProgress<(int Step, int Steps)>(p => progress?.Report(new JobProgress("build built-in model", p.Step, p.Steps))), cancellationToken);
        string modelPath = Resolve(o.ModelPath);
        var calibrationFiles = o.CalibrationFiles.Select(Resolve).ToList();
        var evaluationFiles = o.EvaluationFiles.Select(Resolve).ToList();

        // The dense model: on the CPU whole in host memory; on CUDA its weights go to the GPU as they are read, stored as
        // training stores them, and the pruner reads them from the file again, a layer at a time.
        progress?.Report(new JobProgress("load model", 0, 1));
        using var source = ModelLoader.Open(modelPath, o.TokenizerPath);
        if (source.Config.Disp != null) throw new InvalidSettingException($"Model:Path: {modelPath} is already pruned; give its dense source");
        source.Config.RequireContext(o.CalibrationBlockSize, $"Calibration:BlockSize {o.CalibrationBlockSize}");
        source.Config.RequireContext(o.EvaluationBlockSize, $"Evaluation:BlockSize {o.EvaluationBlockSize}");
        var dense = Devices.Place(source, device, device == "cuda" ? o.DType : null);
        try
        {
            progress?.Report(new JobProgress("load model", 1, 1));

            progress?.Report(new JobProgress("calibration", 0, 1));
            var ids = Calibration.Tokenize(calibrationFiles, dense.Tokenizer, dense.BosId, cancellationToken);
            var blocks = Calibration.Blocks(ids, o.CalibrationBlockSize, o.CalibrationMaxBlocks);
            HypernetworkTrainer.CheckBlocks(dense.Config, o.Training, blocks);
            logger.LogInformation("calibration: {Tokens} tokens in {Blocks} blocks of {Size}", ids.Length, blocks.Count, o.CalibrationBlockSize);
            progress?.Report(new JobProgress("calibration", 1, 1, $"{blocks.Count} blocks"));
            ClaimOutput(o);   // only now that every input has passed its checks

            TrainingResult train;
            HypernetworkTrainer trainer;
            string trainDevice;
            using (var lm = Devices.MaskedModel(dense, o.CheckpointLayers))
            {
                trainer = new HypernetworkTrainer(lm, o.Training, logger);
                train = trainer.Train(blocks, outDir, new SyncProgress<TrainLogEntry>(e =>
                    progress?.Report(new JobProgress("train hypernetwork", e.Step, o.Training.Steps, $"ce {e.CrossEntropy:F3} r {e.Ratio:F3}"))), cancellationToken);
                trainDevice = lm.DeviceName;
            }

            var plan = PruningPlan.FromHypernetwork(trainer.Network, trainer.Layout, o.DeterministicMasks, o.Training.Seed);
            string mode = o.Training.Mode.ToString().ToLowerInvariant();
            var prunedConfig = Pruner.PrunedConfig(dense.Config, plan, mode, o.Training.PruneRatio, o.ModelPath);
            string modelDir = Path.Combine(outDir, ModelDir);
            if (Directory.Exists(modelDir)) Directory.Delete(modelDir, true);   // ours, from an interrupted run
            var dtype = Pruner.SavedDType(dense.Config, o.DType);
            var denseWeights = dense.Runner is CudaLlama ? source.Weights : LayerwiseWeights.Of(dense.Model.Weights);
            Pruner.Save(modelDir, prunedConfig, Pruner.Slicing(dense.Config, denseWeights, plan), dtype, Pruner.TokenizerFilesOf(modelPath, o.TokenizerPath));

            // Evaluation on the chosen device, in the saved storage type on CUDA, then each model's speed there.
            var evalIds = evaluationFiles.Select(f => dense.EncodeForScoring(File.ReadAllText(f))).ToList();
            bool timeable = SpeedProbe.Plan(evalIds[0].Length, o.EvaluationBlockSize, SpeedDecodeTokens, dense.Config.MaxPositionEmbeddings) != null;
            PerplexityResult denseEval, prunedEval;
            SpeedResult? denseSpeed = null, prunedSpeed = null;
            DType? evalDType = device == "cuda" ? dtype : null;
            if (dense.Runner is CudaLlama trained && trained.DType != dtype)
            {
                dense.Dispose();
                dense = Devices.Place(source, device, dtype);
            }
            denseEval = Evaluate("evaluate dense", dense.Runner, evalIds, o, progress, cancellationToken);
            if (timeable) denseSpeed = TimeModel("time dense", dense.Runner, evalIds[0], o, progress, cancellationToken);
            dense.Dispose();   // before the pruned model takes its place
            ModelConfig savedConfig;
            using (var pruned = Devices.Load(modelDir, null, device, evalDType))   // the saved model, as eval loads it
            {
                savedConfig = pruned.Config;
                prunedEval = Evaluate("evaluate pruned", pruned.Runner, evalIds, o, progress, cancellationToken);
                if (timeable) prunedSpeed = TimeModel("time pruned", pruned.Runner, evalIds[0], o, progress, cancellationToken);
            }

            var dc = dense.Config.ParameterCounts();
            var pc = savedConfig.ParameterCounts();
            double kept = (double)savedConfig.PrunableParameters() / dense.Config.PrunableParameters();
            var widths = new JsonArray(prunedConfig.Disp!.Widths.Select((w, l) =>
            {
                var layer = new JsonObject { ["layer"] = l };
                for (int s = 0; s < w.Length; s++) layer[DispInfo.SiteKeys[s]] = w[s];
                return (JsonNode)layer;
            }).ToArray());
            var metrics = new JsonObject
            {
                ["dense_ppl"] = denseEval.Perplexity,
                ["pruned_ppl"] = prunedEval.Perplexity,
                ["prune_ratio_target"] = o.Training.PruneRatio,
                ["kept_ratio_prunable"] = kept,
                ["params_dense_total"] = dc.Values.Sum(),
                ["params_pruned_total"] = pc.Values.Sum(),
                ["params_dense_prunable"] = dense.Config.PrunableParameters(),
                ["params_pruned_prunable"] = savedConfig.PrunableParameters(),
                ["mode"] = mode,
                ["lambda"] = o.Training.Lambda,
                ["steps"] = train.Steps,
                ["resumed_from_step"] = train.ResumedFrom,
                ["train_seconds"] = train.Seconds,
                ["device"] = device,
                ["train_device"] = trainDevice,
                ["model"] = o.ModelPath,
                ["saved_dtype"] = dtype.Name(),
                ["evaluation"] = new JsonObject
                {
                    ["files"] = new JsonArray(o.EvaluationFiles.Select(f => (JsonNode)f).ToArray()),
                    ["block_size"] = o.EvaluationBlockSize, ["max_blocks"] = o.EvaluationMaxBlocks, ["scored_tokens"] = denseEval.ScoredTokens,
                },
                ["widths"] = widths,
            };
            if (denseSpeed != null && prunedSpeed != null)
                metrics["speed"] = new JsonObject
                {
                    ["prompt_tokens"] = denseSpeed.PromptTokens, ["decode_tokens"] = denseSpeed.DecodeTokens,
                    ["dense_rounds"] = denseSpeed.TimedRounds, ["pruned_rounds"] = prunedSpeed.TimedRounds,
                    ["dense_prefill_tokens_per_second"] = denseSpeed.PrefillTokensPerSecond,
                    ["pruned_prefill_tokens_per_second"] = prunedSpeed.PrefillTokensPerSecond,
                    ["prefill_speedup"] = prunedSpeed.PrefillTokensPerSecond / denseSpeed.PrefillTokensPerSecond,
                    ["dense_decode_tokens_per_second"] = denseSpeed.DecodeTokensPerSecond,
                    ["pruned_decode_tokens_per_second"] = prunedSpeed.DecodeTokensPerSecond,
                    ["decode_speedup"] = prunedSpeed.DecodeTokensPerSecond / denseSpeed.DecodeTokensPerSecond,
                };
            File.WriteAllText(Path.Combine(outDir, MetricsFile), metrics.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            Report.Write(outDir, metrics, prunedConfig, HypernetworkTrainer.ReadLog(Path.Combine(outDir, HypernetworkTrainer.LogFile)));
            logger.LogInformation("dense perplexity {Dense:F4}, pruned {Pruned:F4}, kept {Kept:P2} of prunable parameters", denseEval.Perplexity, prunedEval.Perplexity, kept);
            return new PruneJobResult(denseEval.Perplexity, prunedEval.Perplexity, kept, dc.Values.Sum(), pc.Values.Sum(), outDir, modelDir, metrics,
                denseSpeed, prunedSpeed);
        }
        finally { dense.Dispose(); }
    }

    /// <summary>Decode steps timed per round by the job's speed measurement.</summary>
    public const int SpeedDecodeTokens = 32;

    private static SpeedResult TimeModel(string phase, ICausalLanguageModel model, int[] ids, PruneJobOptions o,
        IProgress<JobProgress>? progress, CancellationToken ct)
    {
        progress?.Report(new JobProgress(phase, 0, 1));
        var speed = SpeedProbe.Measure(model, ids, o.EvaluationBlockSize, SpeedDecodeTokens, ct);
        progress?.Report(new JobProgress(phase, 1, 1, $"prefill {speed.PrefillTokensPerSecond:F0} tok/s, decode {speed.DecodeTokensPerSecond:F0} tok/s"));
        return speed;
    }

    /// <summary>Perplexity over several texts (each tokenized with BOS at its start): blocks per text, NLL pooled.</summary>
    public static PerplexityResult Evaluate(string phase, ICausalLanguageModel model, IReadOnlyList<int[]> perFile, PruneJobOptions o,
        IProgress<JobProgress>? progress, CancellationToken ct)
    {
        double nll = 0;
        long scored = 0;
        int blocks = 0, tokens = 0;
        int total = perFile.Sum(ids => Perplexity.Blocks(ids, o.EvaluationBlockSize, o.EvaluationMaxBlocks).Count), done = 0;
        foreach (var ids in perFile)
        {
            int before = done;
            var r = Perplexity.Evaluate(model, ids, o.EvaluationBlockSize, o.EvaluationMaxBlocks,
                new SyncProgress<PerplexityProgress>(p => { done = before + p.BlocksDone; progress?.Report(new JobProgress(phase, done, total, $"ppl {p.RunningPerplexity:F3}")); }), ct);
            nll += r.TotalNll; scored += r.ScoredTokens; blocks += r.Blocks; tokens += r.TotalTokens;
        }
        return new PerplexityResult(Math.Exp(nll / scored), nll, scored, blocks, tokens);
    }

    /// <summary>Refuses an output directory that holds something not ours, or a finished run, unless told to overwrite.</summary>
    private static void CheckOutput(PruneJobOptions o)
    {
        string dir = o.OutputDirectory;
        if (File.Exists(dir)) throw new InvalidSettingException($"Output:Directory: {dir} is a file");
        if (o.Overwrite || !Directory.Exists(dir) || !Directory.EnumerateFileSystemEntries(dir).Any()) return;
        if (!File.Exists(Path.Combine(dir, RunFile)))
            throw new InvalidSettingException($"Output:Directory: {dir} exists and is not a DispNative run directory; choose another or set Output:Overwrite=true");
        if (File.Exists(Path.Combine(dir, MetricsFile)))
            throw new InvalidSettingException($"Output:Directory: {dir} already holds a finished run; set Output:Overwrite=true to replace it");
    }

    /// <summary>Creates the output directory (with Overwrite, first deletes what an earlier run produced there) and
    /// writes <see cref="RunFile"/>, which marks it as ours.</summary>
    private static void ClaimOutput(PruneJobOptions o)
    {
        string dir = o.OutputDirectory;
        if (o.Overwrite && Directory.Exists(dir))
        {
            foreach (var name in Produced)
            {
                string p = Path.Combine(dir, name);
                if (Directory.Exists(p)) Directory.Delete(p, true);
                else if (File.Exists(p)) File.Delete(p);
            }
        }
        Directory.CreateDirectory(dir);
        var run = new JsonObject
        {
            ["model"] = o.ModelPath, ["prune_ratio"] = o.Training.PruneRatio, ["mode"] = o.Training.Mode.ToString().ToLowerInvariant(),
            ["steps"] = o.Training.Steps, ["started"] = DateTime.UtcNow.ToString("O"),
        };
        File.WriteAllText(Path.Combine(dir, RunFile), run.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }
}
