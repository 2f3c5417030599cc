using System.Text.Json;
using DispNative.Engine.Cpu;
using DispNative.Engine.Disp;
using DispNative.Engine.Inference;
using DispNative.Engine.IO;
using DispNative.Engine.Models;
using DispNative.Engine.Training;
using DispNative.Interop;

namespace DispNative.Engine.Cuda;

/// <summary>One self-check: its name, whether it passed, and the measured error against its tolerance.</summary>
public sealed record CheckResult(string Name, bool Passed, string Detail);

/// <summary>Every CUDA kernel against its CPU twin on random shapes (odd widths included), the GEMMs, the whole
/// forward (dense and pruned, prefill and decode) against <see cref="LlamaModel"/>, and, given the reference model
/// directory, its transformers golden logits in f32 and bf16. Used by <c>DispNative selftest</c> and the GPU tests.</summary>
public static class SelfTest
{
    public sealed record Check(string Name, Func<CudaDevice, string> Run);

    /// <summary>A failed comparison; its message is the check's detail line.</summary>
    public sealed class Mismatch(string message) : Exception(message);

    public static IReadOnlyList<Check> Checks(string? referenceModelDir = null)
    {
        var checks = new List<Check>
        {
            new("convert f32<->bf16 rounding", Convert),
            new("convert f32<->f16 rounding; values beyond f16/bf16 refused at upload", ConvertF16),
            new("embedding bf16 (rows 7, d 131)", Embedding),
            new("greedy next token = host argmax (vocab 32003: ties, lowest id; a NaN: -1, token 0), position advanced, written to mapped host memory", GreedyNextToken),
            new("rope f32 (heads 3, head_dim 64, start 11)", Rope),
            new("rope + kv append f32 (rows 5 after 11, heads 6/2, head_dim 64)", dev => RopeKvAppend(dev, DType.F32)),
            new("rope + kv append bf16 (rows 5 after 11, heads 6/2, head_dim 64)", dev => RopeKvAppend(dev, DType.BF16)),
            new("rope of keys already in the cache (prefill's form), bf16 (rows 5 after 11, heads 6/2, head_dim 64)", dev => RopeKvAppend(dev, DType.BF16, inCache: true)),
            new("decode rope + kv append + attention bf16 (position 1500 of 2048, heads 8/2, head_dim 128)", dev => RopeAttentionDecode(dev, DType.BF16, 8, 2, 128, 1500, 2048)),
            new("decode rope + kv append + attention f32 (position 0 of 300, heads 4/4, head_dim 64)", dev => RopeAttentionDecode(dev, DType.F32, 4, 4, 64, 0, 300)),
            new("decode rope + kv append + attention f16, window 100 (position 250 of 256, heads 6/3, head_dim 48)", dev => RopeAttentionDecode(dev, DType.F16, 6, 3, 48, 250, 256, 100)),
            new("decode rope + kv append + attention f32 (head_dim 20: two launches)", dev => RopeAttentionDecode(dev, DType.F32, 3, 1, 20, 40, 64)),
            new("decode rope + kv append + attention bf16, 8-warp blocks (positions 100 and 1500 of 2048, heads 8/2, head_dim 128)",
                dev => WithDecodeAttention(dev, 8, () => RopeDecodeAt100And1500(dev))),
            new("decode rope + kv append + attention bf16, rescaled every key and once a round (positions 100 and 1500 of 2048, heads 8/2, head_dim 128)",
                dev => WithEachOtherRescale(dev, () => RopeDecodeAt100And1500(dev))),
            new("rmsnorm dense f32 (d 384)", dev => Norm(dev, 3, 384, null, DType.F32, 2e-6)),
            new("gather-rmsnorm f32 (d 4096 -> 1237, row in smem)", dev => Norm(dev, 4, 4096, 1237, DType.F32, 2e-6)),
            new("gather-rmsnorm f32 (d 13001 -> 77, row from global)", dev => Norm(dev, 2, 13001, 77, DType.F32, 2e-6)),
            new("gather-rmsnorm bf16 (d 1000 -> 333)", dev => Norm(dev, 5, 1000, 333, DType.BF16, 1e-2)),
            new("gather-rmsnorm bf16 (d 4096 -> 2673, output padded to 2680)", dev => Norm(dev, 3, 4096, 2673, DType.BF16, 1e-2, padded: true)),
            new("gather-rmsnorm bf16, 300 rows: a row per block of d/16 threads, three output chunks (d 4096 -> 2673)",
                dev => Norm(dev, 300, 4096, 2673, DType.BF16, 1e-2)),
            new("gather-layernorm f32 (d 515 -> 200, beta)", LayerNorm),
            new("index-add f32 (d 999 <- 311, bias, scale)", dev => IndexAdd(dev, 311, bias: true)),
            new("residual add f32 (d 999)", dev => IndexAdd(dev, null, bias: false)),
            new("index-add + gather-rmsnorm f32 in one launch (d 4096 <- 2673 rows 2680 apart, bias, scale; -> 1237 padded)",
                dev => IndexAddNorm(dev, 4096, 2673, 1237, DType.F32, 2e-6)),
            new("index-add + gather-rmsnorm bf16 in one launch (d 999 <- 311; -> 333)", dev => IndexAddNorm(dev, 999, 311, 333, DType.BF16, 1e-2)),
            new("residual add + rmsnorm f32 in one launch (d 384)", dev => IndexAddNorm(dev, 384, null, null, DType.F32, 2e-6)),
            new("index-add + gather-rmsnorm f32, row above shared memory: two launches (d 13001 <- 5000; -> 77)",
                dev => IndexAddNorm(dev, 13001, 5000, 77, DType.F32, 2e-6)),
            new("gather-rmsnorm and index-add + gather-rmsnorm bf16 compiled for 8 blocks/SM, gather-rmsnorm loading gamma after the row (KernelBench) = the engine's kernels, bit for bit",
                OccupancyVariants),
            new("index-add f32 (d 999 <- 311, input rows 320 apart)", dev => IndexAdd(dev, 311, bias: false, padded: true)),
            new("swiglu f32 in place (n 10007)", dev => SwiGlu(dev, DType.F32)),
            new("swiglu bf16 in place, approximate exp and divide (n 10007: 16-byte steps and a tail)", dev => SwiGlu(dev, DType.BF16)),
            new("swiglu f32 with approximate exp and divide, bf16 with exact ones (the other forms; n 10007)",
                dev => SwiGlu(dev, DType.F32, fastMath: true) + "; " + SwiGlu(dev, DType.BF16, fastMath: false)),
            new("gelu f32 (n 10007)", dev => Gelu(dev, DType.F32)),
            new("gelu f16 (n 10007)", dev => Gelu(dev, DType.F16)),
            new("attention prefill f32 (t 37, heads 6/2, head_dim 64)", dev => Attention(dev, 37, 0, 6, 2, 64, null)),
            new("attention prefill f32 (t 9 after 20, heads 4/4, head_dim 48)", dev => Attention(dev, 9, 20, 4, 4, 48, null)),
            new("attention prefill f32 sliding window 16 (t 70)", dev => Attention(dev, 70, 0, 4, 1, 32, 16)),
            new("attention decode f32 split-KV (position 150, heads 8/2, head_dim 128)", dev => Attention(dev, 1, 150, 8, 2, 128, null)),
            new("attention decode bf16 split-KV (position 1500 of 4096, heads 4/2, head_dim 128)", dev => Attention(dev, 1, 1500, 4, 2, 128, null, DType.BF16, capacity: 4096)),
            new("attention decode f16 split-KV, a short context in a long cache's grid (position 20 of 4096, heads 4/1, head_dim 64)", dev => Attention(dev, 1, 20, 4, 1, 64, null, DType.F16, capacity: 4096)),
            new("attention decode bf16 split-KV sliding window 300 (position 1000 of 1024, head_dim 48)", dev => Attention(dev, 1, 1000, 2, 1, 48, 300, DType.BF16, capacity: 1024)),
            new("attention decode f32 split-KV (head_dim 20: 5 of 8 lanes per key)", dev => Attention(dev, 1, 77, 3, 3, 20, null)),
            new("attention decode bf16 naive fallback (head_dim 20: no 16-byte layout)", dev => Attention(dev, 1, 77, 3, 3, 20, null, DType.BF16)),
            new("attention decode bf16 naive (position 700, heads 4/2, head_dim 128)", dev => Attention(dev, 1, 700, 4, 2, 128, null, DType.BF16, decode: DecodeKernel.Naive)),
            new("attention decode bf16 split-KV, combine kernel (position 700, heads 4/2, head_dim 128)", dev => Attention(dev, 1, 700, 4, 2, 128, null, DType.BF16, decode: DecodeKernel.SplitKvCombineKernel)),
            new("attention decode bf16 split-KV, 200-key shares (several steps per block; position 1500 of 2048)", dev => Attention(dev, 1, 1500, 4, 4, 128, null, DType.BF16, capacity: 2048, keysPerSplit: 200)),
            new("attention decode f32 split-KV, 64 shares (position 5000 of 8192, heads 2/1, head_dim 64)", dev => Attention(dev, 1, 5000, 2, 1, 64, null, capacity: 8192)),
            new("attention decode bf16 split-KV, 8-warp blocks (position 1500 of 4096, heads 4/2, head_dim 128)",
                dev => WithDecodeAttention(dev, 8, () => Attention(dev, 1, 1500, 4, 2, 128, null, DType.BF16, capacity: 4096))),
            new("attention decode f16 split-KV, 8-warp blocks, window 300 (position 1000 of 1024, heads 4/1, head_dim 64; position 20)",
                dev => WithDecodeAttention(dev, 8, () => WindowedF16Decode(dev))),
            new("attention decode f16 split-KV, rescaled every key and once a round, window 300 (position 1000 of 1024, heads 4/1, head_dim 64; position 20)",
                dev => WithEachOtherRescale(dev, () => WindowedF16Decode(dev))),
            new("attention prefill bf16 SIMT (t 65, heads 4/2, head_dim 64)", dev => Attention(dev, 65, 0, 4, 2, 64, null, DType.BF16, PrefillKernel.Simt)),
            new("attention prefill bf16 tensor cores 16 rows/warp (t 65, heads 4/2, head_dim 64)", dev => Attention(dev, 65, 0, 4, 2, 64, null, DType.BF16, PrefillKernel.TensorCores16Rows)),
            new("attention prefill f16 tensor cores 16 rows/warp (t 130 after 30, heads 4/1, head_dim 128)", dev => Attention(dev, 130, 30, 4, 1, 128, null, DType.F16, PrefillKernel.TensorCores16Rows)),
            new("attention prefill bf16 tensor cores 16 rows/warp, window 90 (t 200, head_dim 64)", dev => Attention(dev, 200, 0, 2, 2, 64, 90, DType.BF16, PrefillKernel.TensorCores16Rows)),
            new("attention prefill bf16 tensor cores 32 rows/warp (t 65, heads 4/2, head_dim 64)", dev => Attention(dev, 65, 0, 4, 2, 64, null, DType.BF16)),
            new("attention prefill f16 tensor cores 32 rows/warp (t 300 after 30, heads 4/1, head_dim 128)", dev => Attention(dev, 300, 30, 4, 1, 128, null, DType.F16)),
            new("attention prefill bf16 tensor cores 32 rows/warp, window 50 (t 200, head_dim 64)", dev => Attention(dev, 200, 0, 2, 2, 64, 50, DType.BF16)),
            new("attention prefill bf16 tensor cores 32 rows/warp, window 100 (t 290 after 40, heads 2/1, head_dim 128)", dev => Attention(dev, 290, 40, 2, 1, 128, 100, DType.BF16)),
            new("attention prefill bf16 tensor cores 32 rows/warp, keys growing with position: row maxima move on some tiles, not others (t 300 after 30, head_dim 128)",
                dev => Attention(dev, 300, 30, 2, 1, 128, null, DType.BF16, keyGrowth: 1f / 32)),
            new("attention prefill f16 tensor cores 32 rows/warp, keys growing with position (t 257, heads 3/3, head_dim 64)",
                dev => Attention(dev, 257, 0, 3, 3, 64, null, DType.F16, keyGrowth: 1f / 64)),
            new("attention prefill bf16 32 rows/warp, output rescaled on every tile (KernelBench's baseline; t 300 after 30, keys growing)",
                dev => Attention(dev, 300, 30, 2, 1, 128, null, DType.BF16, PrefillKernel.TensorCores32RowsRescaleEveryTile, keyGrowth: 1f / 32)),
            new("attention prefill bf16 32 rows/warp, single K/V buffers (KernelBench's baseline; t 300 after 30, window 100)",
                dev => Attention(dev, 300, 30, 2, 1, 128, 100, DType.BF16, PrefillKernel.TensorCores32RowsSingleBuffer)),
            new("attention prefill bf16 32 rows/warp, the former softmax: exp2f, probabilities rounded one at a time (KernelBench's baseline; t 300 after 30, keys growing)",
                dev => Attention(dev, 300, 30, 2, 1, 128, null, DType.BF16, PrefillKernel.TensorCores32RowsBaselineSoftmax, keyGrowth: 1f / 32)),
            new("cross-entropy f32 with gradient (vocab 32003, ignore)", CrossEntropy),
            new("gumbel-sigmoid masks and backward", Gumbel),
            new("fill normal and constant bf16 (n 1048583)", Fill),
            new("stream prefix f32 -> bf16 (KernelBench's gather-norm ceiling; rows 300, d 1028, w 1013)", StreamPrefix),
            new("mask columns: scale, masked residual add, gradient (rows 203, width 301)", dev => MaskColumns(dev, DType.F32, 203)),
            new("mask columns bf16: scale in place, f32 -> bf16, accumulated gradient (rows 13)", dev => MaskColumns(dev, DType.BF16, 13)),
            new("fused mask kernels f32: gradient + scale, SwiGLU backward with its mask's gradient, masked SwiGLU, write-back into a new residual (rows 203, width 301)",
                dev => FusedMaskColumns(dev, DType.F32, 203)),
            new("fused mask kernels bf16: gradient + scale into bf16 and in place from a bf16 activation, SwiGLU backward, masked SwiGLU (rows 13)",
                dev => FusedMaskColumns(dev, DType.BF16, 13)),
            new("masked rmsnorm and masked write-back + rmsnorm, one launch, bf16 (d 999)", dev => MaskedNorms(dev, DType.BF16, 999)),
            new("masked rmsnorm and masked write-back + rmsnorm f32, row above shared memory: separate kernels (d 13001)", dev => MaskedNorms(dev, DType.F32, 13001)),
            new("rmsnorm backward f32 (d 999, accumulated)", RmsNormBackward),
            new("rope backward f32 (inverse rotation, heads 3, head_dim 64)", RopeBackward),
            new("rope backward f32 -> bf16 into another tensor (the input kept)", dev => RopeBackward(dev, DType.BF16)),
            new("attention backward f32 SIMT (t 45, heads 4/2, head_dim 64)", dev => AttentionBackward(dev, 45, 4, 2, 64, null, DType.F32, gemm: false)),
            new("attention backward f32 SIMT sliding window 9 (t 70, heads 2/1, head_dim 48)", dev => AttentionBackward(dev, 70, 2, 1, 48, 9, DType.F32, gemm: false)),
            new("attention backward f32 GEMMs (t 45, heads 4/2, head_dim 64)", dev => AttentionBackward(dev, 45, 4, 2, 64, null, DType.F32)),
            new("attention backward f32 GEMMs sliding window 9 (t 70, heads 2/1, head_dim 48)", dev => AttentionBackward(dev, 70, 2, 1, 48, 9, DType.F32)),
            new("attention backward bf16 GEMMs, tensor-core forward (32 rows/warp) with lse (t 130, heads 4/2, head_dim 64)", dev => AttentionBackward(dev, 130, 4, 2, 64, null, DType.BF16)),
            new("attention backward f16 GEMMs, tensor-core forward, window 40 (t 200, heads 2/1, head_dim 128)", dev => AttentionBackward(dev, 200, 2, 1, 128, 40, DType.F16)),
            new("attention backward bf16 (t 100, heads 4/4, head_dim 128)", dev => AttentionBackward(dev, 100, 4, 4, 128, null, DType.BF16)),
            new("attention backward bf16, forward with lse on tensor cores 16 rows/warp (t 100, heads 4/2, head_dim 128)",
                dev => AttentionBackward(dev, 100, 4, 2, 128, null, DType.BF16, prefill: PrefillKernel.TensorCores16Rows)),
            new("gemm f32 (33 x 77 x 129)", dev => Gemm(dev, 33, 77, 129, DType.F32)),
            new("gemm bf16 -> f32 (64 x 1000 x 333)", dev => Gemm(dev, 64, 1000, 333, DType.BF16)),
            new("gemm f32, B not transposed (33 x 77 x 129)", dev => Gemm(dev, 33, 77, 129, DType.F32, transposeB: false)),
            new("gemm bf16 -> f32, B not transposed, accumulate (64 x 1000 x 333)", dev => Gemm(dev, 64, 1000, 333, DType.BF16, transposeB: false, beta: 1)),
            new("gemv f32 (1 x 77 x 132)", dev => Gemm(dev, 1, 77, 132, DType.F32)),
            new("gemv bf16 -> f32, accumulate (1 x 1000 x 4096)", dev => Gemm(dev, 1, 1000, 4096, DType.BF16, beta: 1)),
            new("gemv bf16 -> bf16 (1 x 300 x 11008)", dev => Gemm(dev, 1, 300, 11008, DType.BF16, output: DType.BF16)),
            new("gemm bf16 1 x 50 x 333 (K not a multiple of 8: cuBLASLt)", dev => Gemm(dev, 1, 50, 333, DType.BF16)),
            new("gemm algorithm choice (37 x 200 x 136): the first call accumulates once, the choice is recorded, the heuristic's first agrees", GemmAlgorithmChoice),
            new("gemv bf16 q/k/v in one launch, gate/up + swiglu, index-add of 37 of 60 channels, plain (K 264, 2656, 4104: 1-3 rounds of loads): " +
                "unroll 8 vs CPU, 12 and 16 the same bits, the tuned first call too (adds once)", dev => GemvUnrolls(dev, DType.BF16, [264, 2656, 4104])),
            new("gemv bf16 streamed over rows = a block per 8 rows, bit for bit: plain -> bf16 and -> f32, index-add of 203 of 300, q/k/v in one launch, " +
                "gate/up + swiglu; K 264, 2656, 4104; every unroll; grids of 1, 3, 10 with the rows balanced over fewer, and the resident blocks; " +
                "a round of loads per row (the by-row form) on 3 and the resident blocks", GemvStreamed),
            new("gemv f32 q/k/v in one launch, gate/up + swiglu, index-add of 37 of 60 channels, plain (K 264, 1300): " +
                "unroll 8 vs CPU, 12 and 16 the same bits, the tuned first call too (adds once)", dev => GemvUnrolls(dev, DType.F32, [264, 1300])),
            new("decode norm fused into the q/k/v and gate/up + swiglu GEMVs, bf16: 2651 of 4096 channels (norm block 1024), dense 96 (block 128): " +
                "two launches vs CPU, fused the same bits in both forms (rows looped over, streamed) at every unroll, with grids of 1, 3 and the engine's blocks, and tuned",
                dev => FusedDecodeNorms(dev, DType.BF16, [(4096, 2651), (96, null)])),
            new("decode norm fused into the GEMVs, f32: 600 of 1000 channels (norm block 256, 250 row loads), dense 2048 (block 512)",
                dev => FusedDecodeNorms(dev, DType.F32, [(1000, 600), (2048, null)])),
            new("forward dense f32 vs CPU (prefill in two chunks + decode)", dev => Forward(dev, pruned: false)),
            new("decode bf16, DISP-pruned: programmatic dependent launch = plain stream order, bit for bit (graphs and eager)", ProgrammaticDecode),
            new("greedy decoding on the device (dense and DISP-pruned bf16, graphs and eager) = host argmax over the decode logits; stopped early, the cache goes on from the last token read",
                GreedyDecode),
            new("decode bf16 as one persistent kernel = a kernel per phase, bit for bit: dense and DISP-pruned, 1 and 4 KV splits, " +
                "grids of 1 and 3 blocks at every unroll", dev => PersistentDecode(dev, DType.BF16, [false, true], [13, 200], full: false)),
            new("decode bf16 as one persistent kernel, DISP-pruned, 4 KV splits: the engine's grid and the timed form, bit for bit",
                dev => PersistentDecode(dev, DType.BF16, [true], [200], full: true)),
            new("decode f32 as one persistent kernel = a kernel per phase, bit for bit (DISP-pruned, 4 KV splits); with biases it declines, refused it falls back",
                dev => PersistentDecode(dev, DType.F32, [true], [200], full: false)),
            new("forward DISP-pruned f32 vs CPU (prefill in two chunks + decode)", dev => Forward(dev, pruned: true)),
            new("forward DISP-pruned f32 vs CPU, widths stored padded to 128, wider than the full 96 (prefill in two chunks + decode)", dev => Forward(dev, pruned: true, padding: 128)),
            new("forward DISP-pruned f32 vs CPU, q/k/v biases as in Qwen2 (prefill in two chunks + decode)", dev => Forward(dev, pruned: true, qkvBias: true)),
            new("perplexity scoring on the device (cross-entropy of the logits kept there) vs the host's log-sum-exp of the " +
                "downloaded logits: dense and DISP-pruned, f32 and bf16", DeviceScoring),
            new("load streamed from a dense checkpoint = uploaded from host weights (bf16, tied, sharded)", dev => StreamedLoad(dev, pruned: false)),
            new("load streamed from a DISP-pruned checkpoint = uploaded from host weights (bf16, untied, sharded)", dev => StreamedLoad(dev, pruned: true)),
            new("masked training step f32 vs CPU (loss, mask gradients; disp)", dev => TrainingStep(dev, PruningMode.Disp, DType.F32)),
            new("masked training step f32 vs CPU (loss, mask gradients; same)", dev => TrainingStep(dev, PruningMode.Same, DType.F32)),
            new("masked training step bf16 vs CPU f32 (loss, mask gradients)", dev => TrainingStep(dev, PruningMode.Disp, DType.BF16)),
            new("masked training step f32, layers checkpointed (recomputed forward)", dev => TrainingStep(dev, PruningMode.Disp, DType.F32, checkpoint: true)),
            new("masked training step bf16, layers checkpointed", dev => TrainingStep(dev, PruningMode.Same, DType.BF16, checkpoint: true)),
        };
        if (referenceModelDir != null)
        {
            checks.Add(new("ref-llama golden f32 (argmax, logsumexp, L2)", dev => Golden(dev, referenceModelDir, DType.F32)));
            checks.Add(new("ref-llama golden bf16 (argmax agreement >= 99%)", dev => Golden(dev, referenceModelDir, DType.BF16)));
            checks.Add(new("ref-llama training step f32, CPU vs CUDA (loss, hypernetwork gradients)", dev => ReferenceTrainingStep(dev, referenceModelDir)));
        }
        // Last: the kernel that no GPU has yet run, so that a fault in it (which leaves the context unusable) costs
        // no other check.
        checks.AddRange(
        [
            new("attention prefill bf16 warpgroup MMA, sm_90a (t 300 after 30, heads 4/1, head_dim 128, keys growing)",
                dev => Wgmma(dev, () => Attention(dev, 300, 30, 4, 1, 128, null, DType.BF16, PrefillKernel.Wgmma, keyGrowth: 1f / 32))),
            new("attention prefill f16 warpgroup MMA, sm_90a (t 257, heads 3/3, head_dim 64, keys growing)",
                dev => Wgmma(dev, () => Attention(dev, 257, 0, 3, 3, 64, null, DType.F16, PrefillKernel.Wgmma, keyGrowth: 1f / 64))),
            new("attention prefill bf16 warpgroup MMA, sm_90a, window 100 (t 290 after 40, heads 2/1, head_dim 128)",
                dev => Wgmma(dev, () => Attention(dev, 290, 40, 2, 1, 128, 100, DType.BF16, PrefillKernel.Wgmma))),
            new("attention prefill bf16 warpgroup MMA, sm_90a (t 37: one partial block, heads 4/2, head_dim 64)",
                dev => Wgmma(dev, () => Attention(dev, 37, 0, 4, 2, 64, null, DType.BF16, PrefillKernel.Wgmma))),
            new("attention backward bf16, forward with lse on warpgroup MMA, sm_90a (t 100, heads 4/2, head_dim 128)",
                dev => Wgmma(dev, () => AttentionBackward(dev, 100, 4, 2, 128, null, DType.BF16, prefill: PrefillKernel.Wgmma))),
            new("attention prefill bf16 warpgroup MMA, two warpgroups per block, sm_90a (t 300 after 30, heads 4/1, head_dim 128, keys growing)",
                dev => Wgmma(dev, () => Attention(dev, 300, 30, 4, 1, 128, null, DType.BF16, PrefillKernel.Wgmma2Warpgroups, keyGrowth: 1f / 32))),
            new("attention prefill f16 warpgroup MMA, two warpgroups per block, sm_90a, window 50 (t 200, heads 2/2, head_dim 64)",
                dev => Wgmma(dev, () => Attention(dev, 200, 0, 2, 2, 64, 50, DType.F16, PrefillKernel.Wgmma2Warpgroups))),
            new("attention prefill bf16 warpgroup MMA, two warpgroups per block, sm_90a (t 100: the second warpgroup's rows partly past t, head_dim 128)",
                dev => Wgmma(dev, () => Attention(dev, 100, 0, 2, 1, 128, null, DType.BF16, PrefillKernel.Wgmma2Warpgroups)))
        ]);
        return checks;
    }

