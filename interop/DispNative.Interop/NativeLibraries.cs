using System.Runtime.InteropServices;

namespace DispNative.Interop;

/// <summary>A CUDA library (driver, NVRTC, cuBLAS, cuBLASLt) that could not be loaded or lacks an export.</summary>
public sealed class CudaLibraryException(string message) : Exception(message);

/// <summary>Loads native libraries by trying versioned names in order and resolves their exports.</summary>
internal sealed class NativeLibraryHandle
{
    public nint Handle { get; }
    public string Name { get; }

    private NativeLibraryHandle(nint handle, string name) { Handle = handle; Name = name; }

    /// <summary>The first of <paramref name="candidates"/> that loads; an error naming every candidate otherwise.
    /// <c>DISPNATIVE_&lt;WHAT&gt;_LIBRARY</c> (for example DISPNATIVE_NVRTC_LIBRARY) overrides the search with a path.</summary>
    public static NativeLibraryHandle Load(string what, IReadOnlyList<string> candidates)
    {
        string? overridePath = Environment.GetEnvironmentVariable($"DISPNATIVE_{what.ToUpperInvariant()}_LIBRARY");
        var names = string.IsNullOrEmpty(overridePath) ? candidates : [overridePath];
        foreach (var name in names)
            if (NativeLibrary.TryLoad(name, out var h)) return new NativeLibraryHandle(h, name);
        throw new CudaLibraryException($"{what}: none of {string.Join(", ", names)} could be loaded (install the CUDA toolkit/driver or set DISPNATIVE_{what.ToUpperInvariant()}_LIBRARY)");
    }

    public nint Export(string symbol) => NativeLibrary.TryGetExport(Handle, symbol, out var p)
        ? p : throw new CudaLibraryException($"{Name} does not export {symbol} (library too old?)");

    public nint TryExport(string symbol) => NativeLibrary.TryGetExport(Handle, symbol, out var p) ? p : 0;

    /// <summary>Library names for a CUDA toolkit component on this OS, newest major first.</summary>
    public static string[] Versioned(string baseName, params string[] versions) => OperatingSystem.IsWindows()
        ? [.. versions.Select(v => $"{baseName}64_{v.Split('.')[0]}.dll")]
        : [.. versions.Select(v => $"lib{baseName}.so.{v}"), $"lib{baseName}.so"];
}
