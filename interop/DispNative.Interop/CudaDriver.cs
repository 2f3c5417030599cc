using System.Runtime.InteropServices;

namespace DispNative.Interop;

/// <summary>Device attributes used by the engine (CUdevice_attribute values).</summary>
public enum CuDeviceAttribute
{
    ClockRateKHz = 13,
    MultiprocessorCount = 16,
    MemoryClockRateKHz = 36,
    GlobalMemoryBusWidth = 37,
    L2CacheSizeBytes = 38,
    ComputeCapabilityMajor = 75,
    ComputeCapabilityMinor = 76,
    MaxSharedMemoryPerBlockOptin = 97,
}

/// <summary>Thin, checked bindings to the CUDA driver API (libcuda.so.1 / nvcuda.dll) through function pointers.
/// Every call returns normally or throws <see cref="CudaException"/> with the driver's error name and string.</summary>
public static unsafe class CudaDriver
{
    private static readonly Lazy<Api> Lazy = new(() => new Api(), LazyThreadSafetyMode.ExecutionAndPublication);
    private static Api A => Lazy.Value;

    private sealed class Api
    {
        public readonly delegate* unmanaged<uint, int> cuInit;
        public readonly delegate* unmanaged<int*, int> cuDriverGetVersion;
        public readonly delegate* unmanaged<int*, int> cuDeviceGetCount;
        public readonly delegate* unmanaged<int*, int, int> cuDeviceGet;
        public readonly delegate* unmanaged<byte*, int, int, int> cuDeviceGetName;
        public readonly delegate* unmanaged<nuint*, int, int> cuDeviceTotalMem;
        public readonly delegate* unmanaged<int*, int, int, int> cuDeviceGetAttribute;
        public readonly delegate* unmanaged<nint*, int, int> cuDevicePrimaryCtxRetain;
        public readonly delegate* unmanaged<int, int> cuDevicePrimaryCtxRelease;
        public readonly delegate* unmanaged<nint, int> cuCtxSetCurrent;
        public readonly delegate* unmanaged<ulong*, nuint, int> cuMemAlloc;
        public readonly delegate* unmanaged<ulong, int> cuMemFree;
        public readonly delegate* unmanaged<void**, nuint, int> cuMemAllocHost;
        public readonly delegate* unmanaged<void**, nuint, uint, int> cuMemHostAlloc;
        public readonly delegate* unmanaged<ulong*, void*, uint, int> cuMemHostGetDevicePointer;
        public readonly delegate* unmanaged<void*, int> cuMemFreeHost;
        public readonly delegate* unmanaged<ulong, void*, nuint, nint, int> cuMemcpyHtoDAsync;
        public readonly delegate* unmanaged<void*, ulong, nuint, nint, int> cuMemcpyDtoHAsync;
        public readonly delegate* unmanaged<ulong, ulong, nuint, nint, int> cuMemcpyDtoDAsync;
        public readonly delegate* unmanaged<nint*, uint, int> cuStreamCreate;
        public readonly delegate* unmanaged<nint, int> cuStreamDestroy;
        public readonly delegate* unmanaged<nint, int> cuStreamSynchronize;
        public readonly delegate* unmanaged<nint*, uint, int> cuEventCreate;
        public readonly delegate* unmanaged<nint, int> cuEventDestroy;
        public readonly delegate* unmanaged<nint, nint, int> cuEventRecord;
        public readonly delegate* unmanaged<nint, int> cuEventSynchronize;
        public readonly delegate* unmanaged<float*, nint, nint, int> cuEventElapsedTime;
        public readonly delegate* unmanaged<nint*, void*, int> cuModuleLoadData;
        public readonly delegate* unmanaged<nint, int> cuModuleUnload;
        public readonly delegate* unmanaged<nint*, nint, byte*, int> cuModuleGetFunction;
        public readonly delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int> cuLaunchKernel;
        public readonly delegate* unmanaged<nint, int, int, int> cuFuncSetAttribute;
        public readonly delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, int> cuLaunchCooperativeKernel;
        /// <summary>Null where the driver predates CUDA 12 (no cuLaunchKernelEx): launches go through cuLaunchKernel.</summary>
        public readonly delegate* unmanaged<LaunchConfig*, nint, void**, void**, int> cuLaunchKernelEx;
        public readonly delegate* unmanaged<nint, int, int> cuStreamBeginCapture;
        public readonly delegate* unmanaged<nint, nint*, int> cuStreamEndCapture;
        public readonly delegate* unmanaged<nint, int*, int> cuStreamIsCapturing;
        public readonly delegate* unmanaged<int> cuProfilerStart, cuProfilerStop;   // null where not exported
        public readonly delegate* unmanaged<int*, nint, int, nuint, int> cuOccupancyMaxActiveBlocksPerMultiprocessor;   // null where not exported
        public readonly delegate* unmanaged<nint*, nint, ulong, int> cuGraphInstantiateWithFlags;
        public readonly delegate* unmanaged<nint, nint, int> cuGraphLaunch;
        public readonly delegate* unmanaged<nint, int> cuGraphExecDestroy;
        public readonly delegate* unmanaged<nint, int> cuGraphDestroy;
        public readonly delegate* unmanaged<int, byte**, int> cuGetErrorName;
        public readonly delegate* unmanaged<int, byte**, int> cuGetErrorString;

