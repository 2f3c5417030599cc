using System.Runtime.InteropServices;

namespace DispNative.Interop;

/// <summary>A retained primary context of one device; released on dispose.</summary>
public sealed class CudaContextHandle : SafeHandle
{
    public int Device { get; }
    public CudaContextHandle(int device) : base(0, true) { Device = device; SetHandle(CudaDriver.PrimaryContextRetain(device)); }
    public override bool IsInvalid => handle == 0;
    public void MakeCurrent() => CudaDriver.SetCurrent(handle);
    protected override bool ReleaseHandle() => CudaDriver.PrimaryContextRelease(Device) == 0;
}

/// <summary>A loaded CUDA module (CUBIN image).</summary>
public sealed class CudaModuleHandle : SafeHandle
{
    public CudaModuleHandle(ReadOnlySpan<byte> image, string what) : base(0, true) => SetHandle(CudaDriver.ModuleLoadData(image, what));
    public override bool IsInvalid => handle == 0;
    public nint Function(string name) => CudaDriver.ModuleGetFunction(handle, name);
    protected override bool ReleaseHandle() => CudaDriver.ModuleUnload(handle) == 0;
}

/// <summary>A non-blocking CUDA stream.</summary>
public sealed class CudaStreamHandle : SafeHandle
{
    public CudaStreamHandle() : base(0, true) => SetHandle(CudaDriver.StreamCreate(nonBlocking: true));
    public override bool IsInvalid => handle == 0;
    public void Synchronize() => CudaDriver.StreamSynchronize(handle);
    public bool IsCapturing => CudaDriver.StreamIsCapturing(handle);
    protected override bool ReleaseHandle() => CudaDriver.StreamDestroy(handle) == 0;
}

/// <summary>A timing event.</summary>
public sealed class CudaEventHandle : SafeHandle
{
    public CudaEventHandle() : base(0, true) => SetHandle(CudaDriver.EventCreate());
    public override bool IsInvalid => handle == 0;
    public void Record(CudaStreamHandle stream) => CudaDriver.EventRecord(handle, stream.DangerousGetHandle());
    public void Synchronize() => CudaDriver.EventSynchronize(handle);
    /// <summary>Milliseconds from <paramref name="start"/> to this event (both recorded and complete).</summary>
    public float ElapsedSince(CudaEventHandle start) => CudaDriver.EventElapsedMs(start.DangerousGetHandle(), handle);
    protected override bool ReleaseHandle() => CudaDriver.EventDestroy(handle) == 0;
}

/// <summary>Page-locked host memory for fast, asynchronous host↔device copies.</summary>
public sealed unsafe class PinnedHostBuffer : SafeHandle
{
    public long Bytes { get; }
    /// <summary>Where kernels address the buffer; 0 unless it was allocated mapped.</summary>
    public ulong DevicePointer { get; }
    /// <param name="mapped">Also in the device's address space (<see cref="DevicePointer"/>): kernels write results
    /// there that the host reads after an event.</param>
    public PinnedHostBuffer(long bytes, bool mapped = false) : base(0, true)
    {
        Bytes = bytes;
        SetHandle((nint)(mapped ? CudaDriver.AllocMappedHost(bytes) : CudaDriver.AllocHost(bytes)));
        if (mapped) DevicePointer = CudaDriver.MappedDevicePointer((void*)handle);
    }
    public override bool IsInvalid => handle == 0;
    public void* Pointer => (void*)handle;
    protected override bool ReleaseHandle() => CudaDriver.FreeHost((void*)handle) == 0;
}

/// <summary>An executable CUDA graph captured from a stream (<see cref="CudaDriver.CaptureGraph"/>).</summary>
public sealed class CudaGraphHandle : SafeHandle
{
    public CudaGraphHandle(CudaStreamHandle stream, Action enqueue) : base(0, true)
        => SetHandle(CudaDriver.CaptureGraph(stream.DangerousGetHandle(), enqueue));
    public override bool IsInvalid => handle == 0;
    public void Launch(CudaStreamHandle stream) => CudaDriver.GraphLaunch(handle, stream.DangerousGetHandle());
    protected override bool ReleaseHandle() => CudaDriver.GraphExecDestroy(handle) == 0;
}