    /// <summary>Runs the checks, reporting each as it finishes.</summary>
    public static List<CheckResult> Run(CudaDevice device, IEnumerable<Check> checks, Action<CheckResult>? report = null)
    {
        var results = new List<CheckResult>();
        foreach (var check in checks)
        {
            CheckResult r;
            try { r = new CheckResult(check.Name, true, check.Run(device)); }
            catch (Mismatch e) { r = new CheckResult(check.Name, false, e.Message); }
            catch (Exception e) { r = new CheckResult(check.Name, false, $"{e.GetType().Name}: {e.Message}"); }
            results.Add(r);
            report?.Invoke(r);
        }
        return results;
    }

    // ---- comparisons ----

    /// <summary>max |got − want| / max |want|; throws <see cref="Mismatch"/> above the tolerance.</summary>
    public static string Compare(ReadOnlySpan<float> got, ReadOnlySpan<float> want, double tolerance, string what = "max rel err")
    {
        if (got.Length != want.Length) throw new Mismatch($"length {got.Length}, expected {want.Length}");
        double maxDiff = 0, scale = 1e-30;
        int worst = 0;
        for (int i = 0; i < got.Length; i++)
        {
            double diff = Math.Abs((double)got[i] - want[i]);
            if (double.IsNaN(diff)) throw new Mismatch($"NaN at {i}");
            if (diff > maxDiff) { maxDiff = diff; worst = i; }
            scale = Math.Max(scale, Math.Abs(want[i]));
        }
        double rel = maxDiff / scale;
        string detail = $"{what} {rel:E2} (tol {tolerance:E0})";
        if (rel > tolerance) throw new Mismatch($"{detail}; worst at {worst}: {got[worst]} vs {want[worst]}");
        return detail;
    }

    private static float[] Random(Rng rng, int n, float scale = 1)
    {
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = rng.NextGaussian() * scale;
        return a;
    }

    private static float[] RoundTo(DType t, float[] a) => t switch
    {
        DType.BF16 => a.Select(v => DTypes.BF16ToFloat(DTypes.FloatToBF16(v))).ToArray(),
        DType.F16 => a.Select(v => (float)(Half)v).ToArray(),
        _ => a,
    };

    private static int[] Subset(Rng rng, int full, int width)
    {
        var all = Enumerable.Range(0, full).ToArray();
        for (int i = full - 1; i > 0; i--) { int j = rng.NextInt(i + 1); (all[i], all[j]) = (all[j], all[i]); }
        return all[..width].Order().ToArray();
    }

    // ---- kernels ----

    private static string Convert(CudaDevice dev)
    {
        var rng = new Rng(1);
        var x = Random(rng, 4099, 100);
        x[0] = float.NaN; x[1] = float.PositiveInfinity; x[2] = 3.3895314e38f; x[3] = 1e-40f;
        using var t = dev.Upload(x, DType.BF16);
        var back = dev.Download(t);
        for (int i = 0; i < x.Length; i++)
        {
            float want = DTypes.BF16ToFloat(DTypes.FloatToBF16(x[i]));
            if (!(back[i].Equals(want))) throw new Mismatch($"element {i}: {x[i]} -> {back[i]}, host rounding gives {want}");
        }
        return "bit-exact with the host's round-to-nearest-even";
    }

    private static string ConvertF16(CudaDevice dev)
    {
        var rng = new Rng(11);
        var x = Random(rng, 4099, 1000);
        x[0] = float.NaN; x[1] = float.NegativeInfinity; x[2] = 65519.99f; x[3] = -65504f; x[4] = 1e-7f; x[5] = 3e-8f;
        using (var t = dev.Upload(x, DType.F16))
        {
            var back = dev.Download(t);
            for (int i = 0; i < x.Length; i++)
                if (!back[i].Equals((float)(Half)x[i])) throw new Mismatch($"element {i}: {x[i]} -> {back[i]}, host rounding gives {(float)(Half)x[i]}");
        }
        foreach (var (dtype, value) in new[] { (DType.F16, 65520f), (DType.F16, -1e5f), (DType.BF16, float.MaxValue) })
        {
            x[7] = value;
            try
            {
                dev.Upload(x, dtype, "the probe").Dispose();
                throw new Mismatch($"{value} uploaded as {dtype} was not refused");
            }
            catch (InvalidSettingException e) when (e.Message.StartsWith($"the probe: element 7 = {value}")) { }
        }
        return "bit-exact with the host's rounding (subnormals, infinities, NaN); 65520 and -1e5 refused as f16, 3.4e38 as bf16";
    }