        public Api()
        {
            var lib = NativeLibraryHandle.Load("cuda", OperatingSystem.IsWindows() ? ["nvcuda.dll"] : ["libcuda.so.1", "libcuda.so"]);
            cuInit = (delegate* unmanaged<uint, int>)lib.Export("cuInit");
            cuDriverGetVersion = (delegate* unmanaged<int*, int>)lib.Export("cuDriverGetVersion");
            cuDeviceGetCount = (delegate* unmanaged<int*, int>)lib.Export("cuDeviceGetCount");
            cuDeviceGet = (delegate* unmanaged<int*, int, int>)lib.Export("cuDeviceGet");
            cuDeviceGetName = (delegate* unmanaged<byte*, int, int, int>)lib.Export("cuDeviceGetName");
            cuDeviceTotalMem = (delegate* unmanaged<nuint*, int, int>)lib.Export("cuDeviceTotalMem_v2");
            cuDeviceGetAttribute = (delegate* unmanaged<int*, int, int, int>)lib.Export("cuDeviceGetAttribute");
            cuDevicePrimaryCtxRetain = (delegate* unmanaged<nint*, int, int>)lib.Export("cuDevicePrimaryCtxRetain");
            cuDevicePrimaryCtxRelease = (delegate* unmanaged<int, int>)lib.Export("cuDevicePrimaryCtxRelease_v2");
            cuCtxSetCurrent = (delegate* unmanaged<nint, int>)lib.Export("cuCtxSetCurrent");
            cuMemAlloc = (delegate* unmanaged<ulong*, nuint, int>)lib.Export("cuMemAlloc_v2");
            cuMemFree = (delegate* unmanaged<ulong, int>)lib.Export("cuMemFree_v2");
            cuMemAllocHost = (delegate* unmanaged<void**, nuint, int>)lib.Export("cuMemAllocHost_v2");
            cuMemHostAlloc = (delegate* unmanaged<void**, nuint, uint, int>)lib.Export("cuMemHostAlloc");
            cuMemHostGetDevicePointer = (delegate* unmanaged<ulong*, void*, uint, int>)lib.Export("cuMemHostGetDevicePointer_v2");
            cuMemFreeHost = (delegate* unmanaged<void*, int>)lib.Export("cuMemFreeHost");
            cuMemcpyHtoDAsync = (delegate* unmanaged<ulong, void*, nuint, nint, int>)lib.Export("cuMemcpyHtoDAsync_v2");
            cuMemcpyDtoHAsync = (delegate* unmanaged<void*, ulong, nuint, nint, int>)lib.Export("cuMemcpyDtoHAsync_v2");
            cuMemcpyDtoDAsync = (delegate* unmanaged<ulong, ulong, nuint, nint, int>)lib.Export("cuMemcpyDtoDAsync_v2");
            cuStreamCreate = (delegate* unmanaged<nint*, uint, int>)lib.Export("cuStreamCreate");
            cuStreamDestroy = (delegate* unmanaged<nint, int>)lib.Export("cuStreamDestroy_v2");
            cuStreamSynchronize = (delegate* unmanaged<nint, int>)lib.Export("cuStreamSynchronize");
            cuEventCreate = (delegate* unmanaged<nint*, uint, int>)lib.Export("cuEventCreate");
            cuEventDestroy = (delegate* unmanaged<nint, int>)lib.Export("cuEventDestroy_v2");
            cuEventRecord = (delegate* unmanaged<nint, nint, int>)lib.Export("cuEventRecord");
            cuEventSynchronize = (delegate* unmanaged<nint, int>)lib.Export("cuEventSynchronize");
            cuEventElapsedTime = (delegate* unmanaged<float*, nint, nint, int>)(lib.TryExport("cuEventElapsedTime_v2") is var p && p != 0 ? p : lib.Export("cuEventElapsedTime"));
            cuModuleLoadData = (delegate* unmanaged<nint*, void*, int>)lib.Export("cuModuleLoadData");
            cuModuleUnload = (delegate* unmanaged<nint, int>)lib.Export("cuModuleUnload");
            cuModuleGetFunction = (delegate* unmanaged<nint*, nint, byte*, int>)lib.Export("cuModuleGetFunction");
            cuLaunchKernel = (delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int>)lib.Export("cuLaunchKernel");
            cuFuncSetAttribute = (delegate* unmanaged<nint, int, int, int>)lib.Export("cuFuncSetAttribute");
            cuLaunchKernelEx = (delegate* unmanaged<LaunchConfig*, nint, void**, void**, int>)lib.TryExport("cuLaunchKernelEx");
            cuLaunchCooperativeKernel = (delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, int>)lib.Export("cuLaunchCooperativeKernel");
            cuStreamBeginCapture = (delegate* unmanaged<nint, int, int>)lib.Export("cuStreamBeginCapture_v2");
            cuStreamEndCapture = (delegate* unmanaged<nint, nint*, int>)lib.Export("cuStreamEndCapture");
            cuStreamIsCapturing = (delegate* unmanaged<nint, int*, int>)lib.Export("cuStreamIsCapturing");
            cuProfilerStart = (delegate* unmanaged<int>)lib.TryExport("cuProfilerStart");
            cuProfilerStop = (delegate* unmanaged<int>)lib.TryExport("cuProfilerStop");
            cuOccupancyMaxActiveBlocksPerMultiprocessor = (delegate* unmanaged<int*, nint, int, nuint, int>)lib.TryExport("cuOccupancyMaxActiveBlocksPerMultiprocessor");
            cuGraphInstantiateWithFlags = (delegate* unmanaged<nint*, nint, ulong, int>)lib.Export("cuGraphInstantiateWithFlags");
            cuGraphLaunch = (delegate* unmanaged<nint, nint, int>)lib.Export("cuGraphLaunch");
            cuGraphExecDestroy = (delegate* unmanaged<nint, int>)lib.Export("cuGraphExecDestroy");
            cuGraphDestroy = (delegate* unmanaged<nint, int>)lib.Export("cuGraphDestroy");
            cuGetErrorName = (delegate* unmanaged<int, byte**, int>)lib.Export("cuGetErrorName");
            cuGetErrorString = (delegate* unmanaged<int, byte**, int>)lib.Export("cuGetErrorString");
        }
    }

