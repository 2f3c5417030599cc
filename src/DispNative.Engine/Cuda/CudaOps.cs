using DispNative.Engine.Autograd;
using DispNative.Engine.IO;

namespace DispNative.Engine.Cuda;

/// <summary>Typed launches of the kernels in <c>kernels/</c>. Each is the GPU twin of a <see cref="Cpu.CpuOps"/> op (or of a
/// DISP mask op) and is checked against it by <see cref="SelfTest"/>. The residual stream is always f32; activations
/// and weights use the storage type of their tensor.</summary>
public sealed class CudaOps(CudaDevice device)
{
    public const int MaxHeadDim = 128;
    private const int PrefillWarps = 8, TensorCoreWarps = 4;

    /// <summary>Warps per block of the naive decode kernel and of the split-KV one unless <see cref="CudaDevice.DecodeAttentionWarps"/> says 8.</summary>
    public const int DecodeWarps = 4;
    public CudaDevice Device { get; } = device;

    private static void Need(DeviceTensor t, long elements, string what)
    {
        if (t.Length < elements) throw new ArgumentException($"{what}: {t.Length} elements, {elements} needed");
    }

    /// <summary>x[r] (f32) = table[tokens[r]].</summary>
    public void Embedding(DeviceTensor table, DeviceTensor tokens, DeviceTensor x, int rows, int d)
    {
        Need(x, (long)rows * d, "embedding output");
        Device.Launch("embedding", $"embedding_{CudaDevice.Suffix(table.DType)}", (uint)rows, 256, 0, table, tokens, x, d);
    }

    /// <summary>RoPE of [rows, heads·headDim], in place or, with <paramref name="output"/>, from an f32 x into output (any
    /// storage type; x unchanged); row r at position start + r, start read from the one-int device tensor
    /// <paramref name="position"/> when given (CUDA graph replay). <paramref name="inverse"/> rotates back: the backward
    /// of the rotation, applied to a gradient.</summary>
    public void Rope(DeviceTensor x, DeviceTensor invFreq, int rows, int heads, int headDim, int start, DeviceTensor? position = null, bool inverse = false,
        DeviceTensor? output = null)
    {
        long n = (long)rows * heads * headDim;
        Need(x, n, "rope input");
        var grid = ((uint)rows, RopeSlices(rows, heads * (headDim / 2)), 1u);
        var block = (RopeThreads, 1u, 1u);
        if (output == null)
        {
            Device.Launch("rope", $"rope_{CudaDevice.Suffix(x.DType)}", grid, block, 0, x, invFreq, heads, headDim, start, position, inverse ? -1f : 1f);
            return;
        }
        if (x.DType != DType.F32) throw new ArgumentException($"rope into another tensor reads f32, not {x.DType}");
        Need(output, n, "rope output");
        Device.Launch("rope", $"rope_f32_to_{CudaDevice.Suffix(output.DType)}", grid, block, 0, x, output, invFreq, heads, headDim, start, position,
            inverse ? -1f : 1f);
    }

    /// <summary>The inference step's RoPE and cache write in one launch: q ([rows, heads·headDim]) rotated in place, k
    /// rotated into the key cache and v copied into the value cache at rows start.. (or at the device-held position).
    /// The same values as <see cref="Rope"/> on q and k followed by copying k and v into the caches. k and v null: the
    /// new keys and values are already at the caches' rows start.. (written there by their projections); the keys are
    /// rotated in place.</summary>
    public void RopeKvAppend(DeviceTensor q, DeviceTensor? k, DeviceTensor? v, DeviceTensor kCache, DeviceTensor vCache, DeviceTensor invFreq,
        int rows, int heads, int kvHeads, int headDim, int start, DeviceTensor? position = null)
    {
        int kvDim = kvHeads * headDim;
        if ((k == null) != (v == null)) throw new ArgumentException("the new keys and values are either both in the caches already or neither");
        if (k == null && position != null) throw new ArgumentException("keys already in the cache need a host-held start");
        Need(q, (long)rows * heads * headDim, "queries");
        if (k != null) { Need(k, (long)rows * kvDim, "new keys"); Need(v!, (long)rows * kvDim, "new values"); }
        if (position == null) { Need(kCache, (long)(start + rows) * kvDim, "key cache"); Need(vCache, (long)(start + rows) * kvDim, "value cache"); }
        Device.Launch("rope", $"rope_kv_append_{CudaDevice.Suffix(q.DType)}", ((uint)rows, RopeSlices(rows, (heads + kvHeads) * (headDim / 2)), 1),
            (RopeThreads, 1, 1), 0, q, k, v, kCache, vCache, invFreq,
            heads, kvHeads, headDim, start, position);
    }

    /// <summary>Decode's q, k and v projections of one row x in one launch: yq = x·Wqᵀ, yk = x·Wkᵀ, yv = x·Wvᵀ
    /// (K = <paramref name="k"/>). Needs <see cref="CudaDevice.GemvApplies"/>.</summary>
    public void GemvQkv(DeviceTensor x, DeviceTensor wq, DeviceTensor yq, int nq, DeviceTensor wk, DeviceTensor yk, int nk,
        DeviceTensor wv, DeviceTensor yv, int nv, int k)
    {
        NeedGemv(x, wq, k); NeedGemv(x, wk, k); NeedGemv(x, wv, k);
        Need(wq, (long)nq * k, "q weight"); Need(wk, (long)nk * k, "k weight"); Need(wv, (long)nv * k, "v weight");
        Need(yq, nq, "q"); Need(yk, nk, "k"); Need(yv, nv, "v");
        Device.LaunchGemv($"gemv_qkv_{CudaDevice.Suffix(x.DType)}", nq + nk + nv, k, null,
            x, wq, yq, nq, wk, yk, nk, wv, yv, nv, k);
    }

    /// <summary>Decode's MLP input side in one pass: output[j] = silu(x·gate[j]) · (x·up[j]) for j &lt; n (the same
    /// values as two GEMMs and <see cref="SiluMul"/>, rounded once). Needs <see cref="CudaDevice.GemvApplies"/>.</summary>
    public void GemvSwiGlu(DeviceTensor x, DeviceTensor wGate, DeviceTensor wUp, DeviceTensor output, int n, int k)
    {
        NeedGemv(x, wGate, k); NeedGemv(x, wUp, k);
        Need(wGate, (long)n * k, "gate weight"); Need(wUp, (long)n * k, "up weight"); Need(output, n, "swiglu output");
        Device.LaunchGemv($"gemv_swiglu_{CudaDevice.Suffix(x.DType)}", n, k, null, x, wGate, wUp, output, n, k);
    }

    /// <summary>Decode's attention input side: the gather-RMSNorm of the f32 residual row <paramref name="x"/> (gamma,
    /// idx: as <see cref="GatherRmsNorm"/>, into k channels) and the q/k/v GEMVs of it (<see cref="GemvQkv"/>), either
    /// in one launch (gemv_norm.cu's gemv_norm_qkv: every block normalizes the row into shared memory) or as the two launches
    /// through <paramref name="h"/>, per <see cref="CudaDevice.FuseDecodeNorms"/>; bit for bit the same outputs.
    /// <paramref name="h"/> holds the normalized row only after the two launches.</summary>
    public void NormGemvQkv(DeviceTensor x, DeviceTensor gamma, DeviceTensor? idx, int d, float eps, DeviceTensor h,
        DeviceTensor wq, DeviceTensor yq, int nq, DeviceTensor wk, DeviceTensor yk, int nk, DeviceTensor wv, DeviceTensor yv, int nv, int k)
    {
        void Separate() { GatherRmsNorm(x, gamma, idx, h, 1, d, eps, k); GemvQkv(h, wq, yq, nq, wk, yk, nk, wv, yv, nv, k); }
        if (FusedNorm(x, idx, h, d, k) is not { } f) { Separate(); return; }
        NeedGemv(h, wq, k); NeedGemv(h, wk, k); NeedGemv(h, wv, k);
        Need(wq, (long)nq * k, "q weight"); Need(wk, (long)nk * k, "k weight"); Need(wv, (long)nv * k, "v weight");
        Need(yq, nq, "q"); Need(yk, nk, "k"); Need(yv, nv, "v");
        Device.FusedOrSeparate($"gemv_norm_qkv_{CudaDevice.Suffix(h.DType)},{nq + nk + nv},{k},{d}", (long)(nq + nk + nv) * k,
            blocksPerSM => Device.LaunchPersistentGemv($"gemv_norm_qkv_{CudaDevice.Suffix(h.DType)}", nq + nk + nv, k, f.SharedBytes, blocksPerSM,
                x, gamma, idx, d, f.Width, f.NormThreads, eps, wq, yq, nq, wk, yk, nk, wv, yv, nv, k),
            Separate);
    }

