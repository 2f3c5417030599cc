using DispNative.Engine;
using DispNative.Engine.Disp;
using DispNative.Engine.IO;
using DispNative.Engine.Inference;
using DispNative.Engine.Models;
using DispNative.Engine.Training;

namespace DispNative.Tests;

public class TrainingTests
{
    private static (ModelConfig Config, ModelWeights Weights, List<int[]> Blocks) TinySetup(int blocks = 12, int blockSize = 16)
    {
        var c = TestAssets.TinyConfig(vocab: 64);
        var w = ModelWeights.Random(c, 3, std: 0.2f);
        var rng = new Rng(4);
        var ids = Enumerable.Range(0, blocks * blockSize).Select(i => i % 5 == 0 ? 1 : 3 + rng.NextInt(60)).ToArray();
        return (c, w, Calibration.Blocks(ids, blockSize));
    }

    [Test]
    public void CpuMaskedModel_AddsScaledMaskGradients_SharedMasksSumTheirSites()
    {
        var (c, w, blocks) = TinySetup();
        var model = new CpuMaskedLanguageModel(c, w);
        var layout = new SiteLayout(c, PruningMode.Same);
        var rng = new Rng(9);
        var masks = layout.OutputWidths.Select(n => Enumerable.Range(0, n).Select(_ => (float)rng.NextDouble()).ToArray()).ToList();
        var once = masks.Select(m => new float[m.Length]).ToList();
        var twice = masks.Select(m => new float[m.Length]).ToList();
        double loss = model.LossAndMaskGradients(blocks[0], masks, layout.OutputOf, once, 1);
        // Two half-scaled calls add up to one full call; the loss does not depend on the scale.
        Assert.That(model.LossAndMaskGradients(blocks[0], masks, layout.OutputOf, twice, 0.5), Is.EqualTo(loss));
        model.LossAndMaskGradients(blocks[0], masks, layout.OutputOf, twice, 0.5);
        for (int o = 0; o < masks.Count; o++)
            Assert.That(twice[o], Is.EqualTo(once[o]).Within(1e-5f * once[o].Max(Math.Abs)), $"output {o}");
        // The tape path it wraps: the same loss with the masks as leaves.
        var tape = new Engine.Autograd.Tape<float>();
        var leaves = masks.Select(m => tape.Leaf(m, 1, m.Length)).ToArray();
        Assert.That(new MaskedLlama<float>(c, w).Loss(tape, blocks[0], (l, kind) => leaves[layout.OutputOf(l, kind)]).Scalar, Is.EqualTo((float)loss));
        Assert.That(once.All(g => g.Any(v => v != 0)), "every mask output gets a gradient");
    }

    /// <summary>Per-layer checkpointing recomputes each layer's forward in the backward: the same numbers, bit for bit,
    /// while the tape holds one layer's intermediates at a time instead of all six layers'.</summary>
    [Test]
    public void CheckpointedLayers_GiveTheSameLossAndMaskGradients_FromFewerBuffers()
    {
        var c = TestAssets.TinyConfig(vocab: 64) with { NumLayers = 6 };
        var w = ModelWeights.Random(c, 3, std: 0.2f);
        var layout = new SiteLayout(c, PruningMode.Disp);
        var rng = new Rng(6);
        var ids = Enumerable.Range(0, 48).Select(_ => 1 + rng.NextInt(63)).ToArray();
        var masks = layout.OutputWidths.Select(n => Enumerable.Range(0, n).Select(_ => (float)rng.NextDouble()).ToArray()).ToList();
        (float Loss, List<float[]> Grads, long Created) Run(bool checkpoint)
        {
            var pool = new Engine.Autograd.TapeBufferPool<float>();
            var tape = new Engine.Autograd.Tape<float>(pool);
            var grads = masks.Select(m => new float[m.Length]).ToList();
            var leaves = masks.Select((m, o) => tape.Leaf(m, 1, m.Length, grads[o])).ToArray();
            var loss = new MaskedLlama<float>(c, w) { CheckpointLayers = checkpoint }.Loss(tape, ids, (l, kind) => leaves[layout.OutputOf(l, kind)]);
            tape.Backward(loss);
            return (loss.Scalar, grads, pool.Created);
        }
        var kept = Run(false);
        var recomputed = Run(true);
        Assert.That(recomputed.Loss, Is.EqualTo(kept.Loss));
        for (int o = 0; o < masks.Count; o++) Assert.That(recomputed.Grads[o], Is.EqualTo(kept.Grads[o]), $"mask output {o}");
        Assert.That(recomputed.Created, Is.LessThan(kept.Created / 2), $"buffer values created: {recomputed.Created} checkpointed, {kept.Created} kept");

        // The wrapper picks checkpointing when told, or when a block's activations would not fit memory.
        Assert.That(new CpuMaskedLanguageModel(c, w, checkpointLayers: true).Checkpoints(48), Is.True);
        Assert.That(new CpuMaskedLanguageModel(c, w).Checkpoints(48), Is.False);
        Assert.That(new CpuMaskedLanguageModel(c, w).Checkpoints(int.MaxValue / 2), Is.True);
        var onGrads = masks.Select(m => new float[m.Length]).ToList();
        double on = new CpuMaskedLanguageModel(c, w, checkpointLayers: true).LossAndMaskGradients(ids, masks, layout.OutputOf, onGrads, 1);
        Assert.That((float)on, Is.EqualTo(kept.Loss));
        for (int o = 0; o < masks.Count; o++) Assert.That(onGrads[o], Is.EqualTo(kept.Grads[o]), $"mask output {o}, through the wrapper");
    }

