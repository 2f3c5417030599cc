using System.Numerics;
using System.Numerics.Tensors;

namespace DispNative.Engine.Autograd;

/// <summary>A row-major [Rows, Cols] value recorded on a <see cref="Tape{T}"/>. Its gradient is allocated when
/// something first flows into it.</summary>
public sealed class Var<T> where T : unmanaged, IFloatingPointIeee754<T>
{
    private readonly Tape<T> _tape;

    internal Var(Tape<T> tape, T[] data, int rows, int cols, bool requiresGrad, T[]? grad = null)
    {
        if ((long)rows * cols != data.Length) throw new ArgumentException($"data of {data.Length} values is not [{rows}, {cols}]");
        if (grad != null && grad.Length != data.Length) throw new ArgumentException("gradient buffer has the wrong length");
        _tape = tape; Data = data; Rows = rows; Cols = cols; RequiresGrad = requiresGrad; Grad = grad;
    }

    public T[] Data { get; }
    public int Rows { get; }
    public int Cols { get; }
    public bool RequiresGrad { get; }
    /// <summary>∂loss/∂this after <see cref="Tape{T}.Backward"/>; null when nothing flowed here.</summary>
    public T[]? Grad { get; private set; }
    internal T[] G => Grad ??= _tape.Allocate(Data.Length);
    public T Scalar => Data[0];
}

/// <summary>Reverse-mode autodiff over 2-D values: each op computes its output and, when an input needs a
/// gradient, records a backward step; <see cref="Backward"/> replays them in reverse. Generic over the float
/// type so that the same code runs in fp32 (training) and float64 (finite-difference checks). Gradients flow
/// only to values made with <see cref="Leaf"/>: frozen weights enter as <see cref="Constant"/> and get none.</summary>
public sealed partial class Tape<T>(TapeBufferPool<T>? pool = null) where T : unmanaged, IFloatingPointIeee754<T>
{
    private readonly List<Action> _steps = [];
    private readonly List<T[]> _rented = [];

    /// <summary>fp32 attention backward as GEMMs (<see cref="CpuAttentionGemmBackend"/>, the default) or row by row, as
    /// float64 always runs it; <c>KernelBench cpu</c> times the two.</summary>
    public bool AttentionBackwardOnGemms { get; init; } = true;

    /// <summary>A value that receives no gradient (frozen weights, inputs).</summary>
    public Var<T> Constant(T[] data, int rows, int cols) => new(this, data, rows, cols, false);

    /// <summary>A value whose gradient is wanted; <paramref name="grad"/>, if given, is accumulated into.</summary>
    public Var<T> Leaf(T[] data, int rows, int cols, T[]? grad = null) => new(this, data, rows, cols, true, grad);

    /// <summary>A zeroed buffer of <paramref name="length"/> values for an output, a gradient or a saved intermediate:
    /// from the pool when the tape has one, otherwise new.</summary>
    internal T[] Allocate(long length)
    {
        if (pool == null) return new T[length];
        var a = pool.Rent(length);
        lock (_rented) _rented.Add(a);
        return a;
    }

    /// <summary>Gives every buffer this tape took from its pool back for the next tape: outputs, gradients of values
    /// that are not leaves with caller-owned gradients, and intermediates. Nothing recorded on this tape may be read
    /// afterwards; without a pool it does nothing.</summary>
    public void ReturnBuffers()
    {
        if (pool == null) return;
        _steps.Clear();
        lock (_rented) { foreach (var a in _rented) pool.Return(a); _rented.Clear(); }
    }

    /// <summary>Runs the recorded backward steps in reverse. With <paramref name="loss"/>, seeds ∂loss/∂loss = 1;
    /// gradients already placed on intermediate values (e.g. from another tape) flow back too.</summary>
    public void Backward(Var<T>? loss = null)
    {
        if (loss != null) loss.G.AsSpan().Fill(T.One);
        for (int i = _steps.Count - 1; i >= 0; i--) _steps[i]();
        _steps.Clear();
    }

    /// <summary>A new output; its backward step runs only if some input needs a gradient.</summary>
    internal Var<T> Output(int rows, int cols, bool requiresGrad) => new(this, Allocate((long)rows * cols), rows, cols, requiresGrad);

