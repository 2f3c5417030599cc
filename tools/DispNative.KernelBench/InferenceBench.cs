using System.Diagnostics;
using DispNative.Engine.Cuda;
using DispNative.Engine.IO;
using DispNative.Engine.Models;

namespace DispNative.KernelBench;

/// <summary>Pruned vs dense inference at LLaMA-2-7B shape with random bf16 weights made on the device: prefill of
/// <c>T</c> tokens and batch-1 decode (eager, through CUDA graphs, and with the layers as one persistent kernel), in the same run, beside the physical limits
/// (prefill: GEMM FLOPs / peak bf16; decode: weight bytes / peak bandwidth). The pruned model keeps 65% of every
/// site (embedding-side and MLP middle), about half of the layer parameters.</summary>
internal static class InferenceBench
{
    private const int DecodePrompt = 16;   // decode starts after a short prompt: weight reads dominate, as in serving

    /// <summary>The short prompt of the profiled steps (<c>--profile</c>): decode at 81-83 keys.</summary>
    private const int ProfiledShortPrompt = 80;
    private const int LeastPadding = 8;   // the baseline padding: 16-byte rows of bf16

    private sealed record Result(string Name, double PrefillMs, double PrefillOtherTuningMs, double EagerTokS, double GraphTokS, double PersistentTokS,
        double DeviceGreedyTokS, long GemmParams, long DecodeBytes, double PrefillFlops)
    {
        /// <summary>The fastest decode: through CUDA graphs with the host choosing each token, with the layers as one
        /// persistent kernel, or greedy with the tokens chosen on the device (graphs, the next step queued ahead).</summary>
        public double DecodeTokS => Math.Max(Math.Max(GraphTokS, PersistentTokS), DeviceGreedyTokS);

        /// <summary>Prefill ms and decode (graphs) ms per token with kernels left out (<see cref="CudaLlama.Skipped"/>).</summary>
        public Ablation? Without { get; init; }

        /// <summary>Decode with the tokens chosen on the device under each of <see cref="SettingsTried"/>, tok/s.</summary>
        public double[] TriedTokS { get; init; } = [];
    }

    /// <summary>Settings that are not the engine's, each timed on greedy decode with the tokens chosen on the device
    /// against the engine's: what it is, and how to set it (returning how to undo that).</summary>
    internal sealed record Setting(string What, Func<CudaDevice, Action> Set);

    internal static readonly Setting OtherDecodeWarps = new("the decode attention in blocks of the other number of warps (CudaDevice.DecodeAttentionWarps, 4 or 8)", dev =>
    {
        int warps = dev.DecodeAttentionWarps;
        dev.DecodeAttentionWarps = warps == CudaOps.DecodeWarps ? 2 * CudaOps.DecodeWarps : CudaOps.DecodeWarps;
        return () => dev.DecodeAttentionWarps = warps;
    });

    /// <summary>The split-KV decode attention rescaling its state once per <paramref name="keys"/> keys of a round
    /// (<see cref="CudaDevice.DecodeAttentionRescaleKeys"/>) in blocks of 4 warps.</summary>
    internal static Setting DecodeRescale(int keys) => new(keys == 1
        ? "the decode attention (4 warps) rescaled at every key, shares merged in loops (the form of the last H200 run)"
        : $"the decode attention (4 warps) rescaled once per {keys} keys", dev =>
    {
        var (warps, rescale) = (dev.DecodeAttentionWarps, dev.DecodeAttentionRescaleKeys);
        (dev.DecodeAttentionWarps, dev.DecodeAttentionRescaleKeys) = (CudaOps.DecodeWarps, keys);
        return () => (dev.DecodeAttentionWarps, dev.DecodeAttentionRescaleKeys) = (warps, rescale);
    });