    internal static void Check(int rc, string function)
    {
        if (rc == 0) return;
        byte* name = null, text = null;
        string n = A.cuGetErrorName(rc, &name) == 0 && name != null ? Marshal.PtrToStringUTF8((nint)name)! : "CUDA_ERROR_UNKNOWN";
        string s = A.cuGetErrorString(rc, &text) == 0 && text != null ? Marshal.PtrToStringUTF8((nint)text)! : "unknown error";
        if (rc == 2) throw new CudaOutOfMemoryException($"{function} failed: {n} (2): {s}");
        throw new CudaException("CUDA driver", function, rc, n, s);
    }

    public static void Init() => Check(A.cuInit(0), "cuInit");
    public static int DriverVersion() { int v; Check(A.cuDriverGetVersion(&v), "cuDriverGetVersion"); return v; }
    public static int DeviceCount() { int n; Check(A.cuDeviceGetCount(&n), "cuDeviceGetCount"); return n; }
    public static int Device(int ordinal) { int d; Check(A.cuDeviceGet(&d, ordinal), "cuDeviceGet"); return d; }

    public static string DeviceName(int device)
    {
        byte* buf = stackalloc byte[256];
        Check(A.cuDeviceGetName(buf, 256, device), "cuDeviceGetName");
        return Marshal.PtrToStringUTF8((nint)buf)!;
    }

