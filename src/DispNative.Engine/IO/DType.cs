using System.Buffers.Binary;
using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace DispNative.Engine.IO;

/// <summary>Element types the engine reads and writes in safetensors files.</summary>
public enum DType { F32, F16, BF16, I32, I64 }

public static class DTypes
{
    public static int Size(this DType t) => t switch
    {
        DType.F32 or DType.I32 => 4,
        DType.F16 or DType.BF16 => 2,
        DType.I64 => 8,
        _ => throw new ArgumentOutOfRangeException(nameof(t)),
    };

    public static string Name(this DType t) => t.ToString();

    public static bool TryParse(string name, out DType t)
    {
        switch (name)
        {
            case "F32": t = DType.F32; return true;
            case "F16": t = DType.F16; return true;
            case "BF16": t = DType.BF16; return true;
            case "I32": t = DType.I32; return true;
            case "I64": t = DType.I64; return true;
            default: t = default; return false;
        }
    }

    public static bool IsFloat(this DType t) => t is DType.F32 or DType.F16 or DType.BF16;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float BF16ToFloat(ushort bits) => BitConverter.Int32BitsToSingle(bits << 16);

    /// <summary>fp32 → bf16 with round-to-nearest-even; NaN stays NaN.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ushort FloatToBF16(float value)
    {
        uint u = BitConverter.SingleToUInt32Bits(value);
        if ((u & 0x7FFFFFFF) > 0x7F800000) return (ushort)((u >> 16) | 0x40);
        u += 0x7FFF + ((u >> 16) & 1);
        return (ushort)(u >> 16);
    }

    /// <summary>Decodes little-endian elements of a float type into fp32.</summary>
    public static void ToFloat32(DType t, ReadOnlySpan<byte> src, Span<float> dst)
    {
        switch (t)
        {
            case DType.F32:
                for (int i = 0; i < dst.Length; i++) dst[i] = BinaryPrimitives.ReadSingleLittleEndian(src.Slice(4 * i));
                break;
            case DType.BF16:
                for (int i = 0; i < dst.Length; i++) dst[i] = BF16ToFloat(BinaryPrimitives.ReadUInt16LittleEndian(src.Slice(2 * i)));
                break;
            case DType.F16:
                for (int i = 0; i < dst.Length; i++) dst[i] = (float)BinaryPrimitives.ReadHalfLittleEndian(src.Slice(2 * i));
                break;
            default:
                throw new ArgumentException($"{t} is not a floating-point type");
        }
    }

    /// <summary>Encodes fp32 values as little-endian elements of a float type. A finite value beyond the type's range
    /// (above 65504 in f16) is refused, naming <paramref name="what"/>, rather than stored as an infinity.</summary>
    public static byte[] FromFloat32(DType t, ReadOnlySpan<float> src, string what = "a tensor")
    {
        var dst = new byte[(long)src.Length * t.Size()];
        switch (t)
        {
            case DType.F32:
                for (int i = 0; i < src.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(dst.AsSpan(4 * i), src[i]);
                break;
            case DType.BF16:
                RequireFits(t, src, what);
                for (int i = 0; i < src.Length; i++) BinaryPrimitives.WriteUInt16LittleEndian(dst.AsSpan(2 * i), FloatToBF16(src[i]));
                break;
            case DType.F16:
                RequireFits(t, src, what);
                for (int i = 0; i < src.Length; i++) BinaryPrimitives.WriteHalfLittleEndian(dst.AsSpan(2 * i), (Half)src[i]);
                break;
            default:
                throw new ArgumentException($"{t} is not a floating-point type");
        }
        return dst;
    }

    /// <summary>Refuses a finite value that <paramref name="t"/> would round to infinity (f16: |v| ≥ 65520; bf16: beyond
    /// 3.3895e38), naming <paramref name="what"/> and the element.</summary>
    public static void RequireFits(DType t, ReadOnlySpan<float> src, string what)
    {
        int i = FirstOverflow(t, src);
        if (i >= 0) throw TooLarge(t, src[i], i, what);
    }

    /// <summary>Index of the first finite value that rounds to infinity in <paramref name="t"/>, or -1.</summary>
    public static int FirstOverflow(DType t, ReadOnlySpan<float> src)
    {
        float limit = t switch
        {
            DType.F16 => 65520f,                                     // halfway between 65504 and 2^16: ties to even, i.e. up
            DType.BF16 => BitConverter.UInt32BitsToSingle(0x7F7F8000), // halfway above bf16's largest finite value
            _ => float.PositiveInfinity,
        };
        if (src.IsEmpty || float.IsPositiveInfinity(limit) || TensorPrimitives.MaxMagnitude(src) is var m && Math.Abs(m) < limit) return -1;
        for (int i = 0; i < src.Length; i++)
            if (float.IsFinite(src[i]) && Math.Abs(src[i]) >= limit) return i;
        return -1;
    }

    private static InvalidSettingException TooLarge(DType t, float value, int i, string what) => new(
        $"{what}: element {i} = {value} does not fit in {t} (it would be stored as infinity); store it as {(t == DType.F16 ? "bf16 or f32" : "f32")}");

    /// <summary>Index of the first NaN or infinity in <paramref name="x"/>, or -1 (x − x is 0 exactly for finite x).</summary>
    public static int FirstNonFinite(ReadOnlySpan<float> x)
    {
        int i = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var values = MemoryMarshal.Cast<float, Vector<float>>(x);
            for (; i < values.Length; i++)
                if (!Vector.EqualsAll(values[i] - values[i], Vector<float>.Zero)) break;
            i *= Vector<float>.Count;
        }
        for (; i < x.Length; i++) if (!float.IsFinite(x[i])) return i;
        return -1;
    }
}
