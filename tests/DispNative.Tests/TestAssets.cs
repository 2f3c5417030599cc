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

    /// <summary>Path inside ../shared, or null when it is absent (for test sources, which cannot skip).</summary>
    public static string? TryShared(string relative) =>
        SharedDir.Value is string root && Path.Exists(Path.Combine(root, relative)) ? Path.Combine(root, relative) : null;

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
    public static JsonObject ByteLevelTokenizerJson() => Engine.Builtin.TinyModel.ByteTokenizerJson(
        [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("i", "n"), ("Ġ", "s")]);

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
