using System.Numerics;
using System.Text.Json;
using System.Text.Json.Nodes;
using DispNative.Engine.Autograd;
using DispNative.Engine.IO;

namespace DispNative.Engine.Disp;

/// <summary>A named trainable array with its gradient buffer.</summary>
public sealed class Parameter<T> where T : unmanaged, IFloatingPointIeee754<T>
{
    public Parameter(string name, int rows, int cols) : this(name, rows, cols, new T[(long)rows * cols]) { }

    /// <summary>Wraps an existing array (trained in place).</summary>
    public Parameter(string name, int rows, int cols, T[] value)
    {
        if ((long)rows * cols != value.Length) throw new ArgumentException($"{name}: {value.Length} values are not [{rows}, {cols}]");
        Name = name; Rows = rows; Cols = cols;
        Value = value;
        Grad = new T[Value.Length];
    }

    public string Name { get; }
    public int Rows { get; }
    public int Cols { get; }
    public T[] Value { get; }
    public T[] Grad { get; }

    public Var<T> On(Tape<T> tape) => tape.Leaf(Value, Rows, Cols, Grad);

    public void ZeroGrad() => Array.Clear(Grad);
}

/// <summary>The DISP-LLM hypernetwork: fixed N(0,1) inputs [outputs, 32] (one per pruning output, not trained) →
/// bidirectional GRU (hidden 64 per direction) over the outputs as a sequence → LayerNorm(128) → GELU → one
/// bias-free Linear(128 → width) per output → mask logits. Parameter names follow PyTorch.</summary>
public sealed class Hypernetwork<T> where T : unmanaged, IFloatingPointIeee754<T>
{
    public const int InputSize = 32, HiddenSize = 64;
    public const string FormatName = "dispnative-hypernetwork";

    private readonly Parameter<T>[] _gru;     // w_ih, w_hh, b_ih, b_hh, then the reverse direction
    private readonly Parameter<T> _lnWeight, _lnBias;
    private readonly Parameter<T>[] _heads;

    /// <summary>The fixed inputs [outputs, 32].</summary>
    public T[] Inputs { get; }
    public IReadOnlyList<int> OutputWidths { get; }
    public IReadOnlyList<Parameter<T>> Parameters { get; }

    public Hypernetwork(IReadOnlyList<int> outputWidths, ulong seed)
    {
        if (outputWidths.Count == 0) throw new ArgumentException("a hypernetwork needs at least one output");
        OutputWidths = outputWidths.ToArray();
        int s = outputWidths.Count, h = HiddenSize, g = 3 * h;
        var rng = new Rng(seed);
        Inputs = new T[s * InputSize];
        for (int i = 0; i < Inputs.Length; i++) Inputs[i] = T.CreateChecked(rng.NextGaussian());
        var gru = new List<Parameter<T>>();
        foreach (var suffix in new[] { "", "_reverse" })
        {
            gru.Add(new Parameter<T>($"Bi_GRU.weight_ih_l0{suffix}", g, InputSize));
            gru.Add(new Parameter<T>($"Bi_GRU.weight_hh_l0{suffix}", g, h));
            gru.Add(new Parameter<T>($"Bi_GRU.bias_ih_l0{suffix}", 1, g));
            gru.Add(new Parameter<T>($"Bi_GRU.bias_hh_l0{suffix}", 1, g));
        }
        _gru = gru.ToArray();
        double bound = 1 / Math.Sqrt(h);       // PyTorch's GRU init: U(−1/√hidden, 1/√hidden)
        foreach (var p in _gru) Uniform(p, bound, rng);
        _lnWeight = new Parameter<T>("ln.weight", 1, 2 * h);
        _lnBias = new Parameter<T>("ln.bias", 1, 2 * h);
        Array.Fill(_lnWeight.Value, T.One);
        _heads = new Parameter<T>[s];
        for (int i = 0; i < s; i++)
        {
            _heads[i] = new Parameter<T>($"linear_list.{i}.weight", outputWidths[i], 2 * h);
            Uniform(_heads[i], 1 / Math.Sqrt(2 * h), rng);   // nn.Linear's default bound 1/√fan_in
        }
        Parameters = [.. _gru, _lnWeight, _lnBias, .. _heads];
    }

    private static void Uniform(Parameter<T> p, double bound, Rng rng)
    {
        for (int i = 0; i < p.Value.Length; i++) p.Value[i] = T.CreateChecked((2 * rng.NextDouble() - 1) * bound);
    }

    public void ZeroGrad() { foreach (var p in Parameters) p.ZeroGrad(); }

    /// <summary>Mask logits, one [1, width] value per output.</summary>
    public IReadOnlyList<Var<T>> Forward(Tape<T> tape)
    {
        int s = OutputWidths.Count;
        var x = tape.Constant(Inputs, s, InputSize);
        var fwd = Direction(tape, x, 0, reverse: false);
        var bwd = Direction(tape, x, 4, reverse: true);
        var seq = tape.StackRows(Enumerable.Range(0, s).Select(t => tape.ConcatColumns(fwd[t], bwd[t])).ToList());
        var feat = tape.Gelu(tape.LayerNorm(seq, _lnWeight.On(tape), _lnBias.On(tape), 1e-5));
        return Enumerable.Range(0, s).Select(i => tape.Linear(tape.Row(feat, i), _heads[i].On(tape))).ToList();
    }

