using DispNative.Engine.Inference;
using DispNative.Interop;

namespace DispNative.Engine.Cuda;

/// <summary>Greedy decoding with each next token chosen on the device (<see cref="CudaLlama.DecodeGreedy"/>): step i
/// reads the token step i - 1 chose there, so the host keeps <see cref="Depth"/> steps queued and reads each token
/// after its step's event while the next step runs. Not thread-safe (one consumer); the model may serve others
/// meanwhile. Dispose waits for the steps queued ahead and hands the cache back.</summary>
public sealed class GreedyDecoder : IGreedyDecoder
{
    /// <summary>Steps queued at most: the one whose token the host waits for and the next, which runs meanwhile.</summary>
    public const int Depth = 2;

    private readonly CudaLlama _model;
    private readonly CudaKvCache _cache;
    private readonly int _start, _steps;
    private readonly CudaEventHandle[] _done = new CudaEventHandle[Depth];
    private int _launched, _read;
    private bool _disposed;

    internal GreedyDecoder(CudaLlama model, CudaKvCache cache, int firstToken, int steps)
    {
        (_model, _cache, _start, _steps) = (model, cache, cache.Length, steps);
        try
        {
            for (int i = 0; i < Depth; i++) _done[i] = model.NewEvent();
            model.StartGreedy(cache, firstToken, _done[Depth - 1]);
        }
        catch { foreach (var e in _done) e?.Dispose(); throw; }
        cache.Decoder = this;
    }

    /// <summary>Steps not yet read.</summary>
    public int Remaining => _steps - _read;

    /// <summary>The next token: the argmax of the logits after the last token read (the first call: after the first
    /// token). The cache then holds the position of the step's input, the token before.</summary>
    public int Next()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_read == _steps) throw new InvalidOperationException($"the decoder's {_steps} steps are all read");
        while (_launched < _steps && _launched < _read + Depth)
        {
            _model.LaunchGreedyStep(_cache, _start + _launched, _done[_launched % Depth]);
            _launched++;
        }
        _model.Wait(_done[_read % Depth]);
        int position = _start + _read;
        int token = ProducedAt(position);
        _read++;
        _cache.Length = position + 1;
        if (token < 0)
            throw new DispNativeException($"the model's logits at position {position} are not finite; its activations overflow " +
                                          "(on CUDA in f16, bf16 has the range f16 lacks)");
        return token;
    }

    private unsafe int ProducedAt(int position) => Volatile.Read(ref ((int*)_cache.GreedyGraph!.Produced!.Pointer)[position]);

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        try
        {
            // The steps queued ahead (or, with none launched, the first token's upload from pinned staging) before the
            // cache and the staging are reused.
            _model.Wait(_done[(_launched + Depth - 1) % Depth]);
        }
        catch (ObjectDisposedException) { /* the device is gone, and with it the steps */ }
        finally
        {
            foreach (var e in _done) e.Dispose();
            _cache.Decoder = null;
        }
    }
}