    /// <summary>The streamed GEMVs in one form everywhere instead of the fastest per shape: rounds of loads inside one
    /// row or across rows (<see cref="CudaDevice.StreamGemvsByRow"/>, null: timed), rows balanced or not
    /// (<see cref="CudaDevice.BalanceGemvRows"/>, null: timed).</summary>
    private static Setting StreamedGemvs(string what, bool? byRow, bool? balanced) => new(what, dev =>
    {
        var (rows, balance) = (dev.StreamGemvsByRow, dev.BalanceGemvRows);
        (dev.StreamGemvsByRow, dev.BalanceGemvRows) = (byRow, balanced);
        return () => (dev.StreamGemvsByRow, dev.BalanceGemvRows) = (rows, balance);
    });

    private static readonly Setting[] SettingsTried =
    [
        StreamedGemvs("every streamed GEMV in rounds of loads inside one row, on the full grid (the forms of the last H200 run)", byRow: true, balanced: false),
        StreamedGemvs("every streamed GEMV in rounds across rows, on the full grid", byRow: false, balanced: false),
        StreamedGemvs("every streamed GEMV's rows balanced over fewer blocks", byRow: null, balanced: true),
        OtherDecodeWarps,
        .. CudaOps.DecodeRescaleKeysBuilt.Where(k => k != CudaOps.DecodeRescaleKeys).Select(DecodeRescale),
    ];

    private sealed record Ablation(double PrefillNoAttentionMs, double StepNoNormsMs, double StepNoAttentionMs, double StepGemvsMs);

