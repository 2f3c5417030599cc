using DispNative.Engine.Models;

namespace DispNative.Engine.Inference;

/// <summary>The positions a model has seen for one sequence (a KV cache on some device).</summary>
public interface IInferenceCache
{
    int Length { get; }
    int Capacity { get; }
    void Reset();
}

/// <summary>A decoder that scores and extends one sequence: the CPU reference (<see cref="LlamaModel"/>) or a GPU
/// backend (<see cref="Cuda.CudaLlama"/>). Perplexity and generation only use this.</summary>
public interface ICausalLanguageModel
{
    ModelConfig Config { get; }

    /// <summary>"cpu", or the device and storage type, e.g. "cuda:0 bf16".</summary>
    string DeviceName { get; }

    IInferenceCache NewCache(int capacity);

    /// <summary>Appends <paramref name="tokens"/> to the sequence in <paramref name="cache"/>; returns logits
    /// [tokens, vocab] or, with <paramref name="lastOnly"/>, [1, vocab].</summary>
    float[] Forward(ReadOnlySpan<int> tokens, IInferenceCache cache, bool lastOnly = false);

    /// <summary>Appends <paramref name="tokens"/> as <see cref="Forward"/> does and writes the last row's logits into
    /// <paramref name="logits"/> (vocab values): a decode loop reuses one buffer instead of a new array per token. (A
    /// vocabulary's logits exceed the large-object threshold: a new array per token costs fresh pages and full
    /// collections, while a GPU waits for the next token; KernelBench cpu, "logits per decoded token".)</summary>
    void ForwardLast(ReadOnlySpan<int> tokens, IInferenceCache cache, Span<float> logits)
    {
        NeedLogitsBuffer(Config, logits.Length);
        Forward(tokens, cache, lastOnly: true).CopyTo(logits);
    }

    /// <summary>Refuses a <see cref="ForwardLast"/> buffer of another length than the vocabulary.</summary>
    internal static void NeedLogitsBuffer(ModelConfig config, int length)
    {
        if (length != config.VocabSize) throw new ArgumentException($"the logits buffer holds {length} values, not the vocabulary's {config.VocabSize}");
    }

    /// <summary>−log p(tokens[t+1] | tokens[..t]) for t = 0..n-2, <paramref name="tokens"/> run as a new sequence: what
    /// perplexity sums. From the logits here; a GPU backend computes it on the device and returns n - 1 values instead
    /// of n × vocab logits. Logits that are not finite are an error naming the position.</summary>
    double[] TokenNll(int[] tokens) => Evaluation.Perplexity.TokenNll(this.Logits(tokens), tokens, Config.VocabSize);
}

/// <summary>A model that decodes greedily with each next token chosen on its device, the host reading tokens while the
/// next step runs (<see cref="Cuda.CudaLlama.DecodeGreedy"/>); <see cref="Generator"/> decodes greedily through it.</summary>
public interface IGreedyDecoding
{
    /// <summary>Up to <paramref name="steps"/> tokens after <paramref name="firstToken"/> (the next input, at position
    /// cache.Length), each the argmax of the logits after the one before.</summary>
    IGreedyDecoder DecodeGreedy(IInferenceCache cache, int firstToken, int steps);
}

/// <summary>A greedy decoding in progress: <see cref="Next"/> returns its tokens in order.</summary>
public interface IGreedyDecoder : IDisposable
{
    int Next();
}

public static class CausalLanguageModelExtensions
{
    /// <summary>Logits [tokens, vocab] of <paramref name="tokens"/> as a new sequence (its cache released after).</summary>
    public static float[] Logits(this ICausalLanguageModel model, int[] tokens)
    {
        if ((long)tokens.Length * model.Config.VocabSize > Array.MaxLength)
            throw new InvalidSettingException($"{tokens.Length} tokens × {model.Config.VocabSize} vocabulary logits do not fit in one array; use shorter blocks");
        var cache = model.NewCache(tokens.Length);
        using (cache as IDisposable) return model.Forward(tokens, cache);
    }
}
