using System.Text;

namespace DispNative.Engine.Tokenization;

/// <summary>Unicode normalization forms NFC, NFD, NFKC and NFKD (UAX #15), in managed code: the engine runs with
/// invariant globalization, where <see cref="string.Normalize(NormalizationForm)"/> returns its input unchanged. The
/// tables (<c>unicode-normalization.txt</c>, embedded) are written by <c>tools/reference/unicode_normalization.py</c>.</summary>
public static class UnicodeNormalization
{
    private const int SBase = 0xAC00, LBase = 0x1100, VBase = 0x1161, TBase = 0x11A7, LCount = 19, VCount = 21, TCount = 28,
        NCount = VCount * TCount, SCount = LCount * NCount;

    private sealed record Tables(Dictionary<int, byte> CombiningClass, Dictionary<int, int[]> Canonical,
        Dictionary<int, int[]> Compatibility, Dictionary<long, int> Composition);

    private static readonly Lazy<Tables> Data = new(Load);

    /// <summary><paramref name="text"/> in <paramref name="form"/>.</summary>
    public static string Normalize(string text, NormalizationForm form)
    {
        // Below U+00A0 no character decomposes, composes or has a combining class; below U+0300 each is its own NFC.
        if (!text.AsSpan().ContainsAnyExceptInRange('\0', form == NormalizationForm.FormC ? '\u02FF' : '\u009F')) return text;
        var t = Data.Value;
        bool compatibility = form is NormalizationForm.FormKC or NormalizationForm.FormKD;
        var cps = new List<int>(text.Length);
        foreach (var rune in text.EnumerateRunes()) Decompose(t, rune.Value, compatibility, cps);
        SortCombiningMarks(t, cps);
        if (form is NormalizationForm.FormC or NormalizationForm.FormKC) Compose(t, cps);
        var sb = new StringBuilder(cps.Count);
        Span<char> utf16 = stackalloc char[2];
        foreach (int cp in cps) sb.Append(utf16[..new Rune(cp).EncodeToUtf16(utf16)]);
        return sb.ToString();
    }

    private static int Class(Tables t, int cp) => t.CombiningClass.TryGetValue(cp, out byte c) ? c : 0;

    private static void Decompose(Tables t, int cp, bool compatibility, List<int> output)
    {
        if (DecomposeHangul(cp, output)) return;
        if ((compatibility ? t.Compatibility : t.Canonical).TryGetValue(cp, out var full)) output.AddRange(full);
        else output.Add(cp);
    }

    /// <summary>A Hangul syllable's jamo (L V, or L V T), computed rather than tabled; false for any other character.</summary>
    private static bool DecomposeHangul(int cp, List<int> output)
    {
        if (cp is < SBase or >= SBase + SCount) return false;
        int s = cp - SBase;
        output.Add(LBase + s / NCount);
        output.Add(VBase + s % NCount / TCount);
        if (s % TCount != 0) output.Add(TBase + s % TCount);
        return true;
    }

    /// <summary>Canonical ordering: each run of combining marks sorted by class, stably.</summary>
    private static void SortCombiningMarks(Tables t, List<int> cps)
    {
        for (int i = 1; i < cps.Count; i++)
        {
            int c = Class(t, cps[i]);
            if (c == 0) continue;
            int j = i;
            while (j > 0 && Class(t, cps[j - 1]) > c) { (cps[j - 1], cps[j]) = (cps[j], cps[j - 1]); j--; }
        }
    }

    /// <summary>Canonical composition: each character joins the last starter unless a character between them is
    /// a starter or has a class at least its own (blocked).</summary>
    private static void Compose(Tables t, List<int> cps)
    {
        if (cps.Count == 0) return;
        // A leading mark stands in as the starter: no composite begins with one, so nothing joins it.
        int starter = 0, kept = 1, lastClass = 0;
        for (int i = 1; i < cps.Count; i++)
        {
            int cp = cps[i], c = Class(t, cp);
            if ((lastClass < c || lastClass == 0) && Composite(t, cps[starter], cp) is int composite)
            {
                cps[starter] = composite;
                continue;
            }
            if (c == 0) starter = kept;
            lastClass = c;
            cps[kept++] = cp;
        }
        cps.RemoveRange(kept, cps.Count - kept);
    }

    private static int? Composite(Tables t, int first, int second)
    {
        if (first is >= LBase and < LBase + LCount && second is >= VBase and < VBase + VCount)
            return SBase + ((first - LBase) * VCount + second - VBase) * TCount;
        if (first is >= SBase and < SBase + SCount && (first - SBase) % TCount == 0 && second is > TBase and < TBase + TCount)
            return first + second - TBase;
        return t.Composition.TryGetValue(PairKey(first, second), out int c) ? c : null;
    }

    /// <summary>The composition table's key of a pair of code points (21 bits each).</summary>
    private static long PairKey(int first, int second) => ((long)first << 21) | (uint)second;

    private static Tables Load()
    {
        using var stream = typeof(UnicodeNormalization).Assembly.GetManifestResourceStream("unicode-normalization.txt")
            ?? throw new DispNativeException("the Unicode normalization table is not embedded in the engine assembly");
        using var reader = new StreamReader(stream, Encoding.UTF8);
        var classes = new Dictionary<int, byte>();
        var canonicalOne = new Dictionary<int, int[]>();
        var compatibilityOne = new Dictionary<int, int[]>();
        var composition = new Dictionary<long, int>();
        while (reader.ReadLine() is { } line)
        {
            if (line.Length == 0 || line[0] == '#') continue;
            var f = line.Split(' ');
            int cp = Convert.ToInt32(f[0], 16);
            if (f[1] != "0") classes[cp] = byte.Parse(f[1]);
            if (f.Length < 4) continue;
            var parts = f[3..].Select(p => Convert.ToInt32(p, 16)).ToArray();
            compatibilityOne[cp] = parts;
            if (f[2] == "k") continue;
            canonicalOne[cp] = parts;
            if (f[2] == "c") composition[PairKey(parts[0], parts[1])] = cp;
        }
        return new(classes, Full(canonicalOne), Full(compatibilityOne), composition);
    }

    /// <summary>One-level decompositions expanded until nothing in them decomposes further (Hangul included).</summary>
    private static Dictionary<int, int[]> Full(Dictionary<int, int[]> oneLevel)
    {
        var full = new Dictionary<int, int[]>(oneLevel.Count);
        void Expand(int cp, List<int> output)
        {
            if (DecomposeHangul(cp, output)) return;
            if (oneLevel.TryGetValue(cp, out var parts)) foreach (int p in parts) Expand(p, output);
            else output.Add(cp);
        }
        foreach (int cp in oneLevel.Keys)
        {
            var list = new List<int>();
            Expand(cp, list);
            full[cp] = list.ToArray();
        }
        return full;
    }
}
