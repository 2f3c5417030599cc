using DispNative.Engine;
using DispNative.Engine.Cuda;
using DispNative.Engine.Inference;
using DispNative.Interop;

namespace DispNative.Tests;

/// <summary>The CUDA backend's host-side pieces (allocator, kernel sources, cache keys) on any machine.</summary>
public class CachingAllocatorTests
{
    private sealed class FakeMemory(long capacity) : IDeviceMemory
    {
        private ulong _next = 0x1000;
        public long Used;
        public readonly HashSet<ulong> Live = [];
        public readonly Dictionary<ulong, long> Sizes = [];
        public ulong TryAllocate(long bytes)
        {
            if (Used + bytes > capacity) return 0;
            ulong p = _next; _next += (ulong)bytes; Used += bytes; Live.Add(p); Sizes[p] = bytes;
            return p;
        }
        public void Free(ulong p) { Assert.That(Live.Remove(p), $"0x{p:x} freed twice or never allocated"); Used -= Sizes[p]; }
    }

    [TestCase(1, 512)]
    [TestCase(512, 512)]
    [TestCase(513, 1024)]
    [TestCase((1 << 20) - 1, 1 << 20)]
    [TestCase(1 << 20, 2 << 20)]
    [TestCase((2 << 20) + 1, 4 << 20)]
    public void BucketSize_RoundsToSteps(long request, long bucket) => Assert.That(CachingAllocator.BucketSize(request), Is.EqualTo(bucket));

    [Test]
    public void ReleasedBlocks_AreReusedForTheSameBucket_AndCounted()
    {
        var mem = new FakeMemory(1 << 30);
        using var a = new CachingAllocator(mem);
        ulong p1 = a.Allocate(1000);
        ulong p2 = a.Allocate(5000);
        a.Release(p1);
        ulong p3 = a.Allocate(900);      // same 1024-byte bucket: the cached block comes back
        Assert.That(p3, Is.EqualTo(p1));
        var s = a.Stats;
        Assert.That((s.Requests, s.CacheHits, s.DeviceAllocations), Is.EqualTo((3L, 1L, 2L)));
        Assert.That(s.InUseBytes, Is.EqualTo(1024 + 5120));
        a.Release(p2); a.Release(p3);
        Assert.That(a.Stats.CachedBytes, Is.EqualTo(1024 + 5120));
        Assert.That(a.Stats.PeakInUseBytes, Is.EqualTo(1024 + 5120));
        ulong p4 = a.Allocate(2000);     // a new bucket while both blocks wait in the cache
        Assert.That((a.Stats.PeakInUseBytes, a.Stats.PeakReservedBytes), Is.EqualTo((1024L + 5120, 2048L + 1024 + 5120)));
        a.Release(p4);
        a.Trim();
        Assert.That(mem.Live, Is.Empty);
        Assert.That(a.Stats.CachedBytes, Is.Zero);
    }

    [Test]
    public void OutOfMemory_ReleasesTheCacheAndRetries_ThenFailsClearly()
    {
        var mem = new FakeMemory(6 << 20);
        using var a = new CachingAllocator(mem);
        ulong big = a.Allocate(4 << 20);
        a.Release(big);                    // cached, still held from the device
        ulong other = a.Allocate(5 << 20); // a 6 MiB bucket, which does not fit beside the cache: trimmed, then served
        Assert.That(a.Stats.CachedBytes, Is.Zero);
        Assert.That((a.Stats.CacheHits, a.Stats.DeviceAllocations, mem.Used), Is.EqualTo((0L, 2L, 6L << 20)));
        var e = Assert.Throws<CudaOutOfMemoryException>(() => a.Allocate(1 << 20))!;
        Assert.That(e.Message, Does.Contain("out of device memory").And.Contain("1.0 MiB requested"));
        a.Release(other);
    }

    [Test]
    public void Dispose_FreesLiveAndCachedBlocks_AndDoubleReleaseIsAnError()
    {
        var mem = new FakeMemory(1 << 30);
        var a = new CachingAllocator(mem);
        ulong p = a.Allocate(10);
        a.Allocate(3 << 20);
        a.Release(p);
        Assert.Throws<InvalidOperationException>(() => a.Release(p));
        a.Dispose();
        Assert.That(mem.Live, Is.Empty);
    }
}

public class KernelSourceTests
{
    private static string KernelsDir => Path.Combine(TestAssets.RepoRoot, "kernels");

    /// <summary>The streamed GEMVs' launch bounds assume the block the host launches (a larger one fails to launch).</summary>
    [Test]
    public void TheGemvKernelsWarpsPerBlock_AreTheHosts()
    {
        var m = System.Text.RegularExpressions.Regex.Match(File.ReadAllText(Path.Combine(KernelsDir, "gemv.cuh")), @"#define GEMV_WARPS (\d+)");
        Assert.That(m.Success, "gemv.cuh defines GEMV_WARPS");
        Assert.That(int.Parse(m.Groups[1].Value), Is.EqualTo(CudaDevice.GemvWarps));
    }

    /// <summary>The files a CUDA model builds while its weights upload (CudaLlama.InferenceKernels) are the ones the
    /// engine's ops launch (CudaOps, CudaDevice and its GEMV files) but training's own.</summary>
    [Test]
    public void TheKernelsAModelBuildsAtLoad_AreTheOnesInferenceLaunches()
    {
        var launched = new SortedSet<string>(["gemv", "gemv_fused", "gemv_norm"], StringComparer.Ordinal);   // CudaDevice.GemvFile's
        foreach (var file in new[] { "CudaOps.cs", "CudaDevice.cs" })
        {
            string text = File.ReadAllText(Path.Combine(TestAssets.RepoRoot, "src", "DispNative.Engine", "Cuda", file));
            foreach (System.Text.RegularExpressions.Match m in System.Text.RegularExpressions.Regex.Matches(text, @"Launch\w*\(""(\w+)"""))
                launched.Add(m.Groups[1].Value);
        }
        launched.ExceptWith(["masks", "cross_entropy"]);   // the masked training model's
        Assert.That(CudaLlama.InferenceKernels(wgmma: true).Order(StringComparer.Ordinal), Is.EqualTo(launched));
        Assert.That(CudaLlama.InferenceKernels(wgmma: false), Does.Not.Contain("attention_wgmma"));
        Assert.That(CudaLlama.InferenceKernels(wgmma: true), Is.SubsetOf(KernelSources.KernelNames));
    }