    /// <summary>Decode's MLP input side: the gather-RMSNorm of <paramref name="x"/> and <see cref="GemvSwiGlu"/> of it, in
    /// one launch or two, as <see cref="NormGemvQkv"/>.</summary>
    public void NormGemvSwiGlu(DeviceTensor x, DeviceTensor gamma, DeviceTensor? idx, int d, float eps, DeviceTensor h,
        DeviceTensor wGate, DeviceTensor wUp, DeviceTensor output, int n, int k)
    {
        void Separate() { GatherRmsNorm(x, gamma, idx, h, 1, d, eps, k); GemvSwiGlu(h, wGate, wUp, output, n, k); }
        if (FusedNorm(x, idx, h, d, k) is not { } f) { Separate(); return; }
        NeedGemv(h, wGate, k); NeedGemv(h, wUp, k);
        Need(wGate, (long)n * k, "gate weight"); Need(wUp, (long)n * k, "up weight"); Need(output, n, "swiglu output");
        Device.FusedOrSeparate($"gemv_norm_swiglu_{CudaDevice.Suffix(h.DType)},{n},{k},{d}", 2L * n * k,
            blocksPerSM => Device.LaunchPersistentGemv($"gemv_norm_swiglu_{CudaDevice.Suffix(h.DType)}", n, k, f.SharedBytes, blocksPerSM,
                x, gamma, idx, d, f.Width, f.NormThreads, eps, wGate, wUp, output, n, k),
            Separate);
    }

    /// <summary>A fused decode norm's launch figures: its dynamic shared memory (the f32 row, idx, gamma then h; gemv.cuh),
    /// the norm's width and the block size whose arithmetic it repeats (the one-row <see cref="GatherRmsNorm"/>'s).</summary>
    internal readonly record struct FusedNormShape(uint SharedBytes, int Width, int NormThreads);

    /// <summary>The fused decode norm's <see cref="FusedNormShape"/>, or null where the fused kernels do not apply: d not
    /// a multiple of 4, a row that is not f32, h not in a GEMV's reach, a width above k, or more than
    /// <see cref="MaxFusedNormSharedBytes"/>.</summary>
    internal FusedNormShape? FusedNorm(DeviceTensor x, DeviceTensor? idx, DeviceTensor h, int d, int k)
    {
        int width = (int)(idx?.Length ?? d);
        if (d % 4 != 0 || x.DType != DType.F32 || width > k || k % (16 / h.DType.Size()) != 0) return null;
        Need(x, d, "norm input");
        long bytes = 4L * d + (idx != null ? 4L * k : 0) + (long)k * h.DType.Size();
        return bytes <= MaxFusedNormSharedBytes ? new FusedNormShape((uint)bytes, width, (int)NormThreads(1, d, k)) : null;
    }

    /// <summary>The most shared memory a fused decode norm takes (d 8192 with k 8192 in bf16: 80 KiB).</summary>
    public const int MaxFusedNormSharedBytes = 96 << 10;

    /// <summary>Decode's write-back in one pass: residual[idx[j]] += x·w[j] for j &lt; idx.Length (idx null: every
    /// channel of the d-wide residual) - the GEMM and <see cref="IndexAdd"/> fused. Needs <see cref="CudaDevice.GemvApplies"/>.</summary>
    public void GemvIndexAdd(DeviceTensor x, DeviceTensor w, DeviceTensor residual, DeviceTensor? idx, int d, int k)
    {
        int n = (int)(idx?.Length ?? d);
        NeedGemv(x, w, k);
        Need(w, (long)n * k, "weight"); Need(residual, d, "residual");
        if (residual.DType != DType.F32) throw new ArgumentException("the residual stream is f32");
        Device.LaunchGemv($"gemv_{CudaDevice.Suffix(x.DType)}_to_f32", n, k, (residual.Pointer, (long)d * sizeof(float)),
            x, w, residual, idx, n, k, 1f, 1f);
    }

    private void NeedGemv(DeviceTensor x, DeviceTensor w, int k)
    {
        Need(x, k, "GEMV input");
        if (!Device.GemvApplies(x, w, k)) throw new ArgumentException($"GEMV of K {k} in {x.DType}: needs 16-byte rows and operands (CudaDevice.GemvApplies)");
    }

    /// <summary>Width a pruned site is stored at on the device: its kept channels rounded up to a multiple of
    /// <paramref name="multiple"/> (default 8) with zero padding, so every GEMM operand row starts 16-byte aligned
    /// (cuBLASLt's tensor-core kernels need it; unaligned odd widths run several times slower). A larger multiple
    /// (<see cref="CudaLlama.Padding"/>) fills more of the GEMMs' tiles for a few zero channels more.</summary>
    public static int Padded(int width, int multiple = 8) => (width + multiple - 1) / multiple * multiple;

    /// <summary>The padding multiple of a model's pruned sites unless it asks for another: 64, whose fuller GEMM tiles
    /// made the pruned 7B-shape prefill 1.62-1.67x dense against 1.55-1.59x at 8 with decode unchanged (H200,
    /// 2026-12-04), halved while above 1/32 of the model's narrower full width (hidden or MLP), down to 8: a small
    /// model's sites would otherwise round up to their full width.</summary>
    public static int DefaultPadding(Models.ModelConfig c)
    {
        int multiple = 64, narrower = Math.Min(c.HiddenSize, c.IntermediateSize);
        while (multiple > 8 && multiple > narrower / 32) multiple /= 2;
        return multiple;
    }

    /// <summary>Whether <paramref name="multiple"/> is a valid padding: a power of two from 8 to 256.</summary>
    public static bool ValidPadding(int multiple) => multiple is >= 8 and <= 256 && (multiple & (multiple - 1)) == 0;

    /// <summary>Gather RMSNorm: out[r, j] = x[r, idx[j]] / rms(x[r]) · gamma[idx[j]]; idx null → dense (width d). Output
    /// rows are <paramref name="outputStride"/> apart (default: the width), the columns past the width zeroed.</summary>
    public void GatherRmsNorm(DeviceTensor x, DeviceTensor gamma, DeviceTensor? idx, DeviceTensor output, int rows, int d, float eps, int? outputStride = null)
    {
        var (width, stride) = NormShape(x, idx, output, rows, d, outputStride);
        uint smem = RowSmem(d);
        Device.Launch("norm", $"rmsnorm_gather_{CudaDevice.Suffix(output.DType)}", (uint)rows, NormThreads(rows, d, stride), smem,
            x, gamma, idx, output, d, width, stride, eps, smem > 0 ? 1 : 0);
    }

    /// <summary>A pruned block's write-back and the next gather-RMSNorm in one launch: x[r, addIdx[j]] +=
    /// addScale·(y[r, j] + bias[j]) as <see cref="IndexAdd"/> (y f32, rows <paramref name="yStride"/> apart; addIdx null:
    /// the dense add), then <see cref="GatherRmsNorm"/> of the updated rows, reading and writing the residual once.
    /// Where a row does not fit shared memory, the two kernels.</summary>
    public void IndexAddRmsNorm(DeviceTensor x, DeviceTensor y, DeviceTensor? addIdx, DeviceTensor? bias, int yStride,
        DeviceTensor gamma, DeviceTensor? idx, DeviceTensor output, int rows, int d, float eps, float addScale = 1, int? outputStride = null)
    {
        uint smem = RowSmem(d);
        if (smem == 0)
        {
            IndexAdd(x, y, addIdx, bias, rows, d, addScale, yStride);
            GatherRmsNorm(x, gamma, idx, output, rows, d, eps, outputStride);
            return;
        }
        if (y.DType != DType.F32) throw new ArgumentException($"the fused index-add takes an f32 input, not {y.DType}");
        if (bias != null && bias.DType != output.DType) throw new ArgumentException($"index-add bias is {bias.DType}, the norm output {output.DType}");
        int addWidth = (int)(addIdx?.Length ?? d);
        if (yStride < addWidth) throw new ArgumentException($"index-add input stride {yStride} is below its width {addWidth}");
        Need(y, (long)rows * yStride, "index-add input");
        var (width, stride) = NormShape(x, idx, output, rows, d, outputStride);
        Device.Launch("norm", $"add_rmsnorm_gather_{CudaDevice.Suffix(output.DType)}", (uint)rows, NormThreads(rows, d, stride), smem,
            x, y, addIdx, bias, addScale, addWidth, yStride, gamma, idx, output, d, width, stride, eps);
    }

