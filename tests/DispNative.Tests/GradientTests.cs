using DispNative.Engine;
using DispNative.Engine.Autograd;
using DispNative.Engine.Cpu;
using DispNative.Engine.Disp;
using DispNative.Engine.Inference;
using DispNative.Engine.Models;

namespace DispNative.Tests;

/// <summary>Finite-difference checks in float64 of every backward: f = Σ R ⊙ op(inputs) for a fixed random R,
/// central differences against the tape's gradient.</summary>
public class GradientTests
{
    private sealed record Input(double[] Data, int Rows, int Cols, bool Trainable = true);

    private static Input Rand(Rng rng, int rows, int cols, double scale = 1, bool trainable = true)
        => new(Enumerable.Range(0, rows * cols).Select(_ => scale * rng.NextGaussian()).ToArray(), rows, cols, trainable);

    /// <summary>Runs op on a fresh tape; checks up to <paramref name="probes"/> elements of every trainable input.</summary>
    private static void Check(Func<Tape<double>, Var<double>[], Var<double>> op, Input[] inputs, int probes = 24, double tol = 1e-6, ulong seed = 7)
    {
        var rng = new Rng(seed);
        double[]? weights = null;
        double Eval(out Var<double>[] vars, bool backward)
        {
            var tape = new Tape<double>();
            vars = inputs.Select(i => i.Trainable ? tape.Leaf((double[])i.Data.Clone(), i.Rows, i.Cols) : tape.Constant(i.Data, i.Rows, i.Cols)).ToArray();
            var y = op(tape, vars);
            weights ??= Enumerable.Range(0, y.Data.Length).Select(_ => (double)rng.NextGaussian()).ToArray();
            double f = 0;
            for (int i = 0; i < y.Data.Length; i++) f += weights[i] * y.Data[i];
            if (backward)
            {
                weights.CopyTo(y.G, 0);
                tape.Backward();
            }
            return f;
        }
        Eval(out var analytic, backward: true);
        const double h = 1e-6;
        for (int a = 0; a < inputs.Length; a++)
        {
            if (!inputs[a].Trainable) continue;
            var data = inputs[a].Data;
            var grad = analytic[a].Grad ?? new double[data.Length];
            var picks = data.Length <= probes ? Enumerable.Range(0, data.Length) : Enumerable.Range(0, probes).Select(_ => rng.NextInt(data.Length));
            foreach (int i in picks)
            {
                double keep = data[i];
                data[i] = keep + h; double fp = Eval(out _, false);
                data[i] = keep - h; double fm = Eval(out _, false);
                data[i] = keep;
                double fd = (fp - fm) / (2 * h);
                Assert.That(grad[i], Is.EqualTo(fd).Within(tol * Math.Max(1, Math.Abs(fd))), $"input {a} element {i}");
            }
        }
    }

    [Test] public void Linear() { var r = new Rng(1); Check((t, v) => t.Linear(v[0], v[1], v[2]), [Rand(r, 5, 7), Rand(r, 4, 7), Rand(r, 1, 4)]); }

    [Test] public void LinearFrozenWeight() { var r = new Rng(2); Check((t, v) => t.Linear(v[0], v[1]), [Rand(r, 9, 6), Rand(r, 3, 6, trainable: false)]); }

    [Test] public void RmsNorm() { var r = new Rng(3); Check((t, v) => t.RmsNorm(v[0], v[1], 1e-5), [Rand(r, 3, 8), Rand(r, 1, 8)]); }

    [Test] public void LayerNorm() { var r = new Rng(4); Check((t, v) => t.LayerNorm(v[0], v[1], v[2], 1e-5), [Rand(r, 3, 8), Rand(r, 1, 8), Rand(r, 1, 8)]); }

    [Test] public void Rope() { var r = new Rng(5); Check((t, v) => t.Rope(v[0], 2, new Rope(8, 10000)), [Rand(r, 4, 16)]); }

    [TestCase(4, 2, null)]
    [TestCase(2, 2, null)]
    [TestCase(4, 1, 3)]
    public void Attention(int heads, int kvHeads, int? window)
    {
        var r = new Rng(6);
        const int n = 6, hd = 4;
        Check((t, v) => t.Attention(v[0], v[1], v[2], heads, kvHeads, hd, window),
            [Rand(r, n, heads * hd), Rand(r, n, kvHeads * hd), Rand(r, n, kvHeads * hd)], probes: 40);
    }

    [Test] public void SiluMul() { var r = new Rng(7); Check((t, v) => t.SiluMul(v[0], v[1]), [Rand(r, 3, 5, 2), Rand(r, 3, 5)]); }

    [Test] public void Gelu() { var r = new Rng(8); Check((t, v) => t.Gelu(v[0]), [Rand(r, 4, 6, 2)]); }

