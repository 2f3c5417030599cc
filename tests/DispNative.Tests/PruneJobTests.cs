using System.Globalization;
using System.Text.Json.Nodes;
using DispNative.Cli;
using DispNative.Engine;
using DispNative.Engine.Builtin;
using DispNative.Engine.Evaluation;
using DispNative.Engine.Inference;
using DispNative.Engine.IO;
using DispNative.Engine.Jobs;
using DispNative.Engine.Models;
using DispNative.Engine.Training;
using Microsoft.Extensions.Configuration;

namespace DispNative.Tests;

public class PruneJobTests
{
    /// <summary>A tiny random model, calibration and evaluation texts, and a job config in a fresh folder.</summary>
    internal static (string Dir, string ConfigPath) Setup(Action<JsonObject>? edit = null)
    {
        var dir = TestAssets.TempDir();
        TestAssets.WriteTinyModel(Path.Combine(dir, "model"));
        File.WriteAllText(Path.Combine(dir, "cal.txt"), SyntheticCorpus.Generate(5, 6000));
        File.WriteAllText(Path.Combine(dir, "eval.txt"), SyntheticCorpus.Generate(6, 3000));
        var config = new JsonObject
        {
            ["Model"] = new JsonObject { ["Path"] = "model", ["Device"] = "cpu" },
            ["Calibration"] = new JsonObject { ["Files"] = new JsonArray("cal.txt"), ["BlockSize"] = 32 },
            ["Pruning"] = new JsonObject { ["PruneRatio"] = 0.4 },
            ["Training"] = new JsonObject { ["Steps"] = 6, ["LogEvery"] = 1, ["CheckpointEvery"] = 2, ["LearningRate"] = 0.05 },
            ["Evaluation"] = new JsonObject { ["Files"] = new JsonArray("eval.txt"), ["BlockSize"] = 64, ["MaxBlocks"] = 4 },
            ["Output"] = new JsonObject { ["Directory"] = "out" },
        };
        edit?.Invoke(config);
        var path = Path.Combine(dir, "prune.json");
        File.WriteAllText(path, config.ToJsonString());
        return (dir, path);
    }

    internal static (int Code, string Out, string Err) Cli(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int code = Program.Run(args, o, e);
        return (code, o.ToString(), e.ToString());
    }