    [Test]
    public void CpuMaskedModel_RecyclingItsTapeBuffers_MatchesFreshTapesBitForBit()
    {
        var (c, w, blocks) = TinySetup();
        var model = new CpuMaskedLanguageModel(c, w);   // reuses one step's buffers in the next
        var reference = new MaskedLlama<float>(c, w);
        var layout = new SiteLayout(c, PruningMode.Disp);
        var rng = new Rng(5);
        var masks = layout.OutputWidths.Select(n => Enumerable.Range(0, n).Select(_ => (float)rng.NextDouble()).ToArray()).ToList();
        for (int step = 0; step < 3; step++)
        {
            var recycled = masks.Select(m => new float[m.Length]).ToList();
            double loss = model.LossAndMaskGradients(blocks[step], masks, layout.OutputOf, recycled, 0.5);

            var tape = new Engine.Autograd.Tape<float>();
            var fresh = masks.Select(m => new float[m.Length]).ToList();
            var leaves = masks.Select((m, o) => tape.Leaf(m, 1, m.Length, fresh[o])).ToArray();
            var expected = reference.Loss(tape, blocks[step], (l, kind) => leaves[layout.OutputOf(l, kind)]);
            tape.Backward(tape.Affine(expected, 0.5, 0));

            Assert.That(loss, Is.EqualTo(expected.Scalar), $"step {step}");
            for (int o = 0; o < masks.Count; o++) Assert.That(recycled[o], Is.EqualTo(fresh[o]), $"step {step}, output {o}");
        }
    }

    [Test]
    public void ResumeReproducesTheUninterruptedRunExactly()
    {
        var (c, w, blocks) = TinySetup();
        var options = new TrainingOptions { Steps = 8, LogEvery = 1, CheckpointEvery = 3, Seed = 11, Lambda = 16 };
        var straightDir = TestAssets.TempDir();
        var straight = new HypernetworkTrainer(c, w, options);
        straight.Train(blocks, straightDir);

        var dir = TestAssets.TempDir();
        using var cts = new CancellationTokenSource();
        var first = new HypernetworkTrainer(c, w, options);
        Assert.Throws<OperationCanceledException>(() =>
            first.Train(blocks, dir, new SyncProgress<TrainLogEntry>(e => { if (e.Step == 5) cts.Cancel(); }), cts.Token));
        Assert.That(first.Step, Is.EqualTo(5));
        Assert.That(File.Exists(Path.Combine(dir, HypernetworkTrainer.CheckpointFile)), "cancelling saves a checkpoint");

        var resumed = new HypernetworkTrainer(c, w, options);
        var result = resumed.Train(blocks, dir);
        Assert.That(result.ResumedFrom, Is.EqualTo(5));
        for (int i = 0; i < straight.Network.Parameters.Count; i++)
            Assert.That(resumed.Network.Parameters[i].Value, Is.EqualTo(straight.Network.Parameters[i].Value), straight.Network.Parameters[i].Name);
        var a = HypernetworkTrainer.ReadLog(Path.Combine(straightDir, HypernetworkTrainer.LogFile));
        var b = HypernetworkTrainer.ReadLog(Path.Combine(dir, HypernetworkTrainer.LogFile));
        Assert.That(b.Select(e => (e.Step, e.CrossEntropy, e.Ratio)), Is.EqualTo(a.Select(e => (e.Step, e.CrossEntropy, e.Ratio))));
    }

    [Test]
    public void CosineScheduleDecaysTheLearningRate_AndClippingChangesTheRun()
    {
        var (c, w, blocks) = TinySetup();
        var cosine = new TrainingOptions { Steps = 4, LogEvery = 1, LearningRate = 0.01, CosineSchedule = true };
        var trainer = new HypernetworkTrainer(c, w, cosine);
        var log = trainer.Train(blocks, TestAssets.TempDir()).Log;
        // The rate of each update is that of the step it starts from: 0.01 · ½(1 + cos(π·s/4)) for s = 0..3.
        Assert.That(log.Select(e => e.LearningRate), Is.EqualTo(new[] { 0.01, 0.01 * 0.5 * (1 + Math.Sqrt(0.5)), 0.005, 0.01 * 0.5 * (1 - Math.Sqrt(0.5)) })
            .Within(1e-15));

        var plain = new HypernetworkTrainer(c, w, cosine with { CosineSchedule = false, ClipNorm = null });
        plain.Train(blocks, TestAssets.TempDir());
        var clipped = new HypernetworkTrainer(c, w, cosine with { CosineSchedule = false, ClipNorm = 1e-6 });
        var clippedLog = clipped.Train(blocks, TestAssets.TempDir()).Log;
        Assert.That(clippedLog.All(e => e.GradNorm > 1e-6), "the logged norm is the one before clipping");
        Assert.That(clipped.Network.Parameters[0].Value, Is.Not.EqualTo(plain.Network.Parameters[0].Value),
            "gradients scaled to norm 1e-6 change Adam's steps (through its epsilon)");
    }