    /// <summary>The GEMV forms timed per shape: every combination the settings leave open, the untimed default first, and
    /// by-row forms only for the bf16 kernels that have one.</summary>
    [Test]
    public void GemvCandidates_AreTheFormsTheSettingsLeaveOpen()
    {
        var qkv = CudaDevice.GemvCandidates("gemv_qkv_bf16", false, null, null, null, null);
        int u = CudaDevice.GemvUnrolls.Count;
        Assert.That(qkv, Has.Length.EqualTo(4 * u + u), "streamed: across rows or by row, full or balanced grid; a block per 8 rows");
        Assert.That(qkv, Is.Unique);
        Assert.That(qkv[0], Is.EqualTo(new CudaDevice.GemvForm(CudaDevice.GemvUnrolls[0], Streamed: true)));
        Assert.That(qkv.Where(f => !f.Streamed), Has.All.Matches<CudaDevice.GemvForm>(f => !f.ByRow && !f.Balanced), "a block per 8 rows has one grid");
        Assert.That(qkv.Count(f => f.ByRow), Is.EqualTo(2 * u));
        Assert.That(qkv.Count(f => f.Balanced), Is.EqualTo(2 * u));

        var f32 = CudaDevice.GemvCandidates("gemv_qkv_f32", false, null, null, null, null);
        Assert.That(f32.Count(f => f.ByRow), Is.Zero, "no by-row form in f32");
        Assert.That(f32, Has.Length.EqualTo(2 * u + u));

        var forced = CudaDevice.GemvCandidates("gemv_swiglu_bf16", false, 12, true, true, false);
        Assert.That(forced, Is.EqualTo(new[] { new CudaDevice.GemvForm(12, true, ByRow: true) }));
        Assert.That(CudaDevice.GemvCandidates("gemv_bf16_to_bf16", false, 16, false, null, null),
            Is.EqualTo(new[] { new CudaDevice.GemvForm(16, false) }), "unstreamed, a block per 8 rows: no by-row or balanced form");

        // A fused decode norm: its rows-looped form is balanced too; no by-row form.
        var norm = CudaDevice.GemvCandidates("gemv_norm_qkv_bf16", true, null, null, null, null);
        Assert.That(norm, Has.Length.EqualTo(2 * 2 * u));
        Assert.That(norm.Count(f => f.Balanced && !f.Streamed), Is.EqualTo(u));
        Assert.That(norm.Count(f => f.ByRow), Is.Zero);
    }

    [Test]
    public void EveryKernelFile_IsEmbedded_Verbatim()
    {
        var onDisk = Directory.GetFiles(KernelsDir, "*.cu").Select(Path.GetFileNameWithoutExtension).Order().ToList();
        Assert.That(onDisk, Is.Not.Empty);
        Assert.That(KernelSources.KernelNames, Is.EqualTo(onDisk));
        foreach (var k in onDisk)
            Assert.That(KernelSources.Source(k!), Is.EqualTo(File.ReadAllText(Path.Combine(KernelsDir, k + ".cu"))), k);
        var headers = Directory.GetFiles(KernelsDir, "*.cuh").Select(Path.GetFileName).Order(StringComparer.Ordinal).ToList();
        Assert.That(headers, Does.Contain("common.cuh"));
        Assert.That(KernelSources.Headers.Keys, Is.EqualTo(headers));
        foreach (var h in headers)
            Assert.That(KernelSources.Headers[h!], Is.EqualTo(File.ReadAllText(Path.Combine(KernelsDir, h!))), h);
    }

    [Test]
    public void ParameterCount_ReadsTheDeclarationBehindAMacroBuiltName()
    {
        Assert.That(KernelSources.ParameterCount("attention_tc", "attention_prefill_tc128_bf16"), Is.EqualTo(11));
        Assert.That(KernelSources.ParameterCount("attention_tc", "attention_prefill_fa64_f16"), Is.EqualTo(11));
        Assert.That(KernelSources.ParameterCount("attention", "attention_prefill_f32"), Is.EqualTo(12));
        Assert.That(KernelSources.ParameterCount("gemv", "gemv_bf16_to_f32_u12"), Is.EqualTo(8));
        Assert.That(KernelSources.ParameterCount("gemv_fused", "gemv_qkv_f16_u16"), Is.EqualTo(11));
        Assert.That(KernelSources.ParameterCount("gemv_fused", "gemv_streamed_qkv_f16_u16"), Is.EqualTo(11));
        Assert.That(KernelSources.ParameterCount("masks", "gumbel_sigmoid"), Is.EqualTo(7));
        Assert.Throws<DispNativeException>(() => KernelSources.ParameterCount("attention", "attention_prefill_tc64_bf16"));
    }