    /// <summary><c>train</c>'s or <c>run</c>'s hypernetwork file, pruned with <c>prune</c>, gives the model <c>run</c>
    /// saved, byte for byte; and the bad inputs of <c>prune</c> each get their own message.</summary>
    [Test]
    public void PruneWithTheRunsHypernetwork_SavesTheRunsModel()
    {
        var (dir, config) = Setup(c => c["Model"]!["DType"] = "bf16");
        Assert.That(Cli("run", config).Code, Is.Zero);
        string model = Path.Combine(dir, "model"), hyper = Path.Combine(dir, "out", "hypernetwork.safetensors"), target = Path.Combine(dir, "again");
        var (code, stdout, stderr) = Cli("prune", "--model", model, "--hypernetwork", hyper, "--out", target, "--dtype", "bf16");
        Assert.That(code, Is.Zero, stderr);
        var metrics = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "out", "metrics.json")))!;
        Assert.That(stdout, Does.StartWith($"kept {metrics["kept_ratio_prunable"]!.GetValue<double>():P2} of prunable parameters " +
                                           $"({metrics["params_pruned_total"]!.GetValue<long>():N0} of {metrics["params_dense_total"]!.GetValue<long>():N0} in total; target 60 %, mode disp)"));
        var saved = Directory.GetFiles(Path.Combine(dir, "out", "model")).Select(Path.GetFileName).Order().ToArray();
        Assert.That(Directory.GetFiles(target).Select(Path.GetFileName).Order(), Is.EqualTo(saved));
        foreach (var f in saved)
            Assert.That(File.ReadAllBytes(Path.Combine(target, f!)), Is.EqualTo(File.ReadAllBytes(Path.Combine(dir, "out", "model", f!))), f);

        string Error(params string[] args)
        {
            var (c, _, e) = Cli(["prune", .. args]);
            Assert.That((c, e.Contains("   at ")), Is.EqualTo((1, false)), e);
            return e.TrimEnd().Split('\n')[^1];
        }
        Assert.That(Error("--model", model, "--hypernetwork", hyper, "--out", target), Is.EqualTo($"error: --out: {target} already exists; not overwriting it"));
        string fresh = Path.Combine(dir, "fresh");
        Assert.That(Error("--model", model, "--hypernetwork", Path.Combine(dir, "none"), "--out", fresh), Does.Contain("hypernetwork file").And.Contain("not found"));
        Assert.That(Error("--model", model, "--hypernetwork", Path.Combine(target, "model.safetensors"), "--out", fresh),
            Does.Contain("not a DispNative hypernetwork"));
        Assert.That(Error("--model", target, "--hypernetwork", hyper, "--out", fresh), Does.Contain("is already pruned; give its dense source"));
        var other = Path.Combine(dir, "other");   // another MLP width: the hypernetwork's mlp_mid heads do not fit
        var otherConfig = TestAssets.TinyConfig() with { IntermediateSize = 96 };
        Engine.IO.SafeTensorsWriter.WriteSharded(other, ModelWeights.Random(otherConfig, 5).ToTensors(otherConfig, Engine.IO.DType.F32).ToList(), long.MaxValue);
        File.WriteAllText(Path.Combine(other, "config.json"), otherConfig.ToJson().ToJsonString());
        File.Copy(Path.Combine(model, "tokenizer.json"), Path.Combine(other, "tokenizer.json"));
        Assert.That(Error("--model", other, "--hypernetwork", hyper, "--out", fresh), Does.Contain("but this model and mode need"));
        Assert.That(Directory.Exists(fresh), Is.False);
    }

    [Test]
    public void RunWritesEverythingAndTheSavedModelScoresAsReported()
    {
        var (dir, config) = Setup();
        var outDir = Path.Combine(dir, "out");
        Directory.CreateDirectory(outDir);   // an empty directory is free to use
        var (code, stdout, stderr) = Cli("run", config);
        Assert.That(code, Is.EqualTo(0), stderr);
        Assert.That(stdout, Does.Contain("dense perplexity:").And.Contain("pruned perplexity:"));
        foreach (var f in new[] { "model/config.json", "model/tokenizer.json", "hypernetwork.safetensors", "train_log.jsonl", "metrics.json", "report.md", "widths.svg", "loss.svg" })
            Assert.That(File.Exists(Path.Combine(outDir, f)), f);
        var metrics = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "metrics.json")))!.AsObject();
        foreach (var key in new[] { "dense_ppl", "pruned_ppl", "prune_ratio_target", "kept_ratio_prunable", "params_dense_total", "params_pruned_total", "widths", "train_seconds", "device" })
            Assert.That(metrics.ContainsKey(key), key);
        Assert.That(metrics["widths"]!.AsArray().Count, Is.EqualTo(2));
        var (denseTotal, densePrunable) = CountSavedParameters(Path.Combine(dir, "model"));
        var (prunedTotal, prunedPrunable) = CountSavedParameters(Path.Combine(outDir, "model"));
        Assert.That((metrics["params_dense_total"]!.GetValue<long>(), metrics["params_pruned_total"]!.GetValue<long>()), Is.EqualTo((denseTotal, prunedTotal)));
        Assert.That(metrics["kept_ratio_prunable"]!.GetValue<double>(), Is.EqualTo((double)prunedPrunable / densePrunable).Within(1e-12),
            "the saved projections' share of the dense ones");
        Assert.That((metrics["params_dense_prunable"]!.GetValue<long>(), metrics["params_pruned_prunable"]!.GetValue<long>()), Is.EqualTo((densePrunable, prunedPrunable)));
        Assert.That(File.ReadAllText(Path.Combine(outDir, "report.md")), Does.Contain("![kept widths](widths.svg)"));

        // Prefill and decode speeds of both models, timed in the run: positive, the ratio as stored, shown as stored.
        var speed = metrics["speed"]!.AsObject();
        double S(string key) => speed[key]!.GetValue<double>();
        Assert.That((speed["prompt_tokens"]!.GetValue<int>(), speed["decode_tokens"]!.GetValue<int>()), Is.EqualTo((64, PruneJob.SpeedDecodeTokens)));
        foreach (var kind in new[] { "prefill", "decode" })
        {
            double dense = S($"dense_{kind}_tokens_per_second"), pruned = S($"pruned_{kind}_tokens_per_second");
            Assert.That(new[] { dense, pruned }, Is.All.GreaterThan(0).And.All.LessThan(double.PositiveInfinity), kind);
            Assert.That(S($"{kind}_speedup"), Is.EqualTo(pruned / dense), kind);
            Assert.That(File.ReadAllText(Path.Combine(outDir, "report.md")), Does.Contain(string.Create(CultureInfo.InvariantCulture,
                $" tokens/s | {dense:F0} | {pruned:F0} ({pruned / dense:F2}×) |")), kind);
        }
        Assert.That(speed["dense_rounds"]!.GetValue<int>(), Is.GreaterThanOrEqualTo(SpeedProbe.Rounds));
        Assert.That(stdout, Does.Contain($"prefill (64 tokens): {S("dense_prefill_tokens_per_second"):F0} tokens/s dense"));
        Assert.That(File.ReadAllText(Path.Combine(outDir, "widths.svg")), Does.StartWith("<svg").And.Contain("polyline"));

        // `eval` on the saved pruned model gives exactly the reported perplexity.
        var evalJson = Path.Combine(dir, "eval.json");
        var (evalCode, evalOut, evalErr) = Cli("eval", "--model", Path.Combine(outDir, "model"), "--text", Path.Combine(dir, "eval.txt"),
            "--block-size", "64", "--max-blocks", "4", "--device", "cpu", "--json", evalJson);
        Assert.That(evalCode, Is.EqualTo(0), evalErr);
        Assert.That(evalOut, Does.Contain($"perplexity: {metrics["pruned_ppl"]!.GetValue<double>():F4}"));
        var evalResult = JsonNode.Parse(File.ReadAllText(evalJson))!;
        Assert.That(metrics["evaluation"]!["scored_tokens"]!.GetValue<long>(), Is.EqualTo(evalResult["scored_tokens"]!.GetValue<long>()).And.EqualTo(4 * 63));
        Assert.That(evalResult["perplexity"]!.GetValue<double>(), Is.EqualTo(metrics["pruned_ppl"]!.GetValue<double>()));
        var inspect = Cli("inspect", "--model", Path.Combine(outDir, "model"));
        Assert.That(inspect.Out, Does.Contain($"{metrics["params_pruned_total"]!.GetValue<long>():N0}"));
        var layer1 = metrics["widths"]![1]!.AsObject();   // inspect lists the kept widths as metrics.json does
        Assert.That(inspect.Out, Does.Contain("  1     " + string.Concat(DispInfo.SiteKeys.Select(k => $"{layer1[k]!.GetValue<int>(),10}"))));

        // The report's table lists the kept widths of every layer as metrics.json does.
        var report = File.ReadAllText(Path.Combine(outDir, "report.md"));
        for (int l = 0; l < 2; l++)
        {
            var layer = metrics["widths"]![l]!.AsObject();
            Assert.That(report, Does.Contain($"| {l} | " + string.Join(" | ", DispInfo.SiteKeys.Select(k => layer[k]!.GetValue<int>())) + " |"));
        }

        // A finished run is not replaced without Output:Overwrite; with it, the run starts over.
        var again = Cli("run", config);
        Assert.That(again.Code, Is.EqualTo(1));
        Assert.That(again.Err, Does.Contain("already holds a finished run"));
        var forced = Cli("run", config, "--Output:Overwrite=true", "--Training:Steps=3");
        Assert.That(forced.Code, Is.EqualTo(0), forced.Err);
        Assert.That(JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "metrics.json")))!["steps"]!.GetValue<int>(), Is.EqualTo(3));
    }

    [Test]
    public void AnInterruptedRunResumesAndEndsWhereAnUninterruptedOneDoes()
    {
        var (dir, configPath) = Setup();
        IConfiguration Config(string outDir) => new ConfigurationBuilder().AddJsonFile(configPath).AddInMemoryCollection(
            new Dictionary<string, string?> { ["Output:Directory"] = outDir }).Build();
        var straight = PruneJob.Run(PruneJobOptions.FromConfiguration(Config("a"), dir));

        var options = PruneJobOptions.FromConfiguration(Config("b"), dir);
        using var cts = new CancellationTokenSource();
        Assert.Throws<OperationCanceledException>(() => PruneJob.Run(options, new SyncProgress<JobProgress>(p =>
        {
            if (p.Phase == "train hypernetwork" && p.Done >= 3) cts.Cancel();
        }), cancellationToken: cts.Token));
        Assert.That(File.Exists(Path.Combine(dir, "b", "metrics.json")), Is.False);
        var resumed = PruneJob.Run(options);
        Assert.That(resumed.Metrics["resumed_from_step"]!.GetValue<int>(), Is.EqualTo(3));
        Assert.That(resumed.PrunedPerplexity, Is.EqualTo(straight.PrunedPerplexity));
        Assert.That(resumed.Metrics["widths"]!.ToJsonString(), Is.EqualTo(straight.Metrics["widths"]!.ToJsonString()));
    }

    [Test]
    public void ARunWithCheckpointedLayers_TrainsTheSameHypernetwork()
    {
        var (dir, configPath) = Setup();
        PruneJobResult Run(string outDir, string checkpoint) => PruneJob.Run(PruneJobOptions.FromConfiguration(new ConfigurationBuilder()
            .AddJsonFile(configPath).AddInMemoryCollection(new Dictionary<string, string?>
                { ["Output:Directory"] = outDir, ["Training:CheckpointLayers"] = checkpoint }).Build(), dir));
        var kept = Run("a", "false");
        var recomputed = Run("b", "true");
        Assert.That(kept.Metrics["train_device"]!.GetValue<string>(), Is.EqualTo("cpu"));
        Assert.That(recomputed.Metrics["train_device"]!.GetValue<string>(), Is.EqualTo("cpu, layers checkpointed"));
        Assert.That(File.ReadAllBytes(Path.Combine(dir, "b", "hypernetwork.safetensors")),
            Is.EqualTo(File.ReadAllBytes(Path.Combine(dir, "a", "hypernetwork.safetensors"))));
        Assert.That(recomputed.PrunedPerplexity, Is.EqualTo(kept.PrunedPerplexity));
    }

    [Test]
    public void AForeignOutputDirectoryIsNeverTouched()
    {
        var (dir, config) = Setup();
        var outDir = Path.Combine(dir, "out");
        Directory.CreateDirectory(outDir);
        File.WriteAllText(Path.Combine(outDir, "notes.txt"), "mine");
        var (code, _, err) = Cli("run", config);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.Contain("is not a DispNative run directory"));
        Assert.That(Directory.GetFileSystemEntries(outDir), Has.Length.EqualTo(1));
        Assert.That(File.ReadAllText(Path.Combine(outDir, "notes.txt")), Is.EqualTo("mine"));
    }

    [TestCase("Pruning:PruneRatio", "1.5", "Pruning:PruneRatio: must be strictly between 0 and 1")]
    [TestCase("Pruning:PruneRatio", "half", "Pruning:PruneRatio: 'half' is not a number")]
    [TestCase("Pruning:Mode", "dense", "Pruning:Mode: 'dense' is not one of disp | same")]
    [TestCase("Pruning:Lambda", "-1", "Pruning:Lambda: must be positive")]
    [TestCase("Model:Path", "nowhere", "Model:Path: not found")]
    [TestCase("Model:Device", "tpu", "Model:Device: 'tpu' is not one of auto | cpu | cuda")]
    [TestCase("Model:DType", "int8", "Model:DType: 'int8' is not one of auto | f32 | bf16 | f16")]
    [TestCase("Calibration:BlockSize", "1", "Calibration:BlockSize: must be at least 2")]
    [TestCase("Calibration:BlockSize", "257", "Calibration:BlockSize 257 exceeds the model's context of 256 positions")]
    [TestCase("Calibration:MaxBlocks", "0", "Calibration:MaxBlocks: must be at least 1")]
    [TestCase("Calibration:Files:0", "missing.txt", "Calibration:Files: file not found")]
    [TestCase("Calibration:Files:0", "model", "Calibration:Files: file /")]
    [TestCase("Calibration:Files:0", "model", "/model is a directory, not a file")]
    [TestCase("Model:Tokenizer", "model", "Model:Tokenizer: tokenizer /")]
    [TestCase("Training:Steps", "0", "Training:Steps: must be at least 1")]
    [TestCase("Training:BatchSize", "x", "Training:BatchSize: 'x' is not an integer")]
    [TestCase("Training:LearningRate", "0", "Training:LearningRate: must be positive")]
    [TestCase("Training:WeightDecay", "-0.1", "Training:WeightDecay: must be ≥ 0")]
    [TestCase("Training:Seed", "-3", "Training:Seed: '-3' is not a non-negative integer")]
    [TestCase("Training:LogEvery", "0", "Training:LogEvery: must be at least 1")]
    [TestCase("Training:CheckpointEvery", "-5", "Training:CheckpointEvery: must be at least 1")]
    [TestCase("Training:CosineSchedule", "sometimes", "Training:CosineSchedule: 'sometimes' is not true or false")]
    [TestCase("Training:ClipNorm", "0", "Training:ClipNorm: must be positive")]
    [TestCase("Training:CheckpointLayers", "sometimes", "Training:CheckpointLayers: 'sometimes' is not one of auto | true | false")]
    [TestCase("Evaluation:Files:0", "gone.txt", "Evaluation:Files: file not found")]
    [TestCase("Evaluation:BlockSize", "big", "Evaluation:BlockSize: 'big' is not an integer")]
    [TestCase("Evaluation:BlockSize", "512", "Evaluation:BlockSize 512 exceeds the model's context of 256 positions")]
    [TestCase("Evaluation:MaxBlocks", "-1", "Evaluation:MaxBlocks: must be at least 1")]
    [TestCase("Output:Overwrite", "maybe", "Output:Overwrite: 'maybe' is not true or false")]
    [TestCase("Training:Stepz", "5", "Training:Stepz: unknown key (did you mean Training:Steps?)")]
    [TestCase("pruning:pruneratio0", "0.5", "pruning:pruneratio0: unknown key (did you mean Pruning:PruneRatio?)")]
    [TestCase("Training:Steps:0", "5", "Training:Steps: expected one value, not a list")]
    [TestCase("Model:Path:0", "model", "Model:Path: expected one value, not a list")]
    [TestCase("Training", "5", "Training: expected a section (Training:Steps, Training:BatchSize,")]
    [TestCase("Training:Schedule", "cosine", "Training:Schedule: unknown key (known keys: Model:Path,")]
    [TestCase("Training:LearnRate", "0.1", "Training:LearnRate: unknown key (did you mean Training:LearningRate?)")]
    [TestCase("Output:Directory", "model/", "Output:Directory: must differ from Model:Path")]
    public void EveryBadValueIsReportedWithItsKey(string key, string value, string message)
    {
        var (dir, config) = Setup();
        var (code, stdout, err) = Cli("run", config, $"--{key}={value}");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.Contain(message));
        Assert.That(Directory.Exists(Path.Combine(dir, "out")), Is.False, "nothing is written before validation passes");
    }

    /// <summary>Problems that show only once the model and the calibration text are read are still found before the
    /// output directory is created.</summary>
    [TestCase("--Training:BatchSize=4", "--Calibration:MaxBlocks=3", "Training:BatchSize: 4 exceeds Calibration:MaxBlocks 3")]
    [TestCase("--Training:BatchSize=100000", "--Training:Steps=1", "batch size 100000 exceeds the 8 calibration blocks")]
    [TestCase("--Calibration:BlockSize=256", "--Training:Steps=1", "the calibration text has 200 tokens, shorter than one block of 256")]
    public void InputsThatFailTheirChecks_LeaveNoOutputDirectory(string first, string second, string message)
    {
        var (dir, config) = Setup();
        File.WriteAllText(Path.Combine(dir, "cal.txt"), new string('a', 199));   // byte-level: BOS + 199 tokens, 8 blocks of 25
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"BlockSize\":32", "\"BlockSize\":25"));
        var (code, _, err) = Cli("run", config, first, second);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.Contain(message));
        Assert.That(Directory.Exists(Path.Combine(dir, "out")), Is.False);
    }

    /// <summary>Keys outside the job's sections (DISPNATIVE_CUDA_LIBRARY and the like) are not the job's to judge, and
    /// do not change how an unknown key is spelled back (the merged view's casing of a section depended on them).</summary>
    [Test]
    public void AnUnknownKey_IsReportedAsWritten_WhateverOtherKeysExist()
    {
        var (dir, configPath) = Setup();
        var config = new ConfigurationBuilder().AddJsonFile(configPath)
            .AddInMemoryCollection(new Dictionary<string, string?> { ["CUDA_LIBRARY"] = "a", ["NVRTC_LIBRARY"] = "b", ["CUBLASLT_LIBRARY"] = "c", ["KERNEL_CACHE"] = "d" })
            .AddCommandLine(["--pruning:pruneratio0=0.5"]).Build();
        var e = Assert.Throws<InvalidSettingException>(() => PruneJobOptions.FromConfiguration(config, dir));
        Assert.That(e!.Message, Does.Contain("pruning:pruneratio0: unknown key (did you mean Pruning:PruneRatio?)"));
        Assert.That(e.Message, Does.Not.Contain("LIBRARY").And.Not.Contain("KERNEL_CACHE"));
    }

    [Test]
    public void EnvironmentVariablesOverrideTheFileAndArgumentsOverrideBoth()
    {
        var (dir, configPath) = Setup();
        Environment.SetEnvironmentVariable("DISPNATIVE_Training__Steps", "11");
        try
        {
            var config = new ConfigurationBuilder().AddJsonFile(configPath).AddEnvironmentVariables("DISPNATIVE_").Build();
            Assert.That(PruneJobOptions.FromConfiguration(config, dir).Training.Steps, Is.EqualTo(11));
            config = new ConfigurationBuilder().AddJsonFile(configPath).AddEnvironmentVariables("DISPNATIVE_").AddCommandLine(["--Training:Steps=12"]).Build();
            Assert.That(PruneJobOptions.FromConfiguration(config, dir).Training.Steps, Is.EqualTo(12));
        }
        finally { Environment.SetEnvironmentVariable("DISPNATIVE_Training__Steps", null); }
    }

    [Test]
    public void MissingRequiredKeysAreAllListed()
    {
        var config = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>()).Build();
        var e = Assert.Throws<InvalidSettingException>(() => PruneJobOptions.FromConfiguration(config, "."));
        foreach (var key in new[] { "Model:Path: required", "Calibration:Files: at least one file", "Pruning:PruneRatio: required", "Evaluation:Files: at least one file", "Output:Directory: required" })
            Assert.That(e!.Message, Does.Contain(key));
    }

    [Test]
    public void AMalformedConfigFile_IsReportedWithTheParsersLine()
    {
        var dir = TestAssets.TempDir();
        var path = Path.Combine(dir, "prune.json");
        File.WriteAllText(path, "{\n  \"Model\": { \"Path\": \"m\" \n  \"Output\": {}\n}");
        var (code, _, err) = Cli("run", path);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.StartWith($"error: {path}: Failed to load configuration").And.Contain("LineNumber: 2"));
        Assert.That(err, Does.Not.Contain("   at "));
    }

    [Test]
    public void TheEmbeddedDefaultExampleRunsOnAFreshCheckout()
    {
        // The README's main job, shortened: the built-in model is built (or taken from the cache) by the engine itself.
        string example = Path.Combine(TestAssets.RepoRoot, "examples", "prune.json");
        var outDir = Path.Combine(TestAssets.TempDir(), "run");
        var (code, stdout, err) = Cli("run", example, $"--Output:Directory={outDir}", "--Training:Steps=20", "--Evaluation:MaxBlocks=8");
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(stdout, Does.Match(@"dense perplexity:\s+\d+\.\d{4}").And.Match(@"pruned perplexity:\s+\d+\.\d{4}"));
        using var tiny = DispEngine.Load(TinyModel.Prefix, new DispEngineOptions { Device = "cpu" });   // as the eval below
        double ppl = tiny.Perplexity(File.ReadAllText(TinyModel.Resolve(TinyModel.Prefix + "/evaluation.txt")), 256, 8).Perplexity;
        Assert.That(ppl, Is.LessThan(6), "the built-in model has learned its synthetic language (a byte-level uniform guess is 259)");

        // The other verbs take builtin: paths too.
        (code, stdout, err) = Cli("eval", "--model", TinyModel.Prefix, "--text", TinyModel.Prefix + "/evaluation.txt", "--block-size", "256", "--max-blocks", "8", "--device", "cpu");
        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(stdout, Does.Contain($"perplexity: {ppl:F4}"));
    }

    /// <summary>Float tensors of the safetensors files in <paramref name="modelDir"/>: all of them, and the q/k/v/o and MLP
    /// projections (with their biases) that DISP-LLM prunes. The index tensors (I32) are not parameters.</summary>
    private static (long Total, long Prunable) CountSavedParameters(string modelDir)
    {
        long total = 0, prunable = 0;
        foreach (var path in Directory.GetFiles(modelDir, "*.safetensors"))
        {
            using var file = SafeTensorsFile.Open(path);
            foreach (var t in file.Tensors.Where(t => t.DType.IsFloat()))
            {
                total += t.ElementCount;
                if (t.Name.Contains("_proj.")) prunable += t.ElementCount;
            }
        }
        return (total, prunable);
    }

    /// <summary>With Output:Overwrite the earlier run's outputs go before the new run starts (an interrupted new run leaves
    /// none of them behind to be taken for its own), while files the run did not make stay.</summary>
    [Test]
    public void Overwrite_RemovesTheEarlierRunsOutputsOnly()
    {
        var (dir, configPath) = Setup(c => c["Training"]!["Steps"] = 2);
        Assert.That(Cli("run", configPath).Code, Is.Zero);
        var outDir = Path.Combine(dir, "out");
        File.WriteAllText(Path.Combine(outDir, "notes.txt"), "mine");
        var options = PruneJobOptions.FromConfiguration(new ConfigurationBuilder().AddJsonFile(configPath)
            .AddInMemoryCollection(new Dictionary<string, string?> { ["Output:Overwrite"] = "true", ["Training:CheckpointEvery"] = "100" }).Build(), dir);
        using var cts = new CancellationTokenSource();
        Assert.Throws<OperationCanceledException>(() => PruneJob.Run(options, new SyncProgress<JobProgress>(p =>
        {
            if (p.Phase == "train hypernetwork" && p.Done >= 1) cts.Cancel();
        }), cancellationToken: cts.Token));
        Assert.That(Directory.GetFileSystemEntries(outDir).Select(Path.GetFileName).Order(),
            Is.EqualTo(new[] { "checkpoint.safetensors", "notes.txt", "run.json", "train_log.jsonl" }));
        Assert.That(File.ReadAllText(Path.Combine(outDir, "notes.txt")), Is.EqualTo("mine"));
        Assert.That(HypernetworkTrainer.ReadLog(Path.Combine(outDir, "train_log.jsonl")).Select(e => e.Step), Is.EqualTo(new[] { 1 }));
    }

    /// <summary><see cref="Setup"/> with the model moved to <c>out/model</c>, where the run writes its pruned model.</summary>
    private static (string Dir, string ConfigPath, string OutDir) SetupWithTheModelInTheOutputDirectory()
    {
        var (dir, configPath) = Setup();
        var outDir = Path.Combine(dir, "out");
        Directory.CreateDirectory(outDir);
        Directory.Move(Path.Combine(dir, "model"), Path.Combine(outDir, "model"));
        return (dir, configPath, outDir);
    }

    /// <summary>An input that lies where the run writes (its model/ folder, its log) would be deleted or overwritten while
    /// it is read: refused before anything is touched.</summary>
    [Test]
    public void AnInputWhereTheRunWrites_IsRefused_AndKept()
    {
        var (dir, configPath, outDir) = SetupWithTheModelInTheOutputDirectory();
        File.Copy(Path.Combine(dir, "eval.txt"), Path.Combine(outDir, "train_log.jsonl"));
        var (code, _, err) = Cli("run", configPath, "--Model:Path=out/model", "--Evaluation:Files:0=out/train_log.jsonl", "--Output:Overwrite=true");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(err, Does.Contain($"Model:Path: {Path.Combine(outDir, "model")} is where the run writes its model; move it or choose another Output:Directory"));
        Assert.That(err, Does.Contain($"Evaluation:Files: {Path.Combine(outDir, "train_log.jsonl")} is where the run writes its train_log.jsonl"));
        Assert.That(File.Exists(Path.Combine(outDir, "model", "config.json")) && File.Exists(Path.Combine(outDir, "train_log.jsonl")));
        Assert.That(PruneJob.ProducedEntryHolding(outDir, Path.Combine(outDir, "model", "tokenizer.json")), Is.EqualTo("model"));
        Assert.That(PruneJob.ProducedEntryHolding(outDir, Path.Combine(outDir, "models")), Is.Null);
        Assert.That(PruneJob.ProducedEntryHolding(outDir, outDir), Is.Null);
    }

    /// <summary>Options a service makes in code get the configuration file's checks in <see cref="PruneJob.Run"/>: every
    /// problem with its key, before anything is touched (here: a model where the run writes, under Overwrite).</summary>
    [Test]
    public void OptionsMadeInCode_AreCheckedAsAConfigurationFilesAre()
    {
        var (dir, _, outDir) = SetupWithTheModelInTheOutputDirectory();
        var options = new PruneJobOptions
        {
            ModelPath = Path.Combine(outDir, "model"), Device = "gpu", CalibrationFiles = [Path.Combine(dir, "missing.txt")], CalibrationBlockSize = 1,
            Training = new TrainingOptions { PruneRatio = 1.5, BatchSize = 3 }, CalibrationMaxBlocks = 2,
            EvaluationFiles = [], EvaluationBlockSize = 8, OutputDirectory = outDir, Overwrite = true,
        };
        var message = Assert.Throws<InvalidSettingException>(() => DispEngine.Prune(options))!.Message;
        Assert.That(message, Is.EqualTo("invalid options:\n  " + string.Join("\n  ",
            "Model:Device: 'gpu' is not one of auto | cpu | cuda",
            $"Calibration:Files: file not found: {Path.Combine(dir, "missing.txt")}",
            "Calibration:BlockSize: must be at least 2 (got 1)",
            "Training: prune ratio must be in (0, 1) (got 1.5)",
            "Training:BatchSize: 3 exceeds Calibration:MaxBlocks 2; a batch cannot repeat a block",
            "Evaluation:Files: at least one file is required",
            $"Model:Path: {Path.Combine(outDir, "model")} is where the run writes its model; move it or choose another Output:Directory")));
        Assert.That(File.Exists(Path.Combine(outDir, "model", "config.json")), "the model was not touched");
        Assert.That(Directory.GetFileSystemEntries(outDir).Select(Path.GetFileName), Is.EqualTo(new[] { "model" }));
        Assert.That((options with { ModelPath = outDir }).Problems(), Does.Contain("Output:Directory: must differ from Model:Path"));
        Assert.That((options with { ModelPath = " ", OutputDirectory = "" }).Problems(), Does.Contain("Model:Path: required").And.Contain("Output:Directory: required"));
    }

    /// <summary>Values are read trimmed, choices in any case, and a file list may be a single string.</summary>
    [Test]
    public void Values_AreTrimmed_ChoicesTakeAnyCase_AndAFileListMayBeOneString()
    {
        var (dir, _) = Setup();
        var config = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Model:Path"] = " model ", ["Model:Device"] = "CPU", ["Model:DType"] = " BF16", ["Calibration:Files"] = "cal.txt",
            ["Pruning:PruneRatio"] = " 0.3 ", ["Pruning:Mode"] = "Same", ["Training:Steps"] = " 7", ["Training:CheckpointLayers"] = "True",
            ["Evaluation:Files"] = "eval.txt", ["Output:Directory"] = "out ", ["Output:Overwrite"] = " true ",
        }).Build();
        var o = PruneJobOptions.FromConfiguration(config, dir);
        Assert.That((o.ModelPath, o.Device, o.DType, o.Training.PruneRatio, o.Training.Mode, o.Training.Steps, o.CheckpointLayers, o.OutputDirectory, o.Overwrite),
            Is.EqualTo((Path.Combine(dir, "model"), "cpu", (DType?)DType.BF16, 0.3, Engine.Disp.PruningMode.Same, 7, (bool?)true, Path.Combine(dir, "out"), true)));
        Assert.That((o.CalibrationFiles, o.EvaluationFiles), Is.EqualTo((new[] { Path.Combine(dir, "cal.txt") }, new[] { Path.Combine(dir, "eval.txt") })));
    }

    /// <summary>A list where one value belongs is one problem, however long the list, and not also a missing value.</summary>
    [Test]
    public void AListForAValue_IsOneProblem_NotAlsoAMissingValue()
    {
        var (dir, configPath) = Setup();
        var config = new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Model:Path:0"] = "model", ["Model:Path:1"] = "model", ["Calibration:Files:0"] = "cal.txt", ["Pruning:PruneRatio"] = "0.5",
            ["Evaluation:Files:0"] = "eval.txt", ["Output:Directory"] = "out",
        }).Build();
        var message = Assert.Throws<InvalidSettingException>(() => PruneJobOptions.FromConfiguration(config, dir))!.Message;
        Assert.That(message, Is.EqualTo("invalid configuration:\n  Model:Path: expected one value, not a list"));
    }

    /// <summary>The job's perplexity over several texts pools their NLL and token counts; its progress counts the blocks of
    /// all texts in order.</summary>
    [Test]
    public void Evaluate_PoolsTheTexts_AndReportsProgressAcrossThem()
    {
        var c = TestAssets.TinyConfig();
        var model = new LlamaModel(c, ModelWeights.Random(c, 5, 0.2f));
        var rng = new Rng(3);
        int[] a = Enumerable.Range(0, 20).Select(_ => rng.NextInt(c.VocabSize)).ToArray(), b = Enumerable.Range(0, 13).Select(_ => rng.NextInt(c.VocabSize)).ToArray();
        var options = new PruneJobOptions
        {
            ModelPath = "m", CalibrationFiles = ["c"], Training = new(), EvaluationFiles = ["a", "b"], OutputDirectory = "o",
            EvaluationBlockSize = 8, EvaluationMaxBlocks = 2,
        };
        var seen = new List<(double, double)>();
        var pooled = PruneJob.Evaluate("eval", model, [a, b], options, new SyncProgress<JobProgress>(p => seen.Add((p.Done, p.Total))), default);
        var (ra, rb) = (Perplexity.Evaluate(model, a, 8, 2), Perplexity.Evaluate(model, b, 8, 2));
        Assert.That((pooled.TotalNll, pooled.ScoredTokens, pooled.Blocks, pooled.TotalTokens),
            Is.EqualTo((ra.TotalNll + rb.TotalNll, ra.ScoredTokens + rb.ScoredTokens, 4, 33)));
        Assert.That(pooled.Perplexity, Is.EqualTo(Math.Exp((ra.TotalNll + rb.TotalNll) / (14 + 11))), "7 + 7 and 7 + 4 tokens scored");
        Assert.That(seen, Is.EqualTo(new[] { (1.0, 4.0), (2.0, 4.0), (3.0, 4.0), (4.0, 4.0) }));
    }

    /// <summary>The report's charts: x from the data's range to the plot's left and right edges, y from the given range
    /// (or the data's) to its bottom and top; one polyline and legend entry per series, text escaped.</summary>
    [Test]
    public void Chart_PlacesEveryPointOnTheAxes()
    {
        var svg = Report.Chart("a < b", "layer",
            [("kept", [(0, 0), (2, 0.5), (4, 1)]), ("r & s", [(0, 1), (4, 0)])], yMin: 0, yMax: 1);
        // The plot spans x 50..490 and y 280 (bottom) .. 30 (top) of the 640×320 picture.
        Assert.That(svg, Does.Contain("points=\"50,280 270,155 490,30\"").And.Contain("points=\"50,30 490,280\""));
        Assert.That(svg, Does.Contain(">a &lt; b</text>").And.Contain(">r &amp; s</text>").And.Contain(">layer</text>"));
        Assert.That(svg, Does.Contain("text-anchor=\"middle\">4</text>").And.Contain("text-anchor=\"end\">1</text>"));
        var auto = Report.Chart("t", "step", [("ce", [(10, 3), (20, 5), (30, 4)])], null, null);
        Assert.That(auto, Does.Contain("points=\"50,280 270,30 490,155\"").And.Contain("text-anchor=\"end\">3</text>").And.Contain("text-anchor=\"end\">5</text>"));
        // The widths chart: each site's kept width as a fraction of its full width (mlp_mid of the intermediate size).
        var dir = TestAssets.TempDir();
        var pruned = TestAssets.TinyConfig() with { Disp = new DispInfo(1, [[48, 24, 12, 40, 6], [48, 24, 12, 40, 6]], "disp", 0.5, null) };
        Report.Write(dir, new JsonObject(), pruned, []);
        var widths = File.ReadAllText(Path.Combine(dir, "widths.svg"));
        Assert.That(widths, Does.Contain("points=\"50,30 490,30\"").And.Contain("points=\"50,217.5 490,217.5\"").And.Contain("points=\"50,248.75 490,248.75\""));
        Assert.That(widths.Split("points=\"50,155 490,155\"").Length - 1, Is.EqualTo(2), "attn_out 24/48 and mlp_mid 40/80");
        var flat = Report.Chart("t", "step", [("r", [(1, 0.5), (2, 0.5)])], null, null);   // one y value: the axis spans it to y + 1
        Assert.That(flat, Does.Contain("points=\"50,280 490,280\"").And.Contain("text-anchor=\"end\">1.5</text>"));
    }
}