    /// <summary>Gather LayerNorm (OPT/Phi): statistics over the full row, selected channels out; beta may be null.</summary>
    public void GatherLayerNorm(DeviceTensor x, DeviceTensor gamma, DeviceTensor? beta, DeviceTensor? idx, DeviceTensor output, int rows, int d, float eps,
        int? outputStride = null)
    {
        var (width, stride) = NormShape(x, idx, output, rows, d, outputStride);
        uint smem = RowSmem(d);
        Device.Launch("norm", $"layernorm_gather_{CudaDevice.Suffix(output.DType)}", (uint)rows, NormThreads(rows, d, stride), smem,
            x, gamma, beta, idx, output, d, width, stride, eps, smem > 0 ? 1 : 0);
    }

    private static (int Width, int Stride) NormShape(DeviceTensor x, DeviceTensor? idx, DeviceTensor output, int rows, int d, int? outputStride)
    {
        int width = (int)(idx?.Length ?? d), stride = outputStride ?? width;
        if (stride < width) throw new ArgumentException($"norm output stride {stride} is below its width {width}");
        Need(x, (long)rows * d, "norm input"); Need(output, (long)rows * stride, "norm output");
        return (width, stride);
    }

    private static uint RowSmem(int d) => d * 4 <= 48 * 1024 ? (uint)(d * 4) : 0;

    /// <summary>A norm block's threads: d/16 (four 16-byte loads each) when the rows fill the GPU; for fewer rows (decode)
    /// enough that each thread's loads and outputs are one unrolled step, so a row costs a few memory latencies.</summary>
    private uint NormThreads(int rows, int d, int stride) =>
        rows >= Device.Info.Multiprocessors ? Threads(d / 4) : (uint)Math.Clamp((Math.Max(d / 4, (stride + 3) / 4) + 31) & ~31, 128, 1024);

    private const uint RopeThreads = 128;

    /// <summary>Blocks per row of the rope kernels (grid y): one when the rows alone give every SM several blocks; for
    /// fewer rows (decode) enough that each thread rotates about one of the row's <paramref name="pairs"/>.</summary>
    private uint RopeSlices(int rows, int pairs) =>
        (uint)Math.Clamp(8L * Device.Info.Multiprocessors / rows, 1, Math.Max(1, (pairs + RopeThreads - 1) / RopeThreads));

    /// <summary>Block size for a row kernel whose threads each handle 4 loads in flight (NORM_UNROLL, RESIDUAL_UNROLL):
    /// one pass over <paramref name="items"/> where possible, 128 to 1024 threads.</summary>
    private static uint Threads(int items) => (uint)Math.Clamp((items / 4 + 31) & ~31, 128, 1024);

    /// <summary>x[r, idx[j]] += scale·(y[r, j] + bias[j]) into the f32 residual; idx null → x += y. Rows of y are
    /// <paramref name="inputStride"/> apart (default: the width).</summary>
    public void IndexAdd(DeviceTensor x, DeviceTensor y, DeviceTensor? idx, DeviceTensor? bias, int rows, int d, float scale = 1, int? inputStride = null)
    {
        int width = (int)(idx?.Length ?? d), stride = inputStride ?? width;
        if (stride < width) throw new ArgumentException($"index-add input stride {stride} is below its width {width}");
        Need(x, (long)rows * d, "residual"); Need(y, (long)rows * stride, "index-add input");
        if (bias != null && bias.DType != y.DType) throw new ArgumentException($"index-add bias is {bias.DType}, its input {y.DType}");
        uint smem = RowSmem(d);
        // A selection's write-back stages the row (index_add_staged); the dense add and rows above shared memory go direct.
        if (idx != null && smem > 0)
            Device.Launch("residual", $"index_add_staged_{CudaDevice.Suffix(y.DType)}", (uint)rows, Threads(Math.Max(width, d / 4)), smem,
                x, y, idx, bias, scale, d, width, stride);
        else
            Device.Launch("residual", $"index_add_{CudaDevice.Suffix(y.DType)}", (uint)rows, Threads(width), 0, x, y, idx, bias, scale, d, width, stride);
    }

    /// <summary>y[r] += bias for <paramref name="rows"/> rows of y from element <paramref name="offset"/>.</summary>
    public void AddBias(DeviceTensor y, DeviceTensor bias, int rows, long offset = 0)
    {
        Need(y, offset + (long)rows * bias.Length, "biased rows");
        Device.Launch("residual", $"add_bias_{CudaDevice.Suffix(y.DType)}", (uint)rows, 128, 0, y.Address(offset), bias, (int)bias.Length);
    }

    /// <summary>out = silu(gate)·up (out may be gate). <paramref name="fastMath"/>: the hardware's approximate exp and
    /// divide (a few ulp of f32); by default for bf16 and f16, whose rounding is thousands of times coarser, where it ran
    /// 2.5x as fast at 2048 x 11008 (the exact divide's instruction count made the kernel compute-bound: H200, 2026-12-04).</summary>
    public void SiluMul(DeviceTensor gate, DeviceTensor up, DeviceTensor output, long n, bool? fastMath = null)
    {
        if (fastMath ?? gate.DType != DType.F32) Device.Launch("activations", $"silu_mul_fast_{CudaDevice.Suffix(gate.DType)}", VectorGrid(n), 256, 0, gate, up, output, n);
        else Device.Launch("activations", $"silu_mul_{CudaDevice.Suffix(gate.DType)}", VectorGrid(n), 256, 0, gate, up, output, n);
    }

    /// <summary>Grid of the 16-byte-per-thread elementwise kernels: a thread per 8 elements (grid-stride beyond).</summary>
    private static uint VectorGrid(long n) => CudaDevice.GridFor((n + 7) / 8);

    /// <summary>dx[r] += ∂RMSNorm(x[r])·gamma / ∂x[r] applied to dy[r] (x, dy, dx f32; gamma frozen).</summary>
    public void RmsNormBackward(DeviceTensor x, DeviceTensor gamma, DeviceTensor dy, DeviceTensor dx, int rows, int d, float eps)
    {
        Need(x, (long)rows * d, "norm input"); Need(dy, (long)rows * d, "norm output gradient"); Need(dx, (long)rows * d, "norm input gradient");
        Device.Launch("norm", $"rmsnorm_backward_{CudaDevice.Suffix(gamma.DType)}", (uint)rows, Threads(d), 0, x, gamma, dy, dx, d, eps);
    }

    public void Gelu(DeviceTensor input, DeviceTensor output, long n)
        => Device.Launch("activations", $"gelu_{CudaDevice.Suffix(input.DType)}", VectorGrid(n), 256, 0, input, output, n);

    /// <summary>Causal GQA attention of <paramref name="tq"/> queries at positions start.. against the cache. One query
    /// (decode): <paramref name="decode"/> (default <see cref="DecodeKernel.SplitKv"/>) over shares of
    /// <paramref name="decodeKeysPerSplit"/> keys (<see cref="DecodeSplits"/>; default <see cref="DecodeKeysPerSplit"/>),
    /// with <paramref name="decodeScratch"/> (<see cref="NewDecodeScratch"/>) for the shares' states, where the head fits
    /// the split kernel's 16-byte layout, else the naive kernel. It reads its position from <paramref name="position"/>
    /// when given (CUDA graph replay; then the scratch must be given too, as a captured launch keeps its pointer). More
    /// queries: <paramref name="prefill"/>, by default <see cref="DefaultPrefill"/>.</summary>
    public void Attention(DeviceTensor q, DeviceTensor kCache, DeviceTensor vCache, DeviceTensor output, int tq, int start,
        int heads, int kvHeads, int headDim, int? window, PrefillKernel? prefill = null, DeviceTensor? position = null,
        DecodeScratch? decodeScratch = null, DecodeKernel decode = DecodeKernel.SplitKv, int decodeKeysPerSplit = DecodeKeysPerSplit)
    {
        if (position != null && tq != 1) throw new ArgumentException("a device-held position is for single-token decode");
        CheckHeads(heads, kvHeads, headDim);
        float scale = 1f / MathF.Sqrt(headDim);
        if (tq == 1)
            Decode(q, kCache, vCache, output, start, heads, kvHeads, headDim, window ?? 0, scale, position, decodeScratch, decode, decodeKeysPerSplit);
        else
            Prefill(prefill ?? PrefillFor(q.DType, headDim), q, kCache, vCache, output, null, tq, start, heads, kvHeads, headDim, window ?? 0, scale);
    }