    [Test] public void SigmoidTanhAffine() { var r = new Rng(9); Check((t, v) => t.Tanh(t.Sigmoid(t.Affine(v[0], 2.5, 7.5))), [Rand(r, 3, 6, 3)]); }

    [Test] public void AddSubMul() { var r = new Rng(10); Check((t, v) => t.Mul(t.Add(v[0], v[1]), t.Sub(v[1], v[2])), [Rand(r, 2, 5), Rand(r, 2, 5), Rand(r, 2, 5)]); }

    [Test] public void AddConstant() { var r = new Rng(11); var c = Rand(r, 2, 3).Data; Check((t, v) => t.Mul(t.AddConstant(v[0], c), v[0]), [Rand(r, 2, 3)]); }

    [Test] public void MaskColumns() { var r = new Rng(12); Check((t, v) => t.MaskColumns(v[0], v[1]), [Rand(r, 4, 6), Rand(r, 1, 6)]); }

    [Test] public void Embedding() { var r = new Rng(13); Check((t, v) => t.Embedding(v[0], new[] { 3, 0, 3, 2 }), [Rand(r, 5, 4)]); }

    [Test] public void CrossEntropy() { var r = new Rng(14); Check((t, v) => t.CrossEntropy(v[0], new[] { 2, -1, 0, 6 }), [Rand(r, 4, 7, 2)]); }

    [Test]
    public void RowsColumnsConcatStack()
    {
        var r = new Rng(15);
        Check((t, v) => t.StackRows([t.ConcatColumns(t.Row(v[0], 2), t.Columns(t.Row(v[1], 0), 1, 2)), t.ConcatColumns(t.Row(v[0], 0), t.Columns(t.Row(v[1], 1), 0, 2))]),
            [Rand(r, 3, 4), Rand(r, 2, 3)]);
    }

    /// <summary>A stack whose first row is frozen still passes the gradient to the trainable rows.</summary>
    [Test] public void StackRowsAfterAFrozenRow() { var r = new Rng(17); Check((t, v) => t.StackRows([v[0], v[1]]), [Rand(r, 1, 3, trainable: false), Rand(r, 1, 3)]); }

    /// <summary>Each recorded step runs once: a second <c>Backward</c>, or one after <c>ReturnBuffers</c>, adds nothing.</summary>
    [Test]
    public void Backward_RunsEachRecordedStepOnce()
    {
        var tape = new Tape<double>(new TapeBufferPool<double>());
        var x = tape.Leaf([1, 2], 1, 2);
        var y = tape.Affine(x, 2, 0);
        y.G.AsSpan().Fill(1);
        tape.Backward();
        tape.Backward();
        Assert.That(x.Grad, Is.EqualTo(new[] { 2.0, 2.0 }));

        var z = tape.Affine(x, 3, 0);
        tape.ReturnBuffers();
        z.G.AsSpan().Fill(1);
        tape.Backward();
        Assert.That(x.Grad, Is.EqualTo(new[] { 2.0, 2.0 }));
    }

    /// <summary>A leaf that the loss does not depend on gets no gradient buffer (<c>Grad</c> stays null).</summary>
    [Test]
    public void ALeafTheLossDoesNotReach_GetsNoGradient()
    {
        var tape = new Tape<double>();
        var used = tape.Leaf([1, 2], 1, 2);
        var unused = tape.Leaf([3, 4], 1, 2);
        _ = tape.Tanh(unused);
        var loss = tape.CrossEntropy(tape.Affine(used, 2, 0), [1]);
        tape.Backward(loss);
        Assert.That(used.Grad, Is.Not.Null);
        Assert.That(unused.Grad, Is.Null);
    }

