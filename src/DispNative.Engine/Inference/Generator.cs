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
        if (prompt.Length == 0) throw new InvalidSettingException("the prompt is empty");
        if (maxNewTokens < 0) throw new InvalidSettingException($"max new tokens must be non-negative (got {maxNewTokens})");
        sampling.Validate();
        var rng = new Rng(sampling.Seed);
        var cache = model.Model.NewCache(prompt.Length + maxNewTokens);
        var output = new List<int>(prompt);
        float[] logits = model.Model.Forward(prompt, cache, lastOnly: true);
        for (int i = 0; i < maxNewTokens; i++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            int next = sampling.Greedy ? ArgMax(logits) : Sample(logits, sampling, rng);
            output.Add(next);
            onToken?.Invoke(next);
            if (model.EosIds.Contains(next) || i == maxNewTokens - 1) break;
            logits = model.Model.Forward([next], cache, lastOnly: true);
        }
        return output.ToArray();
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
