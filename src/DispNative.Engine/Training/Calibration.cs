using System.Text.Json;
using System.Text.RegularExpressions;
using DispNative.Engine.IO;
using DispNative.Engine.Tokenization;

namespace DispNative.Engine.Training;

/// <summary>Calibration text → token blocks: plain text files split into documents at blank lines, or JSONL
/// with a <c>text</c> field per line; every document starts with BOS; all are concatenated and cut into full
/// blocks of the block size.</summary>
public static partial class Calibration
{
    [GeneratedRegex(@"\n[ \t]*\n+")]
    private static partial Regex BlankLines();

    public static List<string> ReadDocuments(string path)
    {
        FilePaths.RequireInput(path, "calibration file");
        var docs = new List<string>();
        if (path.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase))
        {
            int lineNo = 0;
            foreach (var line in File.ReadLines(path))
            {
                lineNo++;
                if (string.IsNullOrWhiteSpace(line)) continue;
                try
                {
                    using var doc = JsonDocument.Parse(line);
                    if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("text", out var text) || text.ValueKind != JsonValueKind.String)
                        throw new InvalidSettingException($"{path}:{lineNo}: a JSONL line needs a string field \"text\"");
                    var s = text.GetString()!;
                    if (s.Trim().Length > 0) docs.Add(s);
                }
                catch (JsonException e) { throw new InvalidSettingException($"{path}:{lineNo}: not valid JSON ({e.Message})"); }
            }
        }
        else
        {
            var text = File.ReadAllText(path).Replace("\r\n", "\n");
            docs.AddRange(BlankLines().Split(text).Select(d => d.Trim('\n')).Where(d => d.Trim().Length > 0));
        }
        return docs;
    }

    /// <summary>Tokens of all documents of all files, BOS before each document.</summary>
    public static int[] Tokenize(IEnumerable<string> files, ITokenizer tokenizer, int? bosId, CancellationToken cancellationToken = default)
    {
        var ids = new List<int>();
        foreach (var file in files)
            foreach (var doc in ReadDocuments(file))
            {
                cancellationToken.ThrowIfCancellationRequested();
                if (bosId is int bos) ids.Add(bos);
                ids.AddRange(tokenizer.Encode(doc, addSpecialTokens: false));
            }
        return ids.ToArray();
    }

    /// <summary>Consecutive full blocks (the tail shorter than a block is dropped), at most <paramref name="maxBlocks"/>.</summary>
    public static List<int[]> Blocks(int[] ids, int blockSize, int? maxBlocks = null)
    {
        if (blockSize < 2) throw new InvalidSettingException($"block size must be at least 2 (got {blockSize})");
        if (ids.Length < blockSize)
            throw new InvalidSettingException($"the calibration text has {ids.Length} tokens, shorter than one block of {blockSize}");
        var blocks = new List<int[]>();
        for (int s = 0; s + blockSize <= ids.Length && (maxBlocks == null || blocks.Count < maxBlocks); s += blockSize)
            blocks.Add(ids[s..(s + blockSize)]);
        return blocks;
    }
}
