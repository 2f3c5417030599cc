using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace DispNative.Engine.Cpu;

/// <summary>fp32 <c>Y[M,N] (+)= X[M,K] · W[N,K]ᵀ</c> on the CPU: weights stay in the [out, in] layout of the
/// checkpoint (<see cref="MatMul(float[], float[], float[], int, int, int, bool)"/> takes W as [K,N], for backward passes). M ≥ 8 goes through a packed-panel outer-product micro-kernel (8 rows × 2 vectors of columns,
/// 16 accumulators, K blocked for L1/L2); smaller M (decode) through dot products. Multi-threaded.</summary>
public static unsafe class Gemm
{
    private const int MR = 8;          // rows of X per micro-tile
    private const int KC = 512;        // K block: an 8-row X tile (16 KiB) stays in L1
    private const int MaxNC = 256;     // N block: a packed W block (KC·NC·4 = 512 KiB) stays in L2

    /// <summary>Threads used by the CPU kernels (default: all cores).</summary>
    public static int Threads { get; set; } = Environment.ProcessorCount;

    public static void MatMulT(float[] x, float[] w, float[] y, int m, int n, int k, bool accumulate = false)
        => MatMulT(x, 0, w, 0, y, 0, m, n, k, accumulate);

    /// <summary>As above on operands starting at the offsets; W's rows <paramref name="ldw"/> apart (0: packed, k). <c>parallel:
    /// false</c> runs on the calling thread only, for callers that parallelise over their own items.</summary>
    public static void MatMulT(float[] x, int xOffset, float[] w, int wOffset, float[] y, int yOffset, int m, int n, int k, bool accumulate = false,
        bool parallel = true, int ldw = 0)
        => Dispatch(x, xOffset, w, wOffset, y, yOffset, m, n, k, accumulate, parallel, wTransposed: true, ldw);

    /// <summary><c>Y[M,N] (+)= X[M,K] · W[K,N]</c> (W not transposed): the input gradient of a linear layer.</summary>
    public static void MatMul(float[] x, float[] w, float[] y, int m, int n, int k, bool accumulate = false)
        => MatMul(x, 0, w, 0, y, 0, m, n, k, accumulate);

    /// <summary>As above on operands starting at the offsets; W's rows <paramref name="ldw"/> apart (0: packed, n).</summary>
    public static void MatMul(float[] x, int xOffset, float[] w, int wOffset, float[] y, int yOffset, int m, int n, int k, bool accumulate = false,
        bool parallel = true, int ldw = 0)
        => Dispatch(x, xOffset, w, wOffset, y, yOffset, m, n, k, accumulate, parallel, wTransposed: false, ldw);

    private static void Dispatch(float[] x, int xOffset, float[] w, int wOffset, float[] y, int yOffset, int m, int n, int k, bool accumulate,
        bool parallel, bool wTransposed, int ldw)
    {
        // W is [n rows of k] (transposed) or [k rows of n], its rows ldw apart.
        int wRows = wTransposed ? n : k, wCols = wTransposed ? k : n;
        if (ldw == 0) ldw = wCols;
        if (ldw < wCols) throw new ArgumentException($"GEMM: W's row stride {ldw} is shorter than its rows ({wCols})");
        if ((long)xOffset + (long)m * k > x.Length || (wRows > 0 && wCols > 0 && (long)wOffset + (long)(wRows - 1) * ldw + wCols > w.Length) ||
            (long)yOffset + (long)m * n > y.Length)
            throw new ArgumentException($"GEMM operands too small for M={m} N={n} K={k}");
        if (m == 0 || n == 0) return;
        fixed (float* px = x, pw = w, py = y)
        {
            int threads = parallel ? Math.Max(1, Threads) : 1;
            if (Simd.Use512) Run<V512, Vector512<float>>(px + xOffset, pw + wOffset, py + yOffset, m, n, k, accumulate, threads, wTransposed, ldw);
            else Run<V256, Vector256<float>>(px + xOffset, pw + wOffset, py + yOffset, m, n, k, accumulate, threads, wTransposed, ldw);
        }
    }

