using System.Buffers.Binary;
using System.Text;
using DispNative.Engine;
using DispNative.Engine.IO;
using DispNative.Engine.Models;

namespace DispNative.Tests;

public class SafeTensorsTests
{
    private static float[] Values(int n, int seed)
    {
        var r = new Rng((ulong)seed);
        return Enumerable.Range(0, n).Select(_ => r.NextGaussian() * 3).ToArray();
    }

    [Test]
    public void WriteThenRead_IsBitExact_ForEveryDType()
    {
        var dir = TestAssets.TempDir();
        var f = Values(30, 1);
        var tensors = new List<TensorData>
        {
            TensorData.FromFloat("a.f32", f, [5, 6], DType.F32),
            TensorData.FromFloat("a.f16", f, [30], DType.F16),
            TensorData.FromFloat("a.bf16", f, [2, 3, 5], DType.BF16),
            TensorData.FromInt32("idx.i32", [0, 3, 7, int.MaxValue], [4]),
            new("idx.i64", DType.I64, [3], Enumerable.Range(0, 3).SelectMany(i => BitConverter.GetBytes((long)(i * 1000 - 5))).ToArray()),
            TensorData.FromFloat("empty", [], [0, 4], DType.F32),
        };
        string path = Path.Combine(dir, "t.safetensors");
        SafeTensorsWriter.Write(path, tensors, new Dictionary<string, string> { ["format"] = "pt" });

        using var file = SafeTensorsFile.Open(path);
        Assert.That(file.Metadata["format"], Is.EqualTo("pt"));
        foreach (var t in tensors)
        {
            var info = file.Info(t.Name);
            Assert.That(info.DType, Is.EqualTo(t.DType), t.Name);
            Assert.That(info.Shape, Is.EqualTo(t.Shape), t.Name);
            Assert.That(file.Bytes(t.Name).ToArray(), Is.EqualTo(t.Data), t.Name);
        }
        Assert.That(file.ReadFloat32("a.f32"), Is.EqualTo(f));
        Assert.That(file.ReadFloat32("a.f16"), Is.EqualTo(f.Select(v => (float)(Half)v).ToArray()));
        Assert.That(file.ReadFloat32("a.bf16"), Is.EqualTo(f.Select(v => DTypes.BF16ToFloat(DTypes.FloatToBF16(v))).ToArray()));
        Assert.That(file.ReadInt32("idx.i32"), Is.EqualTo(new[] { 0, 3, 7, int.MaxValue }));
        Assert.That(file.ReadInt32("idx.i64"), Is.EqualTo(new[] { -5, 995, 1995 }));
        // Header is 8-byte aligned and the data section starts right after it.
        var raw = File.ReadAllBytes(path);
        Assert.That(BinaryPrimitives.ReadUInt64LittleEndian(raw) % 8, Is.EqualTo(0UL));
    }

    [Test]
    public void BF16_RoundsToNearestEven()
    {
        Assert.That(DTypes.FloatToBF16(1.0f), Is.EqualTo((ushort)0x3F80));
        // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties go to the even mantissa (1.0).
        Assert.That(DTypes.FloatToBF16(1.00390625f), Is.EqualTo((ushort)0x3F80));
        // 1 + 3·2^-8 is halfway between 1.0078125 (odd) and 1.015625 (even): rounds up to even.
        Assert.That(DTypes.FloatToBF16(1.01171875f), Is.EqualTo((ushort)0x3F82));
        Assert.That(float.IsNaN(DTypes.BF16ToFloat(DTypes.FloatToBF16(float.NaN))));
        // NaNs whose payload is in the low bits only: rounding would carry them into infinity or wrap them to zero.
        foreach (uint bits in new uint[] { 0x7F800001, 0xFFFFFFFF, 0x7FC00000 })
            Assert.That(float.IsNaN(DTypes.BF16ToFloat(DTypes.FloatToBF16(BitConverter.UInt32BitsToSingle(bits)))), $"0x{bits:X8}");
        Assert.That(DTypes.FloatToBF16(float.MaxValue), Is.EqualTo((ushort)0x7F80), "the largest float rounds to infinity");
        Assert.That(DTypes.BF16ToFloat(DTypes.FloatToBF16(-2.5f)), Is.EqualTo(-2.5f));
    }

