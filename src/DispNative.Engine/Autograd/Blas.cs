using System.Numerics;
using System.Runtime.CompilerServices;
using DispNative.Engine.Cpu;

namespace DispNative.Engine.Autograd;

/// <summary>Matrix products for the autograd ops: fp32 goes to the tuned <see cref="Gemm"/>; float64 (used by
/// the finite-difference gradient checks) to plain loops.</summary>
internal static class Blas<T> where T : unmanaged, IFloatingPointIeee754<T>
{
    /// <summary>y[m,n] (+)= x[m,k] · w[n,k]ᵀ.</summary>
    public static void MatMulNT(T[] x, T[] w, T[] y, int m, int n, int k, bool accumulate)
    {
        if (typeof(T) == typeof(float)) { Gemm.MatMulT(Unsafe.As<float[]>(x), Unsafe.As<float[]>(w), Unsafe.As<float[]>(y), m, n, k, accumulate); return; }
        Parallel.For(0, m, i =>
        {
            var xi = x.AsSpan(i * k, k);
            for (int j = 0; j < n; j++)
            {
                T s = Dot(xi, w.AsSpan(j * k, k));
                y[i * n + j] = accumulate ? y[i * n + j] + s : s;
            }
        });
    }

    /// <summary>y[m,n] (+)= x[m,k] · w[k,n].</summary>
    public static void MatMulNN(T[] x, T[] w, T[] y, int m, int n, int k, bool accumulate)
    {
        if (typeof(T) == typeof(float)) { Gemm.MatMul(Unsafe.As<float[]>(x), Unsafe.As<float[]>(w), Unsafe.As<float[]>(y), m, n, k, accumulate); return; }
        Parallel.For(0, m, i =>
        {
            var yi = y.AsSpan(i * n, n);
            if (!accumulate) yi.Clear();
            for (int p = 0; p < k; p++)
            {
                T a = x[i * k + p];
                var wp = w.AsSpan(p * n, n);
                for (int j = 0; j < n; j++) yi[j] += a * wp[j];
            }
        });
    }

    /// <summary>[rows, cols] → [cols, rows].</summary>
    public static T[] Transpose(T[] a, int rows, int cols)
    {
        var t = new T[a.Length];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++) t[c * rows + r] = a[r * cols + c];
        return t;
    }

    public static T Dot(ReadOnlySpan<T> a, ReadOnlySpan<T> b) => System.Numerics.Tensors.TensorPrimitives.Dot(a, b);

    /// <summary>y += alpha · x.</summary>
    public static void Axpy(T alpha, ReadOnlySpan<T> x, Span<T> y) => System.Numerics.Tensors.TensorPrimitives.MultiplyAdd(x, alpha, y, y);
}

/// <summary>The error function to double precision: its Maclaurin series below 2, the continued fraction of
/// erfc above (both checked against C's erf to 1e-15).</summary>
public static class SpecialFunctions
{
    public static double Erf(double x)
    {
        double ax = Math.Abs(x);
        if (ax < 2)
        {
            double sum = 0, term = x;
            for (int n = 0; n < 80; n++)
            {
                double t = term / (2 * n + 1);
                sum += t;
                if (Math.Abs(t) < 1e-17 * Math.Abs(sum)) break;
                term *= -x * x / (n + 1);
            }
            return 2 / Math.Sqrt(Math.PI) * sum;
        }
        double f = ax;
        for (int n = 60; n >= 1; n--) f = ax + n / 2.0 / f;
        double erfc = Math.Exp(-ax * ax) / (Math.Sqrt(Math.PI) * f);
        return x > 0 ? 1 - erfc : erfc - 1;
    }
}
