using System.Numerics;
using DispNative.Engine.Autograd;

namespace DispNative.Engine.Disp;

/// <summary>DISP-LLM's relaxed masks: <c>s = sigmoid((logits + g + 3.0) / 0.4)</c> with g ~ Gumbel(0, 1); hard
/// masks are <c>round(s)</c>, i.e. <c>logits + g + 3 &gt; 0</c>.</summary>
public static class GumbelSigmoid
{
    public const double Temperature = 0.4, Offset = 3.0;

    /// <summary>Gumbel(0, 1) noise: −log(−log u), u uniform in (0, 1).</summary>
    public static T[] Noise<T>(Rng rng, int n) where T : unmanaged, IFloatingPointIeee754<T>
    {
        var g = new T[n];
        for (int i = 0; i < n; i++)
        {
            double u = Math.Clamp(rng.NextDouble(), 1e-12, 1 - 1e-12);
            g[i] = T.CreateChecked(-Math.Log(-Math.Log(u)));
        }
        return g;
    }

    /// <summary>Soft mask on the tape; <paramref name="noise"/> null means g = 0.</summary>
    public static Var<T> Soft<T>(Tape<T> tape, Var<T> logits, T[]? noise) where T : unmanaged, IFloatingPointIeee754<T>
    {
        var shifted = noise == null ? logits : tape.AddConstant(logits, noise);
        return tape.Sigmoid(tape.Affine(shifted, 1 / Temperature, Offset / Temperature));
    }

    /// <summary>Hard 0/1 mask for pruning. A mask that would keep nothing keeps its highest-scoring channel.</summary>
    public static bool[] Hard<T>(ReadOnlySpan<T> logits, ReadOnlySpan<T> noise) where T : unmanaged, IFloatingPointIeee754<T>
    {
        var keep = new bool[logits.Length];
        int best = 0;
        double bestScore = double.NegativeInfinity;
        bool any = false;
        for (int i = 0; i < logits.Length; i++)
        {
            double score = double.CreateChecked(logits[i]) + (noise.IsEmpty ? 0 : double.CreateChecked(noise[i])) + Offset;
            keep[i] = score > 0;
            any |= keep[i];
            if (score > bestScore) { bestScore = score; best = i; }
        }
        if (!any && keep.Length > 0) keep[best] = true;
        return keep;
    }
}