    /// <param name="profile">Also runs, for each model after its measurements, eager prefills and decode steps (after
    /// the full prompt and after a short one) between cuProfilerStart and cuProfilerStop: what
    /// <c>ncu --profile-from-start off</c> records (tools/gpu/check.sh profile-infer).</param>
    public static void Run(ModelConfig c, int prefillTokens, int decodeTokens, double keep, bool profile = false)
    {
        using var dev = CudaDevice.Open();
        var info = dev.Info;
        Console.WriteLine($"device: {info}; {BenchShapes.Describe(c)}, random bf16 weights; prefill {prefillTokens} tokens, decode {decodeTokens} tokens after a {DecodePrompt}-token prompt");
        Console.WriteLine($"kernels: {dev.Compiler.CompileAll()}");
        var results = new List<Result> { Measure(dev, c, "dense", 1, prefillTokens, decodeTokens, profile, ablations: true) };
        results.Add(Measure(dev, c, $"DISP-pruned (every site {keep:P0})", keep, prefillTokens, decodeTokens, profile, ablations: true));
        // The same model with its pruned widths stored padded to 8 (16-byte rows, the least cuBLASLt's tensor cores
        // take) instead of the engine's default (CudaOps.DefaultPadding: 64 at the 7B shape): fewer zero channels to
        // read, emptier GEMM tiles.
        if (keep < 1) results.Add(Measure(dev, c, $"  the same, widths padded to {LeastPadding}", keep, prefillTokens, decodeTokens, false, false, padding: LeastPadding));

        double? tf = info.PeakBf16Flops, bw = info.PeakBandwidth;
        Console.WriteLine();
        Console.WriteLine($"{"model",-32} {"GEMM params",12} {"prefill ms",11} {"bound ms",9} {"decode tok/s eager",19} {"graphs",8} {"persistent",11} {"on device",10} {"bound",8}");
        foreach (var r in results)
        {
            // Prefill FLOPs of the model's unpadded widths (ModelConfig.LastRowPrefillFlops: the last layer's query side
            // and the LM head for the last row only).
            string prefillBound = tf is double p ? $"{1e3 * r.PrefillFlops / p,9:F1}" : "        -";
            string decodeBound = bw is double b ? $"{b / r.DecodeBytes,8:F0}" : "       -";
            Console.WriteLine($"{r.Name,-32} {r.GemmParams / 1e9,10:F2} B {r.PrefillMs,11:F1} {prefillBound} {r.EagerTokS,19:F1} {r.GraphTokS,8:F1} {r.PersistentTokS,11:F1} {r.DeviceGreedyTokS,10:F1} {decodeBound}");
        }
        var (dense, pruned) = (results[0], results[1]);
        Console.WriteLine();
        Console.WriteLine($"pruned vs dense: prefill {dense.PrefillMs / pruned.PrefillMs:F2}x faster, decode (graphs) {pruned.GraphTokS / dense.GraphTokS:F2}x; " +
                          $"graphs vs eager decode: dense {dense.GraphTokS / dense.EagerTokS:F2}x, pruned {pruned.GraphTokS / pruned.EagerTokS:F2}x");
        if (results.Count > 2)
            Console.WriteLine($"pruned, padded to {LeastPadding}: prefill {dense.PrefillMs / results[2].PrefillMs:F2}x faster than dense, decode (graphs) {results[2].GraphTokS / dense.GraphTokS:F2}x " +
                              $"(padded to {CudaOps.DefaultPadding(c)}, the engine's: {dense.PrefillMs / pruned.PrefillMs:F2}x, {pruned.GraphTokS / dense.GraphTokS:F2}x)");
        Console.WriteLine($"persistent decode kernel vs graphs: dense {dense.PersistentTokS / dense.GraphTokS:F2}x, pruned {pruned.PersistentTokS / pruned.GraphTokS:F2}x; " +
                          $"pruned vs dense with it {pruned.PersistentTokS / dense.PersistentTokS:F2}x, the fastest form of each {pruned.DecodeTokS / dense.DecodeTokS:F2}x");
        Console.WriteLine($"greedy decode with each token chosen on the device (CudaLlama.DecodeGreedy; graphs, the next step queued before the host reads " +
                          $"the token): dense {dense.DeviceGreedyTokS / dense.GraphTokS:F2}x, pruned {pruned.DeviceGreedyTokS / pruned.GraphTokS:F2}x the host's choice; " +
                          $"pruned vs dense with it {pruned.DeviceGreedyTokS / dense.DeviceGreedyTokS:F2}x");
        Console.WriteLine($"  the engine's settings: each GEMV shape's form timed on its first call (streamed or not, rounds of loads across rows or inside one, " +
                          $"rows balanced over fewer blocks or not), decode attention in blocks of {dev.DecodeAttentionWarps} warps rescaled once per {dev.DecodeAttentionRescaleKeys} keys");
        for (int i = 0; i < SettingsTried.Length; i++)
            Console.WriteLine($"  the same with {SettingsTried[i].What}: dense {dense.TriedTokS[i] / dense.DeviceGreedyTokS:F2}x, " +
                              $"pruned {pruned.TriedTokS[i] / pruned.DeviceGreedyTokS:F2}x the engine's; pruned vs dense {pruned.TriedTokS[i] / dense.TriedTokS[i]:F2}x");
        double denseStep = 1e3 / dense.GraphTokS, prunedStep = 1e3 / pruned.GraphTokS;   // ms per token, graphs
        if (dense.Without is { } dw && pruned.Without is { } pw)
        {
            // What the shared, unpruned parts cap: DISP keeps attention whole, and decode's norms read the full row.
            Console.WriteLine($"ablations (kernels left out, CUDA graphs for decode): prefill without attention {dw.PrefillNoAttentionMs / pw.PrefillNoAttentionMs:F2}x; " +
                              $"decode without the norms {dw.StepNoNormsMs / pw.StepNoNormsMs:F2}x, without attention {dw.StepNoAttentionMs / pw.StepNoAttentionMs:F2}x, " +
                              $"GEMVs alone {dw.StepGemvsMs / pw.StepGemvsMs:F2}x (all of it {denseStep / prunedStep:F2}x)");
        }
        if (DecodeCostFit.From(denseStep, dense.DecodeBytes, prunedStep, pruned.DecodeBytes) is { } fit)
        {
            string ofPeak = bw is double peak ? $" ({fit.BytesPerSecond / peak:P0} of peak)" : "";
            Console.WriteLine($"decode (graphs) fitted to t = bytes / B + F: B = {fit.BytesPerSecond / 1e12:F2} TB/s{ofPeak}, F = {fit.FixedMs:F3} ms per token " +
                              $"({1e3 * fit.FixedMs / c.NumLayers:F1} us per layer); at this B, 1.7x needs F <= {fit.FixedMsForRatio(1.7, dense.DecodeBytes, pruned.DecodeBytes):F3} ms");
        }
        else Console.WriteLine("decode (graphs): no fit to t = bytes / B + F (it needs a pruned step that reads fewer bytes and is faster)");
        if (DecodeCostFit.From(1e3 / dense.DeviceGreedyTokS, dense.DecodeBytes, 1e3 / pruned.DeviceGreedyTokS, pruned.DecodeBytes) is { } deviceFit)
            Console.WriteLine($"decode (tokens chosen on the device) fitted the same way: B = {deviceFit.BytesPerSecond / 1e12:F2} TB/s, F = {deviceFit.FixedMs:F3} ms per token " +
                              $"({1e3 * deviceFit.FixedMs / c.NumLayers:F1} us per layer)");
        if (DecodeCostFit.From(1e3 / dense.PersistentTokS, dense.DecodeBytes, 1e3 / pruned.PersistentTokS, pruned.DecodeBytes) is { } persistentFit)
            Console.WriteLine($"decode (persistent kernel) fitted the same way: B = {persistentFit.BytesPerSecond / 1e12:F2} TB/s, F = {persistentFit.FixedMs:F3} ms per token " +
                              $"({1e3 * persistentFit.FixedMs / c.NumLayers:F1} us per layer)");
        double Tuned(Result r) => dev.TuneGemms ? r.PrefillMs : r.PrefillOtherTuningMs;
        double Untuned(Result r) => dev.TuneGemms ? r.PrefillOtherTuningMs : r.PrefillMs;
        Console.WriteLine($"prefill with tuned GEMM algorithms (CudaDevice.TuneGemms, engine default {(dev.TuneGemms ? "on" : "off")}): dense {Tuned(dense):F1} ms, " +
                          $"pruned {Tuned(pruned):F1} ms ({Tuned(dense) / Tuned(pruned):F2}x); tuning gives dense {Untuned(dense) / Tuned(dense):F2}x, pruned {Untuned(pruned) / Tuned(pruned):F2}x");
        var st = dev.Allocator.Stats;
        Console.WriteLine($"allocator: peak {st.PeakReservedBytes / (1L << 20)} MiB reserved");
        var acceptance = new IssueTargets(IssueTargets.AppliesTo(c, prefillTokens) && keep == 0.65);
        string Times(double r) => $"{r:F2}x";
        acceptance.AtLeast(5, "pruned prefill >= 1.6x faster than dense", dense.PrefillMs / pruned.PrefillMs, 1.6, Times);
        acceptance.AtLeast(5, "dense decode >= 150 tokens/s (the fastest form)", dense.DecodeTokS, 150, r => $"{r:F1} tok/s");
        acceptance.AtLeast(5, "pruned decode >= 1.7x dense (the fastest form of each)", pruned.DecodeTokS / dense.DecodeTokS, 1.7, Times);
        acceptance.Print();
        PrefillAttentionKernels(dev, c, prefillTokens, keep);
    }

