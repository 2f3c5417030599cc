using System.Security.Cryptography;
using System.Text;
using DispNative.Interop;

namespace DispNative.Engine.Cuda;

/// <summary>The <c>kernels/*.cu</c> sources and the headers they include (<c>kernels/*.cuh</c>), embedded in the engine
/// assembly.</summary>
public static class KernelSources
{
    private static readonly Lazy<IReadOnlyDictionary<string, string>> All = new(Read);
    private static readonly Lazy<IReadOnlyDictionary<string, string>> AllHeaders =
        new(() => Files.Where(f => IsHeader(f.Key)).OrderBy(f => f.Key, StringComparer.Ordinal).ToDictionary());

    /// <summary>Kernel files by name without extension (for example "norm"), plus the headers under their file names.</summary>
    public static IReadOnlyDictionary<string, string> Files => All.Value;

    /// <summary>The headers by file name (for example "common.cuh"): every kernel is compiled with all of them at hand.</summary>
    public static IReadOnlyDictionary<string, string> Headers => AllHeaders.Value;

    /// <summary>Every header's name and text in name order: part of each kernel's cache key.</summary>
    public static string HeaderText => string.Join("\n\u0002", Headers.Select(h => h.Key + "\n" + h.Value));

    private static bool IsHeader(string file) => file.EndsWith(".cuh", StringComparison.Ordinal);

    public static IEnumerable<string> KernelNames => Files.Keys.Where(k => !IsHeader(k)).Order();

    public static string Source(string kernel) => Files.TryGetValue(kernel, out var s)
        ? s : throw new DispNativeException($"no kernel source '{kernel}.cu' is embedded (have: {string.Join(", ", KernelNames)})");

    private static readonly System.Text.RegularExpressions.Regex EntryPoint = new(
        @"extern\s+""C""\s+__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+([\w#]+)\s*\(([^)]*)\)");

    /// <summary>Number of parameters of the entry point <paramref name="entry"/> of <paramref name="kernel"/>.cu, read from its
    /// <c>extern "C" __global__</c> declaration; names built by macros match their template (<c>##S</c> and <c>##O</c>
    /// a storage suffix, <c>##D</c> a number, other upper-case parameters any name). Launches are checked against it:
    /// a kernel given the wrong number of arguments would read garbage instead of failing.</summary>
    public static int ParameterCount(string kernel, string entry)
    {
        foreach (System.Text.RegularExpressions.Match m in EntryPoint.Matches(Source(kernel)))
        {
            var pattern = new StringBuilder("^");
            foreach (string part in m.Groups[1].Value.Split("##"))
                pattern.Append(part switch
                {
                    "S" or "O" => "(f32|bf16|f16)",
                    "D" => "[0-9]+",
                    _ when part.Length > 0 && part.All(c => c is >= 'A' and <= 'Z') => "[A-Za-z0-9_]+",
                    _ => System.Text.RegularExpressions.Regex.Escape(part),
                });
            if (!System.Text.RegularExpressions.Regex.IsMatch(entry, pattern.Append('$').ToString())) continue;
            string parameters = m.Groups[2].Value.Trim();
            return parameters.Length == 0 ? 0 : parameters.Count(c => c == ',') + 1;
        }
        throw new DispNativeException($"{kernel}.cu declares no entry point {entry}");
    }

    private static IReadOnlyDictionary<string, string> Read()
    {
        var asm = typeof(KernelSources).Assembly;
        var files = new Dictionary<string, string>();
        foreach (var res in asm.GetManifestResourceNames().Where(n => n.StartsWith("kernels/", StringComparison.Ordinal)))
        {
            using var s = asm.GetManifestResourceStream(res)!;
            using var r = new StreamReader(s, Encoding.UTF8);
            string file = res["kernels/".Length..];
            files[file.EndsWith(".cu", StringComparison.Ordinal) ? file[..^3] : file] = r.ReadToEnd();
        }
        return files;
    }
}