    /// <summary>The prefill kernel the engine runs on this device: <see cref="CudaDevice.PrefillAttention"/> where it
    /// names one that applies, else the warpgroup-MMA kernel with two warpgroups per block where it applies (1.19x the
    /// mma.sync kernel on the H200, KernelBench gpu, 2026-12-04), else <see cref="DefaultPrefill"/>.</summary>
    public PrefillKernel PrefillFor(DType dtype, int headDim) =>
        Device.PrefillAttention is { } k && Applies(k, dtype, headDim) ? k
        : Applies(PrefillKernel.Wgmma2Warpgroups, dtype, headDim) ? PrefillKernel.Wgmma2Warpgroups
        : DefaultPrefill(dtype, headDim);

    /// <summary>Whether <paramref name="kernel"/> runs prefill attention of this storage type and head size here.</summary>
    public bool Applies(PrefillKernel kernel, DType dtype, int headDim) => kernel switch
    {
        PrefillKernel.Simt => true,
        PrefillKernel.TensorCores16Rows or PrefillKernel.TensorCores32Rows => UsesTensorCores(dtype, headDim),
        PrefillKernel.Wgmma or PrefillKernel.Wgmma2Warpgroups => Device.SupportsWgmma && UsesTensorCores(dtype, headDim),
        _ => dtype == DType.BF16 && headDim == 128,   // KernelBench's baselines
    };

    /// <summary>Query rows per warpgroup of the warpgroup-MMA kernels (WG_M in attention_wgmma.cu).</summary>
    private const int WgmmaRows = 64;

    /// <summary>Dynamic shared memory of a warpgroup-MMA kernel with <paramref name="warpgroups"/> warpgroups: their Q
    /// rows and two stages of K and V tiles of 64 keys, each row head_dim 16-bit elements, and 1 KB to align them to
    /// 1024 bytes.</summary>
    public static uint WgmmaPrefillSharedBytes(int headDim, int warpgroups) => (uint)((warpgroups * WgmmaRows + 4 * 64) * headDim * 2 + 1024);

    /// <summary>The prefill kernel used unless one is named or the device runs warpgroup MMA (<see cref="PrefillFor"/>):
    /// tensor cores with 32 query rows per warp where <see cref="UsesTensorCores"/>, else SIMT (<c>KernelBench gpu</c>
    /// times them all).</summary>
    public static PrefillKernel DefaultPrefill(DType dtype, int headDim) => UsesTensorCores(dtype, headDim) ? PrefillKernel.TensorCores32Rows : PrefillKernel.Simt;

    /// <summary>Query rows per block of the 32-rows-per-warp tensor-core kernel (FA_M in attention_tc.cu).</summary>
    private const int WideRows = TensorCoreWarps * 32;

    /// <summary>Buffers per K and V tile of the engine's 32-rows-per-warp kernel (FA_STAGES in attention_tc.cu).</summary>
    public const int WidePrefillStages = 2;

    /// <summary>Dynamic shared memory of the 32-rows-per-warp kernel: Q rows and <paramref name="stages"/> K and V
    /// tiles (FA_KEYS keys), each row head_dim + 8 16-bit elements.</summary>
    public static uint WidePrefillSharedBytes(int headDim, int stages = WidePrefillStages) =>
        (uint)((WideRows + 2 * stages * (headDim > 64 ? 32 : 64)) * (headDim + 8) * 2);

    private void Prefill(PrefillKernel kernel, DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor output, DeviceTensor? lse,
        int tq, int start, int heads, int kvHeads, int headDim, int window, float scale)
    {
        string s = CudaDevice.Suffix(q.DType);
        if (kernel != PrefillKernel.Simt && !UsesTensorCores(q.DType, headDim))
            throw new ArgumentException($"the tensor-core prefill takes bf16 or f16 with head_dim 64 or 128, not {q.DType} with {headDim}");
        switch (kernel)
        {
            case PrefillKernel.TensorCores32Rows:
                Device.Launch("attention_tc", $"attention_prefill_fa{headDim}_{s}", ((uint)((tq + WideRows - 1) / WideRows), (uint)heads, 1),
                    (TensorCoreWarps * 32, 1, 1), WidePrefillSharedBytes(headDim), q, k, v, output, lse, tq, start, heads, kvHeads, window, scale);
                break;
            case PrefillKernel.TensorCores32RowsRescaleEveryTile or PrefillKernel.TensorCores32RowsSingleBuffer or PrefillKernel.TensorCores32RowsBaselineSoftmax:
                if (q.DType != DType.BF16 || headDim != 128) throw new ArgumentException($"{kernel} is built for bf16 with head_dim 128 only");
                var grid = ((uint)((tq + WideRows - 1) / WideRows), (uint)heads, 1u);
                if (kernel == PrefillKernel.TensorCores32RowsRescaleEveryTile)
                    Device.Launch("attention_tc", "attention_prefill_fa_rescale_always128_bf16", grid, (TensorCoreWarps * 32, 1, 1), WidePrefillSharedBytes(headDim),
                        q, k, v, output, lse, tq, start, heads, kvHeads, window, scale);
                else if (kernel == PrefillKernel.TensorCores32RowsSingleBuffer)
                    Device.Launch("attention_tc", "attention_prefill_fa_single_buffer128_bf16", grid, (TensorCoreWarps * 32, 1, 1), WidePrefillSharedBytes(headDim, stages: 1),
                        q, k, v, output, lse, tq, start, heads, kvHeads, window, scale);
                else
                    Device.Launch("attention_tc", "attention_prefill_fa_baseline_softmax128_bf16", grid, (TensorCoreWarps * 32, 1, 1), WidePrefillSharedBytes(headDim),
                        q, k, v, output, lse, tq, start, heads, kvHeads, window, scale);
                break;
            case PrefillKernel.Wgmma or PrefillKernel.Wgmma2Warpgroups:
                if (!Device.SupportsWgmma)
                    throw new ArgumentException(Device.WgmmaUnsupportedReason);
                int groups = kernel == PrefillKernel.Wgmma ? 1 : 2;
                Device.Launch("attention_wgmma", $"attention_prefill_wgmma{(groups == 2 ? "_2wg" : "")}{headDim}_{s}",
                    ((uint)((tq + groups * WgmmaRows - 1) / (groups * WgmmaRows)), (uint)heads, 1), ((uint)(128 * groups), 1, 1),
                    WgmmaPrefillSharedBytes(headDim, groups), q, k, v, output, lse, tq, start, heads, kvHeads, window, scale);
                break;
            case PrefillKernel.TensorCores16Rows:
                int rows = TensorCoreWarps * 16;
                Device.Launch("attention_tc", $"attention_prefill_tc{headDim}_{s}", ((uint)((tq + rows - 1) / rows), (uint)heads, 1),
                    (TensorCoreWarps * 32, 1, 1), 0, q, k, v, output, lse, tq, start, heads, kvHeads, window, scale);
                break;
            default:
                Device.Launch("attention", $"attention_prefill_{s}", ((uint)((tq + PrefillWarps - 1) / PrefillWarps), (uint)heads, 1),
                    (PrefillWarps * 32, 1, 1), 0, q, k, v, output, lse, tq, start, heads, kvHeads, headDim, window, scale);
                break;
        }
    }

    private const int MaxDecodeSplits = 64;

    /// <summary>Keys per share of the split-KV decode unless told otherwise: 128, two DECODE_UNROLL steps of the kernel's
    /// four warps at head_dim 128 in bf16 (64-key shares, one step, ran 0.77x as fast at 2048 keys: H200, 2026-12-04).</summary>
    public const int DecodeKeysPerSplit = 128;

