using System.Diagnostics;
using DispNative.Engine.Inference;

namespace DispNative.Engine.Evaluation;

/// <summary>Prefill and decode speed of one model on its device.</summary>
/// <param name="PromptTokens">tokens per timed prefill (last row's logits, as a served prompt)</param>
/// <param name="DecodeTokens">single-token steps per timed decode, each after a prefill of the prompt</param>
/// <param name="PrefillTokensPerSecond">median over the timed prefills</param>
/// <param name="DecodeTokensPerSecond">median over the timed decodes</param>
/// <param name="TimedRounds">timed rounds (each a prefill and its decode)</param>
public sealed record SpeedResult(int PromptTokens, int DecodeTokens, double PrefillTokensPerSecond, double DecodeTokensPerSecond, int TimedRounds);

/// <summary>Times a model the way it is served: prefill of a prompt, then decode one token at a time with the KV cache.
/// The tokens fed are fixed (the text's own, not the model's choices), so two models given the same tokens do the same
/// work. Untimed rounds first, at least one and for at least <see cref="WarmupSeconds"/> (first launches, CUDA graph
/// capture; under .NET's tiered JIT, which recompiles hot methods optimized only after they have run a while, the model
/// timed first decoded up to 4× slower after a single warm-up round); then timed rounds, at least <see cref="Rounds"/>
/// and for at least <see cref="TimedSeconds"/>, of which the median counts.</summary>
public static class SpeedProbe
{
    public const int Rounds = 3;
    public const double WarmupSeconds = 0.25, TimedSeconds = 0.5;

    /// <summary>Prompt and decode lengths for a text of <paramref name="textTokens"/> tokens: the prompt up to <paramref name="promptTokens"/>,
    /// <paramref name="decodeTokens"/> after it, both within the text and the model's context; null when the text is
    /// too short (fewer than two tokens).</summary>
    public static (int Prompt, int Decode)? Plan(int textTokens, int promptTokens, int decodeTokens, int context)
    {
        int decode = Math.Min(decodeTokens, Math.Max(textTokens - 1, 0));
        int prompt = Math.Min(Math.Min(promptTokens, textTokens - decode), context - decode);
        return prompt >= 1 && decode >= 1 ? (prompt, decode) : null;
    }

    public static SpeedResult Measure(ICausalLanguageModel model, int[] ids, int promptTokens, int decodeTokens,
        CancellationToken cancellationToken = default)
    {
        var plan = Plan(ids.Length, promptTokens, decodeTokens, model.Config.MaxPositionEmbeddings)
            ?? throw new InvalidSettingException($"a text of {ids.Length} tokens is too short to time prefill and decode");
        var (p, n) = plan;
        var prefill = new List<double>();
        var decode = new List<double>();
        var warmup = Stopwatch.StartNew();
        int warmupRounds = 0;
        while (warmupRounds == 0 || warmup.Elapsed.TotalSeconds < WarmupSeconds)
        {
            Round(model, ids, p, n, cancellationToken);
            warmupRounds++;
        }
        var timed = Stopwatch.StartNew();
        while (prefill.Count < Rounds || timed.Elapsed.TotalSeconds < TimedSeconds)
        {
            var (prefillSeconds, decodeSeconds) = Round(model, ids, p, n, cancellationToken);
            prefill.Add(p / prefillSeconds);
            decode.Add(n / decodeSeconds);
        }
        return new SpeedResult(p, n, Median(prefill), Median(decode), prefill.Count);
    }

    /// <summary>Seconds of one prefill of ids[..p] and of the n single-token steps after it, in a fresh cache.</summary>
    private static (double Prefill, double Decode) Round(ICausalLanguageModel model, int[] ids, int p, int n, CancellationToken ct)
    {
        ct.ThrowIfCancellationRequested();
        var cache = model.NewCache(p + n);
        using var release = cache as IDisposable;
        long start = Stopwatch.GetTimestamp();
        model.Forward(ids.AsSpan(0, p), cache, lastOnly: true);
        double prefill = Stopwatch.GetElapsedTime(start).TotalSeconds;
        start = Stopwatch.GetTimestamp();
        for (int i = 0; i < n; i++) model.Forward(ids.AsSpan(p + i, 1), cache, lastOnly: true);
        return (prefill, Stopwatch.GetElapsedTime(start).TotalSeconds);
    }

    internal static double Median(List<double> xs)
    {
        xs.Sort();
        return xs.Count % 2 == 1 ? xs[xs.Count / 2] : (xs[xs.Count / 2 - 1] + xs[xs.Count / 2]) / 2;
    }
}