    [Test]
    public void AnOutputDirectoryThatIsAFile_IsAClearError()
    {
        var (c, w, blocks) = TinySetup();
        var file = Path.Combine(TestAssets.TempDir(), "taken");
        File.WriteAllText(file, "mine");
        var e = Assert.Throws<InvalidSettingException>(() => new HypernetworkTrainer(c, w, new TrainingOptions { Steps = 1 }).Train(blocks, file));
        Assert.That(e!.Message, Is.EqualTo($"the output directory {file} is a file"));
        Assert.That(File.ReadAllText(file), Is.EqualTo("mine"));
    }

    /// <summary>Every option that changes the trajectory must match for a checkpoint to resume; the step count does not
    /// (except under the cosine schedule, whose learning rates it sets), nor do the log and checkpoint intervals.</summary>
    [TestCase("PruneRatio")]
    [TestCase("Mode")]
    [TestCase("Lambda")]
    [TestCase("BatchSize")]
    [TestCase("LearningRate")]
    [TestCase("WeightDecay")]
    [TestCase("Seed")]
    [TestCase("CosineSchedule")]
    [TestCase("StepsUnderCosine")]
    [TestCase("ClipNorm")]
    [TestCase("CalibrationToken")]
    [TestCase("CalibrationBlockCount")]
    public void ResumeRefusesACheckpointFromOtherTrainingSettings(string option)
    {
        var (c, w, blocks) = TinySetup();
        var first = new TrainingOptions { Steps = 2, PruneRatio = 0.5, CosineSchedule = option == "StepsUnderCosine" };
        var next = first with { Steps = 4 };
        next = option switch
        {
            "PruneRatio" => next with { PruneRatio = 0.3 },
            "Mode" => next with { Mode = PruningMode.Same },
            "Lambda" => next with { Lambda = 16 },
            "BatchSize" => next with { BatchSize = 2 },
            "LearningRate" => next with { LearningRate = 2e-3 },
            "WeightDecay" => next with { WeightDecay = 0 },
            "Seed" => next with { Seed = 1 },
            "CosineSchedule" => next with { CosineSchedule = true },
            "ClipNorm" => next with { ClipNorm = 1.0 },
            _ => next,
        };
        var nextBlocks = blocks.Select(b => b.ToArray()).ToList();
        if (option == "CalibrationToken") nextBlocks[7][9] ^= 1;
        if (option == "CalibrationBlockCount") nextBlocks.RemoveAt(11);
        var dir = TestAssets.TempDir();
        new HypernetworkTrainer(c, w, first).Train(blocks, dir);
        var e = Assert.Throws<InvalidSettingException>(() => new HypernetworkTrainer(c, w, next).Train(nextBlocks, dir));
        Assert.That(e!.Message, Does.Contain("different model, calibration data or training settings"));
    }

    [Test]
    public void ResumeTakesMoreStepsAndOtherIntervals_OrRefusesACorruptCheckpoint()
    {
        var (c, w, blocks) = TinySetup();
        var dir = TestAssets.TempDir();
        var options = new TrainingOptions { Steps = 2, PruneRatio = 0.5 };
        new HypernetworkTrainer(c, w, options).Train(blocks, dir);
        var resumed = new HypernetworkTrainer(c, w, options with { Steps = 3, LogEvery = 1, CheckpointEvery = 1 }).Train(blocks, dir);
        Assert.That((resumed.ResumedFrom, resumed.Steps), Is.EqualTo((2, 3)));

        string ckpt = Path.Combine(dir, HypernetworkTrainer.CheckpointFile);
        File.WriteAllBytes(ckpt, File.ReadAllBytes(ckpt)[..500]);
        var corrupt = Assert.Throws<ModelFormatException>(() =>
            new HypernetworkTrainer(c, w, options with { Steps = 4 }).Train(blocks, dir));
        Assert.That(corrupt!.Message, Does.StartWith($"{ckpt}: ").And.EndWith("; to train from step 0 instead of resuming, delete the checkpoint"));
    }

    /// <summary>A process killed after logging steps past its last checkpoint (no Ctrl+C, so no checkpoint of its own)
    /// resumes from that checkpoint: the log lines after it are dropped and written again, not repeated.</summary>
    [Test]
    public void AKilledRun_ResumesFromItsLastCheckpoint_WithoutRepeatingLogLines()
    {
        var (c, w, blocks) = TinySetup();
        var dir = TestAssets.TempDir();
        var options = new TrainingOptions { Steps = 2, LogEvery = 1 };
        new HypernetworkTrainer(c, w, options).Train(blocks, dir);
        string ckpt = Path.Combine(dir, HypernetworkTrainer.CheckpointFile), log = Path.Combine(dir, HypernetworkTrainer.LogFile);
        var atStep2 = File.ReadAllBytes(ckpt);
        new HypernetworkTrainer(c, w, options with { Steps = 4 }).Train(blocks, dir);
        var uninterrupted = HypernetworkTrainer.ReadLog(log);
        File.WriteAllBytes(ckpt, atStep2);     // as if killed after logging step 4, before its checkpoint

        var resumed = new HypernetworkTrainer(c, w, options with { Steps = 4 }).Train(blocks, dir);
        Assert.That(resumed.ResumedFrom, Is.EqualTo(2));
        var again = HypernetworkTrainer.ReadLog(log);
        Assert.That(again.Select(e => e.Step), Is.EqualTo(new[] { 1, 2, 3, 4 }));
        Assert.That(again.Select(e => (e.CrossEntropy, e.Ratio)), Is.EqualTo(uninterrupted.Select(e => (e.CrossEntropy, e.Ratio))));
    }