    private static string Embedding(CudaDevice dev)
    {
        var rng = new Rng(2);
        int vocab = 50, d = 131, rows = 7;
        var table = RoundTo(DType.BF16, Random(rng, vocab * d));
        int[] tokens = [0, 49, 3, 3, 17, 42, 8];
        using var tt = dev.Upload(table, DType.BF16);
        using var tok = dev.Upload(tokens);
        using var x = dev.Allocate(DType.F32, rows * d);
        new CudaOps(dev).Embedding(tt, tok, x, rows, d);
        var want = new float[rows * d];
        CpuOps.Embed(table, tokens, want, d, vocab);
        return Compare(dev.Download(x), want, 0);
    }

    private static string GreedyNextToken(CudaDevice dev)
    {
        var rng = new Rng(21);
        const int vocab = 32003, capacity = 40;
        var ops = new CudaOps(dev);
        using var token = dev.Allocate(DType.I32, 1);
        using var position = dev.Upload([capacity - 3]);
        using var produced = new PinnedHostBuffer(4L * capacity, mapped: true);
        var report = new List<string>();
        int[] Run(float[] logits)
        {
            using var l = dev.Upload(logits);
            ops.GreedyNextToken(l, vocab, token, position, produced.DevicePointer);
            return [dev.DownloadInts(token)[0], dev.DownloadInts(position)[0]];   // the downloads wait for the kernel
        }
        unsafe int ProducedAt(int p) => ((int*)produced.Pointer)[p];
        var x = Random(rng, vocab);
        x[31000] = x[7] = x.Max() + 1;   // equal maxima: the lower id wins
        int p0 = capacity - 3, want = Generator.ArgMax(x);
        var got = Run(x);
        if (want != 7 || got[0] != want || got[1] != p0 + 1 || ProducedAt(p0) != want)
            throw new Mismatch($"tie: token {got[0]}, position {got[1]}, produced {ProducedAt(p0)}; expected {want} (host argmax), {p0 + 1}, {want}");
        report.Add($"tie of ids 7 and 31000 -> {got[0]}");
        x = Random(rng, vocab);
        x[vocab - 1] = x.Max() + 1;   // the last id, in the last thread's last round
        got = Run(x);
        if (got[0] != vocab - 1 || ProducedAt(p0 + 1) != vocab - 1) throw new Mismatch($"last id: token {got[0]}, produced {ProducedAt(p0 + 1)}");
        x[12345] = float.NaN;
        got = Run(x);
        if (got[0] != 0 || got[1] != p0 + 3 || ProducedAt(p0 + 2) != -1)
            throw new Mismatch($"a NaN logit: token {got[0]}, position {got[1]}, produced {ProducedAt(p0 + 2)}; expected 0, {p0 + 3}, -1");
        report.Add("last id; NaN -> -1");
        return string.Join(", ", report);
    }

    private static string Rope(CudaDevice dev)
    {
        var rng = new Rng(3);
        int rows = 5, heads = 3, hd = 64, start = 11;
        var x = Random(rng, rows * heads * hd);
        var rope = new Rope(hd, 10000);
        var inv = Enumerable.Range(0, hd / 2).Select(rope.InverseFrequency).ToArray();
        using var t = dev.Upload(x);
        using var f = dev.Upload(inv);
        new CudaOps(dev).Rope(t, f, rows, heads, hd, start);
        rope.Apply(x, rows, heads, start);
        return Compare(dev.Download(t), x, 1e-5);
    }

    /// <summary>Random q, k and v of <c>rows</c> tokens and random K/V caches, rounded to the storage type, on the host and
    /// on the device, with RoPE's inverse frequencies.</summary>
    private sealed class RopeStepInputs : IDisposable
    {
        public readonly float[] Q, K, V, KCache, VCache;
        public readonly Rope Rope;
        public readonly DeviceTensor Tq, Tk, Tv, Tkc, Tvc, InvFreq;

        public RopeStepInputs(CudaDevice dev, DType dtype, Rng rng, int rows, int heads, int kvHeads, int hd, int capacity)
        {
            int kvd = kvHeads * hd;
            Q = RoundTo(dtype, Random(rng, rows * heads * hd));
            K = RoundTo(dtype, Random(rng, rows * kvd));
            V = RoundTo(dtype, Random(rng, rows * kvd));
            KCache = RoundTo(dtype, Random(rng, capacity * kvd));
            VCache = RoundTo(dtype, Random(rng, capacity * kvd));
            Rope = new Rope(hd, 10000);
            Tq = dev.Upload(Q, dtype); Tk = dev.Upload(K, dtype); Tv = dev.Upload(V, dtype);
            Tkc = dev.Upload(KCache, dtype); Tvc = dev.Upload(VCache, dtype);
            InvFreq = dev.Upload(Enumerable.Range(0, hd / 2).Select(Rope.InverseFrequency).ToArray());
        }

        public void Dispose() { foreach (var t in new[] { Tq, Tk, Tv, Tkc, Tvc, InvFreq }) t.Dispose(); }
    }

    /// <summary>q rotated in place; rotated k and v land in cache rows start.., the rest of the caches untouched. With
    /// <paramref name="inCache"/>, k and v are first placed at those cache rows (as prefill's projections write them)
    /// and the kernel rotates the keys there.</summary>
    private static string RopeKvAppend(CudaDevice dev, DType dtype, bool inCache = false)
    {
        int rows = 5, heads = 6, kvHeads = 2, hd = 64, start = 11, kvd = kvHeads * hd;
        using var x = new RopeStepInputs(dev, dtype, new Rng(21), rows, heads, kvHeads, hd, capacity: 20);
        var ops = new CudaOps(dev);
        var (kc, vc) = (x.KCache.ToArray(), x.VCache.ToArray());
        if (inCache) { x.K.CopyTo(kc, start * kvd); x.V.CopyTo(vc, start * kvd); }
        using var kCache = inCache ? dev.Upload(kc, dtype) : null;
        using var vCache = inCache ? dev.Upload(vc, dtype) : null;
        if (inCache) ops.RopeKvAppend(x.Tq, null, null, kCache!, vCache!, x.InvFreq, rows, heads, kvHeads, hd, start);
        else ops.RopeKvAppend(x.Tq, x.Tk, x.Tv, x.Tkc, x.Tvc, x.InvFreq, rows, heads, kvHeads, hd, start);
        x.Rope.Apply(x.Q, rows, heads, start);
        x.Rope.Apply(x.K, rows, kvHeads, start);
        x.K.CopyTo(x.KCache, start * kvd);
        x.V.CopyTo(x.VCache, start * kvd);
        double tol = dtype == DType.F32 ? 1e-5 : 1e-2;
        return $"{Compare(dev.Download(x.Tq), x.Q, tol, "q max rel err")}; {Compare(dev.Download(kCache ?? x.Tkc), x.KCache, tol, "key cache max rel err")}; " +
            Compare(dev.Download(vCache ?? x.Tvc), x.VCache, 0, "value cache max rel err");
    }

    /// <summary>Decode's RoPE + cache append + attention (one launch where <see cref="CudaOps.RopeFusesIntoDecode"/>,
    /// else two) against the CPU's rotation and attention: the output, the rotated key and the value at row start, the
    /// rest of the caches untouched. The caches' other rows are random, those past start included.</summary>
    private static string RopeAttentionDecode(CudaDevice dev, DType dtype, int heads, int kvHeads, int hd, int start, int capacity, int? window = null)
    {
        int qd = heads * hd, kvd = kvHeads * hd;
        using var x = new RopeStepInputs(dev, dtype, new Rng(23), 1, heads, kvHeads, hd, capacity);
        using var o = dev.Allocate(dtype, qd);
        var ops = new CudaOps(dev);
        using var scratch = ops.NewDecodeScratch(heads, hd);
        ops.RopeKvAppendAttention(x.Tq, x.Tk, x.Tv, x.Tkc, x.Tvc, x.InvFreq, o, start, heads, kvHeads, hd, window, decodeScratch: scratch);
        x.Rope.Apply(x.Q, 1, heads, start);
        x.Rope.Apply(x.K, 1, kvHeads, start);
        // The cache holds the rotated key in the storage type, and attention reads it (and the rotated query) there.
        var q = RoundTo(dtype, x.Q);
        RoundTo(dtype, x.K).CopyTo(x.KCache, start * kvd);
        x.V.CopyTo(x.VCache, start * kvd);
        var want = new float[qd];
        CpuOps.Attention(q, x.KCache.AsSpan(0, (start + 1) * kvd).ToArray(), x.VCache.AsSpan(0, (start + 1) * kvd).ToArray(), want, 1, start,
            heads, kvHeads, hd, window);
        double tol = dtype == DType.F32 ? 1e-5 : 1e-2;
        string launches = CudaOps.RopeFusesIntoDecode(x.Tq, x.Tk, x.Tv, x.Tkc, x.Tvc, hd) ? "one launch" : "two launches";
        return $"{launches}; {Compare(dev.Download(o), want, tol)}; {Compare(dev.Download(x.Tkc), x.KCache, tol, "key cache max rel err")}; " +
            Compare(dev.Download(x.Tvc), x.VCache, 0, "value cache max rel err");
    }

    /// <summary>Decode's fused RoPE, append and attention in bf16 (heads 8/2, head_dim 128) at positions 100 and 1500 of 2048:
    /// one share and many (the settings' checks).</summary>
    private static string RopeDecodeAt100And1500(CudaDevice dev) =>
        RopeAttentionDecode(dev, DType.BF16, 8, 2, 128, 100, 2048) + "; " + RopeAttentionDecode(dev, DType.BF16, 8, 2, 128, 1500, 2048);

    /// <summary>Decode attention in f16 (heads 4/1, head_dim 64) with a window of 300 at position 1000 of 1024, and at
    /// position 20 without one (the settings' checks).</summary>
    private static string WindowedF16Decode(CudaDevice dev) =>
        Attention(dev, 1, 1000, 4, 1, 64, 300, DType.F16, capacity: 1024) + "; " + Attention(dev, 1, 20, 4, 1, 64, null, DType.F16, capacity: 1024);

    /// <summary>A check run with the split-KV decode attention in blocks of <paramref name="warps"/> warps, rescaling
    /// once per <paramref name="rescaleKeys"/> keys.</summary>
    private static string WithDecodeAttention(CudaDevice dev, int warps, Func<string> check, int rescaleKeys = CudaOps.DecodeRescaleKeys)
    {
        var before = (dev.DecodeAttentionWarps, dev.DecodeAttentionRescaleKeys);
        (dev.DecodeAttentionWarps, dev.DecodeAttentionRescaleKeys) = (warps, rescaleKeys);
        try { return check(); }
        finally { (dev.DecodeAttentionWarps, dev.DecodeAttentionRescaleKeys) = before; }
    }

    /// <summary>A check run once per rescale count the split-KV decode is built for other than the default (blocks of 4
    /// warps), each result after its count.</summary>
    private static string WithEachOtherRescale(CudaDevice dev, Func<string> check) =>
        string.Join("; ", CudaOps.DecodeRescaleKeysBuilt.Where(r => r != CudaOps.DecodeRescaleKeys)
            .Select(r => $"{r}: " + WithDecodeAttention(dev, CudaOps.DecodeWarps, check, r)));

    /// <summary>The first index where <paramref name="a"/> and <paramref name="b"/> differ in their bits, or -1 where
    /// none does (over <paramref name="a"/>'s length).</summary>
    private static int FirstBitDifference(float[] a, float[] b) =>
        Enumerable.Range(0, a.Length).FirstOrDefault(i => BitConverter.SingleToInt32Bits(a[i]) != BitConverter.SingleToInt32Bits(b[i]), -1);

    /// <summary>Each GEMV kernel (plain, q/k/v, gate/up + SwiGLU, index-add) at each compiled unroll: unroll 8 matches the
    /// CPU and the others give its bits. Then, with no choice recorded, the tuned first calls (which time every unroll and
    /// form, by-row and balanced-grid ones included, the index-add into the residual it then restores) give them too.</summary>
    private static string GemvUnrolls(CudaDevice dev, DType dtype, int[] ks)
    {
        const int nq = 40, nkv = 24, mid = 50, d = 60, n = 33;
        double tol = dtype == DType.F32 ? 1e-5 : 1e-2;
        var ops = new CudaOps(dev);
        int? forced = dev.GemvUnroll;
        long minTuned = dev.MinTunedGemvElements;
        var report = new List<string>();
        try
        {
            dev.MinTunedGemvElements = 0;   // small shapes, tuned all the same
            foreach (int k in ks)
            {
                var rng = new Rng(37);
                var x = RoundTo(dtype, Random(rng, k));
                float[] Weights(int rows) => RoundTo(dtype, Random(rng, rows * k));
                float[] Times(float[] w, int rows) { var y = new float[rows]; Cpu.Gemm.MatMulT(x, w, y, 1, rows, k); return y; }
                var (wq, wk, wv, wg, wu, wp) = (Weights(nq), Weights(nkv), Weights(nkv), Weights(mid), Weights(mid), Weights(n));
                var idx = Subset(rng, d, 37);
                var wo = Weights(idx.Length);
                var residual = Random(rng, d);
                using var tx = dev.Upload(x, dtype); using var ti = dev.Upload(idx);
                using var twq = dev.Upload(wq, dtype); using var twk = dev.Upload(wk, dtype); using var twv = dev.Upload(wv, dtype);
                using var twg = dev.Upload(wg, dtype); using var twu = dev.Upload(wu, dtype); using var two = dev.Upload(wo, dtype);
                using var twp = dev.Upload(wp, dtype);
                float[] Run()
                {
                    using var yq = dev.Allocate(dtype, nq); using var yk = dev.Allocate(dtype, nkv); using var yv = dev.Allocate(dtype, nkv);
                    using var act = dev.Allocate(dtype, mid); using var yp = dev.Allocate(dtype, n); using var tres = dev.Upload(residual);
                    ops.GemvQkv(tx, twq, yq, nq, twk, yk, nkv, twv, yv, nkv, k);
                    ops.GemvSwiGlu(tx, twg, twu, act, mid, k);
                    ops.GemvIndexAdd(tx, two, tres, ti, d, k);
                    dev.Gemm(tx, twp, yp, 1, n, k);
                    return [.. dev.Download(yq), .. dev.Download(yk), .. dev.Download(yv), .. dev.Download(act), .. dev.Download(yp), .. dev.Download(tres)];
                }
                dev.GemvUnroll = CudaDevice.GemvUnrolls[0];
                var want = Run();
                var swiglu = Times(wg, mid);
                CpuOps.SiluMul(swiglu, Times(wu, mid), mid);
                var added = (float[])residual.Clone();
                var delta = Times(wo, idx.Length);
                for (int j = 0; j < idx.Length; j++) added[idx[j]] += delta[j];
                int outputs = want.Length - d;   // then the f32 residual
                report.Add($"K {k}: " + Compare(want.AsSpan(0, outputs), [.. Times(wq, nq), .. Times(wk, nkv), .. Times(wv, nkv), .. swiglu, .. Times(wp, n)], tol) +
                           ", " + Compare(want.AsSpan(outputs), added, 1e-5, "index-add max rel err"));
                void Same(float[] got, string what)
                {
                    int diff = FirstBitDifference(want, got);
                    if (diff >= 0) throw new Mismatch($"K {k}, {what}: output {diff} is {got[diff]}, unroll {CudaDevice.GemvUnrolls[0]} gives {want[diff]}");
                }
                foreach (int u in CudaDevice.GemvUnrolls.Skip(1)) { dev.GemvUnroll = u; Same(Run(), $"unroll {u}"); }
                dev.GemvUnroll = null;
                dev.ForgetGemvChoices();
                int timed = dev.GemvShapesTimed;
                Same(Run(), "tuned first call");
                if (dev.GemvShapesTimed - timed != 4) throw new Mismatch($"K {k}: {dev.GemvShapesTimed - timed} shapes timed, meant 4");
            }
            return string.Join("; ", report) + "; unrolls identical";
        }
        finally { dev.GemvUnroll = forced; dev.MinTunedGemvElements = minTuned; }
    }

