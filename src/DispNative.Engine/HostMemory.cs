namespace DispNative.Engine;

/// <summary>The host memory this process may use, and the check that a load fits in it before it starts: on Linux a
/// load past physical memory is not an exception but the kernel's out-of-memory killer, which ends the process
/// without a word.</summary>
public static class HostMemory
{
    /// <summary>Bytes the runtime may use: the machine's physical memory, or the cap of a container or of
    /// <c>DOTNET_GCHeapHardLimit</c>.</summary>
    public static long Limit => GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;

    /// <summary>Refuses <paramref name="bytes"/> for <paramref name="what"/> when they exceed <paramref name="limit"/>
    /// (default <see cref="Limit"/>).</summary>
    public static void Require(long bytes, string what, long? limit = null)
    {
        long cap = limit ?? Limit;
        if (bytes > cap)
            throw new DispNativeException($"{what} needs {ByteCount.Format(bytes)} of host memory, more than the {ByteCount.Format(cap)} this process may use");
    }
}

/// <summary>Byte counts for messages.</summary>
public static class ByteCount
{
    /// <summary>A byte count in KiB, MiB, GiB or TiB.</summary>
    public static string Format(long bytes) => bytes switch
    {
        < 1L << 20 => $"{bytes / 1024.0:F1} KiB",
        < 1L << 30 => $"{bytes / (double)(1L << 20):F1} MiB",
        < 1L << 40 => $"{bytes / (double)(1L << 30):F2} GiB",
        _ => $"{bytes / (double)(1L << 40):F2} TiB",
    };
}
