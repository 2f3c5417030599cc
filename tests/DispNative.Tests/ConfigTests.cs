using System.Text.Json.Nodes;
using DispNative.Engine;
using DispNative.Engine.Models;
using DispNative.Engine.Tokenization;

namespace DispNative.Tests;

public class ConfigTests
{
    private static JsonObject Base() => new()
    {
        ["architectures"] = new JsonArray("LlamaForCausalLM"),
        ["hidden_size"] = 64, ["intermediate_size"] = 128, ["num_hidden_layers"] = 2, ["num_attention_heads"] = 4,
        ["num_key_value_heads"] = 2, ["vocab_size"] = 100, ["rms_norm_eps"] = 1e-6, ["rope_theta"] = 500000.0,
    };

    [Test]
    public void RefLlamaConfig_ParsesEveryField()
    {
        var c = ModelConfig.Load(Path.Combine(TestAssets.RefLlama, "config.json"));
        Assert.That((c.HiddenSize, c.IntermediateSize, c.NumLayers, c.NumHeads, c.NumKvHeads, c.HeadDim, c.VocabSize),
            Is.EqualTo((384, 1024, 8, 6, 2, 64, 32000)));
        Assert.That(c.RopeTheta, Is.EqualTo(10000.0), "rope_parameters.rope_theta");
        Assert.That(c.RmsNormEps, Is.EqualTo(1e-5f));
        Assert.That(c.TieWordEmbeddings, Is.True);
        Assert.That(c.BosTokenId, Is.EqualTo(1));
        Assert.That(c.EosTokenIds, Is.EqualTo(new[] { 2 }));
        Assert.That(c.ParameterCounts().Values.Sum(), Is.EqualTo(24877440), "matches the index's total_parameters");
    }

    [Test]
    public void TopLevelRopeTheta_DefaultHeadDim_AndRoundTrip()
    {
        var j = Base(); j["rms_norm_eps"] = 1e-5;   // not the default, so the round trip below has to carry it
        var c = ModelConfig.Parse(j, "cfg");
        Assert.That(c.RopeTheta, Is.EqualTo(500000.0));
        Assert.That(c.RmsNormEps, Is.EqualTo(1e-5f));
        Assert.That(c.HeadDim, Is.EqualTo(16));
        Assert.That(c.QkvBias, Is.False);
        var again = ModelConfig.Parse(c.ToJson(), "cfg2");
        Assert.That(again.RmsNormEps, Is.EqualTo(1e-5f));
        Assert.That(again, Is.EqualTo(c).Using<ModelConfig>((a, b) => a.ToJson().ToJsonString() == b.ToJson().ToJsonString()));
    }

    [Test]
    public void Qwen2_HasQkvBiases_Mistral_HasSlidingWindow()
    {
        var q = Base(); q["architectures"] = new JsonArray("Qwen2ForCausalLM");
        Assert.That(ModelConfig.Parse(q, "q").QkvBias, Is.True);
        var m = Base(); m["architectures"] = new JsonArray("MistralForCausalLM"); m["sliding_window"] = 4096;
        Assert.That(ModelConfig.Parse(m, "m").SlidingWindow, Is.EqualTo(4096));
        // No window stays no window through a save: config.json says null, which is not transformers' 4096 default.
        m["sliding_window"] = null;
        var none = ModelConfig.Parse(m, "m");
        Assert.That((none.SlidingWindow, ModelConfig.Parse(none.ToJson(), "saved").SlidingWindow), Is.EqualTo(((int?)null, (int?)null)));
    }

    /// <summary>transformers 5 writes the weights' type as "dtype", transformers 4 as "torch_dtype".</summary>
    [TestCase("torch_dtype")]
    [TestCase("dtype")]
    public void TheWeightType_IsReadUnderEitherName(string key)
    {
        var j = Base(); j[key] = "bfloat16";
        Assert.That(ModelConfig.Parse(j, "c").WeightDType, Is.EqualTo("bfloat16"));
    }

