using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using DispNative.Engine.IO;

namespace DispNative.Engine.Tokenization;

/// <summary>A Hugging Face <c>tokenizer.json</c> with a BPE model: the SentencePiece style (Prepend/Replace
/// normalizer or Metaspace pre-tokenizer, byte fallback) and the byte-level style (GPT-2, Llama-3, Qwen:
/// regex split + byte-to-unicode map). Added/special tokens are matched on the raw text first.</summary>
public sealed class HfTokenizer : ITokenizer
{
    private const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    private readonly string _source;
    private readonly Dictionary<string, int> _vocab;
    private readonly string[] _idToToken;
    private readonly BpeMerger _merger;
    private readonly bool _byteFallback, _ignoreMerges, _fuseUnk;
    private readonly int? _unkId;
    private readonly int[] _byteTokenIds = new int[256];
    private readonly List<(string Content, int Id)> _added;
    private readonly HashSet<int> _special = new();
    private readonly Func<string, bool, string> _normalize;
    private readonly Func<string, bool, IEnumerable<string>> _preTokenize;
    private readonly int[] _prefix, _suffix;
    private readonly Func<List<string>, List<string>> _decode;

    public int VocabSize => _idToToken.Length;
    public int? BosId { get; }
    public IReadOnlyList<int> EosIds { get; }

    public static HfTokenizer Load(string path)
    {
        if (!File.Exists(path)) throw new ModelFormatException($"tokenizer not found: {path}");
        JsonNode? root;
        try { root = JsonNode.Parse(File.ReadAllText(path), null, JsonFields.Strict); }
        catch (System.Text.Json.JsonException e) { throw new ModelFormatException($"{path}: not valid JSON ({e.Message})"); }
        if (root is not JsonObject o) throw new ModelFormatException($"{path}: not a JSON object");
        return new HfTokenizer(o, path);
    }

    public HfTokenizer(JsonObject json, string source)
    {
        _source = source;
        var model = Obj(json, "model") ?? throw Error("missing 'model'");
        string type = OptStr(model, "type") ?? "BPE";
        if (type != "BPE") throw Error($"unsupported tokenizer model type '{type}' (only BPE)");
        if (model["continuing_subword_prefix"] is JsonValue || model["end_of_word_suffix"] is JsonValue)
            throw Error("BPE continuing_subword_prefix/end_of_word_suffix are not supported");

        _vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var (k, v) in Obj(model, "vocab") ?? throw Error("missing model.vocab"))
            _vocab[k] = TokenId(v, $"model.vocab '{k}'");
        _merger = new BpeMerger(ParseMerges(model));   // before the added tokens join _vocab: merges use the model's own
        var added = Arr(json, "added_tokens").Select(n => Item(n, "added_tokens"))
            .Select(a => (Content: Str(a, "content"), Id: TokenId(a["id"], "added_tokens id"), Special: Flag(a, "special", false)))
            .ToList();
        int size = Math.Max(_vocab.Count == 0 ? 0 : _vocab.Values.Max() + 1, added.Count == 0 ? 0 : added.Max(a => a.Id) + 1);
        _idToToken = new string[size];
        foreach (var (k, v) in _vocab) _idToToken[v] = k;
        foreach (var a in added)
        {
            _idToToken[a.Id] = a.Content;
            _vocab.TryAdd(a.Content, a.Id);
            if (a.Special) _special.Add(a.Id);
        }
        // Longest content first so that "<|end|>" wins over "<|e".
        _added = added.Select(a => (a.Content, a.Id)).OrderByDescending(a => a.Content.Length).ToList();

        _byteFallback = Flag(model, "byte_fallback", false);
        _ignoreMerges = Flag(model, "ignore_merges", false);
        _fuseUnk = Flag(model, "fuse_unk", false);
        string? unk = OptStr(model, "unk_token");
        _unkId = unk != null && _vocab.TryGetValue(unk, out int u) ? u : null;
        for (int i = 0; i < 256; i++) _byteTokenIds[i] = _vocab.TryGetValue($"<0x{i:X2}>", out int id) ? id : -1;

        _normalize = BuildNormalizer(Obj(json, "normalizer"));
        _preTokenize = BuildPreTokenizer(Obj(json, "pre_tokenizer"));
        (_prefix, _suffix) = BuildTemplate(Obj(json, "post_processor"));
        _decode = BuildDecoder(Obj(json, "decoder"));