    /// <summary>Records <paramref name="backward"/> for <paramref name="y"/>; it runs with y's gradient when one arrived.</summary>
    internal void Record(Var<T> y, Action<T[]> backward)
    {
        if (!y.RequiresGrad) return;
        _steps.Add(() => { if (y.Grad != null) backward(y.Grad); });
    }

    /// <summary>y = segment(x) without keeping the segment's intermediates (activation checkpointing): the segment runs
    /// on a scratch tape whose buffers go back to the pool at once; the backward runs it again from x on another scratch
    /// tape and backpropagates y's gradient through it, into x and into every earlier value of this tape the segment
    /// reads (masks, trainable weights). The segment must record its own work on the tape it is given and be
    /// deterministic.</summary>
    public Var<T> Checkpoint(Var<T> x, Func<Tape<T>, Var<T>, Var<T>> segment)
    {
        var scratch = Scratch();
        Var<T> y;
        try
        {
            var inner = segment(scratch, scratch.Constant(x.Data, x.Rows, x.Cols));
            y = Output(inner.Rows, inner.Cols, x.RequiresGrad || inner.RequiresGrad);
            inner.Data.CopyTo(y.Data, 0);
        }
        finally { scratch.ReturnBuffers(); }
        Record(y, g =>
        {
            var again = Scratch();
            try
            {
                var input = x.RequiresGrad ? again.Leaf(x.Data, x.Rows, x.Cols, x.G) : again.Constant(x.Data, x.Rows, x.Cols);
                var output = segment(again, input);
                TensorPrimitives.Add(output.G, g, output.G);
                again.Backward();
            }
            finally { again.ReturnBuffers(); }
        });
        return y;
    }

    private Tape<T> Scratch() => new(pool) { AttentionBackwardOnGemms = AttentionBackwardOnGemms };

    private static T C(double v) => T.CreateChecked(v);

    private static void Check(bool ok, string what)
    {
        if (!ok) throw new ArgumentException(what);
    }

    // ---------------------------------------------------------------- linear algebra

    /// <summary>y = x · wᵀ (+ b): x [m,k], w [n,k], b [1,n].</summary>
    public Var<T> Linear(Var<T> x, Var<T> w, Var<T>? b = null)
    {
        int m = x.Rows, k = x.Cols, n = w.Rows;
        Check(w.Cols == k, $"linear: x is [{m},{k}] but w is [{w.Rows},{w.Cols}]");
        Check(b == null || b.Data.Length == n, "linear: bias length differs from the output width");
        var y = Output(m, n, x.RequiresGrad || w.RequiresGrad || (b?.RequiresGrad ?? false));
        Blas<T>.MatMulNT(x.Data, w.Data, y.Data, m, n, k, false);
        if (b != null) for (int i = 0; i < m; i++) TensorPrimitives.Add(y.Data.AsSpan(i * n, n), b.Data, y.Data.AsSpan(i * n, n));
        Record(y, g =>
        {
            if (x.RequiresGrad) Blas<T>.MatMulNN(g, w.Data, x.G, m, k, n, true);
            if (w.RequiresGrad) Blas<T>.MatMulNN(Blas<T>.Transpose(g, m, n), x.Data, w.G, n, k, m, true);
            if (b is { RequiresGrad: true })
                for (int i = 0; i < m; i++) TensorPrimitives.Add(b.G, g.AsSpan(i * n, n), b.G);
        });
        return y;
    }

    // ---------------------------------------------------------------- normalization

