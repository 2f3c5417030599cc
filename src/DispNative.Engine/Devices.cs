using DispNative.Interop;

namespace DispNative.Engine;

/// <summary>Chooses the compute device for <c>--device cpu|cuda|auto</c>.</summary>
public static class Devices
{
    /// <summary>Returns "cpu" (the only backend in this build): "auto" falls back to it, "cuda" is an error that
    /// says why (no driver, no device, or the CUDA backend not built yet).</summary>
    public static string Resolve(string device)
    {
        switch (device)
        {
            case "cpu":
            case "auto":
                return "cpu";
            case "cuda":
                int n = CudaDriverProbe.DeviceCount(out string reason);
                throw new DispNativeException(n == 0
                    ? $"--device cuda: {reason}"
                    : $"--device cuda: {reason}, but this build has no CUDA backend yet; use --device cpu");
            default:
                throw new InvalidSettingException($"unknown device '{device}' (expected cpu, cuda or auto)");
        }
    }
}