    /// <summary>Kernel arguments are untyped at launch: a missing one shifts the rest and the kernel reads garbage. Every
    /// literal launch in the engine and tools must pass what the entry point declares (CudaDevice.Launch checks again at
    /// run time).</summary>
    [Test]
    public void EveryLaunch_PassesTheArgumentCountItsKernelDeclares()
    {
        int checkedCalls = 0, gemvCalls = 0, byRowCalls = 0;
        foreach (string dir in new[] { "src", "tools" })
        foreach (string file in Directory.EnumerateFiles(Path.Combine(TestAssets.RepoRoot, dir), "*.cs", SearchOption.AllDirectories))
        {
            if (file.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}")) continue;
            string text = File.ReadAllText(file);
            // LaunchGemv(NAME, rows, k, accumulated, arguments...) and LaunchPersistentGemv(NAME, rows, k, shared bytes,
            // blocks per SM, arguments...) launch NAME_uU of CudaDevice.GemvFile(NAME): every U declares the same.
            foreach (var (call, leading) in new[] { ("LaunchGemv", 4), ("LaunchPersistentGemv", 5) })
            for (int at = text.IndexOf(call + "($\"", StringComparison.Ordinal); at >= 0; at = text.IndexOf(call + "($\"", at + 1, StringComparison.Ordinal))
            {
                var args = SplitArguments(text, at + call.Length);
                string where = $"{Path.GetFileName(file)}: {call}({args[0]}, ...)";
                string name = System.Text.RegularExpressions.Regex.Replace(args[0].TrimStart('$').Trim('"'), @"\{[^}]*\}", "f32");
                string bf16Name = System.Text.RegularExpressions.Regex.Replace(args[0].TrimStart('$').Trim('"'), @"\{[^}]*\}", "bf16");
                foreach (int u in CudaDevice.GemvUnrolls)
                {
                    Assert.That(KernelSources.ParameterCount(CudaDevice.GemvFile(name), $"{name}_u{u}"), Is.EqualTo(args.Count - leading), $"{where}, unroll {u}");
                    if (CudaDevice.StreamedGemv(name) is { } streamed)   // launched streamed too (CudaDevice.StreamGemvs)
                        Assert.That(KernelSources.ParameterCount(CudaDevice.GemvFile(streamed), $"{streamed}_u{u}"), Is.EqualTo(args.Count - leading), $"{where}, streamed, unroll {u}");
                    // and in bf16, in rounds of loads inside one row (CudaDevice.StreamGemvsByRow)
                    if (CudaDevice.StreamedGemv(bf16Name) is { } s16 && CudaDevice.ByRowGemv(s16) is { } byRow)
                    {
                        Assert.That(KernelSources.ParameterCount(CudaDevice.GemvFile(byRow), $"{byRow}_u{u}"), Is.EqualTo(args.Count - leading), $"{where}, by row, unroll {u}");
                        byRowCalls++;
                    }
                }
                gemvCalls++;
            }
            foreach (string call in new[] { "Launch", "LaunchCooperative" })
            for (int at = text.IndexOf(call + "(\"", StringComparison.Ordinal); at >= 0; at = text.IndexOf(call + "(\"", at + 1, StringComparison.Ordinal))
            {
                var args = SplitArguments(text, at + call.Length);
                string kernel = args[0].Trim('"'), entry = args[1];
                if (!entry.StartsWith('"') && !entry.StartsWith("$\"")) continue;   // an entry name in a variable
                string where = $"{Path.GetFileName(file)}: {call}(\"{kernel}\", {entry}, ...)";
                // Fill each interpolation hole with a storage suffix, a head size or nothing (an optional part of the
                // name), whichever combination names an entry.
                string[] parts = System.Text.RegularExpressions.Regex.Split(entry.TrimStart('$').Trim('"'), @"\{[^}]*\}");
                string[] fillers = ["f32", "64", ""];
                int? expected = null;
                for (int combo = 0, combos = (int)Math.Pow(fillers.Length, parts.Length - 1); combo < combos && expected == null; combo++)
                {
                    var name = new System.Text.StringBuilder(parts[0]);
                    for (int h = 1, rest = combo; h < parts.Length; h++, rest /= fillers.Length) name.Append(fillers[rest % fillers.Length]).Append(parts[h]);
                    try { expected = KernelSources.ParameterCount(kernel, name.ToString()); } catch (DispNativeException) { }
                }
                Assert.That(expected, Is.Not.Null, $"{where}: no such entry point");
                Assert.That(args.Count - 5, Is.EqualTo(expected), where);   // kernel, entry, grid, block, shared bytes, then the arguments
                checkedCalls++;
            }
        }
        Assert.That(checkedCalls, Is.GreaterThan(30));
        Assert.That(gemvCalls, Is.EqualTo(6), "LaunchGemv and LaunchPersistentGemv calls found (pattern out of date?)");
        Assert.That(byRowCalls, Is.EqualTo(4 * CudaDevice.GemvUnrolls.Count), "by-row forms of the plain GEMV (to bf16 and to f32), q/k/v and gate/up");
    }

    /// <summary>Whether device function <paramref name="callee"/> of <paramref name="source"/> calls grid_dependency_wait():
    /// itself, through a Sync parameter whose default is it (DependencySync; a persistent kernel passes a grid barrier), or
    /// through a device function it calls (up to <paramref name="depth"/> calls down).</summary>
    private static bool Waits(string source, string callee, int depth)
    {
        var definition = System.Text.RegularExpressions.Regex.Match(source, $@"__device__\s+(?:__forceinline__\s+)?void\s+{callee}\s*\(");
        Assert.That(definition.Success, Is.True, $"the definition of {callee} was not found");
        int close = definition.Index + definition.Length - 1, parens = 0;   // the parameter list's ')' (its defaults may hold braces)
        do { parens += source[close] == '(' ? 1 : source[close] == ')' ? -1 : 0; close++; } while (parens > 0);
        int open = source.IndexOf('{', close), level = 0, end = open;
        do { level += source[end] == '{' ? 1 : source[end] == '}' ? -1 : 0; end++; } while (level > 0);
        string body = source[open..end];
        string declaration = source[(Math.Max(source.LastIndexOf('}', definition.Index), source.LastIndexOf(';', definition.Index)) + 1)..definition.Index];
        if (body.Contains("grid_dependency_wait();") || (body.Contains("sync.wait();") && declaration.Contains("typename Sync = DependencySync"))) return true;
        return depth > 0 && System.Text.RegularExpressions.Regex.Matches(body, @"\b(\w+)\s*<[^;(]*>\s*\(|\b(\w+)\s*\(")
            .Select(c => c.Groups[1].Success ? c.Groups[1].Value : c.Groups[2].Value).Distinct()
            .Where(f => f != callee && System.Text.RegularExpressions.Regex.IsMatch(source, $@"__device__\s+(?:__forceinline__\s+)?void\s+{f}\s*\("))
            .Any(f => Waits(source, f, depth - 1));
    }

    /// <summary>The top-level arguments of the call whose '(' is at <paramref name="open"/> (strings kept whole).</summary>
    private static List<string> SplitArguments(string text, int open)
    {
        var args = new List<string>();
        int depth = 0, start = open + 1;
        for (int i = open; i < text.Length; i++)
        {
            char c = text[i];
            if (c == '"')
            {
                for (i++; i < text.Length && text[i] != '"'; i++) if (text[i] == '\\') i++;
                continue;
            }
            if (c is '(' or '[' or '{') depth++;
            else if (c is ')' or ']' or '}')
            {
                if (--depth == 0) { args.Add(text[start..i].Trim()); return args; }
            }
            else if (c == ',' && depth == 1) { args.Add(text[start..i].Trim()); start = i + 1; }
        }
        throw new FormatException("unbalanced call");
    }

