using DispNative.Engine;
using DispNative.Engine.Autograd;
using DispNative.Engine.Disp;

namespace DispNative.Tests;

/// <summary>The hypernetwork and its masks against the method's formulas, recomputed here in plain loops (the gradient
/// checks cannot see a wrong constant or gate order: they only compare a backward with its own forward).</summary>
public class HypernetworkTests
{
    private static double Sigmoid(double v) => 1 / (1 + Math.Exp(-v));

    [Test]
    public void SoftMask_IsTheSigmoidOfLogitPlusNoisePlus3_Over0point4()
    {
        double[] logits = [-3, -2.6, -3.4, 0.25, -10], noise = [0, 0, 0, 0.5, 2];
        var tape = new Tape<double>();
        var withNoise = GumbelSigmoid.Soft(tape, tape.Constant(logits, 1, 5), noise);
        var without = GumbelSigmoid.Soft(tape, tape.Constant(logits, 1, 5), null);
        for (int i = 0; i < logits.Length; i++)
        {
            Assert.That(withNoise.Data[i], Is.EqualTo(Sigmoid((logits[i] + noise[i] + 3.0) / 0.4)).Within(1e-15), $"channel {i}");
            Assert.That(without.Data[i], Is.EqualTo(Sigmoid((logits[i] + 3.0) / 0.4)).Within(1e-15), $"channel {i} without noise");
        }
        Assert.That(without.Data[0], Is.EqualTo(0.5), "logit −3 sits on the threshold");
    }

    [Test]
    public void HardMask_KeepsTheChannelsWhoseShiftedScoreIsPositive()
    {
        float[] logits = [-2.9f, -3.1f, 1f, -3.05f, -2.95f], noise = [0, 0, 0, 0.1f, -0.1f];
        Assert.That(GumbelSigmoid.Hard<float>(logits, noise), Is.EqualTo(new[] { true, false, true, true, false }));
        Assert.That(GumbelSigmoid.Hard<float>(logits, default), Is.EqualTo(new[] { true, false, true, false, true }), "g = 0");
    }

    [Test]
    public void HardMask_ThatWouldKeepNothing_KeepsItsHighestScoringChannel()
    {
        float[] logits = [-5, -4, -6];
        Assert.That(GumbelSigmoid.Hard<float>(logits, default), Is.EqualTo(new[] { false, true, false }));
        // The score includes the noise: channel 2's −6 + 2.5 + 3 beats channel 1's −4 + 3.
        Assert.That(GumbelSigmoid.Hard<float>(logits, [0f, 0f, 2.5f]), Is.EqualTo(new[] { false, false, true }));
    }

    [Test]
    public void HardMask_ThatWouldKeepNothing_BreaksTiesTowardsTheFirstChannel_AndKeepsAWidthOneSite()
    {
        Assert.That(GumbelSigmoid.Hard<float>([-4f, -4f, -4f], default), Is.EqualTo(new[] { true, false, false }), "first of equal scores, as argmax");
        Assert.That(GumbelSigmoid.Hard<float>([-7f], default), Is.EqualTo(new[] { true }));
    }

    /// <summary>PyTorch's initialisation: GRU weights and biases U(−1/√64, 1/√64), heads U(−1/√128, 1/√128) (nn.Linear's
    /// default), LayerNorm weight 1 and bias 0; the fixed inputs N(0, 1).</summary>
    [Test]
    public void Initialisation_FollowsPyTorchsDefaults()
    {
        var net = new Hypernetwork<double>([3000, 3000], seed: 9);
        foreach (var p in net.Parameters)
        {
            double bound = p.Name.StartsWith("Bi_GRU.") ? 1 / Math.Sqrt(64) : p.Name.StartsWith("linear_list.") ? 1 / Math.Sqrt(128) : double.NaN;
            if (double.IsNaN(bound))
            {
                Assert.That(p.Value, Is.All.EqualTo(p.Name == "ln.weight" ? 1.0 : 0.0), p.Name);
                continue;
            }
            Assert.That(p.Value.Max(Math.Abs), Is.LessThanOrEqualTo(bound).And.GreaterThan(0.97 * bound), p.Name);
            Assert.That(p.Value.Average(), Is.EqualTo(0).Within(0.15 * bound), p.Name);
        }
        double mean = net.Inputs.Average(), sd = Math.Sqrt(net.Inputs.Average(v => (v - mean) * (v - mean)));
        Assert.That(mean, Is.EqualTo(0).Within(0.3), "inputs: mean of 64 N(0, 1) draws");
        Assert.That(sd, Is.EqualTo(1).Within(0.3), "inputs: their standard deviation");
    }

