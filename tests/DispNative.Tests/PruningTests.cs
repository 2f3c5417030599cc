using DispNative.Engine;
using DispNative.Engine.Autograd;
using DispNative.Engine.Cpu;
using DispNative.Engine.Disp;
using DispNative.Engine.Inference;
using DispNative.Engine.IO;
using DispNative.Engine.Models;

namespace DispNative.Tests;

public class PruningTests
{
    /// <summary>A random plan keeping about <paramref name="keep"/> of every site (at least one channel).</summary>
    internal static PruningPlan RandomPlan(ModelConfig c, PruningMode mode, double keep, ulong seed)
    {
        var layout = new SiteLayout(c, mode);
        var rng = new Rng(seed);
        var masks = layout.OutputWidths.Select(w =>
        {
            var m = Enumerable.Range(0, w).Select(_ => rng.NextDouble() < keep).ToArray();
            m[rng.NextInt(w)] = true;
            return m;
        }).ToList();
        return PruningPlan.FromMasks(layout, masks);
    }

    private static float[] MaskedLogits(ModelConfig c, ModelWeights dense, PruningPlan plan, int[] ids)
    {
        var tape = new Tape<float>();
        var masked = new MaskedLlama<float>(c, dense);
        return masked.Logits(tape, ids, (l, kind) =>
        {
            int width = kind == SiteKind.MlpMid ? c.IntermediateSize : c.HiddenSize;
            return tape.Constant(plan.Mask(l, kind, width), 1, width);
        }).Data;
    }

    private static void AssertClose(float[] actual, float[] expected, double relative, string what)
    {
        double scale = Math.Sqrt(expected.Average(v => (double)v * v));
        double worst = actual.Zip(expected, (a, e) => Math.Abs(a - e)).Max();
        Assert.That(worst, Is.LessThanOrEqualTo(relative * scale), $"{what}: worst difference {worst:E2} vs logit RMS {scale:E2}");
    }

    [TestCase(false, false, PruningMode.Disp)]
    [TestCase(true, false, PruningMode.Disp)]
    [TestCase(false, true, PruningMode.Same)]
    public void PrunedModelEqualsMaskedModel(bool qkvBias, bool outputBias, PruningMode mode)
    {
        var c = TestAssets.TinyConfig(vocab: 70, qkvBias: qkvBias) with { OutputBias = outputBias };
        var dense = ModelWeights.Random(c, 21, std: 0.15f);
        var plan = RandomPlan(c, mode, 0.6, 3);
        var (pc, pw) = Pruner.Apply(c, dense, plan, "disp", 0.4, "tiny");
        int[] ids = [1, 8, 40, 3, 3, 69, 12, 0, 5, 33, 21];
        var pruned = new LlamaModel(pc, pw);
        var logits = pruned.Forward(ids, pruned.NewCache(ids.Length));
        AssertClose(logits, MaskedLogits(c, dense, plan, ids), 1e-4, "pruned vs masked");
        // And the masks really change the model.
        var denseModel = new LlamaModel(c, dense);
        var denseLogits = denseModel.Forward(ids, denseModel.NewCache(ids.Length));
        Assert.That(logits.Zip(denseLogits, (a, b) => Math.Abs(a - b)).Max(), Is.GreaterThan(1e-2));
    }

