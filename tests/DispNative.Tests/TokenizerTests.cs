using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DispNative.Engine;
using DispNative.Engine.Tokenization;

namespace DispNative.Tests;

public class TokenizerTests
{
    private static readonly string[] VariedText =
    [
        "Hello world", " leading space", "two  spaces and trailing ", "line\nbreaks\r\nand\ttabs",
        "émigré café naïve", "日本語のテキスト", "emoji 🙂👍🏽 flags 🇫🇷", "Ελληνικά и русский", "مرحبا بالعالم",
        "math ∑∫√ ≠ ≤", "numbers 1234567890 3.14159", "<s> inside text </s>", "\u0000control\u0007chars", "a",
    ];

    private static HfTokenizer RefTokenizer() => HfTokenizer.Load(Path.Combine(TestAssets.RefLlama, "tokenizer.json"));

    [Test]
    public void RefLlama_MatchesGoldenIds_WhereTokenizerJsonAgrees()
    {
        var tok = RefTokenizer();
        using var golden = JsonDocument.Parse(File.ReadAllText(Path.Combine(TestAssets.RefLlama, "golden.json")));
        int checkedCount = 0;
        foreach (var entry in golden.RootElement.GetProperty("tokenization").EnumerateArray())
        {
            if (!entry.GetProperty("hf_tokenizer_json_agrees").GetBoolean()) continue;
            var expected = entry.GetProperty("ids").EnumerateArray().Select(x => x.GetInt32()).ToArray();
            Assert.That(tok.Encode(entry.GetProperty("text").GetString()!), Is.EqualTo(expected));
            checkedCount++;
        }
        Assert.That(checkedCount, Is.EqualTo(3));
    }

    [Test]
    public void RefLlama_DecodeEncode_RoundTripsVariedUnicode()
    {
        var tok = RefTokenizer();
        foreach (var s in VariedText)
            Assert.That(tok.Decode(tok.Encode(s)), Is.EqualTo(s.Replace("<s>", "").Replace("</s>", "")), s);
        Assert.That(tok.Encode("", addSpecialTokens: true), Is.EqualTo(new[] { 1 }));
    }

    [Test]
    public void RefLlama_ByteFallback_AndSpecialTokens()
    {
        var tok = RefTokenizer();
        // U+1F642 is not a piece: its four UTF-8 bytes become <0xF0><0x9F><0x99><0x82> = ids 243,162,156,133.
        var ids = tok.Encode("🙂", addSpecialTokens: false);
        Assert.That(ids[^4..], Is.EqualTo(new[] { 243, 162, 156, 133 }));
        // "<s>" in the raw text is the special token, not three characters.
        Assert.That(tok.Encode("a</s>", addSpecialTokens: false)[^1], Is.EqualTo(2));
    }