    /// <summary>One GRU direction (PyTorch equations, gate order r, z, n); returns h_t per position.</summary>
    private Var<T>[] Direction(Tape<T> tape, Var<T> x, int p0, bool reverse)
    {
        int s = x.Rows, h = HiddenSize;
        var wih = _gru[p0].On(tape);
        var whh = _gru[p0 + 1].On(tape);
        var bih = _gru[p0 + 2].On(tape);
        var bhh = _gru[p0 + 3].On(tape);
        var gi = tape.Linear(x, wih, bih);
        var state = tape.Constant(new T[h], 1, h);
        var outputs = new Var<T>[s];
        for (int step = 0; step < s; step++)
        {
            int t = reverse ? s - 1 - step : step;
            var git = tape.Row(gi, t);
            var gh = tape.Linear(state, whh, bhh);
            var r = tape.Sigmoid(tape.Add(tape.Columns(git, 0, h), tape.Columns(gh, 0, h)));
            var z = tape.Sigmoid(tape.Add(tape.Columns(git, h, h), tape.Columns(gh, h, h)));
            var n = tape.Tanh(tape.Add(tape.Columns(git, 2 * h, h), tape.Mul(r, tape.Columns(gh, 2 * h, h))));
            state = tape.Add(n, tape.Mul(z, tape.Sub(state, n)));     // (1 − z)·n + z·h
            outputs[t] = state;
        }
        return outputs;
    }

    /// <summary>Saves parameters and inputs; the metadata records the output widths and any extra fields.</summary>
    public void Save(string path, JsonObject? extra = null)
    {
        var meta = new JsonObject
        {
            ["format"] = FormatName,
            ["version"] = 1,
            ["output_widths"] = new JsonArray(OutputWidths.Select(w => (JsonNode)w).ToArray()),
        };
        if (extra != null) foreach (var (k, v) in extra) meta[k] = v?.DeepClone();
        var tensors = new List<TensorData> { TensorData.FromFloat("inputs", ToFloat(Inputs), [OutputWidths.Count, 1, InputSize]) };
        foreach (var p in Parameters)
            tensors.Add(TensorData.FromFloat(p.Name, ToFloat(p.Value), p.Rows == 1 ? [p.Cols] : [p.Rows, p.Cols]));
        SafeTensorsWriter.Write(path, tensors, new Dictionary<string, string> { [FormatName] = meta.ToJsonString() });
    }

    /// <summary>Reads the metadata of a saved hypernetwork.</summary>
    public static JsonObject ReadMetadata(string path)
    {
        using var file = SafeTensorsFile.Open(path);
        if (!file.Metadata.TryGetValue(FormatName, out var json))
            throw new ModelFormatException($"{path}: not a DispNative hypernetwork (no '{FormatName}' metadata)");
        try
        {
            return JsonNode.Parse(json, null, JsonFields.Strict) as JsonObject ?? throw new ModelFormatException($"{path}: hypernetwork metadata is not a JSON object");
        }
        catch (JsonException e) { throw new ModelFormatException($"{path}: hypernetwork metadata is not valid JSON ({e.Message})"); }
    }

    /// <summary>Loads a saved hypernetwork; its outputs must have <paramref name="expectedWidths"/>.</summary>
    public static Hypernetwork<T> Load(string path, IReadOnlyList<int> expectedWidths)
    {
        var meta = ReadMetadata(path);
        var widths = meta["output_widths"] is JsonArray list ? list.Select(n => JsonFields.Element<int>(n, "output_widths", path)).ToArray()
                     : throw new ModelFormatException($"{path}: metadata lacks output_widths");
        if (!widths.SequenceEqual(expectedWidths))
            throw new ModelFormatException($"{path}: the hypernetwork has {widths.Length} outputs of widths [{Summarize(widths)}] " +
                                           $"but this model and mode need {expectedWidths.Count} outputs of widths [{Summarize(expectedWidths)}]");
        var net = new Hypernetwork<T>(widths, 0);
        using var file = SafeTensorsFile.Open(path);
        Fill(file, "inputs", net.Inputs, path);
        foreach (var p in net.Parameters) Fill(file, p.Name, p.Value, path);
        return net;
    }

    private static string Summarize(IReadOnlyList<int> w) => w.Count <= 6 ? string.Join(", ", w) : string.Join(", ", w.Take(5)) + ", …";

    internal static void Fill(SafeTensorsFile file, string name, T[] dst, string path)
    {
        if (!file.Contains(name)) throw new ModelFormatException($"{path}: tensor '{name}' is missing");
        var values = file.ReadFloat32(name);
        if (values.Length != dst.Length) throw new ModelFormatException($"{path}: tensor '{name}' has {values.Length} values, expected {dst.Length}");
        for (int i = 0; i < dst.Length; i++) dst[i] = T.CreateChecked(values[i]);
    }

    internal static float[] ToFloat(T[] a)
    {
        if (a is float[] f) return f;
        return a.Select(v => float.CreateChecked(v)).ToArray();
    }
}
