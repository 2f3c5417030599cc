using System.Runtime.InteropServices;
using System.Text;

namespace DispNative.Interop;

/// <summary>NVRTC rejected a kernel source; <see cref="Log"/> holds its diagnostics with file and line.</summary>
public sealed class NvrtcCompileException(string program, string log)
    : Exception($"NVRTC could not compile {program}:\n{log.TrimEnd()}")
{
    public string Program { get; } = program;
    public string Log { get; } = log;
}

/// <summary>Bindings to the NVRTC runtime compiler (libnvrtc.so.13, .12, or 11.2 for CUDA 11.8).</summary>
public static unsafe class Nvrtc
{
    private static readonly Lazy<Api> Lazy = new(() => new Api(), LazyThreadSafetyMode.ExecutionAndPublication);
    private static Api A => Lazy.Value;

    private sealed class Api
    {
        public readonly delegate* unmanaged<int*, int*, int> nvrtcVersion;
        public readonly delegate* unmanaged<nint*, byte*, byte*, int, byte**, byte**, int> nvrtcCreateProgram;
        public readonly delegate* unmanaged<nint, int, byte**, int> nvrtcCompileProgram;
        public readonly delegate* unmanaged<nint*, int> nvrtcDestroyProgram;
        public readonly delegate* unmanaged<nint, nuint*, int> nvrtcGetProgramLogSize;
        public readonly delegate* unmanaged<nint, byte*, int> nvrtcGetProgramLog;
        public readonly delegate* unmanaged<nint, nuint*, int> nvrtcGetCUBINSize;
        public readonly delegate* unmanaged<nint, byte*, int> nvrtcGetCUBIN;
        public readonly delegate* unmanaged<nint, nuint*, int> nvrtcGetPTXSize;   // null where the library has none
        public readonly delegate* unmanaged<nint, byte*, int> nvrtcGetPTX;
        public readonly delegate* unmanaged<int, byte*> nvrtcGetErrorString;
        public readonly string LibraryName;

        public Api()
        {
            var lib = NativeLibraryHandle.Load("nvrtc", OperatingSystem.IsWindows()
                ? ["nvrtc64_130_0.dll", "nvrtc64_120_0.dll", "nvrtc64_112_0.dll"]
                : ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so"]);
            LibraryName = lib.Name;
            nvrtcVersion = (delegate* unmanaged<int*, int*, int>)lib.Export("nvrtcVersion");
            nvrtcCreateProgram = (delegate* unmanaged<nint*, byte*, byte*, int, byte**, byte**, int>)lib.Export("nvrtcCreateProgram");
            nvrtcCompileProgram = (delegate* unmanaged<nint, int, byte**, int>)lib.Export("nvrtcCompileProgram");
            nvrtcDestroyProgram = (delegate* unmanaged<nint*, int>)lib.Export("nvrtcDestroyProgram");
            nvrtcGetProgramLogSize = (delegate* unmanaged<nint, nuint*, int>)lib.Export("nvrtcGetProgramLogSize");
            nvrtcGetProgramLog = (delegate* unmanaged<nint, byte*, int>)lib.Export("nvrtcGetProgramLog");
            nvrtcGetCUBINSize = (delegate* unmanaged<nint, nuint*, int>)lib.Export("nvrtcGetCUBINSize");
            nvrtcGetCUBIN = (delegate* unmanaged<nint, byte*, int>)lib.Export("nvrtcGetCUBIN");
            nvrtcGetPTXSize = (delegate* unmanaged<nint, nuint*, int>)lib.TryExport("nvrtcGetPTXSize");
            nvrtcGetPTX = (delegate* unmanaged<nint, byte*, int>)lib.TryExport("nvrtcGetPTX");
            nvrtcGetErrorString = (delegate* unmanaged<int, byte*>)lib.Export("nvrtcGetErrorString");
        }
    }

    /// <summary>True when an NVRTC library can be loaded; <paramref name="reason"/> says which, or why not.</summary>
    public static bool IsAvailable(out string reason)
    {
        try { reason = $"{A.LibraryName} (NVRTC {Version})"; return true; }
        catch (CudaLibraryException e) { reason = e.Message; return false; }
    }

    public static string LibraryName => A.LibraryName;

    public static Version Version
    {
        get { int major, minor; Check(A.nvrtcVersion(&major, &minor), "nvrtcVersion"); return new Version(major, minor); }
    }