    /// <summary>A kernel that CudaDevice launches programmatically in decode must wait for the previous kernel before it
    /// reads that kernel's output: the device function each such entry point calls has to call grid_dependency_wait().
    /// (A kernel without the wait would read stale data on an H100 only; the emulator runs launches in order.)</summary>
    [Test]
    public void EveryProgrammaticallyLaunchedKernel_WaitsForItsGridDependency()
    {
        var entry = new System.Text.RegularExpressions.Regex(@"extern ""C"" __global__(?:\s+__launch_bounds__\([^)]*\))?\s+void\s+([\w#]+)\([^)]*\)\s*\\?\s*\{\s*(\w+)\s*[<(]");
        int programmatic = 0;
        string headers = string.Concat(KernelSources.Headers.Values);
        foreach (var kernel in KernelSources.KernelNames)
        {
            string source = KernelSources.Source(kernel) + headers;   // the device function may be in a header
            foreach (System.Text.RegularExpressions.Match m in entry.Matches(KernelSources.Source(kernel)))
            {
                if (!CudaDevice.WaitsForGridDependency(m.Groups[1].Value)) continue;
                programmatic++;
                string callee = m.Groups[2].Value;
                Assert.That(Waits(source, callee, 2), $"{kernel}.cu: {callee} (entry {m.Groups[1].Value}) never waits");
            }
        }
        Assert.That(programmatic, Is.GreaterThanOrEqualTo(8), "the programmatic entry points were not found (pattern out of date?)");
    }

    [Test]
    public void EveryEntryPointTheEngineLaunches_IsDefinedInItsKernelFile()
    {
        // Entry points are literal or built as NAME_{f32,bf16,f16} by FOR_EACH_STORAGE; check the base names.
        string[] expected =
        [
            "convert:convert_f32_to_##S", "embedding:embedding_##S", "rope:rope_##S", "norm:rmsnorm_gather_##S", "norm:layernorm_gather_##S",
            "residual:index_add_##S", "residual:add_bias_##S", "activations:silu_mul_##S", "activations:silu_mul_fast_##S", "activations:gelu_##S",
            "attention:attention_prefill_##S", "attention_decode:attention_decode_split_##S", "attention_decode:attention_decode_split8_##S", "attention_decode:attention_decode_split_rescale##N##_##S", "attention_decode:attention_decode_combine_##S", "attention_decode:attention_decode_naive_##S", "rope:rope_kv_append_##S", "attention_tc:attention_prefill_tc##D##_##S", "attention_tc:attention_prefill_fa##D##_##S", "cross_entropy:cross_entropy_f32",
            "masks:gumbel_sigmoid", "masks:gumbel_sigmoid_backward", "masks:gumbel_noise", "masks:mask_columns_grad_##S", "masks:scale_columns_##NAME",
            "masks:add_scaled_columns_f32", "init:fill_constant_##S", "init:fill_normal_##S", "init:read_through", "norm:rmsnorm_backward_##S",
            "attention:attention_backward_dq_##S", "attention:attention_backward_dkv_##S", "gemv:gemv_##S##_to_##O##_u##U", "gemv_fused:gemv_qkv_##S##_u##U", "gemv_fused:gemv_swiglu_##S##_u##U",
            "gemv_norm:gemv_norm_qkv_##S##_u##U", "gemv_norm:gemv_norm_swiglu_##S##_u##U", "decode_step:decode_layers_##S##_u##U",
            "norm:add_rmsnorm_gather_##S", "norm:rmsnorm_masked_##S", "norm:add_masked_rmsnorm_##S", "residual:index_add_staged_##S", "rope:rope_f32_to_##S",
            "masks:mask_columns_grad_tiled_##S", "masks:mask_grad_scale_##NAME", "masks:swiglu_mask_backward_##S", "masks:silu_mul_masked_##S",
        ];
        foreach (var e in expected)
        {
            var (file, entry) = (e.Split(':')[0], e.Split(':')[1]);
            Assert.That(KernelSources.Source(file), Does.Contain($"void {entry}("), e);
        }
    }

    /// <summary>The split-KV decode's entry is chosen by its settings (CudaDevice.DecodeAttentionWarps and
    /// DecodeAttentionRescaleKeys), not named literally at its launch: every combination the settings allow is built,
    /// with the default entry's parameters, and the others are refused by name.</summary>
    [Test]
    public void EverySplitKvDecodeSetting_HasItsEntryPoint()
    {
        int parameters = KernelSources.ParameterCount("attention_decode", "attention_decode_split_f32");
        string source = KernelSources.Source("attention_decode");
        var built = new List<string>();
        foreach (int warps in new[] { CudaOps.DecodeWarps, 2 * CudaOps.DecodeWarps })
        foreach (int keys in CudaOps.DecodeRescaleKeysBuilt)
        {
            if (warps != CudaOps.DecodeWarps && keys != CudaOps.DecodeRescaleKeys)
            {
                Assert.That(() => CudaOps.DecodeEntry(warps, keys, "bf16"), Throws.TypeOf<DispNativeException>().With.Message.Contain($"{warps} warps"));
                continue;
            }
            string entry = CudaOps.DecodeEntry(warps, keys, "bf16");
            Assert.That(KernelSources.ParameterCount("attention_decode", entry), Is.EqualTo(parameters), entry);
            if (keys != CudaOps.DecodeRescaleKeys)
                Assert.That(source, Does.Contain($"ATTENTION_DECODE_RESCALE(T, S, {keys})"), $"{entry} is not instantiated");
            built.Add(entry);
        }
        Assert.That(built, Is.Unique);
        Assert.That(built, Has.Count.EqualTo(CudaOps.DecodeRescaleKeysBuilt.Count + 1));
        Assert.That(KernelSources.Source("attention_decode.cuh"), Does.Contain($"#define RESCALE_KEYS {CudaOps.DecodeRescaleKeys} "), "the host's default is the kernel's");
    }

