using System.Collections.Concurrent;
using DispNative.Engine.Autograd;
using DispNative.Engine.IO;
using DispNative.Interop;

namespace DispNative.Engine.Cuda;

/// <summary>One kernel argument: a device pointer, int, long or float, passed by value in an 8-byte slot.</summary>
public readonly struct KernelArg
{
    internal readonly ulong Bits;
    private KernelArg(ulong bits) => Bits = bits;
    public static implicit operator KernelArg(int v) => new((uint)v);
    public static implicit operator KernelArg(long v) => new((ulong)v);
    public static implicit operator KernelArg(ulong pointer) => new(pointer);
    public static implicit operator KernelArg(float v) => new(BitConverter.SingleToUInt32Bits(v));
    public static implicit operator KernelArg(DeviceTensor? t) => new(t?.Pointer ?? 0);
}

/// <summary>A typed buffer in device memory, owned by the device's caching allocator (returned on dispose).</summary>
public sealed class DeviceTensor : IDisposable
{
    private readonly CudaDevice _device;
    public ulong Pointer { get; private set; }
    public DType DType { get; }
    public long Length { get; }
    public long Bytes => Length * DType.Size();

    /// <summary>Device address of element <paramref name="offset"/>.</summary>
    public ulong Address(long offset) => Pointer + (ulong)(offset * DType.Size());

    internal DeviceTensor(CudaDevice device, DType dtype, long length)
    {
        _device = device;
        DType = dtype;
        Length = length;
        Pointer = device.Allocator.Allocate(Math.Max(1, Bytes));
    }

    public void Dispose()
    {
        if (Pointer == 0) return;
        _device.Allocator.Release(Pointer);
        Pointer = 0;
    }
}

/// <summary>Static facts about a CUDA device: name, compute capability, memory and the peaks KernelBench compares with.</summary>
public sealed record CudaDeviceInfo(int Ordinal, string Name, int Major, int Minor, int Multiprocessors, long TotalMemory,
    int? MemoryClockKHz, int? BusWidthBits, int? SmClockKHz, int DriverVersion, int? L2Bytes = null)
{
    public string Architecture => $"sm_{Major}{Minor}";

    /// <summary>Peak DRAM bandwidth in bytes/s from the memory clock and bus width (double data rate), or null when
    /// the driver does not report them.</summary>
    public double? PeakBandwidth => MemoryClockKHz is int mc && BusWidthBits is int bw ? 2.0 * mc * 1e3 * bw / 8 : null;

    /// <summary>Dense bf16 tensor-core peak in FLOP/s: SMs × clock × FLOPs/clock/SM (Hopper 4096, Ampere 2048).</summary>
    public double? PeakBf16Flops => SmClockKHz is int clk && Major >= 8
        ? Multiprocessors * (clk * 1e3) * (Major >= 9 ? 4096.0 : 2048.0) : null;

    public override string ToString() => $"{Name} ({Architecture}, {Multiprocessors} SMs, {TotalMemory / (1 << 30)} GiB)";
}

/// <summary>One CUDA device opened for the engine: primary context, one stream, caching allocator, NVRTC-compiled
/// kernels, cuBLASLt handle and workspace. Calls from any thread make the context current first.
/// Not for concurrent use from several threads (one stream).</summary>
public sealed unsafe class CudaDevice : IDisposable
{
    public const long GemmWorkspaceBytes = 32 << 20;
    private readonly CudaContextHandle _context;
    private readonly ConcurrentDictionary<string, CudaModuleHandle> _modules = new();
    private readonly ConcurrentDictionary<string, nint> _functions = new();
    private readonly ConcurrentDictionary<string, int> _parameterCounts = new();
    private readonly ConcurrentDictionary<nint, uint> _dynamicSharedLimits = new();
    private readonly int _device;   // the driver's CUdevice
    private readonly Dictionary<string, CublasLt.MatmulPlan> _plans = [];
    private readonly HashSet<string> _tunedPlans = [];
    private readonly ulong _workspace;
    private PinnedHostBuffer? _staging;
    private bool _disposed;

    public CudaDeviceInfo Info { get; }
    public CudaStreamHandle Stream { get; }
    public CachingAllocator Allocator { get; }
    public KernelCompiler Compiler { get; }
    public CublasLtHandle Lt { get; }

    /// <summary>The GEMM algorithm choices (see <see cref="GemmTuning"/>), kept beside the kernel cache.</summary>
    public GemmTuning GemmTuning { get; internal set; }

    /// <summary>On: each GEMM shape runs the fastest of the algorithms cuBLASLt's heuristic offers, timed on its first
    /// call (or taken from <see cref="GemmTuning"/>'s file). Off (the default): the heuristic's first choice. Tuned
    /// alone, a shape ran up to 1.07x faster, but inside the 7B-shape prefill tuning gave 0.96-1.04x over four runs
    /// (H200, 2026-12-04, <c>KernelBench infer</c>): no gain beyond the noise for the start-up timing it costs.</summary>
    public bool TuneGemms { get; set; }

    /// <summary>Whether the Hopper prefill attention (<see cref="PrefillKernel.Wgmma"/>, sm_90a's warpgroup MMA) can
    /// run here: an sm_90 device whose NVRTC builds attention_wgmma for sm_90a.</summary>
    public bool SupportsWgmma => Compiler.ArchitectureFor("attention_wgmma") == "sm_90a";

    /// <summary>Why <see cref="SupportsWgmma"/> is false here (what it needs, what this device and NVRTC are).</summary>
    public string WgmmaUnsupportedReason => $"the warpgroup-MMA prefill needs an sm_90 device and NVRTC 12 or later (here {Info.Architecture}, NVRTC {Nvrtc.Version})";

    /// <summary>The prefill attention kernel to run instead of the engine's choice wherever it applies
    /// (<see cref="CudaOps.Applies"/>); null (the default): <see cref="CudaOps.PrefillFor"/>'s choice.</summary>
    public PrefillKernel? PrefillAttention { get; set; }

    /// <summary>GEMMs of fewer FLOPs (2·M·N·K per batch entry, summed) keep the heuristic's first choice: they take
    /// microseconds, where timing is mostly launch noise, and decode or short prompts would otherwise add a tuned
    /// shape for every new length.</summary>
    public double MinTunedGemmFlops { get; set; } = 1e9;