/// <summary>What <see cref="KernelCompiler.CompileAll"/> did: kernel files compiled and read from the cache, the ones that
/// failed (name, error) and the wall time.</summary>
public sealed record KernelBuild(int Files, int Compiled, int FromCache, IReadOnlyList<KeyValuePair<string, string>> Failed, TimeSpan Elapsed)
{
    public override string ToString() =>
        $"{Files} kernel files ready in {Elapsed.TotalSeconds:F1} s ({Compiled} compiled, {FromCache} from the cache"
        + (Failed.Count > 0 ? $"; {Failed.Count} failed: {string.Join(", ", Failed.Select(f => f.Key))}" : "") + ")";
}

/// <summary>Compiles embedded kernels with NVRTC for one architecture and caches the CUBINs on disk, keyed by
/// SHA-256 of (source, headers, options, architecture, NVRTC version): a second start compiles nothing.</summary>
public sealed class KernelCompiler
{
    public string Architecture { get; }
    public string CacheDirectory { get; }
    private int _compiled, _cacheHits;
    public int Compiled => _compiled;
    public int CacheHits => _cacheHits;

    /// <summary>Options for every kernel. No --use_fast_math: the kernels are checked against the CPU reference
    /// and their exp/log/sincos must stay accurate.</summary>
    public IReadOnlyList<string> Options { get; }

    /// <param name="architecture">e.g. "sm_90" (from the device's compute capability).</param>
    /// <param name="cacheDirectory">null: DISPNATIVE_KERNEL_CACHE, else the user cache directory.</param>
    public KernelCompiler(string architecture, string? cacheDirectory = null)
    {
        Architecture = architecture;
        CacheDirectory = cacheDirectory ?? DefaultCacheDirectory();
        Options = [$"-arch={architecture}", "-std=c++17"];
    }

    public static string DefaultCacheDirectory()
    {
        string? env = Environment.GetEnvironmentVariable("DISPNATIVE_KERNEL_CACHE");
        if (!string.IsNullOrEmpty(env)) return env;
        string? xdg = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
        string root = !string.IsNullOrEmpty(xdg) ? xdg
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
        return Path.Combine(root, "dispnative", "kernels");
    }

    /// <summary>Kernel files that need an architecture-specific target on sm_90: the warpgroup-MMA prefill (wgmma
    /// exists on sm_90a only).</summary>
    private static readonly string[] Sm90aKernels = ["attention_wgmma"];

    /// <summary>The target <c>kernels/{kernel}.cu</c> is built for: sm_90a for <see cref="Sm90aKernels"/> on sm_90
    /// where NVRTC knows it (12.0 and later), else <see cref="Architecture"/>.</summary>
    public string ArchitectureFor(string kernel) => Target(Architecture, kernel, Nvrtc.Version.Major);

    internal static string Target(string architecture, string kernel, int nvrtcMajor) =>
        architecture == "sm_90" && Sm90aKernels.Contains(kernel) && nvrtcMajor >= 12 ? "sm_90a" : architecture;

    /// <summary><see cref="Options"/> with <c>-arch</c> set to <see cref="ArchitectureFor"/>.</summary>
    public IReadOnlyList<string> OptionsFor(string kernel) =>
        ArchitectureFor(kernel) is var arch && arch == Architecture ? Options : [$"-arch={arch}", .. Options.Skip(1)];

    /// <summary>The cache key of one kernel file under these options and the loaded NVRTC.</summary>
    public string CacheKey(string kernel) => Key(KernelSources.Source(kernel), KernelSources.HeaderText,
        OptionsFor(kernel), ArchitectureFor(kernel), Nvrtc.Version.ToString());