    /// <summary>A saved hypernetwork has the tensor names and shapes of the authors' PyTorch module's state dict (inputs
    /// [sites, 1, 32], GRU biases 1-D), so either side can read the other's file.</summary>
    [Test]
    public void SavedTensors_HaveThePyTorchModulesShapes()
    {
        var path = Path.Combine(TestAssets.TempDir(), "h.safetensors");
        new Hypernetwork<float>([48, 80], seed: 1).Save(path);
        using var file = Engine.IO.SafeTensorsFile.Open(path);
        var shapes = file.Tensors.ToDictionary(t => t.Name, t => t.ShapeText);
        Assert.That(shapes, Is.EquivalentTo(new Dictionary<string, string>
        {
            ["inputs"] = "[2, 1, 32]",
            ["Bi_GRU.weight_ih_l0"] = "[192, 32]", ["Bi_GRU.weight_hh_l0"] = "[192, 64]", ["Bi_GRU.bias_ih_l0"] = "[192]", ["Bi_GRU.bias_hh_l0"] = "[192]",
            ["Bi_GRU.weight_ih_l0_reverse"] = "[192, 32]", ["Bi_GRU.weight_hh_l0_reverse"] = "[192, 64]",
            ["Bi_GRU.bias_ih_l0_reverse"] = "[192]", ["Bi_GRU.bias_hh_l0_reverse"] = "[192]",
            ["ln.weight"] = "[128]", ["ln.bias"] = "[128]", ["linear_list.0.weight"] = "[48, 128]", ["linear_list.1.weight"] = "[80, 128]",
        }));
    }

    [Test]
    public void Noise_IsStandardGumbel()
    {
        const int n = 400_000;
        var g = GumbelSigmoid.Noise<double>(new Rng(5), n);
        double mean = g.Average(), variance = g.Sum(v => (v - mean) * (v - mean)) / (n - 1);
        Assert.That(mean, Is.EqualTo(0.5772156649).Within(0.01), "mean: the Euler–Mascheroni constant");
        Assert.That(variance, Is.EqualTo(Math.PI * Math.PI / 6).Within(0.03), "variance π²/6");
        Assert.That(g.Count(v => v < 0) / (double)n, Is.EqualTo(Math.Exp(-1)).Within(0.003), "P(g < 0) = exp(−exp(0))");
        Assert.That(g.Count(v => v < 2) / (double)n, Is.EqualTo(Math.Exp(-Math.Exp(-2))).Within(0.003), "P(g < 2)");
    }

    /// <summary>PyTorch's GRU (gates r, z, n; n = tanh(W_in x + b_in + r·(W_hn h + b_hn)); h' = (1 − z)·n + z·h), both
    /// directions from h = 0, LayerNorm (biased variance, eps 1e-5), exact GELU and the bias-free heads.</summary>
    [Test]
    public void Forward_MatchesThePlainRecomputation()
    {
        int[] widths = [3, 7, 2, 5];
        var net = new Hypernetwork<double>(widths, seed: 4);
        var rng = new Rng(9);
        var p = net.Parameters.ToDictionary(q => q.Name, q => q.Value);
        foreach (var name in new[] { "ln.weight", "ln.bias" })
            for (int i = 0; i < p[name].Length; i++) p[name][i] = 0.5 + rng.NextDouble();   // not the identity

        int s = widths.Length, h = Hypernetwork<double>.HiddenSize, input = Hypernetwork<double>.InputSize;
        double[] x = net.Inputs;
        var hidden = new double[s][];
        for (int t = 0; t < s; t++) hidden[t] = new double[2 * h];
        foreach (var (suffix, offset) in new[] { ("", 0), ("_reverse", h) })
        {
            double[] wih = p["Bi_GRU.weight_ih_l0" + suffix], whh = p["Bi_GRU.weight_hh_l0" + suffix],
                     bih = p["Bi_GRU.bias_ih_l0" + suffix], bhh = p["Bi_GRU.bias_hh_l0" + suffix];
            var state = new double[h];
            for (int step = 0; step < s; step++)
            {
                int t = offset == 0 ? step : s - 1 - step;
                double Gi(int row) { double a = bih[row]; for (int k = 0; k < input; k++) a += wih[row * input + k] * x[t * input + k]; return a; }
                double Gh(int row) { double a = bhh[row]; for (int k = 0; k < h; k++) a += whh[row * h + k] * state[k]; return a; }
                var next = new double[h];
                for (int j = 0; j < h; j++)
                {
                    double r = Sigmoid(Gi(j) + Gh(j)), z = Sigmoid(Gi(h + j) + Gh(h + j));
                    double nn = Math.Tanh(Gi(2 * h + j) + r * Gh(2 * h + j));
                    next[j] = (1 - z) * nn + z * state[j];
                }
                state = next;
                Array.Copy(state, 0, hidden[t], offset, h);
            }
        }

        var outputs = net.Forward(new Tape<double>());
        for (int t = 0; t < s; t++)
        {
            double mean = hidden[t].Average(), variance = hidden[t].Sum(v => (v - mean) * (v - mean)) / (2 * h);
            var feature = new double[2 * h];
            for (int j = 0; j < 2 * h; j++)
            {
                double ln = (hidden[t][j] - mean) / Math.Sqrt(variance + 1e-5) * p["ln.weight"][j] + p["ln.bias"][j];
                feature[j] = 0.5 * ln * (1 + SpecialFunctions.Erf(ln / Math.Sqrt(2)));
            }
            double[] head = p[$"linear_list.{t}.weight"];
            Assert.That(outputs[t].Data.Length, Is.EqualTo(widths[t]));
            for (int o = 0; o < widths[t]; o++)
            {
                double expected = 0;
                for (int j = 0; j < 2 * h; j++) expected += head[o * 2 * h + j] * feature[j];
                Assert.That(outputs[t].Data[o], Is.EqualTo(expected).Within(1e-12), $"output {t} channel {o}");
            }
        }
    }