    /// <summary>RMSNorm over each row: x / sqrt(mean(x²) + eps) · gamma.</summary>
    public Var<T> RmsNorm(Var<T> x, Var<T> gamma, double eps)
    {
        int rows = x.Rows, d = x.Cols;
        Check(gamma.Data.Length == d, "rms norm: gamma length differs from the row width");
        var y = Output(rows, d, x.RequiresGrad || gamma.RequiresGrad);
        var rstd = new T[rows];
        T td = C(d), te = C(eps);
        for (int r = 0; r < rows; r++)
        {
            var xr = x.Data.AsSpan(r * d, d);
            T rs = T.One / T.Sqrt(Blas<T>.Dot(xr, xr) / td + te);
            rstd[r] = rs;
            var yr = y.Data.AsSpan(r * d, d);
            for (int i = 0; i < d; i++) yr[i] = xr[i] * rs * gamma.Data[i];
        }
        Record(y, g =>
        {
            for (int r = 0; r < rows; r++)
            {
                var xr = x.Data.AsSpan(r * d, d);
                var gr = g.AsSpan(r * d, d);
                T rs = rstd[r];
                if (x.RequiresGrad)
                {
                    T dot = T.Zero;
                    for (int i = 0; i < d; i++) dot += gr[i] * gamma.Data[i] * xr[i];
                    T c = rs * rs * rs * dot / td;
                    var dx = x.G.AsSpan(r * d, d);
                    for (int i = 0; i < d; i++) dx[i] += rs * gr[i] * gamma.Data[i] - c * xr[i];
                }
                if (gamma.RequiresGrad)
                    for (int i = 0; i < d; i++) gamma.G[i] += gr[i] * xr[i] * rs;
            }
        });
        return y;
    }

    /// <summary>LayerNorm over each row (biased variance), then · gamma + beta.</summary>
    public Var<T> LayerNorm(Var<T> x, Var<T> gamma, Var<T> beta, double eps)
    {
        int rows = x.Rows, d = x.Cols;
        Check(gamma.Data.Length == d && beta.Data.Length == d, "layer norm: gamma/beta length differs from the row width");
        var y = Output(rows, d, x.RequiresGrad || gamma.RequiresGrad || beta.RequiresGrad);
        var xhat = Allocate(x.Data.Length);
        var rstd = new T[rows];
        T td = C(d), te = C(eps);
        for (int r = 0; r < rows; r++)
        {
            var xr = x.Data.AsSpan(r * d, d);
            T mean = TensorPrimitives.Sum<T>(xr) / td, v = T.Zero;
            for (int i = 0; i < d; i++) v += (xr[i] - mean) * (xr[i] - mean);
            T rs = T.One / T.Sqrt(v / td + te);
            rstd[r] = rs;
            for (int i = 0; i < d; i++)
            {
                T h = (xr[i] - mean) * rs;
                xhat[r * d + i] = h;
                y.Data[r * d + i] = h * gamma.Data[i] + beta.Data[i];
            }
        }
        Record(y, g =>
        {
            for (int r = 0; r < rows; r++)
            {
                var gr = g.AsSpan(r * d, d);
                var hr = xhat.AsSpan(r * d, d);
                if (x.RequiresGrad)
                {
                    T mu = T.Zero, muh = T.Zero;
                    for (int i = 0; i < d; i++) { T u = gr[i] * gamma.Data[i]; mu += u; muh += u * hr[i]; }
                    mu /= td; muh /= td;
                    var dx = x.G.AsSpan(r * d, d);
                    for (int i = 0; i < d; i++) dx[i] += rstd[r] * (gr[i] * gamma.Data[i] - mu - hr[i] * muh);
                }
                if (gamma.RequiresGrad) for (int i = 0; i < d; i++) gamma.G[i] += gr[i] * hr[i];
                if (beta.RequiresGrad) TensorPrimitives.Add(beta.G, gr, beta.G);
            }
        });
        return y;
    }

    // ---------------------------------------------------------------- elementwise

    private Var<T> Unary(Var<T> x, Func<T, T> f, Func<T, T, T> derivative)
    {
        var y = Output(x.Rows, x.Cols, x.RequiresGrad);
        for (int i = 0; i < x.Data.Length; i++) y.Data[i] = f(x.Data[i]);
        Record(y, g => { var dx = x.G; for (int i = 0; i < dx.Length; i++) dx[i] += g[i] * derivative(x.Data[i], y.Data[i]); });
        return y;
    }

    public Var<T> Sigmoid(Var<T> x) => Unary(x, v => T.One / (T.One + T.Exp(-v)), (_, s) => s * (T.One - s));

    public Var<T> Tanh(Var<T> x) => Unary(x, T.Tanh, (_, t) => T.One - t * t);

    /// <summary>GELU with the exact normal CDF (PyTorch's default).</summary>
    public Var<T> Gelu(Var<T> x) => Unary(x,
        v => C(0.5) * v * (T.One + C(SpecialFunctions.Erf(double.CreateChecked(v) / Math.Sqrt(2)))),
        (v, _) =>
        {
            double d = double.CreateChecked(v);
            return C(0.5 * (1 + SpecialFunctions.Erf(d / Math.Sqrt(2))) + d * Math.Exp(-0.5 * d * d) / Math.Sqrt(2 * Math.PI));
        });