    /// <summary>Shares of the visible keys the split-KV decode uses for a cache of <paramref name="capacity"/> rows
    /// (the capacity, not the current length: a captured decode step keeps its grid for every position).</summary>
    public static int DecodeSplits(int capacity, int window, int keysPerSplit = DecodeKeysPerSplit)
    {
        if (keysPerSplit <= 0) throw new ArgumentOutOfRangeException(nameof(keysPerSplit), keysPerSplit, "keys per split must be positive");
        return Math.Clamp((Math.Min(capacity, window > 0 ? window : capacity) + keysPerSplit - 1) / keysPerSplit, 1, MaxDecodeSplits);
    }

    /// <summary>Shares the split-KV decode merged by its last block uses for <paramref name="keys"/> visible keys on a
    /// grid of <paramref name="splits"/> (attention_decode.cuh): as many as keep each within one round of loads
    /// (DECODE_UNROLL steps of its <paramref name="warps"/> warps), at most the grid's. (Shares of up to 2 or 4 rounds, fewer merges, decoded
    /// within 0.8% of this on the H200, 2026-12-04.)</summary>
    public static int DecodeSharesUsed(int keys, int splits, int headDim, DType dtype, int warps = DecodeWarps)
    {
        int vectors = headDim / (16 / dtype.Size()), group = 1;
        while (group < vectors) group <<= 1;
        int share = warps * (32 / group) * DecodeUnroll;
        return Math.Clamp((keys + share - 1) / share, 1, splits);
    }

    private const int DecodeUnroll = 8;   // attention_decode.cuh's DECODE_UNROLL

    /// <summary>Keys of a round the split-KV decode scores before each rescale of its state (attention_decode.cuh's
    /// RESCALE_KEYS), and the other counts it is built for (attention_decode_split_rescaleN, blocks of 4 warps).</summary>
    public const int DecodeRescaleKeys = 4;
    public static readonly IReadOnlyList<int> DecodeRescaleKeysBuilt = [1, DecodeRescaleKeys, DecodeUnroll];

    /// <summary>The split-KV decode entry for blocks of <paramref name="warps"/> warps rescaling once per
    /// <paramref name="rescaleKeys"/> keys, storage suffix <paramref name="suffix"/>.</summary>
    internal static string DecodeEntry(int warps, int rescaleKeys, string suffix) => (warps, rescaleKeys) switch
    {
        (DecodeWarps, DecodeRescaleKeys) => $"attention_decode_split_{suffix}",
        (DecodeWarps, _) => $"attention_decode_split_rescale{rescaleKeys}_{suffix}",
        (_, DecodeRescaleKeys) => $"attention_decode_split{warps}_{suffix}",
        _ => throw new DispNativeException($"the split-KV decode in blocks of {warps} warps is built to rescale once per {DecodeRescaleKeys} keys, not {rescaleKeys}"),
    };

    /// <summary>A split-KV decode scratch for <paramref name="heads"/> heads of <paramref name="headDim"/>, its arrival
    /// counters at zero; the kernel leaves them at zero, so one scratch serves every layer and step of a sequence.</summary>
    public DecodeScratch NewDecodeScratch(int heads, int headDim)
    {
        long states = (long)heads * MaxDecodeSplits * (headDim + 2);   // then one counter per head
        var t = Device.Allocate(DType.F32, states + heads);
        try { FillConstant(t, 0f); return new DecodeScratch(t, heads, headDim, states); }
        catch { t.Dispose(); throw; }
    }

    /// <summary>Decode's RoPE, cache append and attention for one token at position <paramref name="start"/> (or
    /// <paramref name="position"/>): from the step's unrotated q [heads·headDim] and its k and v [kvHeads·headDim], the
    /// caches get the rotated key and the value at that row and <paramref name="output"/> the attention of the rotated
    /// query, as <see cref="RopeKvAppend"/> then <see cref="Attention"/> give. One launch of the split-KV kernel where
    /// <see cref="RopeFusesIntoDecode"/>, else those two.</summary>
    public void RopeKvAppendAttention(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor kCache, DeviceTensor vCache,
        DeviceTensor invFreq, DeviceTensor output, int start, int heads, int kvHeads, int headDim, int? window, DeviceTensor? position = null,
        DecodeScratch? decodeScratch = null)
    {
        if (!RopeFusesIntoDecode(q, k, v, kCache, vCache, headDim))
        {
            RopeKvAppend(q, k, v, kCache, vCache, invFreq, 1, heads, kvHeads, headDim, start, position);
            Attention(q, kCache, vCache, output, 1, start, heads, kvHeads, headDim, window, position: position, decodeScratch: decodeScratch);
            return;
        }
        CheckHeads(heads, kvHeads, headDim);
        int kvDim = kvHeads * headDim;
        Need(k, kvDim, "new key"); Need(v, kvDim, "new value"); Need(invFreq, headDim / 2, "RoPE inverse frequencies");
        Decode(q, kCache, vCache, output, start, heads, kvHeads, headDim, window ?? 0, 1f / MathF.Sqrt(headDim), position, decodeScratch,
            DecodeKernel.SplitKv, DecodeKeysPerSplit, new RopeAppend(k, v, invFreq));
    }

    /// <summary>Whether <see cref="RopeKvAppendAttention"/> runs as one launch: the split-KV layout (head_dim a multiple
    /// of 16 bytes, 16-byte aligned tensors) with each lane's 16 bytes pairing with one other lane's (head_dim / 2 a
    /// multiple of 16 bytes too).</summary>
    public static bool RopeFusesIntoDecode(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor kCache, DeviceTensor vCache, int headDim)
    {
        int vector = 16 / q.DType.Size();
        return headDim % 2 == 0 && (headDim / 2) % vector == 0 && (q.Pointer | k.Pointer | v.Pointer | kCache.Pointer | vCache.Pointer) % 16 == 0;
    }

    /// <summary>The step's new key and value, and RoPE's inverse frequencies, for the split-KV kernel's fused RoPE and append.</summary>
    private sealed record RopeAppend(DeviceTensor K, DeviceTensor V, DeviceTensor InvFreq);

    private void Decode(DeviceTensor q, DeviceTensor kCache, DeviceTensor vCache, DeviceTensor output, int start, int heads, int kvHeads,
        int headDim, int window, float scale, DeviceTensor? position, DecodeScratch? scratch, DecodeKernel kernel, int keysPerSplit,
        RopeAppend? rope = null)
    {
        string s = CudaDevice.Suffix(q.DType);
        int kvDim = kvHeads * headDim, vector = 16 / q.DType.Size();
        int capacity = (int)Math.Min(kCache.Length, vCache.Length) / kvDim;
        if (position == null && start >= capacity) throw new ArgumentException($"decode position {start} is outside a cache of {capacity} rows");
        Need(q, (long)heads * headDim, "decode query"); Need(output, (long)heads * headDim, "decode output");
        bool aligned = (q.Pointer | kCache.Pointer | vCache.Pointer) % 16 == 0;
        if (kernel == DecodeKernel.Naive || headDim % vector != 0 || !aligned)
        {
            Device.Launch("attention_decode", $"attention_decode_naive_{s}", ((uint)heads, 1, 1), (DecodeWarps * 32, 1, 1), 0,
                q, kCache, vCache, output, start, position, heads, kvHeads, headDim, window, scale);
            return;
        }
        int splits = DecodeSplits(capacity, window, keysPerSplit);
        if (splits > 1 && scratch == null && position != null)
            throw new ArgumentException("a captured split-KV decode needs a scratch tensor that outlives the graph");
        if (scratch != null && (scratch.Heads, scratch.HeadDim) != (heads, headDim))
            throw new ArgumentException($"the decode scratch is for {scratch.Heads} heads of {scratch.HeadDim}, not {heads} of {headDim}");
        DecodeScratch? temporary = splits > 1 && scratch == null ? NewDecodeScratch(heads, headDim) : null;
        try
        {
            var partial = scratch ?? temporary;
            bool merged = kernel == DecodeKernel.SplitKv && partial != null;
            int warps = Device.DecodeAttentionWarps;
            Device.Launch("attention_decode", DecodeEntry(warps, Device.DecodeAttentionRescaleKeys, s), ((uint)heads, (uint)splits, 1), ((uint)warps * 32, 1, 1), 0,
                q, kCache, vCache, output, partial?.States ?? 0, merged ? partial!.Counters : 0,
                rope?.K, rope?.V, rope?.InvFreq, rope == null ? null : kCache, rope == null ? null : vCache,
                start, position, heads, kvHeads, headDim, window, scale);
            if (splits > 1 && !merged)
                Device.Launch("attention_decode", $"attention_decode_combine_{s}", ((uint)heads, 1, 1), (128, 1, 1), 0, partial!.States, output, splits, headDim);
        }
        finally { temporary?.Dispose(); }   // stream-ordered: the next user of the block runs after these kernels
    }

