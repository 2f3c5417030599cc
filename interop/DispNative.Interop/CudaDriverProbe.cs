using System.Runtime.InteropServices;

namespace DispNative.Interop;

/// <summary>Finds the CUDA driver library and asks it how many devices there are, without throwing.
/// Used to pick a device for <c>--device auto</c> and to skip GPU tests with a reason.</summary>
public static unsafe class CudaDriverProbe
{
    private static readonly string[] DriverNames = OperatingSystem.IsWindows() ? ["nvcuda.dll"] : ["libcuda.so.1", "libcuda.so"];

    /// <summary>Loads the first driver library that exists; null when none does.</summary>
    public static nint TryLoadDriver(out string? loadedName)
    {
        foreach (var name in DriverNames)
            if (NativeLibrary.TryLoad(name, out var handle)) { loadedName = name; return handle; }
        loadedName = null;
        return 0;
    }

    /// <summary>Number of CUDA devices, or 0 with the reason why none can be used.</summary>
    public static int DeviceCount(out string reason)
    {
        nint lib = TryLoadDriver(out var name);
        if (lib == 0) { reason = $"no CUDA driver found (tried {string.Join(", ", DriverNames)})"; return 0; }
        if (!NativeLibrary.TryGetExport(lib, "cuInit", out var init) || !NativeLibrary.TryGetExport(lib, "cuDeviceGetCount", out var count))
        {
            reason = $"{name} does not export cuInit/cuDeviceGetCount";
            return 0;
        }
        int rc = ((delegate* unmanaged<uint, int>)init)(0);
        if (rc != 0) { reason = $"cuInit failed with CUresult {rc} (driver present, no usable device)"; return 0; }
        int n = 0;
        rc = ((delegate* unmanaged<int*, int>)count)(&n);
        if (rc != 0 || n == 0) { reason = rc != 0 ? $"cuDeviceGetCount failed with CUresult {rc}" : "the CUDA driver reports no devices"; return 0; }
        reason = $"{n} CUDA device(s) via {name}";
        return n;
    }
}
