using DispNative.Engine.Models;

namespace DispNative.Engine.Inference;

/// <summary>Keys and values of one sequence for every layer, [capacity, kvDim] per layer (after RoPE).</summary>
public sealed class KvCache : IInferenceCache
{
    public float[][] K { get; }
    public float[][] V { get; }
    public int Capacity { get; }
    public int Length { get; internal set; }

    public KvCache(ModelConfig config, int capacity)
    {
        if (capacity <= 0) throw new InvalidSettingException($"KV cache capacity must be positive (got {capacity})");
        Capacity = capacity;
        K = new float[config.NumLayers][];
        V = new float[config.NumLayers][];
        for (int l = 0; l < config.NumLayers; l++)
        {
            K[l] = new float[(long)capacity * config.KvDim];
            V[l] = new float[(long)capacity * config.KvDim];
        }
    }

    public void Reset() => Length = 0;
}