    private static void CheckHeads(int heads, int kvHeads, int headDim)
    {
        if (headDim > MaxHeadDim) throw new DispNativeException($"head_dim {headDim} is above the CUDA attention kernel's limit {MaxHeadDim}");
        if (heads % kvHeads != 0) throw new DispNativeException($"{heads} heads are not a multiple of {kvHeads} KV heads");
    }

    /// <summary>Training forward of causal GQA attention over <paramref name="t"/> rows at positions 0..t-1 (q [t, heads·hd],
    /// k/v [t, kvHeads·hd]), also writing each row's log-sum-exp [heads, t] for <see cref="AttentionBackward"/>, with
    /// <paramref name="prefill"/> (default <see cref="DefaultPrefill"/>).</summary>
    public void AttentionForTraining(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor output, DeviceTensor lse, int t,
        int heads, int kvHeads, int headDim, int? window, PrefillKernel? prefill = null)
    {
        CheckHeads(heads, kvHeads, headDim);
        Need(lse, (long)heads * t, "attention log-sum-exp");
        Prefill(prefill ?? PrefillFor(q.DType, headDim), q, k, v, output, lse, t, 0, heads, kvHeads, headDim, window ?? 0, 1f / MathF.Sqrt(headDim));
    }

    /// <summary>Upper bound on the transient [T, T] buffers of the GEMM backward (a chunk of heads at a time).</summary>
    public const long AttentionBackwardScratchBytes = 2L << 30;

    /// <summary>Rows per block of the attention backward's block triangle at the least: smaller GEMMs fall off tensor-core speed.</summary>
    public const int MinimumAttentionRowBlock = 128;

