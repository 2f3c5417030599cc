using System.Runtime.InteropServices;
using DispNative.Engine.IO;

namespace DispNative.Engine.Models;

/// <summary>Reads Karpathy's llama2.c legacy checkpoint (<c>.bin</c>): 7 int32 header fields, then fp32
/// tensors. llama2.c rotates interleaved pairs; the engine rotates halves (Hugging Face), so q/k rows are
/// permuted on import exactly as the Hugging Face conversion script does.</summary>
public static class Llama2cImport
{
    public static (ModelConfig Config, ModelWeights Weights) Load(string path)
    {
        if (!File.Exists(path)) throw new ModelFormatException($"llama2.c checkpoint not found: {path}");
        HostMemory.Require(2 * new FileInfo(path).Length, $"{path}: reading the llama2.c checkpoint (the file, then its weights)");
        byte[] bytes = File.ReadAllBytes(path);
        if (bytes.Length < 28) throw new ModelFormatException($"{path}: truncated llama2.c checkpoint (header needs 28 bytes, file has {bytes.Length})");
        var header = new int[7];
        for (int i = 0; i < 7; i++) header[i] = BitConverter.ToInt32(bytes, 4 * i);
        int dim = header[0], hidden = header[1], layers = header[2], heads = header[3], kvHeads = header[4], vocabRaw = header[5], seqLen = header[6];
        bool shared = vocabRaw > 0;
        int vocab = vocabRaw == int.MinValue ? 0 : Math.Abs(vocabRaw);
        if (dim <= 0 || hidden <= 0 || layers <= 0 || heads <= 0 || kvHeads <= 0 || vocab == 0 || seqLen <= 0 || dim % heads != 0 || heads % kvHeads != 0)
            throw new ModelFormatException($"{path}: not a llama2.c checkpoint (header dim={dim} hidden={hidden} layers={layers} heads={heads} kv_heads={kvHeads} vocab={vocabRaw} seq_len={seqLen})");
        int headDim = dim / heads, kvDim = kvHeads * headDim;

        // In double: a damaged header can describe more floats than a long holds.
        double floats = (double)vocab * dim + layers * (2.0 * dim + 2.0 * dim * dim + 2.0 * dim * kvDim + 3.0 * dim * hidden)
                        + dim + (double)seqLen * headDim + (shared ? 0 : (double)vocab * dim);
        if (bytes.Length != 28 + 4 * floats)
            throw new ModelFormatException($"{path}: size {bytes.Length} bytes does not match the header (expected {28 + 4 * floats:F0} bytes)");
        if (DTypes.FirstNonFinite(MemoryMarshal.Cast<byte, float>(bytes.AsSpan(28))) is int bad and >= 0)
            throw new ModelFormatException($"{path}: float {bad} after the header is {BitConverter.ToSingle(bytes, 28 + 4 * bad)}: weights must be finite (the file is corrupt)");

        int pos = 28;
        float[] Take(long n)
        {
            var a = new float[n];
            Buffer.BlockCopy(bytes, pos, a, 0, (int)(4 * n));
            pos += (int)(4 * n);
            return a;
        }
        float[][] TakeLayers(long n) => Enumerable.Range(0, layers).Select(_ => Take(n)).ToArray();

        var embed = Take((long)vocab * dim);
        var attnNorm = TakeLayers(dim);
        var wq = TakeLayers((long)dim * dim);
        var wk = TakeLayers((long)kvDim * dim);
        var wv = TakeLayers((long)kvDim * dim);
        var wo = TakeLayers((long)dim * dim);
        var mlpNorm = TakeLayers(dim);
        var w1 = TakeLayers((long)hidden * dim);
        var w2 = TakeLayers((long)dim * hidden);
        var w3 = TakeLayers((long)hidden * dim);
        var finalNorm = Take(dim);
        pos += 4 * seqLen * headDim; // freq_cis_real and freq_cis_imag (unused)
        var head = shared ? embed : Take((long)vocab * dim);

        var config = new ModelConfig
        {
            Architecture = "LlamaForCausalLM",
            HiddenSize = dim, IntermediateSize = hidden, NumLayers = layers, NumHeads = heads, NumKvHeads = kvHeads,
            HeadDim = headDim, VocabSize = vocab, RmsNormEps = 1e-5f, RopeTheta = 10000.0, TieWordEmbeddings = shared,
            MaxPositionEmbeddings = seqLen, BosTokenId = 1, EosTokenIds = [2], WeightDType = "float32",
        };
        var weights = new ModelWeights
        {
            Embedding = embed,
            Layers = Enumerable.Range(0, layers).Select(l => new LayerWeights
            {
                AttnNorm = attnNorm[l],
                Wq = PermuteToHalfRotation(wq[l], heads, headDim, dim),
                Wk = PermuteToHalfRotation(wk[l], kvHeads, headDim, dim),
                Wv = wv[l], Wo = wo[l], MlpNorm = mlpNorm[l], WGate = w1[l], WUp = w3[l], WDown = w2[l],
            }).ToArray(),
            FinalNorm = finalNorm,
            LmHead = head,
        };
        return (config, weights);
    }

    /// <summary>Row r = h·hd + 2i + j (interleaved pair i) moves to h·hd + j·hd/2 + i (half rotation).</summary>
    public static float[] PermuteToHalfRotation(float[] w, int heads, int headDim, int cols)
    {
        var result = new float[w.Length];
        int half = headDim / 2;
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++)
                for (int j = 0; j < 2; j++)
                    Array.Copy(w, (long)(h * headDim + 2 * i + j) * cols, result, (long)(h * headDim + j * half + i) * cols, cols);
        return result;
    }
}
