using System.Numerics;
using DispNative.Engine.Autograd;
using DispNative.Engine.Models;

namespace DispNative.Engine.Disp;

/// <summary>The five pruning sites of a decoder layer (DISP-LLM S1–S5).</summary>
public enum SiteKind { AttnIn, AttnOut, MlpIn, MlpMid, MlpOut }

/// <summary><c>disp</c>: every site of every layer has its own mask. <c>same</c>: one embedding-channel mask shared
/// by all embedding-width sites of all layers (regular, dimension-dependent structural pruning); the MLP
/// middle stays per layer.</summary>
public enum PruningMode { Disp, Same }

/// <summary>Maps (layer, site) to the hypernetwork output that gives its mask, and counts prunable parameters.</summary>
public sealed class SiteLayout
{
    public static readonly SiteKind[] Kinds = Enum.GetValues<SiteKind>();

    private readonly int[,] _output;

    public ModelConfig Config { get; }
    public PruningMode Mode { get; }
    /// <summary>Width of each hypernetwork output (one mask per output).</summary>
    public IReadOnlyList<int> OutputWidths { get; }
    /// <summary>A readable name per output ("layer 3 attn_in", "shared embedding").</summary>
    public IReadOnlyList<string> OutputNames { get; }

    public SiteLayout(ModelConfig config, PruningMode mode)
    {
        Config = config;
        Mode = mode;
        int layers = config.NumLayers;
        _output = new int[layers, Kinds.Length];
        var widths = new List<int>();
        var names = new List<string>();
        if (mode == PruningMode.Disp)
        {
            for (int l = 0; l < layers; l++)
                foreach (var kind in Kinds)
                {
                    _output[l, (int)kind] = widths.Count;
                    widths.Add(Width(kind));
                    names.Add($"layer {l} {SiteName(kind)}");
                }
        }
        else
        {
            widths.Add(config.HiddenSize);
            names.Add("shared embedding");
            for (int l = 0; l < layers; l++)
            {
                foreach (var kind in Kinds) _output[l, (int)kind] = 0;
                _output[l, (int)SiteKind.MlpMid] = widths.Count;
                widths.Add(config.IntermediateSize);
                names.Add($"layer {l} mlp_mid");
            }
        }
        OutputWidths = widths;
        OutputNames = names;
    }

    public int Width(SiteKind kind) => kind == SiteKind.MlpMid ? Config.IntermediateSize : Config.HiddenSize;

    public int OutputOf(int layer, SiteKind kind) => _output[layer, (int)kind];

    public static string SiteName(SiteKind kind) => kind switch
    {
        SiteKind.AttnIn => "attn_in", SiteKind.AttnOut => "attn_out", SiteKind.MlpIn => "mlp_in",
        SiteKind.MlpMid => "mlp_mid", _ => "mlp_out",
    };

    public static PruningMode ParseMode(string text) => text.Trim().ToLowerInvariant() switch
    {
        "disp" => PruningMode.Disp,
        "same" => PruningMode.Same,
        _ => throw new InvalidSettingException($"unknown pruning mode '{text}' (expected disp or same)"),
    };

    /// <summary>Prunable parameters of one layer kept at the given widths: attention
    /// <c>in·(q_dim + 2·kv_dim) + out·q_dim</c> (GQA-aware), MLP <c>in·mid·2 + mid·out</c>.</summary>
    public double LayerParams(double attnIn, double attnOut, double mlpIn, double mlpMid, double mlpOut)
    {
        double q = Config.QDim, kv = Config.KvDim;
        return attnIn * (q + 2 * kv) + attnOut * q + mlpIn * mlpMid * 2 + mlpMid * mlpOut;
    }

    /// <summary>Prunable parameters of the dense model.</summary>
    public double DenseParams
    {
        get
        {
            double d = Config.HiddenSize;
            return Config.NumLayers * LayerParams(d, d, d, Config.IntermediateSize, d);
        }
    }

    /// <summary>Kept/dense ratio of prunable parameters for per-(layer, site) widths [layers, 5].</summary>
    public double KeptRatio(int[,] widths)
    {
        double kept = 0;
        for (int l = 0; l < Config.NumLayers; l++)
            kept += LayerParams(widths[l, 0], widths[l, 1], widths[l, 2], widths[l, 3], widths[l, 4]);
        return kept / DenseParams;
    }

    /// <summary>The DISP-LLM regularizer <c>λ·log(max(r,p)/min(r,p))</c> on [1,1], where r is the kept ratio
    /// computed from the hard masks (one per output) and p the target ratio. Its gradient reaches every mask
    /// element through ∂r/∂(kept width); <paramref name="ratio"/> returns r.</summary>
    public Var<T> Regularizer<T>(Tape<T> tape, IReadOnlyList<Var<T>> hardMasks, double target, double lambda, out double ratio)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        if (hardMasks.Count != OutputWidths.Count) throw new ArgumentException($"{hardMasks.Count} masks for {OutputWidths.Count} outputs");
        var count = hardMasks.Select(m => m.Data.Sum(v => double.CreateChecked(v))).ToArray();
        int layers = Config.NumLayers;
        double q = Config.QDim, kv = Config.KvDim, dense = DenseParams, kept = 0;
        var dKept = new double[count.Length];
        for (int l = 0; l < layers; l++)
        {
            int ai = OutputOf(l, SiteKind.AttnIn), ao = OutputOf(l, SiteKind.AttnOut), mi = OutputOf(l, SiteKind.MlpIn),
                mm = OutputOf(l, SiteKind.MlpMid), mo = OutputOf(l, SiteKind.MlpOut);
            kept += LayerParams(count[ai], count[ao], count[mi], count[mm], count[mo]);
            dKept[ai] += q + 2 * kv;
            dKept[ao] += q;
            dKept[mi] += 2 * count[mm];
            dKept[mm] += 2 * count[mi] + count[mo];
            dKept[mo] += count[mm];
        }
        double r = kept / dense;
        ratio = r;
        double logRatio = Math.Log(r) - Math.Log(target);
        var loss = tape.Output(1, 1, hardMasks.Any(m => m.RequiresGrad));
        loss.Data[0] = T.CreateChecked(lambda * Math.Abs(logRatio));
        tape.Record(loss, g =>
        {
            // d/dr of λ·|log r − log p| = λ·sign(log r − log p) / r; zero exactly on target.
            double dr = double.CreateChecked(g[0]) * lambda * Math.Sign(logRatio) / r / dense;
            for (int o = 0; o < hardMasks.Count; o++)
            {
                if (!hardMasks[o].RequiresGrad) continue;
                var dm = hardMasks[o].G;
                T v = T.CreateChecked(dr * dKept[o]);
                for (int i = 0; i < dm.Length; i++) dm[i] += v;
            }
        });
        return loss;
    }
}
