using DispNative.Engine.Cpu;

namespace DispNative.Tests;

public class WorkTeamTests
{
    // Every core: the limit under which calls take the team rather than Parallel.For.
    private static readonly int All = Math.Max(2, Environment.ProcessorCount);

    [Test]
    public void EveryItemRunsOnce_AndAllHaveFinishedWhenForReturns()
    {
        for (int round = 0; round < 200; round++)
        {
            int count = 1 + round * 7 % 300;
            var hits = new int[count];
            WorkTeam.For(count, All, i => { if (i % 3 == 0) Thread.SpinWait(200); Interlocked.Increment(ref hits[i]); });
            Assert.That(hits, Is.All.EqualTo(1), $"round {round}, {count} items");
        }
    }

    [Test]
    public void AnItemsException_ReachesTheCaller_AndTheTeamKeepsWorking()
    {
        var e = Assert.Throws<InvalidOperationException>(() => WorkTeam.For(64, All, i => { if (i == 17) throw new InvalidOperationException("item 17"); }));
        Assert.That(e!.Message, Is.EqualTo("item 17"));
        long sum = 0;
        WorkTeam.For(100, All, i => Interlocked.Add(ref sum, i));
        Assert.That(sum, Is.EqualTo(4950));
    }

    [Test]
    public async Task ConcurrentAndNestedCalls_EachSeeTheirOwnItems()
    {
        // While one caller holds the team, the others (and loops nested in its items) go through Parallel.For.
        var totals = await Task.WhenAll(Enumerable.Range(0, 4).Select(t => Task.Run(() =>
        {
            long total = 0;
            for (int round = 0; round < 50; round++)
                WorkTeam.For(8, All, i =>
                {
                    long inner = 0;
                    WorkTeam.For(10, All, j => Interlocked.Add(ref inner, j + 1));
                    Interlocked.Add(ref total, inner * (t + 1));
                });
            return total;
        })));
        Assert.That(totals, Is.EqualTo(new long[] { 1, 2, 3, 4 }.Select(k => 50 * 8 * 55 * k)));
    }
}
