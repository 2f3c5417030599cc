using DispNative.Engine.IO;
using DispNative.Engine.Models;

namespace DispNative.Engine.Inference;

/// <summary>How the next token is chosen: greedy (argmax) or temperature + nucleus (top-p) sampling.</summary>
public sealed record SamplingOptions(bool Greedy = true, float Temperature = 1f, float TopP = 1f, ulong Seed = 0)
{
    public void Validate()
    {
        if (Greedy) return;
        if (!(Temperature > 0) || float.IsInfinity(Temperature)) throw new InvalidSettingException($"temperature must be positive (got {Temperature})");
        if (!(TopP > 0 && TopP <= 1)) throw new InvalidSettingException($"top-p must be in (0, 1] (got {TopP})");
    }
}

public static class Generator
{
    /// <summary>Generates up to <paramref name="maxNewTokens"/> tokens after <paramref name="prompt"/> with the KV
    /// cache, stopping at EOS. Each new token is passed to <paramref name="onToken"/> as it is produced.</summary>
    public static int[] Generate(LoadedModel model, int[] prompt, int maxNewTokens, SamplingOptions sampling,
        Action<int>? onToken = null, CancellationToken cancellationToken = default)
    {
        var output = new List<int>(prompt);
        foreach (var id in Stream(model, prompt, maxNewTokens, sampling, cancellationToken))
        {
            output.Add(id);
            onToken?.Invoke(id);
        }
        return output.ToArray();
    }

    /// <summary>The new tokens one at a time, as they are produced (lazily: each MoveNext runs one decode step).</summary>
    public static IEnumerable<int> Stream(LoadedModel model, int[] prompt, int maxNewTokens, SamplingOptions sampling,
        CancellationToken cancellationToken = default)
    {
        if (prompt.Length == 0) throw new InvalidSettingException("the prompt is empty");
        if (maxNewTokens < 0) throw new InvalidSettingException($"max new tokens must be non-negative (got {maxNewTokens})");
        sampling.Validate();
        model.Config.RequireContext(prompt.Length, $"the prompt ({prompt.Length} tokens)");
        model.Config.RequireContext(prompt.Length + maxNewTokens, $"a sequence of {prompt.Length + maxNewTokens} tokens ({prompt.Length} prompt + " +
            $"{maxNewTokens} new; at most {model.Config.MaxPositionEmbeddings - prompt.Length} new fit)");
        return Iterate();

        IEnumerable<int> Iterate()
        {
            if (maxNewTokens == 0) yield break;
            var rng = new Rng(sampling.Seed);
            var runner = model.Runner;
            var cache = runner.NewCache(prompt.Length + maxNewTokens);
            using var release = cache as IDisposable;
            var logits = new float[model.Config.VocabSize];   // one buffer for every step (ICausalLanguageModel.ForwardLast)
            runner.ForwardLast(prompt, cache, logits);
            for (int i = 0; i < maxNewTokens; i++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                RequireFiniteLogits(logits, $"position {prompt.Length + i - 1}");
                int next = sampling.Greedy ? ArgMax(logits) : Sample(logits, sampling, rng);
                yield return next;
                if (model.EosIds.Contains(next) || i == maxNewTokens - 1) yield break;
                if (sampling.Greedy && runner is IGreedyDecoding device)
                {
                    // The rest chosen on the device, the next step running while this one's token is handed out.
                    using var decoder = device.DecodeGreedy(cache, next, maxNewTokens - 1 - i);
                    for (i++; i < maxNewTokens; i++)
                    {
                        cancellationToken.ThrowIfCancellationRequested();
                        next = decoder.Next();
                        yield return next;
                        if (model.EosIds.Contains(next)) yield break;
                    }
                    yield break;
                }
                runner.ForwardLast([next], cache, logits);
            }
        }
    }

    /// <summary>Refuses logits that are not numbers (a model whose activations overflow, as f16 can): sampling from them
    /// would fail and argmax would pick a token at random.</summary>
    public static void RequireFiniteLogits(ReadOnlySpan<float> logits, string where)
    {
        if (DTypes.FirstNonFinite(logits) is int bad and >= 0)
            throw new DispNativeException($"the model's logits at {where} are not finite (token {bad}: {logits[bad]}); its activations " +
                                          "overflow (on CUDA in f16, bf16 has the range f16 lacks)");
    }

    public static int ArgMax(ReadOnlySpan<float> logits)
    {
        int best = 0;
        for (int i = 1; i < logits.Length; i++) if (logits[i] > logits[best]) best = i;
        return best;
    }

    /// <summary>Softmax at temperature T, keep the smallest set of most likely tokens whose mass reaches top-p,
    /// renormalize, draw one.</summary>
    public static int Sample(ReadOnlySpan<float> logits, SamplingOptions s, Rng rng)
    {
        int n = logits.Length;
        var probs = new double[n];
        double max = double.NegativeInfinity;
        for (int i = 0; i < n; i++) max = Math.Max(max, logits[i] / s.Temperature);
        double sum = 0;
        for (int i = 0; i < n; i++) { probs[i] = Math.Exp(logits[i] / s.Temperature - max); sum += probs[i]; }
        var order = Enumerable.Range(0, n).OrderByDescending(i => probs[i]).ThenBy(i => i).ToArray();
        double mass = 0;
        int keep = 0;
        while (keep < n && mass < s.TopP * sum) mass += probs[order[keep++]];
        double r = rng.NextDouble() * mass;
        for (int j = 0; j < keep; j++)
        {
            r -= probs[order[j]];
            if (r < 0) return order[j];
        }
        return order[keep - 1];
    }
}

/// <summary>Turns generated ids into text pieces: the prompt is decoded with the new tokens so that leading spaces come
/// out right, and a trailing partial UTF-8 sequence is held back until its last byte arrives.</summary>
public sealed class TextStreamer(Tokenization.ITokenizer tokenizer, int[] prompt)
{
    private readonly List<int> _ids = [.. prompt];
    private readonly string _promptText = tokenizer.Decode(prompt);
    private string _shown = "";

    /// <summary>The text that <paramref name="id"/> adds (possibly empty).</summary>
    public string Push(int id)
    {
        _ids.Add(id);
        string all = tokenizer.Decode(_ids.ToArray());
        string fresh = all.Length >= _promptText.Length ? all[_promptText.Length..] : "";
        if (fresh.EndsWith('\uFFFD') || !fresh.StartsWith(_shown, StringComparison.Ordinal)) return "";
        string delta = fresh[_shown.Length..];
        _shown = fresh;
        return delta;
    }
}