    /// <summary>A finite weight beyond the storage type's range would be saved as an infinity, which no load accepts: the
    /// write refuses it, naming the tensor and the element. The largest finite values, and an infinity given, pass.</summary>
    [Test]
    public void AFiniteValueBeyondTheStorageTypesRange_IsRefused()
    {
        Assert.That(Assert.Throws<InvalidSettingException>(() => TensorData.FromFloat("w", [1f, -65520f], [2], DType.F16))!.Message,
            Is.EqualTo("tensor 'w': element 1 = -65520 does not fit in F16 (it would be stored as infinity); store it as bf16 or f32"));
        Assert.That(Assert.Throws<InvalidSettingException>(() => TensorData.FromFloat("w", [float.MaxValue], [1], DType.BF16))!.Message,
            Is.EqualTo($"tensor 'w': element 0 = {float.MaxValue} does not fit in BF16 (it would be stored as infinity); store it as f32"));
        Assert.That(TensorData.FromFloat("w", [65504f, -65504f, 65519f, float.PositiveInfinity], [4], DType.F16).Data.Length, Is.EqualTo(8), "65519 rounds down to 65504");
        Assert.That(TensorData.FromFloat("w", [3.3895e38f, float.NegativeInfinity], [2], DType.BF16).Data.Length, Is.EqualTo(4));
        // The exact thresholds (halfway above the largest finite value rounds up), and a NaN before an overflow.
        Assert.That(DTypes.FirstOverflow(DType.F16, [MathF.BitDecrement(65520f), -MathF.BitDecrement(65520f), float.NaN]), Is.EqualTo(-1));
        Assert.That(DTypes.FirstOverflow(DType.F16, [float.NaN, 1f, 65520f]), Is.EqualTo(2));
        Assert.That(DTypes.FirstOverflow(DType.BF16, [BitConverter.UInt32BitsToSingle(0xFF7F7FFF), float.NaN]), Is.EqualTo(-1));
        Assert.That(DTypes.FirstOverflow(DType.BF16, [float.NaN, 0f, -BitConverter.UInt32BitsToSingle(0x7F7F8000)]), Is.EqualTo(2));
        Assert.That(DTypes.FirstOverflow(DType.F32, [float.MaxValue, float.NaN]), Is.EqualTo(-1));

        // Saving a pruned model in f16 stops at the tensor, leaving no half-written model.
        var c = TestAssets.TinyConfig(vocab: 30);
        var w = ModelWeights.Random(c, 1);
        w.Layers[1].WDown[7] = 1e5f;
        var layout = new Engine.Disp.SiteLayout(c, Engine.Disp.PruningMode.Disp);
        var plan = Engine.Disp.PruningPlan.FromMasks(layout, layout.OutputWidths.Select(n => Enumerable.Repeat(true, n).ToArray()).ToList());
        string root = TestAssets.TempDir(), dir = Path.Combine(root, "pruned");
        var (pc, pw) = Engine.Disp.Pruner.Apply(c, w, plan, "disp", 0.5, null);   // keeps every channel: element 7 stays in place
        var e = Assert.Throws<InvalidSettingException>(() => Engine.Disp.Pruner.Save(dir, pc, pw, DType.F16, []));
        Assert.That(e!.Message, Does.StartWith("tensor 'model.layers.1.mlp.down_proj.weight': element 7 = 100000 does not fit in F16"));
        Assert.That(Directory.EnumerateFileSystemEntries(root), Is.Empty);
    }

    [Test]
    public void ShardedCheckpoint_RoundTrips_ThroughIndex()
    {
        var dir = TestAssets.TempDir();
        var tensors = Enumerable.Range(0, 7).Select(i => TensorData.FromFloat($"w{i}", Values(100 + i, i), [100 + i], DType.BF16)).ToList();
        var files = SafeTensorsWriter.WriteSharded(dir, tensors, maxShardBytes: 450);
        Assert.That(files.Count, Is.GreaterThan(1));
        Assert.That(File.Exists(Path.Combine(dir, SafeTensorsCheckpoint.IndexFileName)));
        using var ckpt = SafeTensorsCheckpoint.Open(dir);
        Assert.That(ckpt.Names, Is.EquivalentTo(tensors.Select(t => t.Name)));
        foreach (var t in tensors) Assert.That(ckpt.FileOf(t.Name).Bytes(t.Name).ToArray(), Is.EqualTo(t.Data));
    }

