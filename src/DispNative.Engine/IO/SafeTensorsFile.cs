using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Numerics;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;

namespace DispNative.Engine.IO;

/// <summary>Header entry of one tensor: dtype, shape and byte range inside the data section.</summary>
public sealed record TensorInfo(string Name, DType DType, long[] Shape, long Begin, long End)
{
    public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);
    public long ByteLength => End - Begin;
    public string ShapeText => "[" + string.Join(", ", Shape) + "]";
}

/// <summary>A memory-mapped safetensors file. The header is parsed and validated on open
/// (dtype, shape, offsets inside the file, no overlaps); tensor data is read lazily.</summary>
public sealed unsafe class SafeTensorsFile : IDisposable
{
    private const long MaxHeaderBytes = 100L << 20;
    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly byte* _base;
    private readonly long _dataStart;
    private readonly Dictionary<string, TensorInfo> _tensors;
    private bool _disposed;

    public string Path { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }
    public IReadOnlyCollection<TensorInfo> Tensors => _tensors.Values;

    private SafeTensorsFile(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, byte* basePtr,
        long dataStart, Dictionary<string, TensorInfo> tensors, Dictionary<string, string> metadata)
    {
        Path = path; _map = map; _view = view; _base = basePtr; _dataStart = dataStart; _tensors = tensors; Metadata = metadata;
    }

