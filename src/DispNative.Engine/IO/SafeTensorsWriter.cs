using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace DispNative.Engine.IO;

/// <summary>One tensor to write: raw little-endian bytes of the given dtype and shape.</summary>
public sealed record TensorData(string Name, DType DType, long[] Shape, byte[] Data)
{
    public static TensorData FromFloat(string name, float[] values, long[] shape, DType dtype = DType.F32)
        => Check(new TensorData(name, dtype, shape, DTypes.FromFloat32(dtype, values, $"tensor '{name}'")));

    public static TensorData FromInt32(string name, int[] values, long[] shape) => Check(new TensorData(name, DType.I32, shape, Int32Bytes(values)));

    internal static byte[] Int32Bytes(int[] values)
    {
        var bytes = new byte[values.Length * 4];
        for (int i = 0; i < values.Length; i++) BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(4 * i), values[i]);
        return bytes;
    }

    /// <summary>This tensor for a writer that takes <see cref="PendingTensor"/>s.</summary>
    public PendingTensor Pending => new(Name, DType, Shape, () => Data);

    internal static TensorData Check(TensorData t)
    {
        long count = t.Shape.Aggregate(1L, (a, b) => a * b);
        if (count * t.DType.Size() != t.Data.Length)
            throw new ArgumentException($"tensor '{t.Name}': {t.Data.Length} bytes do not match shape [{string.Join(", ", t.Shape)}] of {t.DType}");
        return t;
    }
}

/// <summary>A tensor to write whose bytes are made only when the writer comes to it, so that a model written tensor by
/// tensor is never whole in memory.</summary>
public sealed record PendingTensor(string Name, DType DType, long[] Shape, Func<byte[]> Bytes)
{
    public long ByteCount => Shape.Aggregate(1L, (a, b) => a * b) * DType.Size();

    /// <summary>Makes the bytes, checked against the shape.</summary>
    public TensorData Produce() => TensorData.Check(new TensorData(Name, DType, Shape, Bytes()));

    public static PendingTensor FromFloat(string name, Func<float[]> values, long[] shape, DType dtype)
        => new(name, dtype, shape, () => DTypes.FromFloat32(dtype, values(), $"tensor '{name}'"));

    public static PendingTensor FromInt32(string name, Func<int[]> values, long[] shape)
        => new(name, DType.I32, shape, () => TensorData.Int32Bytes(values()));
}

/// <summary>Writes safetensors files, single or sharded with a <c>model.safetensors.index.json</c>.
/// Files are written to a temporary name and moved into place, so a failure never leaves a half file.</summary>
public static class SafeTensorsWriter
{
    public static void Write(string path, IReadOnlyList<TensorData> tensors, IReadOnlyDictionary<string, string>? metadata = null)
        => Write(path, tensors.Select(t => t.Pending).ToList(), metadata);

    /// <summary>Writes <paramref name="tensors"/>, making each one's bytes in turn as it is written.</summary>
    public static void Write(string path, IReadOnlyList<PendingTensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var header = new JsonObject();
        if (metadata is { Count: > 0 })
        {
            var meta = new JsonObject();
            foreach (var (k, v) in metadata) meta[k] = v;
            header["__metadata__"] = meta;
        }
        long offset = 0;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var t in tensors)
        {
            if (!seen.Add(t.Name)) throw new ArgumentException($"duplicate tensor name '{t.Name}'");
            header[t.Name] = new JsonObject
            {
                ["dtype"] = t.DType.Name(),
                ["shape"] = new JsonArray(t.Shape.Select(s => (JsonNode)JsonValue.Create(s)).ToArray()),
                ["data_offsets"] = new JsonArray(JsonValue.Create(offset), JsonValue.Create(offset + t.ByteCount)),
            };
            offset += t.ByteCount;
        }
        var headerBytes = Encoding.UTF8.GetBytes(header.ToJsonString());
        int padded = (headerBytes.Length + 7) / 8 * 8;

        string tmp = path + ".tmp-" + Environment.ProcessId;
        try
        {
            using (var fs = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> len = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)padded);
                fs.Write(len);
                fs.Write(headerBytes);
                for (int i = headerBytes.Length; i < padded; i++) fs.WriteByte((byte)' ');
                foreach (var t in tensors) fs.Write(t.Produce().Data);
            }
            File.Move(tmp, path, overwrite: true);
        }
        finally
        {
            if (File.Exists(tmp)) File.Delete(tmp);
        }
    }

    /// <summary>Writes <paramref name="tensors"/> into <c>dir</c> as shards of at most
    /// <paramref name="maxShardBytes"/> (a tensor larger than that gets a shard of its own) plus the index.
    /// A single shard is written as <c>model.safetensors</c> without an index.</summary>
    public static IReadOnlyList<string> WriteSharded(string dir, IReadOnlyList<TensorData> tensors, long maxShardBytes,
        IReadOnlyDictionary<string, string>? metadata = null)
        => WriteSharded(dir, tensors.Select(t => t.Pending).ToList(), maxShardBytes, metadata);

    /// <summary><see cref="WriteSharded(string, IReadOnlyList{TensorData}, long, IReadOnlyDictionary{string, string}?)"/>,
    /// making each tensor's bytes in turn as it is written.</summary>
    public static IReadOnlyList<string> WriteSharded(string dir, IReadOnlyList<PendingTensor> tensors, long maxShardBytes,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        Directory.CreateDirectory(dir);
        var shards = new List<List<PendingTensor>> { new() };
        long current = 0;
        foreach (var t in tensors)
        {
            if (current > 0 && current + t.ByteCount > maxShardBytes) { shards.Add(new()); current = 0; }
            shards[^1].Add(t);
            current += t.ByteCount;
        }
        if (shards.Count == 1)
        {
            string single = Path.Combine(dir, "model.safetensors");
            Write(single, tensors, metadata);
            return [single];
        }
        var files = new List<string>();
        var weightMap = new JsonObject();
        for (int i = 0; i < shards.Count; i++)
        {
            string name = $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
            Write(Path.Combine(dir, name), shards[i], metadata);
            foreach (var t in shards[i]) weightMap[t.Name] = name;
            files.Add(Path.Combine(dir, name));
        }
        var index = new JsonObject
        {
            ["metadata"] = new JsonObject { ["total_size"] = tensors.Sum(t => t.ByteCount) },
            ["weight_map"] = weightMap,
        };
        File.WriteAllText(Path.Combine(dir, SafeTensorsCheckpoint.IndexFileName),
            index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        return files;
    }
}