    private CudaDevice(int ordinal, string? kernelCache)
    {
        CudaDriver.Init();
        int count = CudaDriver.DeviceCount();
        if (ordinal < 0 || ordinal >= count) throw new DispNativeException($"CUDA device {ordinal} does not exist ({count} device(s))");
        int dev = _device = CudaDriver.Device(ordinal);
        Info = new CudaDeviceInfo(ordinal, CudaDriver.DeviceName(dev),
            CudaDriver.Attribute(dev, CuDeviceAttribute.ComputeCapabilityMajor), CudaDriver.Attribute(dev, CuDeviceAttribute.ComputeCapabilityMinor),
            CudaDriver.Attribute(dev, CuDeviceAttribute.MultiprocessorCount), CudaDriver.DeviceTotalMemory(dev),
            CudaDriver.TryAttribute(dev, CuDeviceAttribute.MemoryClockRateKHz), CudaDriver.TryAttribute(dev, CuDeviceAttribute.GlobalMemoryBusWidth),
            CudaDriver.TryAttribute(dev, CuDeviceAttribute.ClockRateKHz), CudaDriver.DriverVersion(),
            CudaDriver.TryAttribute(dev, CuDeviceAttribute.L2CacheSizeBytes));
        _context = new CudaContextHandle(dev);
        _context.MakeCurrent();
        Stream = new CudaStreamHandle();
        Allocator = new CachingAllocator(new DriverMemory());
        Compiler = new KernelCompiler(Info.Architecture, kernelCache);
        try
        {
            Lt = new CublasLtHandle();
            GemmTuning = new GemmTuning(Compiler.CacheDirectory,
                string.Join("\n", Info.Name, Info.Architecture, CublasLt.LibraryName, CublasLt.Version));
            _workspace = Allocator.Allocate(GemmWorkspaceBytes);
        }
        catch
        {
            Allocator.Dispose(); Stream.Dispose(); _context.Dispose();
            throw;
        }
    }

    /// <summary>Opens a device; every missing piece (driver, device, NVRTC, cuBLASLt) is a <see cref="DispNativeException"/>
    /// that names it.</summary>
    public static CudaDevice Open(int ordinal = 0, string? kernelCache = null)
    {
        try { return new CudaDevice(ordinal, kernelCache); }
        catch (CudaLibraryException e) { throw new DispNativeException($"CUDA is not usable: {e.Message}"); }
        catch (CudaException e) { throw new DispNativeException($"CUDA is not usable: {e.Message}"); }
    }

    /// <summary>Null when a device can be opened, else the reason (for skipping GPU tests and for --device auto).</summary>
    public static string? Unavailable()
    {
        if (CudaDriverProbe.DeviceCount(out string reason) == 0) return reason;
        if (!Nvrtc.IsAvailable(out string nvrtc)) return nvrtc;
        try { _ = CublasLt.LibraryName; } catch (CudaLibraryException e) { return e.Message; }
        return null;
    }