    [Test]
    public void AnI64IndexBeyond32Bits_IsRejected_AndOtherDTypesAreNotIndices()
    {
        var path = Path.Combine(TestAssets.TempDir(), "i.safetensors");
        SafeTensorsWriter.Write(path, [new TensorData("idx", DType.I64, [2], [.. BitConverter.GetBytes(7L), .. BitConverter.GetBytes(1L << 32)]),
            TensorData.FromFloat("w", [1f], [1])]);
        using var file = SafeTensorsFile.Open(path);
        Assert.That(Assert.Throws<ModelFormatException>(() => file.ReadInt32("idx"))!.Message,
            Is.EqualTo($"{path}: tensor 'idx' element 1 = 4294967296 does not fit in 32 bits"));
        Assert.That(Assert.Throws<ModelFormatException>(() => file.ReadInt32("w"))!.Message, Does.EndWith("has dtype F32, expected I32 or I64"));
        Assert.That(Assert.Throws<ModelFormatException>(() => file.ReadFloat32("idx"))!.Message, Does.EndWith("has dtype I64, expected a float type"));
    }

    [Test]
    public void Writing_TwoTensorsOfOneName_IsRefused_AndLeavesNoFile()
    {
        var path = Path.Combine(TestAssets.TempDir(), "d.safetensors");
        var e = Assert.Throws<ArgumentException>(() => SafeTensorsWriter.Write(path, [TensorData.FromFloat("w", [1f], [1]), TensorData.FromFloat("w", [2f], [1])]));
        Assert.That(e!.Message, Is.EqualTo("duplicate tensor name 'w'"));
        Assert.That(Directory.GetFiles(Path.GetDirectoryName(path)!), Is.Empty);
    }

    [Test]
    public void MissingFile_IsNamed()
    {
        var e = Assert.Throws<ModelFormatException>(() => SafeTensorsFile.Open("/no/such/model.safetensors"));
        Assert.That(e!.Message, Does.Contain("/no/such/model.safetensors"));
        Assert.Throws<ModelFormatException>(() => SafeTensorsCheckpoint.Open("/no/such/dir"));
    }

    private static string WriteOne(out byte[] bytes)
    {
        var path = Path.Combine(TestAssets.TempDir(), "m.safetensors");
        SafeTensorsWriter.Write(path, [TensorData.FromFloat("layer.weight", Values(64, 3), [8, 8])]);
        bytes = File.ReadAllBytes(path);
        return path;
    }

    [Test]
    public void TruncatedFile_NamesFileAndTensor()
    {
        var path = WriteOne(out var bytes);
        File.WriteAllBytes(path, bytes[..^10]);
        var e = Assert.Throws<ModelFormatException>(() => SafeTensorsFile.Open(path));
        Assert.That(e!.Message, Does.Contain(path).And.Contain("layer.weight").And.Contain("truncated"));

        File.WriteAllBytes(path, bytes[..5]);
        Assert.That(Assert.Throws<ModelFormatException>(() => SafeTensorsFile.Open(path))!.Message, Does.Contain("truncated"));
    }

    [TestCase(3, float.NaN, DType.F32)]
    [TestCase(36, float.PositiveInfinity, DType.F32)]
    [TestCase(17, float.NegativeInfinity, DType.BF16)]
    [TestCase(20, float.NaN, DType.F16)]
    public void ANonFiniteWeight_IsRejectedWithItsPlace(int index, float value, DType dtype)
    {
        var values = Enumerable.Range(0, 37).Select(i => i * 0.25f - 3f).ToArray();
        var path = Path.Combine(TestAssets.TempDir(), "w.safetensors");
        SafeTensorsWriter.Write(path, [TensorData.FromFloat("w", values, [37], dtype)]);
        using (var ok = SafeTensorsFile.Open(path)) Assert.That(ok.ReadFloat32("w"), Is.EqualTo(values));
        values[index] = value;
        SafeTensorsWriter.Write(path, [TensorData.FromFloat("w", values, [37], dtype)]);
        using var file = SafeTensorsFile.Open(path);
        Assert.That(Assert.Throws<ModelFormatException>(() => file.ReadFloat32("w"))!.Message,
            Is.EqualTo($"{path}: tensor 'w' element {index} is {value}: weights must be finite (the file is corrupt)"));
    }