    /// <summary>Prefill of both models (rebuilt) with each prefill attention kernel that runs here: mma.sync's (the
    /// default) and the warpgroup-MMA ones (<see cref="CudaDevice.SupportsWgmma"/>), in turns. Last in the run: a fault
    /// in a kernel no GPU has yet run (it leaves the context unusable) would cost nothing above.</summary>
    private static void PrefillAttentionKernels(CudaDevice dev, ModelConfig c, int prefillTokens, double keep)
    {
        Console.WriteLine();
        if (!dev.SupportsWgmma)
        {
            Console.WriteLine($"prefill with warpgroup-MMA attention: does not apply here: {dev.WgmmaUnsupportedReason}");
            return;
        }
        PrefillKernel[] kernels = [PrefillKernel.TensorCores32Rows, PrefillKernel.Wgmma, PrefillKernel.Wgmma2Warpgroups];
        var engine = dev.PrefillAttention;
        var ms = new Dictionary<(double Keep, PrefillKernel Kernel), double>();
        foreach (double k in new[] { 1, keep })
        {
            using var model = CudaLlama.RandomWeights(dev, c, DType.BF16, seed: 7, k);
            int[] prompt = Prompt(c, prefillTokens);
            for (int round = 0; round < 2; round++)   // each kernel twice, in turns; the second round counts
                foreach (var kernel in kernels)
                {
                    dev.PrefillAttention = kernel;
                    ms[(k, kernel)] = PrefillMs(dev, model, prompt);
                }
        }
        dev.PrefillAttention = engine;
        Console.WriteLine($"prefill by attention kernel (CudaDevice.PrefillAttention; the engine's: {new CudaOps(dev).PrefillFor(DType.BF16, c.HeadDim)}):");
        var acceptance = new IssueTargets(IssueTargets.AppliesTo(c, prefillTokens) && keep == 0.65);
        foreach (var kernel in kernels)
        {
            double dense = ms[(1, kernel)], pruned = ms[(keep, kernel)], denseMma = ms[(1, kernels[0])], prunedMma = ms[(keep, kernels[0])];
            Console.WriteLine($"  {kernel,-20} dense {dense,7:F1} ms, pruned {pruned,7:F1} ms, pruned {dense / pruned:F2}x faster; " +
                              $"vs mma.sync: dense {denseMma / dense:F2}x, pruned {prunedMma / pruned:F2}x");
            if (kernel != kernels[0]) acceptance.AtLeast(5, $"pruned prefill >= 1.6x dense, {kernel}", dense / pruned, 1.6, r => $"{r:F2}x");
        }
        acceptance.Print();
    }

