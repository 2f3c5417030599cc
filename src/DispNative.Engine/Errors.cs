namespace DispNative.Engine;

/// <summary>Base of every error the engine reports to a user: the message names the problem
/// (file, tensor, key, value) and is meant to be printed as is, without a stack trace.</summary>
public class DispNativeException : Exception
{
    public DispNativeException(string message) : base(message) { }
    public DispNativeException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>A checkpoint, config or tokenizer file that is missing, corrupt or not supported.</summary>
public sealed class ModelFormatException : DispNativeException
{
    public ModelFormatException(string message) : base(message) { }
    public ModelFormatException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>An argument or option value outside its valid range.</summary>
public sealed class InvalidSettingException : DispNativeException
{
    public InvalidSettingException(string message) : base(message) { }
}

/// <summary>An <see cref="IProgress{T}"/> that reports on the calling thread (<see cref="Progress{T}"/> posts to the
/// thread pool, which reorders and delays reports).</summary>
public sealed class SyncProgress<T>(Action<T> report) : IProgress<T>
{
    public void Report(T value) => report(value);
}