    /// <summary>Binds the device's context to the calling thread; every allocation and launch goes through here, so
    /// after <see cref="Dispose"/> they throw instead of using a destroyed context.</summary>
    public void MakeCurrent()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        _context.MakeCurrent();
    }

    public DeviceTensor Allocate(DType dtype, long length) { MakeCurrent(); return new DeviceTensor(this, dtype, length); }

    /// <summary>Uploads f32 values and stores them as <paramref name="dtype"/> (narrowed on the device). A finite value
    /// beyond the type's range is refused, naming <paramref name="what"/>, rather than stored as an infinity.</summary>
    public DeviceTensor Upload(ReadOnlySpan<float> values, DType dtype = DType.F32, string what = "a tensor")
    {
        DTypes.RequireFits(dtype, values, what);
        MakeCurrent();
        var f32 = new DeviceTensor(this, DType.F32, values.Length);
        fixed (float* p = values) CudaDriver.CopyHtoD(f32.Pointer, p, (long)values.Length * 4, Stream.DangerousGetHandle());
        Stream.Synchronize(); // the host span may go away after we return
        if (dtype == DType.F32) return f32;
        using (f32) return Convert(f32, dtype);
    }

    public DeviceTensor Upload(ReadOnlySpan<int> values)
    {
        MakeCurrent();
        var t = new DeviceTensor(this, DType.I32, values.Length);
        fixed (int* p = values) CudaDriver.CopyHtoD(t.Pointer, p, (long)values.Length * 4, Stream.DangerousGetHandle());
        Stream.Synchronize();
        return t;
    }

    /// <summary>A converted copy (f32 ↔ bf16/f16).</summary>
    public DeviceTensor Convert(DeviceTensor src, DType dtype)
    {
        var dst = Allocate(dtype, src.Length);
        string entry = src.DType == DType.F32 ? $"convert_f32_to_{Suffix(dtype)}" : $"convert_{Suffix(src.DType)}_to_f32";
        if (src.DType != DType.F32 && dtype != DType.F32) throw new ArgumentException("conversions go through f32");
        Launch("convert", entry, GridFor(src.Length), 256, 0, src, dst, src.Length);
        return dst;
    }

    /// <summary>Copies row <paramref name="from"/> of a tensor of rows <paramref name="width"/> elements long over row
    /// <paramref name="to"/>, in stream order.</summary>
    public void CopyRow(DeviceTensor t, int from, int to, int width)
    {
        long bytes = (long)width * t.DType.Size();
        if (from < 0 || to < 0 || (Math.Max(from, to) + 1L) * width > t.Length)
            throw new ArgumentException($"rows {from} and {to} of {width} elements do not both lie in a tensor of {t.Length}");
        if (from == to) return;
        MakeCurrent();
        CudaDriver.CopyDtoD(t.Address((long)to * width), t.Address((long)from * width), bytes, Stream.DangerousGetHandle());
    }

    /// <summary>Downloads a tensor as f32 values through a pinned staging buffer (waits for the stream).</summary>
    public float[] Download(DeviceTensor t)
    {
        var r = new float[t.Length];
        Download(t, r);
        return r;
    }

    /// <summary>Downloads a tensor as f32 values into <paramref name="destination"/> (its length), as <see cref="Download(DeviceTensor)"/>.</summary>
    public void Download(DeviceTensor t, Span<float> destination)
    {
        if (destination.Length != t.Length) throw new ArgumentException($"{destination.Length} values cannot hold a tensor of {t.Length}");
        MakeCurrent();
        if (t.DType != DType.F32) { using var f = Convert(t, DType.F32); Download(f, destination); return; }
        new ReadOnlySpan<float>(Stage(t), destination.Length).CopyTo(destination);
    }

    /// <summary>Downloads an i32 tensor (waits for the stream).</summary>
    public int[] DownloadInts(DeviceTensor t)
    {
        if (t.DType != DType.I32) throw new ArgumentException($"a {t.DType} tensor is not i32");
        MakeCurrent();
        return new ReadOnlySpan<int>(Stage(t), (int)t.Length).ToArray();
    }

    /// <summary>The tensor's bytes in the pinned staging buffer, once the stream has run to here.</summary>
    private void* Stage(DeviceTensor t)
    {
        if (_staging == null || _staging.Bytes < t.Bytes)
        {
            _staging?.Dispose();
            _staging = new PinnedHostBuffer(Math.Max(t.Bytes, 1 << 20));
        }
        CudaDriver.CopyDtoH(_staging.Pointer, t.Pointer, t.Bytes, Stream.DangerousGetHandle());
        Stream.Synchronize();
        return _staging.Pointer;
    }

    public static string Suffix(DType t) => t switch
    {
        DType.F32 => "f32", DType.BF16 => "bf16", DType.F16 => "f16",
        _ => throw new ArgumentException($"{t} is not a floating-point storage type"),
    };

    private static CudaDataType LtType(DType t) => t switch
    {
        DType.F32 => CudaDataType.R32F, DType.BF16 => CudaDataType.R16BF, DType.F16 => CudaDataType.R16F,
        _ => throw new ArgumentException($"{t} is not a GEMM type"),
    };

    public static uint GemvGrid(int rows) => (uint)((rows + GemvWarps - 1) / GemvWarps);

    public static uint GridFor(long n, int threads = 256) => (uint)Math.Min((n + threads - 1) / threads, 65535L * 8);

    /// <summary>The function <paramref name="entry"/> of <c>kernels/{kernel}.cu</c>, compiled (or read from the CUBIN
    /// cache) and loaded on first use.</summary>
    public nint Function(string kernel, string entry)
    {
        string key = kernel + "/" + entry;
        if (_functions.TryGetValue(key, out var f)) return f;
        MakeCurrent();
        var module = _modules.GetOrAdd(kernel, k => new CudaModuleHandle(Compiler.Cubin(k), k + ".cu"));
        return _functions[key] = module.Function(entry);
    }

    /// <summary>Enqueues a kernel on the engine's stream.</summary>
    public void Launch(string kernel, string entry, (uint X, uint Y, uint Z) grid, (uint X, uint Y, uint Z) block, uint sharedBytes,
        params ReadOnlySpan<KernelArg> args) => Enqueue(kernel, entry, grid, block, sharedBytes, cooperative: false, args);

    /// <summary>Enqueues a kernel whose blocks all run at once (a cooperative launch: a grid-wide barrier can complete);
    /// the driver refuses a grid larger than the device holds.</summary>
    public void LaunchCooperative(string kernel, string entry, (uint X, uint Y, uint Z) grid, (uint X, uint Y, uint Z) block, uint sharedBytes,
        params ReadOnlySpan<KernelArg> args)
    {
        if (RefuseCooperativeLaunches)
            throw new CudaException("driver", $"cuLaunchCooperativeKernel({entry})", 801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported (refused for a test)");
        Enqueue(kernel, entry, grid, block, sharedBytes, cooperative: true, args);
    }

    /// <summary>Self-test only: cooperative launches fail as on a device without them.</summary>
    internal bool RefuseCooperativeLaunches { get; set; }

    private void Enqueue(string kernel, string entry, (uint X, uint Y, uint Z) grid, (uint X, uint Y, uint Z) block, uint sharedBytes,
        bool cooperative, ReadOnlySpan<KernelArg> args)
    {
        MakeCurrent();   // the caller may be on a thread that has not used this device yet
        nint fn = Function(kernel, entry);
        if (sharedBytes > DefaultDynamicSharedBytes) AllowDynamicShared(fn, entry, sharedBytes);
        int expected = _parameterCounts.GetOrAdd(kernel + "/" + entry, _ => KernelSources.ParameterCount(kernel, entry));
        if (args.Length != expected) throw new ArgumentException($"kernel {entry} takes {expected} arguments, {args.Length} given");
        ulong* slots = stackalloc ulong[Math.Max(1, args.Length)];
        void** ptrs = stackalloc void*[Math.Max(1, args.Length)];
        for (int i = 0; i < args.Length; i++) { slots[i] = args[i].Bits; ptrs[i] = &slots[i]; }
        if (cooperative)
            CudaDriver.LaunchCooperative(fn, entry, grid, block, sharedBytes, Stream.DangerousGetHandle(), ptrs);
        else if (ProgrammaticLaunch && WaitsForGridDependency(entry))
            CudaDriver.LaunchProgrammatic(fn, entry, grid, block, sharedBytes, Stream.DangerousGetHandle(), ptrs);
        else
            CudaDriver.Launch(fn, entry, grid, block, sharedBytes, Stream.DangerousGetHandle(), ptrs);
    }

    /// <summary>While set (decode steps: many short kernels, each a few microseconds), the kernels that wait for their
    /// grid dependency (<see cref="WaitsForGridDependency"/>) are launched with programmatic stream serialization: each
    /// may start while the previous one finishes, and reads weights (a GEMV's first rows, a norm's gamma) before it
    /// waits for that kernel's output. Has no effect below sm_90 or without cuLaunchKernelEx.</summary>
    public bool ProgrammaticLaunch
    {
        get => _programmatic;
        set => _programmatic = value && ProgrammaticLaunchSupported;
    }

    /// <summary>sm_90 or newer and a driver with cuLaunchKernelEx.</summary>
    public bool ProgrammaticLaunchSupported => Info.Major >= 9 && CudaDriver.HasLaunchEx;

    private bool _programmatic;

    /// <summary>Kernels whose every thread calls grid_dependency_wait() (kernels/common.cuh) before reading anything an
    /// earlier kernel writes, and writes nothing before it: the only ones that may be launched programmatically.</summary>
    public static bool WaitsForGridDependency(string entry) =>
        entry.StartsWith("gemv_", StringComparison.Ordinal) || entry.StartsWith("rmsnorm_gather_", StringComparison.Ordinal)
        || entry.StartsWith("rope_kv_append_", StringComparison.Ordinal) || entry.StartsWith("attention_decode_", StringComparison.Ordinal)
        || entry.StartsWith("embedding_", StringComparison.Ordinal) || entry.StartsWith("chain_link_", StringComparison.Ordinal)
        || entry == "greedy_next_token";

    /// <summary>Dynamic shared memory a launch may use without opting in per function.</summary>
    public const uint DefaultDynamicSharedBytes = 48 << 10;

    private void AllowDynamicShared(nint fn, string entry, uint bytes)
    {
        if (_dynamicSharedLimits.TryGetValue(fn, out uint allowed) && allowed >= bytes) return;
        int limit = CudaDriver.TryAttribute(_device, CuDeviceAttribute.MaxSharedMemoryPerBlockOptin) ?? (int)DefaultDynamicSharedBytes;
        if (bytes > limit)
            throw new DispNativeException($"kernel {entry} needs {bytes} bytes of shared memory per block; {Info.Name} allows {limit}");
        MakeCurrent();
        CudaDriver.SetMaxDynamicSharedMemory(fn, entry, (int)bytes);
        _dynamicSharedLimits[fn] = bytes;
    }

    public void Launch(string kernel, string entry, uint grid, uint block, uint sharedBytes, params ReadOnlySpan<KernelArg> args)
        => Launch(kernel, entry, (grid, 1, 1), (block, 1, 1), sharedBytes, args);

    /// <summary>Single-row GEMMs (decode) go to the warp-per-row GEMV kernels (kernels/gemv*.cu) when K and the operands
    /// allow 16-byte loads; off sends them to cuBLASLt too (KernelBench compares the two).</summary>
    public bool UseGemv { get; set; } = true;

    /// <summary>Null (the default): the plain GEMV (gemv.cu's <c>gemv_X_to_Y</c>, index-add included), the q/k/v and the
    /// gate/up + SwiGLU GEMVs each run in whichever form times faster on a shape's first call, with their unroll
    /// (<see cref="GemvUnroll"/>): a block per 8 rows, or streamed (<c>gemv_streamed*</c>: a grid of resident blocks whose
    /// warps stream their rows' weights without a gap between rows; the plain one ran 1.13-1.47x the other at the 7B
    /// shapes, H200, 2026-12-04). The fused decode norms likewise: rows looped over, or streamed on the same grid. Both
    /// forms give the same bits. True or false: that form everywhere (benchmarks).</summary>
    public bool? StreamGemvs { get; set; }

    /// <summary>Warps (output rows) per block of the GEMV kernels.</summary>
    public const int GemvWarps = 8;

    /// <summary>Warps per block of the split-KV decode attention: 4 (the default) or 8 (attention_decode_split8, twice
    /// the keys per round, so a context up to 128 keys at head_dim 128 in bf16 needs no merge of shares; KernelBench
    /// infer times decode with it).</summary>
    public int DecodeAttentionWarps
    {
        get => _decodeAttentionWarps;
        set => _decodeAttentionWarps = value is CudaOps.DecodeWarps or 2 * CudaOps.DecodeWarps ? value
            : throw new ArgumentOutOfRangeException(nameof(DecodeAttentionWarps), $"{value}: the split-KV decode is built for {CudaOps.DecodeWarps} or {2 * CudaOps.DecodeWarps} warps");
    }

    private int _decodeAttentionWarps = CudaOps.DecodeWarps;

    /// <summary>Keys of a round the split-KV decode attention scores before each rescale of its softmax state: 4 (the
    /// default; four keys' scores and shuffles independent of each other), 1 (every key, each waiting on the one
    /// before, and the shares merged in loops: the kernel as the H200 timed it on 2026-12-04) or 8 (once a round); the
    /// same math in another rounding order. Other than 4 only in blocks of 4 warps. KernelBench infer times decode with each.</summary>
    public int DecodeAttentionRescaleKeys
    {
        get => _decodeAttentionRescaleKeys;
        set => _decodeAttentionRescaleKeys = CudaOps.DecodeRescaleKeysBuilt.Contains(value) ? value
            : throw new ArgumentOutOfRangeException(nameof(DecodeAttentionRescaleKeys), $"{value}: the split-KV decode is built to rescale once per {string.Join(", ", CudaOps.DecodeRescaleKeysBuilt)} keys");
    }

    private int _decodeAttentionRescaleKeys = CudaOps.DecodeRescaleKeys;

    /// <summary>The unrolls each GEMV kernel is compiled for (16-byte loads in flight per lane; kernels/gemv*.cu, entries
    /// NAME_uU). The first is the default.</summary>
    public static readonly IReadOnlyList<int> GemvUnrolls = [8, 12, 16];

    /// <summary>Null (the default): each GEMV kernel and shape runs the fastest of <see cref="GemvUnrolls"/> (and of its
    /// forms: <see cref="StreamGemvs"/>, <see cref="StreamGemvsByRow"/>, <see cref="BalanceGemvRows"/>), timed on its
    /// first call outside graph capture (they give bit-identical results, so the choice changes only speed; see
    /// <see cref="MinTunedGemvElements"/>). A value: that unroll everywhere (benchmarks).</summary>
    public int? GemvUnroll
    {
        get => _gemvUnroll;
        set => _gemvUnroll = value is not int u || GemvUnrolls.Contains(u) ? value
            : throw new ArgumentOutOfRangeException(nameof(GemvUnroll), $"{u} is not one of the compiled unrolls ({string.Join(", ", GemvUnrolls)})");
    }

    /// <summary>GEMV shapes of fewer weight elements (rows·K) keep the first candidate (streamed where there is a
    /// streamed form, the first unroll) untimed: they take a few microseconds, where timing is mostly launch noise (a
    /// small model's every shape).</summary>
    public long MinTunedGemvElements { get; set; } = 1 << 21;

    private int? _gemvUnroll;
    private readonly Dictionary<string, GemvForm> _gemvFormByShape = [];

    /// <summary>A GEMV kernel's unroll and form: streamed (<see cref="StreamGemvs"/>), in rounds of loads inside one row
    /// (<see cref="StreamGemvsByRow"/>), on a balanced grid (<see cref="BalanceGemvRows"/>).</summary>
    public readonly record struct GemvForm(int Unroll, bool Streamed, bool ByRow = false, bool Balanced = false)
    {
        public override string ToString() => $"{Unroll}{(Streamed ? " streamed" : "")}{(ByRow ? " by row" : "")}{(Balanced ? " balanced" : "")}";
    }

    /// <summary>The form chosen for each GEMV kernel and shape so far ("NAME,rows,k,...").</summary>
    public IReadOnlyDictionary<string, GemvForm> GemvChoices => _gemvFormByShape;

    /// <summary>GEMV shapes whose forms were timed in this process.</summary>
    public int GemvShapesTimed { get; private set; }

    /// <summary>Launches GEMV kernel <paramref name="name"/> (entry NAME_uU, one warp per output row) over
    /// <paramref name="rows"/> rows of length <paramref name="k"/>. <paramref name="accumulated"/>: the output bytes the
    /// kernel adds into (β ≠ 0, an index-add), which timing the unrolls would change: saved before and restored after.</summary>
    internal void LaunchGemv(string name, int rows, int k, (ulong Address, long Bytes)? accumulated, params ReadOnlySpan<KernelArg> args)
        => LaunchGemv(new GemvLaunch(name, rows, k, accumulated, 0, 0), args);

    /// <summary>Launches a GEMV kernel whose warps loop over the rows (gemv_norm.cu's fused decode norms): a grid of at most
    /// <paramref name="blocksPerSM"/> resident blocks per SM (<see cref="PersistentGridLimit"/> lowers it), each with
    /// <paramref name="sharedBytes"/> of dynamic shared memory; forms and unrolls chosen as <see cref="LaunchGemv(string, int, int, ValueTuple{ulong, long}?, ReadOnlySpan{KernelArg})"/>.</summary>
    internal void LaunchPersistentGemv(string name, int rows, int k, uint sharedBytes, int blocksPerSM, params ReadOnlySpan<KernelArg> args)
        => LaunchGemv(new GemvLaunch(name, rows, k, null, sharedBytes, blocksPerSM), args);

    /// <summary>The kernel file (<c>kernels/FILE.cu</c>) that defines GEMV entry point or kernel <paramref name="name"/>:
    /// the fused decode norms' in gemv_norm, the q/k/v and gate/up + SwiGLU ones in gemv_fused, the plain ones in gemv
    /// (three files, which NVRTC compiles side by side).</summary>
    internal static string GemvFile(string name) =>
        name.Contains("_norm_", StringComparison.Ordinal) ? "gemv_norm"
        : name.Contains("_qkv_", StringComparison.Ordinal) || name.Contains("_swiglu_", StringComparison.Ordinal) ? "gemv_fused" : "gemv";

    /// <summary>The streamed form of GEMV kernel <paramref name="name"/> (<see cref="StreamGemvs"/>), or null where it has
    /// none.</summary>
    internal static string? StreamedGemv(string name) =>
        name.Contains("_to_", StringComparison.Ordinal) || name.StartsWith("gemv_qkv_", StringComparison.Ordinal) || name.StartsWith("gemv_swiglu_", StringComparison.Ordinal)
        || name.StartsWith("gemv_norm_", StringComparison.Ordinal)
            ? "gemv_streamed" + name["gemv".Length..] : null;

    /// <summary>The streamed bf16 GEMVs (plain, q/k/v, gate/up + SwiGLU) issue each round of loads across row ends
    /// (a warp's rows as one stream) or inside one row (<c>gemv_streamed_byrow_*</c>, as they streamed up to
    /// the last H200 run, 2026-12-04); the same bits. Null (the default): both timed per shape with the unrolls
    /// (<see cref="GemvUnroll"/>); true or false: by row or across rows everywhere (benchmarks). Other streamed GEMVs
    /// have only the across-rows form.</summary>
    public bool? StreamGemvsByRow { get; set; }

    /// <summary>The by-row form of streamed GEMV kernel <paramref name="streamed"/> (<see cref="StreamGemvsByRow"/>),
    /// or null where it has none.</summary>
    internal static string? ByRowGemv(string streamed) =>
        streamed is "gemv_streamed_bf16_to_bf16" or "gemv_streamed_bf16_to_f32" or "gemv_streamed_qkv_bf16" or "gemv_streamed_swiglu_bf16"
            ? "gemv_streamed_byrow" + streamed["gemv_streamed".Length..] : null;

    /// <summary>Blocks per SM that <see cref="LaunchPersistentGemv"/> is timed with (fewer where fewer fit); the first is
    /// the default. Each block normalizes the row once, so more blocks repeat that work; 2 blocks of 8 warps with 8 to 16
    /// loads of 16 bytes per lane keep 64 KB or more of weights in flight per SM, above what HBM's latency needs (about
    /// 25 KB per SM on an H100), 4 twice that.</summary>
    public static readonly IReadOnlyList<int> PersistentBlocksPerSM = [2, 4];

    /// <summary>Caps the grid of <see cref="LaunchPersistentGemv"/> and of the streamed GEMV (null: their blocks per SM
    /// alone): the self-test uses a few blocks so that every warp takes several rows.</summary>
    internal int? PersistentGridLimit { get; set; }

    /// <summary>Whether the GEMVs whose warps loop over rows (the streamed forms, the fused decode norms) run on the
    /// fewest blocks that give no warp more rows than their full grid does, so that every warp takes as many: 2688
    /// rows on 2112 warps are 2 rows for 576 warps and 1 for the rest, which leaves the last stretch of the GEMV to a
    /// quarter of the warps; on 1344 warps every warp takes 2. Null (the default): both grids timed per shape with the
    /// unrolls (where they differ); true or false: that grid everywhere (benchmarks). The same bits either way.</summary>
    public bool? BalanceGemvRows { get; set; }

    /// <summary>One GEMV launch: kernel NAME_uU over <c>Rows</c> rows of length <c>K</c>; <c>Accumulated</c>: the output
    /// bytes it adds into (β ≠ 0), saved and restored around the timing of the unrolls; <c>BlocksPerSM</c>: 0 for a block
    /// per 8 rows, else the persistent grid's (at most the resident blocks).</summary>
    private readonly record struct GemvLaunch(string Name, int Rows, int K, (ulong Address, long Bytes)? Accumulated, uint SharedBytes, int BlocksPerSM);

    private void LaunchGemv(GemvLaunch g, ReadOnlySpan<KernelArg> args)
    {
        var candidates = GemvCandidates(g.Name, g.BlocksPerSM > 0, _gemvUnroll, StreamGemvs, StreamGemvsByRow, BalanceGemvRows);
        var form = candidates[0];
        string key = $"{g.Name},{g.Rows},{g.K},{g.SharedBytes},{g.BlocksPerSM},{_gemvUnroll},{StreamGemvs},{BalanceGemvRows},{StreamGemvsByRow}";
        if (candidates.Length > 1)
        {
            if (_gemvFormByShape.TryGetValue(key, out var chosen)) form = chosen;
            else if (!Stream.IsCapturing)
                _gemvFormByShape[key] = form = (long)g.Rows * g.K >= MinTunedGemvElements ? ChooseGemvForm(g, candidates, args.ToArray()) : form;
        }
        LaunchGemvForm(g, form, args);
    }

    /// <summary>The forms GEMV kernel <paramref name="name"/> may take under the settings (<see cref="GemvUnroll"/>,
    /// <see cref="StreamGemvs"/>, <see cref="StreamGemvsByRow"/>, <see cref="BalanceGemvRows"/>; null: each choice
    /// allowed), the untimed default first: streamed where there is a streamed form, rounds across rows, the full grid,
    /// the first unroll. <paramref name="loopsOverRows"/>: its unstreamed form's warps loop over rows too (a fused
    /// decode norm's), so its grid may be balanced.</summary>
    internal static GemvForm[] GemvCandidates(string name, bool loopsOverRows, int? unroll, bool? streamed, bool? byRow, bool? balanced)
    {
        static bool[] Allowed(bool? setting, bool exists) => !exists || setting == false ? [false] : setting == true ? [true] : [false, true];
        string? streamedName = StreamedGemv(name);
        int[] unrolls = unroll is int forced ? [forced] : [.. GemvUnrolls];
        return [..
            from s in Allowed(streamed, streamedName != null).Reverse()
            from r in Allowed(byRow, s && ByRowGemv(streamedName!) != null)
            from b in Allowed(balanced, s || loopsOverRows)
            from u in unrolls
            select new GemvForm(u, s, r, b)];
    }

    /// <summary>The entry point and grid that GEMV launch <paramref name="g"/> runs in <paramref name="form"/>.</summary>
    private (string Entry, uint Grid) GemvEntryAndGrid(GemvLaunch g, GemvForm form)
    {
        // A streamed kernel runs on as many blocks as are resident (a fused decode norm's: as many as its other form).
        if (form.Streamed)
        {
            string streamed = StreamedGemv(g.Name)!;
            g = g with { Name = form.ByRow ? ByRowGemv(streamed)! : streamed, BlocksPerSM = g.BlocksPerSM > 0 ? g.BlocksPerSM : int.MaxValue };
        }
        string entry = $"{g.Name}_u{form.Unroll}";   // the callers' names are checked by CudaTests (LaunchGemv)
        uint grid = GemvGrid(g.Rows);
        if (g.BlocksPerSM > 0)
        {
            long resident = (long)Math.Min(g.BlocksPerSM, ResidentBlocks(GemvFile(entry), entry, GemvWarps * 32, g.SharedBytes)) * Info.Multiprocessors;
            grid = (uint)Math.Max(1, Math.Min(grid, Math.Min(resident, PersistentGridLimit ?? long.MaxValue)));
            if (form.Balanced)
            {
                long perWarp = (g.Rows + (long)grid * GemvWarps - 1) / ((long)grid * GemvWarps);
                grid = (uint)Math.Max(1, (g.Rows + perWarp * GemvWarps - 1) / (perWarp * GemvWarps));
            }
        }
        return (entry, grid);
    }

    private void LaunchGemvForm(GemvLaunch g, GemvForm form, ReadOnlySpan<KernelArg> args)
    {
        var (entry, grid) = GemvEntryAndGrid(g, form);
        Launch(GemvFile(entry), entry, grid, GemvWarps * 32, g.SharedBytes, args);
    }

    /// <summary>Blocks of <paramref name="threads"/> threads and <paramref name="sharedBytes"/> of dynamic shared memory
    /// that one SM holds at once (at least 1; 1 where the driver cannot tell).</summary>
    internal int ResidentBlocks(string kernel, string entry, uint threads, uint sharedBytes)
    {
        string key = $"{kernel}/{entry},{threads},{sharedBytes}";
        if (_residentBlocks.TryGetValue(key, out int n)) return n;
        nint fn = Function(kernel, entry);
        if (sharedBytes > DefaultDynamicSharedBytes) AllowDynamicShared(fn, entry, sharedBytes);
        return _residentBlocks[key] = Math.Max(1, CudaDriver.MaxActiveBlocksPerMultiprocessor(fn, entry, (int)threads, sharedBytes) ?? 1);
    }

    private readonly Dictionary<string, int> _residentBlocks = [];

    /// <summary>Decode's norms fused into the GEMVs that read them (<see cref="CudaOps.NormGemvQkv"/>,
    /// <see cref="CudaOps.NormGemvSwiGlu"/>): null (the default) times the two launches and the fused kernel at each of
    /// <see cref="PersistentBlocksPerSM"/> on the first call of each shape of at least <see cref="MinTunedGemvElements"/>
    /// weight elements outside graph capture and keeps the fastest (smaller shapes, mostly launch cost, fuse); true
    /// forces the fused kernel at the first blocks per SM, false the two launches. All give the same bits, so the choice
    /// changes only speed.</summary>
    public bool? FuseDecodeNorms { get; set; }

    private readonly Dictionary<string, int> _fuseNormByShape = [];

    /// <summary>The form chosen for each decode norm + GEMV shape so far (key: the fused kernel, rows, k, d): the fused
    /// kernel's blocks per SM, or 0 for the two launches.</summary>
    public IReadOnlyDictionary<string, int> DecodeNormFusionChoices => _fuseNormByShape;

    /// <summary>Runs <paramref name="fused"/> (given its blocks per SM) or <paramref name="separate"/> (the same outputs)
    /// per <see cref="FuseDecodeNorms"/>.</summary>
    internal void FusedOrSeparate(string key, long weightElements, Action<int> fused, Action separate)
    {
        int blocks = FuseDecodeNorms == false ? 0 : PersistentBlocksPerSM[0];
        if (FuseDecodeNorms == null)
        {
            if (_fuseNormByShape.TryGetValue(key, out int chosen)) blocks = chosen;
            else if (!Stream.IsCapturing)
                _fuseNormByShape[key] = blocks = weightElements < MinTunedGemvElements ? blocks : FastestNormForm(fused, separate);
        }
        if (blocks > 0) fused(blocks);
        else separate();
    }

    /// <summary>0 where the two launches are fastest, else the fused kernel's fastest blocks per SM.</summary>
    private int FastestNormForm(Action<int> fused, Action separate)
    {
        DeviceTensor? evict = null;
        try
        {
            try { evict = Allocate(DType.F32, 2L * (Info.L2Bytes ?? 64 << 20) / 4); }
            catch (CudaOutOfMemoryException) { }
            var forms = PersistentBlocksPerSM.Select(b => (Blocks: b, Run: (Action)(() => fused(b)))).Prepend((Blocks: 0, Run: separate)).ToList();
            foreach (var f in forms) f.Run();   // untimed: first-use costs, and each form's unrolls chosen
            return forms.MinBy(f => ColdMedianMs(f.Run, evict)).Blocks;
        }
        finally { evict?.Dispose(); }
    }

    /// <summary>Median of 5 timings of <paramref name="work"/>, each after evicting the L2 with <paramref name="evict"/> (when set).</summary>
    private float ColdMedianMs(Action work, DeviceTensor? evict)
    {
        var ms = new float[5];
        for (int i = 0; i < ms.Length; i++)
        {
            if (evict != null) EvictL2(evict);
            ms[i] = Time(work);
        }
        Array.Sort(ms);
        return ms[2];
    }

    /// <summary>Leaves the L2 cache cold and clean: reads <paramref name="buffer"/> (at least twice the L2 to evict
    /// all of it) and writes nothing, so the next kernel neither hits in L2 nor pays for writing back lines an
    /// earlier kernel dirtied (what a flush by writing a buffer leaves behind).</summary>
    public void EvictL2(DeviceTensor buffer)
    {
        long words = buffer.Bytes / 16;
        Launch("init", "read_through", GridFor(words), 256, 0, buffer, words);
    }

    /// <summary>Drops the GEMV form and norm-fusion choices, so each GEMV shape's next call times them again (self-test).</summary>
    internal void ForgetGemvChoices() { _gemvFormByShape.Clear(); _fuseNormByShape.Clear(); }

    private GemvForm ChooseGemvForm(GemvLaunch g, GemvForm[] candidates, KernelArg[] args)
    {
        DeviceTensor? saved = null, evict = null;
        try
        {
            // Decode streams each weight from memory once per step; timed with the weights in L2 instead (a pruned
            // layer's fit), the forms would be ranked on L2 bandwidth. Where the buffer does not fit, warm timing.
            try { evict = Allocate(DType.F32, 2L * (Info.L2Bytes ?? 64 << 20) / 4); }
            catch (CudaOutOfMemoryException) { }
            if (g.Accumulated is { } acc)
            {
                saved = Allocate(DType.F32, (acc.Bytes + 3) / 4);
                CudaDriver.CopyDtoD(saved.Pointer, acc.Address, acc.Bytes, Stream.DangerousGetHandle());
            }
            var best = candidates[0];
            float bestMs = float.PositiveInfinity;
            // A balanced grid that is the full grid is the same launch: timed once.
            foreach (var form in candidates.DistinctBy(f => GemvEntryAndGrid(g, f)))
            {
                void Run() => LaunchGemvForm(g, form, args);
                Run();   // untimed: first-use costs
                float ms = ColdMedianMs(Run, evict);
                if (ms < bestMs) (best, bestMs) = (form, ms);
            }
            if (g.Accumulated is { } a) CudaDriver.CopyDtoD(a.Address, saved!.Pointer, a.Bytes, Stream.DangerousGetHandle());
            GemvShapesTimed++;
            return best;
        }
        catch (CudaOutOfMemoryException) { return candidates[0]; }   // no room to save the output: nothing was launched
        finally { saved?.Dispose(); evict?.Dispose(); }
    }

    /// <summary>Whether the GEMV kernels take x·Bᵀ for a single row x at these element offsets: <see cref="UseGemv"/> on,
    /// K a whole number of 16-byte loads, both operands 16-byte aligned.</summary>
    public bool GemvApplies(DeviceTensor x, DeviceTensor b, int k, long offsetX = 0, long offsetB = 0)
        => UseGemv && x.DType == b.DType && k % (16 / x.DType.Size()) == 0 && ((x.Address(offsetX) | b.Address(offsetB)) & 15) == 0;

    /// <summary>Row-major D[M,N] = α·A[M,K]·B[N,K]ᵀ + β·D through cuBLASLt (fp32 accumulation); with
    /// <paramref name="transposeB"/> false, B is [K,N] and D = α·A·B + β·D (the input gradient of a linear layer). A and B
    /// share a storage type; D is that type or f32. Plans (descriptors + heuristic algorithm) are cached per shape.</summary>
    public void Gemm(DeviceTensor a, DeviceTensor b, DeviceTensor d, int m, int n, int k, float alpha = 1, float beta = 0,
        long offsetA = 0, long offsetB = 0, long offsetD = 0, bool transposeB = true)
    {
        if (a.DType != b.DType) throw new ArgumentException($"GEMM inputs differ in type ({a.DType}, {b.DType})");
        if ((long)m * k > a.Length - offsetA || (long)n * k > b.Length - offsetB || (long)m * n > d.Length - offsetD)
            throw new ArgumentException($"GEMM {m}x{n}x{k} does not fit its buffers");
        MakeCurrent();
        ulong pa = a.Address(offsetA), pb = b.Address(offsetB), pd = d.Address(offsetD);
        if (m == 1 && transposeB && GemvApplies(a, b, k, offsetA, offsetB) && (d.DType == a.DType || d.DType == DType.F32))
        {
            LaunchGemv($"gemv_{Suffix(a.DType)}_to_{Suffix(d.DType)}", n, k, beta != 0 ? (pd, (long)n * d.DType.Size()) : null,
                pa, pb, pd, 0UL, n, k, alpha, beta);
            return;
        }
        BatchedGemm(pa, pb, pd, a.DType, d.DType, m, n, k, 1, k, 0, false, transposeB ? k : n, 0, transposeB, n, 0, alpha, beta);
    }

    /// <summary>Strided batched row-major GEMM on device pointers (the layout of <see cref="BatchedGemm"/>): A and B in
    /// <paramref name="ab"/>, D in <paramref name="dType"/>, f32 accumulation. Plans are cached per shape, layout and
    /// the buffer alignment (the largest power of two, at most 256, dividing every matrix's start: the pointers and,
    /// batched, the strides). With <see cref="TuneGemms"/>, a plan's first call outside graph capture chooses its
    /// algorithm (<see cref="GemmTuning"/>).</summary>
    public void BatchedGemm(ulong a, ulong b, ulong d, DType ab, DType dType, int m, int n, int k, int batch,
        int lda, long strideA, bool transposeA, int ldb, long strideB, bool transposeB, int ldd, long strideD, float alpha, float beta)
    {
        MakeCurrent();
        long ea = ab.Size(), ed = dType.Size();
        ulong bits = a | b | d | 256UL;
        if (batch > 1) bits |= (ulong)(strideA * ea) | (ulong)(strideB * ea) | (ulong)(strideD * ed);
        uint align = (uint)(bits & ~(bits - 1));
        string key = $"{m},{n},{k},{batch},{ab},{dType},{lda},{strideA},{transposeA},{ldb},{strideB},{transposeB},{ldd},{strideD},{align}";
        if (!_plans.TryGetValue(key, out var plan))
            _plans[key] = plan = new CublasLt.MatmulPlan(Lt, m, n, k, LtType(ab), LtType(dType), GemmWorkspaceBytes, batch, strideA, strideB, strideD,
                lda, ldb, ldd, align, transposeB, transposeA, GemmTuning.Candidates);
        if (TuneGemms && !_tunedPlans.Contains(key) && 2.0 * m * n * k * batch >= MinTunedGemmFlops && !Stream.IsCapturing)
        {
            _tunedPlans.Add(key);
            if (plan.Candidates > 1) ChooseAlgorithm(key, plan, a, b, d, dType, m, batch, ldd, strideD, alpha, beta);
        }
        plan.Run(Lt, a, b, d, alpha, beta, _workspace, GemmWorkspaceBytes, Stream.DangerousGetHandle(), TuneGemms ? null : 0);
    }

    /// <summary>Times each candidate of <paramref name="plan"/> on the call's operands, unless the tuning file already
    /// names one. The runs overwrite the output (β = 0), so a call that accumulates into D (β ≠ 0) is timed into a
    /// scratch buffer of D's size instead; where that does not fit in memory the plan keeps the heuristic's first.</summary>
    private void ChooseAlgorithm(string key, CublasLt.MatmulPlan plan, ulong a, ulong b, ulong d, DType dType, int m, int batch, int ldd,
        long strideD, float alpha, float beta)
    {
        DeviceTensor? scratch = null;
        try
        {
            nint stream = Stream.DangerousGetHandle();
            var ids = Enumerable.Range(0, plan.Candidates).Select(plan.AlgorithmId).ToList();
            plan.Chosen = GemmTuning.Choose(key, ids, i =>
            {
                if (beta != 0 && scratch == null)
                {
                    scratch = Allocate(dType, (batch - 1) * strideD + (long)m * ldd);
                    d = scratch.Pointer;
                }
                void Run() => plan.Run(Lt, a, b, d, alpha, 0, _workspace, GemmWorkspaceBytes, stream, i);
                try
                {
                    Run();   // untimed: first-use costs
                    var ms = new[] { Time(Run), Time(Run), Time(Run) };
                    Array.Sort(ms);
                    return ms[1];
                }
                catch (CudaException) { return float.PositiveInfinity; }   // an algorithm the library refuses to run here
            });
        }
        catch (CudaOutOfMemoryException) { /* no room for the scratch output: keep the heuristic's first choice */ }
        finally { scratch?.Dispose(); }
    }

    /// <summary>Each GEMM plan so far: its shape key, the algorithm it runs (index in the heuristic's list) and how many
    /// the heuristic offered.</summary>
    public IEnumerable<(string Shape, int Chosen, int Candidates)> GemmAlgorithms => _plans.Select(p => (p.Key, p.Value.Chosen, p.Value.Candidates));

    /// <summary>Drops every GEMM plan, so each shape's next call chooses its algorithm again (self-test).</summary>
    internal void ForgetGemmPlans()
    {
        Synchronize();
        foreach (var p in _plans.Values) p.Dispose();
        _plans.Clear();
        _tunedPlans.Clear();
    }

    public void Synchronize() { MakeCurrent(); Stream.Synchronize(); }

    /// <summary>Times <paramref name="work"/> on the stream with CUDA events; milliseconds.</summary>
    public float Time(Action work)
    {
        MakeCurrent();
        using var start = new CudaEventHandle();
        using var end = new CudaEventHandle();
        start.Record(Stream);
        work();
        end.Record(Stream);
        end.Synchronize();
        return end.ElapsedSince(start);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _context.MakeCurrent();
        try { Stream.Synchronize(); } catch (CudaException) { /* already failed: release what we can */ }
        foreach (var p in _plans.Values) p.Dispose();
        Lt.Dispose();
        Allocator.Release(_workspace);
        Allocator.Dispose();
        foreach (var m in _modules.Values) m.Dispose();
        _staging?.Dispose();
        Stream.Dispose();
        _context.Dispose();
    }
}