    /// <summary>A pruned model's disp section is checked against the architecture: its format version, one entry per layer,
    /// every site's width within 1..its full width.</summary>
    [TestCase("no version", "missing format_version")]
    [TestCase("version 2", "format_version 2 is not supported (this build reads 1)")]
    [TestCase("one layer", "widths must list all 2 layers")]
    [TestCase("zero width", "layer 0 attn_in width 0 is outside 1..64")]
    [TestCase("wide middle", "layer 1 mlp_mid width 129 is outside 1..128")]
    [TestCase("missing site", "layer 1 lacks an integer mlp_out")]
    public void ADispSectionThatDoesNotFit_IsNamed(string damage, string message)
    {
        JsonObject Layer(int attnIn = 32, int mlpMid = 100) => new() { ["attn_in"] = attnIn, ["attn_out"] = 32, ["mlp_in"] = 32, ["mlp_mid"] = mlpMid, ["mlp_out"] = 32 };
        var disp = new JsonObject { ["format_version"] = 1, ["widths"] = new JsonArray(Layer(), Layer()) };
        var j = Base(); j["disp"] = disp;
        Assert.That(ModelConfig.Parse(j, "c").Disp!.Widths[1], Is.EqualTo(new[] { 32, 32, 32, 100, 32 }), "the undamaged section");
        switch (damage)
        {
            case "no version": disp.Remove("format_version"); break;
            case "version 2": disp["format_version"] = 2; break;
            case "one layer": disp["widths"] = new JsonArray(Layer()); break;
            case "zero width": disp["widths"] = new JsonArray(Layer(attnIn: 0), Layer()); break;
            case "wide middle": disp["widths"] = new JsonArray(Layer(), Layer(mlpMid: 129)); break;
            case "missing site": var l1 = Layer(); l1.Remove("mlp_out"); disp["widths"] = new JsonArray(Layer(), l1); break;
        }
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(j, "c"))!.Message, Is.EqualTo($"c: disp section: {message}"));
    }

    /// <summary>Fields config.json leaves out take transformers' defaults for the architecture, and survive a round trip.</summary>
    [TestCase("LlamaForCausalLM", 2048, null)]
    [TestCase("MistralForCausalLM", 131072, 4096)]
    [TestCase("Qwen2ForCausalLM", 32768, null)]
    public void MissingFields_TakeTransformersDefaults(string arch, int context, int? window)
    {
        var j = new JsonObject
        {
            ["architectures"] = new JsonArray(arch), ["hidden_size"] = 64, ["intermediate_size"] = 128, ["num_hidden_layers"] = 2,
            ["num_attention_heads"] = 4, ["vocab_size"] = 100,
        };
        var c = ModelConfig.Parse(j, "c");
        Assert.That((c.MaxPositionEmbeddings, c.SlidingWindow, c.NumKvHeads, c.HeadDim, c.RmsNormEps, c.RopeTheta, c.TieWordEmbeddings),
            Is.EqualTo((context, window, 4, 16, 1e-6f, 10000.0, false)));
        var again = ModelConfig.Parse(c.ToJson(), "c2");
        Assert.That((again.MaxPositionEmbeddings, again.SlidingWindow), Is.EqualTo((context, window)));
        j["head_dim"] = 32;
        Assert.That(ModelConfig.Parse(j, "c").HeadDim, Is.EqualTo(32), "an explicit head_dim wins over hidden / heads");
    }

    /// <summary>Llama's attention_bias puts biases on q/k/v and o_proj; Qwen2 has q/k/v biases always and none on o_proj.</summary>
    [TestCase("LlamaForCausalLM", false, false, false)]
    [TestCase("LlamaForCausalLM", true, true, true)]
    [TestCase("Qwen2ForCausalLM", false, true, false)]
    [TestCase("Qwen2ForCausalLM", true, true, false)]
    public void Biases_FollowTheArchitecture(string arch, bool attentionBias, bool qkv, bool output)
    {
        var j = Base(); j["architectures"] = new JsonArray(arch); j["attention_bias"] = attentionBias;
        var c = ModelConfig.Parse(j, "c");
        Assert.That((c.QkvBias, c.OutputBias), Is.EqualTo((qkv, output)));
        var again = ModelConfig.Parse(c.ToJson(), "c2");
        Assert.That((again.QkvBias, again.OutputBias), Is.EqualTo((qkv, output)));
    }

    /// <summary>Qwen2 windows only the layers from max_window_layers (default 28) on: all of them, none, or a mix the
    /// engine refuses; a saved window reads back as one on every layer.</summary>
    [TestCase(0, 1024)]
    [TestCase(2, null)]
    [TestCase(null, null)]
    public void Qwen2_SlidingWindow_CoversTheLayersFromMaxWindowLayers(int? maxWindowLayers, int? window)
    {
        var j = Base(); j["architectures"] = new JsonArray("Qwen2ForCausalLM"); j["use_sliding_window"] = true; j["sliding_window"] = 1024;
        if (maxWindowLayers != null) j["max_window_layers"] = maxWindowLayers;
        var c = ModelConfig.Parse(j, "c");
        Assert.That(c.SlidingWindow, Is.EqualTo(window));
        Assert.That(ModelConfig.Parse(c.ToJson(), "c2").SlidingWindow, Is.EqualTo(window));
        j["use_sliding_window"] = false;
        Assert.That(ModelConfig.Parse(j, "c").SlidingWindow, Is.Null, "no window without use_sliding_window");
    }

    [Test]
    public void Qwen2_AWindowOnSomeLayersOnly_IsRefused()
    {
        var j = Base(); j["architectures"] = new JsonArray("Qwen2ForCausalLM"); j["use_sliding_window"] = true; j["max_window_layers"] = 1;
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(j, "c"))!.Message,
            Is.EqualTo("c: a sliding window on layers 1 to 1 only (max_window_layers) is not supported; the engine applies one window to every layer"));
    }

    [Test]
    public void UnknownArchitecture_IsAClearError()
    {
        var j = Base(); j["architectures"] = new JsonArray("GPTNeoXForCausalLM");
        var e = Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(j, "config.json"));
        Assert.That(e!.Message, Does.Contain("unsupported architecture 'GPTNeoXForCausalLM'").And.Contain("LlamaForCausalLM"));
    }

    [TestCase("hidden_size")]
    [TestCase("num_hidden_layers")]
    [TestCase("vocab_size")]
    public void AMissingOrMistypedRequiredField_IsNamed(string field)
    {
        var j = Base(); j.Remove(field);
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(j, "config.json"))!.Message, Is.EqualTo($"config.json: missing field '{field}'"));
        j[field] = "64";
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(j, "config.json"))!.Message,
            Is.EqualTo($"config.json: field '{field}' must be an integer (got \"64\")"));
    }

    /// <summary>An optional field of the wrong type is an error, not its default.</summary>
    [TestCase("rms_norm_eps", "\"1e-5\"", "field 'rms_norm_eps' must be a number (got \"1e-5\")")]
    [TestCase("max_position_embeddings", "4096.5", "field 'max_position_embeddings' must be an integer (got 4096.5)")]
    [TestCase("tie_word_embeddings", "\"true\"", "field 'tie_word_embeddings' must be true or false (got \"true\")")]
    [TestCase("hidden_act", "[\"silu\"]", "field 'hidden_act' must be a string (got [\"silu\"])")]
    [TestCase("eos_token_id", "[2, \"3\"]", "field 'eos_token_id' must be an integer (got \"3\")")]
    [TestCase("eos_token_id", "\"2\"", "field 'eos_token_id' must be an integer (got \"2\")")]
    [TestCase("rope_scaling", "{\"rope_type\": 3}", "field 'rope_type' must be a string (got 3)")]
    [TestCase("rope_scaling", "\"linear\"", "field 'rope_scaling' must be an object (got \"linear\")")]
    [TestCase("rope_parameters", "[10000]", "field 'rope_parameters' must be an object (got [10000])")]
    [TestCase("disp", "0", "field 'disp' must be an object (got 0)")]
    public void AnOptionalFieldOfTheWrongType_IsNamed(string field, string json, string message)
    {
        var j = Base(); j[field] = JsonNode.Parse(json);
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(j, "c"))!.Message, Is.EqualTo($"c: {message}"));
        j[field] = null;
        Assert.DoesNotThrow(() => ModelConfig.Parse(j, "c"), "null means absent");
    }

    [Test]
    public void ACheckpointWithMoreLayersThanTheConfig_IsRejected()
    {
        var dir = TestAssets.WriteTinyModel();
        var path = Path.Combine(dir, "config.json");
        var j = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        j["num_hidden_layers"] = 1;
        File.WriteAllText(path, j.ToJsonString());
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelLoader.Load(dir))!.Message,
            Is.EqualTo($"{dir}: the checkpoint holds 2 layers, config.json's num_hidden_layers says 1"));
    }

    [Test]
    public void InconsistentHeads_AndUnsupportedRope_AreRejected()
    {
        var j = Base(); j["num_key_value_heads"] = 3;
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(j, "c"))!.Message, Does.Contain("num_key_value_heads"));
        var h = Base(); h["head_dim"] = 7;
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(h, "c"))!.Message, Is.EqualTo("c: head_dim must be a positive even number (got 7)"));
        var r = Base(); r["rope_scaling"] = new JsonObject { ["rope_type"] = "yarn", ["factor"] = 4.0 };
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(r, "c"))!.Message, Does.Contain("yarn"));
    }

    [Test]
    public void Llama2cImport_RejectsWrongSizes()
    {
        var path = Path.Combine(TestAssets.TempDir(), "bad.bin");
        File.WriteAllBytes(path, new byte[10]);
        Assert.That(Assert.Throws<ModelFormatException>(() => Llama2cImport.Load(path))!.Message, Does.Contain("truncated"));
        var header = new[] { 64, 172, 5, 8, 4, 512, 512 }.SelectMany(BitConverter.GetBytes).ToArray();
        File.WriteAllBytes(path, [.. header, .. new byte[1000]]);
        Assert.That(Assert.Throws<ModelFormatException>(() => Llama2cImport.Load(path))!.Message, Does.Contain("does not match the header"));
    }

    /// <summary>Damage found by <see cref="CorruptFileTests"/>-style fuzzing: each ended in an exception of .NET's own.</summary>
    [Test]
    public void Llama2cFiles_DamagedHeadersLengthsAndValues_AreClearErrors()
    {
        var path = TestAssets.Llama2cFile(8, 12, 1, 2, 1, 16, 4, shared: true);
        var good = File.ReadAllBytes(path);
        string Error(byte[] bytes, Action<string> load)
        {
            File.WriteAllBytes(path, bytes);
            return Assert.Throws<ModelFormatException>(() => load(path))!.Message;
        }
        var bytes = (byte[])good.Clone();
        BitConverter.TryWriteBytes(bytes.AsSpan(20), int.MinValue);   // the vocabulary size, whose sign says "shared"
        Assert.That(Error(bytes, p => Llama2cImport.Load(p)), Does.StartWith($"{path}: not a llama2.c checkpoint (header dim=8 hidden=12 layers=1 heads=2 kv_heads=1 vocab=-2147483648"));
        bytes = [.. new[] { 1 << 30, 1 << 30, 1 << 30, 1, 1, 1 << 30, 1 << 30 }.SelectMany(BitConverter.GetBytes), .. good[28..]];
        Assert.That(Error(bytes, p => Llama2cImport.Load(p)), Does.Match(@"does not match the header \(expected \d{28,} bytes\)$"), "no long overflow");
        bytes = (byte[])good.Clone();
        BitConverter.TryWriteBytes(bytes.AsSpan(28 + 4 * 5), float.NaN);
        Assert.That(Error(bytes, p => Llama2cImport.Load(p)), Is.EqualTo($"{path}: float 5 after the header is NaN: weights must be finite (the file is corrupt)"));

        var tokenizer = TestAssets.Llama2cTokenizerFile(TestAssets.TempDir(), "ab");
        var tok = File.ReadAllBytes(tokenizer);
        BitConverter.TryWriteBytes(tok.AsSpan(4 + 4), int.MaxValue);   // piece 0's length: past the end, by more than an int holds
        File.WriteAllBytes(tokenizer, tok);
        Assert.That(Assert.Throws<ModelFormatException>(() => Llama2cTokenizer.Load(tokenizer))!.Message,
            Is.EqualTo($"{tokenizer}: piece 0 has invalid length 2147483647"));
    }

    [Test]
    public void Llama2cImport_ReadsTiedAndSeparateClassifiers_AndRefusesHeadsThatDoNotGroup()
    {
        var (tiedConfig, tied) = Llama2cImport.Load(TestAssets.Llama2cFile(8, 12, 1, 2, 1, 16, 4, shared: true));
        Assert.That((tiedConfig.TieWordEmbeddings, tied.LmHead), Is.EqualTo((true, tied.Embedding)));
        var (config, separate) = Llama2cImport.Load(TestAssets.Llama2cFile(8, 12, 1, 2, 1, 16, 4, shared: false));
        Assert.That((config.TieWordEmbeddings, config.VocabSize, config.NumKvHeads, config.MaxPositionEmbeddings), Is.EqualTo((false, 16, 1, 4)));
        // The classifier comes after embedding, the layer, the final norm and 4 positions × head_dim 4 of RoPE tables.
        long first = 16 * 8 + (2 * 8 + 2 * 64 + 2 * 8 * 4 + 3 * 8 * 12) + 8 + 4 * 4;
        Assert.That(separate.LmHead, Is.EqualTo(Enumerable.Range(0, 16 * 8).Select(i => (first + i) / 1000f)));
        Assert.That(separate.Embedding[5], Is.EqualTo(5 / 1000f));

        var path = TestAssets.Llama2cFile(12, 12, 1, 4, 3, 16, 4, shared: true);
        Assert.That(Assert.Throws<ModelFormatException>(() => Llama2cImport.Load(path))!.Message, Does.StartWith($"{path}: not a llama2.c checkpoint (header dim=12"));
    }

    [Test]
    public void Llama2cPermutation_MovesInterleavedPairsToHalves()
    {
        // One head of dim 4, 1 column: rows (0,1,2,3) = pairs (0,1),(2,3) → halves (0,2 | 1,3).
        var w = new float[] { 10, 11, 12, 13 };
        Assert.That(Llama2cImport.PermuteToHalfRotation(w, 1, 4, 1), Is.EqualTo(new float[] { 10, 12, 11, 13 }));
    }

    [Test]
    public void RopeScaling_IsReadFromRopeScalingOrRopeParameters()
    {
        var j = Base();
        j["rope_scaling"] = new JsonObject
        {
            ["rope_type"] = "llama3", ["factor"] = 8.0, ["low_freq_factor"] = 1.0, ["high_freq_factor"] = 4.0,
            ["original_max_position_embeddings"] = 8192,
        };
        Assert.That(ModelConfig.Parse(j, "c").RopeScaling, Is.EqualTo(new RopeScaling("llama3", 8, 1, 4, 8192)));
        var t5 = Base(); t5.Remove("rope_theta");   // transformers 5 keeps θ and the scaling in rope_parameters
        t5["rope_parameters"] = new JsonObject { ["rope_type"] = "linear", ["factor"] = 2.0, ["rope_theta"] = 1e6 };
        var c = ModelConfig.Parse(t5, "c");
        Assert.That((c.RopeScaling!.Type, c.RopeScaling.Factor, c.RopeTheta), Is.EqualTo(("linear", 2.0, 1e6)));
        Assert.That(ModelConfig.Parse(c.ToJson(), "again").RopeScaling, Is.EqualTo(c.RopeScaling), "saved configs keep the scaling");
    }

    [TestCase("linear", 0.0, 1.0, 4.0, 8192, "rope_scaling factor must be a positive number (got 0)")]
    [TestCase("llama3", 8.0, 4.0, 4.0, 8192, "rope_scaling needs 0 < low_freq_factor < high_freq_factor (got 4 and 4)")]
    [TestCase("llama3", 8.0, 1.0, 4.0, 0, "rope_scaling original_max_position_embeddings must be positive (got 0)")]
    public void RopeScaling_OutOfRange_IsNamed(string type, double factor, double low, double high, int original, string message)
    {
        var j = Base();
        j["rope_scaling"] = new JsonObject
        {
            ["rope_type"] = type, ["factor"] = factor, ["low_freq_factor"] = low, ["high_freq_factor"] = high,
            ["original_max_position_embeddings"] = original,
        };
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(j, "c"))!.Message, Is.EqualTo($"c: {message}"));
    }

    [Test]
    public void ASlidingWindowOfNoPositions_IsRejected()
    {
        var m = Base(); m["architectures"] = new JsonArray("MistralForCausalLM"); m["sliding_window"] = 0;
        Assert.That(Assert.Throws<ModelFormatException>(() => ModelConfig.Parse(m, "c"))!.Message,
            Is.EqualTo("c: sliding_window must be positive (got 0)"));
    }
}