    /// <summary>Backward of <see cref="AttentionForTraining"/>: from dO (f32) to f32 dq, dk, dv (overwritten), recomputing the
    /// probabilities from <paramref name="lse"/>; <paramref name="dsum"/> [heads, t] is scratch (rowsum dO·O). By default
    /// the GEMM formulation (<see cref="AttentionGemmBackward"/>: cuBLASLt, tensor cores for bf16/f16); with
    /// <paramref name="gemm"/> false the flash-style SIMT kernels, which never form a [T, T] matrix. <paramref name="rowBlock"/>:
    /// rows per block of the GEMMs' block triangle (default <see cref="AttentionGemmBackward.RowBlock"/>; t: the whole square).</summary>
    public void AttentionBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor output, DeviceTensor dOutput, DeviceTensor lse,
        DeviceTensor dq, DeviceTensor dk, DeviceTensor dv, DeviceTensor dsum, int t, int heads, int kvHeads, int headDim, int? window, bool gemm = true,
        int? rowBlock = null)
    {
        CheckHeads(heads, kvHeads, headDim);
        Need(q, (long)t * heads * headDim, "q"); Need(k, (long)t * kvHeads * headDim, "k"); Need(v, (long)t * kvHeads * headDim, "v");
        Need(output, (long)t * heads * headDim, "attention output"); Need(dOutput, (long)t * heads * headDim, "attention output gradient");
        Need(lse, (long)heads * t, "attention log-sum-exp");
        Need(dq, (long)t * heads * headDim, "dq"); Need(dk, (long)t * kvHeads * headDim, "dk"); Need(dv, (long)t * kvHeads * headDim, "dv");
        Need(dsum, (long)heads * t, "attention backward scratch");
        string s = CudaDevice.Suffix(q.DType);
        if (gemm)
        {
            Device.Launch("attention", $"attention_row_dot_{s}", (uint)t, 256, 0, dOutput, output, dsum, t, heads, headDim);
            using var dOutStored = q.DType == DType.F32 ? null : Device.Allocate(q.DType, (long)t * heads * headDim);
            if (dOutStored != null)   // dO may sit in a larger buffer: convert only its t rows
                Device.Launch("convert", $"convert_f32_to_{s}", CudaDevice.GridFor(dOutStored.Length), 256, 0, dOutput, dOutStored, dOutStored.Length);
            int chunk = AttentionGemmBackward.ChunkKvHeads(t, kvHeads, q.DType.Size(), AttentionBackwardScratchBytes);
            long n = (long)chunk * t * t;
            using var scores = Device.Allocate(DType.F32, n); using var dprobs = Device.Allocate(DType.F32, n);
            using var probs = Device.Allocate(q.DType, n); using var dscores = Device.Allocate(q.DType, n);
            var buffers = new Dictionary<AttentionBuffer, DeviceTensor>
            {
                [AttentionBuffer.Q] = q, [AttentionBuffer.K] = k, [AttentionBuffer.V] = v, [AttentionBuffer.DOut] = dOutStored ?? dOutput,
                [AttentionBuffer.Scores] = scores, [AttentionBuffer.DProbs] = dprobs, [AttentionBuffer.Probs] = probs, [AttentionBuffer.DScores] = dscores,
                [AttentionBuffer.DQ] = dq, [AttentionBuffer.DK] = dk, [AttentionBuffer.DV] = dv,
            };
            AttentionGemmBackward.Enqueue(new GemmBackend(this, buffers, lse, dsum), t, heads, kvHeads, headDim, window, chunk,
                rowBlock ?? AttentionGemmBackward.RowBlock(t, MinimumAttentionRowBlock));
            return;   // the temporaries go back to the allocator; later users are ordered after these kernels on the stream
        }
        float scale = 1f / MathF.Sqrt(headDim);
        int w = window ?? 0;
        uint blocks = (uint)((t + PrefillWarps - 1) / PrefillWarps);
        Device.Launch("attention", $"attention_backward_dq_{s}", (blocks, (uint)heads, 1), (PrefillWarps * 32, 1, 1), 0,
            q, k, v, output, dOutput, lse, dq, dsum, t, heads, kvHeads, headDim, w, scale);
        Device.Launch("attention", $"attention_backward_dkv_{s}", (blocks, (uint)kvHeads, 1), (PrefillWarps * 32, 1, 1), 0,
            q, k, v, dOutput, lse, dsum, dk, dv, t, heads, kvHeads, headDim, w, scale);
    }

    /// <summary>cuBLASLt and the probability kernel behind <see cref="AttentionGemmBackward"/>.</summary>
    private sealed class GemmBackend(CudaOps ops, Dictionary<AttentionBuffer, DeviceTensor> buffers, DeviceTensor lse, DeviceTensor rowdot)
        : IAttentionGemmBackend
    {
        public void Gemm(in BatchedGemm g)
        {
            DeviceTensor a = buffers[g.A], b = buffers[g.B], d = buffers[g.D];
            if (a.DType != b.DType) throw new ArgumentException($"GEMM inputs {g.A} and {g.B} differ in type");
            Fits(a, g.A, g.OffsetA, g.StrideA, g.Batch, g.TransposeA ? g.K : g.M, g.TransposeA ? g.M : g.K, g.Lda);
            Fits(b, g.B, g.OffsetB, g.StrideB, g.Batch, g.TransposeB ? g.N : g.K, g.TransposeB ? g.K : g.N, g.Ldb);
            Fits(d, g.D, g.OffsetD, g.StrideD, g.Batch, g.M, g.N, g.Ldd);
            ops.Device.BatchedGemm(a.Address(g.OffsetA), b.Address(g.OffsetB), d.Address(g.OffsetD), a.DType, d.DType, g.M, g.N, g.K, g.Batch,
                g.Lda, g.StrideA, g.TransposeA, g.Ldb, g.StrideB, g.TransposeB, g.Ldd, g.StrideD, g.Alpha, g.Beta);
        }

        public void ProbabilityGradients(in ProbabilityGradients p)
        {
            var probs = buffers[AttentionBuffer.Probs];
            ops.Device.Launch("attention", $"attention_probs_grad_{CudaDevice.Suffix(probs.DType)}", ((uint)p.T, (uint)p.Batch, 1), (256, 1, 1), 0,
                buffers[AttentionBuffer.Scores], buffers[AttentionBuffer.DProbs], lse, rowdot, probs, buffers[AttentionBuffer.DScores],
                p.T, p.FirstHead, p.HeadStep, p.Window, p.Scale, p.RowBlock);
        }

        private static void Fits(DeviceTensor t, AttentionBuffer name, long offset, long stride, int batch, int rows, int cols, int ld)
        {
            long end = offset + (batch - 1) * stride + (long)(rows - 1) * ld + cols;
            if (cols > ld || end > t.Length) throw new ArgumentException($"attention backward GEMM overruns {name} ({end} > {t.Length} elements)");
        }
    }

    /// <summary>Whether prefill attention of this storage type and head size can run on tensor cores (attention_tc.cu).</summary>
    public static bool UsesTensorCores(DType dtype, int headDim) => (dtype is DType.BF16 or DType.F16) && (headDim is 64 or 128);

    /// <summary>x[offset ..] = value (default: the whole tensor).</summary>
    public void FillConstant(DeviceTensor x, float value, long offset = 0)
    {
        long n = x.Length - offset;
        if (offset < 0 || n < 0) throw new ArgumentException($"fill offset {offset} is outside a tensor of {x.Length}");
        if (n == 0) return;
        Device.Launch("init", $"fill_constant_{CudaDevice.Suffix(x.DType)}", CudaDevice.GridFor(n), 256, 0,
            x.Address(offset), n, value);
    }

    /// <summary>x ~ N(0, std²), reproducible from <paramref name="seed"/> (counter hash, as <see cref="GumbelNoise"/>).</summary>
    public void FillNormal(DeviceTensor x, ulong seed, float std)
        => Device.Launch("init", $"fill_normal_{CudaDevice.Suffix(x.DType)}", CudaDevice.GridFor(x.Length), 256, 0, x, x.Length, seed, std);

    /// <summary>Per-row softmax cross-entropy over f32 logits; dlogits (optional) = (softmax − onehot)·gradScale.</summary>
    public void CrossEntropy(DeviceTensor logits, DeviceTensor targets, DeviceTensor loss, DeviceTensor? dlogits, int rows, int vocab, float gradScale)
    {
        if (logits.DType != DType.F32) throw new ArgumentException("cross-entropy reads f32 logits");
        Device.Launch("cross_entropy", "cross_entropy_f32", (uint)rows, 512, 0, logits, targets, loss, dlogits, vocab, gradScale);
    }

    /// <summary>Greedy decoding's device-side choice (kernels/next_token.cu): token[0] = the argmax of the f32
    /// <paramref name="logits"/> (the lowest id among equal maxima), position[0] += 1, and produced[position] (mapped host
    /// memory, its device address) = that token, or -1 where a logit is not finite (token[0] = 0 then).</summary>
    public void GreedyNextToken(DeviceTensor logits, int vocab, DeviceTensor token, DeviceTensor position, ulong produced)
    {
        if (logits.DType != DType.F32 || logits.Length < vocab) throw new ArgumentException($"greedy decoding reads {vocab} f32 logits");
        if (logits.Pointer % 16 != 0) throw new ArgumentException("greedy decoding reads the logits 16 bytes at a time: they must be 16-byte aligned");
        Device.Launch("next_token", "greedy_next_token", 1, 1024, 0, logits, vocab, token, position, produced);
    }

    /// <summary>Soft and hard Gumbel-Sigmoid masks; noise null → g = 0.</summary>
    public void GumbelSigmoid(DeviceTensor logits, DeviceTensor? noise, DeviceTensor soft, DeviceTensor? hard, int n)
        => Device.Launch("masks", "gumbel_sigmoid", CudaDevice.GridFor(n), 256, 0, logits, noise, soft, hard, n,
            (float)Disp.GumbelSigmoid.Offset, (float)Disp.GumbelSigmoid.Temperature);

    public void GumbelSigmoidBackward(DeviceTensor soft, DeviceTensor dsoft, DeviceTensor dlogits, int n)
        => Device.Launch("masks", "gumbel_sigmoid_backward", CudaDevice.GridFor(n), 256, 0, soft, dsoft, dlogits, n, (float)Disp.GumbelSigmoid.Temperature);

    public void GumbelNoise(DeviceTensor output, int n, ulong seed, ulong counter)
        => Device.Launch("masks", "gumbel_noise", CudaDevice.GridFor(n), 256, 0, output, n, seed, counter);

    /// <summary>dmask[j] = Σ_r dy[r, j]·x[r, j] (dy f32; x any storage type); with <paramref name="accumulate"/> added to dmask.
    /// <paramref name="dmaskOffset"/> places the mask inside a larger buffer. <paramref name="naive"/>: the one-thread-per-column
    /// baseline that KernelBench times against the tiled kernel.</summary>
    public void MaskColumnsGrad(DeviceTensor dy, DeviceTensor x, DeviceTensor dmask, int rows, int width, bool accumulate = false, long dmaskOffset = 0,
        bool naive = false)
    {
        Need(dy, (long)rows * width, "mask gradient input"); Need(x, (long)rows * width, "masked activation");
        Need(dmask, dmaskOffset + width, "mask gradient");
        string suffix = CudaDevice.Suffix(x.DType);
        if (naive)
            Device.Launch("masks", $"mask_columns_grad_{suffix}", CudaDevice.GridFor(width, 128), 128, 0,
                dy, x, dmask.Address(dmaskOffset), rows, width, accumulate ? 1 : 0);
        else
            Device.Launch("masks", $"mask_columns_grad_tiled_{suffix}", (uint)((width + 31) / 32), MaskGradWarps * 32, 0,
                dy, x, dmask.Address(dmaskOffset), rows, width, accumulate ? 1 : 0);
    }

    private const int MaskGradWarps = 16;   // MASK_GRAD_WARPS in masks.cu

    /// <summary>output[r, j] = x[r, j]·mask[j] (mask null: a copy), f32 to any storage type or within one type; in place
    /// allowed. <paramref name="maskOffset"/> places the mask inside a larger f32 buffer.</summary>
    public void ScaleColumns(DeviceTensor x, DeviceTensor? mask, DeviceTensor output, int rows, int width, long maskOffset = 0)
    {
        if (x.DType != DType.F32 && x.DType != output.DType) throw new ArgumentException($"scale columns converts from f32 or within a type, not {x.DType} to {output.DType}");
        Need(x, (long)rows * width, "scale columns input"); Need(output, (long)rows * width, "scale columns output");
        if (mask != null) Need(mask, maskOffset + width, "column mask");
        Device.Launch("masks", $"scale_columns_{CudaDevice.Suffix(x.DType)}_{CudaDevice.Suffix(output.DType)}", (uint)rows, Threads(width), 0,
            x, mask?.Address(maskOffset) ?? 0UL, output, width);
    }

    /// <summary>output[r, j] = x[r, j] + y[r, j]·mask[j] in the f32 residual (a masked block's write-back); output null: x, in place.</summary>
    public void AddScaledColumns(DeviceTensor x, DeviceTensor y, DeviceTensor mask, int rows, int width, long maskOffset = 0, DeviceTensor? output = null)
    {
        Need(x, (long)rows * width, "residual"); Need(y, (long)rows * width, "masked block output"); Need(mask, maskOffset + width, "column mask");
        if (output != null) Need(output, (long)rows * width, "new residual");
        Device.Launch("masks", "add_scaled_columns_f32", (uint)rows, Threads(width), 0, x, y, mask.Address(maskOffset), output ?? x, width);
    }

    /// <summary><see cref="MaskColumnsGrad"/> (accumulated) and <see cref="ScaleColumns"/> of one gradient in one pass:
    /// maskGrads[offset + j] += Σ_r dy[r, j]·x[r, j] and output[r, j] = dy[r, j]·masks[offset + j]. dy is f32; x f32 with
    /// output f32 or a storage type, or x a storage type with output f32 (output may be dy: in place).</summary>
    public void MaskColumnsGradAndScale(DeviceTensor dy, DeviceTensor x, DeviceTensor masks, DeviceTensor maskGrads, long offset, DeviceTensor output,
        int rows, int width)
    {
        if (dy.DType != DType.F32) throw new ArgumentException($"mask gradient reads an f32 gradient, not {dy.DType}");
        if (x.DType != DType.F32 && output.DType != DType.F32) throw new ArgumentException($"mask gradient and scale: {x.DType} activation into {output.DType}");
        Need(dy, (long)rows * width, "mask gradient input"); Need(x, (long)rows * width, "masked activation");
        Need(output, (long)rows * width, "masked gradient"); Need(masks, offset + width, "column mask"); Need(maskGrads, offset + width, "mask gradient");
        Device.Launch("masks", $"mask_grad_scale_{CudaDevice.Suffix(x.DType)}_{CudaDevice.Suffix(output.DType)}", (uint)((width + 31) / 32), MaskGradWarps * 32, 0,
            dy, x, maskGrads.Address(offset), masks.Address(offset), output, rows, width, 1);
    }

    /// <summary>The MLP middle site's backward in one pass, from dOutput = ∂/∂(silu(gate)·up·mask) (f32): maskGrads[offset + j]
    /// += Σ_r dOutput·silu(gate)·up (the activation recomputed), and dGate, dUp (gate's storage type) the SwiGLU backward
    /// of dOutput·mask.</summary>
    public void SwiGluMaskBackward(DeviceTensor gate, DeviceTensor up, DeviceTensor dOutput, DeviceTensor masks, DeviceTensor maskGrads, long offset,
        DeviceTensor dGate, DeviceTensor dUp, int rows, int width)
    {
        long n = (long)rows * width;
        Need(gate, n, "gate"); Need(up, n, "up"); Need(dOutput, n, "activation gradient"); Need(dGate, n, "gate gradient"); Need(dUp, n, "up gradient");
        Need(masks, offset + width, "column mask"); Need(maskGrads, offset + width, "mask gradient");
        Device.Launch("masks", $"swiglu_mask_backward_{CudaDevice.Suffix(gate.DType)}", (uint)((width + 31) / 32), MaskGradWarps * 32, 0,
            gate, up, dOutput, masks.Address(offset), maskGrads.Address(offset), dGate, dUp, rows, width, 1);
    }

    /// <summary>masked[r, j] = silu(gate[r, j])·up[r, j]·masks[offset + j] ([rows, width]): SwiGLU and the middle mask in one pass.</summary>
    public void SiluMulMasked(DeviceTensor gate, DeviceTensor up, DeviceTensor masks, long offset, DeviceTensor masked, int rows, int width)
    {
        long n = (long)rows * width;
        Need(gate, n, "gate"); Need(up, n, "up"); Need(masked, n, "masked activation"); Need(masks, offset + width, "column mask");
        Device.Launch("masks", $"silu_mul_masked_{CudaDevice.Suffix(gate.DType)}", (uint)rows, Threads(width), 0, gate, up, masks.Address(offset), masked, width);
    }

    /// <summary>Dense RMSNorm into output and, with <paramref name="masked"/>, its column-masked copy
    /// masked[r, j] = output[r, j]·masks[offset + j] (rounded once from f32), one pass.</summary>
    public void RmsNormMasked(DeviceTensor x, DeviceTensor gamma, DeviceTensor output, DeviceTensor masks, long offset, DeviceTensor? masked, int rows, int d, float eps)
        => AddMaskedRmsNorm(x, null, null, 0, null, gamma, output, masks, offset, masked, rows, d, eps);

    /// <summary>xOut = x + y·addMasks[addOffset + j] (a masked block's write-back into a new f32 residual; y null: xOut = x,
    /// not written), then <see cref="RmsNormMasked"/> of it. One launch where the row fits shared memory.</summary>
    public void AddMaskedRmsNorm(DeviceTensor x, DeviceTensor? y, DeviceTensor? addMasks, long addOffset, DeviceTensor? xOut,
        DeviceTensor gamma, DeviceTensor output, DeviceTensor masks, long offset, DeviceTensor? masked, int rows, int d, float eps)
    {
        long n = (long)rows * d;
        Need(x, n, "norm input"); Need(output, n, "norm output"); Need(masks, offset + d, "column mask");
        if (masked != null) Need(masked, n, "masked norm output");
        if (y != null)
        {
            if (addMasks == null || xOut == null) throw new ArgumentException("a masked write-back needs its mask and the new residual");
            Need(y, n, "masked block output"); Need(addMasks, addOffset + d, "write-back mask"); Need(xOut, n, "new residual");
        }
        uint smem = RowSmem(d);
        if (smem == 0)
        {
            var normed = x;
            if (y != null) { AddScaledColumns(x, y, addMasks!, rows, d, addOffset, xOut); normed = xOut!; }
            GatherRmsNorm(normed, gamma, null, output, rows, d, eps);
            if (masked != null) ScaleColumns(output, masks, masked, rows, d, offset);
            return;
        }
        string suffix = CudaDevice.Suffix(output.DType);
        uint threads = NormThreads(rows, d, d);
        if (y == null)
            Device.Launch("norm", $"rmsnorm_masked_{suffix}", (uint)rows, threads, smem, x, gamma, output, masks.Address(offset), masked, d, eps);
        else
            Device.Launch("norm", $"add_masked_rmsnorm_{suffix}", (uint)rows, threads, smem, x, y, addMasks!.Address(addOffset), xOut,
                gamma, output, masks.Address(offset), masked, d, eps);
    }
}