    public static long DeviceTotalMemory(int device) { nuint b; Check(A.cuDeviceTotalMem(&b, device), "cuDeviceTotalMem"); return (long)b; }

    public static int Attribute(int device, CuDeviceAttribute attribute)
    {
        int v; Check(A.cuDeviceGetAttribute(&v, (int)attribute, device), $"cuDeviceGetAttribute({attribute})"); return v;
    }

    /// <summary>The attribute, or null where this driver no longer reports it.</summary>
    public static int? TryAttribute(int device, CuDeviceAttribute attribute)
    {
        int v; return A.cuDeviceGetAttribute(&v, (int)attribute, device) == 0 && v > 0 ? v : null;
    }

    public static nint PrimaryContextRetain(int device) { nint c; Check(A.cuDevicePrimaryCtxRetain(&c, device), "cuDevicePrimaryCtxRetain"); return c; }
    internal static int PrimaryContextRelease(int device) => A.cuDevicePrimaryCtxRelease(device);
    public static void SetCurrent(nint context) => Check(A.cuCtxSetCurrent(context), "cuCtxSetCurrent");

    /// <summary>cuMemAlloc; returns 0 (instead of throwing) when the device is out of memory.</summary>
    public static ulong TryAlloc(long bytes)
    {
        ulong p;
        int rc = A.cuMemAlloc(&p, (nuint)bytes);
        if (rc == 2) return 0;
        Check(rc, $"cuMemAlloc({bytes} bytes)");
        return p;
    }

    public static void Free(ulong ptr) => Check(A.cuMemFree(ptr), "cuMemFree");
    public static void* AllocHost(long bytes) { void* p; Check(A.cuMemAllocHost(&p, (nuint)bytes), $"cuMemAllocHost({bytes} bytes)"); return p; }
    internal static int FreeHost(void* p) => A.cuMemFreeHost(p);

    /// <summary>Pinned host memory mapped into the device's address space (CU_MEMHOSTALLOC_DEVICEMAP): kernels write
    /// it directly; freed with <see cref="FreeHost"/>.</summary>
    public static void* AllocMappedHost(long bytes)
    {
        void* p; Check(A.cuMemHostAlloc(&p, (nuint)bytes, 0x02), $"cuMemHostAlloc({bytes} bytes, DEVICEMAP)"); return p;
    }

    /// <summary>The device's address of mapped pinned memory (<see cref="AllocMappedHost"/>).</summary>
    public static ulong MappedDevicePointer(void* host)
    {
        ulong d; Check(A.cuMemHostGetDevicePointer(&d, host, 0), "cuMemHostGetDevicePointer"); return d;
    }

    public static void CopyHtoD(ulong dst, void* src, long bytes, nint stream) => Check(A.cuMemcpyHtoDAsync(dst, src, (nuint)bytes, stream), "cuMemcpyHtoDAsync");
    public static void CopyDtoH(void* dst, ulong src, long bytes, nint stream) => Check(A.cuMemcpyDtoHAsync(dst, src, (nuint)bytes, stream), "cuMemcpyDtoHAsync");
    public static void CopyDtoD(ulong dst, ulong src, long bytes, nint stream) => Check(A.cuMemcpyDtoDAsync(dst, src, (nuint)bytes, stream), "cuMemcpyDtoDAsync");

