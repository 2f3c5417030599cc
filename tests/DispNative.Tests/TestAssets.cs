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

    /// <summary>Writes a random-weight HF model directory (config, sharded safetensors, byte-level tokenizer);
    /// <paramref name="edit"/> may change the weights first.</summary>
    public static string WriteTinyModel(string? dir = null, ulong seed = 1, DType dtype = DType.F32, long maxShardBytes = 40_000,
        Action<ModelWeights>? edit = null)
    {
        dir ??= TempDir();
        var config = TinyConfig();
        var weights = ModelWeights.Random(config, seed, std: 0.1f);
        edit?.Invoke(weights);
        SafeTensorsWriter.WriteSharded(dir, weights.ToTensors(config, dtype).ToList(), maxShardBytes);
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJson().ToJsonString());
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), ByteLevelTokenizerJson().ToJsonString());
        return dir;
    }

    /// <summary>A llama2.c file: header, then the tensors in llama2.c's order, each element numbered (its index / 1000);
    /// a negative vocabulary size means a separate classifier after the (unused) RoPE tables.</summary>
    public static string Llama2cFile(int dim, int hidden, int layers, int heads, int kvHeads, int vocab, int seqLen, bool shared)
    {
        int headDim = dim / heads, kvDim = kvHeads * headDim, v = Math.Abs(vocab);
        long floats = (long)v * dim + layers * (2L * dim + 2L * dim * dim + 2L * dim * kvDim + 3L * dim * hidden) + dim + (long)seqLen * headDim + (shared ? 0 : (long)v * dim);
        var bytes = new List<byte>(new[] { dim, hidden, layers, heads, kvHeads, shared ? v : -v, seqLen }.SelectMany(BitConverter.GetBytes));
        for (long i = 0; i < floats; i++) bytes.AddRange(BitConverter.GetBytes(i / 1000f));
        var path = Path.Combine(TempDir(), "m.bin");
        File.WriteAllBytes(path, bytes.ToArray());
        return path;
    }

    /// <summary>A llama2.c tokenizer.bin: &lt;unk&gt;, &lt;s&gt;, &lt;/s&gt;, the 256 byte pieces &lt;0xNN&gt;, then
    /// <paramref name="merges"/> scored by their order (earlier merges first).</summary>
    public static string Llama2cTokenizerFile(string dir, params string[] merges)
    {
        var pieces = new List<string> { "<unk>", "<s>", "</s>" };
        pieces.AddRange(Enumerable.Range(0, 256).Select(b => $"<0x{b:X2}>"));
        pieces.AddRange(merges);
        var bytes = new List<byte>(BitConverter.GetBytes(pieces.Max(p => System.Text.Encoding.UTF8.GetByteCount(p))));
        for (int i = 0; i < pieces.Count; i++)
        {
            var utf8 = System.Text.Encoding.UTF8.GetBytes(pieces[i]);
            bytes.AddRange(BitConverter.GetBytes(i < 259 ? 0f : -(i - 259f)));
            bytes.AddRange(BitConverter.GetBytes(utf8.Length));
            bytes.AddRange(utf8);
        }
        var path = Path.Combine(dir, "tokenizer.bin");
        File.WriteAllBytes(path, bytes.ToArray());
        return path;
    }
}
