using DispNative.Engine.Cuda;
using DispNative.Engine.Disp;
using DispNative.Engine.Inference;
using DispNative.Engine.IO;
using DispNative.Engine.Models;

namespace DispNative.Engine;

/// <summary>Chooses the compute device for <c>--device cpu|cuda|auto</c> and puts a loaded model on it.</summary>
public static class Devices
{
    /// <summary>"cpu" or "cuda". "auto" picks CUDA when a driver, a device, NVRTC and cuBLASLt are all present;
    /// "cuda" without them is an error that says which one is missing.</summary>
    public static string Resolve(string device)
    {
        switch (device)
        {
            case "cpu":
                return "cpu";
            case "auto":
                return CudaDevice.Unavailable() == null ? "cuda" : "cpu";
            case "cuda":
                if (CudaDevice.Unavailable() is string reason) throw new DispNativeException($"--device cuda: {reason}");
                return "cuda";
            default:
                throw new InvalidSettingException($"unknown device '{device}' (expected cpu, cuda or auto)");
        }
    }

    /// <summary>Parses a storage type option: auto, f32, bf16 or f16 (null for auto).</summary>
    public static DType? ParseDType(string dtype) => dtype switch
    {
        "auto" => null, "f32" => DType.F32, "bf16" => DType.BF16, "f16" => DType.F16,
        _ => throw new InvalidSettingException($"unknown dtype '{dtype}' (expected auto, f32, bf16 or f16)"),
    };

    /// <summary>Loads a model to run on <paramref name="device"/> ("cpu" or "cuda" from <see cref="Resolve"/>): see <see cref="Place"/>.</summary>
    public static LoadedModel Load(string path, string? tokenizerPath, string device, DType? dtype = null)
    {
        using var opened = ModelLoader.Open(path, tokenizerPath);
        return Place(opened, device, dtype);
    }

    /// <summary>The model's runner on <paramref name="device"/> ("cpu" or "cuda" from <see cref="Resolve"/>). The CPU
    /// reference computes in f32 only and holds the whole model on the host; CUDA stores weights and activations in
    /// <paramref name="dtype"/> (auto: bf16), and its weights go to the GPU as they are read, a layer's at a time, so the
    /// host keeps no copy of them (the result has no <see cref="LoadedModel.Model"/>).</summary>
    public static LoadedModel Place(OpenedModel model, string device, DType? dtype = null)
    {
        if (device == "cpu")
        {
            if (dtype is DType.BF16 or DType.F16) throw new InvalidSettingException($"the CPU backend computes in f32 (got dtype {dtype.Value.ToString().ToLowerInvariant()}); use --device cuda or f32");
            return model.ToHost();
        }
        var gpu = CudaDevice.Open();
        try { return new LoadedModel(model.Source, model.Config, model.Tokenizer) { Runner = new CudaLlama(gpu, model.Config, model.Weights, dtype ?? DType.BF16, ownsDevice: true) }; }
        catch { gpu.Dispose(); throw; }
    }

    /// <summary>The masked LM pass of hypernetwork training on the device <paramref name="model"/> was placed on
    /// (<see cref="Place"/>): the fp32 CPU reference, or <see cref="CudaMaskedLlama"/> over the model's GPU weights (which
    /// stay the model's). <paramref name="checkpointLayers"/>: per-layer activation checkpointing on or off; null: on where
    /// a block's activations would not fit (the CPU: a quarter of the memory the runtime may use; CUDA: the free device memory).</summary>
    public static IMaskedLanguageModel MaskedModel(LoadedModel model, bool? checkpointLayers = null)
        => model.Runner is CudaLlama gpu
            ? new CudaMaskedLlama(gpu, ownsModel: false, checkpointLayers: checkpointLayers)
            : new CpuMaskedLanguageModel(model.Config, model.Model.Weights, checkpointLayers);
}
