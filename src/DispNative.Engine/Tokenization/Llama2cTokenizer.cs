using System.Text;

namespace DispNative.Engine.Tokenization;

/// <summary>llama2.c's <c>tokenizer.bin</c>: int32 max token length, then per piece a float score, an int32
/// byte length and the bytes. Encoding follows llama2.c: a dummy-prefix space, one piece per UTF-8 code
/// point (bytes as &lt;0xNN&gt; = id byte+3 when absent), then repeatedly the highest-scoring merge, leftmost on ties.</summary>
public sealed class Llama2cTokenizer : ITokenizer
{
    private readonly byte[][] _pieces;
    private readonly float[] _scores;
    private readonly Dictionary<string, int> _lookup;
    private readonly int[] _scoreRank;
    private readonly BpeMerger _merger;

    public int VocabSize => _pieces.Length;
    public int? BosId => 1;
    public IReadOnlyList<int> EosIds { get; } = [2];

    private Llama2cTokenizer(byte[][] pieces, float[] scores)
    {
        _pieces = pieces;
        _scores = scores;
        _lookup = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < pieces.Length; i++) _lookup.TryAdd(Key(pieces[i]), i);
        // Rank = place in descending score order (equal scores share a rank, so the leftmost pair wins).
        var distinct = scores.Distinct().OrderByDescending(x => x).Select((x, r) => (x, r)).ToDictionary(p => p.x, p => p.r);
        _scoreRank = scores.Select(x => distinct[x]).ToArray();
        _merger = new BpeMerger(TryMerge);
    }

    private bool TryMerge(int left, int right, out (int Rank, int NewId) merge)
    {
        if (_lookup.TryGetValue(Key(_pieces[left]) + Key(_pieces[right]), out int id)) { merge = (_scoreRank[id], id); return true; }
        merge = default;
        return false;
    }

    // Latin-1 maps each byte to one char, so byte strings compare exactly.
    private static string Key(ReadOnlySpan<byte> bytes) => Encoding.Latin1.GetString(bytes);

    public static Llama2cTokenizer Load(string path)
    {
        if (!File.Exists(path)) throw new ModelFormatException($"tokenizer not found: {path}");
        var data = File.ReadAllBytes(path);
        if (data.Length < 4) throw new ModelFormatException($"{path}: truncated llama2.c tokenizer");
        int pos = 4;
        var pieces = new List<byte[]>();
        var scores = new List<float>();
        while (pos < data.Length)
        {
            if (pos + 8 > data.Length) throw new ModelFormatException($"{path}: truncated at piece {pieces.Count}");
            float score = BitConverter.ToSingle(data, pos);
            int len = BitConverter.ToInt32(data, pos + 4);
            pos += 8;
            if (len < 0 || len > data.Length - pos) throw new ModelFormatException($"{path}: piece {pieces.Count} has invalid length {len}");
            pieces.Add(data[pos..(pos + len)]);
            scores.Add(score);
            pos += len;
        }
        if (pieces.Count < 259) throw new ModelFormatException($"{path}: only {pieces.Count} pieces; a llama2.c tokenizer has at least 3 specials and 256 byte pieces");
        return new Llama2cTokenizer(pieces.ToArray(), scores.ToArray());
    }

    public int[] Encode(string text, bool addSpecialTokens = true)
    {
        var tokens = new List<int>();
        if (addSpecialTokens) tokens.Add(1);
        if (text.Length == 0) return tokens.ToArray();
        var symbols = new List<int>(text.Length + 1);
        if (_lookup.TryGetValue(" ", out int space)) symbols.Add(space);
        Span<byte> utf8 = stackalloc byte[4];
        foreach (var rune in text.EnumerateRunes())
        {
            int n = rune.EncodeToUtf8(utf8);
            if (_lookup.TryGetValue(Key(utf8[..n]), out int id)) symbols.Add(id);
            else for (int b = 0; b < n; b++) symbols.Add(utf8[b] + 3);
        }
        _merger.Merge(symbols);
        tokens.AddRange(symbols);
        return tokens.ToArray();
    }

    public string Decode(ReadOnlySpan<int> ids)
    {
        var bytes = new List<byte>();
        int prev = -1;
        foreach (int id in ids)
        {
            if (id < 0 || id >= _pieces.Length) throw new DispNativeException($"token id {id} is outside the vocabulary (size {VocabSize})");
            if (id is 1 or 2) { prev = id; continue; }
            var piece = _pieces[id];
            string s = Key(piece);
            if (ByteToken.TryParse(s, out byte raw))
                bytes.Add(raw);
            else
            {
                int skip = (prev == 1 || prev == -1) && bytes.Count == 0 && piece.Length > 0 && piece[0] == (byte)' ' ? 1 : 0;
                bytes.AddRange(piece.AsSpan(skip).ToArray());
            }
            prev = id;
        }
        return Encoding.UTF8.GetString(bytes.ToArray());
    }
}