    private static void Run<TOps, TVec>(float* x, float* w, float* y, int m, int n, int k, bool accumulate, int threads, bool wTransposed,
        int ldw) where TOps : IVecOps<TVec> where TVec : struct
    {
        if (k == 0 || (m < MR && wTransposed))
        {
            if (!accumulate) new Span<float>(y, checked(m * n)).Clear();
            if (k > 0) Gemv<TOps, TVec>(x, w, y, m, n, k, threads, ldw);
            return;
        }
        int nr = 2 * TOps.Count;
        // Enough N blocks (each a multiple of the panel width) to keep every thread busy.
        int nc = Math.Min(MaxNC, RoundUp((n + threads - 1) / threads, nr));
        int nBlocks = (n + nc - 1) / nc;
        int mChunks = nBlocks >= threads ? 1 : Math.Min((threads + nBlocks - 1) / nBlocks, (m + MR - 1) / MR);
        int mChunk = RoundUp((m + mChunks - 1) / mChunks, MR);
        mChunks = (m + mChunk - 1) / mChunk;
        nint px = (nint)x, pw = (nint)w, py = (nint)y;
        WorkTeam.For(nBlocks * mChunks, threads, Item);

        void Item(int item)
        {
            int n0 = item % nBlocks * nc, m0 = item / nBlocks * mChunk;
            int nLen = Math.Min(nc, n - n0), mLen = Math.Min(mChunk, m - m0);
            int panels = (nLen + nr - 1) / nr;
            var packed = PackBuffer(panels * nr * KC + MR * nr + 64);
            fixed (float* pb = packed)
            {
                float* bp = (float*)(((nint)pb + 63) & ~(nint)63);
                // The micro-kernels leave their accumulators here; AddTile adds them to Y. (Adding to Y inside a kernel
                // puts a call after its k loop, and the JIT then spilled every accumulator at every FMA.)
                float* tile = bp + panels * nr * KC;
                for (int k0 = 0; k0 < k; k0 += KC)
                {
                    int kc = Math.Min(KC, k - k0);
                    bool store = k0 == 0 && !accumulate;   // the first K block writes Y (no clearing pass before)
                    if (wTransposed) Pack((float*)pw, bp, n0, nLen, k0, kc, ldw, nr);
                    else PackKMajor((float*)pw, bp, n0, nLen, k0, kc, ldw, nr);
                    for (int p = 0; p < panels; p++)
                    {
                        int cols = Math.Min(nr, nLen - p * nr);
                        float* panel = bp + p * nr * kc;
                        int i = 0;
                        for (; i + MR <= mLen; i += MR)
                        {
                            Kernel8<TOps, TVec>((float*)px + (long)(m0 + i) * k + k0, k, panel, kc, tile);
                            AddTile<TOps, TVec>(tile, (float*)py + (long)(m0 + i) * n + n0 + p * nr, n, MR, cols, store);
                        }
                        for (; i < mLen; i++)
                        {
                            Kernel1<TOps, TVec>((float*)px + (long)(m0 + i) * k + k0, panel, kc, tile);
                            AddTile<TOps, TVec>(tile, (float*)py + (long)(m0 + i) * n + n0 + p * nr, n, 1, cols, store);
                        }
                    }
                }
            }
        }
    }

    /// <summary>GFLOP/s of a register-only loop of independent FMAs (12 accumulators, enough to hide the FMA latency
    /// on two pipes) on <see cref="Threads"/> threads, the best of two timed runs after a warm-up: the fp32 peak as this
    /// runtime reaches it on this machine, for benchmarks.</summary>
    public static double MeasureFmaPeakGflops(long iterations = 50_000_000)
    {
        int threads = Math.Max(1, Threads), lanes = Simd.Use512 ? 16 : 8;
        double Run()
        {
            var sw = System.Diagnostics.Stopwatch.StartNew();
            var sink = new float[threads];
            Parallel.For(0, threads, new ParallelOptions { MaxDegreeOfParallelism = threads },
                t => sink[t] = Simd.Use512 ? FmaLoop<V512, Vector512<float>>(iterations) : FmaLoop<V256, Vector256<float>>(iterations));
            return threads * iterations * 12.0 * lanes * 2 / sw.Elapsed.TotalSeconds / 1e9;
        }
        Run();
        return Math.Max(Run(), Run());
    }