    private static void Check(int rc, string function)
    {
        if (rc == 0) return;
        string s = Marshal.PtrToStringUTF8((nint)A.nvrtcGetErrorString(rc)) ?? "unknown";
        throw new CudaException("NVRTC", function, rc, s, s);
    }

    /// <summary>Compiles one translation unit to a CUBIN. <paramref name="headers"/> maps include names to their text.
    /// Throws <see cref="NvrtcCompileException"/> with NVRTC's log on a compile error.</summary>
    public static byte[] CompileToCubin(string source, string programName, IReadOnlyDictionary<string, string> headers,
        IReadOnlyList<string> options, out string log)
        => Compile(source, programName, headers, options, out log, prog =>
        {
            nuint size;
            Check(A.nvrtcGetCUBINSize(prog, &size), "nvrtcGetCUBINSize");
            var cubin = new byte[(int)size];
            fixed (byte* pc = cubin) Check(A.nvrtcGetCUBIN(prog, pc), "nvrtcGetCUBIN");
            return cubin;
        });

    /// <summary>Whether the loaded NVRTC hands out PTX (<see cref="CompileToPtx"/>).</summary>
    public static bool HasPtx => A.nvrtcGetPTX != null && A.nvrtcGetPTXSize != null;

    /// <summary>The PTX of a source compiled for a virtual architecture (options <c>-arch=compute_XY</c>): what ptxas is
    /// given, for tests that inspect the instructions a kernel was lowered to.</summary>
    public static string CompileToPtx(string source, string programName, IReadOnlyDictionary<string, string> headers,
        IReadOnlyList<string> options, out string log)
    {
        if (!HasPtx) throw new InvalidOperationException($"{LibraryName} exports no nvrtcGetPTX");
        var bytes = Compile(source, programName, headers, options, out log, prog =>
        {
            nuint size;
            Check(A.nvrtcGetPTXSize(prog, &size), "nvrtcGetPTXSize");
            var ptx = new byte[(int)size];
            fixed (byte* pp = ptx) Check(A.nvrtcGetPTX(prog, pp), "nvrtcGetPTX");
            return ptx;
        });
        return Encoding.UTF8.GetString(bytes).TrimEnd('\0');
    }

    private static byte[] Compile(string source, string programName, IReadOnlyDictionary<string, string> headers,
        IReadOnlyList<string> options, out string log, Func<nint, byte[]> output)
    {
        var pinned = new List<GCHandle>();
        byte* Utf8(string s)
        {
            var h = GCHandle.Alloc(Encoding.UTF8.GetBytes(s + "\0"), GCHandleType.Pinned);
            pinned.Add(h);
            return (byte*)h.AddrOfPinnedObject();
        }
        nint prog = 0;
        try
        {
            var headerTexts = stackalloc byte*[Math.Max(1, headers.Count)];
            var headerNames = stackalloc byte*[Math.Max(1, headers.Count)];
            int i = 0;
            foreach (var (name, text) in headers) { headerNames[i] = Utf8(name); headerTexts[i] = Utf8(text); i++; }
            Check(A.nvrtcCreateProgram(&prog, Utf8(source), Utf8(programName), headers.Count, headerTexts, headerNames), "nvrtcCreateProgram");
            var opts = stackalloc byte*[Math.Max(1, options.Count)];
            for (int o = 0; o < options.Count; o++) opts[o] = Utf8(options[o]);
            int rc = A.nvrtcCompileProgram(prog, options.Count, opts);
            nuint logSize;
            Check(A.nvrtcGetProgramLogSize(prog, &logSize), "nvrtcGetProgramLogSize");
            var logBytes = new byte[(int)logSize];
            fixed (byte* pl = logBytes) Check(A.nvrtcGetProgramLog(prog, pl), "nvrtcGetProgramLog");
            log = Encoding.UTF8.GetString(logBytes).TrimEnd('\0');
            if (rc == 6) throw new NvrtcCompileException(programName, log); // NVRTC_ERROR_COMPILATION
            Check(rc, "nvrtcCompileProgram");
            return output(prog);
        }
        finally
        {
            if (prog != 0) A.nvrtcDestroyProgram(&prog);
            foreach (var h in pinned) h.Free();
        }
    }
}