    [Test]
    public void PrunerSlicesTheRightRowsAndColumns()
    {
        var c = TestAssets.TinyConfig(vocab: 30);
        var dense = ModelWeights.Random(c, 2);
        var plan = RandomPlan(c, PruningMode.Disp, 0.5, 9);
        var (pc, pw) = Pruner.Apply(c, dense, plan, "disp", 0.5, null);
        var idx = plan.Indices[1];
        var (w, p) = (dense.Layers[1], pw.Layers[1]);
        int d = c.HiddenSize, f = c.IntermediateSize;
        // q_proj column j of the pruned layer is column attn_in[j] of the dense one.
        Assert.That(p.Wq[2 * idx[0].Length + 1], Is.EqualTo(w.Wq[2 * d + idx[0][1]]));
        Assert.That(p.Wo[1 * c.QDim + 5], Is.EqualTo(w.Wo[idx[1][1] * c.QDim + 5]));
        Assert.That(p.WGate[3 * idx[2].Length + 2], Is.EqualTo(w.WGate[idx[3][3] * d + idx[2][2]]));
        Assert.That(p.WDown[2 * idx[3].Length + 4], Is.EqualTo(w.WDown[idx[4][2] * f + idx[3][4]]));
        Assert.That(p.AttnNorm, Is.SameAs(w.AttnNorm));
        Assert.That(pc.Disp!.Widths[1], Is.EqualTo(idx.Select(i => i.Length).ToArray()));
        long prunable = pc.PrunableParameters();
        double ratio = new SiteLayout(c, PruningMode.Disp).KeptRatio(ToGrid(pc.Disp.Widths));
        long densePrunable = c.PrunableParameters();
        Assert.That((double)prunable / densePrunable, Is.EqualTo(ratio).Within(1e-12));
        Assert.Throws<InvalidSettingException>(() => Pruner.Apply(pc, pw, plan, "disp", 0.5, null));
    }

    private static int[,] ToGrid(int[][] w)
    {
        var g = new int[w.Length, 5];
        for (int l = 0; l < w.Length; l++) for (int s = 0; s < 5; s++) g[l, s] = w[l][s];
        return g;
    }

    /// <summary>The parameter counts behind metrics.json are the elements of the tensors the model is saved as (index
    /// tensors aside), with every bias kind, tied or untied, dense or pruned.</summary>
    [TestCase(false, false, true, false)]
    [TestCase(true, false, false, false)]
    [TestCase(false, true, true, true)]
    [TestCase(true, true, false, true)]
    public void ParameterCounts_AreTheElementsOfTheSavedTensors(bool qkvBias, bool outputBias, bool tied, bool pruned)
    {
        var c = TestAssets.TinyConfig(tied: tied, qkvBias: qkvBias) with { OutputBias = outputBias };
        var w = ModelWeights.Random(c, 1);
        if (pruned) (c, w) = Pruner.Apply(c, w, RandomPlan(c, PruningMode.Disp, 0.6, 3), "disp", 0.4, null);
        long elements = w.ToTensors(c, DType.F32).Where(t => t.DType != DType.I32).Sum(t => t.Shape.Aggregate(1L, (a, b) => a * b));
        Assert.That(c.ParameterCounts().Values.Sum(), Is.EqualTo(elements));
    }

    [TestCase("bfloat16", null, DType.BF16)]
    [TestCase("float16", null, DType.F16)]
    [TestCase("float32", null, DType.F32)]
    [TestCase("bfloat16", DType.F32, DType.F32)]
    [TestCase("float32", DType.F16, DType.F16)]
    public void APrunedModelIsStoredInTheDenseModelsType_UnlessAskedOtherwise(string denseType, DType? requested, DType saved)
        => Assert.That(Pruner.SavedDType(TestAssets.TinyConfig() with { WeightDType = denseType }, requested), Is.EqualTo(saved));

    /// <summary>Saving onto an existing file is refused like onto a directory, and the file stays as it was.</summary>
    [Test]
    public void SavingOntoAnExistingFile_IsRefused_AndTheFileKept()
    {
        var c = TestAssets.TinyConfig();
        var (pc, pw) = Pruner.Apply(c, ModelWeights.Random(c, 1), RandomPlan(c, PruningMode.Disp, 0.7, 5), "disp", 0.3, null);
        var file = Path.Combine(TestAssets.TempDir(), "notes.txt");
        File.WriteAllText(file, "mine");
        Assert.That(Assert.Throws<InvalidSettingException>(() => Pruner.Save(file, pc, pw, DType.F32, []))!.Message,
            Is.EqualTo($"{file} already exists; not overwriting it"));
        Assert.That(File.ReadAllText(file), Is.EqualTo("mine"));
        Assert.That(Directory.GetFileSystemEntries(Path.GetDirectoryName(file)!), Is.EqualTo(new[] { file }), "nothing left beside it");
    }