    /// <summary>Pruning takes the hard masks with Gumbel noise drawn from the saved seed (as the reference code does), or
    /// with g = 0 when deterministic, which no seed changes.</summary>
    [Test]
    public void PruningPlan_DrawsItsNoiseFromTheSeed_OrNoneWhenDeterministic()
    {
        var layout = new SiteLayout(TestAssets.TinyConfig(), PruningMode.Disp);
        var net = new Hypernetwork<float>(layout.OutputWidths, seed: 2);
        foreach (var head in net.Parameters.Where(p => p.Name.StartsWith("linear_list.")))
            for (int i = 0; i < head.Value.Length; i++) head.Value[i] *= 12;   // logits of a few units: some near the threshold −3
        var logits = net.Forward(new Tape<float>());
        var noiseFree = PruningPlan.FromMasks(layout, logits.Select(l => GumbelSigmoid.Hard<float>(l.Data, default)).ToList());
        var rng = new Rng(8);
        var noisy = PruningPlan.FromMasks(layout, logits.Select(l => GumbelSigmoid.Hard<float>(l.Data, GumbelSigmoid.Noise<float>(rng, l.Cols))).ToList());
        Assert.That(PruningPlan.FromHypernetwork(net, layout, deterministic: true, seed: 8).Indices, Is.EqualTo(noiseFree.Indices));
        Assert.That(PruningPlan.FromHypernetwork(net, layout, deterministic: true, seed: 9).Indices, Is.EqualTo(noiseFree.Indices));
        Assert.That(PruningPlan.FromHypernetwork(net, layout, deterministic: false, seed: 8).Indices, Is.EqualTo(noisy.Indices));
        Assert.That(noisy.Indices, Is.Not.EqualTo(noiseFree.Indices), "the noise moves some channels across the threshold");
    }

    /// <summary>A saved hypernetwork's metadata is checked before pruning uses it: the mode, the target ratio inside (0, 1)
    /// and outputs that fit the model in that mode.</summary>
    [TestCase(null, 0.5, "metadata field 'mode' is missing (expected disp or same)")]
    [TestCase("half", 0.5, "metadata field 'mode' is 'half' (expected disp or same)")]
    [TestCase("disp", 0.0, "metadata field 'prune_ratio' is 0, outside (0, 1)")]
    [TestCase("disp", 1.0, "metadata field 'prune_ratio' is 1, outside (0, 1)")]
    [TestCase("same", 0.5, "the hypernetwork has 10 outputs of widths [48, 48, 48, 80, 48, …] but this model and mode need 3 outputs of widths [48, 80, 80]")]
    public void SavedMetadata_ThatDoesNotFit_IsNamed(string? mode, double ratio, string message)
    {
        var config = TestAssets.TinyConfig();
        var path = Path.Combine(TestAssets.TempDir(), "h.safetensors");
        var meta = new System.Text.Json.Nodes.JsonObject { ["prune_ratio"] = ratio };
        if (mode != null) meta["mode"] = mode;
        new Hypernetwork<float>(new SiteLayout(config, PruningMode.Disp).OutputWidths, seed: 1).Save(path, meta);
        Assert.That(Assert.Throws<Engine.ModelFormatException>(() => SavedHypernetwork.Load(path, config))!.Message, Is.EqualTo($"{path}: {message}"));
    }
}
