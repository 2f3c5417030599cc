using DispNative.KernelBench;
using NUnit.Framework;

namespace DispNative.Tests;

public class DecodeCostFitTests
{
    // The H100 decode figures of 2026-11-25 (docs/gpu-performance-log.md): dense 183.9 tok/s reading 13.19 GB per token, pruned 288.9 reading 6.71 GB.
    private const long DenseBytes = 13_190_000_000, PrunedBytes = 6_710_000_000;
    private const double DenseMs = 1e3 / 183.9, PrunedMs = 1e3 / 288.9;

    [Test]
    public void FitsBandwidthAndFixedCost_ThroughBothSteps()
    {
        var fit = DecodeCostFit.From(DenseMs, DenseBytes, PrunedMs, PrunedBytes)!.Value;
        Assert.That(fit.BytesPerSecond, Is.EqualTo(3.279e12).Within(0.001e12));
        Assert.That(fit.FixedMs, Is.EqualTo(1.415).Within(0.001));
        // Both measurements lie on the fitted line.
        Assert.That(1e3 * DenseBytes / fit.BytesPerSecond + fit.FixedMs, Is.EqualTo(DenseMs).Within(1e-9));
        Assert.That(1e3 * PrunedBytes / fit.BytesPerSecond + fit.FixedMs, Is.EqualTo(PrunedMs).Within(1e-9));
    }

    [Test]
    public void LargestFixedCostForARatio_GivesExactlyThatRatio()
    {
        var fit = DecodeCostFit.From(DenseMs, DenseBytes, PrunedMs, PrunedBytes)!.Value;
        double f = fit.FixedMsForRatio(1.7, DenseBytes, PrunedBytes);
        Assert.That(f, Is.EqualTo(0.777).Within(0.001));
        double dense = 1e3 * DenseBytes / fit.BytesPerSecond + f, pruned = 1e3 * PrunedBytes / fit.BytesPerSecond + f;
        Assert.That(dense / pruned, Is.EqualTo(1.7).Within(1e-12));
        // Bytes alone give 13.19 / 6.71 = 1.97x: a 2x target cannot be met at any fixed cost.
        Assert.That(fit.FixedMsForRatio(2.0, DenseBytes, PrunedBytes), Is.LessThan(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => fit.FixedMsForRatio(1.0, DenseBytes, PrunedBytes));
    }

    [TestCase(3.0, 13_190_000_000L, 3.5, 6_710_000_000L)]    // pruned step slower
    [TestCase(5.0, 6_710_000_000L, 3.0, 6_710_000_000L)]     // same bytes
    public void NoFit_WithoutFewerBytesAndAFasterStep(double denseMs, long denseBytes, double prunedMs, long prunedBytes)
        => Assert.That(DecodeCostFit.From(denseMs, denseBytes, prunedMs, prunedBytes), Is.Null);
}