    /// <summary>A tokenizer given by path is copied under the name its kind loads from, whatever the case of its extension.</summary>
    [TestCase("Tok.JSON", "tokenizer.json")]
    [TestCase("tok.json", "tokenizer.json")]
    [TestCase("stories.bin", "tokenizer.bin")]
    public void AGivenTokenizer_IsCopiedUnderItsKindsName(string file, string name)
        => Assert.That(Pruner.TokenizerFilesOf("model.bin", Path.Combine("x", file)), Is.EqualTo(new[] { (Path.Combine("x", file), name) }));

    [Test]
    public void APlanFromMasks_NeedsOneMaskPerOutput()
    {
        var layout = new SiteLayout(TestAssets.TinyConfig(), PruningMode.Disp);
        var masks = layout.OutputWidths.Select(w => new bool[w]).ToList();
        Assert.That(PruningPlan.FromMasks(layout, masks).Indices.Length, Is.EqualTo(2));
        masks.Add(new bool[4]);
        Assert.That(Assert.Throws<ArgumentException>(() => PruningPlan.FromMasks(layout, masks))!.Message, Is.EqualTo("11 masks for 10 outputs"));
    }

    [Test]
    public void SavedPrunedModelLoadsWithIdenticalLogitsAndDecodesWithTheCache()
    {
        var src = TestAssets.WriteTinyModel();
        // The tokenizer and generation files go with the model, byte for byte; nothing else does.
        var companions = new[] { "tokenizer_config.json", "special_tokens_map.json", "generation_config.json" };
        foreach (var name in companions) File.WriteAllText(Path.Combine(src, name), $$"""{"file": "{{name}}"}""");
        File.WriteAllText(Path.Combine(src, "README.md"), "model card");
        var dense = ModelLoader.Load(src);
        var plan = RandomPlan(dense.Config, PruningMode.Disp, 0.7, 5);
        var (pc, pw) = Pruner.Apply(dense.Config, dense.Model.Weights, plan, "disp", 0.3, src);
        var dir = Path.Combine(TestAssets.TempDir(), "pruned");
        Pruner.Save(dir, pc, pw, DType.F32, Pruner.TokenizerFilesOf(src, null), maxShardBytes: 30_000);
        Assert.That(Directory.GetFiles(dir, "*.safetensors").Length, Is.GreaterThan(1), "sharded");
        foreach (var name in companions.Append("tokenizer.json"))
            Assert.That(File.ReadAllBytes(Path.Combine(dir, name)), Is.EqualTo(File.ReadAllBytes(Path.Combine(src, name))), name);
        Assert.That(File.Exists(Path.Combine(dir, "README.md")), Is.False);

        var loaded = ModelLoader.Load(dir);
        Assert.That(loaded.Config.Disp!.Widths, Is.EqualTo(pc.Disp!.Widths));
        int[] ids = loaded.Tokenizer.Encode("the cat sat in the sun");
        var before = new LlamaModel(pc, pw).Forward(ids, new LlamaModel(pc, pw).NewCache(ids.Length));
        var after = loaded.Model.Forward(ids, loaded.Model.NewCache(ids.Length));
        Assert.That(after, Is.EqualTo(before), "f32 save → load is exact");

        var cache = loaded.Model.NewCache(ids.Length);
        loaded.Model.Forward(ids.AsSpan(0, 3), cache);
        float[] last = [];
        for (int t = 3; t < ids.Length; t++) last = loaded.Model.Forward(ids.AsSpan(t, 1), cache);
        var vocab = loaded.Config.VocabSize;
        AssertClose(last, before[^vocab..], 1e-5, "decode with the KV cache");

        Assert.Throws<InvalidSettingException>(() => Pruner.Save(dir, pc, pw, DType.F32, []), "an existing directory is never overwritten");
    }

