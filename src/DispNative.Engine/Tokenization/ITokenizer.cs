namespace DispNative.Engine.Tokenization;

/// <summary>Text ↔ token ids.</summary>
public interface ITokenizer
{
    int VocabSize { get; }
    int? BosId { get; }
    IReadOnlyList<int> EosIds { get; }

    /// <summary>Encodes text; <paramref name="addSpecialTokens"/> adds what the tokenizer's post-processor
    /// adds (BOS for LLaMA).</summary>
    int[] Encode(string text, bool addSpecialTokens = true);

    /// <summary>Decodes ids to text, skipping special tokens.</summary>
    string Decode(ReadOnlySpan<int> ids);
}

public static class TokenizerLoader
{
    /// <summary>Loads <c>tokenizer.json</c> (Hugging Face) or a llama2.c <c>tokenizer.bin</c>; a directory
    /// is searched for <c>tokenizer.json</c>, then <c>tokenizer.bin</c>.</summary>
    public static ITokenizer Load(string path)
    {
        if (Directory.Exists(path))
        {
            string json = Path.Combine(path, "tokenizer.json");
            if (File.Exists(json)) return HfTokenizer.Load(json);
            string bin = Path.Combine(path, "tokenizer.bin");
            if (File.Exists(bin)) return Llama2cTokenizer.Load(bin);
            throw new ModelFormatException($"{path}: no tokenizer.json (SentencePiece tokenizer.model files are not read; export tokenizer.json with Hugging Face tokenizers)");
        }
        if (!File.Exists(path)) throw new ModelFormatException($"tokenizer not found: {path}");
        return path.EndsWith(".json", StringComparison.OrdinalIgnoreCase) ? HfTokenizer.Load(path) : Llama2cTokenizer.Load(path);
    }
}

/// <summary>SentencePiece byte-fallback pieces: <c>&lt;0xNN&gt;</c> stands for the raw byte NN.</summary>
internal static class ByteToken
{
    public static bool TryParse(string piece, out byte value)
    {
        value = 0;
        return piece.Length == 6 && piece.StartsWith("<0x", StringComparison.Ordinal) && piece[5] == '>' &&
               byte.TryParse(piece.AsSpan(3, 2), System.Globalization.NumberStyles.HexNumber, null, out value);
    }
}
