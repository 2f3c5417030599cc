namespace DispNative.Interop;

/// <summary>A CUDA API call that failed: carries the API, the function, the numeric status and the API's own
/// error name and message (for example CUDA_ERROR_OUT_OF_MEMORY: out of memory).</summary>
public class CudaException(string api, string function, int code, string name, string message)
    : Exception($"{function} failed: {name} ({code}): {message}")
{
    public string Api { get; } = api;
    public string Function { get; } = function;
    public int Code { get; } = code;
    public string ErrorName { get; } = name;
}

/// <summary>The device ran out of memory even after the caching allocator released its cache.</summary>
public sealed class CudaOutOfMemoryException(string message) : Exception(message);