    [TestCase("step", null, "missing field 'step'")]
    [TestCase("step", "\"7\"", "field 'step' must be an integer")]
    [TestCase("step", "-1", "field 'step' is -1")]
    [TestCase("rng", "[\"1\",\"2\",\"3\"]", "field 'rng' must be the 4 words")]
    [TestCase("rng", "[\"1\",\"2\",\"3\",\"xyz\"]", "field 'rng' must be the 4 words")]
    [TestCase("rng", "[1,2,3,4]", "field 'rng' must be a string")]
    [TestCase("step", "DUPLICATE", "not a DispNative training checkpoint")]
    public void ResumeRefusesACheckpointWithCorruptMetadata(string key, string? json, string expected)
    {
        var (c, w, blocks) = TinySetup();
        var dir = TestAssets.TempDir();
        var options = new TrainingOptions { Steps = 2, PruneRatio = 0.5 };
        new HypernetworkTrainer(c, w, options).Train(blocks, dir);
        string ckpt = Path.Combine(dir, HypernetworkTrainer.CheckpointFile);
        var bytes = File.ReadAllBytes(ckpt);
        int headerLength = (int)BitConverter.ToUInt64(bytes, 0);
        var header = System.Text.Json.Nodes.JsonNode.Parse(bytes.AsSpan(8, headerLength))!.AsObject();
        var metadata = header["__metadata__"]!.AsObject();
        var meta = System.Text.Json.Nodes.JsonNode.Parse(metadata["dispnative-checkpoint"]!.GetValue<string>())!.AsObject();
        string metaText;
        if (json == "DUPLICATE") metaText = meta.ToJsonString()[..^1] + $",\"{key}\":{meta[key]!.ToJsonString()}}}";
        else
        {
            if (json == null) meta.Remove(key); else meta[key] = System.Text.Json.Nodes.JsonNode.Parse(json);
            metaText = meta.ToJsonString();
        }
        metadata["dispnative-checkpoint"] = metaText;
        var newHeader = System.Text.Encoding.UTF8.GetBytes(header.ToJsonString());
        File.WriteAllBytes(ckpt, [.. BitConverter.GetBytes((ulong)newHeader.Length), .. newHeader, .. bytes.AsSpan(8 + headerLength)]);
        var e = Assert.Throws<ModelFormatException>(() => new HypernetworkTrainer(c, w, options with { Steps = 4 }).Train(blocks, dir))!;
        Assert.That(e.Message, Does.StartWith($"{ckpt}: ").And.Contain(expected).And.EndWith("; to train from step 0 instead of resuming, delete the checkpoint"));
    }

    [TestCase(PruningMode.Disp)]
    [TestCase(PruningMode.Same)]
    public void RegularizerDrivesTheKeptRatioToTheTarget(PruningMode mode)
    {
        var (c, w, blocks) = TinySetup();
        var options = new TrainingOptions { Steps = 200, PruneRatio = 0.5, Mode = mode, LearningRate = 1e-2, LogEvery = 1, CheckpointEvery = 1000 };
        var trainer = new HypernetworkTrainer(c, w, options);
        var log = trainer.Train(blocks, TestAssets.TempDir()).Log;
        Assert.That(log[0].Ratio, Is.GreaterThan(0.9), "masks start nearly all-on (offset 3)");
        double lastRatios = log.TakeLast(20).Average(e => e.Ratio);
        Assert.That(lastRatios, Is.EqualTo(0.5).Within(0.05));
    }

    [Test]
    public void GradientsReachTheHypernetworkFromBothLosses()
    {
        var (c, w, blocks) = TinySetup();
        var trainer = new HypernetworkTrainer(c, w, new TrainingOptions { Seed = 2 });
        var step = trainer.ComputeGradients([blocks[0]]);
        Assert.That(step.CrossEntropy, Is.GreaterThan(0));
        Assert.That(step.RegLoss, Is.EqualTo(6 * Math.Log(step.Ratio / 0.5)).Within(1e-5));
        foreach (var p in trainer.Network.Parameters)
            Assert.That(p.Grad.Any(g => g != 0), $"{p.Name} receives a gradient");
    }

    /// <summary>The training loss of a block is the perplexity protocol's mean NLL over its positions 0..n-2 (the last
    /// position has no next token); a block of one token has none and is refused.</summary>
    [Test]
    public void MaskedLoss_IsTheMeanNextTokenNll_OfTheBlock()
    {
        var (c, w, blocks) = TinySetup();
        var tape = new Engine.Autograd.Tape<double>();
        var masked = new MaskedLlama<double>(c, w);
        double loss = masked.Loss(tape, blocks[0], (_, _) => null).Scalar;
        var dense = new LlamaModel(c, w);
        double nll = Engine.Evaluation.Perplexity.BlockNll(dense, blocks[0]);
        Assert.That(loss, Is.EqualTo(nll / (blocks[0].Length - 1)).Within(1e-5 * loss));
        Assert.That(Assert.Throws<InvalidSettingException>(() => masked.Loss(tape, [3], (_, _) => null))!.Message,
            Is.EqualTo("a training block needs at least 2 tokens"));
    }

