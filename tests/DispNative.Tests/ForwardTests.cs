using System.Text.Json;
using DispNative.Engine;
using DispNative.Engine.Cpu;
using DispNative.Engine.Disp;
using DispNative.Engine.Evaluation;
using DispNative.Engine.Inference;
using DispNative.Engine.IO;
using DispNative.Engine.Models;

namespace DispNative.Tests;

public class ForwardTests
{
    private static LoadedModel? _ref;
    private static LoadedModel Ref => _ref ??= ModelLoader.Load(TestAssets.RefLlama);

    private static JsonElement Golden(string dir) => JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "golden.json"))).RootElement;

    private static int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();
    private static double[] Doubles(JsonElement e) => e.EnumerateArray().Select(x => x.GetDouble()).ToArray();

    [Test]
    public void RefLlama_ForwardStatistics_MatchTransformers()
    {
        var fw = Golden(TestAssets.RefLlama).GetProperty("forward_fp32");
        var ids = Ints(fw.GetProperty("input_ids"));
        var logits = Ref.Model.Forward(ids, Ref.Model.NewCache(ids.Length));
        int v = Ref.Config.VocabSize;
        var argmax = Ints(fw.GetProperty("argmax_per_position"));
        var lse = Doubles(fw.GetProperty("logsumexp_per_position"));
        var l2 = Doubles(fw.GetProperty("l2_norm_per_position"));
        for (int t = 0; t < ids.Length; t++)
        {
            var row = logits.AsSpan(t * v, v);
            double norm = 0;
            foreach (var x in row) norm += (double)x * x;
            Assert.That(Generator.ArgMax(row), Is.EqualTo(argmax[t]), $"argmax at {t}");
            Assert.That(CpuOps.LogSumExp(row), Is.EqualTo(lse[t]).Within(1e-3 * Math.Abs(lse[t])), $"logsumexp at {t}");
            Assert.That(Math.Sqrt(norm), Is.EqualTo(l2[t]).Within(1e-3 * l2[t]), $"L2 at {t}");
        }
        // Individual logits: error within 1e-3 of the row's RMS logit (the scale fp32 rounding follows).
        var first16 = Doubles(fw.GetProperty("logits_last_position_first16"));
        double rms = l2[^1] / Math.Sqrt(v);
        for (int i = 0; i < 16; i++)
            Assert.That(logits[(ids.Length - 1) * v + i], Is.EqualTo(first16[i]).Within(1e-3 * rms), $"logit {i}");
    }

    [Test]
    public void RefLlama_GreedyContinuation_IsIdentical()
    {
        var g = Golden(TestAssets.RefLlama).GetProperty("greedy_fp32");
        var prompt = Ref.Tokenizer.Encode(g.GetProperty("prompt").GetString()!);
        var output = Generator.Generate(Ref, prompt, 24, new SamplingOptions());
        Assert.That(output, Is.EqualTo(Ints(g.GetProperty("ids_prompt_then_24_new"))));
        Assert.That(Ref.Tokenizer.Decode(output), Is.EqualTo(g.GetProperty("text").GetString()));
    }

    [Test]
    public void Stories260K_GreedyContinuation_IsIdentical()
    {
        var dir = TestAssets.Shared("models/stories260K");
        var m = ModelLoader.Load(Path.Combine(dir, "stories260K.bin"), Path.Combine(dir, "tok512.bin"));
        var g = Golden(dir).GetProperty("greedy_fp32");
        var output = Generator.Generate(m, m.Tokenizer.Encode(g.GetProperty("prompt").GetString()!), 48, new SamplingOptions());
        Assert.That(output, Is.EqualTo(Ints(g.GetProperty("ids_prompt_then_48_new"))));
        Assert.That(m.Tokenizer.Decode(output), Is.EqualTo(g.GetProperty("text").GetString()));
    }

    private static LoadedModel Tiny(bool qkvBias = false, bool tied = true)
    {
        var c = TestAssets.TinyConfig(qkvBias: qkvBias, tied: tied);
        var tok = new Engine.Tokenization.HfTokenizer(TestAssets.ByteLevelTokenizerJson(), "tiny");
        return new LoadedModel("tiny", c, tok) { Model = new LlamaModel(c, ModelWeights.Random(c, 3, 0.1f)) };
    }

    private static void AssertClose(float[] actual, float[] expected, double rel, string what)
    {
        Assert.That(actual.Length, Is.EqualTo(expected.Length), what);
        double scale = expected.Max(Math.Abs);
        for (int i = 0; i < actual.Length; i++)
            Assert.That(actual[i], Is.EqualTo(expected[i]).Within(rel * scale), $"{what} [{i}]");
    }

    [TestCase(false)]
    [TestCase(true)]
    public void KvCacheDecode_EqualsFullForward(bool qkvBias)
    {
        var m = Tiny(qkvBias).Model;
        int[] ids = [1, 50, 60, 70, 80, 90, 100, 5, 7];
        var full = m.Forward(ids, m.NewCache(ids.Length));
        var cache = m.NewCache(ids.Length);
        var step = new List<float>(m.Forward(ids[..4], cache));
        for (int t = 4; t < ids.Length; t++) step.AddRange(m.Forward([ids[t]], cache));
        AssertClose(step.ToArray(), full, 1e-5, "incremental vs full");
    }

    /// <summary>With lastOnly the last layer's queries, attention, output projection and MLP run on each sequence's last
    /// row only (its keys and values on every row, for the cache): the logits are the full forward's last row, and the
    /// cache left behind decodes bit for bit as the full forward's. Dense and pruned, with biases, alone and batched,
    /// from position 0 and after cached positions, on both attention paths.</summary>
    [TestCase(false, false, false)]
    [TestCase(true, true, false)]
    [TestCase(false, false, true)]
    [TestCase(true, true, true)]
    public void LastOnly_IsTheFullForwardsLastRow_AndLeavesTheSameCache(bool qkvBias, bool outputBias, bool pruned)
    {
        var c = TestAssets.TinyConfig(qkvBias: qkvBias, tied: false) with { OutputBias = outputBias };
        var w = ModelWeights.Random(c, 3, 0.1f);
        if (pruned) (c, w) = Pruner.Apply(c, w, PruningTests.RandomPlan(c, PruningMode.Disp, 0.6, 3), "disp", 0.4, null);
        var m = new LlamaModel(c, w);
        int vocab = c.VocabSize;
        int[][] batch = [Enumerable.Range(0, 40).Select(i => 1 + i * 7 % 250).ToArray(), [1, 5, 9], [1], [1, 20, 30, 40]];
        Assert.That(batch[0].Length, Is.GreaterThanOrEqualTo(LlamaModel.GemmAttentionMinRows), "the long prompt's full forward must take the GEMM path");
        var batched = m.Forward(batch, batch.Select(s => m.NewCache(s.Length + 9)).ToArray(), lastOnly: true);
        for (int b = 0; b < batch.Length; b++)
        {
            int[] ids = batch[b];
            var (fullCache, lastCache) = (m.NewCache(ids.Length + 9), m.NewCache(ids.Length + 9));
            var full = m.Forward(ids, fullCache);
            var last = m.Forward(ids, lastCache, lastOnly: true);
            AssertClose(last, full[^vocab..], 1e-5, $"sequence {b}: lastOnly vs the full forward's last row");
            AssertClose(batched[b], last, 1e-5, $"sequence {b}: batched vs alone");
            Assert.That(m.Forward([7], lastCache), Is.EqualTo(m.Forward([7], fullCache)), $"sequence {b}: the next step from either cache");
            // A further chunk after cached positions.
            int[] more = [3, 8, 13, 21, 34, 55, 89, 144];
            full = m.Forward(more, fullCache);
            AssertClose(m.Forward(more, lastCache, lastOnly: true), full[^vocab..], 1e-5, $"sequence {b}: a second chunk");
        }
    }

    /// <summary>ICausalLanguageModel.ForwardLast on the CPU model: the same logits as Forward's last row, in the
    /// caller's buffer, the cache advanced alike; a buffer of another size than the vocabulary is refused.</summary>
    [Test]
    public void ForwardLast_WritesForwardsLastRow_IntoTheCallersBuffer()
    {
        var c = TestAssets.TinyConfig();
        Engine.Inference.ICausalLanguageModel m = new LlamaModel(c, ModelWeights.Random(c, 5, 0.1f));
        var (forwardCache, lastCache) = (m.NewCache(12), m.NewCache(12));
        var buffer = new float[c.VocabSize];
        m.ForwardLast([1, 5, 9], lastCache, buffer);
        Assert.That(buffer, Is.EqualTo(m.Forward([1, 5, 9], forwardCache, lastOnly: true)));
        m.ForwardLast([4], lastCache, buffer);
        Assert.That(buffer, Is.EqualTo(m.Forward([4], forwardCache, lastOnly: true)));
        Assert.That(lastCache.Length, Is.EqualTo(4));
        Assert.That(Assert.Throws<ArgumentException>(() => m.ForwardLast([2], lastCache, new float[c.VocabSize + 1]))!.Message,
            Does.Contain($"not the vocabulary's {c.VocabSize}"));
        Assert.That(lastCache.Length, Is.EqualTo(4), "a refused call leaves the cache as it was");
    }

    /// <summary>The FLOPs KernelBench holds prefill against, counted another way for a dense model: every layer's whole
    /// GEMMs for all rows but the last layer's, where only the key and value projections see every row.</summary>
    [Test]
    public void LastRowPrefillFlops_CountsTheLastLayersQuerySideForOneRow()
    {
        var c = TestAssets.TinyConfig() with { NumLayers = 3 };
        int t = 10, L = c.NumLayers;
        var counts = c.ParameterCounts();
        double perLayer = (counts["attention"] + counts["mlp"]) / (double)L, keysValues = 2.0 * c.HiddenSize * c.KvDim;
        double attention = 2.0 * c.NumHeads * c.HeadDim * t * (t + 1);   // causal, per layer, every row
        double expected = (L - 1) * (2 * perLayer * t + attention)
                          + 2 * keysValues * t + 2 * (perLayer - keysValues) + 4.0 * c.NumHeads * c.HeadDim * t
                          + 2.0 * c.VocabSize * c.HiddenSize;
        Assert.That(c.LastRowPrefillFlops(t), Is.EqualTo(expected).Within(1e-9 * expected));
        int[] half = [24, 24, 24, 40, 24];
        Assert.That(c.LastRowPrefillFlops(t, _ => half), Is.LessThan(0.6 * expected), "the widths given are the ones counted");
    }

    [Test]
    public void ChunkedPrefillOnGemmsThenDecode_EqualsFullForward()
    {
        Assert.That(LlamaModel.GemmAttentionMinRows, Is.LessThanOrEqualTo(30), "the chunks below must take the GEMM path");
        var m = Tiny().Model;
        int[] ids = Enumerable.Range(0, 70).Select(i => 1 + i * 37 % 250).ToArray();
        var full = m.Forward(ids, m.NewCache(ids.Length));   // 70 rows: attention on GEMM tiles from position 0
        var cache = m.NewCache(ids.Length);
        var step = new List<float>(m.Forward(ids[..30], cache));
        step.AddRange(m.Forward(ids[30..66], cache));          // GEMM tiles after 30 cached positions
        for (int t = 66; t < ids.Length; t++) step.AddRange(m.Forward([ids[t]], cache));
        AssertClose(step.ToArray(), full, 1e-5, "chunked vs full");
    }

    [Test]
    public async Task ConcurrentPrefills_OnAFreshModel_EqualTheSerialOne()
    {
        // The RoPE angle table is built on first use: concurrent first calls must each see a whole table.
        var m = Tiny().Model;
        int[] ids = Enumerable.Range(0, 48).Select(i => 1 + i * 11 % 250).ToArray();
        var together = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => Task.Run(() => m.Forward(ids, m.NewCache(ids.Length)))));
        var serial = m.Forward(ids, m.NewCache(ids.Length));
        foreach (var logits in together) Assert.That(logits, Is.EqualTo(serial));
    }

    [Test]
    public void AReusedWorkspace_LeavesNoTrace()
    {
        // The model keeps its activation buffers between forwards: a batch, a prefill and a decode step after a longer
        // forward (larger buffers, full of its values) equal the same calls on a fresh model, bit for bit.
        var (warm, fresh) = (Tiny(tied: false).Model, Tiny(tied: false).Model);
        int[] longSeq = Enumerable.Range(0, 40).Select(i => 1 + i * 7 % 250).ToArray();
        warm.Forward(longSeq, warm.NewCache(longSeq.Length));
        int[][] batch = [[1, 5, 9], [1, 20, 30, 40, 50]];
        var a = warm.Forward(batch, batch.Select(b => warm.NewCache(b.Length)).ToArray());
        var b = fresh.Forward(batch, batch.Select(s => fresh.NewCache(s.Length)).ToArray());
        for (int i = 0; i < batch.Length; i++) Assert.That(a[i], Is.EqualTo(b[i]), $"sequence {i} of the batch");
        var (cw, cf) = (warm.NewCache(24), fresh.NewCache(24));
        Assert.That(warm.Forward(longSeq[..20], cw), Is.EqualTo(fresh.Forward(longSeq[..20], cf)), "prefill");
        Assert.That(warm.Forward([7], cw), Is.EqualTo(fresh.Forward([7], cf)), "decode step");
    }

    [Test]
    public void BatchedForward_EqualsOneSequenceAtATime()
    {
        var m = Tiny(tied: false).Model;
        int[][] batch = [[1, 5, 9], [1, 20, 30, 40, 50, 60, 70, 80, 90, 11], [1, 2]];
        var together = m.Forward(batch, batch.Select(b => m.NewCache(b.Length)).ToArray());
        for (int b = 0; b < batch.Length; b++)
            AssertClose(together[b], m.Forward(batch[b], m.NewCache(batch[b].Length)), 1e-5, $"sequence {b}");
    }

    [TestCase(DType.F32)]
    [TestCase(DType.BF16)]
    public void SaveThenLoad_GivesIdenticalLogits(DType dtype)
    {
        var dir = TestAssets.WriteTinyModel(dtype: dtype);
        var loaded = ModelLoader.Load(dir);
        var c = loaded.Config;
        var original = ModelWeights.Random(c, 1, 0.1f);
        if (dtype == DType.BF16) original = RoundTripBf16(original, c);
        int[] ids = [1, 3, 99, 250, 17];
        var expected = new LlamaModel(c, original).Forward(ids, new KvCache(c, 8));
        Assert.That(loaded.Model.Forward(ids, loaded.Model.NewCache(8)), Is.EqualTo(expected));
    }

    /// <summary>A tied model whose checkpoint also stores lm_head.weight: an identical copy is dropped (the head is the
    /// embedding again), a head that differs is the one the logits use.</summary>
    [TestCase(true)]
    [TestCase(false)]
    public void ATiedModelsStoredHead_IsDroppedWhenACopy_AndUsedWhenItDiffers(bool copy)
    {
        var c = TestAssets.TinyConfig();
        var w = ModelWeights.Random(c, 1, 0.1f);
        var head = copy ? (float[])w.Embedding.Clone() : ModelWeights.Random(TestAssets.TinyConfig(tied: false), 2, 0.1f).LmHead;
        var dir = TestAssets.TempDir();
        SafeTensorsWriter.WriteSharded(dir, [.. w.ToTensors(c, DType.F32), TensorData.FromFloat("lm_head.weight", head, [c.VocabSize, c.HiddenSize])], long.MaxValue);
        using var ckpt = SafeTensorsCheckpoint.Open(dir);
        var loaded = ModelWeights.Load(ckpt, c);
        Assert.That(ReferenceEquals(loaded.LmHead, loaded.Embedding), Is.EqualTo(copy));
        Assert.That(loaded.LmHead, Is.EqualTo(head));
        int[] ids = [1, 3, 99];
        var untied = new ModelWeights { Embedding = w.Embedding, Layers = w.Layers, FinalNorm = w.FinalNorm, LmHead = head };
        Assert.That(new LlamaModel(c, loaded).Forward(ids, new KvCache(c, 4)), Is.EqualTo(new LlamaModel(c, untied).Forward(ids, new KvCache(c, 4))));
    }

    private static ModelWeights RoundTripBf16(ModelWeights w, ModelConfig c)
    {
        var dir = TestAssets.TempDir();
        SafeTensorsWriter.WriteSharded(dir, w.ToTensors(c, DType.BF16).ToList(), long.MaxValue);
        using var ckpt = SafeTensorsCheckpoint.Open(dir);
        return ModelWeights.Load(ckpt, c);
    }

    [Test]
    public void CacheOverflow_AndEmptySequence_AreClearErrors()
    {
        var m = Tiny().Model;
        Assert.Throws<InvalidSettingException>(() => m.Forward([1, 2, 3], m.NewCache(2)));
        Assert.Throws<InvalidSettingException>(() => m.Forward([], m.NewCache(2)));
        Assert.That(Assert.Throws<InvalidSettingException>(() => m.NewCache(0))!.Message, Is.EqualTo("KV cache capacity must be positive (got 0)"));
        Assert.That(Assert.Throws<ArgumentException>(() => m.Forward([[1, 2]], [m.NewCache(4), m.NewCache(4)]))!.Message,
            Is.EqualTo("one KV cache per sequence is required"));
    }

    [Test]
    public void AResetCache_ServesANewSequenceAsAFreshOne()
    {
        var m = Tiny().Model;
        var cache = m.NewCache(8);
        m.Forward([5, 9, 11, 7], cache);
        cache.Reset();
        Assert.That(cache.Length, Is.Zero);
        Assert.That(m.Forward([3, 4, 8], cache), Is.EqualTo(m.Forward([3, 4, 8], m.NewCache(8))));
        Assert.That(cache.Length, Is.EqualTo(3));
    }

    [Test]
    public void ArgMax_TakesTheFirstOfTiedMaxima_AsTorchDoes()
    {
        Assert.That(Generator.ArgMax([1f, 3f, 3f, 0f]), Is.EqualTo(1));
        Assert.That(Generator.ArgMax([5f, 5f]), Is.EqualTo(0));
    }

    /// <summary>A model that decodes greedily "on its device" (<see cref="IGreedyDecoding"/>): the CPU model underneath,
    /// each decoder step its forward and argmax; it counts what the generator asked of it.</summary>
    private sealed class DeviceGreedy(LlamaModel cpu) : ICausalLanguageModel, IGreedyDecoding
    {
        private ICausalLanguageModel Cpu => cpu;
        public readonly List<(int First, int Steps)> Started = [];
        public int Read, Disposed;
        public ModelConfig Config => cpu.Config;
        public string DeviceName => "fake device";
        public IInferenceCache NewCache(int capacity) => cpu.NewCache(capacity);
        public float[] Forward(ReadOnlySpan<int> tokens, IInferenceCache cache, bool lastOnly = false) => Cpu.Forward(tokens, cache, lastOnly);

        public IGreedyDecoder DecodeGreedy(IInferenceCache cache, int firstToken, int steps)
        {
            Started.Add((firstToken, steps));
            return new Decoder(this, cache, firstToken, steps);
        }

        private sealed class Decoder(DeviceGreedy owner, IInferenceCache cache, int token, int steps) : IGreedyDecoder
        {
            public int Next()
            {
                Assert.That(steps-- > 0, "read past the steps asked for");
                owner.Read++;
                return token = Generator.ArgMax(owner.Forward([token], cache, lastOnly: true));
            }
            public void Dispose() => owner.Disposed++;
        }
    }

    [Test]
    public void GreedyGeneration_ThroughADeviceDecoder_GivesTheHostsTokens_StopsAtEos_AndDisposesIt()
    {
        var m = Tiny();
        int[] prompt = [1, 40, 41];
        const int n = 12;
        var want = Generator.Generate(m, prompt, n, new SamplingOptions());
        var device = new DeviceGreedy(m.Model);
        var viaDevice = m with { Runner = device };
        Assert.That(Generator.Generate(viaDevice, prompt, n, new SamplingOptions()), Is.EqualTo(want));
        // The first token from the prompt's logits on the host, the other n - 1 from one decoder, disposed at the end.
        Assert.That(device.Started, Is.EqualTo(new[] { (want[prompt.Length], n - 1) }));
        Assert.That((device.Read, device.Disposed), Is.EqualTo((n - 1, 1)));

        // An EOS among the decoder's tokens ends the generation there (the EOS included); so does a consumer that stops.
        int eosAt = Enumerable.Range(prompt.Length + 2, n - 2).First(i => want[..i].All(t => t != want[i]));
        var withEos = viaDevice with { Config = m.Config with { EosTokenIds = [want[eosAt]] } };
        Assert.That(Generator.Generate(withEos, prompt, n, new SamplingOptions()), Is.EqualTo(want[..(eosAt + 1)]));
        Assert.That(device.Disposed, Is.EqualTo(2));
        Assert.That(Generator.Stream(viaDevice, prompt, n, new SamplingOptions()).Take(4), Is.EqualTo(want[prompt.Length..(prompt.Length + 4)]));
        Assert.That((device.Started.Count, device.Disposed), Is.EqualTo((3, 3)));
        // Sampling, and a single new token, need no decoder.
        Generator.Generate(viaDevice, prompt, n, new SamplingOptions(false, 1.5f, 0.95f, 42));
        Generator.Generate(viaDevice, prompt, 1, new SamplingOptions());
        Assert.That(device.Started.Count, Is.EqualTo(3));
    }

    [Test]
    public void Sampling_IsSeededAndRespectsTopP()
    {
        var m = Tiny();
        int[] prompt = [1, 40, 41];
        var a = Generator.Generate(m, prompt, 12, new SamplingOptions(false, 1.5f, 0.95f, 42));
        var b = Generator.Generate(m, prompt, 12, new SamplingOptions(false, 1.5f, 0.95f, 42));
        var c = Generator.Generate(m, prompt, 12, new SamplingOptions(false, 1.5f, 0.95f, 43));
        Assert.That(a, Is.EqualTo(b));
        Assert.That(a, Is.Not.EqualTo(c));
        // A tiny top-p keeps only the most likely token: sampling equals greedy.
        Assert.That(Generator.Generate(m, prompt, 12, new SamplingOptions(false, 1f, 1e-6f, 7)),
            Is.EqualTo(Generator.Generate(m, prompt, 12, new SamplingOptions())));
        Assert.Throws<InvalidSettingException>(() => new SamplingOptions(false, 0f, 0.9f).Validate());
        Assert.Throws<InvalidSettingException>(() => new SamplingOptions(false, 1f, 1.5f).Validate());
        Assert.Throws<InvalidSettingException>(() => new SamplingOptions(false, 1f, 0f).Validate());
        Assert.DoesNotThrow(() => new SamplingOptions(false, 1f, 1f).Validate(), "top-p 1: the whole distribution");
        Assert.That(Assert.Throws<InvalidSettingException>(() => Generator.Stream(m, prompt, -1, new SamplingOptions()))!.Message,
            Is.EqualTo("max new tokens must be non-negative (got -1)"));
        Assert.That(Generator.Generate(m, prompt, 0, new SamplingOptions()), Is.EqualTo(prompt));
    }

    /// <summary>Text to score is BOS then the text's tokens (no other specials); BOS and EOS come from config.json when it
    /// names them, else from the tokenizer.</summary>
    [Test]
    public void ScoringIds_AreBosThenTheText_WithBosAndEosFromTheConfigFirst()
    {
        var m = Tiny();
        var text = m.Tokenizer.Encode("the cat", addSpecialTokens: false);
        Assert.That(m.EncodeForScoring("the cat"), Is.EqualTo(new[] { 1 }.Concat(text)));
        var other = m with { Config = m.Config with { BosTokenId = 7, EosTokenIds = [9, 10] } };
        Assert.That((other.BosId, other.EosIds), Is.EqualTo(((int?)7, new[] { 9, 10 })));
        Assert.That(other.EncodeForScoring("the cat"), Is.EqualTo(new[] { 7 }.Concat(text)));
        var fromTokenizer = m with { Config = m.Config with { BosTokenId = null, EosTokenIds = [] } };
        Assert.That((fromTokenizer.BosId, fromTokenizer.EosIds), Is.EqualTo((m.Tokenizer.BosId, m.Tokenizer.EosIds)));
        Assert.That(m.Tokenizer.BosId, Is.Not.Null);
    }

    /// <summary>A tokenizer may name fewer tokens than the model's vocabulary (padded embeddings), never more.</summary>
    [Test]
    public void ATokenizerLargerThanTheVocabulary_IsRefused()
    {
        int tokens = new Engine.Tokenization.HfTokenizer(TestAssets.ByteLevelTokenizerJson(), "t").VocabSize;
        string Write(int vocab)
        {
            var dir = TestAssets.TempDir();
            var c = TestAssets.TinyConfig(vocab: vocab);
            Engine.IO.SafeTensorsWriter.WriteSharded(dir, ModelWeights.Random(c, 1).ToTensors(c, Engine.IO.DType.F32).ToList(), long.MaxValue);
            File.WriteAllText(Path.Combine(dir, "config.json"), c.ToJson().ToJsonString());
            File.WriteAllText(Path.Combine(dir, "tokenizer.json"), TestAssets.ByteLevelTokenizerJson().ToJsonString());
            return dir;
        }
        Assert.That(ModelLoader.Load(Write(tokens)).Tokenizer.VocabSize, Is.EqualTo(tokens));
        var small = Write(tokens - 1);
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelLoader.Load(small))!.Message,
            Is.EqualTo($"{small}: the tokenizer has {tokens} tokens but the model's vocabulary is {tokens - 1}"));
    }

    /// <summary>Softmax probabilities 0.1, 0.3, 0 and 0.6 at temperature 1; at temperature T they go as p^(1/T); top-p keeps
    /// the most likely tokens until their mass reaches p (0.6 + 0.3 for 0.8) and renormalizes.</summary>
    [TestCase(1f, 1f, 0.1, 0.3, 0.6)]
    [TestCase(0.5f, 1f, 1 / 46.0, 9 / 46.0, 36 / 46.0)]
    [TestCase(2f, 1f, 0.19300, 0.33429, 0.47271)]
    [TestCase(1f, 0.8f, 0.0, 1 / 3.0, 2 / 3.0)]
    public void Sample_FollowsTheSoftmaxDistribution_AtTheTemperature_WithinTopP(float temperature, float topP, double p0, double p1, double p3)
    {
        float[] logits = [0f, MathF.Log(3f), float.NegativeInfinity, MathF.Log(6f)];
        var rng = new Rng(1);
        var counts = new int[4];
        const int n = 40000;
        for (int i = 0; i < n; i++) counts[Generator.Sample(logits, new SamplingOptions(false, temperature, topP), rng)]++;
        Assert.That(counts[2], Is.Zero);
        if (p0 == 0) Assert.That(counts[0], Is.Zero, "outside top-p");
        Assert.That(counts.Select(c => c / (double)n), Is.EqualTo(new[] { p0, p1, 0, p3 }).Within(0.01));
    }

    [Test]
    public void Generation_StopsAfterTheFirstEndOfSequenceToken()
    {
        var m = Tiny();
        int[] prompt = [1, 40, 41];
        var free = Generator.Generate(m, prompt, 12, new SamplingOptions());
        int eos = free[prompt.Length + 4];
        int first = Array.IndexOf(free, eos, prompt.Length);     // the first time greedy decoding emits it
        var stopped = Generator.Generate(m with { Config = m.Config with { EosTokenIds = [eos] } }, prompt, 12, new SamplingOptions());
        Assert.That(stopped, Is.EqualTo(free[..(first + 1)]), "up to and including the end-of-sequence token");
        Assert.That(stopped.Length, Is.LessThan(free.Length));
    }

    [Test]
    public void Generation_StopsAtTheNextTokenWhenCancelled()
    {
        var m = Tiny();
        using var cts = new CancellationTokenSource();
        var produced = new List<int>();
        Assert.Throws<OperationCanceledException>(() => Generator.Generate(m, [1, 40, 41], 12, new SamplingOptions(),
            id => { produced.Add(id); if (produced.Count == 2) cts.Cancel(); }, cts.Token));
        Assert.That(produced, Is.EqualTo(Generator.Generate(m, [1, 40, 41], 2, new SamplingOptions())[3..]));
    }

    /// <summary>Logits that are not numbers (here a final norm that overflows them) end generation and scoring with the
    /// reason, instead of a sampling crash, a token argmax picks at random, or a NaN perplexity.</summary>
    [Test]
    public void NonFiniteLogits_EndGenerationAndScoring_WithTheReason()
    {
        var m = Tiny();
        var w = m.Model.Weights;
        var overflowing = new LlamaModel(m.Config, new ModelWeights
        {
            Embedding = w.Embedding, Layers = w.Layers, LmHead = w.LmHead, FinalNorm = Enumerable.Repeat(3e38f, w.FinalNorm.Length).ToArray(),
        });
        var broken = m with { Model = overflowing };
        foreach (var sampling in new[] { new SamplingOptions(), new SamplingOptions(Greedy: false) })
            Assert.That(Assert.Throws<DispNativeException>(() => Generator.Generate(broken, [1, 40, 41], 4, sampling))!.Message,
                Does.StartWith("the model's logits at position 2 are not finite (token "));
        Assert.That(Assert.Throws<DispNativeException>(() => Perplexity.Evaluate(overflowing, [1, 40, 41, 42], 4))!.Message,
            Does.StartWith("the model's logits at position 0 of a block are not finite"));
        Assert.That(Perplexity.Evaluate(m.Model, [1, 40, 41, 42], 4).Perplexity, Is.GreaterThan(1), "the same model with its own norm scores");
    }
}