    /// <summary>Shapes that do not fit, and ids outside the table, are refused naming the op, never read out of bounds or
    /// silently truncated.</summary>
    [TestCase("linear bias", typeof(ArgumentException), "linear: bias length differs from the output width")]
    [TestCase("rms gamma", typeof(ArgumentException), "rms norm: gamma length differs from the row width")]
    [TestCase("columns", typeof(ArgumentException), "columns: range outside the matrix")]
    [TestCase("concat", typeof(ArgumentException), "concat: row counts differ")]
    [TestCase("mask", typeof(ArgumentException), "mask: x has 3 columns, the mask 4")]
    [TestCase("targets short", typeof(ArgumentException), "cross-entropy: one target per row is required")]
    [TestCase("targets long", typeof(ArgumentException), "cross-entropy: one target per row is required")]
    [TestCase("no targets", typeof(ArgumentException), "cross-entropy: no scored targets")]
    [TestCase("target id", typeof(DispNativeException), "target id 3 is outside the vocabulary (size 3)")]
    [TestCase("token id", typeof(DispNativeException), "token id 3 is outside the vocabulary (size 3)")]
    [TestCase("leaf grad", typeof(ArgumentException), "gradient buffer has the wrong length")]
    public void ShapeMismatches_AreRefusedNamingTheOp(string what, Type error, string message)
    {
        var tape = new Tape<double>();
        Var<double> M(int rows, int cols) => tape.Leaf(new double[rows * cols], rows, cols);
        Action act = what switch
        {
            "linear bias" => () => tape.Linear(M(2, 3), M(4, 3), M(1, 5)),
            "rms gamma" => () => tape.RmsNorm(M(2, 3), M(1, 4), 1e-5),
            "columns" => () => tape.Columns(M(2, 3), 2, 2),
            "concat" => () => tape.ConcatColumns(M(2, 3), M(3, 3)),
            "mask" => () => tape.MaskColumns(M(2, 3), M(1, 4)),
            "targets short" => () => tape.CrossEntropy(M(2, 3), [0]),
            "targets long" => () => tape.CrossEntropy(M(2, 3), [0, 1, 2]),
            "no targets" => () => tape.CrossEntropy(M(2, 3), [-1, -1]),
            "target id" => () => tape.CrossEntropy(M(2, 3), [0, 3]),
            "token id" => () => tape.Embedding(M(3, 2), [0, 3]),
            "leaf grad" => () => tape.Leaf(new double[4], 2, 2, new double[3]),
            _ => throw new ArgumentException(what),
        };
        Assert.That(() => act(), Throws.TypeOf(error).With.Message.EqualTo(message));
    }

    [Test]
    public void RoundStraightThroughPassesGradientUnchanged()
    {
        var tape = new Tape<double>();
        var x = tape.Leaf([0.2, 0.7, 0.5, 1.5], 1, 4);
        var y = tape.RoundStraightThrough(x);
        Assert.That(y.Data, Is.EqualTo(new[] { 0.0, 1.0, 0.0, 2.0 }));
        double[] g = [1, -2, 3, 0.5];
        g.CopyTo(y.G, 0);
        tape.Backward();
        Assert.That(x.Grad, Is.EqualTo(g));
    }

    [TestCase(PruningMode.Disp, 0.5)]
    [TestCase(PruningMode.Same, 0.5)]
    [TestCase(PruningMode.Disp, 0.95)]
    public void Regularizer(PruningMode mode, double target)
    {
        var layout = new SiteLayout(TestAssets.TinyConfig(), mode);
        var r = new Rng(16);
        // Continuous "mask" values stand in for the hard masks: the regularizer is a smooth function of their sums.
        var inputs = layout.OutputWidths.Select(w => new Input(Enumerable.Range(0, w).Select(_ => 0.3 + 0.6 * r.NextDouble()).ToArray(), 1, w)).ToArray();
        Check((t, v) => layout.Regularizer(t, v, target, 6, out _), inputs, probes: 6);
    }

    [Test]
    public void RegularizerRatioCountsGqaParameters()
    {
        var c = TestAssets.TinyConfig();
        var layout = new SiteLayout(c, PruningMode.Disp);
        var tape = new Tape<double>();
        var full = layout.OutputWidths.Select(w => tape.Constant(Enumerable.Repeat(1.0, w).ToArray(), 1, w)).ToList();
        var loss = layout.Regularizer(tape, full, 0.5, 6, out double r);
        Assert.That(r, Is.EqualTo(1.0).Within(1e-12));
        Assert.That(loss.Scalar, Is.EqualTo(6 * Math.Log(2)).Within(1e-12));
        // Dense prunable parameters are exactly the q/k/v/o and MLP matrices of the config.
        double expected = c.NumLayers * ((double)c.HiddenSize * (c.QDim + 2 * c.KvDim) + c.QDim * c.HiddenSize + 3.0 * c.HiddenSize * c.IntermediateSize);
        Assert.That(layout.DenseParams, Is.EqualTo(expected));
    }

    [Test]
    public void HypernetworkParameters()
    {
        var net = new Hypernetwork<double>([5, 3, 7], seed: 3);
        var r = new Rng(17);
        var weights = net.OutputWidths.Select(w => Enumerable.Range(0, w).Select(_ => (double)r.NextGaussian()).ToArray()).ToArray();
        double Eval(bool backward)
        {
            var tape = new Tape<double>();
            var outs = net.Forward(tape);
            double f = 0;
            for (int o = 0; o < outs.Count; o++)
            {
                for (int i = 0; i < outs[o].Data.Length; i++) f += weights[o][i] * outs[o].Data[i];
                if (backward) weights[o].CopyTo(outs[o].G, 0);
            }
            if (backward) tape.Backward();
            return f;
        }
        net.ZeroGrad();
        Eval(true);
        foreach (var p in net.Parameters)
            for (int probe = 0; probe < 4; probe++)
            {
                int i = r.NextInt(p.Value.Length);
                double keep = p.Value[i];
                p.Value[i] = keep + 1e-6; double fp = Eval(false);
                p.Value[i] = keep - 1e-6; double fm = Eval(false);
                p.Value[i] = keep;
                double fd = (fp - fm) / 2e-6;
                Assert.That(p.Grad[i], Is.EqualTo(fd).Within(1e-6 * Math.Max(1, Math.Abs(fd))), $"{p.Name}[{i}]");
            }
    }