        BosId = _prefix.Length > 0 ? _prefix[0] : Lookup("<s>") ?? Lookup("<|begin_of_text|>");
        EosIds = new[] { Lookup("</s>"), Lookup("<|end_of_text|>"), Lookup("<|eot_id|>"), Lookup("<|endoftext|>"), Lookup("<|im_end|>") }
            .Where(x => x.HasValue).Select(x => x!.Value).ToArray();
    }

    /// <summary>The merges as the tokenizers library builds them: a legacy "a b" string has exactly one space ("#version"
    /// lines are skipped), both parts and their concatenation must be in the model's vocabulary, and a pair listed twice
    /// keeps its last rank.</summary>
    private Dictionary<long, (int Rank, int NewId)> ParseMerges(JsonObject model)
    {
        var merges = new Dictionary<long, (int, int)>();
        int rank = 0;
        foreach (var m in Arr(model, "merges"))
        {
            string a, b;
            if (m is JsonArray pair)
            {
                if (pair.Count != 2) throw Error($"malformed merge {pair.ToJsonString()} (expected two strings)");
                a = JsonFields.Element<string>(pair[0], "merges", _source); b = JsonFields.Element<string>(pair[1], "merges", _source);
            }
            else
            {
                string s = JsonFields.Element<string>(m, "merges", _source);
                if (s.StartsWith("#version", StringComparison.Ordinal)) continue;
                var parts = s.Split(' ');
                if (parts.Length != 2) throw Error($"malformed merge '{s}' (expected two tokens separated by one space)");
                (a, b) = (parts[0], parts[1]);
            }
            int Id(string token) => _vocab.TryGetValue(token, out int id) ? id
                : throw Error($"merge ['{a}', '{b}'] (rank {rank}): '{token}' is not in the model's vocabulary");
            merges[BpeMerger.Key(Id(a), Id(b))] = (rank++, Id(a + b));
        }
        return merges;
    }

    private JsonObject? Obj(JsonObject o, string key) => JsonFields.OptionalObject(o, key, _source);
    private JsonArray Arr(JsonObject o, string key) => JsonFields.OptionalArray(o, key, _source) ?? [];
    private JsonObject Item(JsonNode? n, string list) => JsonFields.ObjectElement(n, list, _source);

    private int? Lookup(string token) => _vocab.TryGetValue(token, out int id) ? id : null;

    private string Str(JsonObject o, string key) => JsonFields.RequiredString(o, key, _source);
    private string? OptStr(JsonObject o, string key) => JsonFields.OptionalString(o, key, _source);
    private bool Flag(JsonObject o, string key, bool absent) => JsonFields.Optional<bool>(o, key, _source) ?? absent;

    /// <summary>A token id: an integer in [0, 2^24) (the largest vocabularies have a few hundred thousand).</summary>
    private int TokenId(JsonNode? n, string what)
    {
        int id = JsonFields.Element<int>(n, what, _source);
        return id is >= 0 and < 1 << 24 ? id : throw Error($"{what}: token id {id} is out of range");
    }

    private Regex Pattern(string pattern)
    {
        try { return new Regex(pattern, RegexOptions.CultureInvariant); }
        catch (ArgumentException e) { throw Error($"invalid regex '{pattern}' ({e.Message})"); }
    }

    private ModelFormatException Error(string what) => new($"{_source}: {what}");

    public string? TokenText(int id) => id >= 0 && id < _idToToken.Length ? _idToToken[id] : null;

    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        var ids = new List<int>(text.Length / 3 + 4);
        if (addSpecialTokens) ids.AddRange(_prefix);
        foreach (var (piece, addedId) in PreTokenized(text))
        {
            if (addedId >= 0) ids.Add(addedId);
            else EncodePiece(piece, ids);
        }
        if (addSpecialTokens) ids.AddRange(_suffix);
        return ids.ToArray();
    }

    /// <summary>The pieces the BPE model is given: the text between added tokens normalized and pre-tokenized, each
    /// added token as itself (with its id).</summary>
    internal IEnumerable<(string Piece, int AddedId)> PreTokenized(string text)
    {
        bool first = true;
        foreach (var (segment, addedId) in SplitOnAdded(text))
        {
            if (addedId >= 0) yield return (segment, addedId);
            else foreach (var piece in _preTokenize(_normalize(segment, first), first)) yield return (piece, -1);
            first = false;
        }
    }

    private IEnumerable<(string Segment, int AddedId)> SplitOnAdded(string text)
    {
        int start = 0, i = 0;
        while (i < text.Length)
        {
            int match = -1, len = 0;
            foreach (var (content, id) in _added)
                if (content.Length > 0 && string.CompareOrdinal(text, i, content, 0, content.Length) == 0) { match = id; len = content.Length; break; }
            if (match < 0) { i++; continue; }
            if (i > start) yield return (text[start..i], -1);
            yield return (text.Substring(i, len), match);
            i += len;
            start = i;
        }
        if (start < text.Length) yield return (text[start..], -1);
    }

    private void EncodePiece(string piece, List<int> output)
    {
        if (piece.Length == 0) return;
        if (_ignoreMerges && _vocab.TryGetValue(piece, out int whole)) { output.Add(whole); return; }
        var symbols = new List<int>(piece.Length);
        bool lastUnk = false;
        Span<byte> utf8 = stackalloc byte[4];
        foreach (var rune in piece.EnumerateRunes())
        {
            string s = rune.ToString();
            if (_vocab.TryGetValue(s, out int id)) { symbols.Add(id); lastUnk = false; continue; }
            if (_byteFallback)
            {
                int n = rune.EncodeToUtf8(utf8);
                bool all = true;
                for (int b = 0; b < n; b++) all &= _byteTokenIds[utf8[b]] >= 0;
                if (all) { for (int b = 0; b < n; b++) symbols.Add(_byteTokenIds[utf8[b]]); lastUnk = false; continue; }
            }
            if (_unkId is not int unk) throw new DispNativeException($"{_source}: character U+{rune.Value:X4} is not in the vocabulary and there is no unk token");
            if (!(_fuseUnk && lastUnk)) symbols.Add(unk);
            lastUnk = true;
        }
        _merger.Merge(symbols);
        output.AddRange(symbols);
    }

    public string Decode(ReadOnlySpan<int> ids)
    {
        var tokens = new List<string>(ids.Length);
        foreach (int id in ids)
        {
            if (id < 0 || id >= _idToToken.Length || _idToToken[id] == null)
                throw new DispNativeException($"token id {id} is outside the vocabulary (size {VocabSize})");
            if (_special.Contains(id)) continue;
            tokens.Add(_idToToken[id]);
        }
        return string.Concat(_decode(tokens));
    }

    // ---- normalizers ----
    private Func<string, bool, string> BuildNormalizer(JsonObject? n)
    {
        if (n == null) return (s, _) => s;
        string type = Str(n, "type");
        switch (type)
        {
            case "Sequence":
                var parts = Arr(n, "normalizers").Select(x => BuildNormalizer(Item(x, "normalizers"))).ToList();
                return (s, first) => parts.Aggregate(s, (acc, f) => f(acc, first));
            case "Prepend":
                string pre = Str(n, "prepend");
                return (s, _) => s.Length == 0 ? s : pre + s;
            case "Replace":
                return BuildReplace(n);
            case "NFC": return (s, _) => UnicodeNormalization.Normalize(s, NormalizationForm.FormC);
            case "NFD": return (s, _) => UnicodeNormalization.Normalize(s, NormalizationForm.FormD);
            case "NFKC": return (s, _) => UnicodeNormalization.Normalize(s, NormalizationForm.FormKC);
            case "NFKD": return (s, _) => UnicodeNormalization.Normalize(s, NormalizationForm.FormKD);
            case "Lowercase": return (s, _) => s.ToLowerInvariant();
            default: throw Error($"unsupported normalizer type '{type}'");
        }
    }

    private Func<string, bool, string> BuildReplace(JsonObject n)
    {
        string content = Str(n, "content");
        var pattern = Obj(n, "pattern") ?? throw Error("Replace without pattern");
        if (OptStr(pattern, "String") is string p) return (s, _) => s.Replace(p, content, StringComparison.Ordinal);
        var regex = Pattern(Str(pattern, "Regex"));
        return (s, _) => regex.Replace(s, content);
    }

    // ---- pre-tokenizers ----
    private Func<string, bool, IEnumerable<string>> BuildPreTokenizer(JsonObject? p)
    {
        if (p == null) return (s, _) => [s];
        string type = Str(p, "type");
        switch (type)
        {
            case "Sequence":
                var parts = Arr(p, "pretokenizers").Select(x => BuildPreTokenizer(Item(x, "pretokenizers"))).ToList();
                // Only the first piece begins where the text does ("first" for Metaspace's prepend_scheme).
                return (s, first) => parts.Aggregate((IEnumerable<string>)[s], (acc, f) => acc.SelectMany((x, i) => f(x, first && i == 0)).ToList());
            case "Metaspace":
            {
                string rep = OptStr(p, "replacement") ?? "\u2581";
                string scheme = OptStr(p, "prepend_scheme") ?? (Flag(p, "add_prefix_space", true) ? "always" : "never");
                bool split = Flag(p, "split", true);
                return (s, first) =>
                {
                    s = s.Replace(" ", rep, StringComparison.Ordinal);
                    if ((scheme == "always" || (scheme == "first" && first)) && !s.StartsWith(rep, StringComparison.Ordinal)) s = rep + s;
                    return split ? SplitBefore(s, rep) : [s];
                };
            }
            case "ByteLevel":
            {
                bool prefixSpace = Flag(p, "add_prefix_space", true);
                bool useRegex = Flag(p, "use_regex", true);
                var regex = new Regex(Gpt2Pattern, RegexOptions.CultureInvariant);
                // Like the tokenizers library, the prefix space goes before every piece, not only the text's first.
                return (s, _) =>
                {
                    if (prefixSpace && s.Length > 0 && s[0] != ' ') s = " " + s;
                    var pieces = useRegex ? regex.Matches(s).Select(m => m.Value) : [s];
                    return pieces.Select(ByteLevelMap.Encode).ToList();
                };
            }
            case "Split":
            {
                var pat = Obj(p, "pattern") ?? throw Error("Split without pattern");
                var regex = pat["Regex"] != null ? Pattern(Str(pat, "Regex")) : Pattern(Regex.Escape(Str(pat, "String")));
                string behavior = OptStr(p, "behavior") ?? "Isolated";
                if (!SplitBehaviors.Contains(behavior)) throw Error($"unsupported Split behavior '{behavior}'");
                bool invert = Flag(p, "invert", false);
                if (invert) throw Error("Split with invert=true is not supported");
                return (s, _) => SplitRegex(s, regex, behavior);
            }
            case "Digits":
            {
                bool individual = Flag(p, "individual_digits", false);
                var regex = new Regex(individual ? @"\p{Nd}" : @"\p{Nd}+", RegexOptions.CultureInvariant);
                return (s, _) => SplitRegex(s, regex, "Isolated");
            }
            default: throw Error($"unsupported pre_tokenizer type '{type}'");
        }
    }

    private static IEnumerable<string> SplitBefore(string s, string marker)
    {
        var result = new List<string>();
        int start = 0;
        for (int i = 1; i < s.Length; i++)
            if (string.CompareOrdinal(s, i, marker, 0, marker.Length) == 0) { result.Add(s[start..i]); start = i; }
        if (start < s.Length) result.Add(s[start..]);
        return result;
    }

    private static readonly string[] SplitBehaviors = ["Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"];

    /// <summary>The pieces of <paramref name="s"/> cut at each match of <paramref name="regex"/>, the match kept or dropped
    /// as the tokenizers library's SplitDelimiterBehavior says.</summary>
    private static List<string> SplitRegex(string s, Regex regex, string behavior)
    {
        var result = new List<string>();
        int last = 0;
        string? pendingMatch = null;
        foreach (Match m in regex.Matches(s))
        {
            if (m.Length == 0) continue;
            string gap = s[last..m.Index];
            switch (behavior)
            {
                case "Isolated": if (gap.Length > 0) result.Add(gap); result.Add(m.Value); break;
                case "Removed": if (gap.Length > 0) result.Add(gap); break;
                case "MergedWithPrevious": result.Add(gap + m.Value); break;
                case "MergedWithNext":
                    if (pendingMatch != null) result.Add(pendingMatch + gap); else if (gap.Length > 0) result.Add(gap);
                    pendingMatch = m.Value; break;
                case "Contiguous":
                    if (gap.Length == 0 && result.Count > 0) result[^1] += m.Value;   // right after the previous match
                    else { if (gap.Length > 0) result.Add(gap); result.Add(m.Value); }
                    break;
            }
            last = m.Index + m.Length;
        }
        string tail = s[last..];
        if (pendingMatch != null) result.Add(pendingMatch + tail);
        else if (tail.Length > 0) result.Add(tail);
        return result;
    }

    // ---- post-processor ----
    private (int[], int[]) BuildTemplate(JsonObject? p)
    {
        if (p == null) return ([], []);
        string type = Str(p, "type");
        switch (type)
        {
            case "ByteLevel": return ([], []);
            case "Sequence":
                var parts = Arr(p, "processors").Select(x => BuildTemplate(Item(x, "processors"))).ToList();
                return (parts.SelectMany(x => x.Item1).ToArray(), parts.SelectMany(x => x.Item2).ToArray());
            case "TemplateProcessing":
                var specials = Obj(p, "special_tokens");
                List<int> pre = new(), post = new();
                bool seenSequence = false;
                foreach (var item in Arr(p, "single"))
                {
                    if (item is not JsonObject entry || (entry["Sequence"] == null && entry["SpecialToken"] is not JsonObject))
                        throw Error($"TemplateProcessing item {item?.ToJsonString()} is neither a Sequence nor a SpecialToken");
                    if (entry["Sequence"] != null) { seenSequence = true; continue; }
                    string id = Str((JsonObject)entry["SpecialToken"]!, "id");
                    var ids = specials?[id] is JsonObject special && special["ids"] is JsonArray arr ? arr.Select(x => TokenId(x, $"special_tokens '{id}' ids")).ToList()
                        : [Lookup(id) ?? throw Error($"template special token '{id}' is not in the vocabulary")];
                    (seenSequence ? post : pre).AddRange(ids);
                }
                return (pre.ToArray(), post.ToArray());
            default: throw Error($"unsupported post_processor type '{type}'");
        }
    }

    // ---- decoders ----
    private Func<List<string>, List<string>> BuildDecoder(JsonObject? d)
    {
        if (d == null) return t => t;
        string type = Str(d, "type");
        switch (type)
        {
            case "Sequence":
                var parts = Arr(d, "decoders").Select(x => BuildDecoder(Item(x, "decoders"))).ToList();
                return t => parts.Aggregate(t, (acc, f) => f(acc));
            case "Replace":
                var replace = BuildReplace(d);
                return t => t.Select(x => replace(x, false)).ToList();
            case "ByteFallback":
                return DecodeByteFallback;
            case "Fuse":
                return t => [string.Concat(t)];
            case "Strip":
            {
                string c = Str(d, "content");
                int start = JsonFields.Optional<int>(d, "start", _source) ?? 0, stop = JsonFields.Optional<int>(d, "stop", _source) ?? 0;
                return t => t.Select(x =>
                {
                    int a = 0, b = x.Length;
                    while (a < start && a < b && x.AsSpan(a).StartsWith(c)) a += c.Length;
                    for (int k = 0; k < stop && b - c.Length >= a && x.AsSpan(0, b).EndsWith(c); k++) b -= c.Length;
                    return x[a..b];
                }).ToList();
            }
            case "ByteLevel":
                return t => [ByteLevelMap.Decode(string.Concat(t))];
            case "Metaspace":
            {
                string rep = OptStr(d, "replacement") ?? "\u2581";
                string scheme = OptStr(d, "prepend_scheme") ?? (Flag(d, "add_prefix_space", true) ? "always" : "never");
                return t => t.Select((x, i) =>
                {
                    x = x.Replace(rep, " ", StringComparison.Ordinal);
                    return i == 0 && scheme != "never" && x.StartsWith(' ') ? x[1..] : x;
                }).ToList();
            }
            default: throw Error($"unsupported decoder type '{type}'");
        }
    }

    private static List<string> DecodeByteFallback(List<string> tokens)
    {
        var result = new List<string>(tokens.Count);
        var bytes = new List<byte>();
        void Flush()
        {
            if (bytes.Count == 0) return;
            var arr = bytes.ToArray();
            try { result.Add(new UTF8Encoding(false, true).GetString(arr)); }
            catch (DecoderFallbackException) { result.Add(new string('\uFFFD', arr.Length)); }
            bytes.Clear();
        }
        foreach (var t in tokens)
        {
            if (ByteToken.TryParse(t, out byte b))
            {
                bytes.Add(b);
                continue;
            }
            Flush();
            result.Add(t);
        }
        Flush();
        return result;
    }
}

/// <summary>GPT-2's reversible byte ↔ printable-character map used by byte-level BPE.</summary>
public static class ByteLevelMap
{
    private static readonly char[] ByteToChar = new char[256];
    private static readonly Dictionary<char, byte> CharToByte = new();

    static ByteLevelMap()
    {
        int n = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            ByteToChar[b] = printable ? (char)b : (char)(256 + n++);
            CharToByte[ByteToChar[b]] = (byte)b;
        }
    }

    /// <summary>The printable character that stands for byte <paramref name="b"/>.</summary>
    public static char CharOf(byte b) => ByteToChar[b];

    public static string Encode(string text)
    {
        var bytes = Encoding.UTF8.GetBytes(text);
        var chars = new char[bytes.Length];
        for (int i = 0; i < bytes.Length; i++) chars[i] = ByteToChar[bytes[i]];
        return new string(chars);
    }

    public static string Decode(string mapped)
    {
        var bytes = new byte[mapped.Length];
        int n = 0;
        foreach (char c in mapped)
            if (CharToByte.TryGetValue(c, out byte b)) bytes[n++] = b;
        return Encoding.UTF8.GetString(bytes, 0, n);
    }
}