    /// <summary>CudaLlama writes the persistent decode kernel's layer table as decode_step.cu's DecodeLayer reads it: as
    /// many 8-byte fields, pointers first.</summary>
    [Test]
    public void PersistentDecodeLayerTable_HasTheKernelsFields()
    {
        string source = KernelSources.Source("decode_step");
        var body = System.Text.RegularExpressions.Regex.Match(source, @"struct DecodeLayer\s*\{([^}]*)\}");
        Assert.That(body.Success, "struct DecodeLayer not found in decode_step.cu");
        var declarations = body.Groups[1].Value.Split(';', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        int pointers = 0, widths = 0;
        foreach (var d in declarations)
        {
            int names = d.Count(c => c == ',') + 1;
            if (d.Contains('*')) { Assert.That(names, Is.EqualTo(1), $"one pointer per declaration: {d}"); pointers++; }
            else { Assert.That(d, Does.StartWith("long long "), d); widths += names; }
        }
        Assert.That((pointers, widths), Is.EqualTo((15, 9)));
        Assert.That(pointers + widths, Is.EqualTo(CudaLlama.DecodeLayerFields));
    }

    [Test]
    public void PrunedWidths_ArePaddedToTheModelsMultiple()
    {
        Assert.That(new[] { CudaOps.Padded(2651), CudaOps.Padded(2656), CudaOps.Padded(1) }, Is.EqualTo(new[] { 2656, 2656, 8 }));
        Assert.That(new[] { CudaOps.Padded(2651, 64), CudaOps.Padded(7155, 128), CudaOps.Padded(58, 128) }, Is.EqualTo(new[] { 2688, 7168, 128 }));
        Assert.That(new[] { 8, 16, 64, 256 }.All(CudaOps.ValidPadding), Is.True);
        Assert.That(new[] { 0, 4, 12, 48, 512, -8 }.Any(CudaOps.ValidPadding), Is.False);
        // The default: 64 at the 7B shape, smaller where 64 would be above 1/32 of the narrower full width, never below 8.
        int Default(int hidden, int mlp) => CudaOps.DefaultPadding(TestAssets.TinyConfig() with { HiddenSize = hidden, IntermediateSize = mlp });
        Assert.That(new[] { Default(4096, 11008), Default(2048, 5632), Default(512, 1376), Default(1024, 256), Default(96, 256) },
            Is.EqualTo(new[] { 64, 64, 16, 8, 8 }));
    }

    [TestCase("sm_90", "attention_wgmma", 13, "sm_90a")]
    [TestCase("sm_90", "attention_wgmma", 12, "sm_90a")]
    [TestCase("sm_90", "attention_wgmma", 11, "sm_90")]   // NVRTC 11.x knows no sm_90a
    [TestCase("sm_90", "attention_tc", 13, "sm_90")]
    [TestCase("sm_80", "attention_wgmma", 13, "sm_80")]
    [TestCase("sm_89", "attention_wgmma", 13, "sm_89")]
    public void OnlyAttentionWgmma_IsBuiltForSm90a_OnSm90WithNvrtc12OrLater(string arch, string kernel, int nvrtcMajor, string target) =>
        Assert.That(KernelCompiler.Target(arch, kernel, nvrtcMajor), Is.EqualTo(target));

    [Test]
    public void CacheKey_ChangesWithSourceOptionsArchitectureAndCompilerVersion()
    {
        string k = KernelCompiler.Key("src", "hdr", ["-arch=sm_90"], "sm_90", "13.0");
        Assert.That(KernelCompiler.Key("src", "hdr", ["-arch=sm_90"], "sm_90", "13.0"), Is.EqualTo(k));
        Assert.That(KernelCompiler.Key("src2", "hdr", ["-arch=sm_90"], "sm_90", "13.0"), Is.Not.EqualTo(k));
        Assert.That(KernelCompiler.Key("src", "hdr2", ["-arch=sm_90"], "sm_90", "13.0"), Is.Not.EqualTo(k));
        Assert.That(KernelCompiler.Key("src", "hdr", ["-arch=sm_90", "-lineinfo"], "sm_90", "13.0"), Is.Not.EqualTo(k));
        Assert.That(KernelCompiler.Key("src", "hdr", ["-arch=sm_90"], "sm_80", "13.0"), Is.Not.EqualTo(k));
        Assert.That(KernelCompiler.Key("src", "hdr", ["-arch=sm_90"], "sm_90", "12.8"), Is.Not.EqualTo(k));
    }

    [Test]
    public void UnknownKernel_NamesTheOnesThatExist()
        => Assert.That(Assert.Throws<DispNativeException>(() => KernelSources.Source("nope"))!.Message, Does.Contain("norm"));
}

/// <summary>NVRTC needs no GPU: where the library exists, every kernel must compile for Hopper and Ampere and the
/// CUBIN cache must serve the second request.</summary>
public class NvrtcTests
{
    [SetUp]
    public void RequireNvrtc()
    {
        if (!Nvrtc.IsAvailable(out string reason)) Assert.Ignore($"NVRTC not available: {reason}");
    }

    /// <summary>The kernel cache through a fresh build for sm_90. (Every file builds for sm_80 too: the spill check
    /// below compiles each for sm_80 and sm_90 with the engine's options, a failure thrown.)</summary>
    [TestCase("sm_90")]
    public void EveryKernel_Compiles_AndTheSecondRequestIsACacheHit(string arch)
    {
        var dir = TestAssets.TempDir();
        var compiler = new KernelCompiler(arch, dir);
        int n = KernelSources.KernelNames.Count();
        var build = compiler.CompileAll(parallelism: 3);   // several at once, as selftest and KernelBench do
        Assert.That((build.Files, build.Compiled, build.FromCache, build.Failed.Count), Is.EqualTo((n, n, 0, 0)), build.ToString());
        Assert.That((compiler.Compiled, compiler.CacheHits), Is.EqualTo((n, 0)));
        var again = new KernelCompiler(arch, dir);
        foreach (var k in KernelSources.KernelNames)
        {
            var cubin = again.Cubin(k);
            Assert.That(cubin.AsSpan(0, 4).ToArray(), Is.EqualTo(new byte[] { 0x7f, (byte)'E', (byte)'L', (byte)'F' }), $"{k}: not an ELF CUBIN");
        }
        Assert.That((again.Compiled, again.CacheHits), Is.EqualTo((0, n)));
        Assert.That(again.CompileAll().ToString(), Does.StartWith($"{n} kernel files ready in").And.Contain($"(0 compiled, {n} from the cache)"));
        // An empty cache entry (a write cut short) is compiled again and replaced.
        string norm = Directory.GetFiles(dir, "norm-*.cubin").Single();
        var compiled = File.ReadAllBytes(norm);
        File.WriteAllBytes(norm, []);
        var third = new KernelCompiler(arch, dir);
        Assert.That(third.Cubin("norm"), Is.EqualTo(compiled));
        Assert.That((third.Compiled, third.CacheHits, new FileInfo(norm).Length > 0), Is.EqualTo((1, 0, true)));
    }

