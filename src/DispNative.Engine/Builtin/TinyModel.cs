using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using DispNative.Engine.Autograd;
using DispNative.Engine.Disp;
using DispNative.Engine.IO;
using DispNative.Engine.Models;
using DispNative.Engine.Tokenization;
using DispNative.Engine.Training;

namespace DispNative.Engine.Builtin;

/// <summary>The embedded default model: a small LLaMA (GQA, tied embeddings, byte-level tokenizer) that the engine
/// trains itself on a synthetic corpus it generates, so that the main job runs on a fresh clone with nothing
/// downloaded. Built on first use (under a minute on two cores) and cached; <c>builtin:tiny</c> names its directory,
/// <c>builtin:tiny/calibration.txt</c> and <c>builtin:tiny/evaluation.txt</c> its held-apart texts.</summary>
public static class TinyModel
{
    public const string Prefix = "builtin:tiny";
    private const string Version = "tiny-v2";   // bump when the built model changes (v2: fp32 attention backward on GEMMs)
    private const int TrainSteps = 400, TrainBlock = 128, TrainBatch = 4;

    public static ModelConfig Config => new()
    {
        Architecture = "LlamaForCausalLM", HiddenSize = 128, IntermediateSize = 384, NumLayers = 4, NumHeads = 4, NumKvHeads = 2,
        HeadDim = 32, VocabSize = 259, RmsNormEps = 1e-5f, RopeTheta = 10000, TieWordEmbeddings = true, MaxPositionEmbeddings = 1024,
        BosTokenId = 1, EosTokenIds = [2],
    };

    /// <summary>Cache root: <c>DISPNATIVE_CACHE</c>, else <c>$XDG_CACHE_HOME/dispnative</c>, else <c>~/.cache/dispnative</c>.</summary>
    public static string CacheRoot =>
        Environment.GetEnvironmentVariable("DISPNATIVE_CACHE") is { Length: > 0 } c ? c
        : Path.Combine(Environment.GetEnvironmentVariable("XDG_CACHE_HOME") is { Length: > 0 } x ? x
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache"), "dispnative");

    public static bool IsBuiltin(string path) => path == Prefix || path.StartsWith(Prefix + "/", StringComparison.Ordinal);

    /// <summary>Maps <c>builtin:tiny[/file]</c> to the cached directory (building it first if needed); other paths pass through.</summary>
    public static string Resolve(string path, IProgress<(int Step, int Steps)>? progress = null, CancellationToken cancellationToken = default)
    {
        if (!IsBuiltin(path)) return path;
        string dir = Ensure(progress, cancellationToken);
        string rest = path.Length > Prefix.Length ? path[(Prefix.Length + 1)..] : "";
        return rest.Length == 0 ? dir : Path.Combine(dir, rest);
    }

    /// <summary>The cached model directory, built if missing.</summary>
    public static string Ensure(IProgress<(int Step, int Steps)>? progress = null, CancellationToken cancellationToken = default)
    {
        string dir = Path.Combine(CacheRoot, Version);
        if (File.Exists(Path.Combine(dir, "model.safetensors"))) return dir;
        Directory.CreateDirectory(CacheRoot);
        string tmp = dir + ".tmp-" + Environment.ProcessId;
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        try
        {
            Build(tmp, progress, cancellationToken);
            try { Directory.Move(tmp, dir); }
            catch (IOException) when (File.Exists(Path.Combine(dir, "model.safetensors"))) { Directory.Delete(tmp, true); } // another process won
        }
        catch
        {
            if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
            throw;
        }
        return dir;
    }

    private static void Build(string dir, IProgress<(int, int)>? progress, CancellationToken ct)
    {
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), ByteTokenizerJson().ToJsonString());
        File.WriteAllText(Path.Combine(dir, "pretrain.txt"), SyntheticCorpus.Generate(seed: 1, chars: 400_000));
        File.WriteAllText(Path.Combine(dir, "calibration.txt"), SyntheticCorpus.Generate(seed: 2, chars: 120_000));
        File.WriteAllText(Path.Combine(dir, "evaluation.txt"), SyntheticCorpus.Generate(seed: 3, chars: 40_000));
        var config = Config;
        var tokenizer = new HfTokenizer(ByteTokenizerJson(), "builtin tokenizer");
        var ids = Calibration.Tokenize([Path.Combine(dir, "pretrain.txt")], tokenizer, config.BosTokenId, ct);
        var blocks = Calibration.Blocks(ids, TrainBlock);
        var weights = ModelWeights.Random(config, seed: 7, std: 0.02f);
        Pretrain(config, weights, blocks, TrainSteps, TrainBatch, 3e-3, seed: 7, progress, ct);
        SafeTensorsWriter.Write(Path.Combine(dir, "model.safetensors"), weights.ToTensors(config, DType.F32).ToList());
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJson().ToJsonString());
    }

    /// <summary>Trains every weight of a model from scratch (next-token cross-entropy, AdamW with a cosine schedule).</summary>
    public static void Pretrain(ModelConfig config, ModelWeights weights, IReadOnlyList<int[]> blocks, int steps, int batch, double lr, ulong seed,
        IProgress<(int, int)>? progress = null, CancellationToken ct = default)
    {
        var arrays = new List<(string Name, float[] Value)> { ("embed", weights.Embedding), ("final_norm", weights.FinalNorm) };
        if (!ReferenceEquals(weights.LmHead, weights.Embedding)) arrays.Add(("lm_head", weights.LmHead));
        for (int l = 0; l < weights.Layers.Length; l++)
        {
            var w = weights.Layers[l];
            foreach (var (n, a) in new[] { ("attn_norm", w.AttnNorm), ("q", w.Wq), ("k", w.Wk), ("v", w.Wv), ("o", w.Wo), ("mlp_norm", w.MlpNorm), ("gate", w.WGate), ("up", w.WUp), ("down", w.WDown) })
                arrays.Add(($"{l}.{n}", a));
        }
        var parameters = arrays.Select(a => new Parameter<float>(a.Name, 1, a.Value.Length, a.Value)).ToList();
        var gradOf = new Dictionary<float[], float[]>(ReferenceEqualityComparer.Instance);
        foreach (var p in parameters) gradOf[p.Value] = p.Grad;
        var model = new MaskedLlama<float>(config, weights) { GradientOf = a => gradOf.GetValueOrDefault(a) };
        var optimizer = new AdamW(parameters) { WeightDecay = 0.01, ClipNorm = 1.0 };
        var rng = new Rng(seed);
        var buffers = new TapeBufferPool<float>();
        for (int step = 0; step < steps; step++)
        {
            ct.ThrowIfCancellationRequested();
            foreach (var p in parameters) p.ZeroGrad();
            for (int b = 0; b < batch; b++)
            {
                var tape = new Tape<float>(buffers);
                var loss = model.Loss(tape, blocks[rng.NextInt(blocks.Count)], (_, _) => null);
                tape.Backward(tape.Affine(loss, 1.0 / batch, 0));
                tape.ReturnBuffers();
            }
            double warm = Math.Min(1.0, (step + 1) / 20.0);
            optimizer.Step(lr * warm * 0.5 * (1 + Math.Cos(Math.PI * step / steps)));
            progress?.Report((step + 1, steps));
        }
    }

    /// <summary>A byte-level BPE tokenizer.json: &lt;unk&gt;, &lt;s&gt;, &lt;/s&gt;, the 256 bytes, then one token per merge
    /// (none for the built-in model).</summary>
    public static JsonObject ByteTokenizerJson(IReadOnlyList<(string Left, string Right)>? merges = null)
    {
        merges ??= [];
        var vocab = new JsonObject { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2 };
        int id = 3;
        for (int b = 0; b < 256; b++) vocab[ByteLevelMap.CharOf((byte)b).ToString()] = id++;
        foreach (var (l, r) in merges) if (!vocab.ContainsKey(l + r)) vocab[l + r] = id++;
        JsonObject Special(int i, string content) => new() { ["id"] = i, ["content"] = content, ["special"] = true };
        return new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = new JsonArray(Special(0, "<unk>"), Special(1, "<s>"), Special(2, "</s>")),
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = true },
            ["post_processor"] = new JsonObject
            {
                ["type"] = "TemplateProcessing",
                ["single"] = new JsonArray(new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = "<s>", ["type_id"] = 0 } },
                    new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }),
                ["special_tokens"] = new JsonObject { ["<s>"] = new JsonObject { ["id"] = "<s>", ["ids"] = new JsonArray(1), ["tokens"] = new JsonArray("<s>") } },
            },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel" },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["byte_fallback"] = false, ["ignore_merges"] = false, ["vocab"] = vocab,
                ["merges"] = new JsonArray(merges.Select(m => (JsonNode)new JsonArray(m.Left, m.Right)).ToArray()),
            },
        };
    }
}