    [Test]
    public void MetaspacePreTokenizer_GivesTheSameIdsAsTheNormalizerStyle()
    {
        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(TestAssets.RefLlama, "tokenizer.json")))!.AsObject();
        json["normalizer"] = null;
        json["pre_tokenizer"] = new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "always", ["split"] = false };
        json["decoder"] = new JsonObject
        {
            ["type"] = "Sequence",
            ["decoders"] = new JsonArray(new JsonObject { ["type"] = "ByteFallback" }, new JsonObject { ["type"] = "Metaspace", ["replacement"] = "▁", ["prepend_scheme"] = "always" }),
        };
        var meta = new HfTokenizer(json, "metaspace");
        var reference = RefTokenizer();
        foreach (var s in new[] { "The Fulton County Grand Jury said Friday", "Robert Boulter is an English film actor .", "émigré café" })
        {
            Assert.That(meta.Encode(s), Is.EqualTo(reference.Encode(s)), s);
            Assert.That(meta.Decode(meta.Encode(s)), Is.EqualTo(s));
        }
    }

    [Test]
    public void ByteLevel_AppliesMergesPerPreToken_AndRoundTrips()
    {
        var tok = new HfTokenizer(TestAssets.ByteLevelTokenizerJson(), "bytelevel");
        int Id(string token) => tok.Encode(token, false) is [var single] ? single : throw new AssertionException($"'{token}' is not one token");
        var ids = tok.Encode("the cat", addSpecialTokens: true);
        // "the" has no leading space, so it is t + he; " cat" merges to one token.
        Assert.That(ids.Length, Is.EqualTo(4));
        Assert.That(ids[0], Is.EqualTo(1));
        Assert.That(ids[3], Is.EqualTo(Id(" cat")));
        Assert.That(tok.Encode(" the", false), Is.EqualTo(new[] { Id(" the") }));
        foreach (var s in VariedText.Where(s => !s.Contains("<s>")))
            Assert.That(tok.Decode(tok.Encode(s)), Is.EqualTo(s), s);
        Assert.That(tok.Encode("x</s>", false)[^1], Is.EqualTo(2));
    }

    /// <summary>Each edit of a valid tokenizer.json used to crash the loader (a cast or index exception) or pass.</summary>
    [TestCase("model.merges", "[[\"a\"]]", "malformed merge [\"a\"] (expected two strings)")]
    [TestCase("model.merges", "[5]", "field 'merges' must be a string (got 5)")]
    [TestCase("model.byte_fallback", "\"yes\"", "field 'byte_fallback' must be true or false (got \"yes\")")]
    [TestCase("added_tokens", "[{\"id\": -1, \"content\": \"<x>\"}]", "added_tokens id: token id -1 is out of range")]
    [TestCase("added_tokens", "[{\"id\": 3, \"content\": 7}]", "field 'content' must be a string (got 7)")]
    [TestCase("decoder", "{\"type\": 5}", "field 'type' must be a string (got 5)")]
    [TestCase("normalizer", "\"NFC\"", "field 'normalizer' must be an object (got \"NFC\")")]
    [TestCase("model.vocab", "[\"a\"]", "field 'vocab' must be an object (got [\"a\"])")]
    [TestCase("added_tokens", "[5]", "field 'added_tokens' must be a list of objects (got 5)")]
    [TestCase("added_tokens", "{}", "field 'added_tokens' must be an array (got {})")]
    [TestCase("pre_tokenizer", "{\"type\": \"Sequence\", \"pretokenizers\": [\"ByteLevel\"]}", "field 'pretokenizers' must be a list of objects (got \"ByteLevel\")")]
    [TestCase("normalizer", "{\"type\": \"Replace\", \"pattern\": {\"Regex\": \"([\"}, \"content\": \"x\"}", "invalid regex '(['")]
    [TestCase("post_processor", "{\"type\": \"TemplateProcessing\", \"single\": [3]}", "TemplateProcessing item 3 is neither a Sequence nor a SpecialToken")]
    [TestCase("model.merges", "[\"\"]", "malformed merge ''")]
    [TestCase("model.merges", "[\"Ġ  t\"]", "malformed merge 'Ġ  t' (expected two tokens separated by one space)")]
    [TestCase("model.merges", "[[\"Ġ\", \"zz\"]]", "merge ['Ġ', 'zz'] (rank 0): 'zz' is not in the model's vocabulary")]
    [TestCase("post_processor", "{\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<x>\"}}], \"special_tokens\": {\"<x>\": 5}}",
        "template special token '<x>' is not in the vocabulary")]
    public void AMalformedTokenizerJson_IsAClearError(string path, string json, string message)
    {
        var tokenizer = TestAssets.ByteLevelTokenizerJson();
        var parts = path.Split('.');
        var parent = parts.Length == 1 ? tokenizer : tokenizer[parts[0]]!.AsObject();
        parent[parts[^1]] = JsonNode.Parse(json);
        Assert.That(Assert.Throws<ModelFormatException>(() => new HfTokenizer(tokenizer, "t.json"))!.Message, Does.StartWith($"t.json: {message}"));
    }

    [Test]
    public void AVocabularyIdOutOfRange_IsAClearError()
    {
        var tokenizer = TestAssets.ByteLevelTokenizerJson();
        tokenizer["model"]!["vocab"]!["zz"] = 2_000_000_000;
        Assert.That(Assert.Throws<ModelFormatException>(() => new HfTokenizer(tokenizer, "t.json"))!.Message,
            Is.EqualTo("t.json: model.vocab 'zz': token id 2000000000 is out of range"));
    }

    [Test]
    public void UnsupportedModelType_IsAClearError()
    {
        var json = TestAssets.ByteLevelTokenizerJson();
        json["model"]!["type"] = "WordPiece";
        Assert.That(Assert.Throws<ModelFormatException>(() => new HfTokenizer(json, "t.json"))!.Message, Does.Contain("WordPiece"));
        Assert.Throws<ModelFormatException>(() => TokenizerLoader.Load("/no/such/tokenizer.json"));
    }

    [Test]
    public void Llama2c_Tokenizer_MatchesSentencePieceIds_AndRoundTrips()
    {
        var tok = Llama2cTokenizer.Load(TestAssets.Shared("models/stories260K/tok512.bin"));
        Assert.That(tok.VocabSize, Is.EqualTo(512));
        // From golden.json: "Once upon a time" tokenized with tok512.model, BOS prepended.
        Assert.That(tok.Encode("Once upon a time"), Is.EqualTo(new[] { 1, 403, 407, 261, 378 }));
        foreach (var s in VariedText.Where(s => !s.Contains("<s>")))
            Assert.That(tok.Decode(tok.Encode(s)), Is.EqualTo(s), s);
        // SentencePiece drops the dummy-prefix space of the first piece with or without BOS, and EOS decodes to nothing.
        Assert.That(tok.Decode(tok.Encode("Once upon a time", addSpecialTokens: false)), Is.EqualTo("Once upon a time"));
        Assert.That(tok.Decode([.. tok.Encode("Once upon"), 2]), Is.EqualTo("Once upon"));
    }

    /// <summary>A BPE without byte fallback: a character outside the vocabulary becomes unk, a run of them one unk under
    /// fuse_unk; added tokens match longest first, wherever they stand in the list.</summary>
    [TestCase(true)]
    [TestCase(false)]
    public void Bpe_UnknownCharacters_AndOverlappingAddedTokens(bool fuseUnk)
    {
        var json = JsonNode.Parse("""
            {
              "added_tokens": [
                {"id": 0, "content": "<unk>", "special": true},
                {"id": 5, "content": "<|im", "special": true},
                {"id": 6, "content": "<|im_end|>", "special": true}
              ],
              "model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "<": 4},
                        "merges": ["a b"], "unk_token": "<unk>", "byte_fallback": false}
            }
            """)!.AsObject();
        json["model"]!["fuse_unk"] = fuseUnk;
        var tok = new HfTokenizer(json, "t.json");
        Assert.That(tok.Encode("ab☃☃b", false), Is.EqualTo(fuseUnk ? new[] { 3, 0, 2 } : new[] { 3, 0, 0, 2 }));
        Assert.That(tok.Encode("a<|im_end|>b<|imab", false), Is.EqualTo(new[] { 1, 6, 2, 5, 3 }));
    }

    /// <summary>ignore_merges (Llama 3): a pre-token that is itself in the vocabulary is that token, whatever the merges make.</summary>
    [TestCase(true, new[] { 6 })]
    [TestCase(false, new[] { 1, 5 })]
    public void Bpe_IgnoreMerges_TakesAWholePieceFromTheVocabulary(bool ignoreMerges, int[] expected)
    {
        var json = JsonNode.Parse("""
            {"model": {"type": "BPE", "vocab": {"a": 1, "b": 2, "c": 3, "ab": 4, "bc": 5, "abc": 6}, "merges": ["b c"]}}
            """)!.AsObject();
        json["model"]!["ignore_merges"] = ignoreMerges;
        Assert.That(new HfTokenizer(json, "t.json").Encode("abc", false), Is.EqualTo(expected));
    }

    // ---- pipeline components, against the behaviour the tokenizers library documents and tests ----

    /// <summary>The pieces a tokenizer with <paramref name="normalizer"/> and <paramref name="preTokenizer"/> gives its
    /// BPE model for <paramref name="text"/> ("&lt;x&gt;" is an added token).</summary>
    private static string[] Pieces(string? normalizer, string? preTokenizer, string text)
    {
        var json = new JsonObject
        {
            ["added_tokens"] = JsonNode.Parse("""[{"id": 0, "content": "<x>", "special": false}]"""),
            ["normalizer"] = normalizer == null ? null : JsonNode.Parse(normalizer),
            ["pre_tokenizer"] = preTokenizer == null ? null : JsonNode.Parse(preTokenizer),
            ["model"] = JsonNode.Parse("""{"type": "BPE", "vocab": {"<x>": 0}, "merges": []}"""),
        };
        return new HfTokenizer(json, "t.json").PreTokenized(text).Select(p => p.Piece).ToArray();
    }

    /// <summary>The example of the tokenizers library's SplitDelimiterBehavior documentation.</summary>
    [TestCase("Removed", new[] { "the", "final", "countdown" })]
    [TestCase("Isolated", new[] { "the", "-", "final", "-", "-", "countdown" })]
    [TestCase("MergedWithPrevious", new[] { "the-", "final-", "-", "countdown" })]
    [TestCase("MergedWithNext", new[] { "the", "-final", "-", "-countdown" })]
    [TestCase("Contiguous", new[] { "the", "-", "final", "--", "countdown" })]
    public void Split_CutsAtTheDelimiter_AsItsBehaviourSays(string behavior, string[] expected)
    {
        string split = $$"""{"type": "Split", "pattern": {"String": "-"}, "behavior": "{{behavior}}", "invert": false}""";
        Assert.That(Pieces(null, split, "the-final--countdown"), Is.EqualTo(expected));
        string regex = $$"""{"type": "Split", "pattern": {"Regex": "-"}, "behavior": "{{behavior}}", "invert": false}""";
        Assert.That(Pieces(null, regex, "the-final--countdown"), Is.EqualTo(expected));
    }

    [Test]
    public void Split_WithAnUnknownBehaviourOrInverted_IsAClearErrorAtLoad()
    {
        Assert.That(Assert.Throws<ModelFormatException>(() => Pieces(null, """{"type": "Split", "pattern": {"String": "-"}, "behavior": "Sideways"}""", "a"))!.Message,
            Is.EqualTo("t.json: unsupported Split behavior 'Sideways'"));
        Assert.That(Assert.Throws<ModelFormatException>(() => Pieces(null, """{"type": "Split", "pattern": {"String": "-"}, "invert": true}""", "a"))!.Message,
            Is.EqualTo("t.json: Split with invert=true is not supported"));
    }

    [TestCase(false, new[] { "Call ", "123", " please" })]
    [TestCase(true, new[] { "Call ", "1", "2", "3", " please" })]
    public void Digits_IsolatesNumbers_OrEachDigit(bool individual, string[] expected)
    {
        string digits = $$"""{"type": "Digits", "individual_digits": {{(individual ? "true" : "false")}}}""";
        Assert.That(Pieces(null, digits, "Call 123 please"), Is.EqualTo(expected));
    }

    /// <summary>ByteLevel adds its prefix space to every piece it is given (each text between added tokens), as the
    /// tokenizers library does; use_regex false keeps the piece whole.</summary>
    [TestCase(true, true, new[] { "Ġa", "Ġb", "<x>", "Ġc" })]
    [TestCase(true, false, new[] { "ĠaĠb", "<x>", "Ġc" })]
    [TestCase(false, true, new[] { "a", "Ġb", "<x>", "c" })]
    public void ByteLevel_PrefixSpaceAndRegex(bool addPrefixSpace, bool useRegex, string[] expected)
    {
        string byteLevel = $$"""{"type": "ByteLevel", "add_prefix_space": {{(addPrefixSpace ? "true" : "false")}}, "use_regex": {{(useRegex ? "true" : "false")}}}""";
        Assert.That(Pieces(null, byteLevel, "a b<x>c"), Is.EqualTo(expected));
    }

    /// <summary>A piece that already begins with a space gets no second one.</summary>
    [Test]
    public void ByteLevel_PrefixSpace_IsNotDoubled()
        => Assert.That(Pieces(null, """{"type": "ByteLevel", "add_prefix_space": true}""", " a"), Is.EqualTo(new[] { "Ġa" }));

    /// <summary>Merges as the tokenizers library reads them: "#version" lines skipped (ranks count from after them), a
    /// pair listed twice keeping its last rank, a token with a space only in the pair form.</summary>
    [Test]
    public void Merges_AreReadAsTheTokenizersLibraryReadsThem()
    {
        JsonObject Bpe(JsonArray merges) => new()
        {
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["merges"] = merges,
                ["vocab"] = JsonNode.Parse("""{"a": 1, "b": 2, "c": 3, "ab": 4, "bc": 5, "b c": 6, "ab c": 7, " ": 8}"""),
            },
        };
        Assert.That(new HfTokenizer(Bpe(["#version: 0.2", "a b", "b c"]), "t").Encode("abc", false), Is.EqualTo(new[] { 4, 3 }));
        Assert.That(new HfTokenizer(Bpe(["a b", "b c", "a b"]), "t").Encode("abc", false), Is.EqualTo(new[] { 1, 5 }), "the repeated a b ranks after b c");
        Assert.That(new HfTokenizer(Bpe([new JsonArray("a", "b c")]), "t").Encode("ab c", false), Is.EqualTo(new[] { 1, 2, 8, 3 }),
            "b c is one token only when a merge makes it: the characters stay apart here");
        Assert.That(Assert.Throws<ModelFormatException>(() => new HfTokenizer(Bpe(["a b c"]), "t"))!.Message,
            Is.EqualTo("t: malformed merge 'a b c' (expected two tokens separated by one space)"));
    }

    /// <summary>BOS is the template's first special token when there is a template; EOS every end token the vocabulary
    /// knows (Llama 2, Llama 3 base and instruct, GPT-2, Qwen).</summary>
    [Test]
    public void SpecialIds_ComeFromTheTemplate_AndTheKnownEndTokens()
    {
        var json = JsonNode.Parse("""
            {
              "added_tokens": [{"id": 0, "content": "<|begin_of_text|>", "special": true}, {"id": 1, "content": "<|eot_id|>", "special": true},
                               {"id": 2, "content": "<|end_of_text|>", "special": true}, {"id": 3, "content": "<bos>", "special": true}],
              "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]},
              "model": {"type": "BPE", "vocab": {"a": 4}, "merges": []}
            }
            """)!.AsObject();
        var tok = new HfTokenizer(json, "t.json");
        Assert.That((tok.BosId, tok.EosIds), Is.EqualTo(((int?)3, (IReadOnlyList<int>)new[] { 2, 1 })));
    }

    /// <summary>Metaspace's prepend_scheme: "first" prepends only where the text begins, not after an added token.</summary>
    [TestCase("always", "a b<x>c d", new[] { "▁a", "▁b", "<x>", "▁c", "▁d" })]
    [TestCase("first", "a b<x>c d", new[] { "▁a", "▁b", "<x>", "c", "▁d" })]
    [TestCase("first", "<x>c d", new[] { "<x>", "c", "▁d" })]
    [TestCase("never", "a b<x>c d", new[] { "a", "▁b", "<x>", "c", "▁d" })]
    public void Metaspace_PrependScheme(string scheme, string text, string[] expected)
    {
        string metaspace = $$"""{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "{{scheme}}", "split": true}""";
        Assert.That(Pieces(null, metaspace, text), Is.EqualTo(expected));
    }

    [TestCase("""{"type": "Lowercase"}""", "HeLLo ÉTÉ", "hello été")]
    [TestCase("""{"type": "NFKC"}""", "ﬁ² Ａ", "fi2 A")]
    [TestCase("""{"type": "NFKD"}""", "ﬁé", "fie\u0301")]
    [TestCase("""{"type": "NFD"}""", "ﬁé", "ﬁe\u0301")]
    [TestCase("""{"type": "NFC"}""", "e\u0301", "é")]
    [TestCase("""{"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Replace", "pattern": {"String": " "}, "content": "_"}]}""", "ＡＢ Ｃ", "ab_c")]
    public void Normalizers(string normalizer, string text, string expected)
        => Assert.That(Pieces(normalizer, null, text), Is.EqualTo(new[] { expected }));

    /// <summary>A tokenizer whose tokens are <paramref name="tokens"/> (ids 0..n-1), with <paramref name="decoder"/>.</summary>
    private static string DecodeTokens(string decoder, params string[] tokens)
    {
        var vocab = new JsonObject();
        foreach (var t in tokens.Distinct()) vocab[t] = vocab.Count;
        var json = new JsonObject
        {
            ["decoder"] = JsonNode.Parse(decoder),
            ["model"] = new JsonObject { ["type"] = "BPE", ["vocab"] = vocab, ["merges"] = new JsonArray() },
        };
        var tok = new HfTokenizer(json, "t.json");
        return tok.Decode(tokens.Select(t => vocab[t]!.GetValue<int>()).ToArray());
    }

    /// <summary>Strip removes up to start/stop copies of its content from each token; after Fuse, from the whole text.
    /// ByteFallback turns each byte of an invalid UTF-8 run into one U+FFFD (the tokenizers library's own test case).</summary>
    [TestCase("""{"type": "Strip", "content": " ", "start": 1, "stop": 0}""", new[] { " a", " b" }, "ab")]
    [TestCase("""{"type": "Sequence", "decoders": [{"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}""", new[] { " a", " b" }, "a b")]
    [TestCase("""{"type": "Strip", "content": " ", "start": 0, "stop": 1}""", new[] { "a  ", "b " }, "a b")]
    [TestCase("""{"type": "Strip", "content": "_", "start": 2, "stop": 2}""", new[] { "___a___" }, "_a_")]
    [TestCase("""{"type": "ByteFallback"}""", new[] { "<0xE2>", "<0x82>", "<0xAC>", "x" }, "€x")]
    [TestCase("""{"type": "ByteFallback"}""", new[] { "<0xE2>", "<0x82>", "x", "<0xFF>" }, "\uFFFD\uFFFDx\uFFFD")]
    [TestCase("""{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}""", new[] { "▁a", "▁b" }, "a b")]
    [TestCase("""{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"}""", new[] { "▁a", "▁b" }, " a b")]
    public void Decoders(string decoder, string[] tokens, string expected) => Assert.That(DecodeTokens(decoder, tokens), Is.EqualTo(expected));

    /// <summary>TemplateProcessing puts special tokens before and after the text; decoding leaves special tokens out.</summary>
    [Test]
    public void Template_AddsPrefixAndSuffix_AndDecodingSkipsSpecialTokens()
    {
        var json = JsonNode.Parse("""
            {
              "added_tokens": [{"id": 0, "content": "<s>", "special": true}, {"id": 1, "content": "</s>", "special": true}],
              "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}, "</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
              "model": {"type": "BPE", "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}, "merges": ["a b"]}
            }
            """)!.AsObject();
        var tok = new HfTokenizer(json, "t.json");
        Assert.That(tok.Encode("abb"), Is.EqualTo(new[] { 0, 4, 3, 1 }));
        Assert.That(tok.Encode("abb", addSpecialTokens: false), Is.EqualTo(new[] { 4, 3 }));
        Assert.That(tok.BosId, Is.EqualTo(0));
        Assert.That(tok.EosIds, Is.EqualTo(new[] { 1 }));
        Assert.That(tok.Decode([0, 4, 3, 1]), Is.EqualTo("abb"));
    }

    /// <summary>NFC, NFD, NFKC and NFKD against Python's unicodedata (tools/reference/unicode_normalization.py): every
    /// character with a decomposition, Hangul, and runs of combining marks that reorder and compose. The runtime's own
    /// string.Normalize would pass none of the changing cases: under invariant globalization it returns its input.</summary>
    [Test]
    public void UnicodeNormalization_MatchesPythonsUnicodedata()
    {
        static string Text(string hex, string input) => hex == "=" ? input
            : string.Concat(hex.Split(' ').Select(h => char.ConvertFromUtf32(Convert.ToInt32(h, 16))));
        var forms = new[] { NormalizationForm.FormC, NormalizationForm.FormD, NormalizationForm.FormKC, NormalizationForm.FormKD };
        var failures = new List<string>();
        int cases = 0;
        foreach (var line in File.ReadLines(Path.Combine(TestAssets.RepoRoot, "tests/DispNative.Tests/Reference/unicode-normalization.tsv")))
        {
            if (line.StartsWith('#')) continue;
            var fields = line.Split('\t');
            string input = Text(fields[0], "");
            for (int f = 0; f < forms.Length; f++, cases++)
                if (UnicodeNormalization.Normalize(input, forms[f]) != Text(fields[f + 1], input) && failures.Count < 10)
                    failures.Add($"{forms[f]} of {fields[0]}: expected {fields[f + 1]}");
        }
        Assert.That(cases, Is.GreaterThan(20_000));
        Assert.That(failures, Is.Empty);
    }
}
