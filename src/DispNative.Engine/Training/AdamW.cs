using DispNative.Engine.Disp;
using DispNative.Engine.IO;

namespace DispNative.Engine.Training;

/// <summary>AdamW (decoupled weight decay, as torch.optim.AdamW): p ← p·(1 − lr·wd), then the Adam step with
/// bias-corrected moments. Optional global-norm gradient clipping.</summary>
public sealed class AdamW
{
    private readonly IReadOnlyList<Parameter<float>> _params;
    private readonly float[][] _m, _v;

    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.999;
    public double Epsilon { get; init; } = 1e-8;
    public double WeightDecay { get; init; }
    public double? ClipNorm { get; init; }
    /// <summary>Updates taken so far.</summary>
    public int Steps { get; private set; }

    public AdamW(IReadOnlyList<Parameter<float>> parameters)
    {
        _params = parameters;
        _m = parameters.Select(p => new float[p.Value.Length]).ToArray();
        _v = parameters.Select(p => new float[p.Value.Length]).ToArray();
    }

    /// <summary>One update from the parameters' gradients; returns the gradient norm before clipping.</summary>
    public double Step(double lr)
    {
        double sq = 0;
        foreach (var p in _params) foreach (var g in p.Grad) sq += (double)g * g;
        double norm = Math.Sqrt(sq);
        double scale = ClipNorm is double c && norm > c ? c / norm : 1;
        Steps++;
        double bc1 = 1 - Math.Pow(Beta1, Steps), bc2 = 1 - Math.Pow(Beta2, Steps);
        for (int i = 0; i < _params.Count; i++)
        {
            var p = _params[i].Value;
            var grad = _params[i].Grad;
            var m = _m[i];
            var v = _v[i];
            for (int j = 0; j < p.Length; j++)
            {
                double g = grad[j] * scale;
                m[j] = (float)(Beta1 * m[j] + (1 - Beta1) * g);
                v[j] = (float)(Beta2 * v[j] + (1 - Beta2) * g * g);
                double w = p[j] * (1 - lr * WeightDecay);
                p[j] = (float)(w - lr * (m[j] / bc1) / (Math.Sqrt(v[j] / bc2) + Epsilon));
            }
        }
        return norm;
    }

    public IEnumerable<TensorData> StateTensors()
    {
        for (int i = 0; i < _params.Count; i++)
        {
            yield return TensorData.FromFloat("adam.m." + _params[i].Name, _m[i], [_m[i].Length]);
            yield return TensorData.FromFloat("adam.v." + _params[i].Name, _v[i], [_v[i].Length]);
        }
    }

    public void LoadState(SafeTensorsFile file, int steps)
    {
        for (int i = 0; i < _params.Count; i++)
        {
            Hypernetwork<float>.Fill(file, "adam.m." + _params[i].Name, _m[i], file.Path);
            Hypernetwork<float>.Fill(file, "adam.v." + _params[i].Name, _v[i], file.Path);
        }
        Steps = steps;
    }
}
