using DispNative.Engine;
using DispNative.Engine.Inference;

namespace DispNative.Tests;

public class DispEngineTests
{
    [Test]
    public async Task StreamsTheGreedyContinuationAndServesConcurrentReaders()
    {
        var dir = TestAssets.WriteTinyModel();
        using var engine = DispEngine.Load(dir, new DispEngineOptions { Device = "cpu" });
        Assert.That(engine.IsPruned, Is.False);

        var pieces = new List<string>();
        await foreach (var piece in engine.GenerateAsync("the cat", 12)) pieces.Add(piece);
        var m = Engine.Models.ModelLoader.Load(dir);
        var prompt = m.Tokenizer.Encode("the cat");
        var ids = Generator.Generate(m, prompt, 12, new SamplingOptions());
        // Pieces hold back an unfinished UTF-8 sequence at the end (this random model emits stray bytes).
        Assert.That(string.Concat(pieces), Is.EqualTo(m.Tokenizer.Decode(ids)[m.Tokenizer.Decode(prompt).Length..].TrimEnd('\uFFFD')));

        const string text = "the cat sat in the sun and the dog sat in the shade";
        var serial = engine.Perplexity(text, 8);
        var (logProb, tokens) = engine.Score(text);
        Assert.That(tokens, Is.GreaterThan(8));
        var parallel = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => Task.Run(() => engine.Perplexity(text, 8))));
        Assert.That(parallel.Select(r => r.Perplexity), Is.All.EqualTo(serial.Perplexity));
        Assert.That(Math.Exp(-logProb / tokens), Is.GreaterThan(1.0));
        string longText = string.Concat(Enumerable.Repeat(text + " ", 30));   // past the test model's 256 positions
        Assert.That(Assert.Throws<InvalidSettingException>(() => engine.Score(longText))!.Message,
            Does.Contain("exceeds the model's context of 256 positions"));

        engine.Dispose();
        Assert.Throws<ObjectDisposedException>(() => engine.Score(text));
    }
}
