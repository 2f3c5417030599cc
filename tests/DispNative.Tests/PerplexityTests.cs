using DispNative.Engine;
using DispNative.Engine.Evaluation;
using DispNative.Engine.Inference;
using DispNative.Engine.Models;

namespace DispNative.Tests;

public class PerplexityTests
{
    [Test]
    public void Blocks_AreConsecutive_LastMayBeShorter_SingletonsDropped()
    {
        int[] ids = Enumerable.Range(0, 11).ToArray();
        var blocks = Perplexity.Blocks(ids, 4);
        Assert.That(blocks.Select(b => b.Length), Is.EqualTo(new[] { 4, 4, 3 }));
        Assert.That(blocks.SelectMany(b => b), Is.EqualTo(ids));
        Assert.That(Perplexity.Blocks(Enumerable.Range(0, 9).ToArray(), 4).Count, Is.EqualTo(2), "a last block of one token scores nothing");
        Assert.That(Perplexity.Blocks(ids, 4, maxBlocks: 2).Count, Is.EqualTo(2));
    }

    [Test]
    public void Perplexity_IsExpOfMeanNll_OverTokensOneToNMinusOne()
    {
        var c = TestAssets.TinyConfig();
        var model = new LlamaModel(c, ModelWeights.Random(c, 5, 0.2f));
        var rng = new Rng(9);
        int[] ids = Enumerable.Range(0, 23).Select(_ => rng.NextInt(c.VocabSize)).ToArray();
        var result = Perplexity.Evaluate(model, ids, blockSize: 8);

        // Reference: each block from position 0, softmax in double, score t+1 given ..t.
        double nll = 0; long scored = 0;
        foreach (var block in new[] { ids[..8], ids[8..16], ids[16..] })
        {
            var logits = model.Forward(block, model.NewCache(block.Length));
            for (int t = 0; t + 1 < block.Length; t++)
            {
                var row = logits.Skip(t * c.VocabSize).Take(c.VocabSize).Select(x => (double)x).ToArray();
                double max = row.Max();
                double logZ = max + Math.Log(row.Sum(x => Math.Exp(x - max)));
                nll += logZ - row[block[t + 1]];
                scored++;
            }
        }
        Assert.That(result.ScoredTokens, Is.EqualTo(scored).And.EqualTo(7 + 7 + 6));
        Assert.That(result.Blocks, Is.EqualTo(3));
        Assert.That(result.Perplexity, Is.EqualTo(Math.Exp(nll / scored)).Within(1e-6 * Math.Exp(nll / scored)), "float logsumexp per token");
    }

    [Test]
    public void BadSettings_AreClearErrors()
    {
        var c = TestAssets.TinyConfig();
        var model = new LlamaModel(c, ModelWeights.Random(c, 5));
        Assert.That(Assert.Throws<InvalidSettingException>(() => Perplexity.Evaluate(model, [1, 2, 3], 1))!.Message, Does.Contain("at least 2"));
        Assert.That(Assert.Throws<InvalidSettingException>(() => Perplexity.Evaluate(model, [1], 4))!.Message, Does.Contain("nothing to score"));
        Assert.That(Assert.Throws<InvalidSettingException>(() => Perplexity.Evaluate(model, [1, 2, 3], 4, maxBlocks: 0))!.Message,
            Is.EqualTo("max blocks must be positive (got 0)"));
        // A block longer than the model's context is refused even when this text would fit in one shorter block.
        Assert.That(Assert.Throws<InvalidSettingException>(() => Perplexity.Evaluate(model, [1, 2, 3], c.MaxPositionEmbeddings + 1))!.Message,
            Does.StartWith($"block size {c.MaxPositionEmbeddings + 1}"));
    }