    public static SafeTensorsFile Open(string path)
    {
        if (!File.Exists(path)) throw new ModelFormatException($"safetensors file not found: {path}");
        long length = new FileInfo(path).Length;
        if (length < 8) throw new ModelFormatException($"{path}: truncated safetensors file ({length} bytes, the 8-byte header length is missing)");
        Span<byte> lenBytes = stackalloc byte[8];
        using (var fs = File.OpenRead(path)) fs.ReadExactly(lenBytes);
        ulong headerLen = BinaryPrimitives.ReadUInt64LittleEndian(lenBytes);
        if (headerLen == 0 || headerLen > MaxHeaderBytes || (long)headerLen > length - 8)
            throw new ModelFormatException($"{path}: corrupt safetensors header length {headerLen} (file has {length} bytes)");

        var map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        MemoryMappedViewAccessor? view = null;
        try
        {
            view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            byte* ptr = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref ptr);
            ptr += view.PointerOffset;
            long dataStart = 8 + (long)headerLen;
            var headerSpan = new ReadOnlySpan<byte>(ptr + 8, (int)headerLen);
            var (tensors, metadata) = ParseHeader(path, headerSpan, length - dataStart);
            return new SafeTensorsFile(path, map, view, ptr, dataStart, tensors, metadata);
        }
        catch
        {
            if (view != null) { view.SafeMemoryMappedViewHandle.ReleasePointer(); view.Dispose(); }
            map.Dispose();
            throw;
        }
    }

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    private static (Dictionary<string, TensorInfo>, Dictionary<string, string>) ParseHeader(string path, ReadOnlySpan<byte> header, long dataLength)
    {
        // System.Text.Json parses bytes that are not UTF-8 inside strings and fails only when such a string is read.
        try { StrictUtf8.GetCharCount(header); }
        catch (DecoderFallbackException e)
        {
            throw new ModelFormatException($"{path}: corrupt safetensors header (not valid UTF-8 at byte {e.Index} of the header)");
        }
        JsonDocument doc;
        try { doc = JsonDocument.Parse(header.ToArray(), JsonFields.Strict); }
        catch (JsonException e) { throw new ModelFormatException($"{path}: corrupt safetensors header (not valid JSON: {e.Message})"); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new ModelFormatException($"{path}: corrupt safetensors header (not a JSON object)");
            var tensors = new Dictionary<string, TensorInfo>(StringComparer.Ordinal);
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (var prop in doc.RootElement.EnumerateObject())
            {
                if (prop.Name == "__metadata__")
                {
                    if (prop.Value.ValueKind == JsonValueKind.Object)
                        foreach (var m in prop.Value.EnumerateObject())
                            metadata[m.Name] = m.Value.ValueKind == JsonValueKind.String ? m.Value.GetString()! : m.Value.GetRawText();
                    continue;
                }
                tensors[prop.Name] = ParseEntry(path, prop.Name, prop.Value, dataLength);
            }
            // Byte ranges must not overlap.
            TensorInfo? prev = null;
            foreach (var t in tensors.Values.Where(t => t.ByteLength > 0).OrderBy(t => t.Begin))
            {
                if (prev != null && t.Begin < prev.End)
                    throw new ModelFormatException($"{path}: tensor '{t.Name}' overlaps tensor '{prev.Name}' in the data section");
                prev = t;
            }
            return (tensors, metadata);
        }
    }

    private static TensorInfo ParseEntry(string path, string name, JsonElement e, long dataLength)
    {
        string where = $"{path}: tensor '{name}'";
        if (e.ValueKind != JsonValueKind.Object) throw new ModelFormatException($"{where}: header entry is not an object");
        if (!e.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String)
            throw new ModelFormatException($"{where}: missing dtype");
        if (!DTypes.TryParse(dt.GetString()!, out var dtype))
            throw new ModelFormatException($"{where}: unsupported dtype {dt.GetString()} (supported: F32, F16, BF16, I32, I64)");
        if (!e.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array)
            throw new ModelFormatException($"{where}: missing shape");
        var shape = new long[sh.GetArrayLength()];
        int i = 0;
        long count = 1;
        foreach (var d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long v) || v < 0)
                throw new ModelFormatException($"{where}: invalid shape {sh.GetRawText()}");
            if (v != 0 && count > long.MaxValue / 8 / v)   // 8: the widest dtype, so the byte count below fits too
                throw new ModelFormatException($"{where}: shape {sh.GetRawText()} is too large");
            shape[i++] = v;
            count *= v;
        }
        if (!e.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
            throw new ModelFormatException($"{where}: missing data_offsets");
        static long Offset(JsonElement o) => o.ValueKind == JsonValueKind.Number && o.TryGetInt64(out long v) ? v : -1;   // TryGetInt64 throws on a non-number
        long begin = Offset(off[0]), end = Offset(off[1]);
        if (begin < 0 || end < begin)
            throw new ModelFormatException($"{where}: invalid data_offsets [{off[0]}, {off[1]}]");
        if (end > dataLength)
            throw new ModelFormatException($"{where}: data_offsets end {end} is past the end of the file's data section ({dataLength} bytes): the file is truncated or corrupt");
        if (end - begin != count * dtype.Size())
            throw new ModelFormatException($"{where}: {end - begin} bytes do not match dtype {dtype} and shape {sh.GetRawText()} ({count * dtype.Size()} bytes)");
        return new TensorInfo(name, dtype, shape, begin, end);
    }

    public bool Contains(string name) => _tensors.ContainsKey(name);

    public TensorInfo Info(string name)
    {
        ThrowIfDisposed();
        return _tensors.TryGetValue(name, out var t) ? t : throw new ModelFormatException($"{Path}: tensor '{name}' not found");
    }

    /// <summary>The raw little-endian bytes of a tensor (valid while this file is open).</summary>
    public ReadOnlySpan<byte> Bytes(string name)
    {
        var t = Info(name);
        if (t.ByteLength > int.MaxValue) throw new ModelFormatException($"{Path}: tensor '{name}' is larger than 2 GiB; read it with ReadFloat32");
        return new ReadOnlySpan<byte>(_base + _dataStart + t.Begin, (int)t.ByteLength);
    }

    /// <summary>Reads a float tensor (F32/F16/BF16) converted to fp32.</summary>
    public float[] ReadFloat32(string name)
    {
        var t = Info(name);
        if (!t.DType.IsFloat()) throw new ModelFormatException($"{Path}: tensor '{name}' has dtype {t.DType}, expected a float type");
        if (t.ElementCount > Array.MaxLength) throw new ModelFormatException($"{Path}: tensor '{name}' has too many elements ({t.ElementCount})");
        var result = new float[t.ElementCount];
        int size = t.DType.Size();
        const int chunk = 1 << 16;   // 256 KiB of fp32: still in cache when it is checked
        for (long start = 0; start < result.Length; start += chunk)
        {
            int n = (int)Math.Min(chunk, result.Length - start);
            var src = new ReadOnlySpan<byte>(_base + _dataStart + t.Begin + start * size, n * size);
            var dst = result.AsSpan((int)start, n);
            DTypes.ToFloat32(t.DType, src, dst);
            if (DTypes.FirstNonFinite(dst) is int bad and >= 0)
                throw new ModelFormatException($"{Path}: tensor '{name}' element {start + bad} is {dst[bad]}: weights must be finite (the file is corrupt)");
        }
        return result;
    }

    /// <summary>Reads an integer tensor (I32, or I64 values that fit in 32 bits).</summary>
    public int[] ReadInt32(string name)
    {
        var t = Info(name);
        var bytes = Bytes(name);
        var result = new int[t.ElementCount];
        switch (t.DType)
        {
            case DType.I32:
                for (int i = 0; i < result.Length; i++) result[i] = BinaryPrimitives.ReadInt32LittleEndian(bytes.Slice(4 * i));
                break;
            case DType.I64:
                for (int i = 0; i < result.Length; i++)
                {
                    long v = BinaryPrimitives.ReadInt64LittleEndian(bytes.Slice(8 * i));
                    if (v < int.MinValue || v > int.MaxValue) throw new ModelFormatException($"{Path}: tensor '{name}' element {i} = {v} does not fit in 32 bits");
                    result[i] = (int)v;
                }
                break;
            default:
                throw new ModelFormatException($"{Path}: tensor '{name}' has dtype {t.DType}, expected I32 or I64");
        }
        return result;
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _map.Dispose();
    }
}