    internal static string Key(string source, string header, IEnumerable<string> options, string arch, string nvrtcVersion)
    {
        var text = string.Join("\n\u0001", [source, header, string.Join(" ", options), arch, nvrtcVersion]);
        return Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(text))).ToLowerInvariant()[..32];
    }

    /// <summary>The CUBIN of <c>kernels/{kernel}.cu</c>, from the cache or freshly compiled (then cached). Threads that
    /// ask for a file while it compiles wait for that compile (its CUBIN or its error) rather than start their own; one
    /// asking after a failed compile compiles again.</summary>
    public byte[] Cubin(string kernel)
    {
        string source = KernelSources.Source(kernel);
        string path = Path.Combine(CacheDirectory, $"{kernel}-{ArchitectureFor(kernel)}-{CacheKey(kernel)}.cubin");
        if (File.Exists(path))
        {
            try { var cached = File.ReadAllBytes(path); if (cached.Length > 0) { Interlocked.Increment(ref _cacheHits); return cached; } }
            catch (IOException) { /* unreadable cache entry: compile again */ }
        }
        var build = _compiling.GetOrAdd(path, _ => new Lazy<byte[]>(() =>
        {
            var cubin = Nvrtc.CompileToCubin(source, kernel + ".cu", KernelSources.Headers, OptionsFor(kernel), out _);
            Interlocked.Increment(ref _compiled);
            TryWriteCacheFile(path, tmp => File.WriteAllBytes(tmp, cubin));   // a read-only cache only costs a recompile
            return cubin;
        }));
        try { return build.Value; }
        finally { _compiling.TryRemove(new KeyValuePair<string, Lazy<byte[]>>(path, build)); }
    }

    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, Lazy<byte[]>> _compiling = new();

    /// <summary>Brings <paramref name="kernels"/> (default: every embedded kernel) into the cache, compiling the missing
    /// ones on up to <paramref name="parallelism"/> threads at once (NVRTC compiles different programs concurrently; 0:
    /// one per processor). A first start would otherwise compile them one file at a time as each is first launched.
    /// A kernel that fails is reported, not thrown: its first launch compiles it again and throws the error there.</summary>
    public KernelBuild CompileAll(IEnumerable<string>? kernels = null, int parallelism = 0)
    {
        var names = (kernels ?? KernelSources.KernelNames).ToList();
        int compiled = Compiled, hits = CacheHits;
        var failed = new System.Collections.Concurrent.ConcurrentDictionary<string, string>();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        ForEachKernel(names, parallelism,
            k => { try { Cubin(k); } catch (Exception e) when (e is DispNativeException or NvrtcCompileException or CudaException) { failed[k] = e.Message; } });
        return new KernelBuild(names.Count, Compiled - compiled, CacheHits - hits,
            failed.OrderBy(f => f.Key, StringComparer.Ordinal).ToList(), clock.Elapsed);
    }

    /// <summary>Runs <paramref name="body"/> for each kernel file on up to <paramref name="parallelism"/> threads (0: one per
    /// processor), each thread taking the next file as it finishes one: a few files take most of the time (gemv_norm and
    /// decode_step about 10 s each under NVRTC 11.8), and split into fixed ranges they fell to one thread.</summary>
    internal static void ForEachKernel(IEnumerable<string> kernels, int parallelism, Action<string> body) =>
        Parallel.ForEach(System.Collections.Concurrent.Partitioner.Create(kernels, System.Collections.Concurrent.EnumerablePartitionerOptions.NoBuffering),
            new ParallelOptions { MaxDegreeOfParallelism = parallelism > 0 ? parallelism : Environment.ProcessorCount }, body);

    /// <summary>Replaces a cache file whole (<paramref name="write"/> fills a temporary file that is then moved over
    /// it, so a reader never sees it half written); where the directory cannot be written, nothing happens.</summary>
    internal static void TryWriteCacheFile(string path, Action<string> write)
    {
        try
        {
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            string tmp = path + $".{Environment.ProcessId}.tmp";
            write(tmp);
            File.Move(tmp, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }
}
