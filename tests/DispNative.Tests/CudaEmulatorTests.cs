using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json.Nodes;

namespace DispNative.Tests;

/// <summary>The CUDA backend's self-test (every kernel, GEMM, graph, forward and training step against the CPU
/// reference) run in a child process on the CUDA emulator of <c>tools/emulate/cuda</c>: the real kernel sources and
/// the engine's real driver, NVRTC and cuBLASLt calls, executed on the CPU; and the GPU benchmarks at their smoke
/// shape. Skipped where the emulator cannot be built (it needs x86-64 Linux and g++). Each test is a child process
/// (but one, which runs the CPU job in process beside its child) on one core: they run side by side, as many at once
/// as NUnit has workers (one per core).</summary>
[Parallelizable(ParallelScope.Children)]
public class CudaEmulatorTests
{
    private string? _library, _kernelCache, _skip;

    [OneTimeSetUp]
    public void Build()
    {
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64)
        {
            _skip = "the CUDA emulator runs on x86-64 Linux only";
            return;
        }
        var dir = TestAssets.TempDir();
        var (code, stdout, stderr) = Exec("bash", [Path.Combine(TestAssets.RepoRoot, "tools", "emulate", "cuda", "build.sh"), dir], null);
        string output = stdout + stderr;
        if (code != 0)
        {
            if (output.Contains("g++") && (output.Contains("not found") || output.Contains("No such file"))) { _skip = $"no g++ to build the CUDA emulator: {output.Trim()}"; return; }
            Assert.Fail($"tools/emulate/cuda/build.sh failed:\n{output}");
        }
        _library = Path.Combine(dir, "libcudaemu.so");
        _kernelCache = Path.Combine(dir, "kernels");
    }

    [TestCase("forward")]
    [TestCase("reverse")]
    public void SelfTest_OnTheEmulator_PassesEveryCheck(string threadOrder)
    {
        var args = new List<string> { "DispNative.dll", "selftest" };
        if (TestAssets.TryShared("models/ref-llama-25m") is string refLlama) args.AddRange(["--reference-model", refLlama]);
        var (code, stdout, stderr) = OnTheEmulator(args, threadOrder);
        string output = stdout + stderr;
        Assert.That(stdout, Does.Contain("device: DispNative CUDA emulator (CPU)"), output);
        var summary = stdout.TrimEnd().Split('\n')[^1];
        Assert.That(summary, Does.Match(@"^\d+ passed, 0 failed$"), output);
        Assert.That(int.Parse(summary.Split(' ')[0]), Is.GreaterThanOrEqualTo(50), "the self-test ran fewer checks than it has");
        Assert.That(code, Is.Zero, output);
    }

    /// <summary>The emulator's own checks (tools/emulate/cuda/emu_selftest.cpp): misaligned vector loads and cp.async,
    /// a missing barrier, a barrier/shuffle deadlock, an out-of-bounds write, shared memory left by an earlier block and
    /// pinned-memory copies that land only at a synchronization are reported as a GPU would, and their correct twins
    /// pass; a grid barrier completes only in a cooperative launch; a wgmma reads its swizzled operand as the PTX ISA
    /// describes, and one that not all four warps of the warpgroup issue fails. Without them the self-test above could pass for the
    /// wrong reason.</summary>
    [TestCase("forward")]
    [TestCase("reverse")]
    public void TheEmulator_ReportsWhatAGpuWould(string threadOrder)
    {
        if (_skip != null) Assert.Ignore(_skip);
        var env = new Dictionary<string, string> { ["DISPNATIVE_EMU_SCHEDULE"] = threadOrder };
        var (code, stdout, stderr) = Exec(Path.Combine(Path.GetDirectoryName(_library)!, "emu_selftest"), [_library!], env);
        Assert.That(stdout.TrimEnd().Split('\n')[^1], Is.EqualTo("21 passed, 0 failed"), stdout + stderr);
        Assert.That(code, Is.Zero, stdout + stderr);
    }

    /// <summary>The GPU benchmarks' code (not their timings) at the small shape: every kernel, GEMM, CUDA graph and
    /// training step they time runs to the end, and the acceptance-target lines they print are there, as are the
    /// warpgroup-MMA attention's lines, which come last (the emulator is an sm_90 device).</summary>
    [TestCase("gpu", "issue 3: prefill attention >= 40% of same-FLOP cuBLASLt GEMMs", "attention prefill bf16 warpgroup MMA (wgmma, sm_90a), 128 rows/block")]
    [TestCase("infer", "issue 5: pruned decode >= 1.7x dense (the fastest form of each)", "issue 5: pruned prefill >= 1.6x dense, Wgmma2Warpgroups")]
    [TestCase("train", "issue 4: activations kept: peak < 25 GiB")]
    public void KernelBench_Smoke_RunsOnTheEmulator(string bench, params string[] lines)
    {
        var (code, stdout, stderr) = OnTheEmulator(["DispNative.KernelBench.dll", bench, "--smoke"], "forward");
        Assert.That(code, Is.Zero, stdout + stderr);
        Assert.That(stdout, Does.Not.Contain("out of memory"), stdout + stderr);
        foreach (var line in lines) Assert.That(stdout, Does.Contain(line), stdout + stderr);
    }

    /// <summary>A device with too little memory (the emulator's cap), short at the first allocation (the GEMM
    /// workspace) or midway (weights and workspaces placed, then the cache or activations): each verb ends with one
    /// "out of device memory" line and exit code 1, no stack trace.</summary>
    [TestCase("eval", 1_000_000)]
    [TestCase("eval", 33_650_000)]
    [TestCase("generate", 33_650_000)]
    [TestCase("train", 33_650_000)]
    public void OutOfDeviceMemory_EndsWithOneClearLine(string verb, long deviceBytes)
    {
        var dir = TestAssets.WriteTinyModel();
        var text = Path.Combine(TestAssets.TempDir(), "t.txt");
        File.WriteAllText(text, string.Concat(Enumerable.Repeat("the cat sat in the sun. ", 40)));
        List<string> args = verb switch
        {
            "eval" => ["DispNative.dll", "eval", "--model", dir, "--text", text, "--block-size", "128", "--device", "cuda"],
            "generate" => ["DispNative.dll", "generate", "--model", dir, "--prompt", "the cat", "--max-new-tokens", "8", "--device", "cuda"],
            _ => ["DispNative.dll", "train", "--model", dir, "--calibration", text, "--prune-ratio", "0.5", "--steps", "2",
                  "--block-size", "128", "--device", "cuda", "--out", Path.Combine(TestAssets.TempDir(), "hn")],
        };
        var (code, stdout, stderr) = OnTheEmulator(args, "forward", new() { ["DISPNATIVE_EMU_MEMORY"] = deviceBytes.ToString() });
        Assert.That(stderr.TrimEnd().Split('\n')[^1], Does.StartWith("error: out of device memory: "), stdout + stderr);
        Assert.That(stderr, Does.Not.Contain("   at "), "no stack trace");
        Assert.That(code, Is.EqualTo(1));
    }

    /// <summary>The <c>run</c> job on the (emulated) GPU, where the dense model goes to the device as it is read and the
    /// pruner reads it again from the file: its dense perplexity is the CPU job's (f32 evaluation of an f32 model, after
    /// training in bf16), <c>eval</c> on the CPU scores its saved model as its metrics say, and <c>prune</c> makes the same
    /// model from its hypernetwork, byte for byte.</summary>
    [Test]
    public void RunJob_OnTheGpu_AgreesWithTheCpu()
    {
        var (dir, config) = PruneJobTests.Setup();
        var cpu = PruneJobTests.Cli("run", config, "--Output:Directory=cpu");
        Assert.That(cpu.Code, Is.Zero, cpu.Err);
        var gpu = OnTheEmulator(["DispNative.dll", "run", config, "--Model:Device=cuda", "--Output:Directory=gpu"], "forward");
        Assert.That(gpu.Code, Is.Zero, gpu.Stdout + gpu.Stderr);
        double Metric(string run, string key) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, run, "metrics.json")))![key]!.GetValue<double>();
        Assert.That(JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "gpu", "metrics.json")))!["device"]!.GetValue<string>(), Is.EqualTo("cuda"));
        Assert.That(Metric("gpu", "dense_ppl"), Is.EqualTo(Metric("cpu", "dense_ppl")).Within(1e-3).Percent);

        string gpuModel = Path.Combine(dir, "gpu", "model");
        var eval = PruneJobTests.Cli("eval", "--model", gpuModel, "--text", Path.Combine(dir, "eval.txt"), "--block-size", "64", "--max-blocks", "4", "--device", "cpu");
        Assert.That(eval.Code, Is.Zero, eval.Err);
        double scored = double.Parse(eval.Out.Split("perplexity: ")[1].Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        Assert.That(scored, Is.EqualTo(Metric("gpu", "pruned_ppl")).Within(1e-3).Percent);

        string again = Path.Combine(dir, "again");
        var prune = PruneJobTests.Cli("prune", "--model", Path.Combine(dir, "model"), "--hypernetwork", Path.Combine(dir, "gpu", "hypernetwork.safetensors"), "--out", again);
        Assert.That(prune.Code, Is.Zero, prune.Err);
        var files = Directory.GetFiles(gpuModel).Select(Path.GetFileName).Order().ToArray();
        Assert.That(Directory.GetFiles(again).Select(Path.GetFileName).Order(), Is.EqualTo(files));
        foreach (var f in files)
            Assert.That(File.ReadAllBytes(Path.Combine(again, f!)), Is.EqualTo(File.ReadAllBytes(Path.Combine(gpuModel, f!))), f);
    }

    private (int Code, string Stdout, string Stderr) OnTheEmulator(List<string> args, string threadOrder,
        Dictionary<string, string>? extraEnvironment = null)
    {
        if (_skip != null) Assert.Ignore(_skip);
        args[0] = Path.Combine(AppContext.BaseDirectory, args[0]);
        var env = new Dictionary<string, string>
        {
            ["DISPNATIVE_CUDA_LIBRARY"] = _library!, ["DISPNATIVE_NVRTC_LIBRARY"] = _library!, ["DISPNATIVE_CUBLASLT_LIBRARY"] = _library!,
            ["DISPNATIVE_KERNEL_CACHE"] = _kernelCache!, ["DISPNATIVE_EMU_SCHEDULE"] = threadOrder,
        };
        foreach (var (k, v) in extraEnvironment ?? []) env[k] = v;
        return Exec(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet", args, env);
    }

    private static (int Code, string Stdout, string Stderr) Exec(string file, IEnumerable<string> args, IReadOnlyDictionary<string, string>? env)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        if (env != null) foreach (var (k, v) in env) psi.Environment[k] = v;
        try
        {
            using var p = Process.Start(psi)!;
            var stderr = p.StandardError.ReadToEndAsync();
            string stdout = p.StandardOutput.ReadToEnd();
            if (!p.WaitForExit(TimeSpan.FromMinutes(5))) { p.Kill(true); return (-1, stdout, stderr.Result + "\n(timed out)"); }
            return (p.ExitCode, stdout, stderr.Result);
        }
        catch (System.ComponentModel.Win32Exception e) { return (-1, "", $"{file}: {e.Message}"); }
    }
}