    /// <summary>A batch's cross-entropy and mask gradients are the means over its blocks: two blocks in one step give the
    /// average of the two single-block steps (the same noise: each trainer's first draw).</summary>
    [Test]
    public void ABatchAveragesItsBlocks()
    {
        var (c, w, blocks) = TinySetup();
        var options = new TrainingOptions { Seed = 3, BatchSize = 2 };
        HypernetworkTrainer Trainer() => new(c, w, options);
        var both = Trainer();
        var stepBoth = both.ComputeGradients([blocks[0], blocks[1]]);
        var (first, second) = (Trainer(), Trainer());
        var (step0, step1) = (first.ComputeGradients([blocks[0]]), second.ComputeGradients([blocks[1]]));
        Assert.That(stepBoth.CrossEntropy, Is.EqualTo((step0.CrossEntropy + step1.CrossEntropy) / 2).Within(1e-6));
        Assert.That(step0.CrossEntropy, Is.Not.EqualTo(step1.CrossEntropy).Within(1e-3), "the blocks differ");
        for (int i = 0; i < both.Network.Parameters.Count; i++)
        {
            var (g, g0, g1) = (both.Network.Parameters[i].Grad, first.Network.Parameters[i].Grad, second.Network.Parameters[i].Grad);
            double scale = g.Max(v => Math.Abs(v));
            for (int j = 0; j < g.Length; j++)
                Assert.That(g[j], Is.EqualTo((g0[j] + g1[j]) / 2).Within(1e-4 * scale), $"{both.Network.Parameters[i].Name}[{j}]");
        }
    }

    /// <summary>The log has a line every LogEvery steps, at the last step, and at the first step of every (resumed) run;
    /// each line's tokens/s counts the tokens since the line before; the saved hypernetwork records the steps taken.</summary>
    [Test]
    public void LogLines_AtTheIntervals_TheLastStep_AndTheFirstStepOfEachRun()
    {
        var (c, w, blocks) = TinySetup(blockSize: 64);
        var dir = TestAssets.TempDir();
        var options = new TrainingOptions { Steps = 3, LogEvery = 4, CheckpointEvery = 100 };
        new HypernetworkTrainer(c, w, options).Train(blocks, dir);
        var result = new HypernetworkTrainer(c, w, options with { Steps = 13 }).Train(blocks, dir);
        Assert.That(result.Log.Select(e => e.Step), Is.EqualTo(new[] { 1, 3, 4, 8, 12, 13 }));
        Assert.That(HypernetworkTrainer.ReadLog(Path.Combine(dir, HypernetworkTrainer.LogFile)).Select(e => e.Step), Is.EqualTo(new[] { 1, 3, 4, 8, 12, 13 }));
        Assert.That(Hypernetwork<float>.ReadMetadata(result.HypernetworkPath)["steps"]!.GetValue<int>(), Is.EqualTo(13));

        // Tokens in each interval of the resumed run (its lines at 4, 8, 12, 13): 1, 4, 4 and 1 blocks of 64.
        var resumed = result.Log.Skip(2).ToList();
        int[] tokens = [64, 256, 256, 64];
        for (int i = 1; i < resumed.Count; i++)
        {
            double seconds = resumed[i].Seconds - resumed[i - 1].Seconds;
            Assert.That(resumed[i].TokensPerSecond * seconds / tokens[i], Is.InRange(0.6, 1.4), $"step {resumed[i].Step}");
        }
    }

    [Test]
    public void AdamWMatchesTheReferenceUpdate()
    {
        var p = new Parameter<float>("p", 1, 2);
        p.Value[0] = 1f; p.Value[1] = -2f;
        var opt = new AdamW([p]) { WeightDecay = 0.05 };
        p.Grad[0] = 0.5f; p.Grad[1] = -1f;
        opt.Step(1e-3);
        p.Grad[0] = 0.25f; p.Grad[1] = 2f;
        opt.Step(1e-3);
        // torch.optim.AdamW(lr=1e-3, weight_decay=0.05), two steps with these gradients, computed by hand:
        double[] expected = new double[2];
        double[] p0 = [1, -2], g1 = [0.5, -1], g2 = [0.25, 2];
        for (int i = 0; i < 2; i++)
        {
            double w = p0[i], m = 0, v = 0;
            foreach (var (g, t) in new[] { (g1[i], 1), (g2[i], 2) })
            {
                w *= 1 - 1e-3 * 0.05;
                m = 0.9 * m + 0.1 * g; v = 0.999 * v + 0.001 * g * g;
                w -= 1e-3 * (m / (1 - Math.Pow(0.9, t))) / (Math.Sqrt(v / (1 - Math.Pow(0.999, t))) + 1e-8);
            }
            expected[i] = w;
        }
        Assert.That(p.Value[0], Is.EqualTo(expected[0]).Within(1e-6));
        Assert.That(p.Value[1], Is.EqualTo(expected[1]).Within(1e-6));
    }

    [Test]
    public void EmptyOutputPaths_AreClearErrors()
    {
        var (c, w, blocks) = TinySetup();
        Assert.That(Assert.Throws<InvalidSettingException>(() => new HypernetworkTrainer(c, w, new TrainingOptions { Steps = 1 }).Train(blocks, " "))!.Message,
            Is.EqualTo("training directory: the path is empty"));
        var layout = new SiteLayout(c, PruningMode.Disp);
        var plan = PruningPlan.FromMasks(layout, layout.OutputWidths.Select(n => Enumerable.Repeat(true, n).ToArray()).ToList());
        Assert.That(Assert.Throws<InvalidSettingException>(() => Pruner.Save("", Pruner.PrunedConfig(c, plan, "disp", 0.5, null), w, DType.F32, []))!.Message,
            Is.EqualTo("pruned model directory: the path is empty"));
        Assert.That(FilePaths.OutputProblem("", "--json"), Is.EqualTo("--json: the path is empty"));
    }

