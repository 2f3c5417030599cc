using System.Text.Json;

namespace DispNative.Engine.IO;

/// <summary>All tensors of a checkpoint: one safetensors file, or the shards listed by
/// <c>model.safetensors.index.json</c>. Every tensor named by the index must be in its shard.</summary>
public sealed class SafeTensorsCheckpoint : IDisposable
{
    public const string IndexFileName = "model.safetensors.index.json";
    private readonly List<SafeTensorsFile> _files;
    private readonly Dictionary<string, SafeTensorsFile> _owner;

    public string Source { get; }
    public IReadOnlyCollection<string> Names => _owner.Keys;
    public IReadOnlyList<SafeTensorsFile> Files => _files;

    private SafeTensorsCheckpoint(string source, List<SafeTensorsFile> files, Dictionary<string, SafeTensorsFile> owner)
    {
        Source = source; _files = files; _owner = owner;
    }

    /// <summary>Opens a directory (index + shards, or <c>model.safetensors</c>) or a single file.</summary>
    public static SafeTensorsCheckpoint Open(string path)
    {
        if (File.Exists(path)) return FromFiles(path, [path], null);
        if (!Directory.Exists(path)) throw new ModelFormatException($"checkpoint not found: {path}");
        string index = System.IO.Path.Combine(path, IndexFileName);
        if (File.Exists(index)) return OpenSharded(path, index);
        string single = System.IO.Path.Combine(path, "model.safetensors");
        if (File.Exists(single)) return FromFiles(path, [single], null);
        throw new ModelFormatException($"{path}: no {IndexFileName} or model.safetensors found");
    }

    private static SafeTensorsCheckpoint OpenSharded(string dir, string index)
    {
        var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(index), JsonFields.Strict);
            if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("weight_map", out var wm) || wm.ValueKind != JsonValueKind.Object)
                throw new ModelFormatException($"{index}: missing weight_map");
            foreach (var p in wm.EnumerateObject())
            {
                if (p.Value.ValueKind != JsonValueKind.String) throw new ModelFormatException($"{index}: weight_map entry '{p.Name}' is not a file name");
                weightMap[p.Name] = p.Value.GetString()!;
            }
        }
        catch (JsonException e) { throw new ModelFormatException($"{index}: not valid JSON ({e.Message})"); }
        var shardNames = weightMap.Values.Distinct().OrderBy(s => s, StringComparer.Ordinal).ToList();
        foreach (var s in shardNames)
            if (s.Contains('/') || s.Contains('\\') || s.Contains(".."))
                throw new ModelFormatException($"{index}: shard name '{s}' must be a plain file name");
        return FromFiles(dir, shardNames.Select(s => System.IO.Path.Combine(dir, s)).ToList(), weightMap);
    }

    private static SafeTensorsCheckpoint FromFiles(string source, IReadOnlyList<string> paths, Dictionary<string, string>? weightMap)
    {
        var files = new List<SafeTensorsFile>();
        try
        {
            foreach (var p in paths) files.Add(SafeTensorsFile.Open(p));
            var owner = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
            if (weightMap != null)
            {
                var byName = files.ToDictionary(f => System.IO.Path.GetFileName(f.Path));
                foreach (var (tensor, shard) in weightMap)
                {
                    var f = byName[shard];
                    if (!f.Contains(tensor))
                        throw new ModelFormatException($"{f.Path}: tensor '{tensor}' listed in {IndexFileName} is not in this shard");
                    owner[tensor] = f;
                }
            }
            else
            {
                foreach (var f in files)
                    foreach (var t in f.Tensors)
                        if (!owner.TryAdd(t.Name, f)) throw new ModelFormatException($"{f.Path}: duplicate tensor '{t.Name}'");
            }
            return new SafeTensorsCheckpoint(source, files, owner);
        }
        catch
        {
            foreach (var f in files) f.Dispose();
            throw;
        }
    }

    public bool Contains(string name) => _owner.ContainsKey(name);

    public TensorInfo Info(string name) => FileOf(name).Info(name);

    public SafeTensorsFile FileOf(string name) =>
        _owner.TryGetValue(name, out var f) ? f : throw new ModelFormatException($"{Source}: tensor '{name}' not found in the checkpoint");

    /// <summary>Reads a float tensor as fp32, checking its shape.</summary>
    public float[] ReadFloat32(string name, params long[] expectedShape)
    {
        var f = FileOf(name);
        var info = f.Info(name);
        if (expectedShape.Length > 0 && !info.Shape.SequenceEqual(expectedShape))
            throw new ModelFormatException($"{f.Path}: tensor '{name}' has shape {info.ShapeText}, expected [{string.Join(", ", expectedShape)}]");
        return f.ReadFloat32(name);
    }

    public int[] ReadInt32(string name) => FileOf(name).ReadInt32(name);

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
    }
}