    /// <summary>The largest block a kernel may be launched with (CudaOps): 128 threads for the tensor-core prefill and
    /// the decode attention, which hold tiles in registers; the GEMV kernels' and the persistent decode step's 256 (their
    /// deeper unrolls hold up to 16 loads of 16 bytes per lane); any size up to 1024 for the rest.</summary>
    private static int MaxBlockThreads(string entry) =>
        entry.StartsWith("attention_prefill_tc") || entry.StartsWith("attention_prefill_fa") || entry.StartsWith("attention_prefill_wgmma")
            || entry.StartsWith("attention_decode") ? 128
        : entry.StartsWith("gemv_") || entry.StartsWith("decode_layers_") ? CudaDevice.GemvWarps * 32 : 1024;

    /// <summary>The warpgroup-MMA prefill (attention_wgmma) is built for sm_90a (wgmma exists nowhere else) and none of its
    /// wgmma is serialized: ptxas serializes every wgmma of a kernel (its "Potential Performance Loss" C7513/C7515)
    /// when other instructions may write a wgmma's registers while it is in flight, as a P·V left running across the
    /// key loop's back edge did. Needs NVRTC 12+ (11.x knows no sm_90a).</summary>
    [Test]
    public void TheWarpgroupMmaPrefill_BuildsForSm90a_WithNoWgmmaSerialized()
    {
        if (Nvrtc.Version.Major == 99) Assert.Ignore("the CUDA emulator's NVRTC runs no ptxas");
        var compiler = new KernelCompiler("sm_90", TestAssets.TempDir());
        if (compiler.ArchitectureFor("attention_wgmma") != "sm_90a") Assert.Ignore($"NVRTC {Nvrtc.Version} does not target sm_90a (12.0 and later do)");
        Assert.That(compiler.ArchitectureFor("attention_tc"), Is.EqualTo("sm_90"));
        Nvrtc.CompileToCubin(KernelSources.Source("attention_wgmma"), "attention_wgmma.cu", KernelSources.Headers,
            compiler.OptionsFor("attention_wgmma").Append("--ptxas-options=-v").ToList(), out string log);
        foreach (var entry in new[] { "attention_prefill_wgmma128_bf16", "attention_prefill_wgmma64_f16" })
            Assert.That(log, Does.Contain($"Compiling entry function '{entry}' for 'sm_90a'"));
        Assert.That(log, Does.Not.Contain("instructions are serialized"), log);
    }

    /// <summary>A spill turns register traffic into local-memory traffic inside the hot loops (the tensor-core attention
    /// sits at 238 of 255 registers). And a block whose threads need more than the SM's 65,536 registers does not
    /// launch at all (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES), which only a GPU would show. ptxas's report through the
    /// NVRTC found here; the emulator's has none.</summary>
    [TestCase("sm_90")]
    [TestCase("sm_80")]
    public void NoKernelSpillsRegisters_OrNeedsMoreThanTheSmHasForItsLargestBlock(string arch)
    {
        if (Nvrtc.Version.Major == 99) Assert.Ignore("the CUDA emulator's NVRTC runs no ptxas");
        var headers = KernelSources.Headers;
        var compiler = new KernelCompiler(arch, TestAssets.TempDir());   // each file for the target the engine builds it for
        int entries = 0;
        var logs = new System.Collections.Concurrent.ConcurrentDictionary<string, string>();
        KernelCompiler.ForEachKernel(KernelSources.KernelNames, 0, k =>
        {
            Nvrtc.CompileToCubin(KernelSources.Source(k), k + ".cu", headers, compiler.OptionsFor(k).Append("--ptxas-options=-v").ToList(), out string log);
            logs[k] = log;
        });
        foreach (var k in KernelSources.KernelNames)
        {
            string log = logs[k];
            string? entry = null;
            foreach (var line in log.Split('\n'))
            {
                var name = System.Text.RegularExpressions.Regex.Match(line, "Compiling entry function '(\\w+)'");
                if (name.Success) { entry = name.Groups[1].Value; entries++; continue; }
                var spill = System.Text.RegularExpressions.Regex.Match(line, "(\\d+) bytes spill stores");
                if (spill.Success && !entry!.Contains("_occupancy_"))   // KernelBench's 32-register builds may spill: what they measure
                    Assert.That(int.Parse(spill.Groups[1].Value), Is.Zero, $"{k}.cu: {entry} spills on {arch}");
                var used = System.Text.RegularExpressions.Regex.Match(line, "Used (\\d+) registers");
                if (used.Success)
                    Assert.That(int.Parse(used.Groups[1].Value) * MaxBlockThreads(entry!), Is.LessThanOrEqualTo(65536),
                        $"{k}.cu: {entry} on {arch}: {used.Groups[1].Value} registers per thread for blocks of {MaxBlockThreads(entry!)} threads");
            }
        }
        Assert.That(entries, Is.GreaterThan(50), "ptxas reported on too few entry points");
    }

    /// <summary>Every entry point's PTX for sm_90 with the engine's options: (file, entry, body), compiled once.</summary>
    private static readonly Lazy<List<(string File, string Entry, string Body)>> EntryPtx = new(() =>
    {
        var options = new KernelCompiler("compute_90", TestAssets.TempDir()).Options;   // the engine's, for the virtual architecture
        var ptxs = new System.Collections.Concurrent.ConcurrentDictionary<string, string>();
        KernelCompiler.ForEachKernel(KernelSources.KernelNames, 0,
            k => ptxs[k] = Nvrtc.CompileToPtx(KernelSources.Source(k), k + ".cu", KernelSources.Headers, options, out _));
        var entries = new List<(string, string, string)>();
        foreach (var k in KernelSources.KernelNames)
        {
            string ptx = ptxs[k];
            foreach (System.Text.RegularExpressions.Match entry in System.Text.RegularExpressions.Regex.Matches(ptx, @"\.entry (\w+)\("))
                entries.Add((k, entry.Groups[1].Value, ptx[entry.Index..ptx.IndexOf("\n}", entry.Index, StringComparison.Ordinal)]));
        }
        return entries;
    });

    private static void RequirePtx()
    {
        if (Nvrtc.Version.Major == 99 || !Nvrtc.HasPtx) Assert.Ignore("the CUDA emulator's NVRTC gives no PTX");
    }

