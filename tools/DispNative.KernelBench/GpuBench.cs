using DispNative.Engine;
using DispNative.Engine.Autograd;
using DispNative.Engine.Cuda;
using DispNative.Engine.IO;
using DispNative.Engine.Models;
using DispNative.Interop;

namespace DispNative.KernelBench;

/// <summary>CUDA kernel microbenchmarks at LLaMA-2-7B shapes (d 4096, ffn 11008, 2048 tokens, bf16): CUDA-event
/// timing, warm-up, median of N; effective bandwidth or TFLOP/s against the device's peaks, with a naive variant
/// beside the tuned one where it teaches something. <c>--smoke</c> runs the same code at <see cref="BenchShapes.Smoke"/>.</summary>
internal static class GpuBench
{
    public static void Run(int repeats, ModelConfig shape, int tokens)
    {
        int D = shape.HiddenSize, Ffn = shape.IntermediateSize, T = tokens, Heads = shape.NumHeads, HeadDim = shape.HeadDim, Vocab = shape.VocabSize;
        using var dev = CudaDevice.Open();
        var info = dev.Info;
        var ops = new CudaOps(dev);
        Console.WriteLine($"device: {info}, driver {info.DriverVersion}, NVRTC {Nvrtc.Version}, cuBLASLt {CublasLt.LibraryName}");
        Console.WriteLine($"kernels: {dev.Compiler.CompileAll()}");
        double? bw = info.PeakBandwidth, tf = info.PeakBf16Flops;
        Console.WriteLine($"peak DRAM bandwidth: {(bw is double b ? $"{b / 1e12:F2} TB/s" : "unknown (driver reports no memory clock)")}" +
                          $" = 2 × {info.MemoryClockKHz} kHz × {info.BusWidthBits} bit / 8");
        Console.WriteLine($"peak dense bf16: {(tf is double f ? $"{f / 1e12:F0} TFLOP/s" : "unknown")} = {info.Multiprocessors} SMs × {info.SmClockKHz} kHz × {(info.Major >= 9 ? 4096 : 2048)} FLOP/clk/SM");
        Console.WriteLine();
        var acceptance = new IssueTargets(IssueTargets.AppliesTo(shape, tokens));
        string Percent(double f) => $"{100 * f:F1}%";

        // Each timed launch starts with a cold L2 (a 256 MiB buffer, several times any L2, is written first, outside the
        // timing): repeating a kernel whose operands fit in L2 (50 MB on an H100) would otherwise read them from L2, not
        // HBM. The time of an empty launch measured the same way (events and launch, 3.4 µs on the H100) is subtracted:
        // it would be a sixth of a 20 µs kernel's figure, and in a forward pass kernels follow each other without it.
        using var flush = dev.Allocate(DType.F32, (shape == BenchShapes.Smoke ? 1L << 20 : 256L << 20) / 4);   // the smoke run only checks the code
        using var empty = dev.Allocate(DType.F32, 1);
        // Writing the flush buffer leaves the L2 full of dirty lines, which the timed kernel writes back as it evicts
        // them. With `clean` the buffer is also read after it is written (CudaDevice.EvictL2): a cold L2 of clean lines.
        bool clean = false;
        float Cold(Action work)
        {
            ops.FillConstant(flush, 0f);
            if (clean) dev.EvictL2(flush);
            return dev.Time(work);
        }
        float MedianOf(Func<float> sample) => MedianOfSamples(repeats, sample);
        float launchMs = MedianOf(() => Cold(() => ops.FillConstant(empty, 0f)));
        Console.WriteLine($"empty launch between two events: {launchMs * 1e3:F1} µs (subtracted from every time below)");
        Console.WriteLine();
        Console.WriteLine($"{$"kernel (d {D}, ffn {Ffn}, {T} tokens)",-58} {"ms",8} {"rate",14} {"% peak",7}");
        float Median(Action work)
        {
            for (int i = 0; i < 3; i++) work();
            return Math.Max(MedianOf(() => Cold(work)) - launchMs, 1e-4f);
        }
        double Bandwidth(string name, double bytes, Action work)
        {
            float ms = Median(work);
            double rate = bytes / (ms * 1e-3);
            Console.WriteLine($"{name,-58} {ms,8:F3} {rate / 1e9,10:F0} GB/s {(bw is double p ? $"{100 * rate / p,6:F1}%" : "     -")}");
            return rate;
        }
        double Flops(string name, double flops, Action work)
        {
            float ms = Median(work);
            double rate = flops / (ms * 1e-3);
            Console.WriteLine($"{name,-58} {ms,8:F3} {rate / 1e12,8:F1} TFLOP/s {(tf is double p ? $"{100 * rate / p,6:F1}%" : "     -")}");
            return rate;
        }

        var rng = new Rng(1);
        float[] Rand(long n) { var a = new float[n]; for (long i = 0; i < n; i++) a[i] = rng.NextGaussian() * 0.1f; return a; }
        int[] Keep(int full, double frac) => Enumerable.Range(0, full).Where(_ => rng.NextDouble() < frac).ToArray();

        int w65 = 0;
        int[] kept = Keep(D, 0.65);
        using (var x = dev.Upload(Rand((long)T * D)))
        using (var gamma = dev.Upload(Rand(D), DType.BF16))
        using (var idx = dev.Upload(kept))
        using (var h = dev.Allocate(DType.BF16, (long)T * D))
        using (var delta = dev.Upload(Rand((long)T * D)))
        {
            int w = (int)idx.Length; w65 = w;
            // Norm traffic: the full row is read for the statistics, the selected channels written once.
            double normBytes = T * (D * 4.0 + D * 2.0), gatherBytes = T * (D * 4.0 + w * 2.0);
            Bandwidth("rmsnorm dense (f32 x -> bf16)", normBytes, () => ops.GatherRmsNorm(x, gamma, null, h, T, D, 1e-5f));
            double gather = Bandwidth($"gather-rmsnorm {D}->{w}, row staged in smem (tuned)", gatherBytes, () => ops.GatherRmsNorm(x, gamma, idx, h, T, D, 1e-5f));
            Bandwidth($"gather-rmsnorm {D}->{w}, row re-read from global (naive)", gatherBytes,
                () => dev.Launch("norm", "rmsnorm_gather_bf16", (uint)T, 1024, 0, x, gamma, idx, h, D, w, w, 1e-5f, 0));
            // The same kernel compiled for 8 blocks of 256 threads per SM (at most 32 registers): does occupancy limit it?
            Bandwidth($"gather-rmsnorm {D}->{w}, 8 blocks of 256 per SM (<= 32 regs)", gatherBytes,
                () => dev.Launch("norm", "rmsnorm_gather_occupancy_bf16", (uint)T, 256, (uint)(D * 4), x, gamma, idx, h, D, w, w, 1e-5f, 1));
            // And with gamma's loads (which wait for idx) issued after the row's first loads, not ahead of them.
            Bandwidth($"gather-rmsnorm {D}->{w}, gamma loaded after the row", gatherBytes,
                () => dev.Launch("norm", "rmsnorm_gather_row_first_bf16", (uint)T, 256, (uint)(D * 4), x, gamma, idx, h, D, w, w, 1e-5f, 1));
            // Index-add traffic: the delta, and every 32-byte sector of the residual row that holds a selected channel,
            // read and written (DRAM moves whole sectors; at 65% of the channels that is every sector of the row). The
            // selected channels' bytes alone (useful bytes) are printed beside it.
            long sectors = kept.Select(c => c / 8).Distinct().LongCount();
            double usefulBytes = T * w * 12.0, sectorBytes = T * (w * 4.0 + sectors * 32 * 2.0);
            double indexAdd = Bandwidth($"index-add {w}->{D} (f32 delta), row staged (tuned)", sectorBytes, () => ops.IndexAdd(x, delta, idx, null, T, D));
            double direct = Bandwidth($"index-add {w}->{D} (f32 delta), loads wait for idx (naive)", sectorBytes,
                () => dev.Launch("residual", "index_add_f32", (uint)T, 672, 0, x, delta, idx, 0UL, 1f, D, w, w));
            Console.WriteLine($"{"  staged vs direct",-58} {indexAdd / direct,8:F2}x");
            Console.WriteLine($"{$"  index-add staged, useful bytes only ({sectors} of {D / 8} sectors touched)",-58} {usefulBytes / sectorBytes * indexAdd / 1e9,23:F0} GB/s" +
                              (bw is double pk ? $" {100 * usefulBytes / sectorBytes * indexAdd / pk,6:F1}%" : ""));
            // What moving these bytes costs at this size with no reduction and no gather: each row read and its first w
            // columns written (a streaming kernel), and a device-to-device copy of as many bytes (half read, half written).
            Bandwidth($"ceiling: read rows, write their first {w} columns (no norm)", gatherBytes,
                () => dev.Launch("convert", "stream_prefix_f32_to_bf16", CudaDevice.GridFor((long)T * D / 4), 256, 0, x, h, (long)T, D, w));
            Bandwidth("ceiling: device-to-device copy of the same bytes", gatherBytes,
                () => CudaDriver.CopyDtoD(delta.Pointer, x.Pointer, (long)(gatherBytes / 2), dev.Stream.DangerousGetHandle()));
            acceptance.AtLeast(3, "gather-rmsnorm >= 70% of HBM bandwidth", gather / bw, 0.7, Percent);
            acceptance.AtLeast(3, "index-add >= 70% of HBM bandwidth (32-byte sectors moved)", indexAdd / bw, 0.7, Percent);
            Bandwidth("residual add dense (f32)", T * D * 12.0, () => ops.IndexAdd(x, delta, null, null, T, D));
            // A pruned block's write-back and the next gather-norm (the forward's pattern): the residual is read twice
            // and written once by the two kernels, read and written once by the fused one. Same bytes counted for both.
            double pairBytes = T * (D * 8.0 + w * 4.0 + w * 2.0);
            double twoLaunches = Bandwidth($"index-add {w}->{D} + gather-rmsnorm, two launches", pairBytes,
                () => { ops.IndexAdd(x, delta, idx, null, T, D); ops.GatherRmsNorm(x, gamma, idx, h, T, D, 1e-5f); });
            double oneLaunch = Bandwidth($"index-add {w}->{D} + gather-rmsnorm, one launch (tuned)", pairBytes,
                () => ops.IndexAddRmsNorm(x, delta, idx, null, w, gamma, idx, h, T, D, 1e-5f));
            Console.WriteLine($"{"  one launch vs two",-58} {oneLaunch / twoLaunches,8:F2}x");
            Bandwidth($"index-add {w}->{D} + gather-rmsnorm, 8 blocks of 256 per SM", pairBytes,
                () => dev.Launch("norm", "add_rmsnorm_gather_occupancy_bf16", (uint)T, 256, (uint)(D * 4), x, delta, idx, 0UL, 1f, w, w, gamma, idx, h, D, w, w, 1e-5f));
            acceptance.AtLeast(3, "index-add fused into the next gather-norm >= 70% of HBM bandwidth", oneLaunch / bw, 0.7, Percent);

            // The same kernels after a clean flush (a diagnostic beside the figures above, which the targets use): how much
            // of their time is the write-back of the flush's dirty lines.
            clean = true;
            Bandwidth($"gather-rmsnorm {D}->{w} (tuned), clean cold L2", gatherBytes, () => ops.GatherRmsNorm(x, gamma, idx, h, T, D, 1e-5f));
            Bandwidth($"index-add {w}->{D} (tuned), clean cold L2", sectorBytes, () => ops.IndexAdd(x, delta, idx, null, T, D));
            Bandwidth($"index-add + gather-rmsnorm, one launch, clean cold L2", pairBytes,
                () => ops.IndexAddRmsNorm(x, delta, idx, null, w, gamma, idx, h, T, D, 1e-5f));
            Bandwidth("residual add dense (f32), clean cold L2", T * D * 12.0, () => ops.IndexAdd(x, delta, null, null, T, D));
            clean = false;
        }

        // Prefill's RoPE: q rotated in place, the new keys rotated where their projection wrote them in the cache.
        using (var queries = dev.Upload(Rand((long)T * Heads * HeadDim), DType.BF16))
        using (var kCache = dev.Upload(Rand((long)T * Heads * HeadDim), DType.BF16))
        using (var vCache = dev.Allocate(DType.BF16, (long)T * Heads * HeadDim))
        using (var frequencies = dev.Upload(Enumerable.Range(0, HeadDim / 2).Select(new Engine.Cpu.Rope(HeadDim, 10000).InverseFrequency).ToArray()))
            Bandwidth($"rope of q and of the keys in the cache ({T} x {Heads} + {Heads} heads, bf16)", 4.0 * T * Heads * HeadDim * 2,
                () => ops.RopeKvAppend(queries, null, null, kCache, vCache, frequencies, T, Heads, Heads, HeadDim, 0));

        using (var g = dev.Upload(Rand((long)T * Ffn), DType.BF16))
        using (var u = dev.Upload(Rand((long)T * Ffn), DType.BF16))
        {
            Bandwidth($"swiglu bf16 ({T} x {Ffn}), exact exp and divide", T * Ffn * 6.0, () => ops.SiluMul(g, u, g, (long)T * Ffn, fastMath: false));
            Bandwidth($"swiglu bf16 ({T} x {Ffn}), approximate exp and divide (engine)", T * Ffn * 6.0, () => ops.SiluMul(g, u, g, (long)T * Ffn));
            clean = true;
            Bandwidth($"swiglu bf16 ({T} x {Ffn}), clean cold L2", T * Ffn * 6.0, () => ops.SiluMul(g, u, g, (long)T * Ffn));
            clean = false;
        }

        using (var logits = dev.Upload(Rand((long)T * Vocab)))
        using (var targets = dev.Upload(Enumerable.Range(0, T).Select(i => i % Vocab).ToArray()))
        using (var loss = dev.Allocate(DType.F32, T))
        using (var grad = dev.Allocate(DType.F32, (long)T * Vocab))
            Bandwidth($"cross-entropy + gradient ({T} x {Vocab}, f32)", T * Vocab * 12.0, () => ops.CrossEntropy(logits, targets, loss, grad, T, Vocab, 1f / T));

        // Training's mask gradients: a column sum over the block's rows, five per layer (f32 and bf16 activations).
        void MaskGrad(int width, DType xType)
        {
            using var dy = dev.Upload(Rand((long)T * width));
            using var x = dev.Upload(Rand((long)T * width), xType);
            using var dmask = dev.Allocate(DType.F32, width);
            double bytes = (double)T * width * (4 + xType.Size());
            string name = $"mask gradient {T} x {width}, {xType.ToString().ToLowerInvariant()} activation";
            double naive = Bandwidth($"{name}, thread per column (naive)", bytes, () => ops.MaskColumnsGrad(dy, x, dmask, T, width, naive: true));
            double tiled = Bandwidth($"{name}, tiled (tuned)", bytes, () => ops.MaskColumnsGrad(dy, x, dmask, T, width));
            Console.WriteLine($"{"  tiled vs naive",-58} {tiled / naive,8:F2}x");
        }
        MaskGrad(D, DType.F32);
        MaskGrad(Ffn, DType.BF16);

        Console.WriteLine();
        // The heuristic's first choice (the engine's default), then the fastest of the algorithms it offers, timed on
        // the shape's first call (CudaDevice.TuneGemms). The 7B shapes are all above the engine's size threshold; the
        // smoke shapes are tuned too.
        bool engineTunes = dev.TuneGemms;
        dev.MinTunedGemmFlops = 0;
        dev.MinTunedGemvElements = 0;
        // usefulFlops: what the rates count (default 2·m·n·k); less for a padded shape, whose zero channels do no work.
        double Gemm(string name, int m, int n, int k, double? usefulFlops = null)
        {
            double flops = usefulFlops ?? 2.0 * m * n * k;
            using var a = dev.Upload(Rand((long)m * k), DType.BF16);
            using var b = dev.Upload(Rand((long)n * k), DType.BF16);
            using var c = dev.Allocate(DType.BF16, (long)m * n);
            dev.TuneGemms = false;
            double first = Flops($"{name}, heuristic's first", flops, () => dev.Gemm(a, b, c, m, n, k));
            dev.TuneGemms = true;
            dev.Gemm(a, b, c, m, n, k);   // chooses the algorithm
            var (_, chosen, offered) = dev.GemmAlgorithms.Single(p => p.Shape.StartsWith($"{m},{n},{k},1,", StringComparison.Ordinal));
            double tuned = Flops($"  tuned: algorithm #{chosen} of {offered}", flops, () => dev.Gemm(a, b, c, m, n, k));
            Console.WriteLine($"{"  tuned vs heuristic's first",-58} {tuned / first,8:F2}x");
            dev.TuneGemms = engineTunes;
            return engineTunes ? tuned : first;   // the engine's
        }
        double bigGemm = Gemm($"gemm bf16 {2 * T} x {Ffn} x {D}", 2 * T, Ffn, D);
        acceptance.AtLeast(3, "bf16 GEMM 4096 x 11008 x 4096 >= 550 TFLOP/s", bigGemm, 550e12, r => $"{r / 1e12:F0} TFLOP/s");
        Gemm($"gemm bf16 {T} x {Ffn} x {D} (up, dense)", T, Ffn, D);
        int mid65 = (int)(Ffn * 0.65);
        Gemm($"gemm bf16 {T} x {mid65} x {w65} (up, pruned 65%)", T, mid65, w65);
        Gemm($"gemm bf16 {T} x {w65} x {mid65} (down, pruned 65%)", T, w65, mid65);
        // The engine stores pruned sites padded to a multiple of 8 (CudaOps.Padded): 16-byte aligned rows.
        int pw = CudaOps.Padded(w65), pm = CudaOps.Padded(mid65);
        Gemm($"gemm bf16 {T} x {pm} x {pw} (up, padded)", T, pm, pw);
        Gemm($"gemm bf16 {T} x {pw} x {pm} (down, padded)", T, pw, pm);
        // Padded to 64 (CudaLlama.Padding 64): whole tiles for a few zero channels more. Rates count the unpadded FLOPs.
        int pw64 = CudaOps.Padded(w65, 64), pm64 = CudaOps.Padded(mid65, 64);
        Gemm($"gemm bf16 {T} x {pm64} x {pw64} (up, padded to 64; useful FLOPs)", T, pm64, pw64, 2.0 * T * mid65 * w65);
        Gemm($"gemm bf16 {T} x {pw64} x {pm64} (down, padded to 64; useful FLOPs)", T, pw64, pm64, 2.0 * T * w65 * mid65);

        // Decode's batch-1 linear layers: the warp-per-row GEMV kernel against cuBLASLt on the same operands.
        void Gemv(string name, int n, int k)
        {
            using var x = dev.Upload(Rand(k), DType.BF16);
            using var w = dev.Upload(Rand((long)n * k), DType.BF16);
            using var y = dev.Allocate(DType.BF16, n);
            double bytes = 2.0 * n * k;
            dev.UseGemv = false;
            double cublas = Bandwidth($"{name}, cuBLASLt (baseline)", bytes, () => dev.Gemm(x, w, y, 1, n, k));
            dev.UseGemv = true;
            // A block per 8 rows (the former kernel), then resident blocks whose warps stream their rows (rounds of loads
            // across row ends, the full grid), then the streamed variants and the engine's choice among them all.
            double Form(bool streamed)
            {
                (dev.StreamGemvs, dev.StreamGemvsByRow, dev.BalanceGemvRows) = (streamed, false, false);
                string form = streamed ? "streamed over rows" : "block per 8 rows";
                foreach (int u in CudaDevice.GemvUnrolls)
                {
                    dev.GemvUnroll = u;
                    Bandwidth($"{name}, {form}, unroll {u}", bytes, () => dev.Gemm(x, w, y, 1, n, k));
                }
                dev.GemvUnroll = null;   // the fastest unroll, timed on the shape's first call
                return Bandwidth($"{name}, {form}, unroll tuned", bytes, () => dev.Gemm(x, w, y, 1, n, k));
            }
            double blocks = Form(streamed: false), streamed = Form(streamed: true);
            Console.WriteLine($"{"  streamed vs block per 8 rows / vs cuBLASLt",-58} {"",8} {streamed / blocks,5:F2} / {streamed / cublas,4:F2} x");
            StreamedVariants(name, bytes, () => dev.Gemm(x, w, y, 1, n, k), streamed, byRow: true);
        }
        // The streamed form's variants, each at its fastest unroll, against its rounds across rows on the full grid
        // (`streamed`): a round of loads inside one row, as it streamed before (CudaDevice.StreamGemvsByRow; bf16 plain,
        // q/k/v and gate/up only: `byRow`), and the rows balanced over fewer blocks (CudaDevice.BalanceGemvRows). Then
        // the engine's: every form timed on the shape's first call, the fastest kept.
        void StreamedVariants(string name, double bytes, Action run, double streamed, bool byRow)
        {
            void Variant(string what, string vs, bool rows, bool balanced)
            {
                (dev.StreamGemvs, dev.StreamGemvsByRow, dev.BalanceGemvRows) = (true, rows, balanced);
                double rate = Bandwidth($"{name}, streamed, {what}", bytes, run);
                Console.WriteLine($"{$"  streamed vs {vs}",-58} {"",8} {streamed / rate,12:F2} x");
            }
            if (byRow) Variant("a round of loads per row (former)", "its former rounds, one row each", rows: true, balanced: false);
            Variant("rows balanced over fewer blocks", "its rows balanced", rows: false, balanced: true);
            (dev.StreamGemvs, dev.StreamGemvsByRow, dev.BalanceGemvRows) = (null, null, null);
            int known = dev.GemvChoices.Count;
            double engine = Bandwidth($"{name}, the engine's (every form timed)", bytes, run);
            string chosen = string.Join(", ", dev.GemvChoices.Skip(known).Select(c => c.Value));   // this shape's new choices
            Console.WriteLine($"{$"  the engine's ({chosen}) vs streamed",-58} {"",8} {engine / streamed,12:F2} x");
        }
        Console.WriteLine();
        Gemv($"gemv bf16 1 x {D} x {D} (q/o proj)", D, D);
        Gemv($"gemv bf16 1 x {Ffn} x {D} (gate/up)", Ffn, D);
        Gemv($"gemv bf16 1 x {D} x {Ffn} (down)", D, Ffn);
        Gemv($"gemv bf16 1 x {3 * D} x {pw} (q/k/v, pruned)", 3 * D, pw);
        Gemv($"gemv bf16 1 x {pm} x {pw} (up, pruned)", pm, pw);
        Gemv($"gemv bf16 1 x {pw} x {D} (o proj, pruned)", pw, D);
        Gemv($"gemv bf16 1 x {pw} x {pm} (down, pruned)", pw, pm);
        Gemv($"gemv bf16 1 x {Vocab} x {D} (LM head)", Vocab, D);

        // Decode's fused GEMVs against the separate launches they replace (the same weight bytes).
        Console.WriteLine();
        void Fused(string name, double bytes, Action separate, Action fused)
        {
            double a = Bandwidth($"{name}, separate launches (baseline)", bytes, separate);
            double b = Bandwidth($"{name}, fused", bytes, fused);
            Console.WriteLine($"{"  fused vs separate",-58} {"",8} {b / a,12:F2} x");
        }
        // A fused GEMV in its two forms (CudaDevice.StreamGemvs), each at its fastest unroll (streamed: rounds across rows,
        // the full grid); `other`: the unstreamed one. Then the streamed variants (byRow: with its former rounds).
        void Forms(string name, double bytes, Action run, string other = "block per 8 rows", bool byRow = true)
        {
            double Form(bool streamed)
            {
                (dev.StreamGemvs, dev.StreamGemvsByRow, dev.BalanceGemvRows) = (streamed, false, false);
                return Bandwidth($"{name}, {(streamed ? "streamed over rows" : other)}", bytes, run);
            }
            double unstreamed = Form(streamed: false), streamed = Form(streamed: true);
            Console.WriteLine($"{$"  streamed vs {other}",-58} {"",8} {streamed / unstreamed,12:F2} x");
            StreamedVariants(name, bytes, run, streamed, byRow);
        }
        int QD = shape.QDim, KVD = shape.KvDim;
        using (var x = dev.Upload(Rand(D), DType.BF16))
        using (var wq = dev.Upload(Rand((long)QD * D), DType.BF16))
        using (var wk = dev.Upload(Rand((long)KVD * D), DType.BF16))
        using (var wv = dev.Upload(Rand((long)KVD * D), DType.BF16))
        using (var yq = dev.Allocate(DType.BF16, QD))
        using (var yk = dev.Allocate(DType.BF16, KVD))
        using (var yv = dev.Allocate(DType.BF16, KVD))
        using (var wg = dev.Upload(Rand((long)Ffn * D), DType.BF16))
        using (var wu = dev.Upload(Rand((long)Ffn * D), DType.BF16))
        using (var g = dev.Allocate(DType.BF16, Ffn))
        using (var u = dev.Allocate(DType.BF16, Ffn))
        using (var residual = dev.Upload(Rand(D)))
        using (var idx = dev.Upload(Keep(D, 0.65).Take(w65).ToArray()))   // at most w65 rows: wo holds Padded(w65)
        {
            Fused($"q/k/v GEMVs 1 x {QD}+{KVD}+{KVD} x {D}", 2.0 * (QD + 2 * KVD) * D,
                () => { dev.Gemm(x, wq, yq, 1, QD, D); dev.Gemm(x, wk, yk, 1, KVD, D); dev.Gemm(x, wv, yv, 1, KVD, D); },
                () => ops.GemvQkv(x, wq, yq, QD, wk, yk, KVD, wv, yv, KVD, D));
            Fused($"gate + up GEMVs + swiglu 1 x {Ffn} x {D}", 2.0 * 2 * Ffn * D,
                () => { dev.Gemm(x, wg, g, 1, Ffn, D); dev.Gemm(x, wu, u, 1, Ffn, D); ops.SiluMul(g, u, g, Ffn); },
                () => ops.GemvSwiGlu(x, wg, wu, g, Ffn, D));
            Forms($"q/k/v GEMVs fused 1 x {QD}+{KVD}+{KVD} x {D}", 2.0 * (QD + 2 * KVD) * D, () => ops.GemvQkv(x, wq, yq, QD, wk, yk, KVD, wv, yv, KVD, D));
            Forms($"gate + up GEMVs + swiglu fused 1 x {Ffn} x {D}", 2.0 * 2 * Ffn * D, () => ops.GemvSwiGlu(x, wg, wu, g, Ffn, D));
            using (var wqp = dev.Upload(Rand((long)QD * pw), DType.BF16))
            using (var wkp = dev.Upload(Rand((long)KVD * pw), DType.BF16))
            using (var wvp = dev.Upload(Rand((long)KVD * pw), DType.BF16))
            using (var wgp = dev.Upload(Rand((long)pm * pw), DType.BF16))
            using (var wup = dev.Upload(Rand((long)pm * pw), DType.BF16))
            using (var xp = dev.Upload(Rand(pw), DType.BF16))
            {
                Forms($"q/k/v GEMVs fused 1 x {QD}+{KVD}+{KVD} x {pw} (pruned)", 2.0 * (QD + 2 * KVD) * pw, () => ops.GemvQkv(xp, wqp, yq, QD, wkp, yk, KVD, wvp, yv, KVD, pw));
                Forms($"gate + up GEMVs + swiglu fused 1 x {pm} x {pw} (pruned)", 2.0 * 2 * pm * pw, () => ops.GemvSwiGlu(xp, wgp, wup, g, pm, pw));
            }
            using (var att = dev.Upload(Rand(QD), DType.BF16))
            using (var wo = dev.Upload(Rand((long)pw * QD), DType.BF16))
            using (var delta = dev.Allocate(DType.F32, pw))
            {
                int n = (int)idx.Length;
                Fused($"o_proj GEMV + index-add {QD} -> {n} of {D} (pruned)", 2.0 * n * QD,
                    () => { dev.Gemm(att, wo, delta, 1, CudaOps.Padded(n), QD); ops.IndexAdd(residual, delta, idx, null, 1, D, inputStride: CudaOps.Padded(n)); },
                    () => ops.GemvIndexAdd(att, wo, residual, idx, D, QD));
            }
            // Decode's norm inside the GEMV that reads it (every block normalizes the row itself) against the norm's own
            // launch before the GEMV; both launched programmatically, as a decode step runs them. Rates: weight bytes.
            using var gamma = dev.Upload(Rand(D), DType.BF16);
            using var h = dev.Allocate(DType.BF16, D);
            dev.ProgrammaticLaunch = true;
            void NormFused(string name, double bytes, Action run)
            {
                Fused(name, bytes, () => { dev.FuseDecodeNorms = false; run(); }, () => { dev.FuseDecodeNorms = true; run(); });
                Forms($"{name}, fused", bytes, () => { dev.FuseDecodeNorms = true; run(); }, "rows looped over", byRow: false);
                dev.FuseDecodeNorms = null;
            }
            foreach (var (site, sel, k) in new[] { ("dense", (DeviceTensor?)null, D), ($"{w65} of {D} kept", idx, pw) })
            {
                int mid = sel == null ? Ffn : pm;   // the weights' first rows of k elements (pruned: fewer, shorter rows)
                NormFused($"norm + q/k/v GEMVs 1 x {QD + 2 * KVD} x {k} ({site})", 2.0 * (QD + 2 * KVD) * k,
                    () => ops.NormGemvQkv(residual, gamma, sel, D, 1e-5f, h, wq, yq, QD, wk, yk, KVD, wv, yv, KVD, k));
                NormFused($"norm + gate/up GEMVs + swiglu 1 x {mid} x {k} ({site})", 2.0 * 2 * mid * k,
                    () => ops.NormGemvSwiGlu(residual, gamma, sel, D, 1e-5f, h, wg, wu, g, mid, k));
            }
            dev.ProgrammaticLaunch = false;
        }

        Console.WriteLine();
        using var q = dev.Upload(Rand((long)T * Heads * HeadDim), DType.BF16);
        using var kc = dev.Upload(Rand((long)T * Heads * HeadDim), DType.BF16);
        using var vc = dev.Upload(Rand((long)T * Heads * HeadDim), DType.BF16);
        using var o = dev.Allocate(DType.BF16, (long)T * Heads * HeadDim);
        double causalFlops = 2.0 * 2 * Heads * HeadDim * T * (T + 1) / 2;
        double simt = Flops($"attention prefill bf16 SIMT, naive (T {T}, {Heads} heads, head_dim {HeadDim}, causal)", causalFlops,
            () => ops.Attention(q, kc, vc, o, T, 0, Heads, Heads, HeadDim, null, PrefillKernel.Simt));
        double rows16 = Flops("attention prefill bf16 tensor cores, 16 rows/warp, Q in registers", causalFlops,
            () => ops.Attention(q, kc, vc, o, T, 0, Heads, Heads, HeadDim, null, PrefillKernel.TensorCores16Rows));
        double attn = Flops("attention prefill bf16 tensor cores, 32 rows/warp (FA2 tiling)", causalFlops,
            () => ops.Attention(q, kc, vc, o, T, 0, Heads, Heads, HeadDim, null, PrefillKernel.TensorCores32Rows));
        // The engine's kernel rescales the output only when a row's maximum grows by more than 2^8 (softmax_tile).
        double always = Flops("the same, output rescaled on every key tile", causalFlops,
            () => ops.Attention(q, kc, vc, o, T, 0, Heads, Heads, HeadDim, null, PrefillKernel.TensorCores32RowsRescaleEveryTile));
        Console.WriteLine($"{"  lazy rescaling vs every tile",-58} {"",8} {attn / always,12:F2} x");
        double single = Flops("the same, single K/V buffers, four barriers per tile", causalFlops,
            () => ops.Attention(q, kc, vc, o, T, 0, Heads, Heads, HeadDim, null, PrefillKernel.TensorCores32RowsSingleBuffer));
        Console.WriteLine($"{"  double-buffered (one barrier per tile) vs single",-58} {"",8} {attn / single,12:F2} x");
        double formerSoftmax = Flops("the same, exp2f and probabilities rounded one at a time", causalFlops,
            () => ops.Attention(q, kc, vc, o, T, 0, Heads, Heads, HeadDim, null, PrefillKernel.TensorCores32RowsBaselineSoftmax));
        Console.WriteLine($"{"  bare ex2 and paired rounding vs exp2f, one at a time",-58} {"",8} {attn / formerSoftmax,12:F2} x");
        Console.WriteLine($"{"tensor cores 16 rows/warp vs SIMT",-58} {"",8} {rows16 / simt,12:F2} x");
        Console.WriteLine($"{"tensor cores 32 rows/warp vs 16 rows/warp",-58} {"",8} {attn / rows16,12:F2} x");
        // The same FLOPs as plain GEMMs: per head S = Q·Kᵀ [T,T,hd] and O = P·V [T,hd,T], batched over heads.
        using var s = dev.Allocate(DType.BF16, (long)Heads * T * T);
        using var qkPlan = new CublasLt.MatmulPlan(dev.Lt, T, T, HeadDim, CudaDataType.R16BF, CudaDataType.R16BF, CudaDevice.GemmWorkspaceBytes,
            batch: Heads, strideA: (long)T * HeadDim, strideB: (long)T * HeadDim, strideC: (long)T * T);
        using var pvPlan = new CublasLt.MatmulPlan(dev.Lt, T, HeadDim, T, CudaDataType.R16BF, CudaDataType.R16BF, CudaDevice.GemmWorkspaceBytes,
            batch: Heads, strideA: (long)T * T, strideB: (long)T * HeadDim, strideC: (long)T * HeadDim);
        using var ws = dev.Allocate(DType.F32, CudaDevice.GemmWorkspaceBytes / 4);
        nint stream = dev.Stream.DangerousGetHandle();
        double gemmRate = Flops("cuBLASLt batched GEMMs of the same shapes (QK^T + PV, full)", 4.0 * Heads * HeadDim * T * T, () =>
        {
            qkPlan.Run(dev.Lt, q.Pointer, kc.Pointer, s.Pointer, 1, 0, ws.Pointer, CudaDevice.GemmWorkspaceBytes, stream);
            pvPlan.Run(dev.Lt, s.Pointer, vc.Pointer, o.Pointer, 1, 0, ws.Pointer, CudaDevice.GemmWorkspaceBytes, stream);
        });
        Console.WriteLine($"{"attention prefill (32 rows/warp) vs those GEMMs",-58} {"",8} {100 * attn / gemmRate,12:F1} %");
        // The kernel the engine runs (warpgroup MMA where it builds); both warpgroup-MMA forms are timed again at the end.
        double engineAttn = ops.PrefillFor(DType.BF16, HeadDim) switch
        {
            PrefillKernel.TensorCores32Rows => attn,
            PrefillKernel.TensorCores16Rows => rows16,
            var other => Flops($"attention prefill bf16, {other} (CudaDevice.PrefillAttention)", causalFlops,
                () => ops.Attention(q, kc, vc, o, T, 0, Heads, Heads, HeadDim, null, other)),
        };
        acceptance.AtLeast(3, "prefill attention >= 40% of same-FLOP cuBLASLt GEMMs", engineAttn / gemmRate, 0.4, Percent);
        double kvBytes = 2.0 * T * Heads * HeadDim * 2;
        double naiveDecode = Bandwidth($"attention decode bf16, naive: block per head (position {T - 1}, KV read)", kvBytes,
            () => ops.Attention(q, kc, vc, o, 1, T - 1, Heads, Heads, HeadDim, null, decode: DecodeKernel.Naive));
        using var decodeScratch = ops.NewDecodeScratch(Heads, HeadDim);
        double SplitDecode(DecodeKernel kernel, int keys) => Bandwidth(
            $"attention decode bf16, split-KV, {CudaOps.DecodeSplits(T, 0, keys)} shares" + (kernel == DecodeKernel.SplitKv ? ", merged" : " + combine"),
            kvBytes, () => ops.Attention(q, kc, vc, o, 1, T - 1, Heads, Heads, HeadDim, null, decodeScratch: decodeScratch, decode: kernel, decodeKeysPerSplit: keys));
        const int narrowShare = 64;   // keys per share of the baseline
        double splitTwoLaunches = SplitDecode(DecodeKernel.SplitKvCombineKernel, CudaOps.DecodeKeysPerSplit);
        double splitDecode = SplitDecode(DecodeKernel.SplitKv, CudaOps.DecodeKeysPerSplit);   // what the engine runs
        double narrowTwoLaunches = SplitDecode(DecodeKernel.SplitKvCombineKernel, narrowShare), narrowMerged = SplitDecode(DecodeKernel.SplitKv, narrowShare);
        Console.WriteLine($"{$"split-KV: last block merges vs combine kernel ({CudaOps.DecodeKeysPerSplit} / {narrowShare} keys)",-58} {"",8} {splitDecode / splitTwoLaunches,5:F2} / {narrowMerged / narrowTwoLaunches,4:F2} x");
        Console.WriteLine($"{$"split-KV: {CudaOps.DecodeKeysPerSplit}-key vs {narrowShare}-key shares (last block merges)",-58} {"",8} {splitDecode / narrowMerged,12:F2} x");
        Console.WriteLine($"{"split-KV (engine) vs naive decode",-58} {"",8} {splitDecode / naiveDecode,12:F2} x");
        // The engine's split-KV decode under another setting (the label read with it set), then put back.
        double SplitDecodeWith(InferenceBench.Setting setting, Func<string> label)
        {
            var undo = setting.Set(dev);
            try { return Bandwidth(label(), kvBytes, () => ops.Attention(q, kc, vc, o, 1, T - 1, Heads, Heads, HeadDim, null, decodeScratch: decodeScratch)); }
            finally { undo(); }
        }
        int otherWarps = 0;
        double otherBlocks = SplitDecodeWith(InferenceBench.OtherDecodeWarps,
            () => $"attention decode bf16, split-KV, blocks of {otherWarps = dev.DecodeAttentionWarps} warps");
        Console.WriteLine($"{$"split-KV: blocks of {otherWarps} vs {dev.DecodeAttentionWarps} warps (CudaDevice.DecodeAttentionWarps)",-58} {"",8} {otherBlocks / splitDecode,12:F2} x");
        foreach (int keys in CudaOps.DecodeRescaleKeysBuilt.Where(k => k != dev.DecodeAttentionRescaleKeys))
        {
            string how = $"{keys}-key rescale" + (keys == 1 ? ", loop merge" : "");
            double rescaled = SplitDecodeWith(InferenceBench.DecodeRescale(keys), () => $"attention decode bf16, split-KV, {how}");
            Console.WriteLine($"{$"split-KV: {how} vs {dev.DecodeAttentionRescaleKeys}-key (engine)",-58} {"",8} {rescaled / splitDecode,12:F2} x");
        }
        // The decode step's RoPE and cache append: their own kernel before the attention, or inside its launch.
        using var kNew = dev.Upload(Rand((long)Heads * HeadDim), DType.BF16); using var vNew = dev.Upload(Rand((long)Heads * HeadDim), DType.BF16);
        using var invFreq = dev.Upload(Enumerable.Range(0, HeadDim / 2).Select(new Engine.Cpu.Rope(HeadDim, 10000).InverseFrequency).ToArray());
        double ropeThenAttention = Bandwidth("decode rope + kv append, then split-KV attention", kvBytes, () =>
        {
            ops.RopeKvAppend(q, kNew, vNew, kc, vc, invFreq, 1, Heads, Heads, HeadDim, T - 1);
            ops.Attention(q, kc, vc, o, 1, T - 1, Heads, Heads, HeadDim, null, decodeScratch: decodeScratch);
        });
        double ropeInAttention = Bandwidth("decode rope + kv append + attention, one launch", kvBytes,
            () => ops.RopeKvAppendAttention(q, kNew, vNew, kc, vc, invFreq, o, T - 1, Heads, Heads, HeadDim, null, decodeScratch: decodeScratch));
        Console.WriteLine($"{"decode rope + append + attention: one launch vs two",-58} {"",8} {ropeInAttention / ropeThenAttention,12:F2} x");

        // Training attention (issue 4): forward with log-sum-exp, then the backward, SIMT against the GEMM formulation.
        using var lse = dev.Allocate(DType.F32, (long)Heads * T); using var dsum = dev.Allocate(DType.F32, (long)Heads * T);
        using var dOut = dev.Upload(Rand((long)T * Heads * HeadDim));
        using var dq = dev.Allocate(DType.F32, (long)T * Heads * HeadDim);
        using var dk = dev.Allocate(DType.F32, (long)T * Heads * HeadDim); using var dv = dev.Allocate(DType.F32, (long)T * Heads * HeadDim);
        Flops($"attention training forward with lse, {ops.PrefillFor(DType.BF16, HeadDim)}", causalFlops, () => ops.AttentionForTraining(q, kc, vc, o, lse, T, Heads, Heads, HeadDim, null));
        double backwardFlops = 2.5 * causalFlops;   // S recomputed, dP, dV, dK, dQ: five causal products against the forward's two
        double simtBackward = Flops("attention backward bf16 SIMT, naive (flash-style dq + dk/dv)", backwardFlops,
            () => ops.AttentionBackward(q, kc, vc, o, dOut, lse, dq, dk, dv, dsum, T, Heads, Heads, HeadDim, null, gemm: false));
        double squareBackward = Flops("attention backward bf16 GEMMs over the whole [T, T] square", backwardFlops,
            () => ops.AttentionBackward(q, kc, vc, o, dOut, lse, dq, dk, dv, dsum, T, Heads, Heads, HeadDim, null, rowBlock: T));
        double gemmBackward = Flops($"attention backward bf16 GEMMs, block triangle (blocks of {AttentionGemmBackward.RowBlock(T, CudaOps.MinimumAttentionRowBlock)})",
            backwardFlops, () => ops.AttentionBackward(q, kc, vc, o, dOut, lse, dq, dk, dv, dsum, T, Heads, Heads, HeadDim, null));
        Console.WriteLine($"{"block triangle vs whole square",-58} {"",8} {gemmBackward / squareBackward,12:F2} x");
        Console.WriteLine($"{"GEMM (block triangle) vs SIMT attention backward",-58} {"",8} {gemmBackward / simtBackward,12:F2} x");
        var st = dev.Allocator.Stats;
        Console.WriteLine();
        Console.WriteLine($"allocator: {st.Requests} requests, {st.CacheHits} cache hits, {st.DeviceAllocations} device allocations, peak {st.PeakReservedBytes / (1 << 20)} MiB reserved");
        acceptance.Print();
        DependencyCosts(dev, ops, repeats, shape == BenchShapes.Smoke);   // a grid barrier that hung would cost nothing above
        if (dev.SupportsWgmma)   // last: a fault in the kernel no GPU has yet run (it leaves the context unusable) would cost nothing above
        {
            Console.WriteLine();
            foreach (var (kernel, rows) in new[] { (PrefillKernel.Wgmma, 64), (PrefillKernel.Wgmma2Warpgroups, 128) })
            {
                double wgmma = Flops($"attention prefill bf16 warpgroup MMA (wgmma, sm_90a), {rows} rows/block", causalFlops,
                    () => ops.Attention(q, kc, vc, o, T, 0, Heads, Heads, HeadDim, null, kernel));
                Console.WriteLine($"{"  vs 32 rows/warp mma.sync",-58} {"",8} {wgmma / attn,12:F2} x");
                Console.WriteLine($"{"  vs same-FLOP GEMMs",-58} {"",8} {100 * wgmma / gemmRate,12:F1} %");
            }
        }
        else Console.WriteLine($"attention prefill on warpgroup MMA: does not apply here: {dev.WgmmaUnsupportedReason}");
    }

    /// <summary>What one dependency between the kernels of a decode step costs (5 per layer after the decode fusions,
    /// 160 per token at the 7B shape): a chain of that many dependent links, each one increment per block of a slot the
    /// link before wrote, run as a kernel per link in a CUDA graph (stream order, then programmatic launch, as decode
    /// runs) and as one persistent kernel with a grid barrier per link. The links do next to no work, so the time per
    /// link is the dependency's price: what a persistent decode kernel's barriers would have to beat. Then the barrier
    /// with loads across it, in one piece or split around them (as the persistent decode kernel does). Every form's
    /// slots are checked afterwards (each counted once per link).</summary>
    private static void DependencyCosts(CudaDevice dev, CudaOps ops, int repeats, bool smoke)
    {
        int links = smoke ? 8 : 5 * BenchShapes.Llama2_7B.NumLayers;
        const uint Threads = 256;
        // The persistent decode GEMVs' grid, 2 blocks of 256 per SM; the barrier kernel is launched cooperatively (all
        // blocks resident at once, as a grid barrier needs). The smoke run, a check of the code, uses 3 blocks.
        uint blocks = smoke ? 3 : (uint)(Math.Min(2, Math.Min(dev.ResidentBlocks("boundaries", "grid_barrier_links", Threads, 0),
            dev.ResidentBlocks("boundaries", "grid_barrier_links_loading", Threads, 0))) * dev.Info.Multiprocessors);
        using var slots = dev.Allocate(DType.F32, blocks);
        using var count = dev.Allocate(DType.F32, 1);   // the barrier's u32 arrival counter (0f has the bits of 0u)
        void CheckSlots(string form)
        {
            var got = dev.Download(slots);
            if (got.Any(v => v != links))
                throw new InvalidOperationException($"{form}: slots hold {string.Join(", ", got.Distinct().Take(4))} after {links} links, not {links} each");
        }
        void Print(string form, float ms) => Console.WriteLine($"  {form,-56} {1e3 * ms / links,8:F2} µs per link ({ms:F3} ms for {links})");

        Console.WriteLine();
        Console.WriteLine($"a dependency between decode kernels: {links} dependent links, {blocks} blocks of {Threads} threads, one increment per block and link");
        float KernelPerLink(bool programmatic)
        {
            using var graph = new CudaGraphHandle(dev.Stream, () =>
            {
                dev.ProgrammaticLaunch = programmatic;
                try { for (int i = 0; i < links; i++) dev.Launch("boundaries", "chain_link_step", (blocks, 1, 1), (Threads, 1, 1), 0, slots); }
                finally { dev.ProgrammaticLaunch = false; }
            });
            for (int i = 0; i < 3; i++) graph.Launch(dev.Stream);
            float ms = MedianOfSamples(repeats, () => dev.Time(() => graph.Launch(dev.Stream)));
            ops.FillConstant(slots, 0f);
            graph.Launch(dev.Stream);
            CheckSlots(programmatic ? "kernels launched programmatically" : "kernels in stream order");
            return ms;
        }
        float streamOrder = KernelPerLink(programmatic: false), programmatic = KernelPerLink(programmatic: true);
        Print("a kernel per link, CUDA graph, stream order", streamOrder);
        Print("a kernel per link, CUDA graph, programmatic launch", programmatic);
        // One cooperative launch of a barrier chain: timed from a zero count, each sample from zeroed slots, then checked.
        float BarrierChain(string form, Action launch)
        {
            ops.FillConstant(count, 0f);
            launch();   // loads the kernel outside the timing
            float ms = MedianOfSamples(repeats, () =>
            {
                ops.FillConstant(slots, 0f);
                ops.FillConstant(count, 0f);
                return dev.Time(launch);
            });
            CheckSlots(form);
            return ms;
        }
        float barrier = BarrierChain("grid barriers", () =>
            dev.LaunchCooperative("boundaries", "grid_barrier_links", (blocks, 1, 1), (Threads, 1, 1), 0, slots, count, links));
        Print("one kernel, a grid barrier per link", barrier);
        Console.WriteLine($"  {"grid barrier vs programmatic kernel boundary",-56} {programmatic / barrier,8:F2} x");

        // With loads across each barrier, as the persistent decode kernel has (its next phase's first weight rows): 8
        // loads of 16 bytes per thread from a zeroed buffer larger than the L2, issued before the block arrives (the
        // arriving thread's fence waits for them) or between its arrival and its wait (the engine's split barrier).
        long words = smoke ? 1 << 12 : Math.Max(4L * (dev.Info.L2Bytes ?? 64 << 20), 256L << 20) / 16;
        using var source = dev.Allocate(DType.F32, 4 * words);
        ops.FillConstant(source, 0f);
        float Loading(int split) => BarrierChain(split != 0 ? "split grid barriers with loads" : "grid barriers with loads", () =>
            dev.LaunchCooperative("boundaries", "grid_barrier_links_loading", (blocks, 1, 1), (Threads, 1, 1), 0, slots, count, links, source, words, split));
        float whole = Loading(split: 0), split = Loading(split: 1);
        Print("the same, 8 loads of 16 B/thread in flight at arrival", whole);
        Print("the same, the loads between arrival and wait (split)", split);
        Console.WriteLine($"  {"split grid barrier vs one piece, loads across it",-56} {whole / split,8:F2} x");
    }

    /// <summary>The median of <paramref name="repeats"/> samples.</summary>
    private static float MedianOfSamples(int repeats, Func<float> sample)
    {
        var ms = new List<float>();
        for (int i = 0; i < repeats; i++) ms.Add(sample());
        ms.Sort();
        return ms[ms.Count / 2];
    }
}
