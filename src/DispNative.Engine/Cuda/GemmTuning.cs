using System.Security.Cryptography;
using System.Text;

namespace DispNative.Engine.Cuda;

/// <summary>Which of cuBLASLt's algorithms each GEMM shape runs. The heuristic's first choice is not always the fastest
/// (its model of a shape can be off, as where a pruned width leaves a partial last wave of tiles), so the first call of
/// a shape times each of up to <see cref="Candidates"/> algorithms the heuristic offers and keeps the fastest. Choices
/// are also written to a file in the kernel cache directory, one file per <c>identity</c> (device, architecture,
/// cuBLASLt version), so later processes on the same machine run the same algorithms (and round the same way) without
/// timing them again.</summary>
public sealed class GemmTuning
{
    public const int Candidates = 8;
    private readonly string _path;
    private readonly Dictionary<string, string> _choices = new(StringComparer.Ordinal);
    private bool _loaded;

    /// <summary>Shapes timed in this process.</summary>
    public int Timed { get; private set; }

    /// <summary>Shapes whose algorithm came from the file.</summary>
    public int Reused { get; private set; }

    public string FilePath => _path;

    public GemmTuning(string directory, string identity)
    {
        string hash = Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(identity))).ToLowerInvariant()[..16];
        _path = Path.Combine(directory, $"gemm-algorithms-{hash}.tsv");
    }

    /// <summary>The algorithm for <paramref name="shape"/> among <paramref name="candidates"/> (opaque ids, the
    /// heuristic's order): the recorded one where the file has it and it is still offered, else the fastest by
    /// <paramref name="timeMs"/> (milliseconds of candidate i; infinity where it cannot run), which is then recorded.
    /// The first where none runs.</summary>
    public int Choose(string shape, IReadOnlyList<string> candidates, Func<int, float> timeMs)
    {
        Load();
        if (_choices.TryGetValue(shape, out var id) && IndexOf(candidates, id) is int recorded and >= 0) { Reused++; return recorded; }
        int best = 0;
        float bestMs = float.PositiveInfinity;
        for (int i = 0; i < candidates.Count; i++)
        {
            float ms = timeMs(i);
            if (ms < bestMs) (best, bestMs) = (i, ms);
        }
        Timed++;
        if (float.IsFinite(bestMs)) { _choices[shape] = candidates[best]; Save(); }
        return best;
    }

    /// <summary>The algorithm id recorded for <paramref name="shape"/>, or null.</summary>
    public string? Recorded(string shape) { Load(); return _choices.GetValueOrDefault(shape); }

    private static int IndexOf(IReadOnlyList<string> candidates, string id)
    {
        for (int i = 0; i < candidates.Count; i++) if (candidates[i] == id) return i;
        return -1;
    }

    private void Load()
    {
        if (_loaded) return;
        _loaded = true;
        foreach (var (shape, id) in ReadFile()) _choices[shape] = id;
    }

    private IEnumerable<(string Shape, string Id)> ReadFile()
    {
        string[] lines;
        try { lines = File.Exists(_path) ? File.ReadAllLines(_path) : []; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { lines = []; /* unreadable: time again */ }
        foreach (var line in lines)
        {
            int tab = line.IndexOf('\t');
            if (tab > 0 && tab < line.Length - 1) yield return (line[..tab], line[(tab + 1)..]);
        }
    }

    /// <summary>Rewrites the file with this process's choices added to what it holds now (another process may have
    /// added shapes since it was read).</summary>
    private void Save()
    {
        foreach (var (shape, id) in ReadFile()) _choices.TryAdd(shape, id);
        KernelCompiler.TryWriteCacheFile(_path, tmp =>   // a read-only cache only costs timing again
            File.WriteAllLines(tmp, _choices.OrderBy(c => c.Key, StringComparer.Ordinal).Select(c => $"{c.Key}\t{c.Value}")));
    }
}