/// <summary>Deterministic English-like text with learnable structure: a small grammar of scenes, counting with
/// consistent arithmetic, and days of the week in order. Documents are separated by blank lines.</summary>
public static class SyntheticCorpus
{
    private static readonly string[] Names = ["anna", "ben", "clara", "david", "emma", "felix", "grace", "henry", "iris", "jack", "lena", "max"];
    private static readonly string[] Nouns = ["cat", "dog", "bird", "fox", "horse", "rabbit", "mouse", "owl"];
    private static readonly string[] Things = ["apple", "book", "stone", "shell", "coin", "cup", "flower", "key"];
    private static readonly string[] Adjectives = ["small", "big", "quiet", "happy", "old", "young", "brown", "white"];
    private static readonly string[] Places = ["garden", "forest", "river", "market", "school", "kitchen", "hill", "harbor"];
    private static readonly string[] Verbs = ["saw", "followed", "found", "helped", "watched", "chased"];
    private static readonly string[] Days = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    private static readonly string[] Numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];

    public static string Generate(ulong seed, int chars)
    {
        var rng = new Rng(seed);
        string Pick(string[] a) => a[rng.NextInt(a.Length)];
        var sb = new StringBuilder();
        while (sb.Length < chars)
        {
            int day = rng.NextInt(7);
            int sentences = 4 + rng.NextInt(6);
            for (int s = 0; s < sentences; s++)
            {
                string name = Pick(Names), other = Pick(Names);
                switch (rng.NextInt(4))
                {
                    case 0:
                        sb.Append($"the {Pick(Adjectives)} {Pick(Nouns)} {Pick(Verbs)} the {Pick(Nouns)} near the {Pick(Places)}. ");
                        break;
                    case 1:
                        int have = 2 + rng.NextInt(9), give = 1 + rng.NextInt(have - 1);
                        string thing = Pick(Things);
                        sb.Append($"{name} has {Numbers[have]} {thing}s and gives {Numbers[give]} to {other}, so {name} has {Numbers[have - give]} {thing}s left. ");
                        break;
                    case 2:
                        sb.Append($"on {Days[day]} {name} went to the {Pick(Places)} with {other}, and on {Days[(day + 1) % 7]} they went home. ");
                        day = (day + 1) % 7;
                        break;
                    default:
                        int a = rng.NextInt(6), b = rng.NextInt(5);
                        sb.Append($"{Numbers[a]} plus {Numbers[b]} is {Numbers[a + b]}. ");
                        break;
                }
            }
            sb.Length--;
            sb.Append("\n\n");
        }
        return sb.ToString();
    }
}
