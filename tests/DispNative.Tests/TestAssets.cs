using System.Text.Json.Nodes;
using DispNative.Engine.IO;
using DispNative.Engine.Models;
using DispNative.Engine.Tokenization;

namespace DispNative.Tests;

/// <summary>Locates ../shared beside the repository and makes small self-contained models for tests.</summary>
public static class TestAssets
{
    /// <summary>The checkout's root (the folder holding DispNative.sln).</summary>
    public static string RepoRoot
    {
        get
        {
            for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
                if (dir.GetFiles("DispNative.sln").Length > 0) return dir.FullName;
            throw new InvalidOperationException("DispNative.sln not found above the test binaries");
        }
    }

    private static readonly Lazy<string?> SharedDir = new(() =>
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
        {
            if (dir.GetFiles("DispNative.sln").Length > 0)
            {
                var beside = Path.Combine(dir.Parent?.FullName ?? "", "shared");
                return Directory.Exists(Path.Combine(beside, "models")) ? beside : null;
            }
        }
        return null;
    });

    /// <summary>Path inside ../shared, or the test is skipped with a message when ../shared is absent.</summary>
    public static string Shared(string relative)
    {
        string? root = SharedDir.Value;
        if (root == null) Assert.Ignore("../shared is not beside this checkout; tests on the shared models and data are skipped");
        var path = Path.Combine(root!, relative);
        if (!File.Exists(path) && !Directory.Exists(path)) Assert.Ignore($"{path} is missing; skipped");
        return path;
    }

    public static string RefLlama => Shared("models/ref-llama-25m");

    public static string TempDir()
    {
        var dir = Path.Combine(Path.GetTempPath(), "dispnative-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }

    public static ModelConfig TinyConfig(int vocab = 300, bool tied = true, bool qkvBias = false) => new()
    {
        Architecture = qkvBias ? "Qwen2ForCausalLM" : "LlamaForCausalLM",
        HiddenSize = 48, IntermediateSize = 80, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 12,
        VocabSize = vocab, RmsNormEps = 1e-5f, RopeTheta = 10000, TieWordEmbeddings = tied, QkvBias = qkvBias,
        MaxPositionEmbeddings = 256, BosTokenId = 1, EosTokenIds = [2],
    };

    /// <summary>A byte-level BPE tokenizer.json: specials, the 256 byte symbols and a few merges.</summary>
    public static JsonObject ByteLevelTokenizerJson()
    {
        var vocab = new JsonObject { ["<unk>"] = 0, ["<s>"] = 1, ["</s>"] = 2 };
        int id = 3;
        var byteChars = Enumerable.Range(0, 256).Select(b => ByteLevelMap.CharOf((byte)b).ToString()).ToList();
        foreach (var ch in byteChars) vocab[ch] = id++;
        string[][] merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["Ġ", "c"], ["a", "t"], ["Ġc", "at"], ["i", "n"], ["Ġ", "s"]];
        foreach (var m in merges) if (!vocab.ContainsKey(m[0] + m[1])) vocab[m[0] + m[1]] = id++;
        return new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = new JsonArray(
                new JsonObject { ["id"] = 0, ["content"] = "<unk>", ["special"] = true },
                new JsonObject { ["id"] = 1, ["content"] = "<s>", ["special"] = true },
                new JsonObject { ["id"] = 2, ["content"] = "</s>", ["special"] = true }),
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
                ["merges"] = new JsonArray(merges.Select(m => (JsonNode)new JsonArray(m[0], m[1])).ToArray()),
            },
        };
    }

    /// <summary>Writes a random-weight HF model directory (config, sharded safetensors, byte-level tokenizer).</summary>
    public static string WriteTinyModel(string? dir = null, ulong seed = 1, DType dtype = DType.F32, long maxShardBytes = 40_000)
    {
        dir ??= TempDir();
        var config = TinyConfig();
        var weights = ModelWeights.Random(config, seed, std: 0.1f);
        SafeTensorsWriter.WriteSharded(dir, weights.ToTensors(config, dtype).ToList(), maxShardBytes);
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJson().ToJsonString());
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), ByteLevelTokenizerJson().ToJsonString());
        return dir;
    }
}
