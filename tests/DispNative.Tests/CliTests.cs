using System.Text.RegularExpressions;
using DispNative.Cli;
using DispNative.Engine;

namespace DispNative.Tests;

public class CliTests
{
    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        var o = new StringWriter(); var e = new StringWriter();
        int code = Program.Run(args, o, e);
        return (code, o.ToString(), e.ToString());
    }

    [Test]
    public void Eval_OnASelfMadeModel_EndsWithThePerplexityLine_AndWritesJson()
    {
        var dir = TestAssets.WriteTinyModel();
        var text = Path.Combine(TestAssets.TempDir(), "t.txt");
        File.WriteAllText(text, string.Concat(Enumerable.Repeat("the cat sat in the sun. ", 20)));
        var json = Path.Combine(TestAssets.TempDir(), "r.json");
        var (code, stdout, stderr) = Run("eval", "--model", dir, "--text", text, "--block-size", "64", "--max-blocks", "2", "--device", "cpu", "--json", json);
        Assert.That(code, Is.Zero, stderr);
        var last = stdout.TrimEnd().Split('\n')[^1];
        Assert.That(last, Does.Match(@"^perplexity: \d+\.\d+ over 126 tokens$"));
        Assert.That(File.ReadAllText(json), Does.Contain("\"scored_tokens\": 126").And.Contain("\"device\": \"cpu\""));
    }

    [Test]
    public void Generate_AndInspect_Run()
    {
        var dir = TestAssets.WriteTinyModel();
        var (code, stdout, stderr) = Run("generate", "--model", dir, "--prompt", "the cat", "--max-new-tokens", "5", "--greedy");
        Assert.That(code, Is.Zero, stderr);
        Assert.That(stdout, Does.StartWith("the cat"));
        (code, stdout, stderr) = Run("inspect", "--model", dir);
        Assert.That(code, Is.Zero, stderr);
        long parameters = TestAssets.TinyConfig().ParameterCounts().Values.Sum();
        Assert.That(stdout, Does.Contain("LlamaForCausalLM").And.Contain($"  {"F32",-11} {parameters,14:N0}\n"), "every stored element counted");
        string[] Sample(string seed) => ["generate", "--model", dir, "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "1.5", "--seed", seed, "--device", "cpu"];
        var (a, again, other) = (Run(Sample("1")).Out, Run(Sample("1")).Out, Run(Sample("2")).Out);
        Assert.That((again, other == a), Is.EqualTo((a, false)), "sampling follows --seed");
        string notAModel = Path.Combine(dir, "config.json");
        (code, _, stderr) = Run("inspect", "--model", notAModel);
        Assert.That((code, stderr), Is.EqualTo((1, $"error: {notAModel}: expected a Hugging Face model directory or a llama2.c .bin checkpoint\n")));
    }

    [Test]
    public void AModelLargerThanHostMemory_IsRefusedBeforeItsWeightsAreRead()
    {
        var dir = TestAssets.WriteTinyModel();
        var huge = TestAssets.TinyConfig() with { IntermediateSize = 1 << 30 };   // 309 billion parameters: 1.13 TiB as f32
        File.WriteAllText(Path.Combine(dir, "config.json"), huge.ToJson().ToJsonString());
        var (code, stdout, stderr) = Run("generate", "--model", dir, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu");
        Assert.That(code, Is.EqualTo(1), stdout + stderr);
        Assert.That(stderr, Does.Match(
            $@"^loading .*\nerror: {Regex.Escape(dir)}: loading its 309\.238 billion parameters as f32 needs 1\.13 TiB of host memory, more than the \d+\.\d\d [GT]iB this process may use\n$"));
    }

    [Test]
    public void HostMemoryCheck_RefusesOnlyAboveTheLimit_AndNamesBothSizes()
    {
        Assert.DoesNotThrow(() => HostMemory.Require(3L << 30, "x", limit: 3L << 30));
        var e = Assert.Throws<DispNativeException>(() => HostMemory.Require((3L << 30) + 1, "loading x", limit: 3L << 30))!;
        Assert.That(e.Message, Is.EqualTo("loading x needs 3.00 GiB of host memory, more than the 3.00 GiB this process may use"));
        Assert.That(new[] { 1536L, 5L << 20, 1L << 40 }.Select(ByteCount.Format), Is.EqualTo(new[] { "1.5 KiB", "5.0 MiB", "1.00 TiB" }));
    }

    /// <summary>A key given twice (System.Text.Json's nodes would throw their own exception when first enumerating it).</summary>
    [TestCase("config.json", "\"vocab_size\"")]
    [TestCase("tokenizer.json", "\"model\"")]
    public void AModelFileWithAKeyGivenTwice_IsRefusedByName(string file, string key)
    {
        var dir = TestAssets.WriteTinyModel();
        string path = Path.Combine(dir, file);
        var text = File.ReadAllText(path);
        File.WriteAllText(path, text.Insert(1, key + ":null,"));
        var (code, _, stderr) = Run("generate", "--model", dir, "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu");
        Assert.That((code, stderr.TrimEnd().Split('\n')[^1]),
            Is.EqualTo((1, $"error: {path}: not valid JSON (Duplicate property '{key.Trim('"')}' encountered during deserialization.)")));
    }

    [TestCase(new[] { "eval", "--model", "/no/such/model", "--text", "x.txt", "--block-size", "8" }, "text file not found")]
    [TestCase(new[] { "eval", "--model", "/no/such/model", "--text", "/dev/null", "--block-size", "1" }, "--block-size must be at least 2")]
    [TestCase(new[] { "eval", "--model", "/no/such/model", "--text", "/dev/null", "--block-size", "8", "--json", "/" }, "--json: / is a directory; give a file name")]
    [TestCase(new[] { "eval", "--model", "/no/such/model", "--text", "/dev/null", "--block-size", "8", "--json", "/no/such/dir/r.json" }, "--json: the folder /no/such/dir does not exist")]
    [TestCase(new[] { "eval", "--model", "/no/such/model", "--text", "/", "--block-size", "8" }, "text file / is a directory, not a file")]
    [TestCase(new[] { "run", "/" }, "configuration file / is a directory, not a file")]
    [TestCase(new[] { "generate", "--model", "/no/such/model", "--prompt", "hi" }, "model not found: /no/such/model")]
    [TestCase(new[] { "generate", "--model", "/no/such/model", "--prompt", "hi", "--temperature", "-1" }, "temperature must be positive")]
    [TestCase(new[] { "generate", "--model", "/no/such/model", "--prompt", "hi", "--top-p", "0.9" }, "--top-p applies only to sampling: give --temperature too")]
    [TestCase(new[] { "generate", "--model", "/no/such/model", "--prompt", "hi", "--greedy", "--seed", "3" }, "--seed applies only to sampling")]
    [TestCase(new[] { "inspect", "--model", "/no/such/model" }, "error: model not found: /no/such/model")]
    [TestCase(new[] { "eval", "--model", "/no/such/model", "--text", "/dev/null", "--block-size", "8", "--max-blocks", "0" }, "error: --max-blocks must be positive (got 0)")]
    [TestCase(new[] { "generate", "--model", "/no/such/model", "--prompt", "hi", "--greedy", "--temperature", "1" }, "error: --greedy and --temperature exclude each other")]
    [TestCase(new[] { "generate", "--model", "/no/such/model", "--prompt", "" }, "error: --prompt is empty")]
    [TestCase(new[] { "train", "--model", "/no/such/model", "--calibration", "/dev/null", "--prune-ratio", "0.5", "--block-size", "1", "--out", "/no/such/out" },
        "error: block size must be at least 2 (got 1)")]
    [TestCase(new[] { "train", "--model", "/no/such/model", "--calibration", "/dev/null", "--prune-ratio", "0.5", "--max-blocks", "0", "--out", "/no/such/out" },
        "error: max blocks must be positive (got 0)")]
    [TestCase(new[] { "train", "--model", "/no/such/model", "--calibration", "/dev/null", "--prune-ratio", "1", "--steps", "0", "--out", "/no/such/out" },
        "error: prune ratio must be in (0, 1) (got 1); steps must be at least 1 (got 0)")]
    [TestCase(new[] { "eval", "--model", "/no/such/model", "--text", "/dev/null", "--block-size", "8", "--json", "" }, "--json: the path is empty")]
    [TestCase(new[] { "eval", "--model", " ", "--text", "/dev/null", "--block-size", "8" }, "--model: the path is empty")]
    [TestCase(new[] { "train", "--model", "/no/such/model", "--calibration", "/dev/null", "", "--prune-ratio", "0.5", "--out", "/no/such/out" },
        "--calibration: the path is empty")]
    [TestCase(new[] { "train", "--model", "/no/such/model", "--calibration", "/dev/null", "--prune-ratio", "0.5", "--out", "" }, "--out: the path is empty")]
    [TestCase(new[] { "prune", "--model", "/no/such/model", "--hypernetwork", "h.safetensors", "--out", "" }, "--out: the path is empty")]
    public void BadInput_PrintsOneClearLine_WithoutStackTrace(string[] args, string expected)
    {
        var (code, _, stderr) = Run(args);
        Assert.That(code, Is.Not.Zero);
        Assert.That(stderr, Does.Contain(expected));
        Assert.That(stderr, Does.Not.Contain("   at "), "no stack trace");
    }

    /// <summary><c>train</c> passes its options to the trainer, writes the hypernetwork, resumes when run again with more
    /// steps, and never writes into a directory that holds something other than its checkpoint; <c>prune</c> refuses
    /// an output path that exists, file or directory.</summary>
    [Test]
    public void Train_TakesItsOptions_Resumes_AndKeepsOutOfForeignDirectories()
    {
        var model = TestAssets.WriteTinyModel();
        var text = Path.Combine(TestAssets.TempDir(), "t.txt");
        File.WriteAllText(text, string.Concat(Enumerable.Repeat("the cat sat in the sun. ", 60)));
        string[] Train(string outDir, int steps, params string[] more) =>
            ["train", "--model", model, "--calibration", text, "--prune-ratio", "0.5", "--block-size", "32", "--steps", $"{steps}", "--device", "cpu", "--out", outDir, .. more];

        var cosine = Path.Combine(TestAssets.TempDir(), "cosine");
        var (code, stdout, stderr) = Run(Train(cosine, 2, "--cosine", "--seed", "5", "--lr", "0.002", "--checkpoint-layers", "on"));
        Assert.That(code, Is.Zero, stderr);
        Assert.That(stderr, Does.Contain("LM pass on cpu, layers checkpointed"));
        string hyper = Path.Combine(cosine, "hypernetwork.safetensors");
        Assert.That(stdout, Does.StartWith("trained 2 steps: ce ").And.EndWith($"hypernetwork: {hyper}\n"));
        Assert.That(Engine.Disp.Hypernetwork<float>.ReadMetadata(hyper)["seed"]!.GetValue<ulong>(), Is.EqualTo(5));
        var log = Engine.Training.HypernetworkTrainer.ReadLog(Path.Combine(cosine, "train_log.jsonl"));
        Assert.That(log.Select(e => e.LearningRate), Is.EqualTo(new[] { 0.002, 0.001 }).Within(1e-15), "cosine: ½(1 + cos(π/2)) at the second step");

        var plain = Path.Combine(TestAssets.TempDir(), "plain");
        Assert.That(Run(Train(plain, 2)).Code, Is.Zero);
        (code, stdout, _) = Run(Train(plain, 3));
        Assert.That(code, Is.Zero);
        Assert.That(stdout, Does.StartWith("trained 3 steps (resumed from 2): ce "));

        var foreign = TestAssets.TempDir();
        File.WriteAllText(Path.Combine(foreign, "notes.txt"), "mine");
        (code, _, stderr) = Run(Train(foreign, 1));
        Assert.That((code, stderr.TrimEnd()), Is.EqualTo((1, $"error: {foreign} exists and holds no training checkpoint; choose a new output directory")));
        Assert.That(Directory.GetFileSystemEntries(foreign), Has.Length.EqualTo(1));

        var taken = Path.Combine(TestAssets.TempDir(), "taken");
        File.WriteAllText(taken, "mine");
        (code, _, stderr) = Run("prune", "--model", model, "--hypernetwork", hyper, "--out", taken);
        Assert.That((code, stderr.TrimEnd()), Is.EqualTo((1, $"error: --out: {taken} already exists; not overwriting it")));
        Assert.That(File.ReadAllText(taken), Is.EqualTo("mine"));
    }

    /// <summary><c>prune</c> draws the hard masks with the hypernetwork's seeded noise, or without noise when asked.</summary>
    [Test]
    public void Prune_DrawsTheMasksWithTheSeedsNoise_OrNoneWhenDeterministic()
    {
        var model = TestAssets.WriteTinyModel();
        var config = TestAssets.TinyConfig();
        var layout = new Engine.Disp.SiteLayout(config, Engine.Disp.PruningMode.Disp);
        var net = new Engine.Disp.Hypernetwork<float>(layout.OutputWidths, seed: 2);
        foreach (var head in net.Parameters.Where(p => p.Name.StartsWith("linear_list.")))
            for (int i = 0; i < head.Value.Length; i++) head.Value[i] *= 12;   // logits of a few units: some near the threshold −3
        var hyper = Path.Combine(TestAssets.TempDir(), "h.safetensors");
        net.Save(hyper, new System.Text.Json.Nodes.JsonObject { ["mode"] = "disp", ["prune_ratio"] = 0.5, ["seed"] = 8 });
        int[][] Widths(params string[] more)
        {
            var outDir = Path.Combine(TestAssets.TempDir(), "pruned");
            var (code, _, stderr) = Run(["prune", "--model", model, "--hypernetwork", hyper, "--out", outDir, .. more]);
            Assert.That(code, Is.Zero, stderr);
            return Engine.Models.ModelConfig.Load(Path.Combine(outDir, "config.json")).Disp!.Widths;
        }
        var noisy = Engine.Disp.PruningPlan.FromHypernetwork(net, layout, deterministic: false, seed: 8).Widths;
        var noiseFree = Engine.Disp.PruningPlan.FromHypernetwork(net, layout, deterministic: true, seed: 8).Widths;
        Assert.That(noisy, Is.Not.EqualTo(noiseFree), "the noise moves some channels across the threshold");
        Assert.That(Widths(), Is.EqualTo(noisy));
        Assert.That(Widths("--deterministic"), Is.EqualTo(noiseFree));
    }

    /// <summary>The test model has 256 positions (max_position_embeddings): longer blocks or generations are refused
    /// before any work, where they used to run on past the model's context (and, far enough, overflow).</summary>
    [Test]
    public void SequencesLongerThanTheModelsContext_AreRefusedUpFront()
    {
        var dir = TestAssets.WriteTinyModel();
        var text = Path.Combine(TestAssets.TempDir(), "t.txt");
        File.WriteAllText(text, string.Concat(Enumerable.Repeat("the cat sat in the sun. ", 60)));
        const string limit = "exceeds the model's context of 256 positions (max_position_embeddings)";

        var (code, _, stderr) = Run("eval", "--model", dir, "--text", text, "--block-size", "257", "--device", "cpu");
        Assert.That((code, stderr), Is.EqualTo((1, $"loading {dir} on cpu\nerror: block size 257 {limit}\n")));
        (code, _, _) = Run("eval", "--model", dir, "--text", text, "--block-size", "256", "--max-blocks", "1", "--device", "cpu");
        Assert.That(code, Is.Zero, "a block of exactly the context is allowed");

        (code, var stdout, stderr) = Run("generate", "--model", dir, "--prompt", "the cat", "--max-new-tokens", "253", "--device", "cpu");
        Assert.That(stderr, Does.EndWith($"error: a sequence of 257 tokens (4 prompt + 253 new; at most 252 new fit) {limit}\n"));
        Assert.That((code, stdout), Is.EqualTo((1, "")), "nothing is printed before the check");

        var outDir = Path.Combine(TestAssets.TempDir(), "hn");
        (code, _, stderr) = Run("train", "--model", dir, "--calibration", text, "--prune-ratio", "0.5", "--block-size", "300",
            "--steps", "1", "--device", "cpu", "--out", outDir);
        Assert.That(stderr, Does.EndWith($"error: a calibration block of 300 tokens {limit}\n"));
        Assert.That(code, Is.EqualTo(1));
    }

    [Test]
    public void ADirectoryHoldingALlama2cCheckpoint_PointsAtTheBinFile()
    {
        var dir = TestAssets.TempDir();
        File.WriteAllBytes(Path.Combine(dir, "model.bin"), new byte[28]);
        var (code, _, stderr) = Run("inspect", "--model", dir);
        Assert.That(code, Is.EqualTo(1));
        Assert.That(stderr, Does.Contain("no config.json").And.Contain($"--model {Path.Combine(dir, "model.bin")} --tokenizer"));
    }

    [Test]
    public void EmptyText_IsAClearError()
    {
        var dir = TestAssets.WriteTinyModel();
        var text = Path.Combine(TestAssets.TempDir(), "empty.txt");
        File.WriteAllText(text, "");
        var (code, _, stderr) = Run("eval", "--model", dir, "--text", text, "--block-size", "8");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(stderr, Does.Contain("text file is empty"));
    }

    [Test]
    public void SelfTest_WithoutACudaDevice_SaysWhy_AndChecksItsReferenceModel()
    {
        if (Engine.Cuda.CudaDevice.Unavailable() is not string reason) { Assert.Ignore("a CUDA device is present"); return; }
        var (code, _, stderr) = Run("selftest");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(stderr, Does.StartWith("error: --device cuda: ").And.Contain(reason));
        (code, _, stderr) = Run("selftest", "--device", "auto");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(stderr, Does.Contain("selftest checks the CUDA backend").And.Contain(reason));
        (code, _, stderr) = Run("selftest", "--reference-model", TestAssets.TempDir());
        Assert.That(code, Is.EqualTo(1));
        Assert.That(stderr, Does.Contain("has no golden.json"));
    }

    [Test]
    public void CudaDevice_WithoutADriver_SaysWhy()
    {
        if (Engine.Cuda.CudaDevice.Unavailable() == null) { Assert.Ignore("a CUDA device is present"); return; }
        var dir = TestAssets.WriteTinyModel();
        var (code, _, stderr) = Run("generate", "--model", dir, "--prompt", "hi", "--device", "cuda");
        Assert.That(code, Is.EqualTo(1));
        Assert.That(stderr, Does.Contain("--device cuda:"));
    }
}