    /// <summary>The streamed GEMVs (<see cref="CudaDevice.StreamGemvs"/>) against the block-per-8-rows ones (unroll 8)
    /// on the same operands, bit for bit: every unroll; the plain GEMV to bf16 and to f32 and its index-add into an f32
    /// residual, q/k/v in one launch, gate/up + SwiGLU; rows of 1 to 3 rounds of loads; the grid capped at 1 and 3 blocks
    /// (each warp many rows, its stream crossing row ends), at 10 with the rows balanced over fewer
    /// (<see cref="CudaDevice.BalanceGemvRows"/>: 9, 9, 9 and 6 blocks for 203, 203, 130 and 90 rows) and uncapped.</summary>
    private static string GemvStreamed(CudaDevice dev)
    {
        const int n = 203, d = 300, nq = 70, nkv = 30, mid = 90;
        var ops = new CudaOps(dev);
        int? forced = dev.GemvUnroll, gridLimit = dev.PersistentGridLimit;
        bool? stream = dev.StreamGemvs;
        bool? balance = dev.BalanceGemvRows, byRow = dev.StreamGemvsByRow;
        int checks = 0;
        try
        {
            foreach (int k in new[] { 264, 2656, 4104 })
            {
                var rng = new Rng(41);
                using var x = dev.Upload(RoundTo(DType.BF16, Random(rng, k)), DType.BF16);
                using var w = dev.Upload(RoundTo(DType.BF16, Random(rng, n * k)), DType.BF16);
                using var idx = dev.Upload(Subset(rng, d, n));
                var residual = Random(rng, d);
                using var wq = dev.Upload(RoundTo(DType.BF16, Random(rng, nq * k)), DType.BF16);
                using var wk = dev.Upload(RoundTo(DType.BF16, Random(rng, nkv * k)), DType.BF16);
                using var wv = dev.Upload(RoundTo(DType.BF16, Random(rng, nkv * k)), DType.BF16);
                using var wg = dev.Upload(RoundTo(DType.BF16, Random(rng, mid * k)), DType.BF16);
                using var wu = dev.Upload(RoundTo(DType.BF16, Random(rng, mid * k)), DType.BF16);
                using var y16 = dev.Allocate(DType.BF16, n); using var y32 = dev.Allocate(DType.F32, n);
                using var yq = dev.Allocate(DType.BF16, nq); using var yk = dev.Allocate(DType.BF16, nkv); using var yv = dev.Allocate(DType.BF16, nkv);
                using var act = dev.Allocate(DType.BF16, mid);
                float[] Run()
                {
                    dev.Gemm(x, w, y16, 1, n, k);
                    dev.Gemm(x, w, y32, 1, n, k);
                    using var added = dev.Upload(residual);
                    ops.GemvIndexAdd(x, w, added, idx, d, k);
                    ops.GemvQkv(x, wq, yq, nq, wk, yk, nkv, wv, yv, nkv, k);
                    ops.GemvSwiGlu(x, wg, wu, act, mid, k);
                    return [.. dev.Download(y16), .. dev.Download(y32), .. dev.Download(added), .. dev.Download(yq), .. dev.Download(yk),
                        .. dev.Download(yv), .. dev.Download(act)];
                }
                (dev.StreamGemvs, dev.GemvUnroll, dev.PersistentGridLimit) = (false, CudaDevice.GemvUnrolls[0], null);
                var want = Run();
                dev.StreamGemvs = true;
                // The last two: the by-row form, a round of loads inside one row (CudaDevice.StreamGemvsByRow).
                foreach (var (limit, balanced, rows) in new (int?, bool, bool)[] { (1, false, false), (3, false, false), (10, true, false), (null, false, false), (3, false, true), (null, false, true) })
                    foreach (int u in CudaDevice.GemvUnrolls)
                    {
                        (dev.GemvUnroll, dev.PersistentGridLimit, dev.BalanceGemvRows, dev.StreamGemvsByRow) = (u, limit, balanced, rows);
                        var got = Run();
                        int diff = FirstBitDifference(want, got);
                        if (diff >= 0)
                            throw new Mismatch($"K {k}, unroll {u}, grid {(limit?.ToString() ?? "resident")}{(balanced ? ", rows balanced" : "")}{(rows ? ", a round per row" : "")}: " +
                                               $"output {diff} (bf16, f32, index-add, q/k/v, swiglu) is {got[diff]}, a block per 8 rows gives {want[diff]}");
                        checks++;
                    }
            }
            return $"{checks} runs identical";
        }
        finally { (dev.StreamGemvs, dev.GemvUnroll, dev.PersistentGridLimit, dev.BalanceGemvRows, dev.StreamGemvsByRow) = (stream, forced, gridLimit, balance, byRow); }
    }

    /// <summary>Decode's norm and the GEMVs that read it: the two launches (<see cref="CudaDevice.FuseDecodeNorms"/> false)
    /// against the CPU's gather-norm and products, then the fused kernels (each block normalizing the row itself) in both
    /// forms (<see cref="CudaDevice.StreamGemvs"/>) for every unroll and with the grid capped at 1 and 3 blocks (every
    /// warp several rows) and the engine's: the same bits;
    /// then the timed choice (which runs both forms) too. Each case: the row width d and the selected channels (null:
    /// dense), stored padded to 8.</summary>
    private static string FusedDecodeNorms(CudaDevice dev, DType dtype, (int D, int? Width)[] cases)
    {
        const int nq = 40, nkv = 24, mid = 50;
        const float eps = 1e-5f;
        double tol = dtype == DType.F32 ? 1e-5 : 1e-2;
        var ops = new CudaOps(dev);
        bool? fuse = dev.FuseDecodeNorms, stream = dev.StreamGemvs;
        int? unroll = dev.GemvUnroll, gridLimit = dev.PersistentGridLimit;
        long minTuned = dev.MinTunedGemvElements;
        var report = new List<string>();
        try
        {
            foreach (var (d, width) in cases)
            {
                var rng = new Rng(41);
                int[]? idx = width is int w ? Subset(rng, d, w) : null;
                int k = idx == null ? d : CudaOps.Padded(idx.Length);
                var x = Random(rng, d, 2);
                var gamma = RoundTo(dtype, Random(rng, d));
                float[] Weights(int rows) => RoundTo(dtype, Random(rng, rows * k));
                var (wq, wk, wv, wg, wu) = (Weights(nq), Weights(nkv), Weights(nkv), Weights(mid), Weights(mid));
                using var tx = dev.Upload(x); using var tg = dev.Upload(gamma, dtype);
                using var ti = idx == null ? null : dev.Upload(idx);
                using var th = dev.Allocate(dtype, k);
                using var twq = dev.Upload(wq, dtype); using var twk = dev.Upload(wk, dtype); using var twv = dev.Upload(wv, dtype);
                using var twg = dev.Upload(wg, dtype); using var twu = dev.Upload(wu, dtype);
                float[] Run(DeviceTensor tx)
                {
                    using var yq = dev.Allocate(dtype, nq); using var yk = dev.Allocate(dtype, nkv); using var yv = dev.Allocate(dtype, nkv);
                    using var act = dev.Allocate(dtype, mid);
                    ops.NormGemvQkv(tx, tg, ti, d, eps, th, twq, yq, nq, twk, yk, nkv, twv, yv, nkv, k);
                    ops.NormGemvSwiGlu(tx, tg, ti, d, eps, th, twg, twu, act, mid, k);
                    return [.. dev.Download(yq), .. dev.Download(yk), .. dev.Download(yv), .. dev.Download(act)];
                }
                dev.FuseDecodeNorms = false;
                dev.GemvUnroll = CudaDevice.GemvUnrolls[0];
                var want = Run(tx);
                // CPU: the gather-norm rounded to the storage type, zero-padded to k, then the products.
                var h = new float[k];
                var normed = new float[idx?.Length ?? d];
                if (idx == null) CpuOps.RmsNorm(x, gamma, normed, 1, d, eps);
                else CpuOps.GatherRmsNorm(x, gamma, idx, normed, 1, d, eps);
                Array.Copy(RoundTo(dtype, normed), h, normed.Length);
                float[] Times(float[] wt, int rows) { var y = new float[rows]; Cpu.Gemm.MatMulT(h, wt, y, 1, rows, k); return y; }
                var swiglu = Times(wg, mid);
                CpuOps.SiluMul(swiglu, Times(wu, mid), mid);
                report.Add($"d {d}{(idx == null ? " dense" : $", {idx.Length} kept")}: " +
                           Compare(want, [.. Times(wq, nq), .. Times(wk, nkv), .. Times(wv, nkv), .. swiglu], tol));
                void Same(float[] got, string what)
                {
                    int diff = FirstBitDifference(want, got);
                    if (diff >= 0) throw new Mismatch($"d {d}, {what}: output {diff} is {got[diff]}, the two launches give {want[diff]}");
                }
                dev.FuseDecodeNorms = true;
                foreach (bool streamed in new[] { false, true })
                    foreach (int? limit in new int?[] { 1, 3, null })
                        foreach (int u in CudaDevice.GemvUnrolls)
                        {
                            (dev.StreamGemvs, dev.PersistentGridLimit, dev.GemvUnroll) = (streamed, limit, u);
                            Same(Run(tx), $"fused{(streamed ? ", streamed" : "")}, unroll {u}, grid {(limit is int l ? $"capped at {l}" : "the engine's")}");
                        }
                dev.StreamGemvs = stream;
                // More rows of wide dynamic range: their sums of squares round differently in any other order, and in f32
                // a scale one ulp off changes the outputs.
                for (int extra = 0; extra < 6; extra++)
                {
                    using var wide = dev.Upload(Random(rng, d).Select(v => v * MathF.Pow(10, 3 * v)).ToArray());
                    (dev.FuseDecodeNorms, dev.PersistentGridLimit, dev.GemvUnroll) = (false, gridLimit, CudaDevice.GemvUnrolls[0]);
                    var separate = Run(wide);
                    dev.FuseDecodeNorms = true;
                    var fused = Run(wide);
                    int diff = FirstBitDifference(fused, separate);
                    if (diff >= 0) throw new Mismatch($"d {d}, fused, row {extra + 2}: output {diff} is {fused[diff]}, the two launches give {separate[diff]}");
                }
                (dev.FuseDecodeNorms, dev.GemvUnroll, dev.PersistentGridLimit, dev.MinTunedGemvElements) = (null, null, gridLimit, 0);
                dev.ForgetGemvChoices();
                Same(Run(tx), "timed choice");
                if (dev.DecodeNormFusionChoices.Count != 2) throw new Mismatch($"d {d}: {dev.DecodeNormFusionChoices.Count} fusion choices recorded, meant 2");
                report[^1] += $", chosen: {string.Join(", ", dev.DecodeNormFusionChoices.Select(c => $"{c.Key.Split(',')[0]} {(c.Value > 0 ? $"fused, {c.Value} blocks/SM" : "two launches")}"))}";
            }
            return string.Join("; ", report) + "; fused identical";
        }
        finally
        {
            (dev.FuseDecodeNorms, dev.StreamGemvs, dev.GemvUnroll, dev.PersistentGridLimit, dev.MinTunedGemvElements) = (fuse, stream, unroll, gridLimit, minTuned);
            dev.ForgetGemvChoices();
        }
    }

    /// <summary>With <paramref name="padded"/> the output rows are <see cref="CudaOps.Padded"/> apart and the padding,
    /// NaN before the call, must come back zero.</summary>
    private static string Norm(CudaDevice dev, int rows, int d, int? width, DType dtype, double tol, bool padded = false)
    {
        var rng = new Rng(4);
        var x = Random(rng, rows * d, 3);
        var gamma = RoundTo(dtype, Random(rng, d));
        int[]? idx = width is int w ? Subset(rng, d, w) : null;
        int outW = idx?.Length ?? d, stride = padded ? CudaOps.Padded(outW) : outW;
        using var tx = dev.Upload(x);
        using var tg = dev.Upload(gamma, dtype);
        using var ti = idx == null ? null : dev.Upload(idx);
        using var y = dev.Allocate(dtype, rows * stride);
        var ops = new CudaOps(dev);
        ops.FillConstant(y, float.NaN);
        ops.GatherRmsNorm(tx, tg, ti, y, rows, d, 1e-5f, stride);
        var dense = new float[rows * outW];
        if (idx == null) CpuOps.RmsNorm(x, gamma, dense, rows, d, 1e-5f);
        else CpuOps.GatherRmsNorm(x, gamma, idx, dense, rows, d, 1e-5f);
        var want = new float[rows * stride];
        for (int r = 0; r < rows; r++) Array.Copy(dense, r * outW, want, r * stride, outW);
        return Compare(dev.Download(y), want, tol);
    }

    private static string LayerNorm(CudaDevice dev)
    {
        var rng = new Rng(5);
        int rows = 3, d = 515;
        var x = Random(rng, rows * d, 2);
        for (int i = 0; i < x.Length; i++) x[i] += 1.5f;
        var gamma = Random(rng, d); var beta = Random(rng, d);
        var idx = Subset(rng, d, 200);
        using var tx = dev.Upload(x); using var tg = dev.Upload(gamma); using var tb = dev.Upload(beta); using var ti = dev.Upload(idx);
        using var y = dev.Allocate(DType.F32, rows * idx.Length);
        new CudaOps(dev).GatherLayerNorm(tx, tg, tb, ti, y, rows, d, 1e-5f);
        var want = new float[rows * idx.Length];
        CpuOps.GatherLayerNorm(x, gamma, beta, idx, want, rows, d, 1e-5f);
        return Compare(dev.Download(y), want, 1e-5);
    }

    /// <summary>With <paramref name="padded"/> the input rows are <see cref="CudaOps.Padded"/> apart, the padding holding
    /// values that must not reach the residual.</summary>
    private static string IndexAdd(CudaDevice dev, int? width, bool bias, bool padded = false)
    {
        var rng = new Rng(6);
        int rows = 6, d = 999;
        var x = Random(rng, rows * d);
        int[]? idx = width is int w ? Subset(rng, d, w) : null;
        int yw = idx?.Length ?? d, stride = padded ? CudaOps.Padded(yw) : yw;
        var y = Random(rng, rows * stride);
        var b = bias ? Random(rng, yw) : null;
        float scale = bias ? 0.5f : 1f;
        using var tx = dev.Upload(x); using var ty = dev.Upload(y);
        using var ti = idx == null ? null : dev.Upload(idx);
        using var tb = b == null ? null : dev.Upload(b);
        new CudaOps(dev).IndexAdd(tx, ty, ti, tb, rows, d, scale, stride);
        ReferenceIndexAdd(x, y, stride, idx, b, scale, rows, d);
        return Compare(dev.Download(tx), x, 1e-6);
    }

    /// <summary>The CPU's x[r, idx[j]] += scale·(y[r, j] + bias[j]) (idx null: the dense add), y's rows yStride apart.</summary>
    private static void ReferenceIndexAdd(float[] x, float[] y, int yStride, int[]? idx, float[]? bias, float scale, int rows, int d)
    {
        int yw = idx?.Length ?? d;
        var delta = new float[rows * yw];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < yw; j++) delta[r * yw + j] = scale * (y[r * yStride + j] + (bias?[j] ?? 0));
        if (idx == null) CpuOps.Add(delta, x, x.Length); else CpuOps.IndexAdd(x, delta, idx, rows, d);
    }

