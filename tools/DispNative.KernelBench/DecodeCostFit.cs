namespace DispNative.KernelBench;

/// <summary>Two models' decode steps that differ in the weight bytes they read, fitted to t = bytes / B + F: B is the
/// bandwidth at which the steps stream their weights, F the fixed cost per token that pruning does not shrink
/// (launches, dependency chains, attention at a short context, the host's turn). The pruned/dense ratio of
/// decode speed is then (dense / B + F) / (pruned / B + F), so a ratio target sets a largest F at that B.</summary>
internal readonly record struct DecodeCostFit(double BytesPerSecond, double FixedMs)
{
    /// <summary>The fit through (<paramref name="denseBytes"/>, <paramref name="denseMs"/>) and (<paramref name="prunedBytes"/>,
    /// <paramref name="prunedMs"/>); null where the pruned model reads no fewer bytes or is not faster (no positive B).</summary>
    public static DecodeCostFit? From(double denseMs, long denseBytes, double prunedMs, long prunedBytes)
    {
        if (prunedBytes >= denseBytes || prunedMs >= denseMs) return null;
        double b = (denseBytes - prunedBytes) / ((denseMs - prunedMs) / 1e3);
        return new DecodeCostFit(b, denseMs - 1e3 * denseBytes / b);
    }

    /// <summary>The largest fixed cost per token (ms) at which the pruned model decodes <paramref name="ratio"/> times as
    /// fast as the dense one at this B: F = (dense / B - ratio · pruned / B) / (ratio - 1); negative where the bytes alone
    /// do not give the ratio.</summary>
    public double FixedMsForRatio(double ratio, long denseBytes, long prunedBytes)
    {
        if (ratio <= 1) throw new ArgumentOutOfRangeException(nameof(ratio), ratio, "the ratio must be above 1");
        return 1e3 * (denseBytes - ratio * prunedBytes) / BytesPerSecond / (ratio - 1);
    }
}
