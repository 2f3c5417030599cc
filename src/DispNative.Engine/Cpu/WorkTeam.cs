using System.Diagnostics;

namespace DispNative.Engine.Cpu;

/// <summary>Fork-join for the CPU kernels' many short parallel loops (a decode step runs dozens per token): the caller and
/// <c>ProcessorCount − 1</c> dedicated workers take items from a shared counter. Between jobs a worker spins for
/// <see cref="SpinMicroseconds"/> before it sleeps, so back-to-back jobs start without waking a thread-pool thread.
/// One job runs at a time; a call made while the team is busy (another thread's forward, or a loop nested in an item),
/// or limited to fewer threads than there are cores, runs through <see cref="Parallel.For(int, int, ParallelOptions, Action{int})"/>
/// instead. Items must be independent:
/// which thread runs an item never changes its result.</summary>
internal static class WorkTeam
{
    public const int SpinMicroseconds = 100;

    private sealed class Job(Action<int> body, int count)
    {
        public readonly Action<int> Body = body;
        public readonly int Count = count;
        public int Next;
        public int Done;
        public Exception? Error;

        /// <summary>Runs items until none is left.</summary>
        public void Work()
        {
            int i;
            while ((i = Interlocked.Increment(ref Next) - 1) < Count)
            {
                try { Body(i); }
                catch (Exception e) { Interlocked.CompareExchange(ref Error, e, null); }
                Interlocked.Increment(ref Done);
            }
        }
    }

    private static readonly object Gate = new();
    private static readonly int WorkerCount = Math.Max(0, Environment.ProcessorCount - 1);
    private static int _started;
    private static int _busy;
    private static Job? _job;
    private static long _generation;

    /// <summary>body(i) for i in [0, count) on up to <paramref name="maxThreads"/> threads (1: the calling thread only).</summary>
    public static void For(int count, int maxThreads, Action<int> body)
    {
        if (count <= 0) return;
        if (count == 1 || maxThreads <= 1 || WorkerCount == 0)
        {
            for (int i = 0; i < count; i++) body(i);
            return;
        }
        // The team is all cores: a smaller thread limit, or a team already at work, goes through Parallel.For.
        if (maxThreads <= WorkerCount || Interlocked.CompareExchange(ref _busy, 1, 0) != 0)
        {
            Parallel.For(0, count, new ParallelOptions { MaxDegreeOfParallelism = maxThreads }, body);
            return;
        }
        Job job;
        try
        {
            StartWorkers();
            job = new Job(body, count);
            lock (Gate)
            {
                Volatile.Write(ref _job, job);
                Volatile.Write(ref _generation, _generation + 1);
                Monitor.PulseAll(Gate);
            }
            job.Work();
            var spin = new SpinWait();
            while (Volatile.Read(ref job.Done) < count) spin.SpinOnce(sleep1Threshold: -1);
        }
        finally
        {
            Volatile.Write(ref _job, null);   // the workers must not keep the body's captures alive
            Volatile.Write(ref _busy, 0);
        }
        if (job.Error != null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(job.Error);
    }

    private static void StartWorkers()
    {
        if (Volatile.Read(ref _started) != 0 || Interlocked.Exchange(ref _started, 1) != 0) return;
        for (int w = 0; w < WorkerCount; w++)
            new Thread(WorkerLoop) { IsBackground = true, Name = $"DispNative CPU worker {w + 1}" }.Start();
    }

    private static void WorkerLoop()
    {
        long seen = Volatile.Read(ref _generation);
        long spinTicks = Stopwatch.Frequency * SpinMicroseconds / 1_000_000;
        while (true)
        {
            // Spin for the next job, then sleep until one is published (checked under the lock it is published under).
            long deadline = Stopwatch.GetTimestamp() + spinTicks;
            while (Volatile.Read(ref _generation) == seen && Stopwatch.GetTimestamp() < deadline) Thread.SpinWait(20);
            if (Volatile.Read(ref _generation) == seen)
                lock (Gate)
                    while (Volatile.Read(ref _generation) == seen) Monitor.Wait(Gate);
            seen = Volatile.Read(ref _generation);
            Volatile.Read(ref _job)?.Work();
        }
    }
}
