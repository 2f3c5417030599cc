using DispNative.Engine.Cuda;

namespace DispNative.Tests;

/// <summary>The GEMM algorithm choice without a GPU: the fastest candidate is kept and recorded, a later process (a new
/// instance on the same directory and identity) takes the recorded one without timing, and anything that does not
/// match (another device or library, an algorithm the heuristic no longer offers, a damaged file) is timed again.</summary>
public class GemmTuningTests
{
    private static readonly string[] Ids = ["A0", "B1", "C2", "D3"];

    private static Func<int, float> Times(params float[] ms) => i => ms[i];
    private static readonly Func<int, float> MustNotTime = i => throw new AssertionException($"timed candidate {i}");

    [Test]
    public void TheFastestIsChosen_Recorded_AndReusedByTheNextProcess_WithoutTiming()
    {
        var dir = TestAssets.TempDir();
        var first = new GemmTuning(dir, "H100 sm_90 cublasLt 130000");
        Assert.That(first.Choose("2048,2656,7160", Ids, Times(0.9f, 0.7f, float.PositiveInfinity, 0.8f)), Is.EqualTo(1));
        Assert.That(first.Choose("2048,7160,2656", Ids, Times(0.5f, 0.6f, 0.7f, 0.8f)), Is.EqualTo(0));
        Assert.That((first.Timed, first.Reused, first.Recorded("2048,2656,7160")), Is.EqualTo((2, 0, "B1")));

        var next = new GemmTuning(dir, "H100 sm_90 cublasLt 130000");
        Assert.That(next.FilePath, Is.EqualTo(first.FilePath));
        Assert.That(next.Choose("2048,2656,7160", Ids, MustNotTime), Is.EqualTo(1));
        // The heuristic may list the same algorithms in another order: the id, not the index, is what is kept.
        Assert.That(next.Choose("2048,7160,2656", ["D3", "A0"], MustNotTime), Is.EqualTo(1));
        Assert.That((next.Timed, next.Reused), Is.EqualTo((0, 2)));
    }

    [Test]
    public void AnotherDevice_OrAnAlgorithmNoLongerOffered_IsTimedAgain()
    {
        var dir = TestAssets.TempDir();
        new GemmTuning(dir, "H100").Choose("s", Ids, Times(3, 2, 1, 4));
        var other = new GemmTuning(dir, "A100");
        Assert.That(other.FilePath, Is.Not.EqualTo(new GemmTuning(dir, "H100").FilePath));
        Assert.That(other.Choose("s", Ids, Times(1, 2, 3, 4)), Is.EqualTo(0));
        var same = new GemmTuning(dir, "H100");
        Assert.That(same.Choose("s", ["A0", "B1", "D3"], Times(5, 4, 6)), Is.EqualTo(1), "C2 is no longer offered");
        Assert.That((same.Timed, same.Reused, same.Recorded("s")), Is.EqualTo((1, 0, "B1")));
    }

    [Test]
    public void TwoProcesses_ChoosingAtTheSameTime_BothKeepTheirChoicesInTheFile()
    {
        var dir = TestAssets.TempDir();
        var a = new GemmTuning(dir, "x");
        var b = new GemmTuning(dir, "x");
        a.Choose("first", Ids, Times(2, 1, 3, 4));   // a has read the file (empty) before b writes
        b.Choose("second", Ids, Times(1, 2, 3, 4));
        a.Choose("third", Ids, Times(3, 2, 1, 4));
        var later = new GemmTuning(dir, "x");
        Assert.That((later.Recorded("first"), later.Recorded("second"), later.Recorded("third")), Is.EqualTo(("B1", "A0", "C2")));
    }

    [Test]
    public void WhenNoCandidateRuns_TheFirstIsUsed_AndNothingIsRecorded()
    {
        var t = new GemmTuning(TestAssets.TempDir(), "x");
        Assert.That(t.Choose("s", Ids, _ => float.PositiveInfinity), Is.EqualTo(0));
        Assert.That((t.Recorded("s"), File.Exists(t.FilePath)), Is.EqualTo(((string?)null, false)));
    }

    [Test]
    public void ADamagedFile_IsIgnoredLineByLine_AndAnUnwritableDirectory_OnlyCostsTiming()
    {
        var dir = TestAssets.TempDir();
        var t = new GemmTuning(dir, "x");
        File.WriteAllLines(t.FilePath, ["no tab here", "\tB1", "good\tC2", "empty\t"]);
        var reader = new GemmTuning(dir, "x");
        Assert.That(reader.Choose("good", Ids, MustNotTime), Is.EqualTo(2));
        Assert.That((reader.Recorded("no tab here"), reader.Recorded(""), reader.Recorded("empty")), Is.EqualTo(((string?)null, (string?)null, (string?)null)));

        string blocked = Path.Combine(dir, "a-file");
        File.WriteAllText(blocked, "");   // a file where the cache directory should be
        var unwritable = new GemmTuning(Path.Combine(blocked, "cache"), "x");
        Assert.That(unwritable.Choose("s", Ids, Times(2, 1, 3, 4)), Is.EqualTo(1));
        Assert.That(unwritable.Recorded("s"), Is.EqualTo("B1"), "kept in memory for this process");
    }
}