    /// <summary>y = x · scale + shift.</summary>
    public Var<T> Affine(Var<T> x, double scale, double shift)
    {
        T a = C(scale), b = C(shift);
        return Unary(x, v => v * a + b, (_, _) => a);
    }

    /// <summary>round(x) forward, identity backward (straight-through estimator).</summary>
    public Var<T> RoundStraightThrough(Var<T> x)
    {
        var y = Output(x.Rows, x.Cols, x.RequiresGrad);
        for (int i = 0; i < x.Data.Length; i++) y.Data[i] = T.Round(x.Data[i], MidpointRounding.ToEven);
        Record(y, g => TensorPrimitives.Add(x.G, g, x.G));
        return y;
    }

    /// <summary>y = x + c for a constant array c of the same shape (e.g. sampled noise).</summary>
    public Var<T> AddConstant(Var<T> x, T[] c)
    {
        Check(c.Length == x.Data.Length, "add constant: length differs");
        var y = Output(x.Rows, x.Cols, x.RequiresGrad);
        TensorPrimitives.Add(x.Data, c, y.Data);
        Record(y, g => TensorPrimitives.Add(x.G, g, x.G));
        return y;
    }

    public Var<T> Add(Var<T> a, Var<T> b)
    {
        Check(a.Rows == b.Rows && a.Cols == b.Cols, $"add: [{a.Rows},{a.Cols}] vs [{b.Rows},{b.Cols}]");
        var y = Output(a.Rows, a.Cols, a.RequiresGrad || b.RequiresGrad);
        TensorPrimitives.Add(a.Data, b.Data, y.Data);
        Record(y, g =>
        {
            if (a.RequiresGrad) TensorPrimitives.Add(a.G, g, a.G);
            if (b.RequiresGrad) TensorPrimitives.Add(b.G, g, b.G);
        });
        return y;
    }

    public Var<T> Sub(Var<T> a, Var<T> b)
    {
        Check(a.Rows == b.Rows && a.Cols == b.Cols, $"sub: [{a.Rows},{a.Cols}] vs [{b.Rows},{b.Cols}]");
        var y = Output(a.Rows, a.Cols, a.RequiresGrad || b.RequiresGrad);
        TensorPrimitives.Subtract(a.Data, b.Data, y.Data);
        Record(y, g =>
        {
            if (a.RequiresGrad) TensorPrimitives.Add(a.G, g, a.G);
            if (b.RequiresGrad) TensorPrimitives.Subtract(b.G, g, b.G);
        });
        return y;
    }

    /// <summary>Elementwise product of equal shapes.</summary>
    public Var<T> Mul(Var<T> a, Var<T> b)
    {
        Check(a.Rows == b.Rows && a.Cols == b.Cols, $"mul: [{a.Rows},{a.Cols}] vs [{b.Rows},{b.Cols}]");
        var y = Output(a.Rows, a.Cols, a.RequiresGrad || b.RequiresGrad);
        TensorPrimitives.Multiply(a.Data, b.Data, y.Data);
        Record(y, g =>
        {
            if (a.RequiresGrad) TensorPrimitives.MultiplyAdd(g, b.Data, a.G, a.G);
            if (b.RequiresGrad) TensorPrimitives.MultiplyAdd(g, a.Data, b.G, b.G);
        });
        return y;
    }

    /// <summary>Multiplies every row of x [R,C] by the mask row m [1,C] (a pruning mask on channels).</summary>
    public Var<T> MaskColumns(Var<T> x, Var<T> m)
    {
        int rows = x.Rows, c = x.Cols;
        Check(m.Data.Length == c, $"mask: x has {c} columns, the mask {m.Data.Length}");
        var y = Output(rows, c, x.RequiresGrad || m.RequiresGrad);
        for (int r = 0; r < rows; r++) TensorPrimitives.Multiply(x.Data.AsSpan(r * c, c), m.Data, y.Data.AsSpan(r * c, c));
        Record(y, g =>
        {
            for (int r = 0; r < rows; r++)
            {
                var gr = g.AsSpan(r * c, c);
                if (x.RequiresGrad) TensorPrimitives.MultiplyAdd(gr, m.Data, x.G.AsSpan(r * c, c), x.G.AsSpan(r * c, c));
                if (m.RequiresGrad) TensorPrimitives.MultiplyAdd(gr, x.Data.AsSpan(r * c, c), m.G, m.G);
            }
        });
        return y;
    }