    public static nint StreamCreate(bool nonBlocking) { nint s; Check(A.cuStreamCreate(&s, nonBlocking ? 1u : 0u), "cuStreamCreate"); return s; }
    internal static int StreamDestroy(nint s) => A.cuStreamDestroy(s);
    public static void StreamSynchronize(nint s) => Check(A.cuStreamSynchronize(s), "cuStreamSynchronize");

    public static nint EventCreate() { nint e; Check(A.cuEventCreate(&e, 0), "cuEventCreate"); return e; }
    internal static int EventDestroy(nint e) => A.cuEventDestroy(e);
    public static void EventRecord(nint e, nint stream) => Check(A.cuEventRecord(e, stream), "cuEventRecord");
    public static void EventSynchronize(nint e) => Check(A.cuEventSynchronize(e), "cuEventSynchronize");
    public static float EventElapsedMs(nint start, nint end) { float ms; Check(A.cuEventElapsedTime(&ms, start, end), "cuEventElapsedTime"); return ms; }

    public static nint ModuleLoadData(ReadOnlySpan<byte> image, string what)
    {
        nint m;
        fixed (byte* p = image) Check(A.cuModuleLoadData(&m, p), $"cuModuleLoadData({what})");
        return m;
    }

    internal static int ModuleUnload(nint m) => A.cuModuleUnload(m);

    public static nint ModuleGetFunction(nint module, string name)
    {
        nint f;
        var bytes = System.Text.Encoding.UTF8.GetBytes(name + "\0");
        fixed (byte* p = bytes) Check(A.cuModuleGetFunction(&f, module, p), $"cuModuleGetFunction({name})");
        return f;
    }

    /// <summary>Lets <paramref name="function"/> launch with up to <paramref name="bytes"/> of dynamic shared memory
    /// (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES; needed above 48 KiB).</summary>
    public static void SetMaxDynamicSharedMemory(nint function, string name, int bytes)
    {
        const int maxDynamicSharedSizeBytes = 8;
        Check(A.cuFuncSetAttribute(function, maxDynamicSharedSizeBytes, bytes), $"cuFuncSetAttribute({name}, max dynamic shared memory {bytes} bytes)");
    }