    [Test]
    public void SavingLayerByLayer_SlicesEachLayerOnce_HoldsNoMoreThanAFewLayers_AndWritesTheSameFiles()
    {
        var c = TestAssets.TinyConfig(vocab: 64) with { HiddenSize = 256, IntermediateSize = 768, NumLayers = 24, NumHeads = 8, NumKvHeads = 4, HeadDim = 32 };
        var dense = ModelWeights.Random(c, 4);
        var plan = RandomPlan(c, PruningMode.Disp, 0.6, 8);
        var (pc, pw) = Pruner.Apply(c, dense, plan, "disp", 0.4, "src");
        string root = TestAssets.TempDir(), inMemory = Path.Combine(root, "in-memory"), layerwise = Path.Combine(root, "layerwise");
        const long shardBytes = 4 << 20;
        Pruner.Save(inMemory, pc, pw, DType.F32, [], shardBytes);
        pw = null;

        // Each dense layer is a fresh copy, as a checkpoint read makes it: what the save keeps alive shows as heap growth.
        static float[] Copy(float[]? a) => a == null ? null! : (float[])a.Clone();
        long layerBytes = 4L * (2 * c.QDim * c.HiddenSize + 2 * c.KvDim * c.HiddenSize + 3L * c.IntermediateSize * c.HiddenSize);
        var asked = new List<int>();
        long baseline = 0, most = 0;
        var source = LayerwiseWeights.Of(dense) with
        {
            Layer = l =>
            {
                most = Math.Max(most, GC.GetTotalMemory(forceFullCollection: true) - baseline);
                asked.Add(l);
                var w = dense.Layers[l];
                return new LayerWeights
                {
                    AttnNorm = Copy(w.AttnNorm), Wq = Copy(w.Wq), Wk = Copy(w.Wk), Wv = Copy(w.Wv), Wo = Copy(w.Wo),
                    MlpNorm = Copy(w.MlpNorm), WGate = Copy(w.WGate), WUp = Copy(w.WUp), WDown = Copy(w.WDown),
                };
            },
        };
        baseline = GC.GetTotalMemory(forceFullCollection: true);
        Pruner.Save(layerwise, pc, Pruner.Slicing(c, source, plan), DType.F32, [], shardBytes);

        Assert.That(asked, Is.EqualTo(Enumerable.Range(0, c.NumLayers)), "each layer asked for once, in order");
        Assert.That(most, Is.LessThan(2 * layerBytes), $"heap growth while saving: {most:N0} bytes; one dense layer is {layerBytes:N0}");
        var files = Directory.GetFiles(inMemory).Select(Path.GetFileName).Order().ToList();
        Assert.That(files.Count(f => f!.EndsWith(".safetensors")), Is.GreaterThan(1), "sharded");
        Assert.That(Directory.GetFiles(layerwise).Select(Path.GetFileName).Order(), Is.EqualTo(files));
        foreach (var f in files)
            Assert.That(File.ReadAllBytes(Path.Combine(layerwise, f!)), Is.EqualTo(File.ReadAllBytes(Path.Combine(inMemory, f!))), f);
    }

    [Test]
    public void ALayerThatFailsToReadMidSave_LeavesNothingBehind()
    {
        var c = TestAssets.TinyConfig(vocab: 30) with { NumLayers = 4 };
        var dense = ModelWeights.Random(c, 3);
        var plan = RandomPlan(c, PruningMode.Disp, 0.5, 2);
        var source = LayerwiseWeights.Of(dense) with { Layer = l => l < 2 ? dense.Layers[l] : throw new ModelFormatException($"layer {l} is damaged") };
        string root = TestAssets.TempDir(), dir = Path.Combine(root, "pruned");
        var pc = Pruner.PrunedConfig(c, plan, "disp", 0.5, null);
        var e = Assert.Throws<ModelFormatException>(() => Pruner.Save(dir, pc, Pruner.Slicing(c, source, plan), DType.F32, [], maxShardBytes: 4_000));
        Assert.That(e!.Message, Is.EqualTo("layer 2 is damaged"));
        Assert.That(Directory.EnumerateFileSystemEntries(root), Is.Empty, "neither the model nor its half-written shards");
    }