    [Test]
    public void CorruptHeaders_AreRejectedWithTheReason()
    {
        var path = WriteOne(out var bytes);
        // Header length larger than the file.
        var big = (byte[])bytes.Clone();
        BinaryPrimitives.WriteUInt64LittleEndian(big, 1UL << 40);
        File.WriteAllBytes(path, big);
        Assert.That(Assert.Throws<ModelFormatException>(() => SafeTensorsFile.Open(path))!.Message, Does.Contain("header length"));

        void WithHeader(string json, string expected) => WithHeaderBytes(Encoding.UTF8.GetBytes(json), expected);
        void WithHeaderBytes(byte[] h, string expected)
        {
            var file = new byte[8 + h.Length + 256];
            BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)h.Length);
            h.CopyTo(file, 8);
            File.WriteAllBytes(path, file);
            var e = Assert.Throws<ModelFormatException>(() => SafeTensorsFile.Open(path));
            Assert.That(e!.Message, Does.Contain(expected), Encoding.UTF8.GetString(h));
        }
        WithHeader("{not json", "not valid JSON");
        WithHeader("""{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""", "Duplicate property 'w'");
        WithHeaderBytes([.. "{\"w"u8, 0xD6, .. "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}"u8], "not valid UTF-8 at byte 3 of the header");
        WithHeader("""{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}""", "unsupported dtype Q4");
        WithHeader("""{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}""", "do not match dtype F32");
        WithHeader("""{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}""", "8 bytes do not match dtype F32 and shape [1] (4 bytes)");
        WithHeader("""{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}""", "invalid shape");
        WithHeader("""{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}""", "invalid data_offsets");
        WithHeader("""{"w":{"dtype":"F32","shape":[2],"data_offsets":["0",8]}}""", "invalid data_offsets [0, 8]");
        WithHeader("""{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,null]}}""", "invalid data_offsets");
        WithHeader("""{"w":{"dtype":"F32","shape":[10000000000,10000000000],"data_offsets":[0,8]}}""", "shape [10000000000,10000000000] is too large");
        WithHeader("""{"w":{"dtype":"F32","shape":[4611686018427387904,1],"data_offsets":[0,8]}}""", "is too large");
        WithHeader("""{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", "overlaps");
        WithHeader("""{"w":{"dtype":"F32","shape":[100],"data_offsets":[0,400]}}""", "past the end");
    }

    [Test]
    public void WrongShapeInAShard_NamesTensorAndExpectedShape()
    {
        var dir = TestAssets.WriteTinyModel();
        var config = TestAssets.TinyConfig();
        // Rewrite with one tensor transposed-shaped.
        var weights = ModelWeights.Random(config, 2);
        var tensors = weights.ToTensors(config, DType.F32).Select(t => t.Name == "model.layers.1.mlp.down_proj.weight"
            ? t with { Shape = [config.IntermediateSize, config.HiddenSize] } : t).ToList();
        foreach (var f in Directory.GetFiles(dir, "*.safetensors*")) File.Delete(f);
        SafeTensorsWriter.WriteSharded(dir, tensors, 40_000);
        var e = Assert.Throws<ModelFormatException>(() => ModelLoader.Load(dir));
        Assert.That(e!.Message, Does.Contain("model.layers.1.mlp.down_proj.weight").And.Contain("[80, 48]").And.Contain("expected [48, 80]"));
    }

    [Test]
    public void IndexPointingToWrongShard_IsReported()
    {
        var dir = TestAssets.TempDir();
        SafeTensorsWriter.WriteSharded(dir, [TensorData.FromFloat("a", [1, 2], [2]), TensorData.FromFloat("b", [3, 4], [2])], 8);
        var index = Path.Combine(dir, SafeTensorsCheckpoint.IndexFileName);
        File.WriteAllText(index, File.ReadAllText(index).Replace("\"b\": \"model-00002-of-00002", "\"b\": \"model-00001-of-00002"));
        var e = Assert.Throws<ModelFormatException>(() => SafeTensorsCheckpoint.Open(dir));
        Assert.That(e!.Message, Does.Contain("'b'").And.Contain("not in this shard"));
    }
}