/// <summary>The split-KV decode's scratch for one head layout (<see cref="CudaOps.NewDecodeScratch"/>): every share's
/// unnormalised output row, max and sum, then one arrival counter per head, which must be zero before a launch (the
/// kernel leaves them so).</summary>
public sealed class DecodeScratch : IDisposable
{
    internal DeviceTensor Tensor { get; }
    public int Heads { get; }
    public int HeadDim { get; }
    internal long CountersOffset { get; }

    internal DecodeScratch(DeviceTensor tensor, int heads, int headDim, long countersOffset)
        => (Tensor, Heads, HeadDim, CountersOffset) = (tensor, heads, headDim, countersOffset);

    internal ulong States => Tensor.Pointer;
    internal ulong Counters => Tensor.Address(CountersOffset);

    public void Dispose() => Tensor.Dispose();
}

/// <summary>Kernels of single-query (decode) attention.</summary>
public enum DecodeKernel
{
    /// <summary>A block per head, a lane per key (attention_decode_naive): the baseline, and any head size.</summary>
    Naive,
    /// <summary>Split-KV: blocks over (head, share of the keys); the last block of each head to finish merges the shares.</summary>
    SplitKv,
    /// <summary>Split-KV with the shares merged by a second kernel (attention_decode_combine), as before the merge moved
    /// into the last block; kept for KernelBench.</summary>
    SplitKvCombineKernel,
}

/// <summary>Kernels of multi-query (prefill and training) attention.</summary>
public enum PrefillKernel
{
    /// <summary>Flash-style SIMT kernel (attention.cu): any storage type and head size up to 128; the naive baseline.</summary>
    Simt,
    /// <summary>Tensor cores, 16 query rows per warp with Q in registers (attention_prefill_tc).</summary>
    TensorCores16Rows,
    /// <summary>Tensor cores, 32 query rows per warp with Q in shared memory, as in FlashAttention-2 (attention_prefill_fa).</summary>
    TensorCores32Rows,
    /// <summary>The same with the output rescaled on every key tile (KernelBench's baseline; bf16, head_dim 128).</summary>
    TensorCores32RowsRescaleEveryTile,
    /// <summary>The same with single K and V buffers and four barriers per tile (KernelBench's baseline; bf16, head_dim 128).</summary>
    TensorCores32RowsSingleBuffer,
    /// <summary>The same with the former softmax: exp2f instead of the bare ex2.approx.ftz, probabilities rounded to 16 bits one at a
    /// time instead of in pairs (KernelBench's baseline; bf16, head_dim 128).</summary>
    TensorCores32RowsBaselineSoftmax,
    /// <summary>Hopper warpgroup MMA (wgmma, sm_90a): one warpgroup of 64 query rows per block, Q, K and V read by the
    /// tensor cores from swizzled shared memory (attention_prefill_wgmma; <see cref="CudaDevice.SupportsWgmma"/>).</summary>
    Wgmma,
    /// <summary>The same with two warpgroups (128 query rows) per block sharing each K/V tile (attention_prefill_wgmma_2wg).</summary>
    Wgmma2Warpgroups,
}