    /// <summary>A pruned model's intermediate_size only bounds its mlp_mid indices: its buffers take the widest kept middle,
    /// so the same model with a far larger intermediate_size runs, with the same logits.</summary>
    [Test]
    public void APrunedModelsBuffers_TakeItsWidestMiddle_NotTheFullIntermediateSize()
    {
        var c = TestAssets.TinyConfig(vocab: 30);
        var (pc, pw) = Pruner.Apply(c, ModelWeights.Random(c, 1, std: 0.2f), RandomPlan(c, PruningMode.Disp, 0.6, 7), "disp", 0.4, null);
        Assert.That(pc.WidestMlpMiddle, Is.EqualTo(pw.Layers.Max(l => l.MlpMidIdx!.Length)).And.LessThan(c.IntermediateSize));
        Assert.That(c.WidestMlpMiddle, Is.EqualTo(c.IntermediateSize));
        int[] ids = [1, 5, 9, 2, 7];
        var logits = new LlamaModel(pc, pw).Forward(ids, new LlamaModel(pc, pw).NewCache(8));
        var wide = pc with { IntermediateSize = 1 << 30 };
        Assert.That(new LlamaModel(wide, pw).Forward(ids, new LlamaModel(wide, pw).NewCache(8)), Is.EqualTo(logits));
    }

    [TestCase("unsorted")]
    [TestCase("duplicate")]
    [TestCase("range")]
    [TestCase("count")]
    [TestCase("missing")]
    public void LoadingRejectsBadIndices(string defect)
    {
        var c = TestAssets.TinyConfig(vocab: 30);
        var plan = RandomPlan(c, PruningMode.Disp, 0.6, 7);
        var (pc, pw) = Pruner.Apply(c, ModelWeights.Random(c, 1), plan, "disp", 0.4, null);
        var tensors = pw.ToTensors(pc, DType.F32).ToList();
        string name = "model.layers.1.disp.mlp_in_idx";
        int at = tensors.FindIndex(t => t.Name == name);
        var idx = (int[])pw.Layers[1].MlpInIdx!.Clone();
        switch (defect)
        {
            case "unsorted": (idx[0], idx[1]) = (idx[1], idx[0]); break;
            case "duplicate": idx[1] = idx[0]; break;
            case "range": idx[^1] = c.HiddenSize; break;
            case "count": idx = idx[..^1]; break;
        }
        if (defect == "missing") tensors.RemoveAt(at);
        else tensors[at] = TensorData.FromInt32(name, idx, [idx.Length]);
        var dir = TestAssets.TempDir();
        SafeTensorsWriter.Write(Path.Combine(dir, "model.safetensors"), tensors);
        File.WriteAllText(Path.Combine(dir, "config.json"), pc.ToJson().ToJsonString());
        using var ckpt = SafeTensorsCheckpoint.Open(dir);
        var e = Assert.Throws<ModelFormatException>(() => ModelWeights.Load(ckpt, pc));
        Assert.That(e!.Message, Does.Contain(defect == "missing" ? "lacks index tensor" : name));
        string expected = defect switch
        {
            "unsorted" or "duplicate" => "sorted and unique", "range" => "outside 0..", "count" => "indices but the config says width", _ => "lacks",
        };
        Assert.That(e.Message, Does.Contain(expected));
    }

    [Test]
    public void GatherNormAndIndexAddMatchTheirDefinitions()
    {
        var r = new Rng(4);
        int rows = 3, d = 10;
        var x = Enumerable.Range(0, rows * d).Select(_ => r.NextGaussian()).ToArray();
        var gamma = Enumerable.Range(0, d).Select(_ => r.NextGaussian()).ToArray();
        int[] idx = [0, 3, 4, 9];
        var y = new float[rows * idx.Length];
        CpuOps.GatherRmsNorm(x, gamma, idx, y, rows, d, 1e-5f);
        var full = new float[rows * d];
        CpuOps.RmsNorm(x, gamma, full, rows, d, 1e-5f);
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < idx.Length; j++) Assert.That(y[i * idx.Length + j], Is.EqualTo(full[i * d + idx[j]]).Within(1e-6));
        var before = (float[])x.Clone();
        CpuOps.IndexAdd(x, y, idx, rows, d);
        for (int i = 0; i < rows; i++)
            for (int k = 0; k < d; k++)
            {
                int j = Array.IndexOf(idx, k);
                Assert.That(x[i * d + k], Is.EqualTo(before[i * d + k] + (j >= 0 ? y[i * idx.Length + j] : 0)));
            }
    }
}
