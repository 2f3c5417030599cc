namespace DispNative.Interop;

/// <summary>Asks the CUDA driver how many devices there are, without throwing. Used to pick a device for
/// <c>--device auto</c> and to skip GPU tests with a reason.</summary>
public static class CudaDriverProbe
{
    /// <summary>Number of CUDA devices, or 0 with the reason why none can be used.</summary>
    public static int DeviceCount(out string reason)
    {
        try
        {
            CudaDriver.Init();
            int n = CudaDriver.DeviceCount();
            reason = n == 0 ? "the CUDA driver reports no devices" : $"{n} CUDA device(s)";
            return n;
        }
        catch (CudaLibraryException e) { reason = $"no CUDA driver found ({e.Message})"; return 0; }
        catch (CudaException e) { reason = $"the CUDA driver is present but no device is usable: {e.Message}"; return 0; }
    }
}