    [TestCase(float.NaN)]
    [TestCase(float.PositiveInfinity)]
    public void AdamW_ANonFiniteGradient_UpdatesNothing(float bad)
    {
        var p = new Parameter<float>("p", 1, 3);
        p.Value[0] = 1f; p.Value[1] = -2f; p.Value[2] = 3f;
        var opt = new AdamW([p]) { WeightDecay = 0.05 };
        p.Grad[0] = 0.5f; p.Grad[1] = bad; p.Grad[2] = 1f;
        Assert.That(opt.Step(1e-3), Is.EqualTo(float.IsNaN(bad) ? double.NaN : double.PositiveInfinity));
        Assert.That((p.Value, opt.Steps), Is.EqualTo((new[] { 1f, -2f, 3f }, 0)));
        // The moments were not touched either: the next step is the first one.
        p.Grad[1] = -1f;
        opt.Step(1e-3);
        var fresh = new Parameter<float>("p", 1, 3);
        fresh.Value[0] = 1f; fresh.Value[1] = -2f; fresh.Value[2] = 3f;
        fresh.Grad[0] = 0.5f; fresh.Grad[1] = -1f; fresh.Grad[2] = 1f;
        new AdamW([fresh]) { WeightDecay = 0.05 }.Step(1e-3);
        Assert.That(p.Value, Is.EqualTo(fresh.Value));
    }

    /// <summary>A model whose logits overflow (a final norm near float's range) stops the run at its first step with the
    /// reason, before NaNs reach the hypernetwork, a checkpoint or the log; a checkpoint written earlier stays.</summary>
    [Test]
    public void ARunWhoseLossIsNotANumber_StopsWithTheReason_AndKeepsItsLastCheckpoint()
    {
        var (c, w, blocks) = TinySetup();
        var options = new TrainingOptions { Steps = 3, LogEvery = 1, CheckpointEvery = 2 };
        var dir = TestAssets.TempDir();
        var huge = ModelWeights.Random(c, 3, std: 0.2f);
        Array.Fill(huge.FinalNorm, 3e38f);
        var trainer = new HypernetworkTrainer(c, huge, options);
        var initial = trainer.Network.Parameters.Select(p => (float[])p.Value.Clone()).ToList();
        var e = Assert.Throws<DispNativeException>(() => trainer.Train(blocks, dir));
        Assert.That(e!.Message, Does.StartWith("training diverged at step 1: the cross-entropy is NaN; the hypernetwork was not updated and no checkpoint was written."));
        Assert.That(trainer.Network.Parameters.Select(p => p.Value), Is.EqualTo(initial));
        Assert.That(Directory.GetFiles(dir).Select(Path.GetFileName), Is.EqualTo(new[] { HypernetworkTrainer.LogFile }));
        Assert.That(HypernetworkTrainer.ReadLog(Path.Combine(dir, HypernetworkTrainer.LogFile)), Is.Empty);

        // Resumed from step 2 with the weights gone bad: step 3 stops, the checkpoint of step 2 is still there.
        new HypernetworkTrainer(c, w, options with { Steps = 2 }).Train(blocks, dir);
        string ckpt = Path.Combine(dir, HypernetworkTrainer.CheckpointFile);
        var atStep2 = File.ReadAllBytes(ckpt);
        e = Assert.Throws<DispNativeException>(() => new HypernetworkTrainer(c, huge, options).Train(blocks, dir));
        Assert.That(e!.Message, Does.StartWith("training diverged at step 3: the cross-entropy is NaN; the hypernetwork was not updated (its last checkpoint is step 2)."));
        Assert.That(File.ReadAllBytes(ckpt), Is.EqualTo(atStep2));
        Assert.That(HypernetworkTrainer.ReadLog(Path.Combine(dir, HypernetworkTrainer.LogFile)).Select(l => l.Step), Is.EqualTo(new[] { 1, 2 }));
    }

    /// <summary>The log ends at a line no run writes, as at a line cut short: the report and a resumed run read no
    /// infinities (which the log's writer refuses) and no steps out of order.</summary>
    [TestCase("\"cross_entropy\":4", "\"cross_entropy\":1e999")]
    [TestCase("\"seconds\":2", "\"seconds\":-1e999")]
    [TestCase("\"step\":2,", "\"step\":1,")]
    public void ReadLog_StopsAtALineNoRunWrites(string field, string damaged)
    {
        string Line(int step) => $"{{\"step\":{step},\"cross_entropy\":4,\"reg_loss\":0.1,\"ratio\":0.9,\"learning_rate\":0.001," +
                                 $"\"grad_norm\":1,\"tokens_per_second\":100,\"seconds\":{step}}}";
        var path = Path.Combine(TestAssets.TempDir(), "log.jsonl");
        File.WriteAllLines(path, [Line(1), Line(2), Line(3)]);
        Assert.That(HypernetworkTrainer.ReadLog(path).Select(e => e.Step), Is.EqualTo(new[] { 1, 2, 3 }));
        Assert.That(Line(2), Does.Contain(field));
        File.WriteAllLines(path, [Line(1), Line(2).Replace(field, damaged), Line(3)]);
        Assert.That(HypernetworkTrainer.ReadLog(path).Select(e => e.Step), Is.EqualTo(new[] { 1 }));
    }

