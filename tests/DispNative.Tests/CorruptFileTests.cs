using System.Buffers.Binary;
using System.Text;
using System.Text.Json.Nodes;
using DispNative.Engine;
using DispNative.Engine.Disp;
using DispNative.Engine.IO;
using DispNative.Engine.Models;
using DispNative.Engine.Training;

namespace DispNative.Tests;

/// <summary>Seeded random damage to every kind of file the engine reads: using it (loading, and a forward pass, a pruning
/// plan or a resumed step when it loads) either works or ends in the engine's own error, never in another exception
/// (which the CLI would print as a crash trace). When first run they found such crashes in a dense model's files, in
/// llama2.c files, in the training log, and (structured damage) in tokenizer.json and a pruned config.json; each was
/// fixed with its own test elsewhere.</summary>
public class CorruptFileTests
{
    /// <summary>A directory holding undamaged files, and what a user does with it.</summary>
    private sealed record Target(string Dir, Action<string> Use);

    private static readonly Lazy<Dictionary<string, Target>> Targets = new(() =>
    {
        static void Run(LoadedModel m) => m.Model.Forward(m.Tokenizer.Encode("the cat sat"), m.Model.NewCache(16));
        var dense = TestAssets.WriteTinyModel(maxShardBytes: long.MaxValue);
        var sharded = TestAssets.WriteTinyModel(maxShardBytes: 40_000);

        var c = TestAssets.TinyConfig();
        var layout = new SiteLayout(c, PruningMode.Disp);
        var rng = new Rng(3);
        var plan = PruningPlan.FromMasks(layout, layout.OutputWidths.Select(w => Enumerable.Range(0, w).Select(i => i == 0 || rng.NextDouble() < 0.6).ToArray()).ToList());
        var (pc, pw) = Pruner.Apply(c, ModelWeights.Random(c, 21, std: 0.15f), plan, "disp", 0.4, "tiny");
        var pruned = TestAssets.TempDir();
        SafeTensorsWriter.Write(Path.Combine(pruned, "model.safetensors"), pw.ToTensors(pc, DType.F32).ToList());
        File.WriteAllText(Path.Combine(pruned, "config.json"), pc.ToJson().ToJsonString());
        File.WriteAllText(Path.Combine(pruned, "tokenizer.json"), TestAssets.ByteLevelTokenizerJson().ToJsonString());

        var training = TestAssets.TempDir();
        var tc = TestAssets.TinyConfig(vocab: 64);
        var tw = ModelWeights.Random(tc, 3, std: 0.2f);
        var blocks = Calibration.Blocks(Enumerable.Range(0, 64).Select(i => 3 + i % 60).ToArray(), 16);
        var options = new TrainingOptions { Steps = 2, LogEvery = 1, CheckpointEvery = 1, Seed = 11 };
        new HypernetworkTrainer(tc, tw, options).Train(blocks, training);

        var llama2c = Path.GetDirectoryName(TestAssets.Llama2cFile(8, 12, 1, 2, 1, 264, 16, shared: true))!;
        TestAssets.Llama2cTokenizerFile(llama2c, "th", "the", "at");

        return new()
        {
            ["dense"] = new(dense, d => Run(ModelLoader.Load(d))),
            ["sharded"] = new(sharded, d => Run(ModelLoader.Load(d))),
            ["pruned"] = new(pruned, d => Run(ModelLoader.Load(d))),
            ["llama2c"] = new(llama2c, d => Run(ModelLoader.Load(Path.Combine(d, "m.bin"), Path.Combine(d, "tokenizer.bin")))),
            ["training"] = new(training, d =>
            {
                SavedHypernetwork.Load(Path.Combine(d, HypernetworkTrainer.HypernetworkFile), tc).Plan(deterministic: false);
                new HypernetworkTrainer(tc, tw, options with { Steps = 3 }).Train(blocks, d);
            }),
        };
    });