    /// <summary>The gradient reaches every mask of the masked model, with every layer's activations kept or with
    /// each layer checkpointed (its forward re-run in the backward).</summary>
    [TestCase(false)]
    [TestCase(true)]
    public void MaskedModelGradientReachesEveryMask(bool checkpointLayers)
    {
        var c = TestAssets.TinyConfig(vocab: 40) with { NumLayers = 2 };
        var model = new MaskedLlama<double>(c, ModelWeights.Random(c, 5, std: 0.2f)) { CheckpointLayers = checkpointLayers };
        var layout = new SiteLayout(c, PruningMode.Disp);
        var r = new Rng(18);
        int[] ids = [1, 5, 9, 33, 2, 17, 8];
        var inputs = layout.OutputWidths.Select(w => new Input(Enumerable.Range(0, w).Select(_ => 0.2 + 0.8 * r.NextDouble()).ToArray(), 1, w)).ToArray();
        Check((t, v) => model.Loss(t, ids, (l, kind) => v[layout.OutputOf(l, kind)]), inputs, probes: 5, tol: 1e-5);
    }

    /// <summary>Activation checkpointing: through the recomputed forward the gradient reaches the segment's input, a
    /// mask and a weight of the outer tape that the segment reads, and the mask's use after the segment.</summary>
    [Test]
    public void Checkpoint()
    {
        var r = new Rng(21);
        Check((t, v) => t.MaskColumns(t.Checkpoint(t.Linear(v[0], v[1]), (s, x) => s.MaskColumns(s.SiluMul(x, s.Linear(x, v[2])), v[3])), v[3]),
            [Rand(r, 5, 6), Rand(r, 4, 6), Rand(r, 4, 4), Rand(r, 1, 4)]);
    }

    [Test]
    public void MaskedModelWithUnitMasksMatchesInference()
    {
        var c = TestAssets.TinyConfig(vocab: 60);
        var weights = ModelWeights.Random(c, 9, std: 0.1f);
        var masked = new MaskedLlama<float>(c, weights);
        int[] ids = [1, 7, 3, 44, 12, 9, 0, 58, 21];
        var tape = new Tape<float>();
        var logits = masked.Logits(tape, ids, (l, kind) => tape.Constant(Enumerable.Repeat(1f, kind == SiteKind.MlpMid ? c.IntermediateSize : c.HiddenSize).ToArray(), 1,
            kind == SiteKind.MlpMid ? c.IntermediateSize : c.HiddenSize));
        var model = new LlamaModel(c, weights);
        var reference = model.Forward(ids, model.NewCache(ids.Length));
        for (int i = 0; i < reference.Length; i++) Assert.That(logits.Data[i], Is.EqualTo(reference[i]).Within(1e-4), $"logit {i}");
    }

    [Test]
    public void GemmWithUntransposedWeightMatchesReference()
    {
        var r = new Rng(19);
        foreach (var (m, n, k) in new[] { (3, 5, 7), (17, 40, 33), (64, 100, 530) })
        {
            var x = Enumerable.Range(0, m * k).Select(_ => r.NextGaussian()).ToArray();
            var w = Enumerable.Range(0, k * n).Select(_ => r.NextGaussian()).ToArray();
            var y = Enumerable.Repeat(1f, m * n).ToArray();
            Gemm.MatMul(x, w, y, m, n, k, accumulate: true);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                {
                    double s = 1;
                    for (int p = 0; p < k; p++) s += (double)x[i * k + p] * w[p * n + j];
                    Assert.That(y[i * n + j], Is.EqualTo(s).Within(1e-4 * Math.Sqrt(k)), $"[{m},{n},{k}] at ({i},{j})");
                }
        }
    }

    [Test]
    public void ErfMatchesKnownValues()
    {
        // erf values from tables (Abramowitz & Stegun 7.1 / high-precision references).
        Assert.That(SpecialFunctions.Erf(0.5), Is.EqualTo(0.5204998778130465).Within(1e-15));
        Assert.That(SpecialFunctions.Erf(1.0), Is.EqualTo(0.8427007929497149).Within(1e-15));
        Assert.That(SpecialFunctions.Erf(2.5), Is.EqualTo(0.9995930479825550).Within(1e-15));
        Assert.That(SpecialFunctions.Erf(-3.0), Is.EqualTo(-0.9999779095030014).Within(1e-15));
    }
}