    /// <summary><see cref="CudaOps.IndexAddRmsNorm"/> against the CPU's index-add then gather-RMSNorm: the updated
    /// residual and the normalized channels. The first case adds a bias (storage type), scales, and pads both strides.</summary>
    private static string IndexAddNorm(CudaDevice dev, int d, int? addWidth, int? outWidth, DType dtype, double tol)
    {
        var rng = new Rng(16);
        int rows = 5;
        bool extras = d == 4096;
        var x = Random(rng, rows * d, 2);
        var gamma = RoundTo(dtype, Random(rng, d));
        int[]? addIdx = addWidth is int aw ? Subset(rng, d, aw) : null;
        int[]? idx = outWidth is int ow ? Subset(rng, d, ow) : null;
        int yw = addIdx?.Length ?? d, yStride = extras ? CudaOps.Padded(yw) : yw;
        int outW = idx?.Length ?? d, stride = extras ? CudaOps.Padded(outW) : outW;
        var y = Random(rng, rows * yStride);
        var b = extras ? RoundTo(dtype, Random(rng, yw)) : null;
        float scale = extras ? 0.5f : 1f;
        using var tx = dev.Upload(x); using var ty = dev.Upload(y);
        using var tg = dev.Upload(gamma, dtype);
        using var tai = addIdx == null ? null : dev.Upload(addIdx);
        using var ti = idx == null ? null : dev.Upload(idx);
        using var tb = b == null ? null : dev.Upload(b, dtype);
        using var tout = dev.Allocate(dtype, rows * stride);
        var ops = new CudaOps(dev);
        ops.FillConstant(tout, float.NaN);
        ops.IndexAddRmsNorm(tx, ty, tai, tb, yStride, tg, ti, tout, rows, d, 1e-5f, scale, stride);
        ReferenceIndexAdd(x, y, yStride, addIdx, b, scale, rows, d);
        var dense = new float[rows * outW];
        if (idx == null) CpuOps.RmsNorm(x, gamma, dense, rows, d, 1e-5f);
        else CpuOps.GatherRmsNorm(x, gamma, idx, dense, rows, d, 1e-5f);
        var want = new float[rows * stride];
        for (int r = 0; r < rows; r++) Array.Copy(dense, r * outW, want, r * stride, outW);
        return Compare(dev.Download(tx), x, 1e-6, "residual max rel err") + "; " + Compare(dev.Download(tout), want, tol, "norm max rel err");
    }

    /// <summary>KernelBench's register-capped builds of the row kernels and its gather-norm that loads gamma after the
    /// row run the same arithmetic: same outputs, same residual.</summary>
    private static string OccupancyVariants(CudaDevice dev)
    {
        var rng = new Rng(31);
        const int d = 4096;
        int rows = Math.Max(300, dev.Info.Multiprocessors);   // enough rows for the engine's 256-thread blocks
        int[] idx = Subset(rng, d, 2673), addIdx = Subset(rng, d, 2651);
        int stride = CudaOps.Padded(idx.Length), yStride = CudaOps.Padded(addIdx.Length);
        var x = Random(rng, rows * d, 2);
        using var tg = dev.Upload(RoundTo(DType.BF16, Random(rng, d)), DType.BF16);
        using var ti = dev.Upload(idx); using var tai = dev.Upload(addIdx);
        using var ty = dev.Upload(Random(rng, rows * yStride));
        var ops = new CudaOps(dev);
        float[] Run(string? variant, bool add)
        {
            using var tx = dev.Upload(x);
            using var tout = dev.Allocate(DType.BF16, rows * stride);
            if (variant == null && add) ops.IndexAddRmsNorm(tx, ty, tai, null, yStride, tg, ti, tout, rows, d, 1e-5f, 1f, stride);
            else if (variant == null) ops.GatherRmsNorm(tx, tg, ti, tout, rows, d, 1e-5f, stride);
            else if (add) dev.Launch("norm", variant, (uint)rows, 256, d * 4, tx, ty, tai, 0UL, 1f, addIdx.Length, yStride, tg, ti, tout, d, idx.Length, stride, 1e-5f);
            else dev.Launch("norm", variant, (uint)rows, 256, d * 4, tx, tg, ti, tout, d, idx.Length, stride, 1e-5f, 1);
            return [.. dev.Download(tout), .. dev.Download(tx)];
        }
        foreach (var (variant, add) in new[] { ("rmsnorm_gather_occupancy_bf16", false), ("rmsnorm_gather_row_first_bf16", false), ("add_rmsnorm_gather_occupancy_bf16", true) })
        {
            var (want, got) = (Run(null, add), Run(variant, add));
            int diff = FirstBitDifference(want, got);
            if (diff >= 0) throw new Mismatch($"{variant}: element {diff} is {got[diff]}, the engine's kernel gives {want[diff]}");
        }
        // A row of 250 16-byte loads under 256 threads: the last 6 threads load no row but still need their gamma values.
        const int shortD = 1000, shortRows = 10;
        int[] shortIdx = Subset(rng, shortD, 600);
        var shortX = Random(rng, shortRows * shortD, 2);
        using var sx = dev.Upload(shortX); using var sg = dev.Upload(RoundTo(DType.BF16, Random(rng, shortD)), DType.BF16);
        using var si = dev.Upload(shortIdx);
        using var engineOut = dev.Allocate(DType.BF16, shortRows * shortIdx.Length); using var rowFirstOut = dev.Allocate(DType.BF16, shortRows * shortIdx.Length);
        ops.GatherRmsNorm(sx, sg, si, engineOut, shortRows, shortD, 1e-5f);
        dev.Launch("norm", "rmsnorm_gather_row_first_bf16", shortRows, 256, shortD * 4, sx, sg, si, rowFirstOut, shortD, shortIdx.Length, shortIdx.Length, 1e-5f, 1);
        return "outputs and residual identical; row-first with threads past the row's end: " + Compare(dev.Download(rowFirstOut), dev.Download(engineOut), 1e-2);
    }

    /// <summary>In place (the output is the gate); n odd, so the 16-byte path leaves a tail.</summary>
    private static string SwiGlu(CudaDevice dev, DType dtype, bool? fastMath = null)
    {
        var rng = new Rng(7);
        int n = 10007;
        var g = RoundTo(dtype, Random(rng, n, 3)); var u = RoundTo(dtype, Random(rng, n));
        using var tg = dev.Upload(g, dtype); using var tu = dev.Upload(u, dtype);
        new CudaOps(dev).SiluMul(tg, tu, tg, n, fastMath);
        CpuOps.SiluMul(g, u, n);
        return Compare(dev.Download(tg), g, dtype != DType.F32 ? 1e-2 : fastMath == true ? 1e-5 : 1e-6);
    }

    private static string Gelu(CudaDevice dev, DType dtype)
    {
        var rng = new Rng(8);
        int n = 10007;
        var x = RoundTo(dtype, Random(rng, n, 3));
        using var tx = dev.Upload(x, dtype); using var ty = dev.Allocate(dtype, n);
        new CudaOps(dev).Gelu(tx, ty, n);
        var want = new float[n];
        CpuOps.Gelu(x, want, n);
        return Compare(dev.Download(ty), want, dtype == DType.F32 ? 1e-6 : 1e-2);
    }

    /// <summary>A check of the sm_90a-only kernels: run where <see cref="CudaDevice.SupportsWgmma"/>, else passed as not
    /// applying (with the reason).</summary>
    private static string Wgmma(CudaDevice dev, Func<string> check) => dev.SupportsWgmma ? check()
        : $"does not apply: {dev.WgmmaUnsupportedReason}";

    /// <summary>Attention of tq queries after start cached rows; the cache holds <paramref name="capacity"/> rows (default
    /// start + tq), the rows past the queries random: the kernels must not read them. A split-KV decode runs twice with
    /// one scratch, as the layers of a decode step share it: both outputs must match and its arrival counters be zero.</summary>
    private static string Attention(CudaDevice dev, int tq, int start, int heads, int kvHeads, int hd, int? window, DType dtype = DType.F32,
        PrefillKernel? prefill = null, int? capacity = null, DecodeKernel decode = DecodeKernel.SplitKv, int keysPerSplit = CudaOps.DecodeKeysPerSplit,
        float keyGrowth = 0)
    {
        var rng = new Rng(9);
        int total = start + tq, rows = capacity ?? total, qd = heads * hd, kvd = kvHeads * hd;
        var q = RoundTo(dtype, Random(rng, tq * qd));
        var k = Random(rng, rows * kvd);
        // Keys scaled by 1 + growth · position: later keys score ever higher, so row maxima keep growing.
        for (int i = 0; i < k.Length; i++) k[i] *= 1 + keyGrowth * (i / kvd);
        k = RoundTo(dtype, k);
        var v = RoundTo(dtype, Random(rng, rows * kvd));
        using var tq_ = dev.Upload(q, dtype); using var tk = dev.Upload(k, dtype); using var tv = dev.Upload(v, dtype);
        using var o = dev.Allocate(dtype, tq * qd);
        var ops = new CudaOps(dev);
        var want = new float[tq * qd];
        CpuOps.Attention(q, k.AsSpan(0, total * kvd).ToArray(), v.AsSpan(0, total * kvd).ToArray(), want, tq, start, heads, kvHeads, hd, window);
        double tolerance = dtype == DType.F32 ? 1e-5 : 1e-2;
        if (tq > 1 || decode == DecodeKernel.Naive)
        {
            ops.Attention(tq_, tk, tv, o, tq, start, heads, kvHeads, hd, window, prefill, decode: decode);
            return Compare(dev.Download(o), want, tolerance);
        }
        using var scratch = ops.NewDecodeScratch(heads, hd);
        ops.FillConstant(scratch.Tensor, float.NaN);
        ops.FillConstant(scratch.Tensor, 0, scratch.CountersOffset);
        ops.Attention(tq_, tk, tv, o, tq, start, heads, kvHeads, hd, window, decodeScratch: scratch, decode: decode, decodeKeysPerSplit: keysPerSplit);
        var first = dev.Download(o);
        // The shares used wrote their states (where more than one), the rest of the grid nothing.
        bool split = hd % (16 / dtype.Size()) == 0;
        int grid = CudaOps.DecodeSplits(rows, window ?? 0, keysPerSplit), visible = Math.Min(start + 1, window ?? int.MaxValue);
        int used = decode == DecodeKernel.SplitKv ? CudaOps.DecodeSharesUsed(visible, grid, hd, dtype, dev.DecodeAttentionWarps) : grid;
        var states = dev.Download(scratch.Tensor);
        for (int h = 0; split && grid > 1 && h < heads; h++)
            for (int sp = 0; sp < grid; sp++)
                if (float.IsNaN(states[((long)h * grid + sp) * (hd + 2) + hd + 1]) != (used == 1 || sp >= used))
                    throw new Mismatch($"head {h}, share {sp} of {grid}: its state is {(sp < used && used > 1 ? "not written" : "written")}, with {used} shares used");
        ops.FillConstant(o, float.NaN);
        ops.Attention(tq_, tk, tv, o, tq, start, heads, kvHeads, hd, window, decodeScratch: scratch, decode: decode, decodeKeysPerSplit: keysPerSplit);
        if (!dev.Download(o).AsSpan().SequenceEqual(first)) throw new Mismatch("a second decode with the same scratch gives another output");
        var counters = dev.Download(scratch.Tensor).AsSpan((int)(scratch.Tensor.Length - heads));
        for (int h = 0; h < heads; h++)
            if (BitConverter.SingleToUInt32Bits(counters[h]) is var n and not 0) throw new Mismatch($"head {h}'s arrival counter is {n} after the decode, not 0");
        return (split ? $"{used} of {grid} shares, " : "") + Compare(first, want, tolerance);
    }

    private static string Fill(CudaDevice dev)
    {
        const int n = 1048583;
        const float std = 0.02f;
        var ops = new CudaOps(dev);
        using var t = dev.Allocate(DType.BF16, n);
        ops.FillConstant(t, 1.5f);
        if (dev.Download(t).Any(v => v != 1.5f)) throw new Mismatch("fill_constant: not every element is 1.5");
        ops.FillNormal(t, 42, std);
        var x = dev.Download(t);
        double mean = x.Average(v => (double)v), sd = Math.Sqrt(x.Average(v => (v - mean) * (v - mean)));
        // Five standard errors for the mean; the sample std of 1M draws is within 1% (bf16 rounding adds ~0.1%).
        string detail = $"mean {mean:E2}, std {sd:E3} (want 0, {std})";
        if (Math.Abs(mean) > 5 * std / Math.Sqrt(n) || Math.Abs(sd / std - 1) > 0.01 || x.Any(v => !float.IsFinite(v))) throw new Mismatch(detail);
        ops.FillNormal(t, 42, std);
        if (!dev.Download(t).AsSpan().SequenceEqual(x)) throw new Mismatch("fill_normal is not reproducible from its seed");
        return detail;
    }

    private static string StreamPrefix(CudaDevice dev)
    {
        const int rows = 300, d = 1028, w = 1013;
        var x = Random(new Rng(12), rows * d);
        using var tx = dev.Upload(x);
        using var tout = dev.Allocate(DType.BF16, (long)rows * w);
        dev.Launch("convert", "stream_prefix_f32_to_bf16", CudaDevice.GridFor((long)rows * d / 4), 256, 0, tx, tout, (long)rows, d, w);
        var want = new float[rows * w];
        for (int r = 0; r < rows; r++) x.AsSpan(r * d, w).CopyTo(want.AsSpan(r * w));
        if (!dev.Download(tout).AsSpan().SequenceEqual(RoundTo(DType.BF16, want))) throw new Mismatch("not each row's first w columns rounded to bf16");
        return "bit for bit";
    }