    [Test]
    public void AdamW_VectorUpdate_EqualsTheScalarUpdate_BitForBit()
    {
        // 8-wide vector blocks and a scalar tail; clipping scales the gradients.
        const int n = 1003;
        var rng = new Rng(3);
        var p = new Parameter<float>("p", 1, n);
        for (int j = 0; j < n; j++) p.Value[j] = rng.NextGaussian();
        var opt = new AdamW([p]) { WeightDecay = 0.05, ClipNorm = 1.0 };
        float[] w = (float[])p.Value.Clone(), m = new float[n], v = new float[n];
        for (int t = 1; t <= 5; t++)
        {
            for (int j = 0; j < n; j++) p.Grad[j] = rng.NextGaussian();
            double sq = 0;
            foreach (var g in p.Grad) sq += (double)g * g;
            double scale = Math.Sqrt(sq) > 1.0 ? 1.0 / Math.Sqrt(sq) : 1, lr = 1e-3 * t;
            double bc1 = 1 - Math.Pow(0.9, t), bc2 = 1 - Math.Pow(0.999, t);
            for (int j = 0; j < n; j++)
            {
                double g = p.Grad[j] * scale;
                m[j] = (float)(0.9 * m[j] + (1 - 0.9) * g);
                v[j] = (float)(0.999 * v[j] + (1 - 0.999) * g * g);
                w[j] = (float)(w[j] * (1 - lr * 0.05) - lr * (m[j] / bc1) / (Math.Sqrt(v[j] / bc2) + 1e-8));
            }
            opt.Step(lr);
            Assert.That(p.Value, Is.EqualTo(w), $"step {t}");
        }
    }

    [Test]
    public void HypernetworkRoundTripsAndRejectsAnotherModel()
    {
        var net = new Hypernetwork<float>([48, 48, 80], seed: 5);
        var path = Path.Combine(TestAssets.TempDir(), "h.safetensors");
        net.Save(path);
        var back = Hypernetwork<float>.Load(path, [48, 48, 80]);
        Assert.That(back.Inputs, Is.EqualTo(net.Inputs));
        for (int i = 0; i < net.Parameters.Count; i++) Assert.That(back.Parameters[i].Value, Is.EqualTo(net.Parameters[i].Value));
        var e = Assert.Throws<ModelFormatException>(() => Hypernetwork<float>.Load(path, [64, 64, 128]));
        Assert.That(e!.Message, Does.Contain("this model and mode need 3 outputs"));

        void WithMetadata(string json, string message)
        {
            var bad = Path.Combine(TestAssets.TempDir(), "bad.safetensors");
            SafeTensorsWriter.Write(bad, [TensorData.FromFloat("inputs", [0f], [1])], new Dictionary<string, string> { [Hypernetwork<float>.FormatName] = json });
            Assert.That(Assert.Throws<ModelFormatException>(() => Hypernetwork<float>.Load(bad, [48]))!.Message, Does.StartWith($"{bad}: {message}"));
        }
        WithMetadata("{\"output_widths\": [48, \"x\"]}", "field 'output_widths' must be an integer (got \"x\")");
        WithMetadata("[1]", "hypernetwork metadata is not a JSON object");
        WithMetadata("{", "hypernetwork metadata is not valid JSON");
    }

    [Test]
    public void CalibrationSplitsDocumentsAndAddsBosToEach()
    {
        var dir = TestAssets.TempDir();
        var txt = Path.Combine(dir, "c.txt");
        File.WriteAllText(txt, "first doc\nline two\n\n\nsecond doc\n  \nthird\n");
        Assert.That(Calibration.ReadDocuments(txt), Is.EqualTo(new[] { "first doc\nline two", "second doc", "third" }));
        var crlf = Path.Combine(dir, "crlf.txt");
        File.WriteAllText(crlf, "first doc\r\nline two\r\n\r\n\r\nsecond doc\r\n  \r\nthird\r\n");
        Assert.That(Calibration.ReadDocuments(crlf), Is.EqualTo(Calibration.ReadDocuments(txt)), "Windows line ends");
        var jsonl = Path.Combine(dir, "c.jsonl");
        File.WriteAllText(jsonl, "{\"text\": \"a b\"}\n\n{\"text\": \"c\", \"id\": 3}\n");
        Assert.That(Calibration.ReadDocuments(jsonl), Is.EqualTo(new[] { "a b", "c" }));
        var upper = Path.Combine(dir, "C.JSONL");
        File.WriteAllText(upper, "{\"text\": \"x\"}\n{\"text\": \" \\n\"}\n{\"text\": \"y\"}\n");
        Assert.That(Calibration.ReadDocuments(upper), Is.EqualTo(new[] { "x", "y" }), "any case of .jsonl; a blank text is no document");
        File.WriteAllText(jsonl, "{\"txt\": \"a\"}\n");
        Assert.That(Assert.Throws<InvalidSettingException>(() => Calibration.ReadDocuments(jsonl))!.Message, Does.Contain("c.jsonl:1"));

        var tok = new Engine.Tokenization.HfTokenizer(TestAssets.ByteLevelTokenizerJson(), "t");
        var ids = Calibration.Tokenize([txt], tok, 1);
        Assert.That(ids.Count(i => i == 1), Is.EqualTo(3));
        Assert.That(ids[0], Is.EqualTo(1));
        var e = Assert.Throws<InvalidSettingException>(() => Calibration.Blocks(ids, ids.Length + 1));
        Assert.That(e!.Message, Does.Contain("shorter than one block"));
        Assert.That(Calibration.Blocks(ids, 4).All(b => b.Length == 4));
    }