    private static float FmaLoop<TOps, TVec>(long n) where TOps : IVecOps<TVec> where TVec : struct
    {
        TVec a = TOps.Splat(1.0000001f), b = TOps.Splat(0.9999999f);
        TVec c0 = TOps.Zero, c1 = TOps.Zero, c2 = TOps.Zero, c3 = TOps.Zero, c4 = TOps.Zero, c5 = TOps.Zero;
        TVec c6 = TOps.Zero, c7 = TOps.Zero, c8 = TOps.Zero, c9 = TOps.Zero, c10 = TOps.Zero, c11 = TOps.Zero;
        for (long i = 0; i < n; i++)
        {
            c0 = TOps.Fma(a, b, c0); c1 = TOps.Fma(a, b, c1); c2 = TOps.Fma(a, b, c2); c3 = TOps.Fma(a, b, c3);
            c4 = TOps.Fma(a, b, c4); c5 = TOps.Fma(a, b, c5); c6 = TOps.Fma(a, b, c6); c7 = TOps.Fma(a, b, c7);
            c8 = TOps.Fma(a, b, c8); c9 = TOps.Fma(a, b, c9); c10 = TOps.Fma(a, b, c10); c11 = TOps.Fma(a, b, c11);
        }
        TVec s = TOps.Add(TOps.Add(TOps.Add(c0, c1), TOps.Add(c2, c3)), TOps.Add(TOps.Add(c4, c5), TOps.Add(c6, c7)));
        return TOps.Sum(TOps.Add(s, TOps.Add(TOps.Add(c8, c9), TOps.Add(c10, c11))));
    }

    [ThreadStatic] private static float[]? _packBuffer;

    /// <summary>A per-thread packing buffer, reused across calls (allocating one per task costs more than small GEMMs).</summary>
    private static float[] PackBuffer(int length) => ThreadBuffer(ref _packBuffer, length, MaxNC * KC + 64);

    /// <summary><paramref name="buffer"/> (a [ThreadStatic] field), reallocated with max(<paramref name="length"/>,
    /// <paramref name="minimum"/>) floats when shorter than <paramref name="length"/>; contents undefined. The largest size a
    /// thread has needed stays allocated.</summary>
    internal static float[] ThreadBuffer(ref float[]? buffer, long length, int minimum = 0)
    {
        if (buffer == null || buffer.Length < length) buffer = GC.AllocateUninitializedArray<float>(checked((int)Math.Max(length, minimum)));
        return buffer;
    }

    private static int RoundUp(int v, int multiple) => (v + multiple - 1) / multiple * multiple;

    /// <summary>Packs W rows [n0, n0+nLen) × K columns [k0, k0+kc) as panels of nr rows, k-major:
    /// panel[k][r] = W[n0 + p·nr + r, k0 + k]; missing rows are zero.</summary>
    private static void Pack(float* w, float* bp, int n0, int nLen, int k0, int kc, int ldw, int nr)
    {
        int panels = (nLen + nr - 1) / nr;
        for (int p = 0; p < panels; p++)
        {
            float* dst = bp + p * nr * kc;
            for (int r = 0; r < nr; r++)
            {
                int row = p * nr + r;
                if (row >= nLen) { for (int kk = 0; kk < kc; kk++) dst[kk * nr + r] = 0; continue; }
                float* src = w + (long)(n0 + row) * ldw + k0;
                for (int kk = 0; kk < kc; kk++) dst[kk * nr + r] = src[kk];
            }
        }
    }