    private static string CrossEntropy(CudaDevice dev)
    {
        var rng = new Rng(10);
        int rows = 3, vocab = 32003;
        var logits = Random(rng, rows * vocab, 4);
        int[] targets = [5, -1, 32002];
        using var tl = dev.Upload(logits); using var tt = dev.Upload(targets);
        using var loss = dev.Allocate(DType.F32, rows); using var grad = dev.Allocate(DType.F32, rows * vocab);
        float scale = 1f / 2;
        new CudaOps(dev).CrossEntropy(tl, tt, loss, grad, rows, vocab, scale);
        var wantLoss = new float[rows];
        var wantGrad = new float[rows * vocab];
        for (int r = 0; r < rows; r++)
        {
            if (targets[r] < 0) continue;
            var row = logits.AsSpan(r * vocab, vocab);
            float lse = CpuOps.LogSumExp(row);
            wantLoss[r] = lse - row[targets[r]];
            for (int i = 0; i < vocab; i++) wantGrad[r * vocab + i] = (MathF.Exp(row[i] - lse) - (i == targets[r] ? 1 : 0)) * scale;
        }
        return Compare(dev.Download(loss), wantLoss, 1e-5, "loss rel err") + "; " + Compare(dev.Download(grad), wantGrad, 1e-5, "grad rel err");
    }

    private static string Gumbel(CudaDevice dev)
    {
        var rng = new Rng(11);
        int n = 1001;
        var logits = Random(rng, n, 3);
        var noise = GumbelSigmoid.Noise<float>(rng, n);
        var dsoft = Random(rng, n);
        using var tl = dev.Upload(logits); using var tn = dev.Upload(noise); using var td = dev.Upload(dsoft);
        using var soft = dev.Allocate(DType.F32, n); using var hard = dev.Allocate(DType.F32, n); using var dl = dev.Allocate(DType.F32, n);
        var ops = new CudaOps(dev);
        ops.GumbelSigmoid(tl, tn, soft, hard, n);
        ops.GumbelSigmoidBackward(soft, td, dl, n);
        var tape = new Autograd.Tape<float>();
        var lv = tape.Leaf(logits, 1, n);
        var s = GumbelSigmoid.Soft(tape, lv, noise);
        var wantHard = GumbelSigmoid.Hard<float>(logits, noise).Select(b => b ? 1f : 0f).ToArray();
        dsoft.CopyTo(s.G, 0);
        tape.Backward();
        string r = Compare(dev.Download(soft), s.Data, 1e-5, "soft rel err") + "; " + Compare(dev.Download(hard), wantHard, 0, "hard mismatch")
            + "; " + Compare(dev.Download(dl), lv.Grad!, 1e-5, "grad rel err");
        using var g = dev.Allocate(DType.F32, 1 << 16);
        ops.GumbelNoise(g, 1 << 16, 1234, 0);
        var sample = dev.Download(g);
        double mean = sample.Average(v => (double)v);
        if (Math.Abs(mean - 0.5772) > 0.03) throw new Mismatch($"Gumbel noise mean {mean:F4}, expected Euler's constant 0.5772");
        return r + $"; noise mean {mean:F3}";
    }

