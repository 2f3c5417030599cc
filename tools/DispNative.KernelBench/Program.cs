using System.Diagnostics;
using System.Runtime.Intrinsics;
using DispNative.Engine;
using DispNative.Engine.Autograd;
using DispNative.Engine.Cpu;
using DispNative.Engine.Cuda;
using DispNative.Engine.Disp;
using DispNative.Engine.Models;

namespace DispNative.KernelBench;

/// <summary>Kernel microbenchmarks. <c>cpu</c>: GEMM (naive baseline vs tuned, same run) against the machine's
/// theoretical fp32 peak, and the CPU forward pass in tokens/s. <c>gpu</c>: the CUDA kernels at LLaMA-2-7B shapes
/// (see <see cref="GpuBench"/>). <c>infer</c>: dense vs DISP-pruned inference at 7B shape (<see cref="InferenceBench"/>).
/// <c>train</c>: the masked LM pass of a training step at 7B shape (<see cref="TrainingBench"/>).</summary>
public static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length == 0 || args[0] is "-h" or "--help")
        {
            Console.WriteLine("usage: DispNative.KernelBench cpu [--model DIR] [--tokens N] [--seconds S]\n       DispNative.KernelBench gpu [--repeats N] [--tokens N]\n" +
                              "       DispNative.KernelBench infer [--tokens N] [--decode N] [--keep F]   (7B-shape dense vs pruned inference)\n" +
                              "       DispNative.KernelBench train [--tokens N] [--layers N]   (7B-shape masked training step)\n" +
                              "  gpu, infer and train take --smoke: the same code at a small shape, once (a check, not a measurement)");
            return args.Length == 0 ? 1 : 0;
        }
        if (args[0] is "gpu" or "infer" or "train")
        {
            bool smoke = args.Contains("--smoke");
            var shape = smoke ? BenchShapes.Smoke : BenchShapes.Llama2_7B;
            if (!int.TryParse(Arg(args, "--repeats") ?? (smoke ? "1" : "20"), out int repeats) || repeats < 1)
            { Console.Error.WriteLine("error: --repeats must be a positive integer"); return 1; }
            if (!int.TryParse(Arg(args, "--tokens") ?? (smoke ? $"{BenchShapes.SmokeTokens}" : "2048"), out int prefill) || prefill < 2)
            { Console.Error.WriteLine("error: --tokens must be an integer of at least 2"); return 1; }
            if (!int.TryParse(Arg(args, "--decode") ?? (smoke ? "4" : "128"), out int decode) || decode < 1)
            { Console.Error.WriteLine("error: --decode must be a positive integer"); return 1; }
            if (!double.TryParse(Arg(args, "--keep") ?? "0.65", System.Globalization.CultureInfo.InvariantCulture, out double keep) || keep is <= 0 or >= 1)
            { Console.Error.WriteLine("error: --keep must be a fraction in (0, 1)"); return 1; }
            if (!int.TryParse(Arg(args, "--layers") ?? $"{shape.NumLayers}", out int layers) || layers < 1)
            { Console.Error.WriteLine("error: --layers must be a positive integer"); return 1; }
            if (CudaDevice.Unavailable() is string reason) { Console.Error.WriteLine($"error: no CUDA device: {reason}"); return 1; }
            try
            {
                if (args[0] == "gpu") GpuBench.Run(repeats, shape, prefill);
                else if (args[0] == "infer") InferenceBench.Run(shape, prefill, decode, keep);
                else TrainingBench.Run(shape, prefill, layers);
                return 0;
            }
            catch (Exception e) when (e is DispNativeException or Interop.CudaException or Interop.CudaOutOfMemoryException or Interop.NvrtcCompileException)
            { Console.Error.WriteLine($"error: {e.Message}"); return 1; }
        }
        if (args[0] != "cpu") { Console.Error.WriteLine($"error: unknown benchmark '{args[0]}' (available: cpu, gpu, infer, train)"); return 1; }
        string? model = Arg(args, "--model");
        if (!int.TryParse(Arg(args, "--tokens") ?? "512", out int tokens) || tokens < 1)
        { Console.Error.WriteLine("error: --tokens must be a positive integer"); return 1; }
        if (!double.TryParse(Arg(args, "--seconds") ?? "2", System.Globalization.CultureInfo.InvariantCulture, out double seconds) || !(seconds > 0))
        { Console.Error.WriteLine("error: --seconds must be a positive number"); return 1; }
        try { Cpu(model, tokens, seconds); return 0; }
        catch (DispNativeException e) { Console.Error.WriteLine($"error: {e.Message}"); return 1; }
    }

    private static string? Arg(string[] args, string name)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
    }

    /// <summary>Cores × clock × 2 FMA pipes × lanes × 2 flops. The clock is the highest the OS reports.</summary>
    private static (double Gflops, string How) PeakFp32()
    {
        double mhz = 0;
        string src = "unknown clock";
        const string maxFreq = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq";
        if (File.Exists(maxFreq) && double.TryParse(File.ReadAllText(maxFreq).Trim(), out var khz)) { mhz = khz / 1000; src = "cpuinfo_max_freq"; }
        else if (File.Exists("/proc/cpuinfo"))
        {
            var line = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("cpu MHz"));
            if (line != null && double.TryParse(line.Split(':')[1].Trim(), System.Globalization.CultureInfo.InvariantCulture, out mhz)) src = "/proc/cpuinfo cpu MHz";
        }
        int lanes = Vector512.IsHardwareAccelerated ? 16 : 8;
        int cores = Environment.ProcessorCount;
        double peak = cores * mhz / 1000 * 2 * lanes * 2;
        return (peak, $"{cores} cores × {mhz / 1000:F2} GHz ({src}) × 2 FMA pipes × {lanes} fp32 lanes × 2 flops");
    }

    private static double Median(List<double> xs) { xs.Sort(); return xs[xs.Count / 2]; }

    /// <summary>Median seconds per call after one warm-up call, over at least 3 calls and about <paramref name="budget"/> seconds.</summary>
    private static double Time(Action run, double budget)
    {
        run();
        var samples = new List<double>();
        var total = Stopwatch.StartNew();
        while (samples.Count < 3 || total.Elapsed.TotalSeconds < budget)
        {
            var sw = Stopwatch.StartNew();
            run();
            samples.Add(sw.Elapsed.TotalSeconds);
        }
        return Median(samples);
    }

    /// <summary>The baseline: the textbook triple loop (dot products, no blocking, one thread).</summary>
    private static void NaiveGemm(float[] x, float[] w, float[] y, int m, int n, int k)
    {
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                float s = 0;
                for (int t = 0; t < k; t++) s += x[i * k + t] * w[j * k + t];
                y[i * n + j] = s;
            }
    }

    private static void Cpu(string? modelDir, int tokens, double seconds)
    {
        var (peak, how) = PeakFp32();
        Console.WriteLine($"CPU fp32 peak: {peak:F0} GFLOP/s = {how}");
        Console.WriteLine($"threads: {Gemm.Threads}, vector width: {(Vector512.IsHardwareAccelerated ? "AVX-512" : "256-bit")}");
        Console.WriteLine();
        Console.WriteLine($"{"GEMM Y=X·Wᵀ (M×N×K)",-26} {"naive GF/s",11} {"tuned GF/s",11} {"speedup",8} {"% peak",7}");
        var rng = new Rng(1);
        foreach (var (m, n, k, naive) in new[] { (512, 384, 384, true), (512, 1024, 384, true), (512, 384, 1024, true),
                     (512, 32000, 384, false), (1024, 1024, 1024, true), (2048, 2048, 2048, false), (512, 4096, 4096, false), (1, 4096, 4096, true) })
        {
            var x = new float[m * k]; var w = new float[n * k]; var y = new float[m * n];
            for (int i = 0; i < x.Length; i++) x[i] = rng.NextGaussian();
            for (int i = 0; i < w.Length; i++) w[i] = rng.NextGaussian();
            double flops = 2.0 * m * n * k;
            double tuned = flops / Time(() => Gemm.MatMulT(x, w, y, m, n, k), seconds) / 1e9;
            string naiveText = "-", speedup = "-";
            if (naive)
            {
                double nv = flops / Time(() => NaiveGemm(x, w, y, m, n, k), seconds / 2) / 1e9;
                naiveText = $"{nv:F1}";
                speedup = $"{tuned / nv:F1}x";
            }
            Console.WriteLine($"{$"{m}×{n}×{k}",-26} {naiveText,11} {tuned,11:F1} {speedup,8} {100 * tuned / peak,6:F1}%");
        }

        Console.WriteLine();
        LlamaModelBench(modelDir, tokens, seconds);
        Console.WriteLine();
        TrainingStepBench(seconds);
    }

    /// <summary>One DISP-LLM training step's LM pass (loss and mask gradients, block 256) at ref-llama-25m's shape: the
    /// engine's path (tape buffers reused between steps, attention backward as GEMMs) against the plain tape (fresh
    /// buffers every step, attention backward row by row), measured in the same run.</summary>
    private static void TrainingStepBench(double seconds)
    {
        var config = RefLlamaShape;
        var weights = ModelWeights.Random(config, 1);
        var rng = new Rng(3);
        int[] block = Enumerable.Range(0, 256).Select(_ => rng.NextInt(config.VocabSize)).ToArray();
        var layout = new SiteLayout(config, PruningMode.Disp);
        var masks = layout.OutputWidths.Select(w => Enumerable.Range(0, w).Select(_ => 0.5f + 0.5f * (float)rng.NextDouble()).ToArray()).ToList();
        var grads = masks.Select(m => new float[m.Length]).ToList();
        var plain = new MaskedLlama<float>(config, weights);
        double baseline = Time(() =>
        {
            var tape = new Tape<float> { AttentionBackwardOnGemms = false };
            var leaves = masks.Select((m, o) => tape.Leaf(m, 1, m.Length, grads[o])).ToArray();
            tape.Backward(plain.Loss(tape, block, (l, kind) => leaves[layout.OutputOf(l, kind)]));
        }, seconds);
        var engine = new CpuMaskedLanguageModel(config, weights);
        double tuned = Time(() => engine.LossAndMaskGradients(block, masks, layout.OutputOf, grads, 1), seconds);
        Console.WriteLine($"masked training step (ref-llama-25m shape, block 256): plain tape {baseline:F3} s, engine {tuned:F3} s, {baseline / tuned:F2}x");
    }

    /// <summary>ref-llama-25m's shape, for the CPU benchmarks with random weights.</summary>
    private static readonly ModelConfig RefLlamaShape = new ModelConfig
    {
        Architecture = "LlamaForCausalLM", HiddenSize = 384, IntermediateSize = 1024, NumLayers = 8, NumHeads = 6,
        NumKvHeads = 2, HeadDim = 64, VocabSize = 32000, TieWordEmbeddings = true,
    };

    private static void LlamaModelBench(string? modelDir, int tokens, double seconds)
    {
        ModelConfig config;
        Engine.Inference.LlamaModel model;
        if (modelDir != null)
        {
            var loaded = ModelLoader.Load(modelDir);
            (config, model) = (loaded.Config, loaded.Model);
            Console.WriteLine($"forward: {modelDir}");
        }
        else
        {
            // ref-llama-25m's shape with random weights when no model is given.
            config = RefLlamaShape;
            model = new Engine.Inference.LlamaModel(config, ModelWeights.Random(config, 1));
            Console.WriteLine("forward: random weights in ref-llama-25m's shape (pass --model DIR for a real checkpoint)");
        }
        var rng = new Rng(2);
        int[] ids = Enumerable.Range(0, tokens).Select(_ => rng.NextInt(config.VocabSize)).ToArray();
        double prefill = Time(() => model.Forward(ids, model.NewCache(tokens)), seconds);
        var counts = config.ParameterCounts();
        double matmulParams = counts["attention"] + counts["mlp"] + (double)config.VocabSize * config.HiddenSize;
        double attnFlops = 2.0 * config.NumLayers * config.NumHeads * config.HeadDim * tokens * (tokens + 1);
        double flops = 2 * matmulParams * tokens + attnFlops;
        Console.WriteLine($"prefill {tokens} tokens: {prefill * 1000:F1} ms = {tokens / prefill:F0} tokens/s, {flops / prefill / 1e9:F1} GFLOP/s");

        var cache = model.NewCache(tokens + 65);
        model.Forward(ids, cache, lastOnly: true);
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < 64; i++) model.Forward([ids[i]], cache, lastOnly: true);
        Console.WriteLine($"decode after {tokens} tokens: {64 / sw.Elapsed.TotalSeconds:F0} tokens/s");
    }
}