    [Test]
    public void OptionsReportEveryBadValue()
    {
        var problems = new TrainingOptions { PruneRatio = 1.2, Steps = 0, LearningRate = -1, Lambda = 0, BatchSize = 0 }.Problems();
        Assert.That(problems, Has.Some.Contains("prune ratio"));
        Assert.That(problems, Has.Some.Contains("steps"));
        Assert.That(problems, Has.Some.Contains("learning rate"));
        Assert.That(problems, Has.Some.Contains("lambda"));
        Assert.That(problems, Has.Some.Contains("batch size"));
        Assert.That(Assert.Throws<InvalidSettingException>(() => SiteLayout.ParseMode("dense"))!.Message, Does.Contain("unknown pruning mode 'dense'"));
        Assert.That((SiteLayout.ParseMode(" DISP "), SiteLayout.ParseMode("Same")), Is.EqualTo((PruningMode.Disp, PruningMode.Same)));
    }

    [Test]
    public void Batches_TakeEveryBlockOncePerEpoch_InASeededOrderThatChangesEachEpoch()
    {
        var (c, w, blocks) = TinySetup(blocks: 12);
        var options = new TrainingOptions { BatchSize = 5, Seed = 11 };
        var trainer = new HypernetworkTrainer(c, w, options);
        // 12 steps of 5 blocks: 5 epochs, with batches that straddle the epochs' ends.
        var samples = Enumerable.Range(0, 12).SelectMany(s => trainer.BatchAt(blocks, s)).ToList();
        var epochs = samples.Chunk(12).Select(e => e.Select(b => blocks.IndexOf(b)).ToArray()).ToList();
        foreach (var e in epochs) Assert.That(e.Order(), Is.EqualTo(Enumerable.Range(0, 12)), "every block once per epoch");
        Assert.That(epochs[0], Is.Not.EqualTo(Enumerable.Range(0, 12)), "shuffled");
        Assert.That(epochs.Select(e => string.Join(",", e)).Distinct().Count(), Is.EqualTo(epochs.Count), "each epoch has its own order");
        // The order depends on the seed only, not on which steps were asked for before (a resumed run starts mid-way).
        Assert.That(new HypernetworkTrainer(c, w, options).BatchAt(blocks, 7), Is.EqualTo(trainer.BatchAt(blocks, 7)));
        var other = new HypernetworkTrainer(c, w, options with { Seed = 12 });
        Assert.That(Enumerable.Range(0, 3).SelectMany(s => other.BatchAt(blocks, s)), Is.Not.EqualTo(samples.Take(15)));
    }

    [Test]
    public void CalibrationBlocks_AreConsecutiveFullBlocks_UpToMaxBlocks()
    {
        var ids = Enumerable.Range(0, 23).ToArray();
        var blocks = Calibration.Blocks(ids, 5);
        Assert.That(blocks, Is.EqualTo(Enumerable.Range(0, 4).Select(b => Enumerable.Range(5 * b, 5).ToArray())), "the 3-token tail is dropped");
        Assert.That(Calibration.Blocks(ids, 5, maxBlocks: 2), Is.EqualTo(blocks.Take(2)));
        Assert.That(Calibration.Blocks(ids, 5, maxBlocks: 9), Is.EqualTo(blocks));
        Assert.That(Assert.Throws<InvalidSettingException>(() => Calibration.Blocks(ids, 1))!.Message, Is.EqualTo("block size must be at least 2 (got 1)"));
    }

    [Test]
    public void CheckBlocks_TakesABatchOfEveryBlock_AndRefusesOneMore()
    {
        var (c, _, blocks) = TinySetup(blocks: 4);
        Assert.DoesNotThrow(() => HypernetworkTrainer.CheckBlocks(c, new TrainingOptions { BatchSize = 4 }, blocks));
        Assert.That(Assert.Throws<InvalidSettingException>(() => HypernetworkTrainer.CheckBlocks(c, new TrainingOptions { BatchSize = 5 }, blocks))!.Message,
            Does.StartWith("batch size 5 exceeds the 4 calibration blocks"));
        Assert.That(Assert.Throws<InvalidSettingException>(() => HypernetworkTrainer.CheckBlocks(c, new TrainingOptions(), []))!.Message,
            Is.EqualTo("no calibration blocks to train on"));
    }

    [TestCase("{\"text\": 5}")]
    [TestCase("[\"text\"]")]
    [TestCase("{\"text\": \"a\"")]
    public void ACalibrationJsonlLineWithoutAStringText_IsNamedByItsLine(string line)
    {
        var path = Path.Combine(TestAssets.TempDir(), "c.jsonl");
        File.WriteAllText(path, "{\"text\": \"fine\"}\n" + line + "\n");
        Assert.That(Assert.Throws<InvalidSettingException>(() => Calibration.ReadDocuments(path))!.Message, Does.StartWith($"{path}:2: "));
    }
}
