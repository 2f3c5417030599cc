using DispNative.Interop;

namespace DispNative.Engine.Cuda;

/// <summary>Raw device memory: the allocator's backing store (the CUDA driver, or a fake in tests).</summary>
public interface IDeviceMemory
{
    /// <summary>A device pointer, or 0 when the device is out of memory.</summary>
    ulong TryAllocate(long bytes);
    void Free(ulong pointer);
}

/// <summary>Allocator statistics, in bytes and counts.</summary>
public readonly record struct AllocatorStats(long InUseBytes, long CachedBytes, long PeakInUseBytes, long PeakReservedBytes,
    long Requests, long CacheHits, long DeviceAllocations);

/// <summary>Caching device allocator: sizes are rounded to buckets (512 B steps below 1 MiB, 2 MiB steps above)
/// and freed blocks wait in a per-bucket free list for the next request of the same bucket, so steady-state
/// forwards allocate nothing from the driver. On out-of-memory the cache is released and the request retried.
/// Thread-safe.</summary>
public sealed class CachingAllocator(IDeviceMemory memory) : IDisposable
{
    public const long SmallStep = 512, LargeStep = 2 << 20, LargeThreshold = 1 << 20;

    private readonly Dictionary<long, Stack<ulong>> _free = [];
    private readonly Dictionary<ulong, long> _live = [];
    private readonly object _lock = new();
    private long _inUse, _cached, _peakInUse, _peakReserved, _requests, _hits, _deviceAllocations;

    /// <summary>The bucket (rounded size) that serves a request of <paramref name="bytes"/>.</summary>
    public static long BucketSize(long bytes)
    {
        if (bytes <= 0) return SmallStep;
        long step = bytes < LargeThreshold ? SmallStep : LargeStep;
        return (bytes + step - 1) / step * step;
    }

    public AllocatorStats Stats
    {
        get { lock (_lock) return new(_inUse, _cached, _peakInUse, _peakReserved, _requests, _hits, _deviceAllocations); }
    }

    /// <summary>A block of at least <paramref name="bytes"/>; throws <see cref="CudaOutOfMemoryException"/> with the
    /// allocator's state when the device cannot provide it even after releasing the cache.</summary>
    public ulong Allocate(long bytes)
    {
        long size = BucketSize(bytes);
        lock (_lock)
        {
            _requests++;
            ulong p;
            if (_free.TryGetValue(size, out var stack) && stack.Count > 0)
            {
                p = stack.Pop();
                _cached -= size;
                _hits++;
            }
            else
            {
                p = memory.TryAllocate(size);
                if (p == 0) { TrimLocked(); p = memory.TryAllocate(size); }
                if (p == 0)
                    throw new CudaOutOfMemoryException($"out of device memory: {ByteCount.Format(bytes)} requested, {ByteCount.Format(_inUse)} in use by this engine " +
                        "(the cache was released and the request retried); use a smaller block size, a shorter context or bf16");
                _deviceAllocations++;
            }
            _live[p] = size;
            _inUse += size;
            _peakInUse = Math.Max(_peakInUse, _inUse);
            _peakReserved = Math.Max(_peakReserved, _inUse + _cached);
            return p;
        }
    }

    /// <summary>Returns a block to its bucket's free list.</summary>
    public void Release(ulong pointer)
    {
        lock (_lock)
        {
            if (!_live.Remove(pointer, out long size)) throw new InvalidOperationException($"0x{pointer:x} was not allocated by this allocator or was released twice");
            _inUse -= size;
            _cached += size;
            if (!_free.TryGetValue(size, out var stack)) _free[size] = stack = new Stack<ulong>();
            stack.Push(pointer);
        }
    }

    /// <summary>Frees every cached (unused) block back to the device.</summary>
    public void Trim() { lock (_lock) TrimLocked(); }

    private void TrimLocked()
    {
        foreach (var stack in _free.Values)
            while (stack.Count > 0) memory.Free(stack.Pop());
        _free.Clear();
        _cached = 0;
    }

    /// <summary>Frees the cache and every live block.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            TrimLocked();
            foreach (var p in _live.Keys) memory.Free(p);
            _live.Clear();
            _inUse = 0;
        }
    }
}

/// <summary>The CUDA driver as the allocator's backing store.</summary>
internal sealed class DriverMemory : IDeviceMemory
{
    public ulong TryAllocate(long bytes) => CudaDriver.TryAlloc(bytes);
    public void Free(ulong pointer) => CudaDriver.Free(pointer);
}
