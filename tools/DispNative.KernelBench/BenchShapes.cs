using DispNative.Engine.Models;

namespace DispNative.KernelBench;

/// <summary>The model shapes the GPU benchmarks run at: LLaMA-2-7B (what the README reports), and a small one with the
/// same head_dim (so the same kernels run) that checks the benchmark code in seconds, for example on the CUDA
/// emulator of <c>tools/emulate/cuda</c> (<c>--smoke</c>; its timings mean nothing).</summary>
internal static class BenchShapes
{
    public static readonly ModelConfig Llama2_7B = new()
    {
        Architecture = "LlamaForCausalLM", HiddenSize = 4096, IntermediateSize = 11008, NumLayers = 32, NumHeads = 32,
        NumKvHeads = 32, HeadDim = 128, VocabSize = 32000, MaxPositionEmbeddings = 4096,
    };

    public static readonly ModelConfig Smoke = Llama2_7B with
    {
        HiddenSize = 256, IntermediateSize = 688, NumLayers = 2, NumHeads = 2, NumKvHeads = 2, VocabSize = 1000, MaxPositionEmbeddings = 512,
    };

    public const int SmokeTokens = 96;

    public static string Describe(ModelConfig c) => c.HiddenSize == Llama2_7B.HiddenSize
        ? $"LLaMA-2-7B shape ({c.NumLayers} layers)"
        : $"smoke shape (d {c.HiddenSize}, ffn {c.IntermediateSize}, {c.NumLayers} layers, {c.NumHeads} heads of {c.HeadDim})";
}