    /// <summary>SwiGLU: silu(gate) · up.</summary>
    public Var<T> SiluMul(Var<T> gate, Var<T> up)
    {
        Check(gate.Data.Length == up.Data.Length, "silu-mul: gate and up differ in size");
        var y = Output(gate.Rows, gate.Cols, gate.RequiresGrad || up.RequiresGrad);
        var sig = Allocate(gate.Data.Length);
        for (int i = 0; i < sig.Length; i++)
        {
            T gv = gate.Data[i];
            sig[i] = T.One / (T.One + T.Exp(-gv));
            y.Data[i] = gv * sig[i] * up.Data[i];
        }
        Record(y, g =>
        {
            for (int i = 0; i < sig.Length; i++)
            {
                T gv = gate.Data[i], s = sig[i];
                if (gate.RequiresGrad) gate.G[i] += g[i] * up.Data[i] * s * (T.One + gv * (T.One - s));
                if (up.RequiresGrad) up.G[i] += g[i] * gv * s;
            }
        });
        return y;
    }

    // ---------------------------------------------------------------- shape

    /// <summary>Row i of x as [1, C].</summary>
    public Var<T> Row(Var<T> x, int i)
    {
        int c = x.Cols;
        var y = Output(1, c, x.RequiresGrad);
        x.Data.AsSpan(i * c, c).CopyTo(y.Data);
        Record(y, g => TensorPrimitives.Add(x.G.AsSpan(i * c, c), g, x.G.AsSpan(i * c, c)));
        return y;
    }

    /// <summary>Columns [start, start+width) of x.</summary>
    public Var<T> Columns(Var<T> x, int start, int width)
    {
        int rows = x.Rows, c = x.Cols;
        Check(start >= 0 && start + width <= c, "columns: range outside the matrix");
        var y = Output(rows, width, x.RequiresGrad);
        for (int r = 0; r < rows; r++) x.Data.AsSpan(r * c + start, width).CopyTo(y.Data.AsSpan(r * width, width));
        Record(y, g =>
        {
            for (int r = 0; r < rows; r++)
            {
                var dst = x.G.AsSpan(r * c + start, width);
                TensorPrimitives.Add(dst, g.AsSpan(r * width, width), dst);
            }
        });
        return y;
    }

    /// <summary>[a | b] side by side (equal row counts).</summary>
    public Var<T> ConcatColumns(Var<T> a, Var<T> b)
    {
        Check(a.Rows == b.Rows, "concat: row counts differ");
        int rows = a.Rows, ca = a.Cols, cb = b.Cols, c = ca + cb;
        var y = Output(rows, c, a.RequiresGrad || b.RequiresGrad);
        for (int r = 0; r < rows; r++)
        {
            a.Data.AsSpan(r * ca, ca).CopyTo(y.Data.AsSpan(r * c, ca));
            b.Data.AsSpan(r * cb, cb).CopyTo(y.Data.AsSpan(r * c + ca, cb));
        }
        Record(y, g =>
        {
            for (int r = 0; r < rows; r++)
            {
                if (a.RequiresGrad) TensorPrimitives.Add(a.G.AsSpan(r * ca, ca), g.AsSpan(r * c, ca), a.G.AsSpan(r * ca, ca));
                if (b.RequiresGrad) TensorPrimitives.Add(b.G.AsSpan(r * cb, cb), g.AsSpan(r * c + ca, cb), b.G.AsSpan(r * cb, cb));
            }
        });
        return y;
    }

    /// <summary>Rows of the given [1, C] values stacked into [n, C].</summary>
    public Var<T> StackRows(IReadOnlyList<Var<T>> rows)
    {
        int c = rows[0].Cols;
        foreach (var r in rows) Check(r.Rows == 1 && r.Cols == c, "stack: every row must be [1, C] of one width");
        var y = Output(rows.Count, c, rows.Any(r => r.RequiresGrad));
        for (int i = 0; i < rows.Count; i++) rows[i].Data.CopyTo(y.Data.AsSpan(i * c, c));
        Record(y, g =>
        {
            for (int i = 0; i < rows.Count; i++)
                if (rows[i].RequiresGrad) TensorPrimitives.Add(rows[i].G, g.AsSpan(i * c, c), rows[i].G);
        });
        return y;
    }