    /// <summary>Loads issued before a kernel's grid-dependency wait stream while the previous kernel finishes, unless
    /// they are non-coherent (ld.global.nc, what loads through a const __restrict__ pointer may become): ptxas 11.8 moved
    /// gemv_swiglu's 16 such weight loads after the wait and issued them one at a time (its SASS, cuobjdump). Checked on
    /// the PTX: no entry point loads through .nc before its wait, but from the CUDA math library's constant tables
    /// (sincosf's range reduction for large arguments, in the decode attention's RoPE angles).</summary>
    [Test]
    public void NoKernelLoadsNonCoherentlyBeforeItsDependencyWait()
    {
        RequirePtx();
        int waits = 0;
        foreach (var (file, entry, body) in EntryPtx.Value)
        {
            int wait = body.IndexOf("griddepcontrol.wait", StringComparison.Ordinal);
            if (wait < 0) continue;
            waits++;
            int nc = NonCoherentLoadsOfItsOwn(body[..wait]).Count;
            Assert.That(nc, Is.Zero, $"{file}.cu: {entry} loads {nc} values through ld.global.nc before its grid-dependency wait");
        }
        Assert.That(waits, Is.GreaterThan(50), "too few entry points wait for the previous kernel: the PTX was not searched");
    }

    /// <summary>The ld.global.nc instructions of a PTX body but those whose address is a CUDA math library table
    /// (<c>mov.u64 %rdB, __cudart_…</c>, then <c>add.s64 %rdA, %rdB, %rdC</c> or %rdB itself).</summary>
    private static List<string> NonCoherentLoadsOfItsOwn(string ptx)
    {
        static System.Text.RegularExpressions.MatchCollection Matches(string text, string pattern) => System.Text.RegularExpressions.Regex.Matches(text, pattern);
        var tables = Matches(ptx, @"mov\.u64\s+(%rd\d+),\s*__cudart_\w+").Select(m => m.Groups[1].Value).ToHashSet();
        foreach (System.Text.RegularExpressions.Match add in Matches(ptx, @"add\.s64\s+(%rd\d+),\s*(%rd\d+),\s*(%rd\d+)"))
            if (tables.Contains(add.Groups[2].Value) || tables.Contains(add.Groups[3].Value)) tables.Add(add.Groups[1].Value);
        return Matches(ptx, @"ld\.global\.nc[^\n]*\[(%rd\d+)[^\]]*\]").Where(m => !tables.Contains(m.Groups[1].Value)).Select(m => m.Value).ToList();
    }

    /// <summary>The persistent decode kernel reads, after a grid barrier, what other blocks wrote in an earlier phase of
    /// the same launch. A non-coherent load (ld.global.nc: the read-only path, which a const __restrict__ pointer invites)
    /// may return what that SM cached before, and nothing but a GPU would show it (the emulator has no such cache). So
    /// its only .nc loads are of the CUDA math library's constant tables (sinf/cosf's range reduction).</summary>
    [Test]
    public void ThePersistentDecodeKernel_LoadsNothingOfItsOwnNonCoherently()
    {
        RequirePtx();
        var kernels = EntryPtx.Value.Where(e => e.Entry.StartsWith("decode_layers_")).ToList();
        Assert.That(kernels, Has.Count.EqualTo(2 * CudaLlama.PersistentDecodeUnrolls.Count), "decode_layers_{f32,bf16}_u* entry points");
        foreach (var (file, entry, body) in kernels)
        {
            Assert.That(System.Text.RegularExpressions.Regex.Matches(body, "__cudart_").Count, Is.GreaterThan(0), $"{entry}: no math table: the filter below is not exercised");
            Assert.That(NonCoherentLoadsOfItsOwn(body), Is.Empty, $"{file}.cu: {entry} loads through ld.global.nc");
        }
    }

    /// <summary>Threads asking for one file at once (a model's upload launching a kernel while its files build in the
    /// background) share one compile: the same CUBIN, compiled once.</summary>
    [Test]
    public void ConcurrentRequestsForOneFile_CompileItOnce()
    {
        var compiler = new KernelCompiler("sm_90", TestAssets.TempDir());
        using var start = new Barrier(4);
        var cubins = new byte[4][];
        Parallel.For(0, 4, new ParallelOptions { MaxDegreeOfParallelism = 4 }, i => { start.SignalAndWait(); cubins[i] = compiler.Cubin("norm"); });
        Assert.That(compiler.Compiled, Is.EqualTo(1));
        Assert.That(cubins.Skip(1), Has.All.EqualTo(cubins[0]));
    }

    /// <summary>CompileAll reports a kernel it cannot build by name and carries on with the others.</summary>
    [Test]
    public void CompileAll_ReportsAFailureByName_AndBuildsTheRest()
    {
        var build = new KernelCompiler("sm_90", TestAssets.TempDir()).CompileAll(["norm", "nope"]);
        Assert.That((build.Compiled, build.Failed.Count, build.Failed[0].Key), Is.EqualTo((1, 1, "nope")));
        Assert.That(build.Failed[0].Value, Does.Contain("no kernel source 'nope.cu'"));
        Assert.That(build.ToString(), Does.Contain("1 failed: nope"));
    }

    [Test]
    public void CompileError_ReportsFileAndLine()
    {
        var e = Assert.Throws<NvrtcCompileException>(() => Nvrtc.CompileToCubin(
            "extern \"C\" __global__ void k(float* x)\n{\n    x[0] = undefined_name;\n}\n", "broken.cu",
            new Dictionary<string, string>(), ["-arch=sm_90"], out _))!;
        Assert.That(e.Message, Does.Contain("broken.cu(3)").And.Contain("undefined_name"));
    }
}

/// <summary>The GPU self-checks (kernels vs their CPU twins, GEMMs, forward vs the CPU model), one test each.
/// Skipped with the reason where no CUDA device can be opened.</summary>
[NonParallelizable]
public class CudaSelfTests
{
    private static CudaDevice? _device;

    public static IEnumerable<TestCaseData> Cases() =>
        SelfTest.Checks(TestAssets.TryShared("models/ref-llama-25m")).Select(c => new TestCaseData(c.Name).SetName(c.Name));

    [OneTimeSetUp]
    public void Open()
    {
        if (CudaDevice.Unavailable() == null) _device = CudaDevice.Open();
    }