    /// <summary>A random prompt of <paramref name="tokens"/> tokens (the same for every model).</summary>
    private static int[] Prompt(ModelConfig c, int tokens)
    {
        var rng = new Engine.Rng(3);
        return Enumerable.Range(0, tokens).Select(_ => (int)(rng.NextDouble() * c.VocabSize)).ToArray();
    }

    /// <summary>Prefill ms, logits of the last row only (what generation needs): median of 5 after one warm-up (which,
    /// with GEMM tuning, chooses the algorithms).</summary>
    private static double PrefillMs(CudaDevice dev, CudaLlama model, int[] prompt)
    {
        var times = new List<double>();
        for (int i = 0; i < 6; i++)
        {
            using var cache = model.NewCache(prompt.Length);
            float ms = dev.Time(() => model.Forward(prompt, cache, lastOnly: true));
            if (i > 0) times.Add(ms);
        }
        times.Sort();
        return times[times.Count / 2];
    }

    /// <param name="ablations">Also times decode without the norms, without attention and with neither, and prefill
    /// without attention (<see cref="CudaLlama.SkipForTiming"/>).</param>
    private static Result Measure(CudaDevice dev, ModelConfig config, string name, double keep, int prefillTokens, int decodeTokens, bool profile,
        bool ablations, int? padding = null)
    {
        var sw = Stopwatch.StartNew();
        using var model = CudaLlama.RandomWeights(dev, config, DType.BF16, seed: 7, keep, padding);
        Console.WriteLine($"{name}: built on the device in {sw.Elapsed.TotalSeconds:F1} s, {model.DecodeWeightBytes / 1e9:F2} GB read per decoded token");
        int[] prompt = Prompt(config, prefillTokens);

        // Prefill (PrefillMs) with the engine's GEMM algorithms, and with the other setting of CudaDevice.TuneGemms.
        bool engineTunes = dev.TuneGemms;
        double Prefill(bool tune)
        {
            dev.TuneGemms = tune;
            try { return PrefillMs(dev, model, prompt); }
            finally { dev.TuneGemms = engineTunes; }
        }
        double otherTuningMs = Prefill(!engineTunes), prefillMs = Prefill(engineTunes);

        string persistentForm = "did not apply";
        // Each step's logits into one buffer (CudaLlama.ForwardLast) and the token chosen on the host; newArrays: a new
        // array per step (Forward), the baseline of that choice; onDevice: greedy with the tokens chosen on the device
        // (CudaLlama.DecodeGreedy), as Generator decodes greedily.
        double Decode(bool graphs, bool persistent = false, bool newArrays = false, bool onDevice = false)
        {
            (model.UseCudaGraphs, model.UsePersistentDecode) = (graphs, persistent);
            using var cache = model.NewCache(DecodePrompt + decodeTokens + 3);
            var logits = new float[config.VocabSize];
            int Step(int token)
            {
                if (newArrays) return Next(model.Forward([token], cache, lastOnly: true));
                model.ForwardLast([token], cache, logits);
                return Next(logits);
            }
            // Steps from token on, the last one's token returned.
            int Steps(int token, int steps)
            {
                if (!onDevice)
                {
                    for (int i = 0; i < steps; i++) token = Step(token);
                    return token;
                }
                using var decoder = model.DecodeGreedy(cache, token, steps);
                for (int i = 0; i < steps; i++) token = decoder.Next();
                return token;
            }
            model.ForwardLast(prompt.AsSpan(0, Math.Min(DecodePrompt, prompt.Length)), cache, logits);
            // Warm-up: graph capture, or the persistent kernel's timed choice of unroll and blocks per SM.
            int token = Steps(1, 3);
            var t = Stopwatch.StartNew();
            Steps(token, decodeTokens);
            double tokS = decodeTokens / t.Elapsed.TotalSeconds;
            if (persistent && cache.PersistentDecodeApplies == true && model.PersistentDecodeForm is { } f)
                persistentForm = $"unroll {f.Unroll}, {f.BlocksPerSM} blocks/SM";
            model.UsePersistentDecode = false;
            return tokS;
        }
        // Where the kernel does not apply or the driver refuses it, the engine decodes eagerly without it: "did not apply".
        double eager = Decode(graphs: false), graph = Decode(graphs: true), persistentTokS = Decode(graphs: false, persistent: true);
        double onDevice = Decode(graphs: true, onDevice: true);
        var tried = SettingsTried.Select(setting =>
        {
            var undo = setting.Set(dev);
            try { return Decode(graphs: true, onDevice: true); }
            finally { undo(); }
        }).ToArray();
        dev.GemvUnroll = CudaDevice.GemvUnrolls[0];   // the baseline of the GEMV unroll choice: the first everywhere
        double graphFirstUnroll = Decode(graphs: true);
        dev.GemvUnroll = null;
        double graphNewArrays = Decode(graphs: true, newArrays: true);
        dev.StreamGemvs = false;   // the baseline of the streamed GEMVs: none (a block per 8 rows; the fused norms' rows looped over)
        double graphBlockGemvs = Decode(graphs: true);
        dev.StreamGemvs = null;
        Ablation? without = null;
        if (ablations)
        {
            double Step(CudaLlama.Skipped skip) { model.SkipForTiming = skip; return 1e3 / Decode(graphs: true); }
            double noNorms = Step(CudaLlama.Skipped.DecodeNorms), noAttention = Step(CudaLlama.Skipped.Attention);
            double prefillNoAttention = Prefill(engineTunes);
            double gemvs = Step(CudaLlama.Skipped.DecodeNorms | CudaLlama.Skipped.Attention);
            model.SkipForTiming = CudaLlama.Skipped.None;
            without = new(prefillNoAttention, noNorms, noAttention, gemvs);
            double step = 1e3 / graph;
            Console.WriteLine($"{name}: left out for timing: attention from prefill {prefillMs:F1} -> {prefillNoAttention:F1} ms (it costs {prefillMs - prefillNoAttention:F1} ms); " +
                              $"from a decode step of {step:F3} ms (graphs) the norms -> {noNorms:F3} ms (cost {step - noNorms:F3}), attention -> {noAttention:F3} " +
                              $"(cost {step - noAttention:F3}), both -> {gemvs:F3} ms (GEMVs and the rest)");
        }
        if (profile)
        {
            // Each profiled segment starts with the embedding kernel: prefill, then two one-token decode steps; then
            // the same after a prompt of ProfiledShortPrompt tokens (the benchmark's decode lengths, where the shares
            // of 4-warp decode attention are merged and those of 8 warps are not), and a third step there with blocks
            // of the other number of warps (tools/gpu/kernel_times.py names the phases).
            model.UseCudaGraphs = false;
            int shortPrompt = Math.Min(ProfiledShortPrompt, prefillTokens);
            using var cache = model.NewCache(prefillTokens + 2);
            using var shortCache = model.NewCache(shortPrompt + 3);
            dev.Synchronize();
            Interop.CudaDriver.Profile(true);
            int token = Next(model.Forward(prompt, cache, lastOnly: true));
            for (int i = 0; i < 2; i++) token = Next(model.Forward([token], cache, lastOnly: true));
            token = Next(model.Forward(prompt.AsSpan(0, shortPrompt), shortCache, lastOnly: true));
            for (int i = 0; i < 2; i++) token = Next(model.Forward([token], shortCache, lastOnly: true));
            var undo = OtherDecodeWarps.Set(dev);
            try { Next(model.Forward([token], shortCache, lastOnly: true)); }
            finally { undo(); }
            dev.Synchronize();
            Interop.CudaDriver.Profile(false);
        }
        Console.WriteLine($"{name}: prefill {prefillMs:F1} ms ({otherTuningMs:F1} with GEMM tuning {(engineTunes ? "off" : "on")}), decode eager {eager:F1} tok/s, graphs {graph:F1} tok/s, " +
                          $"persistent kernel {persistentTokS:F1} tok/s ({persistentForm}), greedy with the tokens chosen on the device {onDevice:F1} tok/s " +
                          $"(with the settings tried below: {string.Join(", ", tried.Select(t => $"{t:F1}"))})");
        string forms = string.Join(", ", dev.GemvChoices.GroupBy(c => c.Value).OrderBy(g => g.Key.Unroll).ThenBy(g => g.Key.Streamed).ThenBy(g => g.Key.ByRow).ThenBy(g => g.Key.Balanced).Select(g => $"{g.Count()} at {g.Key}"));
        Console.WriteLine($"{name}: decode (graphs) with a new logits array per token {graphNewArrays:F1} tok/s, one buffer {graph / graphNewArrays:F2}x that");
        Console.WriteLine($"{name}: decode (graphs) with GEMV unroll {CudaDevice.GemvUnrolls[0]} everywhere {graphFirstUnroll:F1} tok/s, " +
                          $"tuned {graph / graphFirstUnroll:F2}x that; with no GEMV streamed {graphBlockGemvs:F1} tok/s, the engine's forms " +
                          $"{graph / graphBlockGemvs:F2}x that (CudaDevice.StreamGemvs); GEMV shapes so far by form: {forms}; decode norms so far fused into " +
                          $"their GEMV for {dev.DecodeNormFusionChoices.Count(c => c.Value > 0)} of {dev.DecodeNormFusionChoices.Count} shapes " +
                          $"({string.Join(", ", dev.DecodeNormFusionChoices.Values.Where(b => b > 0).GroupBy(b => b).OrderBy(g => g.Key).Select(g => $"{g.Count()} at {g.Key} blocks/SM"))}; CudaDevice.FuseDecodeNorms)");
        return new Result(name, prefillMs, otherTuningMs, eager, graph, persistentTokS, onDevice, model.LayerGemmParameters, model.DecodeWeightBytes,
            model.Config.LastRowPrefillFlops(prefillTokens, model.LayerWidths)) { Without = without, TriedTokS = tried };
    }

    private static int Next(ReadOnlySpan<float> logits) => Engine.Inference.Generator.ArgMax(logits);
}
