using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using DispNative.Engine.Cpu;

namespace DispNative.Engine.Autograd;

public sealed partial class Tape<T>
{
    /// <summary>Rotary embedding (half rotation) of every head of x [n, heads·headDim]; row r is position r.</summary>
    public Var<T> Rope(Var<T> x, int heads, Rope rope)
    {
        int hd = rope.HeadDim, half = hd / 2, n = x.Rows, width = x.Cols;
        Check(width == heads * hd, $"rope: {width} columns are not {heads} heads of {hd}");
        var cos = new T[n * half];
        var sin = new T[n * half];
        Span<float> c = stackalloc float[half], s = stackalloc float[half];
        for (int r = 0; r < n; r++)
        {
            rope.Angles(r, c, s);
            for (int i = 0; i < half; i++) { cos[r * half + i] = T.CreateChecked(c[i]); sin[r * half + i] = T.CreateChecked(s[i]); }
        }
        var y = Output(n, width, x.RequiresGrad);
        for (int r = 0; r < n; r++)
            for (int h = 0; h < heads; h++)
            {
                int o = r * width + h * hd;
                for (int i = 0; i < half; i++)
                {
                    T a = x.Data[o + i], b = x.Data[o + i + half], cs = cos[r * half + i], sn = sin[r * half + i];
                    y.Data[o + i] = a * cs - b * sn;
                    y.Data[o + i + half] = b * cs + a * sn;
                }
            }
        Record(y, g =>
        {
            var dx = x.G;
            for (int r = 0; r < n; r++)
                for (int h = 0; h < heads; h++)
                {
                    int o = r * width + h * hd;
                    for (int i = 0; i < half; i++)
                    {
                        T g1 = g[o + i], g2 = g[o + i + half], cs = cos[r * half + i], sn = sin[r * half + i];
                        dx[o + i] += g1 * cs + g2 * sn;
                        dx[o + i + half] += g2 * cs - g1 * sn;
                    }
                }
        });
        return y;
    }

    /// <summary>Causal GQA attention of one sequence: q [n, heads·hd], k and v [n, kvHeads·hd] (query head h reads
    /// kv head h / (heads/kvHeads)); an optional sliding window. Only the output and one log-sum-exp per query
    /// are kept; backward recomputes the probabilities (no n×n matrix is stored on the tape): in fp32 as GEMMs over
    /// transient [n, n] blocks per chunk of heads (<see cref="CpuAttentionGemmBackend"/>), in float64 row by row.</summary>
    public Var<T> Attention(Var<T> q, Var<T> k, Var<T> v, int heads, int kvHeads, int headDim, int? window = null)
    {
        int n = q.Rows, qDim = heads * headDim, kvDim = kvHeads * headDim, group = heads / kvHeads;
        Check(q.Cols == qDim && k.Cols == kvDim && v.Cols == kvDim && k.Rows == n && v.Rows == n,
            $"attention: q [{q.Rows},{q.Cols}], k [{k.Rows},{k.Cols}], v [{v.Rows},{v.Cols}] do not fit {heads}/{kvHeads} heads of {headDim}");
        T scale = T.One / T.Sqrt(C(headDim));
        var y = Output(n, qDim, q.RequiresGrad || k.RequiresGrad || v.RequiresGrad);
        var lse = new T[heads * n];
        int First(int i) => window is int w ? Math.Max(0, i - w + 1) : 0;

        Parallel.For(0, heads, new ParallelOptions { MaxDegreeOfParallelism = Gemm.Threads }, h =>
        {
            int kvh = h / group;
            var p = new T[n];
            for (int i = 0; i < n; i++)
            {
                var qi = q.Data.AsSpan(i * qDim + h * headDim, headDim);
                int first = First(i);
                T max = T.NegativeInfinity;
                for (int j = first; j <= i; j++)
                {
                    T s = Blas<T>.Dot(qi, k.Data.AsSpan(j * kvDim + kvh * headDim, headDim)) * scale;
                    p[j] = s;
                    if (s > max) max = s;
                }
                T sum = T.Zero;
                for (int j = first; j <= i; j++) { p[j] = T.Exp(p[j] - max); sum += p[j]; }
                lse[h * n + i] = max + T.Log(sum);
                var oi = y.Data.AsSpan(i * qDim + h * headDim, headDim);
                T inv = T.One / sum;
                for (int j = first; j <= i; j++) Blas<T>.Axpy(p[j] * inv, v.Data.AsSpan(j * kvDim + kvh * headDim, headDim), oi);
            }
        });

        Record(y, g =>
        {
            if (typeof(T) == typeof(float) && AttentionBackwardOnGemms)
            {
                float[] F(T[] a) => Unsafe.As<float[]>(a);
                T[] gq = Allocate(q.Data.Length), gk = Allocate(k.Data.Length), gv = Allocate(v.Data.Length);
                CpuAttentionGemmBackend.Run(F(q.Data), F(k.Data), F(v.Data), F(y.Data), F(g), F(lse), F(gq), F(gk), F(gv),
                    n, heads, kvHeads, headDim, window, len => F(Allocate(len)));
                if (q.RequiresGrad) TensorPrimitives.Add(q.G, gq, q.G);
                if (k.RequiresGrad) TensorPrimitives.Add(k.G, gk, k.G);
                if (v.RequiresGrad) TensorPrimitives.Add(v.G, gv, v.G);
                return;
            }
            // float64 (the finite-difference checks), or fp32 when asked: row by row. One task per kv head: the heads of its group write
            // disjoint dq columns and share its dk/dv columns.
            T[]? dq = q.RequiresGrad ? q.G : null, dk = k.RequiresGrad ? k.G : null, dv = v.RequiresGrad ? v.G : null;
            Parallel.For(0, kvHeads, new ParallelOptions { MaxDegreeOfParallelism = Gemm.Threads }, kvh =>
            {
                var ds = new T[n];
                for (int h = kvh * group; h < (kvh + 1) * group; h++)
                    for (int i = 0; i < n; i++)
                    {
                        int qo = i * qDim + h * headDim, first = First(i);
                        var qi = q.Data.AsSpan(qo, headDim);
                        var gi = g.AsSpan(qo, headDim);
                        T dOut = Blas<T>.Dot(gi, y.Data.AsSpan(qo, headDim)), l = lse[h * n + i];
                        for (int j = first; j <= i; j++)
                        {
                            int ko = j * kvDim + kvh * headDim;
                            T pij = T.Exp(Blas<T>.Dot(qi, k.Data.AsSpan(ko, headDim)) * scale - l);
                            T dp = Blas<T>.Dot(gi, v.Data.AsSpan(ko, headDim));
                            ds[j] = pij * (dp - dOut) * scale;
                            if (dv != null) Blas<T>.Axpy(pij, gi, dv.AsSpan(ko, headDim));
                        }
                        for (int j = first; j <= i; j++)
                        {
                            int ko = j * kvDim + kvh * headDim;
                            if (dq != null) Blas<T>.Axpy(ds[j], k.Data.AsSpan(ko, headDim), dq.AsSpan(qo, headDim));
                            if (dk != null) Blas<T>.Axpy(ds[j], qi, dk.AsSpan(ko, headDim));
                        }
                    }
            });
        });
        return y;
    }
}