    // ---------------------------------------------------------------- language-model ops

    /// <summary>Rows of the embedding table [V, d] for each id.</summary>
    public Var<T> Embedding(Var<T> table, ReadOnlySpan<int> ids)
    {
        int d = table.Cols, vocab = table.Rows;
        var idArr = ids.ToArray();
        var y = Output(idArr.Length, d, table.RequiresGrad);
        for (int i = 0; i < idArr.Length; i++)
        {
            if ((uint)idArr[i] >= (uint)vocab) throw new DispNativeException($"token id {idArr[i]} is outside the vocabulary (size {vocab})");
            table.Data.AsSpan(idArr[i] * d, d).CopyTo(y.Data.AsSpan(i * d, d));
        }
        Record(y, g =>
        {
            for (int i = 0; i < idArr.Length; i++)
            {
                var dst = table.G.AsSpan(idArr[i] * d, d);
                TensorPrimitives.Add(dst, g.AsSpan(i * d, d), dst);
            }
        });
        return y;
    }

    /// <summary>Mean cross-entropy of logits [n, V] against targets (−1 = not scored); returns [1, 1].</summary>
    public Var<T> CrossEntropy(Var<T> logits, ReadOnlySpan<int> targets)
    {
        int n = logits.Rows, v = logits.Cols;
        Check(targets.Length == n, "cross-entropy: one target per row is required");
        var tg = targets.ToArray();
        int count = tg.Count(t => t >= 0);
        Check(count > 0, "cross-entropy: no scored targets");
        var lse = new T[n];
        T total = T.Zero;
        var tmp = Allocate(v);
        for (int r = 0; r < n; r++)
        {
            if (tg[r] < 0) continue;
            if (tg[r] >= v) throw new DispNativeException($"target id {tg[r]} is outside the vocabulary (size {v})");
            var row = logits.Data.AsSpan(r * v, v);
            T max = TensorPrimitives.Max<T>(row);
            TensorPrimitives.Subtract(row, max, tmp);
            TensorPrimitives.Exp<T>(tmp, tmp);
            lse[r] = max + T.Log(TensorPrimitives.Sum<T>(tmp));
            total += lse[r] - row[tg[r]];
        }
        var y = Output(1, 1, logits.RequiresGrad);
        T inv = T.One / C(count);
        y.Data[0] = total * inv;
        Record(y, g =>
        {
            T scale = g[0] * inv;
            for (int r = 0; r < n; r++)
            {
                if (tg[r] < 0) continue;
                var row = logits.Data.AsSpan(r * v, v);
                TensorPrimitives.Subtract(row, lse[r], tmp);
                TensorPrimitives.Exp<T>(tmp, tmp);
                var dst = logits.G.AsSpan(r * v, v);
                TensorPrimitives.MultiplyAdd(tmp, scale, dst, dst);
                dst[tg[r]] -= scale;
            }
        });
        return y;
    }
}

/// <summary>Buffers that successive tapes of the same shapes (one per training step) reuse, so that each step does not
/// fault in fresh pages for its activations and gradients: exact lengths, zeroed on <see cref="Rent"/>. Thread-safe.</summary>
public sealed class TapeBufferPool<T> where T : unmanaged
{
    private readonly Dictionary<long, Stack<T[]>> _free = [];

    /// <summary>Values in the buffers this pool has created (not reused): the high-water mark of what its tapes held.</summary>
    public long Created { get; private set; }

    public T[] Rent(long length)
    {
        lock (_free)
        {
            if (_free.TryGetValue(length, out var stack) && stack.TryPop(out var a))
            {
                Array.Clear(a);
                return a;
            }
            Created += length;
        }
        return new T[length];
    }

    public void Return(T[] buffer)
    {
        lock (_free)
        {
            if (!_free.TryGetValue(buffer.LongLength, out var stack)) _free[buffer.LongLength] = stack = new Stack<T[]>();
            stack.Push(buffer);
        }
    }
}