    [Test]
    public void RefLlama_WikiText_FirstBlocks_HaveAPlausiblePerplexity()
    {
        var m = ModelLoader.Load(TestAssets.RefLlama);
        var text = File.ReadAllText(TestAssets.Shared("data/wikitext2/test.txt"));
        var ids = m.Tokenizer.Encode(text);
        Assert.That(ids[0], Is.EqualTo(1));
        Assert.That(ids.Count(i => i == 1), Is.EqualTo(1), "BOS only at the very start");
        var r = Perplexity.Evaluate(m.Model, ids, 128, maxBlocks: 2);
        Assert.That(r.ScoredTokens, Is.EqualTo(254));
        Assert.That(r.Perplexity, Is.GreaterThan(5).And.LessThan(5000));
    }
}

public class SpeedProbeTests
{
    [TestCase(1000, 256, 32, 1024, 256, 32)]
    [TestCase(100, 256, 32, 1024, 68, 32)]     // the prompt shrinks to leave the decode tokens in the text
    [TestCase(10, 256, 32, 1024, 1, 9)]
    [TestCase(2000, 1024, 32, 1024, 992, 32)]  // prompt and decode within the context
    public void Plan_KeepsPromptAndDecodeWithinTheTextAndTheContext(int text, int prompt, int decode, int context, int wantPrompt, int wantDecode)
    {
        Assert.That(SpeedProbe.Plan(text, prompt, decode, context), Is.EqualTo(((int, int)?)(wantPrompt, wantDecode)));
    }

    [Test]
    public void Plan_IsNullForATextTooShortToTime()
    {
        Assert.That(SpeedProbe.Plan(1, 256, 32, 1024), Is.Null);
        Assert.That(SpeedProbe.Plan(0, 256, 32, 1024), Is.Null);
    }

    [Test]
    public void Median_OfOddAndEvenCounts()
    {
        Assert.That(SpeedProbe.Median([5, 1, 3]), Is.EqualTo(3));
        Assert.That(SpeedProbe.Median([4, 1, 3, 10]), Is.EqualTo(3.5));
    }

    /// <summary>Every round feeds the same tokens, the text's own: the prompt in one call, then one token per call.</summary>
    [Test]
    public void Measure_FeedsTheTextsTokens_WarmsUp_AndTimesAtLeastTheMinimumRounds()
    {
        var c = TestAssets.TinyConfig();
        var model = new Recording(new LlamaModel(c, ModelWeights.Random(c, 5, 0.2f)));
        int[] ids = Enumerable.Range(1, 40).ToArray();
        var r = SpeedProbe.Measure(model, ids, promptTokens: 30, decodeTokens: 8);
        Assert.That((r.PromptTokens, r.DecodeTokens), Is.EqualTo((30, 8)));
        Assert.That(r.TimedRounds, Is.GreaterThanOrEqualTo(SpeedProbe.Rounds));
        Assert.That(new[] { r.PrefillTokensPerSecond, r.DecodeTokensPerSecond }, Is.All.GreaterThan(0).And.All.LessThan(double.PositiveInfinity));
        var round = new List<int[]> { ids[..30] };
        round.AddRange(Enumerable.Range(30, 8).Select(i => new[] { ids[i] }));
        Assert.That(model.Calls.Count % round.Count, Is.Zero);
        Assert.That(model.Calls.Count / round.Count, Is.GreaterThan(r.TimedRounds), "untimed warm-up rounds come first");
        Assert.That(model.Calls.Chunk(round.Count), Has.All.EqualTo(round));
        Assert.Throws<InvalidSettingException>(() => SpeedProbe.Measure(model, [1], 30, 8));
    }

    private sealed class Recording(ICausalLanguageModel inner) : ICausalLanguageModel
    {
        public readonly List<int[]> Calls = [];
        public ModelConfig Config => inner.Config;
        public string DeviceName => inner.DeviceName;
        public IInferenceCache NewCache(int capacity) => inner.NewCache(capacity);
        public float[] Forward(ReadOnlySpan<int> tokens, IInferenceCache cache, bool lastOnly = false)
        {
            Calls.Add(tokens.ToArray());
            return inner.Forward(tokens, cache, lastOnly);
        }
    }
}
