using System.Buffers.Binary;
using System.Text;
using DispNative.Engine;
using DispNative.Engine.IO;
using DispNative.Engine.Models;

namespace DispNative.Tests;

/// <summary>Seeded random corruption of a model's files: loading (and, when it loads, a forward pass) either works or
/// ends in the engine's own error, never in another exception (which the CLI would print as a crash trace). Each file
/// kind found at least one such crash when this was first run.</summary>
public class CorruptFileTests
{
    private static readonly string Clean = TestAssets.WriteTinyModel(maxShardBytes: long.MaxValue);

    [TestCase("model.safetensors", 0)]
    [TestCase("model.safetensors", 1)]
    [TestCase("config.json", 2)]
    [TestCase("tokenizer.json", 3)]
    public void RandomDamage_EndsInAClearError_OrLoadsAModelThatRuns(string file, int seed)
    {
        var rng = new Random(seed);
        var original = File.ReadAllBytes(Path.Combine(Clean, file));
        int headerEnd = file.EndsWith(".safetensors") ? 8 + (int)BinaryPrimitives.ReadUInt64LittleEndian(original) : original.Length;
        var outcomes = new Dictionary<string, int>();
        for (int trial = 0; trial < 60; trial++)
        {
            var bytes = (byte[])original.Clone();
            switch (rng.Next(4))
            {
                case 0:   // bytes anywhere in the header (all of a JSON file)
                    for (int i = rng.Next(1, 5); i > 0; i--) bytes[rng.Next(file.EndsWith(".safetensors") ? 8 : 0, headerEnd)] = (byte)rng.Next(256);
                    break;
                case 1:   // JSON punctuation and digits, which keep more of it parseable
                    for (int i = rng.Next(1, 4); i > 0; i--) bytes[rng.Next(file.EndsWith(".safetensors") ? 8 : 0, headerEnd)] = (byte)"\"{}[],:-019e"[rng.Next(12)];
                    break;
                case 2:   // cut short
                    bytes = bytes[..rng.Next(bytes.Length)];
                    break;
                default:  // a key of the top object given again
                    int brace = Array.IndexOf(bytes, (byte)'{');
                    string text = Encoding.UTF8.GetString(bytes, brace, headerEnd - brace);
                    int keyEnd = text.IndexOf("\":", StringComparison.Ordinal);
                    string key = text[1..(keyEnd + 1)];
                    bytes = [.. bytes[..(brace + 1)], .. Encoding.UTF8.GetBytes(key + ":null,"), .. bytes[(brace + 1)..]];
                    if (file.EndsWith(".safetensors")) BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)(headerEnd - 8 + key.Length + 6));
                    break;
            }
            var dir = TestAssets.TempDir();
            foreach (var f in Directory.GetFiles(Clean)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
            File.WriteAllBytes(Path.Combine(dir, file), bytes);
            string outcome;
            try
            {
                var m = ModelLoader.Load(dir);
                m.Model.Forward(m.Tokenizer.Encode("the cat sat"), m.Model.NewCache(16));
                outcome = "loaded";
            }
            catch (DispNativeException) { outcome = "clear error"; }
            catch (Exception e)
            {
                Assert.Fail($"trial {trial}: {e.GetType().Name}: {e.Message}");
                throw;
            }
            outcomes[outcome] = outcomes.GetValueOrDefault(outcome) + 1;
        }
        Assert.That(outcomes.GetValueOrDefault("clear error"), Is.GreaterThan(20), string.Join(", ", outcomes));
    }
}