    /// <summary>ScaleColumns (in place in <paramref name="dtype"/>, and f32 → dtype), AddScaledColumns, and MaskColumnsGrad
    /// accumulating at an offset inside a larger buffer (the tiled kernel's warps each take every 16th row: 13 rows leave
    /// some warps none, 203 run its 4-row loop and the tail).</summary>
    private static string MaskColumns(CudaDevice dev, DType dtype, int rows)
    {
        var rng = new Rng(12);
        int w = 301, off = 17;
        var y = RoundTo(dtype, Random(rng, rows * w)); var maskAll = Random(rng, w + off); var dy = Random(rng, rows * w);
        var x = Random(rng, rows * w); var prior = Random(rng, w + off);
        var mask = maskAll.AsSpan(off, w).ToArray();
        using var ty = dev.Upload(y, dtype); using var tm = dev.Upload(maskAll); using var tdy = dev.Upload(dy);
        using var tx = dev.Upload(x); using var dm = dev.Upload(prior);
        using var conv = dev.Allocate(dtype, rows * w);
        var ops = new CudaOps(dev);
        ops.MaskColumnsGrad(tdy, ty, dm, rows, w, accumulate: true, dmaskOffset: off);
        ops.ScaleColumns(ty, tm, ty, rows, w, off);
        ops.ScaleColumns(tdy, tm, conv, rows, w, off);
        ops.AddScaledColumns(tx, tdy, tm, rows, w, off);
        var wantY = new float[rows * w]; var wantConv = new float[rows * w]; var wantX = (float[])x.Clone(); var wantDm = (float[])prior.Clone();
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < w; j++)
            {
                int i = r * w + j;
                wantY[i] = y[i] * mask[j]; wantConv[i] = dy[i] * mask[j]; wantX[i] += dy[i] * mask[j];
                wantDm[off + j] += dy[i] * y[i];
            }
        double tol = dtype == DType.F32 ? 1e-6 : 1e-2;
        return Compare(dev.Download(ty), wantY, tol, "scaled rel err") + "; " + Compare(dev.Download(conv), wantConv, tol, "converted rel err")
            + "; " + Compare(dev.Download(tx), wantX, 1e-6, "residual rel err") + "; " + Compare(dev.Download(dm), wantDm, 1e-5, "grad rel err");
    }

    /// <summary>Seeds the gradient of <paramref name="y"/> with <paramref name="dy"/> and runs the tape backward.</summary>
    private static void Seed(Autograd.Tape<float> tape, Autograd.Var<float> y, float[] dy)
    {
        dy.CopyTo(y.G, 0);
        tape.Backward();
    }

    private static string RmsNormBackward(CudaDevice dev)
    {
        var rng = new Rng(15);
        int rows = 5, d = 999;
        var x = Random(rng, rows * d, 2); var gamma = Random(rng, d); var dy = Random(rng, rows * d); var prior = Random(rng, rows * d);
        var tape = new Autograd.Tape<float>();
        var xv = tape.Leaf(x, rows, d, (float[])prior.Clone());
        Seed(tape, tape.RmsNorm(xv, tape.Constant(gamma, 1, d), 1e-5), dy);
        using var tx = dev.Upload(x); using var tg = dev.Upload(gamma); using var tdy = dev.Upload(dy); using var tdx = dev.Upload(prior);
        new CudaOps(dev).RmsNormBackward(tx, tg, tdy, tdx, rows, d, 1e-5f);
        return Compare(dev.Download(tdx), xv.Grad!, 1e-5);
    }

    private static string RopeBackward(CudaDevice dev) => RopeBackward(dev, null);

    /// <summary>The inverse rotation against the CPU tape's rope backward; with <paramref name="into"/>, written to a
    /// tensor of that type from the f32 gradient, which must stay as it was.</summary>
    private static string RopeBackward(CudaDevice dev, DType? into)
    {
        var rng = new Rng(17);
        int rows = 7, heads = 3, hd = 64;
        var x = Random(rng, rows * heads * hd); var dy = Random(rng, rows * heads * hd);
        var rope = new Rope(hd, 10000.0, null);
        var tape = new Autograd.Tape<float>();
        var xv = tape.Leaf(x, rows, heads * hd);
        Seed(tape, tape.Rope(xv, heads, rope), dy);
        var invFreq = Enumerable.Range(0, hd / 2).Select(rope.InverseFrequency).ToArray();
        using var tf = dev.Upload(invFreq); using var tdy = dev.Upload(dy);
        if (into is not DType type)
        {
            new CudaOps(dev).Rope(tdy, tf, rows, heads, hd, 0, inverse: true);
            return Compare(dev.Download(tdy), xv.Grad!, 1e-5);
        }
        using var output = dev.Allocate(type, dy.Length);
        new CudaOps(dev).Rope(tdy, tf, rows, heads, hd, 0, inverse: true, output: output);
        return Compare(dev.Download(output), xv.Grad!, 1e-2) + "; input " + Compare(dev.Download(tdy), dy, 0, "changed by");
    }

    /// <summary>The training backward's fused column-mask kernels against plain loops, at a mask offset inside larger
    /// buffers, accumulating onto existing gradients: MaskColumnsGradAndScale (f32 activation into a storage-type
    /// output; storage-type activation into its f32 gradient in place), SwiGluMaskBackward, SiluMulMasked and
    /// AddScaledColumns into a new residual (the old one kept).</summary>
    private static string FusedMaskColumns(CudaDevice dev, DType dtype, int rows)
    {
        var rng = new Rng(22);
        int w = 301, off = 17, n = rows * w;
        var maskAll = Random(rng, w + off); var mask = maskAll.AsSpan(off, w).ToArray();
        var dy = Random(rng, n); var xf = Random(rng, n); var xs = RoundTo(dtype, Random(rng, n));
        var gate = RoundTo(dtype, Random(rng, n, 3)); var up = RoundTo(dtype, Random(rng, n)); var prior = Random(rng, w + off);
        using var tm = dev.Upload(maskAll); using var tdy = dev.Upload(dy); using var tdy2 = dev.Upload(dy);
        using var txf = dev.Upload(xf); using var txs = dev.Upload(xs, dtype); using var tg = dev.Upload(gate, dtype); using var tu = dev.Upload(up, dtype);
        using var dm1 = dev.Upload(prior); using var dm2 = dev.Upload(prior); using var dm3 = dev.Upload(prior);
        using var scaled = dev.Allocate(dtype, n); using var dg = dev.Allocate(dtype, n); using var du = dev.Allocate(dtype, n);
        using var am = dev.Allocate(dtype, n); using var residual = dev.Allocate(DType.F32, n);
        var ops = new CudaOps(dev);
        ops.MaskColumnsGradAndScale(tdy, txf, tm, dm1, off, scaled, rows, w);
        ops.MaskColumnsGradAndScale(tdy2, txs, tm, dm2, off, tdy2, rows, w);
        ops.SwiGluMaskBackward(tg, tu, tdy, tm, dm3, off, dg, du, rows, w);
        ops.SiluMulMasked(tg, tu, tm, off, am, rows, w);
        ops.AddScaledColumns(txf, tdy, tm, rows, w, off, output: residual);
        var wantScaled = new float[n]; var wantDg = new float[n]; var wantDu = new float[n]; var wantAm = new float[n]; var wantRes = new float[n];
        var want1 = (float[])prior.Clone(); var want2 = (float[])prior.Clone(); var want3 = (float[])prior.Clone();
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < w; j++)
            {
                int i = r * w + j;
                double g = gate[i], u = up[i], sg = 1 / (1 + Math.Exp(-g)), a = g * sg * u, d = dy[i] * mask[j];
                wantScaled[i] = (float)d; wantRes[i] = (float)(xf[i] + d);
                want1[off + j] += dy[i] * xf[i]; want2[off + j] += dy[i] * xs[i]; want3[off + j] += (float)(dy[i] * a);
                wantDg[i] = (float)(d * u * sg * (1 + g * (1 - sg))); wantDu[i] = (float)(d * g * sg); wantAm[i] = (float)(a * mask[j]);
            }
        double tol = dtype == DType.F32 ? 1e-5 : 1e-2;
        return Compare(dev.Download(scaled), wantScaled, tol, "scaled rel err") + "; " + Compare(dev.Download(tdy2), wantScaled, 1e-6, "in place rel err")
            + "; " + Compare(dev.Download(dm1), want1, 1e-5, "grad rel err") + "; " + Compare(dev.Download(dm2), want2, 1e-5, "grad (storage x) rel err")
            + "; " + Compare(dev.Download(dm3), want3, 1e-4, "swiglu mask grad rel err") + "; " + Compare(dev.Download(dg), wantDg, tol, "dgate rel err")
            + "; " + Compare(dev.Download(du), wantDu, tol, "dup rel err") + "; " + Compare(dev.Download(am), wantAm, tol, "masked swiglu rel err")
            + "; " + Compare(dev.Download(residual), wantRes, 1e-6, "new residual rel err") + "; old residual " + Compare(dev.Download(txf), xf, 0, "changed by");
    }

    /// <summary>RmsNormMasked and AddMaskedRmsNorm against CpuOps.RmsNorm of x and of x + y·addMask, with the masked copies.</summary>
    private static string MaskedNorms(CudaDevice dev, DType dtype, int d)
    {
        var rng = new Rng(23);
        int rows = 5, off = 9, off2 = 4, n = rows * d;
        var x = Random(rng, n, 2); var y = Random(rng, n); var gamma = RoundTo(dtype, Random(rng, d));
        var masks = Random(rng, d + off); var addMasks = Random(rng, d + off2);
        using var tx = dev.Upload(x); using var ty = dev.Upload(y); using var tg = dev.Upload(gamma, dtype);
        using var tm = dev.Upload(masks); using var tam = dev.Upload(addMasks); using var xOut = dev.Allocate(DType.F32, n);
        using var out1 = dev.Allocate(dtype, n); using var masked1 = dev.Allocate(dtype, n);
        using var out2 = dev.Allocate(dtype, n); using var masked2 = dev.Allocate(dtype, n);
        var ops = new CudaOps(dev);
        ops.RmsNormMasked(tx, tg, out1, tm, off, masked1, rows, d, 1e-5f);
        ops.AddMaskedRmsNorm(tx, ty, tam, off2, xOut, tg, out2, tm, off, masked2, rows, d, 1e-5f);
        var x2 = new float[n];
        for (int i = 0; i < n; i++) x2[i] = x[i] + y[i] * addMasks[off2 + i % d];
        var want1 = new float[n]; var want2 = new float[n];
        CpuOps.RmsNorm(x, gamma, want1, rows, d, 1e-5f);
        CpuOps.RmsNorm(x2, gamma, want2, rows, d, 1e-5f);
        float[] Masked(float[] v) => v.Select((e, i) => e * masks[off + i % d]).ToArray();
        double tol = dtype == DType.F32 ? 2e-6 : 1e-2;
        return Compare(dev.Download(out1), want1, tol, "norm rel err") + "; " + Compare(dev.Download(masked1), Masked(want1), tol, "masked rel err")
            + "; " + Compare(dev.Download(xOut), x2, 1e-6, "residual rel err") + "; " + Compare(dev.Download(out2), want2, tol, "write-back norm rel err")
            + "; " + Compare(dev.Download(masked2), Masked(want2), tol, "write-back masked rel err");
    }

    /// <summary>The training attention pair (forward with log-sum-exp, then backward) against the CPU tape's attention
    /// backward; bf16 inputs are rounded first so both sides see the same values.</summary>
    private static string AttentionBackward(CudaDevice dev, int t, int heads, int kvHeads, int hd, int? window, DType dtype, bool gemm = true,
        PrefillKernel? prefill = null)
    {
        var rng = new Rng(18);
        int qd = heads * hd, kvd = kvHeads * hd;
        var q = RoundTo(dtype, Random(rng, t * qd)); var k = RoundTo(dtype, Random(rng, t * kvd)); var v = RoundTo(dtype, Random(rng, t * kvd));
        var dout = Random(rng, t * qd);
        var tape = new Autograd.Tape<float>();
        var qv = tape.Leaf(q, t, qd); var kv = tape.Leaf(k, t, kvd); var vv = tape.Leaf(v, t, kvd);
        var ov = tape.Attention(qv, kv, vv, heads, kvHeads, hd, window);
        Seed(tape, ov, dout);
        using var tq = dev.Upload(q, dtype); using var tk = dev.Upload(k, dtype); using var tv = dev.Upload(v, dtype); using var td = dev.Upload(dout);
        using var o = dev.Allocate(dtype, t * qd); using var lse = dev.Allocate(DType.F32, heads * t); using var dsum = dev.Allocate(DType.F32, heads * t);
        using var dq = dev.Allocate(DType.F32, t * qd); using var dk = dev.Allocate(DType.F32, t * kvd); using var dv = dev.Allocate(DType.F32, t * kvd);
        var ops = new CudaOps(dev);
        ops.AttentionForTraining(tq, tk, tv, o, lse, t, heads, kvHeads, hd, window, prefill);
        ops.AttentionBackward(tq, tk, tv, o, td, lse, dq, dk, dv, dsum, t, heads, kvHeads, hd, window, gemm);
        // bf16 rounds the forward output that D = rowsum(dO·O) is taken from (a 1e-2 relative effect) and, on the GEMM
        // path, dO, P and dS as GEMM inputs.
        double tol = dtype == DType.F32 ? 1e-4 : 3e-2;
        return Compare(dev.Download(o), ov.Data, dtype == DType.F32 ? 1e-5 : 1e-2, "out rel err") + "; " + Compare(dev.Download(dq), qv.Grad!, tol, "dq rel err")
            + "; " + Compare(dev.Download(dk), kv.Grad!, tol, "dk rel err") + "; " + Compare(dev.Download(dv), vv.Grad!, tol, "dv rel err");
    }

    /// <summary>One block's loss and mask gradients: <see cref="CudaMaskedLlama"/> against the CPU reference, with soft masks
    /// in (0, 1) and some exact zeros.</summary>
    private static string TrainingStep(CudaDevice dev, PruningMode mode, DType dtype, bool checkpoint = false)
    {
        var (c, w) = RandomModel(pruned: false);
        if (dtype != DType.F32)
        {
            // Both sides get the same (storage-representable) weights; only the activations' rounding differs.
            var arrays = new List<float[]> { w.Embedding, w.FinalNorm, w.LmHead };
            foreach (var l in w.Layers) arrays.AddRange([l.AttnNorm, l.Wq, l.Wk, l.Wv, l.Wo, l.MlpNorm, l.WGate, l.WUp, l.WDown]);
            foreach (var a in arrays.Distinct()) RoundTo(dtype, a).CopyTo(a, 0);
        }
        var layout = new SiteLayout(c, mode);
        var rng = new Rng(19);
        var masks = layout.OutputWidths.Select(width => Enumerable.Range(0, width).Select(_ => rng.NextDouble() < 0.2 ? 0f : (float)rng.NextDouble()).ToArray()).ToList();
        int[] block = Enumerable.Range(0, 57).Select(_ => (int)(rng.NextDouble() * c.VocabSize)).ToArray();
        var wantGrads = masks.Select(m => new float[m.Length]).ToList();
        double want = new CpuMaskedLanguageModel(c, w).LossAndMaskGradients(block, masks, layout.OutputOf, wantGrads, 0.5);
        using var gpu = new CudaMaskedLlama(new CudaLlama(dev, c, w, dtype), ownsModel: true, checkpointLayers: checkpoint);
        var grads = masks.Select(m => new float[m.Length]).ToList();
        double got = gpu.LossAndMaskGradients(block, masks, layout.OutputOf, grads, 0.5);
        if (gpu.CheckpointsLayers != checkpoint) throw new Mismatch($"layers checkpointed: {gpu.CheckpointsLayers}, asked {checkpoint}");
        double lossErr = Math.Abs(got - want) / Math.Abs(want);
        double tol = dtype == DType.F32 ? 1e-4 : 5e-2;
        string detail = $"loss {got:F5} vs {want:F5} (rel err {lossErr:E2})";
        if (lossErr > (dtype == DType.F32 ? 1e-5 : 1e-2)) throw new Mismatch(detail);
        return detail + "; " + Compare(grads.SelectMany(g => g).ToArray(), wantGrads.SelectMany(g => g).ToArray(), tol, "mask grad rel err");
    }

    /// <summary>A full hypernetwork step on ref-llama-25m (masks from the hypernetwork, Gumbel noise, regularizer): the
    /// hypernetwork's gradients with the LM pass on the CPU and on CUDA.</summary>
    private static string ReferenceTrainingStep(CudaDevice dev, string dir)
    {
        var model = ModelLoader.Load(dir);
        var (c, w) = (model.Config, model.Model.Weights);
        var options = new TrainingOptions { PruneRatio = 0.5, Seed = 3 };
        var rng = new Rng(20);
        int[] block = Enumerable.Range(0, 128).Select(_ => (int)(rng.NextDouble() * c.VocabSize)).ToArray();
        var cpu = new HypernetworkTrainer(c, w, options);
        var want = cpu.ComputeGradients([block]);
        using var gpuModel = new CudaMaskedLlama(new CudaLlama(dev, c, w, DType.F32), ownsModel: true);
        var gpu = new HypernetworkTrainer(gpuModel, options);
        var got = gpu.ComputeGradients([block]);
        double lossErr = Math.Abs(got.CrossEntropy - want.CrossEntropy) / want.CrossEntropy;
        string detail = $"cross-entropy {got.CrossEntropy:F5} vs {want.CrossEntropy:F5} (rel err {lossErr:E2}), r {got.Ratio:F4} vs {want.Ratio:F4}";
        if (lossErr > 1e-4 || got.Ratio != want.Ratio) throw new Mismatch(detail);
        var g = gpu.Network.Parameters.SelectMany(p => p.Grad).ToArray();
        var gw = cpu.Network.Parameters.SelectMany(p => p.Grad).ToArray();
        return detail + "; " + Compare(g, gw, 1e-3, "hypernetwork grad rel err");
    }

    /// <summary>D = A·Bᵀ (B [n, k]) or, without <paramref name="transposeB"/>, D = A·B (B [k, n]), plus beta·D. One row
    /// (m 1) with K a multiple of 8 runs the GEMV kernel. Inputs are rounded to the storage type first, so with f32
    /// accumulation both types must match the CPU to summation-order error.</summary>
    private static string Gemm(CudaDevice dev, int m, int n, int k, DType dtype, bool transposeB = true, float beta = 0, DType output = DType.F32)
    {
        var rng = new Rng(13);
        var a = RoundTo(dtype, Random(rng, m * k)); var b = RoundTo(dtype, Random(rng, n * k)); var prior = RoundTo(output, Random(rng, m * n));
        using var ta = dev.Upload(a, dtype); using var tb = dev.Upload(b, dtype);
        using var c = dev.Upload(prior, output);
        dev.Gemm(ta, tb, c, m, n, k, beta: beta, transposeB: transposeB);
        var bt = b;
        if (!transposeB)
        {
            bt = new float[n * k];   // [k, n] → [n, k]
            for (int i = 0; i < k; i++) for (int j = 0; j < n; j++) bt[j * k + i] = b[i * n + j];
        }
        var want = new float[m * n];
        Cpu.Gemm.MatMulT(a, bt, want, m, n, k);
        for (int i = 0; i < want.Length; i++) want[i] += beta * prior[i];
        return Compare(dev.Download(c), want, output == DType.F32 ? 1e-5 : 1e-2);
    }

    /// <summary>With no plans and an empty tuning file, a GEMM's first call chooses its algorithm: with β = 1 the
    /// candidates are timed into a scratch output and D = C + A·Bᵀ must come out once. The choice is recorded; the
    /// heuristic's first algorithm (tuning off) gives the same product. On the emulator, whose second algorithm is the
    /// fastest, the choice must be that one.</summary>
    private static string GemmAlgorithmChoice(CudaDevice dev)
    {
        const int m = 37, n = 200, k = 136;
        var rng = new Rng(29);
        var a = RoundTo(DType.BF16, Random(rng, m * k)); var b = RoundTo(DType.BF16, Random(rng, n * k)); var prior = Random(rng, m * n);
        using var ta = dev.Upload(a, DType.BF16); using var tb = dev.Upload(b, DType.BF16);
        using var c = dev.Upload(prior);
        bool tune = dev.TuneGemms;
        double minFlops = dev.MinTunedGemmFlops;
        var tuning = dev.GemmTuning;
        string dir = Path.Combine(Path.GetTempPath(), $"dispnative-selftest-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            dev.ForgetGemmPlans();
            dev.GemmTuning = new GemmTuning(dir, "self-test");
            dev.TuneGemms = true;
            dev.MinTunedGemmFlops = 0;   // a small shape, tuned all the same
            dev.Gemm(ta, tb, c, m, n, k, beta: 1);
            var want = new float[m * n];
            Cpu.Gemm.MatMulT(a, b, want, m, n, k);
            string accumulated = Compare(dev.Download(c), want.Zip(prior, (p, q) => p + q).ToArray(), 1e-5, "accumulated once: max rel err");
            var (shape, chosen, candidates) = dev.GemmAlgorithms.Single();
            if (dev.GemmTuning.Timed != 1 || dev.GemmTuning.Recorded(shape) == null) throw new Mismatch($"{shape}: not timed and recorded");
            if (Nvrtc.Version.Major == 99 && chosen != 1) throw new Mismatch($"the emulator's fastest algorithm is the second, chose #{chosen} of {candidates}");
            dev.TuneGemms = false;
            dev.Gemm(ta, tb, c, m, n, k);
            string first = Compare(dev.Download(c), want, 1e-5, "heuristic's first: max rel err");
            return $"algorithm #{chosen} of {candidates}; {accumulated}; {first}";
        }
        finally
        {
            dev.TuneGemms = tune;
            dev.MinTunedGemmFlops = minFlops;
            dev.GemmTuning = tuning;
            if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true);
        }
    }

    // ---- whole model ----

    /// <summary>A small random model with GQA, odd widths and, when pruned, random per-site channel subsets.</summary>
    public static (ModelConfig Config, ModelWeights Weights) RandomModel(bool pruned, ulong seed = 14, bool qkvBias = false)
    {
        var c = new ModelConfig
        {
            Architecture = qkvBias ? "Qwen2ForCausalLM" : "LlamaForCausalLM", HiddenSize = 96, IntermediateSize = 200, NumLayers = 3, NumHeads = 6,
            NumKvHeads = 2, HeadDim = 16, VocabSize = 517, RmsNormEps = 1e-5f, TieWordEmbeddings = true, MaxPositionEmbeddings = 256, QkvBias = qkvBias,
        };
        var w = ModelWeights.Random(c, seed, std: 0.1f);
        if (!pruned) return (c, w);
        var layout = new SiteLayout(c, PruningMode.Disp);
        var rng = new Rng(seed + 1);
        var masks = layout.OutputWidths.Select(width => Enumerable.Range(0, width).Select(_ => rng.NextDouble() < 0.6).ToArray()).ToList();
        return Pruner.Apply(c, w, PruningPlan.FromMasks(layout, masks), "disp", 0.4, "random");
    }

    private static string Forward(CudaDevice dev, bool pruned, int? padding = null, bool qkvBias = false)
    {
        var (c, w) = RandomModel(pruned, qkvBias: qkvBias);
        var cpu = new LlamaModel(c, w);
        using var gpu = new CudaLlama(dev, c, w, DType.F32, padding: padding);
        if (padding != null)
        {
            using var usual = new CudaLlama(dev, c, w, DType.F32);
            if (gpu.DecodeWeightBytes <= usual.DecodeWeightBytes) throw new Mismatch($"padded to {padding}: {gpu.DecodeWeightBytes} weight bytes, not more than {usual.DecodeWeightBytes} padded to {usual.Padding}");
        }
        int[] prompt = [1, 5, 77, 300, 2, 516, 9, 9, 123, 45, 46, 47, 0], more = [31, 32, 400];
        int capacity = prompt.Length + more.Length + 4;
        var cpuCache = cpu.NewCache(capacity);
        using var graphCache = gpu.NewCache(capacity);
        using var eagerCache = gpu.NewCache(capacity);
        // Two prefill chunks: the second's keys and values go to cache rows from 13 on. The eager cache's prefills ask for
        // the last row's logits only (the last layer's query side for that row alone): its decode steps check the cache
        // that leaves.
        string detail = "";
        foreach (var chunk in new[] { prompt, more })
        {
            var wantChunk = cpu.Forward(chunk, cpuCache);
            detail = $"prefill chunks {Compare(gpu.Forward(chunk, graphCache), wantChunk, 1e-4)}, " +
                     $"last rows only {Compare(gpu.Forward(chunk, eagerCache, lastOnly: true), wantChunk[^c.VocabSize..], 1e-4)}";
        }
        string decode = "";
        foreach (int t in new[] { 3, 400, 8, 250 })
        {
            var want = cpu.Forward([t], cpuCache, lastOnly: true);
            gpu.UseCudaGraphs = true;   // the first step runs eagerly and is captured, the others replay the graph
            string graph = "decode (CUDA graph) " + Compare(gpu.Forward([t], graphCache, lastOnly: true), want, 1e-4);
            gpu.UseCudaGraphs = false;
            decode = $"{graph}, eager {Compare(gpu.Forward([t], eagerCache, lastOnly: true), want, 1e-4)}";
        }
        return $"{detail}; {decode}";
    }

    /// <summary>Each position's next-token NLL as perplexity takes it from a CUDA model (<see cref="CudaLlama.TokenNll"/>:
    /// computed on the device) against the same from its logits, downloaded and scored on the host as the CPU model's are.</summary>
    private static string DeviceScoring(CudaDevice dev)
    {
        var report = new List<string>();
        int[] block = Enumerable.Range(0, 40).Select(i => 1 + i * 37 % 500).ToArray();
        foreach (bool pruned in new[] { false, true })
            foreach (var dtype in new[] { DType.F32, DType.BF16 })
            {
                var (c, w) = RandomModel(pruned);
                using var gpu = new CudaLlama(dev, c, w, dtype);
                var host = Evaluation.Perplexity.TokenNll(((ICausalLanguageModel)gpu).Logits(block), block, c.VocabSize);
                var device = gpu.TokenNll(block);
                report.Add($"{(pruned ? "pruned" : "dense")} {dtype} {Compare(Array.ConvertAll(device, v => (float)v), Array.ConvertAll(host, v => (float)v), 1e-5)}");
            }
        return string.Join("; ", report);
    }

    /// <summary>Decode logits with the kernels launched programmatically (each may start before the previous ends and
    /// must wait for it before reading its output) against the same steps in plain stream order: any read that does not
    /// wait shows as a difference. Each run's first decode step also times the GEMV unrolls in its launch mode.</summary>
    private static string ProgrammaticDecode(CudaDevice dev)
    {
        var (c, w) = RandomModel(pruned: true);
        using var gpu = new CudaLlama(dev, c, w, DType.BF16);
        int[] prompt = [1, 5, 77, 300, 2, 516, 9];
        int[] steps = [3, 400, 8, 250, 17, 99];
        float[] Run(bool programmatic, bool graphs)
        {
            gpu.UseProgrammaticLaunch = programmatic;
            gpu.UseCudaGraphs = graphs;
            dev.ForgetGemvChoices();   // each run's first decode step times the GEMV unrolls (saving and restoring the residual) in its own launch mode
            using var cache = gpu.NewCache(prompt.Length + steps.Length);
            var logits = new List<float>(gpu.Forward(prompt, cache, lastOnly: true));
            foreach (int t in steps) logits.AddRange(gpu.Forward([t], cache, lastOnly: true));
            return logits.ToArray();
        }
        long minTuned = dev.MinTunedGemvElements;
        dev.MinTunedGemvElements = 0;
        string detail;
        try
        {
            var plain = Run(false, graphs: false);
            detail = "graphs " + Compare(Run(true, graphs: true), plain, 0, "differ by") + ", eager " + Compare(Run(true, graphs: false), plain, 0, "differ by");
        }
        finally { dev.MinTunedGemvElements = minTuned; }
        gpu.UseProgrammaticLaunch = true;
        return detail + (dev.ProgrammaticLaunchSupported ? "" : " (programmatic launch unsupported here: both ran in plain order)");
    }

    /// <summary>Greedy decoding with the tokens chosen on the device (<see cref="CudaLlama.DecodeGreedy"/>) against argmax on
    /// the host over each decode step's logits: the same tokens, dense and pruned, through the greedy graph and eagerly.
    /// A decoder stopped after a few tokens (its next step already queued) leaves the cache at the last token read: an
    /// eager step then, and a second decoder on the same cache, go on with the same tokens; so does one after a decoder
    /// that read nothing. While a decoder runs, the cache refuses other forwards.</summary>
    private static string GreedyDecode(CudaDevice dev)
    {
        int[] prompt = [1, 5, 77, 300, 2, 516, 9];
        const int steps = 10, stopAfter = 3;
        var report = new List<string>();
        foreach (bool pruned in new[] { false, true })
        {
            var (c, w) = RandomModel(pruned);
            using var gpu = new CudaLlama(dev, c, w, DType.BF16);
            var logits = new float[c.VocabSize];
            int capacity = prompt.Length + steps + 1;
            // The host's tokens: first (after the prompt), then `steps` more.
            var want = new List<int>();
            using (var cache = gpu.NewCache(capacity))
            {
                gpu.ForwardLast(prompt, cache, logits);
                want.Add(Generator.ArgMax(logits));
                for (int i = 0; i < steps; i++)
                {
                    gpu.ForwardLast([want[^1]], cache, logits);
                    want.Add(Generator.ArgMax(logits));
                }
            }
            string Tokens(IEnumerable<int> t) => string.Join(" ", t);
            foreach (bool graphs in new[] { true, false })
            {
                gpu.UseCudaGraphs = graphs;
                string form = $"{(pruned ? "pruned" : "dense")}, {(graphs ? "graphs" : "eager")}";
                using var cache = gpu.NewCache(capacity);
                gpu.ForwardLast(prompt, cache, logits);
                var got = new List<int> { Generator.ArgMax(logits) };
                using (gpu.DecodeGreedy(cache, got[0], steps)) { }   // none read: it only uploaded the first token
                using (var decoder = gpu.DecodeGreedy(cache, got[0], steps))
                {
                    for (int i = 0; i < stopAfter; i++) got.Add(decoder.Next());
                    try
                    {
                        gpu.ForwardLast([got[^1]], cache, logits);
                        throw new Mismatch($"{form}: a forward on the cache while its decoder runs was not refused");
                    }
                    catch (InvalidOperationException) { }
                }
                if (cache.Length != prompt.Length + stopAfter)
                    throw new Mismatch($"{form}: stopped after {stopAfter} tokens, the cache holds {cache.Length} positions, not {prompt.Length + stopAfter}");
                gpu.ForwardLast([got[^1]], cache, logits);   // an eager (or graph) step from the last token read
                got.Add(Generator.ArgMax(logits));
                using (var decoder = gpu.DecodeGreedy(cache, got[^1], steps - stopAfter - 1))
                    while (decoder.Remaining > 0) got.Add(decoder.Next());
                if (!got.SequenceEqual(want)) throw new Mismatch($"{form}: device {Tokens(got)}; host {Tokens(want)}");
                if (cache.Length != prompt.Length + steps) throw new Mismatch($"{form}: the cache holds {cache.Length} positions, not {prompt.Length + steps}");
            }
            gpu.UseCudaGraphs = true;
            report.Add($"{(pruned ? "pruned" : "dense")} {Tokens(want)}");
        }
        return string.Join("; ", report);
    }

    /// <summary>Decode steps with the layers as one persistent kernel (<see cref="CudaLlama.UsePersistentDecode"/>: phases
    /// between grid barriers, every block working on every phase) against the same steps with a kernel per phase, eager:
    /// the same bits, or a phase that read another's output before the barrier let it (or a barrier that gave up: NaN)
    /// shows. Caches of 13 rows (one KV split) and 200 (four, merged by the last group of each head); grids of 1 block
    /// (every warp all rows) and 3 (attention's items looping) at every unroll; with <paramref name="full"/>, also the
    /// engine's grid and the timed choice of unroll and blocks per SM (on a 3-block grid: it is the choice that is
    /// checked, and the CUDA emulator runs a cooperative grid's every block, slowly). In f32, also where it does not
    /// apply (q/k/v biases) and where the driver refuses the launch: decode goes on without it, the same bits.</summary>
    private static string PersistentDecode(CudaDevice dev, DType dtype, bool[] pruning, int[] capacities, bool full)
    {
        int? unroll = dev.GemvUnroll, gridLimit = dev.PersistentGridLimit;
        long minTuned = dev.MinTunedGemvElements;
        int[] prompt = [1, 5, 77, 300, 2, 516, 9];
        int[] steps = [3, 400, 8, 250, 17, 99];
        // The prompt's last logits and each decode step's, beforeStep run before each step.
        float[] Decode(CudaLlama gpu, CudaKvCache cache, bool persistent, Action? beforeStep = null)
        {
            gpu.UsePersistentDecode = persistent;
            var logits = new List<float>(gpu.Forward(prompt, cache, lastOnly: true));
            foreach (int t in steps)
            {
                beforeStep?.Invoke();
                logits.AddRange(gpu.Forward([t], cache, lastOnly: true));
            }
            return logits.ToArray();
        }
        var report = new List<string>();
        try
        {
            foreach (bool pruned in pruning)
            {
                var (c, w) = RandomModel(pruned);
                using var gpu = new CudaLlama(dev, c, w, dtype) { UseCudaGraphs = false };
                foreach (int capacity in capacities)
                {
                    string what = $"{(pruned ? "pruned" : "dense")}, cache {capacity}";
                    dev.GemvUnroll = CudaDevice.GemvUnrolls[0];
                    float[] want;
                    using (var cache = gpu.NewCache(capacity)) want = Decode(gpu, cache, persistent: false);
                    void Same(int? limit, int? u, string how)
                    {
                        (dev.PersistentGridLimit, dev.GemvUnroll) = (limit, u);
                        using var cache = gpu.NewCache(capacity);
                        Compare(Decode(gpu, cache, persistent: true), want, 0, $"{what}, {how}: differ by");
                        if (cache.PersistentDecodeApplies != true) throw new Mismatch($"{what}: the persistent kernel did not run (it should apply)");
                    }
                    foreach (int limit in new[] { 1, 3 })
                        foreach (int u in CudaDevice.GemvUnrolls) Same(limit, u, $"grid of {limit}, unroll {u}");
                    string detail = $"{(pruned ? "pruned" : "dense")}, {CudaOps.DecodeSplits(capacity, 0)} split(s): identical";
                    if (full)
                    {
                        Same(gridLimit, CudaDevice.GemvUnrolls[0], "the engine's grid");
                        dev.MinTunedGemvElements = 0;
                        Same(3, null, "timed form");
                        dev.MinTunedGemvElements = minTuned;
                        var f = gpu.PersistentDecodeForm ?? throw new Mismatch($"{what}: no form was chosen");
                        detail += $" (the engine's grid too; timed: unroll {f.Unroll}, {f.BlocksPerSM} blocks/SM)";
                    }
                    report.Add(detail);
                }
            }
            if (dtype == DType.F32)
            {
                // q/k/v biases (Qwen2) are outside the kernel: decode goes on as without it, through CUDA graphs.
                var (c, w) = RandomModel(pruned: true, qkvBias: true);
                using (var gpu = new CudaLlama(dev, c, w, dtype))
                using (var plain = gpu.NewCache(prompt.Length + steps.Length))
                using (var asked = gpu.NewCache(prompt.Length + steps.Length))
                {
                    var want = Decode(gpu, plain, persistent: false);
                    var got = Decode(gpu, asked, persistent: true);
                    if (asked.PersistentDecodeApplies != false || asked.Graph == null)
                        throw new Mismatch("with q/k/v biases the persistent kernel should decline and decode go through a CUDA graph");
                    report.Add($"with q/k/v biases it declines: decode through graphs {Compare(got, want, 0, "differ by")}");
                }
                // A driver that refuses the cooperative launch: the step runs again a kernel per phase, and so do the next.
                (c, w) = RandomModel(pruned: true);
                using (var gpu = new CudaLlama(dev, c, w, dtype) { UseCudaGraphs = false })
                using (var plain = gpu.NewCache(prompt.Length + steps.Length))
                using (var refused = gpu.NewCache(prompt.Length + steps.Length))
                {
                    var want = Decode(gpu, plain, persistent: false);
                    float[] got;
                    try { got = Decode(gpu, refused, persistent: true, () => dev.RefuseCooperativeLaunches = true); }
                    finally { dev.RefuseCooperativeLaunches = false; }
                    if (refused.PersistentDecodeApplies != false) throw new Mismatch("a refused cooperative launch should turn the persistent kernel off for the cache");
                    report.Add($"refused by the driver it falls back: {Compare(got, want, 0, "differ by")}");
                }
            }
            return string.Join("; ", report);
        }
        finally { (dev.GemvUnroll, dev.PersistentGridLimit, dev.MinTunedGemvElements) = (unroll, gridLimit, minTuned); }
    }

    /// <summary>A checkpoint streamed to the device tensor by tensor (<see cref="LayerwiseWeights.Read"/>, as <c>eval</c>,
    /// <c>generate</c>, <c>train</c> and <c>run</c> load a Hugging Face model on CUDA) holds the weights that uploading the
    /// host's copy of it gives: the same logits, bit for bit.</summary>
    private static string StreamedLoad(CudaDevice dev, bool pruned)
    {
        var (c, w) = RandomModel(pruned);
        if (pruned)
        {
            c = c with { TieWordEmbeddings = false };
            w = new ModelWeights { Embedding = w.Embedding, Layers = w.Layers, FinalNorm = w.FinalNorm, LmHead = w.Embedding.Select(x => -0.5f * x).ToArray() };
        }
        var dir = Directory.CreateTempSubdirectory("dispnative-selftest-").FullName;
        try
        {
            var tensors = w.ToTensors(c, DType.BF16).ToList();
            var shards = SafeTensorsWriter.WriteSharded(dir, tensors, tensors.Sum(t => (long)t.Data.Length) / 3 + 1);
            if (shards.Count < 2) throw new Mismatch($"wrote {shards.Count} shard, meant several");
            File.WriteAllText(Path.Combine(dir, "config.json"), c.ToJson().ToJsonString());
            using var checkpoint = SafeTensorsCheckpoint.Open(dir);
            using var uploaded = new CudaLlama(dev, c, ModelWeights.Load(checkpoint, c), DType.BF16);
            using var streamed = new CudaLlama(dev, c, LayerwiseWeights.Read(checkpoint, c), DType.BF16);
            int[] prompt = [1, 5, 77, 300, 2, 516, 9];
            using var c1 = uploaded.NewCache(prompt.Length);
            using var c2 = streamed.NewCache(prompt.Length);
            var want = uploaded.Forward(prompt, c1);
            var got = streamed.Forward(prompt, c2);
            int differ = want.Zip(got).Count(p => BitConverter.SingleToInt32Bits(p.First) != BitConverter.SingleToInt32Bits(p.Second));
            if (differ > 0) throw new Mismatch($"{differ} of {want.Length} logits differ");
            return $"all {want.Length} logits identical";
        }
        finally { Directory.Delete(dir, true); }
    }

    private static string Golden(CudaDevice dev, string dir, DType dtype)
    {
        var model = ModelLoader.Load(dir);
        var golden = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "golden.json"))).RootElement;
        var fw = golden.GetProperty("forward_fp32");
        int[] ids = fw.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        int v = model.Config.VocabSize;
        using var gpu = new CudaLlama(dev, model.Config, model.Model.Weights, dtype);
        using var cache = gpu.NewCache(ids.Length);
        var logits = gpu.Forward(ids, cache);
        var argmax = fw.GetProperty("argmax_per_position").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        int agree = 0;
        for (int t = 0; t < ids.Length; t++) if (Generator.ArgMax(logits.AsSpan(t * v, v)) == argmax[t]) agree++;
        if (dtype != DType.F32)
        {
            // Longer check: the greedy continuation's positions, bf16 GPU vs the f32 CPU reference.
            int[] seq = golden.GetProperty("greedy_fp32").GetProperty("ids_prompt_then_24_new").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            using var c2 = gpu.NewCache(seq.Length);
            var lg = gpu.Forward(seq, c2);
            var lc = model.Model.Forward(seq, model.Model.NewCache(seq.Length));
            int agree2 = 0;
            for (int t = 0; t < seq.Length; t++) if (Generator.ArgMax(lg.AsSpan(t * v, v)) == Generator.ArgMax(lc.AsSpan(t * v, v))) agree2++;
            double rate = (double)(agree + agree2) / (ids.Length + seq.Length);
            string d = $"argmax agreement {rate:P1} over {ids.Length + seq.Length} positions";
            if (rate < 0.99) throw new Mismatch(d);
            return d;
        }
        if (agree != ids.Length) throw new Mismatch($"argmax differs at {ids.Length - agree} of {ids.Length} positions");
        var lse = fw.GetProperty("logsumexp_per_position").EnumerateArray().Select(e => (float)e.GetDouble()).ToArray();
        var got = Enumerable.Range(0, ids.Length).Select(t => CpuOps.LogSumExp(logits.AsSpan(t * v, v))).ToArray();
        var first16 = fw.GetProperty("logits_last_position_first16").EnumerateArray().Select(e => (float)e.GetDouble()).ToArray();
        return "argmax all equal; " + Compare(got, lse, 1e-3, "logsumexp rel err") + "; "
            + Compare(logits.AsSpan((ids.Length - 1) * v, 16), first16, 1e-3, "logits rel err");
    }
}