    /// <summary>The same panels from W stored [K,N]: panel[k][r] = W[k0 + k, n0 + p·nr + r].</summary>
    private static void PackKMajor(float* w, float* bp, int n0, int nLen, int k0, int kc, int ldw, int nr)
    {
        int panels = (nLen + nr - 1) / nr;
        for (int p = 0; p < panels; p++)
        {
            float* dst = bp + p * nr * kc;
            int cols = Math.Min(nr, nLen - p * nr);
            for (int kk = 0; kk < kc; kk++)
            {
                float* d = dst + kk * nr;
                new ReadOnlySpan<float>(w + (long)(k0 + kk) * ldw + n0 + p * nr, cols).CopyTo(new Span<float>(d, cols));
                if (cols < nr) new Span<float>(d + cols, nr - cols).Clear();
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Kernel8<TOps, TVec>(float* a, int lda, float* b, int kc, float* acc)
        where TOps : IVecOps<TVec> where TVec : struct
    {
        int v = TOps.Count, nr = 2 * v;
        TVec c00 = TOps.Zero, c01 = TOps.Zero, c10 = TOps.Zero, c11 = TOps.Zero, c20 = TOps.Zero, c21 = TOps.Zero, c30 = TOps.Zero, c31 = TOps.Zero;
        TVec c40 = TOps.Zero, c41 = TOps.Zero, c50 = TOps.Zero, c51 = TOps.Zero, c60 = TOps.Zero, c61 = TOps.Zero, c70 = TOps.Zero, c71 = TOps.Zero;
        float* a0 = a, a1 = a + lda, a2 = a + 2 * lda, a3 = a + 3 * lda, a4 = a + 4 * lda, a5 = a + 5 * lda, a6 = a + 6 * lda, a7 = a + 7 * lda;
        for (int kk = 0; kk < kc; kk++)
        {
            TVec b0 = TOps.Load(b), b1 = TOps.Load(b + v);
            b += nr;
            TVec t = TOps.Splat(a0[kk]); c00 = TOps.Fma(t, b0, c00); c01 = TOps.Fma(t, b1, c01);
            t = TOps.Splat(a1[kk]); c10 = TOps.Fma(t, b0, c10); c11 = TOps.Fma(t, b1, c11);
            t = TOps.Splat(a2[kk]); c20 = TOps.Fma(t, b0, c20); c21 = TOps.Fma(t, b1, c21);
            t = TOps.Splat(a3[kk]); c30 = TOps.Fma(t, b0, c30); c31 = TOps.Fma(t, b1, c31);
            t = TOps.Splat(a4[kk]); c40 = TOps.Fma(t, b0, c40); c41 = TOps.Fma(t, b1, c41);
            t = TOps.Splat(a5[kk]); c50 = TOps.Fma(t, b0, c50); c51 = TOps.Fma(t, b1, c51);
            t = TOps.Splat(a6[kk]); c60 = TOps.Fma(t, b0, c60); c61 = TOps.Fma(t, b1, c61);
            t = TOps.Splat(a7[kk]); c70 = TOps.Fma(t, b0, c70); c71 = TOps.Fma(t, b1, c71);
        }
        TOps.Store(acc, c00); TOps.Store(acc + v, c01);
        TOps.Store(acc + nr, c10); TOps.Store(acc + nr + v, c11);
        TOps.Store(acc + 2 * nr, c20); TOps.Store(acc + 2 * nr + v, c21);
        TOps.Store(acc + 3 * nr, c30); TOps.Store(acc + 3 * nr + v, c31);
        TOps.Store(acc + 4 * nr, c40); TOps.Store(acc + 4 * nr + v, c41);
        TOps.Store(acc + 5 * nr, c50); TOps.Store(acc + 5 * nr + v, c51);
        TOps.Store(acc + 6 * nr, c60); TOps.Store(acc + 6 * nr + v, c61);
        TOps.Store(acc + 7 * nr, c70); TOps.Store(acc + 7 * nr + v, c71);
    }

    private static void Kernel1<TOps, TVec>(float* a, float* b, int kc, float* acc)
        where TOps : IVecOps<TVec> where TVec : struct
    {
        int v = TOps.Count, nr = 2 * v;
        TVec c0 = TOps.Zero, c1 = TOps.Zero;
        for (int kk = 0; kk < kc; kk++, b += nr)
        {
            TVec t = TOps.Splat(a[kk]);
            c0 = TOps.Fma(t, TOps.Load(b), c0);
            c1 = TOps.Fma(t, TOps.Load(b + v), c1);
        }
        TOps.Store(acc, c0);
        TOps.Store(acc + v, c1);
    }

    /// <summary>c[r, j] += acc[r, j] (with <paramref name="store"/>: c[r, j] = acc[r, j]) for <paramref name="rows"/> rows of a
    /// tile two vectors wide, its first <paramref name="cols"/> columns.</summary>
    private static void AddTile<TOps, TVec>(float* acc, float* c, int ldc, int rows, int cols, bool store)
        where TOps : IVecOps<TVec> where TVec : struct
    {
        int v = TOps.Count, nr = 2 * v;
        for (int r = 0; r < rows; r++, acc += nr, c += ldc)
            if (cols == nr)
            {
                TOps.Store(c, store ? TOps.Load(acc) : TOps.Add(TOps.Load(c), TOps.Load(acc)));
                TOps.Store(c + v, store ? TOps.Load(acc + v) : TOps.Add(TOps.Load(c + v), TOps.Load(acc + v)));
            }
            else if (store)
                for (int j = 0; j < cols; j++) c[j] = acc[j];
            else
                for (int j = 0; j < cols; j++) c[j] += acc[j];
    }

    private static void Gemv<TOps, TVec>(float* x, float* w, float* y, int m, int n, int k, int threads, int ldw)
        where TOps : IVecOps<TVec> where TVec : struct
    {
        nint px = (nint)x, pw = (nint)w, py = (nint)y;
        int chunk = Math.Max(16, RoundUp((n + 4 * threads - 1) / (4 * threads), 16));
        int chunks = (n + chunk - 1) / chunk;
        void Body(int ci)
        {
            int o0 = ci * chunk, o1 = Math.Min(n, o0 + chunk), o = o0;
            if (m == 1)
                for (; o + 4 <= o1; o += 4)
                    Dot4<TOps, TVec>((float*)px, (float*)pw + (long)o * ldw, k, ldw, (float*)py + o);
            for (; o < o1; o++)
            {
                float* wr = (float*)pw + (long)o * ldw;
                for (int i = 0; i < m; i++)
                    ((float*)py)[(long)i * n + o] += Simd.Dot<TOps, TVec>((float*)px + (long)i * k, wr, k);
            }
        }
        // Below 256 KiB of weights the hand-off to a second thread costs about what it saves (decode of ref-llama-25m's
        // shape, dense and pruned: 1 MiB was 8-13% slower, 128 KiB no faster).
        if (threads == 1 || (long)n * k < 1 << 16) { for (int ci = 0; ci < chunks; ci++) Body(ci); }
        else WorkTeam.For(chunks, threads, Body);
    }

    /// <summary>y[r] += x · w[r] for the 4 rows of w from <paramref name="w"/> (row stride ldw): <see cref="Simd.Dot{TOps, TVec}"/>'s
    /// summation order for each row (bit-identical), with x loaded once for the 4 rows and 8 accumulators in flight.</summary>
    private static void Dot4<TOps, TVec>(float* x, float* w, int k, int ldw, float* y) where TOps : IVecOps<TVec> where TVec : struct
    {
        int v = TOps.Count, i = 0;
        float* w1 = w + ldw, w2 = w + 2 * ldw, w3 = w + 3 * ldw;
        TVec a0 = TOps.Zero, b0 = TOps.Zero, a1 = TOps.Zero, b1 = TOps.Zero, a2 = TOps.Zero, b2 = TOps.Zero, a3 = TOps.Zero, b3 = TOps.Zero;
        for (; i + 2 * v <= k; i += 2 * v)
        {
            TVec xa = TOps.Load(x + i), xb = TOps.Load(x + i + v);
            a0 = TOps.Fma(xa, TOps.Load(w + i), a0); b0 = TOps.Fma(xb, TOps.Load(w + i + v), b0);
            a1 = TOps.Fma(xa, TOps.Load(w1 + i), a1); b1 = TOps.Fma(xb, TOps.Load(w1 + i + v), b1);
            a2 = TOps.Fma(xa, TOps.Load(w2 + i), a2); b2 = TOps.Fma(xb, TOps.Load(w2 + i + v), b2);
            a3 = TOps.Fma(xa, TOps.Load(w3 + i), a3); b3 = TOps.Fma(xb, TOps.Load(w3 + i + v), b3);
        }
        for (; i + v <= k; i += v)
        {
            TVec xa = TOps.Load(x + i);
            a0 = TOps.Fma(xa, TOps.Load(w + i), a0); a1 = TOps.Fma(xa, TOps.Load(w1 + i), a1);
            a2 = TOps.Fma(xa, TOps.Load(w2 + i), a2); a3 = TOps.Fma(xa, TOps.Load(w3 + i), a3);
        }
        float s0 = TOps.Sum(TOps.Add(a0, b0)), s1 = TOps.Sum(TOps.Add(a1, b1)), s2 = TOps.Sum(TOps.Add(a2, b2)), s3 = TOps.Sum(TOps.Add(a3, b3));
        for (; i < k; i++) { s0 += x[i] * w[i]; s1 += x[i] * w1[i]; s2 += x[i] * w2[i]; s3 += x[i] * w3[i]; }
        y[0] += s0; y[1] += s1; y[2] += s2; y[3] += s3;
    }
}
