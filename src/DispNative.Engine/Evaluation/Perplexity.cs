using DispNative.Engine.Cpu;
using DispNative.Engine.Inference;

namespace DispNative.Engine.Evaluation;

public sealed record PerplexityResult(double Perplexity, double TotalNll, long ScoredTokens, int Blocks, int TotalTokens);

public readonly record struct PerplexityProgress(int BlocksDone, int BlocksTotal, long ScoredTokens, double RunningPerplexity);

/// <summary>The DISP-LLM/SliceGPT protocol: tokenize once (BOS at the very start only), cut into consecutive
/// non-overlapping blocks (the last may be shorter), run each block from position 0, score tokens 1..n-1 of each
/// block; perplexity = exp(total NLL / scored tokens).</summary>
public static class Perplexity
{
    public static IReadOnlyList<int[]> Blocks(int[] ids, int blockSize, int? maxBlocks = null)
    {
        if (blockSize < 2) throw new InvalidSettingException($"block size must be at least 2 (got {blockSize})");
        if (maxBlocks is <= 0) throw new InvalidSettingException($"max blocks must be positive (got {maxBlocks})");
        var blocks = new List<int[]>();
        for (int s = 0; s < ids.Length && (maxBlocks == null || blocks.Count < maxBlocks); s += blockSize)
        {
            var block = ids[s..Math.Min(ids.Length, s + blockSize)];
            if (block.Length >= 2) blocks.Add(block);
        }
        return blocks;
    }

    public static PerplexityResult Evaluate(ICausalLanguageModel model, int[] ids, int blockSize, int? maxBlocks = null,
        IProgress<PerplexityProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        var blocks = Blocks(ids, blockSize, maxBlocks);
        model.Config.RequireContext(blockSize, $"block size {blockSize}");
        if (blocks.Count == 0) throw new InvalidSettingException($"the text has {ids.Length} tokens: nothing to score (a block needs at least 2)");
        double nll = 0;
        long scored = 0;
        for (int b = 0; b < blocks.Count; b++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            var block = blocks[b];
            nll += BlockNll(model, block);
            scored += block.Length - 1;
            progress?.Report(new PerplexityProgress(b + 1, blocks.Count, scored, Math.Exp(nll / scored)));
        }
        return new PerplexityResult(Math.Exp(nll / scored), nll, scored, blocks.Count, ids.Length);
    }

    /// <summary>Σ over positions t = 0..n-2 of −log p(block[t+1] | block[..t]), the block run as a new sequence: the
    /// model's <see cref="ICausalLanguageModel.TokenNll"/>, summed in order.</summary>
    public static double BlockNll(ICausalLanguageModel model, int[] block)
    {
        double nll = 0;
        foreach (double v in model.TokenNll(block)) nll += v;
        return nll;
    }

    /// <summary>−log p(block[t+1] | block[..t]) for t = 0..n-2 from the block's logits [n, vocab]. The rows are scored in
    /// parallel, each on its own, so the result does not depend on the thread count.</summary>
    public static double[] TokenNll(float[] logits, int[] block, int vocab)
    {
        const int RowsPerItem = 16;
        int rows = Math.Max(0, block.Length - 1);
        var perRow = new double[rows];
        WorkTeam.For((rows + RowsPerItem - 1) / RowsPerItem, Gemm.Threads, item =>
        {
            for (int t = item * RowsPerItem; t < Math.Min(rows, (item + 1) * RowsPerItem); t++)
            {
                var row = logits.AsSpan(t * vocab, vocab);
                perRow[t] = CpuOps.LogSumExp(row) - row[block[t + 1]];
            }
        });
        for (int t = 0; t < rows; t++)
            if (!double.IsFinite(perRow[t])) Generator.RequireFiniteLogits(logits.AsSpan(t * vocab, vocab), $"position {t} of a block");
        return perRow;
    }
}