    [TestCase("dense", "model.safetensors", 0)]
    [TestCase("dense", "model.safetensors", 1)]
    [TestCase("dense", "config.json", 2)]
    [TestCase("dense", "tokenizer.json", 3)]
    [TestCase("sharded", "model.safetensors.index.json", 4)]
    [TestCase("sharded", "model-00002-of-00006.safetensors", 5)]
    [TestCase("pruned", "config.json", 6)]
    [TestCase("pruned", "model.safetensors", 7)]
    [TestCase("llama2c", "m.bin", 8)]
    [TestCase("llama2c", "tokenizer.bin", 9)]
    [TestCase("training", HypernetworkTrainer.HypernetworkFile, 10)]
    [TestCase("training", HypernetworkTrainer.CheckpointFile, 11)]
    [TestCase("training", HypernetworkTrainer.LogFile, 12)]
    public void RandomDamage_EndsInAClearError_OrFilesThatWork(string target, string file, int seed)
    {
        var (clean, use) = Targets.Value[target];
        var rng = new Random(seed);
        var original = File.ReadAllBytes(Path.Combine(clean, file));
        bool safetensors = file.EndsWith(".safetensors");
        // The part that describes the rest: a safetensors header, a binary file's leading fields, all of a text file.
        int from = safetensors ? 8 : 0;
        int to = safetensors ? 8 + (int)BinaryPrimitives.ReadUInt64LittleEndian(original) : file.EndsWith(".bin") ? 64 : original.Length;
        var outcomes = new Dictionary<string, int>();
        for (int trial = 0; trial < 200; trial++)
        {
            string outcome = EndsInAClearError(clean, file, Damage(rng, original, from, to, safetensors), use, trial) ? "clear error" : "works";
            outcomes[outcome] = outcomes.GetValueOrDefault(outcome) + 1;
        }
        // The log is read leniently (a cut line ends it), so only its damage may always leave something that works.
        if (file != HypernetworkTrainer.LogFile)
            Assert.That(outcomes.GetValueOrDefault("clear error"), Is.GreaterThan(70), string.Join(", ", outcomes));
    }

    /// <summary>Damage that keeps a JSON file valid JSON: one or two values replaced by another kind of value (null, a
    /// negative or huge number, a string, an empty list or object, the neighbour of a number or a string cut short) or
    /// removed. It reaches the checks behind the parser that byte damage rarely does.</summary>
    [TestCase("dense", "config.json", 20)]
    [TestCase("dense", "tokenizer.json", 21)]
    [TestCase("sharded", "model.safetensors.index.json", 22)]
    [TestCase("pruned", "config.json", 23)]
    [TestCase("dense", "model.safetensors", 24)]
    [TestCase("pruned", "model.safetensors", 25)]
    [TestCase("training", HypernetworkTrainer.HypernetworkFile, 26)]
    [TestCase("training", HypernetworkTrainer.CheckpointFile, 27)]
    public void StructuredDamage_EndsInAClearError_OrFilesThatWork(string target, string file, int seed)
    {
        var (clean, use) = Targets.Value[target];
        var rng = new Random(seed);
        // A safetensors file's JSON is its header; the tensor bytes after it stay as they are.
        var bytes = File.ReadAllBytes(Path.Combine(clean, file));
        bool safetensors = file.EndsWith(".safetensors");
        int headerEnd = safetensors ? 8 + (int)BinaryPrimitives.ReadUInt64LittleEndian(bytes) : bytes.Length;
        string original = Encoding.UTF8.GetString(bytes, safetensors ? 8 : 0, headerEnd - (safetensors ? 8 : 0));
        int clear = 0;
        for (int trial = 0; trial < 150; trial++)
        {
            var root = JsonNode.Parse(original)!;
            var slots = new List<(JsonNode Parent, object Key)>();
            void Walk(JsonNode? n)
            {
                if (n is JsonObject o) foreach (var (k, v) in o.ToList()) { slots.Add((o, k)); Walk(v); }
                else if (n is JsonArray a) for (int i = 0; i < a.Count; i++) { slots.Add((a, i)); Walk(a[i]); }
            }
            Walk(root);
            for (int edits = rng.Next(1, 3); edits > 0; edits--)
            {
                var (parent, key) = slots[rng.Next(slots.Count)];
                if (parent is JsonObject o && o.ContainsKey((string)key))
                {
                    if (rng.Next(6) == 0) o.Remove((string)key); else o[(string)key] = OtherValue(rng, o[(string)key]);
                }
                else if (parent is JsonArray a && (int)key < a.Count)
                {
                    if (rng.Next(6) == 0) a.RemoveAt((int)key); else a[(int)key] = OtherValue(rng, a[(int)key]);
                }
            }
            var json = Encoding.UTF8.GetBytes(root.ToJsonString());
            byte[] damaged = safetensors ? [.. BitConverter.GetBytes((ulong)json.Length), .. json, .. bytes[headerEnd..]] : json;
            if (EndsInAClearError(clean, file, damaged, use, trial)) clear++;
        }
        Assert.That(clear, Is.GreaterThan(50));
    }