    /// <summary>How many blocks of <paramref name="blockSize"/> threads and <paramref name="dynamicSharedBytes"/> of dynamic
    /// shared memory one multiprocessor holds at once (registers, shared memory, threads); null where the driver lacks
    /// the call.</summary>
    public static int? MaxActiveBlocksPerMultiprocessor(nint function, string name, int blockSize, uint dynamicSharedBytes)
    {
        if (A.cuOccupancyMaxActiveBlocksPerMultiprocessor == null) return null;
        int blocks;
        Check(A.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, function, blockSize, dynamicSharedBytes),
            $"cuOccupancyMaxActiveBlocksPerMultiprocessor({name}, {blockSize} threads, {dynamicSharedBytes} bytes)");
        return blocks;
    }

    public static void Launch(nint function, string name, (uint X, uint Y, uint Z) grid, (uint X, uint Y, uint Z) block, uint sharedBytes, nint stream, void** args)
        => Check(A.cuLaunchKernel(function, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z, sharedBytes, stream, args, null), $"cuLaunchKernel({name})");

    /// <summary>A launch whose blocks are all resident at once, so that a grid-wide barrier can complete; the driver
    /// refuses a grid larger than the device holds at once (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE).</summary>
    public static void LaunchCooperative(nint function, string name, (uint X, uint Y, uint Z) grid, (uint X, uint Y, uint Z) block, uint sharedBytes, nint stream, void** args)
        => Check(A.cuLaunchCooperativeKernel(function, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z, sharedBytes, stream, args), $"cuLaunchCooperativeKernel({name})");

    /// <summary>Whether the driver has cuLaunchKernelEx, which <see cref="LaunchProgrammatic"/> needs.</summary>
    public static bool HasLaunchEx => A.cuLaunchKernelEx != null;

    /// <summary>A launch with programmatic stream serialization (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
    /// sm_90+): the kernel may begin while the previous kernel in the stream still runs, once that kernel allows it
    /// (griddepcontrol.launch_dependents); it must itself wait (griddepcontrol.wait) before reading that kernel's output.</summary>
    public static void LaunchProgrammatic(nint function, string name, (uint X, uint Y, uint Z) grid, (uint X, uint Y, uint Z) block, uint sharedBytes,
        nint stream, void** args)
    {
        const int programmaticStreamSerialization = 6;
        var attribute = new LaunchAttribute { Id = programmaticStreamSerialization, Value = 1 };
        var config = new LaunchConfig
        {
            GridX = grid.X, GridY = grid.Y, GridZ = grid.Z, BlockX = block.X, BlockY = block.Y, BlockZ = block.Z,
            SharedBytes = sharedBytes, Stream = stream, Attributes = &attribute, AttributeCount = 1,
        };
        Check(A.cuLaunchKernelEx(&config, function, args, null), $"cuLaunchKernelEx({name}, programmatic)");
    }

    /// <summary>CUlaunchAttribute: the id, 4 bytes of padding, a 64-byte value union (here its first int).</summary>
    [StructLayout(LayoutKind.Explicit, Size = 72)]
    internal struct LaunchAttribute
    {
        [FieldOffset(0)] public int Id;
        [FieldOffset(8)] public int Value;
    }

    /// <summary>CUlaunchConfig (56 bytes on 64-bit: seven uints, then the stream at offset 32).</summary>
    [StructLayout(LayoutKind.Sequential)]
    internal struct LaunchConfig
    {
        public uint GridX, GridY, GridZ, BlockX, BlockY, BlockZ, SharedBytes;
        public nint Stream;
        public LaunchAttribute* Attributes;
        public uint AttributeCount;
    }

    /// <summary>Marks the start (true) or end of the work a profiler started with profiling off (Nsight Compute's
    /// <c>--profile-from-start off</c>) records; without a profiler attached, nothing happens.</summary>
    public static void Profile(bool on)
    {
        var f = on ? A.cuProfilerStart : A.cuProfilerStop;
        if (f != null) Check(f(), on ? "cuProfilerStart" : "cuProfilerStop");
    }

    /// <summary>Whether work put on <paramref name="stream"/> is being recorded into a graph (then it does not run, and
    /// nothing may wait for it).</summary>
    public static bool StreamIsCapturing(nint stream)
    {
        int status;
        Check(A.cuStreamIsCapturing(stream, &status), "cuStreamIsCapturing");
        return status != 0;   // CU_STREAM_CAPTURE_STATUS_ACTIVE or _INVALIDATED
    }

    /// <summary>Records what <paramref name="enqueue"/> puts on <paramref name="stream"/> (nothing runs) and instantiates it
    /// as an executable graph. Relaxed capture mode: host-side calls stay allowed; buffers must outlive the graph.</summary>
    public static nint CaptureGraph(nint stream, Action enqueue)
    {
        const int relaxed = 2;
        Check(A.cuStreamBeginCapture(stream, relaxed), "cuStreamBeginCapture");
        nint graph = 0;
        try { enqueue(); }
        catch
        {
            A.cuStreamEndCapture(stream, &graph);   // leave the stream usable; the first error is the one to report
            if (graph != 0) A.cuGraphDestroy(graph);
            throw;
        }
        Check(A.cuStreamEndCapture(stream, &graph), "cuStreamEndCapture");
        try
        {
            nint exec;
            Check(A.cuGraphInstantiateWithFlags(&exec, graph, 0), "cuGraphInstantiateWithFlags");
            return exec;
        }
        finally { A.cuGraphDestroy(graph); }
    }

    public static void GraphLaunch(nint exec, nint stream) => Check(A.cuGraphLaunch(exec, stream), "cuGraphLaunch");
    internal static int GraphExecDestroy(nint exec) => A.cuGraphExecDestroy(exec);
}
