using DispNative.Engine;
using DispNative.Engine.Cuda;
using DispNative.Engine.Evaluation;
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
        Assert.That(pieces, Has.None.Empty, "a token that completes no character yields no piece");
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
        Assert.That(Assert.Throws<InvalidSettingException>(() => engine.Score(""))!.Message, Does.StartWith("the text is too short to score"));

        engine.Dispose();
        Assert.Throws<ObjectDisposedException>(() => engine.Score(text));
    }

    [Test]
    public void ScoreAndPerplexity_AreTheModelsOwnLogProbabilities()
    {
        var dir = TestAssets.WriteTinyModel();
        using var engine = DispEngine.Load(dir, new DispEngineOptions { Device = "cpu" });
        var m = Engine.Models.ModelLoader.Load(dir);
        const string text = "the cat sat in the sun";
        var ids = m.EncodeForScoring(text);
        var logits = m.Model.Forward(ids, m.Model.NewCache(ids.Length));
        int vocab = m.Config.VocabSize;
        double expected = 0;
        for (int t = 0; t + 1 < ids.Length; t++)
        {
            var row = logits.AsSpan(t * vocab, vocab).ToArray();
            double max = row.Max();
            expected += row[ids[t + 1]] - max - Math.Log(row.Sum(v => Math.Exp(v - max)));
        }
        var (logProb, tokens) = engine.Score(text);
        Assert.That(tokens, Is.EqualTo(ids.Length - 1), "every token after BOS is scored");
        Assert.That(logProb, Is.EqualTo(expected).Within(1e-5 * Math.Abs(expected)));

        var two = engine.Perplexity(text, 4, maxBlocks: 2);
        Assert.That((two.Blocks, two.ScoredTokens), Is.EqualTo((2, 6)));
        Assert.That(two.Perplexity, Is.EqualTo(Perplexity.Evaluate(m.Model, ids, 4, 2).Perplexity));
    }

    [Test]
    public async Task ACallCancelledByItsCaller_EndsInCancellation_NotDisposal_AndTheEngineServesOn()
    {
        using var engine = DispEngine.Load(TestAssets.WriteTinyModel(), new DispEngineOptions { Device = "cpu" });
        const string text = "the cat sat in the sun and the dog sat in the shade";
        using var cts = new CancellationTokenSource();
        int blocks = 0;
        Assert.Catch<OperationCanceledException>(() => engine.Perplexity(text, 4,
            progress: new InlineProgress(p => { blocks = p.BlocksDone; if (p.BlocksDone == 2) cts.Cancel(); }), cancellationToken: cts.Token));
        Assert.That(blocks, Is.EqualTo(2), "no block after the cancellation");

        using var streamStop = new CancellationTokenSource();
        var pieces = 0;
        Assert.CatchAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in engine.GenerateAsync("the cat", 40, cancellationToken: streamStop.Token))
                if (++pieces == 1) streamStop.Cancel();
        });
        Assert.That(pieces, Is.EqualTo(1));
        Assert.That(engine.Score(text).Tokens, Is.GreaterThan(1));
        await foreach (var _ in engine.GenerateAsync("the cat", 2)) { }
    }

    /// <summary>Runs <paramref name="onReport"/> on the reporting thread (<see cref="Progress{T}"/> would post it).</summary>
    private sealed class InlineProgress(Action<PerplexityProgress> onReport) : IProgress<PerplexityProgress>
    {
        public void Report(PerplexityProgress value) => onReport(value);
    }

    [TestCase("cpu")]
    [TestCase("cuda")]
    public async Task Dispose_StopsAndWaitsForTheCallsInProgress_AndRefusesNewOnes(string device)
    {
        if (device == "cuda" && CudaDevice.Unavailable() is string reason) Assert.Ignore($"no CUDA device: {reason}");
        var dir = TestAssets.WriteTinyModel();
        var engine = DispEngine.Load(dir, new DispEngineOptions { Device = device, DType = "f32" });
        const string text = "the cat sat in the sun and the dog sat in the shade";
        string longText = string.Concat(Enumerable.Repeat(text + " ", 8));   // 40 blocks of 12

        // A stream that has produced a piece holds its KV cache between pieces without holding up Dispose.
        var stream = engine.GenerateAsync("the cat", 40, new SamplingOptions { Greedy = true }).GetAsyncEnumerator();
        Assert.That(await stream.MoveNextAsync(), Is.True);

        using var inside = new ManualResetEventSlim();
        using var goOn = new ManualResetEventSlim();
        int blocksScored = 0;
        var running = Task.Run(() => engine.Perplexity(longText, 12, progress: new InlineProgress(p =>
        {
            blocksScored = p.BlocksDone;
            if (p.BlocksDone == 1) { inside.Set(); goOn.Wait(TimeSpan.FromSeconds(30)); }
        })));
        Assert.That(inside.Wait(TimeSpan.FromSeconds(30)), "the evaluation never reported its first block");

        var disposing = Task.Run(engine.Dispose);
        Assert.That(SpinWait.SpinUntil(() => Refused(() => engine.Score(text)), TimeSpan.FromSeconds(30)),
            "calls made after Dispose began still ran");
        await Task.Delay(200);
        Assert.That(disposing.IsCompleted, Is.False, "Dispose returned while a call was still using the model");

        goOn.Set();
        var stopped = Assert.ThrowsAsync<ObjectDisposedException>(async () => await running);
        Assert.That(stopped!.Message, Does.Contain("disposed while this call ran"));
        Assert.That(blocksScored, Is.EqualTo(1), "the evaluation went on after Dispose began");
        await disposing.WaitAsync(TimeSpan.FromSeconds(30));

        Assert.ThrowsAsync<ObjectDisposedException>(async () => await stream.MoveNextAsync());
        await stream.DisposeAsync();   // the KV cache went with the model: nothing left to free, and no error
        Assert.Throws<ObjectDisposedException>(() => engine.Perplexity(text, 8));
        engine.Dispose();
    }

    private static bool Refused(Action call)
    {
        try { call(); return false; }
        catch (ObjectDisposedException) { return true; }
    }

    [Test]
    public void Dispose_FromInsideOneOfItsCalls_IsRefused_NotADeadlock()
    {
        using var engine = DispEngine.Load(TestAssets.WriteTinyModel(), new DispEngineOptions { Device = "cpu" });
        var error = Assert.Throws<InvalidOperationException>(() =>
            engine.Perplexity("the cat sat in the sun", 4, progress: new InlineProgress(_ => engine.Dispose())));
        Assert.That(error!.Message, Does.Contain("inside one of its own calls"));
        Assert.That(engine.Score("the cat sat in the sun").Tokens, Is.GreaterThan(1), "the refused Dispose left the engine usable");
    }
}