    /// <summary>Uses a copy of <paramref name="clean"/> with <paramref name="file"/> replaced by <paramref name="damaged"/>:
    /// true when that ends in the engine's own error, false when it works; any other exception fails the test.</summary>
    private static bool EndsInAClearError(string clean, string file, byte[] damaged, Action<string> use, int trial)
    {
        var dir = TestAssets.TempDir();
        foreach (var f in Directory.GetFiles(clean)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        File.WriteAllBytes(Path.Combine(dir, file), damaged);
        try
        {
            use(dir);
            return false;
        }
        catch (DispNativeException) { return true; }
        catch (Exception e)
        {
            Assert.Fail($"trial {trial}: {e.GetType().Name}: {e.Message}\n{e.StackTrace}");
            throw;
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    private static JsonNode? OtherValue(Random rng, JsonNode? old) => rng.Next(12) switch
    {
        0 => null, 1 => -1, 2 => 0, 3 => int.MaxValue, 4 => 1e300, 5 => "x", 6 => new JsonArray(), 7 => new JsonObject(), 8 => true,
        9 => old is JsonValue v && v.TryGetValue<int>(out int i) ? i + 1 : 7,
        10 => old is JsonValue w && w.TryGetValue<int>(out int j) ? -j : -3,
        _ => old is JsonValue x && x.TryGetValue<string>(out var s) && s.Length > 0 ? s[..^1] : "",
    };

    private static byte[] Damage(Random rng, byte[] original, int from, int to, bool safetensors)
    {
        var bytes = (byte[])original.Clone();
        switch (rng.Next(7))
        {
            case 0:   // random bytes in the describing part
                for (int i = rng.Next(1, 5); i > 0; i--) bytes[rng.Next(from, to)] = (byte)rng.Next(256);
                break;
            case 1:   // JSON punctuation and digits, which keep more of it parseable
                for (int i = rng.Next(1, 4); i > 0; i--) bytes[rng.Next(from, to)] = (byte)"\"{}[],:-019e"[rng.Next(12)];
                break;
            case 2:   // cut short
                bytes = bytes[..rng.Next(bytes.Length)];
                break;
            case 3:   // random bytes anywhere, the data too
                for (int i = rng.Next(1, 5); i > 0; i--) bytes[rng.Next(bytes.Length)] = (byte)rng.Next(256);
                break;
            case 4:   // an aligned int32, in the describing part or anywhere, set to an extreme
                int[] extremes = [0, -1, 1, 255, 256, 1 << 20, -(1 << 20), int.MaxValue, int.MinValue];
                int at = rng.Next(2) == 0 ? from + rng.Next((to - from) / 4) * 4 : rng.Next(bytes.Length / 4) * 4;
                BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(at), extremes[rng.Next(extremes.Length)]);
                break;
            case 5:   // a key of the top JSON object given again
                int brace = Array.IndexOf(bytes, (byte)'{', from);
                if (brace < 0 || brace >= to) goto case 0;
                string json = Encoding.UTF8.GetString(bytes, brace, to - brace);
                if (!json.Contains("\":", StringComparison.Ordinal)) goto case 0;
                string key = json[1..(json.IndexOf("\":", StringComparison.Ordinal) + 1)];
                bytes = [.. bytes[..(brace + 1)], .. Encoding.UTF8.GetBytes(key + ":null,"), .. bytes[(brace + 1)..]];
                if (safetensors) BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)(to - 8 + key.Length + 6));
                break;
            default:  // a digit of the describing text replaced by an extreme number (the header length kept right)
                string text = Encoding.Latin1.GetString(bytes, from, to - from);
                var digits = Enumerable.Range(0, text.Length).Where(i => char.IsAsciiDigit(text[i])).ToList();
                if (digits.Count == 0) goto case 0;
                int p = digits[rng.Next(digits.Count)];
                string[] numbers = ["0", "-1", "1e30", "99999", "2147483648", "4294967296", "9999999999999999999"];
                string number = numbers[rng.Next(numbers.Length)];
                bytes = [.. bytes[..from], .. Encoding.Latin1.GetBytes(text[..p] + number + text[(p + 1)..]), .. bytes[to..]];
                if (safetensors) BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)(to - 8 + number.Length - 1));
                break;
        }
        return bytes;
    }
}
