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
/// measured fp32 FMA peak, prefill attention (row-by-row reference vs GEMM tiles), the CPU forward pass dense and
/// DISP-pruned in tokens/s, and a training step's LM pass (plain tape vs the engine's). <c>gpu</c>: the CUDA kernels at LLaMA-2-7B shapes
/// (see <see cref="GpuBench"/>). <c>infer</c>: dense vs DISP-pruned inference at 7B shape (<see cref="InferenceBench"/>).
/// <c>train</c>: the masked LM pass of a training step at 7B shape (<see cref="TrainingBench"/>).</summary>
public static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length == 0 || args[0] is "-h" or "--help")
        {
            Console.WriteLine("usage: DispNative.KernelBench cpu [--model DIR] [--tokens N] [--seconds S]\n       DispNative.KernelBench gpu [--repeats N] [--tokens N]\n" +
                              "       DispNative.KernelBench infer [--tokens N] [--decode N] [--keep F] [--profile]   (7B-shape dense vs pruned inference)\n" +
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
                else if (args[0] == "infer") InferenceBench.Run(shape, prefill, decode, keep, args.Contains("--profile"));
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

    /// <summary>The fp32 peak the GEMMs are held against, measured (<see cref="Gemm.MeasureFmaPeakGflops"/>); the clock
    /// the OS reports (a base clock in a VM) is printed beside it for comparison.</summary>
    private static (double Gflops, string How) PeakFp32()
    {
        int threads = Gemm.Threads, lanes = Vector512.IsHardwareAccelerated ? 16 : 8;
        double peak = Gemm.MeasureFmaPeakGflops();
        string clock = "unknown";
        const string maxFreq = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq";
        if (File.Exists(maxFreq) && double.TryParse(File.ReadAllText(maxFreq).Trim(), out var khz)) clock = $"{khz / 1e6:F2} GHz (cpuinfo_max_freq)";
        else if (File.Exists("/proc/cpuinfo"))
        {
            var line = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("cpu MHz"));
            if (line != null && double.TryParse(line.Split(':')[1].Trim(), System.Globalization.CultureInfo.InvariantCulture, out var mhz))
                clock = $"{mhz / 1000:F2} GHz (/proc/cpuinfo), which gives {threads * mhz / 1000 * 2 * lanes * 2:F0} GFLOP/s at 2 FMA pipes";
        }
        return (peak, $"a register-only FMA loop on {threads} threads, {lanes} fp32 lanes; the OS reports {clock}");
    }

    private static double Median(List<double> xs) { xs.Sort(); return xs[xs.Count / 2]; }

    /// <summary>Median seconds per call over at least 3 calls and about <paramref name="budget"/> seconds, after warm-up calls
    /// for a third of the budget (while the JIT tiers up, the first calls run several times slower).</summary>
    private static double Time(Action run, double budget)
    {
        var total = Stopwatch.StartNew();
        do run(); while (total.Elapsed.TotalSeconds < budget / 3);
        var samples = new List<double>();
        total.Restart();
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
        Console.WriteLine($"CPU fp32 peak: {peak:F0} GFLOP/s, measured by {how}");
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
        AttentionBench(tokens, seconds);
        AttentionBackwardBench(256, seconds);
        AttentionBackwardBench(1024, seconds);
        Console.WriteLine();
        LlamaModelBench(modelDir, tokens, seconds);
        LogitsPerTokenBench(RefLlamaShape.VocabSize, seconds);
        Console.WriteLine();
        TrainingStepBench(seconds);
    }

    /// <summary>The host side of a decode step: its logits copied into a new array per token (Forward; above the
    /// large-object threshold, so fresh pages and full collections) against one reused buffer (ForwardLast), the same
    /// copy, in the same run. On a GPU the device waits that long between tokens.</summary>
    private static void LogitsPerTokenBench(int vocab, double seconds)
    {
        var logits = new float[vocab];
        var buffer = new float[vocab];
        // Mean seconds per call: the collections come every few dozen calls, which a median would leave out.
        double Mean(Action run)
        {
            for (int i = 0; i < 100; i++) run();
            var sw = Stopwatch.StartNew();
            long calls = 0;
            for (; sw.Elapsed.TotalSeconds < seconds / 2; calls++) run();
            return sw.Elapsed.TotalSeconds / calls;
        }
        double fresh = Mean(() => { var a = new float[vocab]; logits.CopyTo(a, 0); GC.KeepAlive(a); });
        double reused = Mean(() => logits.CopyTo(buffer, 0));
        Console.WriteLine($"logits per decoded token ({vocab} f32): into a new array {fresh * 1e6:F1} µs, into one reused buffer {reused * 1e6:F1} µs, " +
                          $"{fresh / reused:F1}x");
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

    /// <summary>Causal prefill attention at ref-llama-25m's head shape (6 query heads, 2 KV heads of 64): the row-by-row
    /// reference against the GEMM tiles the CPU forward uses, in the same run.</summary>
    private static void AttentionBench(int tokens, double seconds)
    {
        var c = RefLlamaShape;
        var rng = new Rng(4);
        float[] Random(long n) { var a = new float[n]; for (long i = 0; i < n; i++) a[i] = rng.NextGaussian(); return a; }
        float[] q = Random((long)tokens * c.QDim), k = Random((long)tokens * c.KvDim), v = Random((long)tokens * c.KvDim), o = new float[q.Length];
        double rowByRow = Time(() => CpuOps.Attention(q, k, v, o, tokens, 0, c.NumHeads, c.NumKvHeads, c.HeadDim), seconds);
        double gemms = Time(() => CpuOps.AttentionOnGemms(q, k, v, o, tokens, 0, c.NumHeads, c.NumKvHeads, c.HeadDim), seconds);
        // Useful FLOPs: Q·Kᵀ and P·V over the causal triangle (both tilings compute at least these).
        double flops = 2.0 * 2 * c.NumHeads * c.HeadDim * tokens * (tokens + 1) / 2;
        Console.WriteLine($"prefill attention, {tokens} tokens, heads {c.NumHeads}/{c.NumKvHeads} of {c.HeadDim} (one layer): row by row {rowByRow * 1000:F1} ms " +
                          $"({flops / rowByRow / 1e9:F1} GFLOP/s), GEMM tiles {gemms * 1000:F1} ms ({flops / gemms / 1e9:F1} GFLOP/s), {rowByRow / gemms:F2}x");
    }

    /// <summary>Training's attention backward as GEMMs at ref-llama-25m's head shape: the whole [T, T] square (one row
    /// block) against the block triangle the engine computes, in the same run.</summary>
    private static void AttentionBackwardBench(int tokens, double seconds)
    {
        var c = RefLlamaShape;
        var rng = new Rng(5);
        float[] Random(long n) { var a = new float[n]; for (long i = 0; i < n; i++) a[i] = rng.NextGaussian(); return a; }
        float[] q = Random((long)tokens * c.QDim), k = Random((long)tokens * c.KvDim), v = Random((long)tokens * c.KvDim);
        float[] o = Random(q.Length), dOut = Random(q.Length), lse = Random((long)c.NumHeads * tokens);
        float[] dq = new float[q.Length], dk = new float[k.Length], dv = new float[v.Length];
        double Run(int rowBlock) => Time(() => CpuAttentionGemmBackend.Run(q, k, v, o, dOut, lse, dq, dk, dv, tokens, c.NumHeads, c.NumKvHeads,
            c.HeadDim, null, n => new float[n], rowBlock), seconds);
        int block = AttentionGemmBackward.RowBlock(tokens, minimum: CpuAttentionGemmBackend.MinimumRowBlock);
        double square = Run(tokens), triangle = Run(block);
        Console.WriteLine($"attention backward as GEMMs, {tokens} tokens, heads {c.NumHeads}/{c.NumKvHeads} of {c.HeadDim} (one layer): " +
                          $"whole square {square * 1000:F1} ms, block triangle (blocks of {block}) {triangle * 1000:F1} ms, {square / triangle:F2}x");
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
        ModelWeights weights;
        if (modelDir != null)
        {
            var loaded = ModelLoader.Load(modelDir);
            (config, weights) = (loaded.Config, loaded.Model.Weights);
            Console.WriteLine($"forward: {modelDir}");
        }
        else
        {
            config = RefLlamaShape;
            weights = ModelWeights.Random(config, 1);
            Console.WriteLine("forward: random weights in ref-llama-25m's shape (pass --model DIR for a real checkpoint)");
        }
        var rng = new Rng(2);
        int[] ids = Enumerable.Range(0, tokens).Select(_ => rng.NextInt(config.VocabSize)).ToArray();
        var models = new List<Engine.Inference.LlamaModel> { new(config, weights) };
        const double keep = 0.65;
        if (config.Disp == null)
        {
            // The same model DISP-pruned: every site of every layer keeps a random sorted 65% of its channels.
            var layout = new SiteLayout(config, PruningMode.Disp);
            var masks = layout.OutputWidths.Select(w =>
            {
                var kept = Enumerable.Range(0, w).OrderBy(_ => rng.NextDouble()).Take((int)Math.Round(keep * w)).ToHashSet();
                return Enumerable.Range(0, w).Select(kept.Contains).ToArray();
            }).ToList();
            var (prunedConfig, prunedWeights) = Pruner.Apply(config, weights, PruningPlan.FromMasks(layout, masks), "disp", 0.5, null);
            models.Add(new(prunedConfig, prunedWeights));
        }
        var times = ForwardSpeed(models, ids, seconds);
        var dense = times[0];
        Console.WriteLine($"prefill {tokens} tokens: {dense.PrefillSeconds * 1000:F1} ms = {tokens / dense.PrefillSeconds:F0} tokens/s, " +
                          $"{dense.PrefillFlops / dense.PrefillSeconds / 1e9:F1} GFLOP/s; decode after {tokens} tokens: {dense.DecodeTokS:F0} tokens/s");
        if (times.Count == 1) return;
        var pruned = times[1];
        double layerParams = config.PrunableParameters(), prunedLayerParams = models[1].Config.PrunableParameters();
        Console.WriteLine($"DISP-pruned, every site {keep:P0} ({prunedLayerParams / layerParams:P1} of the layer parameters): prefill {pruned.PrefillSeconds * 1000:F1} ms, " +
                          $"decode {pruned.DecodeTokS:F0} tokens/s");
        // What the ratios would be if time followed the arithmetic (prefill: FLOPs) or the weights read per token
        // (decode: layers and LM head).
        double head = (double)config.VocabSize * config.HiddenSize;
        Console.WriteLine($"pruned vs dense, same run: prefill {dense.PrefillSeconds / pruned.PrefillSeconds:F2}x faster (FLOPs ratio {dense.PrefillFlops / pruned.PrefillFlops:F2}x), " +
                          $"decode {pruned.DecodeTokS / dense.DecodeTokS:F2}x (weight-bytes ratio {(layerParams + head) / (prunedLayerParams + head):F2}x)");
    }


    private sealed record ForwardTimes(double PrefillSeconds, double PrefillFlops, double DecodeTokS);

    /// <summary>Per model: prefill of <paramref name="ids"/> with the logits of the last row only (what generation needs),
    /// and single-token decode after it (runs of 32 steps after 8 warm-up steps). After warm-up rounds, the models take
    /// turns, sample by sample, so that drifts of this shared machine hit them alike; medians.</summary>
    private static List<ForwardTimes> ForwardSpeed(IReadOnlyList<Engine.Inference.LlamaModel> models, int[] ids, double seconds)
    {
        int tokens = ids.Length;
        const int warmup = 8, steps = 32;
        var prefill = models.Select(_ => new List<double>()).ToList();
        var decode = models.Select(_ => new List<double>()).ToList();
        // Warm-up rounds (the first passes run while the JIT is still tiering up: 2-4x slower), then the samples.
        var total = Stopwatch.StartNew();
        for (int round = 0; round < 3 || total.Elapsed.TotalSeconds < seconds; round++)
            foreach (var model in models)
            {
                var cache = model.NewCache(tokens + warmup);
                model.Forward(ids, cache, lastOnly: true);
                for (int j = 0; j < warmup; j++) model.Forward([ids[j % tokens]], cache, lastOnly: true);
            }
        total.Restart();
        while (prefill[0].Count < 3 || total.Elapsed.TotalSeconds < seconds * models.Count)
            for (int i = 0; i < models.Count; i++)
            {
                var model = models[i];
                var cache = model.NewCache(tokens + warmup + steps);
                var sw = Stopwatch.StartNew();
                model.Forward(ids, cache, lastOnly: true);
                prefill[i].Add(sw.Elapsed.TotalSeconds);
                for (int j = 0; j < warmup; j++) model.Forward([ids[j % tokens]], cache, lastOnly: true);
                sw.Restart();
                for (int j = 0; j < steps; j++) model.Forward([ids[j % tokens]], cache, lastOnly: true);
                decode[i].Add(steps / sw.Elapsed.TotalSeconds);
            }
        return models.Select((model, i) =>
        {
            var c = model.Config;
            return new ForwardTimes(Median(prefill[i]), c.LastRowPrefillFlops(tokens), Median(decode[i]));
        }).ToList();
    }
}