    [OneTimeTearDown]
    public void Close() => _device?.Dispose();

    [TestCaseSource(nameof(Cases))]
    public void Check(string name)
    {
        if (_device == null) Assert.Ignore($"no CUDA device: {CudaDevice.Unavailable()}");
        var check = SelfTest.Checks(TestAssets.TryShared("models/ref-llama-25m")).Single(c => c.Name == name);
        var r = SelfTest.Run(_device, [check]).Single();
        Assert.That(r.Passed, r.Detail);
    }
}

public class DeviceSelectionTests
{
    [Test]
    public void Cuda_WithoutAUsableDevice_SaysWhy_AndAutoFallsBackToCpu()
    {
        if (CudaDevice.Unavailable() == null) Assert.Ignore("a CUDA device is present");
        var e = Assert.Throws<DispNativeException>(() => Devices.Resolve("cuda"))!;
        Assert.That(e.Message, Does.StartWith("--device cuda: ").And.Contain(CudaDevice.Unavailable()!));
        Assert.That(Devices.Resolve("auto"), Is.EqualTo("cpu"));
    }

    [Test]
    public void OnCuda_ACheckpointIsStreamedToTheGpu_WithoutAHostCopy()
    {
        if (CudaDevice.Unavailable() is string reason) Assert.Ignore($"no CUDA device: {reason}");
        var dir = TestAssets.WriteTinyModel();
        using var m = Devices.Load(dir, null, "cuda");
        Assert.That(m.Runner, Is.InstanceOf<CudaLlama>());
        Assert.That(Assert.Throws<InvalidOperationException>(() => _ = m.Model)!.Message, Does.Contain("was streamed to the GPU"));
        int[] ids = [1, 40, 41, 42];
        var want = Engine.Models.ModelLoader.Load(dir).Model.Logits(ids);
        var got = m.Runner.Logits(ids);
        float scale = want.Max(Math.Abs), worst = want.Zip(got).Max(p => Math.Abs(p.First - p.Second));
        Assert.That(worst, Is.LessThan(2e-2f * scale), "bf16 storage against the f32 CPU model");

        m.Dispose();
        Assert.Throws<ObjectDisposedException>(() => m.Runner.Logits(ids), "a forward on freed device memory");
    }

    /// <summary>ForwardLast (one logits buffer for a whole decode) writes exactly what Forward returns for the last row:
    /// the prompt, then decode steps through CUDA graphs and eagerly; a buffer of the wrong size is refused.</summary>
    [Test]
    public void OnCuda_ForwardLast_WritesWhatForwardReturns_ThroughGraphsAndEagerly()
    {
        if (CudaDevice.Unavailable() is string reason) Assert.Ignore($"no CUDA device: {reason}");
        using var m = Devices.Load(TestAssets.WriteTinyModel(), null, "cuda");
        var gpu = (CudaLlama)m.Runner;
        int vocab = gpu.Config.VocabSize;
        foreach (bool graphs in new[] { true, false })
        {
            gpu.UseCudaGraphs = graphs;
            using var forwardCache = gpu.NewCache(16);
            using var lastCache = gpu.NewCache(16);
            var buffer = new float[vocab];
            int[] prompt = [1, 40, 41, 42];
            gpu.ForwardLast(prompt, lastCache, buffer);
            Assert.That(buffer, Is.EqualTo(gpu.Forward(prompt, forwardCache, lastOnly: true)), $"graphs {graphs}: the prompt");
            foreach (int t in new[] { 7, 8, 9 })
            {
                ((Engine.Inference.ICausalLanguageModel)gpu).ForwardLast([t], lastCache, buffer);
                Assert.That(buffer, Is.EqualTo(gpu.Forward([t], forwardCache, lastOnly: true)), $"graphs {graphs}: token {t}");
            }
            Assert.That(Assert.Throws<ArgumentException>(() => gpu.ForwardLast([3], lastCache, new float[vocab - 1]))!.Message,
                Does.Contain($"not the vocabulary's {vocab}"));
        }
    }

    /// <summary>Loading in f16 a model with a weight beyond f16's range stops at that weight, naming it, instead of
    /// storing an infinity that turns every logit into NaN.</summary>
    [Test]
    public void OnCuda_AWeightBeyondF16_IsRefusedAtLoad_NamingIt()
    {
        if (CudaDevice.Unavailable() is string reason) Assert.Ignore($"no CUDA device: {reason}");
        var dir = TestAssets.WriteTinyModel(edit: w => w.Layers[1].WDown[7] = 1e5f);
        var e = Assert.Throws<InvalidSettingException>(() => Devices.Load(dir, null, "cuda", Engine.IO.DType.F16).Dispose())!;
        Assert.That(e.Message, Does.StartWith("model.layers.1.mlp.down_proj.weight: element 7 = 100000 does not fit in F16"));
        using var m = Devices.Load(dir, null, "cuda", Engine.IO.DType.BF16);
        Assert.That(m.Runner.Logits([1, 40]).All(float.IsFinite));
    }

    [Test]
    public void DTypes_AreValidated_AndTheCpuRefusesNarrowStorage()
    {
        Assert.That(Devices.ParseDType("auto"), Is.Null);
        Assert.That((Devices.ParseDType("bf16"), Devices.ParseDType("f16"), Devices.ParseDType("f32")),
            Is.EqualTo(((Engine.IO.DType?)Engine.IO.DType.BF16, (Engine.IO.DType?)Engine.IO.DType.F16, (Engine.IO.DType?)Engine.IO.DType.F32)));
        Assert.That(Assert.Throws<InvalidSettingException>(() => Devices.ParseDType("fp8"))!.Message, Does.Contain("'fp8'"));
        var dir = TestAssets.WriteTinyModel();
        foreach (var narrow in new[] { Engine.IO.DType.BF16, Engine.IO.DType.F16 })
            Assert.That(Assert.Throws<InvalidSettingException>(() => Devices.Load(dir, null, "cpu", narrow))!.Message, Does.Contain("computes in f32"));
        using var m = Devices.Load(dir, null, "cpu");
        Assert.That(m.Runner, Is.SameAs(m.Model));
        using var lm = Devices.MaskedModel(m);
        Assert.That(lm, Is.InstanceOf<Engine.Disp.CpuMaskedLanguageModel>());
    }
}
