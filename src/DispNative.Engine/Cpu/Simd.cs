using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace DispNative.Engine.Cpu;

/// <summary>The few vector operations the CPU kernels need, implemented once per width so that generic
/// kernels specialize (the JIT compiles one copy per struct type argument).</summary>
internal unsafe interface IVecOps<TVec> where TVec : struct
{
    static abstract int Count { get; }
    static abstract TVec Zero { get; }
    static abstract TVec Load(float* p);
    static abstract void Store(float* p, TVec v);
    static abstract TVec Splat(float v);
    static abstract TVec Fma(TVec a, TVec b, TVec acc);
    static abstract TVec Add(TVec a, TVec b);
    static abstract TVec Mul(TVec a, TVec b);
    static abstract float Sum(TVec v);
}

internal unsafe struct V512 : IVecOps<Vector512<float>>
{
    public static int Count => 16;
    public static Vector512<float> Zero => Vector512<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Load(float* p) => Vector512.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector512<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Splat(float v) => Vector512.Create(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Fma(Vector512<float> a, Vector512<float> b, Vector512<float> c) => Vector512.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Add(Vector512<float> a, Vector512<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Mul(Vector512<float> a, Vector512<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sum(Vector512<float> v) => Vector512.Sum(v);
}

internal unsafe struct V256 : IVecOps<Vector256<float>>
{
    public static int Count => 8;
    public static Vector256<float> Zero => Vector256<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Load(float* p) => Vector256.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector256<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Splat(float v) => Vector256.Create(v);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> c) => Vector256.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Add(Vector256<float> a, Vector256<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Mul(Vector256<float> a, Vector256<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sum(Vector256<float> v) => Vector256.Sum(v);
}

internal static unsafe class Simd
{
    public static readonly bool Use512 = Vector512.IsHardwareAccelerated;

    /// <summary>Dot product of two float runs.</summary>
    public static float Dot(float* a, float* b, int n) => Use512 ? Dot<V512, Vector512<float>>(a, b, n) : Dot<V256, Vector256<float>>(a, b, n);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Dot<TOps, TVec>(float* a, float* b, int n) where TOps : IVecOps<TVec> where TVec : struct
    {
        int w = TOps.Count, i = 0;
        TVec s0 = TOps.Zero, s1 = TOps.Zero;
        for (; i + 2 * w <= n; i += 2 * w)
        {
            s0 = TOps.Fma(TOps.Load(a + i), TOps.Load(b + i), s0);
            s1 = TOps.Fma(TOps.Load(a + i + w), TOps.Load(b + i + w), s1);
        }
        for (; i + w <= n; i += w) s0 = TOps.Fma(TOps.Load(a + i), TOps.Load(b + i), s0);
        float s = TOps.Sum(TOps.Add(s0, s1));
        for (; i < n; i++) s += a[i] * b[i];
        return s;
    }

    /// <summary>y += alpha · x.</summary>
    public static void Axpy(float alpha, float* x, float* y, int n)
    {
        int i = 0;
        if (Use512)
        {
            var a = Vector512.Create(alpha);
            for (; i + 16 <= n; i += 16) Vector512.Store(Vector512.FusedMultiplyAdd(a, Vector512.Load(x + i), Vector512.Load(y + i)), y + i);
        }
        else
        {
            var a = Vector256.Create(alpha);
            for (; i + 8 <= n; i += 8) Vector256.Store(Vector256.FusedMultiplyAdd(a, Vector256.Load(x + i), Vector256.Load(y + i)), y + i);
        }
        for (; i < n; i++) y[i] += alpha * x[i];
    }
}
