using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using DispNative.Engine.Models;
using DispNative.Engine.Training;

namespace DispNative.Engine.Jobs;

/// <summary>Writes <c>report.md</c> with two SVG charts beside it: the kept width of every site across layers (the
/// paper's Figure 4 view) and the training curves.</summary>
public static class Report
{
    private static readonly string[] Colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];

    public static void Write(string dir, JsonObject metrics, ModelConfig pruned, IReadOnlyList<TrainLogEntry> log)
    {
        var widths = pruned.Disp!.Widths;
        int layers = widths.Length;
        var widthSeries = DispInfo.SiteKeys.Select((key, s) => (key, widths.Select((w, l) => ((double)l, (double)w[s] /
            (key == "mlp_mid" ? pruned.IntermediateSize : pruned.HiddenSize))).ToList())).ToList();
        File.WriteAllText(Path.Combine(dir, "widths.svg"), Chart("Kept width per site (fraction of full width)", "layer", widthSeries, 0, 1));
        var lossSeries = new List<(string, List<(double, double)>)>
        {
            ("cross-entropy", log.Select(e => ((double)e.Step, e.CrossEntropy)).ToList()),
            ("regularizer", log.Select(e => ((double)e.Step, e.RegLoss)).ToList()),
            ("kept ratio r", log.Select(e => ((double)e.Step, e.Ratio)).ToList()),
        };
        File.WriteAllText(Path.Combine(dir, "loss.svg"), Chart("Hypernetwork training", "step", lossSeries, 0, null));

        string F(string key, string fmt = "F4") => metrics[key] is JsonValue v && v.TryGetValue(out double d) ? d.ToString(fmt, CultureInfo.InvariantCulture) : metrics[key]?.ToString() ?? "";
        var sb = new StringBuilder();
        sb.AppendLine("# DISP-LLM pruning report").AppendLine();
        sb.AppendLine($"Model `{metrics["model"]}`, mode `{metrics["mode"]}`, target prune ratio {F("prune_ratio_target", "F2")}, " +
                      $"{metrics["steps"]} hypernetwork steps on {metrics["device"]} ({F("train_seconds", "F1")} s).").AppendLine();
        sb.AppendLine("| | dense | pruned |").AppendLine("|---|---:|---:|");
        sb.AppendLine($"| perplexity | {F("dense_ppl")} | {F("pruned_ppl")} |");
        sb.AppendLine($"| parameters (total) | {metrics["params_dense_total"]} | {metrics["params_pruned_total"]} |");
        sb.AppendLine($"| parameters (prunable) | {metrics["params_dense_prunable"]} | {metrics["params_pruned_prunable"]} |");
        sb.AppendLine($"| kept ratio of prunable parameters | 1 | {F("kept_ratio_prunable")} |");
        if (metrics["speed"] is JsonObject speed)
        {
            double S(string key) => speed[key]!.GetValue<double>();
            string Row(string what, string kind) => string.Create(CultureInfo.InvariantCulture,
                $"| {what}, tokens/s | {S($"dense_{kind}_tokens_per_second"):F0} | {S($"pruned_{kind}_tokens_per_second"):F0} ({S($"{kind}_speedup"):F2}×) |");
            sb.AppendLine(Row($"prefill of {speed["prompt_tokens"]} tokens", "prefill"));
            sb.AppendLine(Row("decode, one token at a time", "decode"));
            sb.AppendLine().AppendLine($"Speeds on {metrics["device"]}, measured in this run, one model after the other: the median over " +
                                       $"{speed["dense_rounds"]} (dense) and {speed["pruned_rounds"]} (pruned) rounds, each a prefill then " +
                                       $"{speed["decode_tokens"]} decode steps in a fresh KV cache (as a request is served), after untimed warm-up rounds.");
        }
        sb.AppendLine();
        sb.AppendLine("## Kept widths across layers").AppendLine().AppendLine("![kept widths](widths.svg)").AppendLine();
        sb.AppendLine("| layer | " + string.Join(" | ", DispInfo.SiteKeys) + " |").AppendLine("|---:|" + string.Concat(Enumerable.Repeat("---:|", 5)));
        for (int l = 0; l < layers; l++) sb.AppendLine($"| {l} | " + string.Join(" | ", widths[l]) + " |");
        sb.AppendLine().AppendLine("## Training curves").AppendLine().AppendLine("![training curves](loss.svg)").AppendLine();
        File.WriteAllText(Path.Combine(dir, PruneJob.ReportFile), sb.ToString());
    }

    /// <summary>A small line chart: one polyline per series, axes with min/max labels, a legend.</summary>
    public static string Chart(string title, string xLabel, IReadOnlyList<(string Name, List<(double X, double Y)> Points)> series, double? yMin, double? yMax)
    {
        const int w = 640, h = 320, left = 50, right = 150, top = 30, bottom = 40;
        var all = series.SelectMany(s => s.Points).ToList();
        double x0 = all.Count > 0 ? all.Min(p => p.X) : 0, x1 = all.Count > 0 ? all.Max(p => p.X) : 1;
        double y0 = yMin ?? (all.Count > 0 ? all.Min(p => p.Y) : 0), y1 = yMax ?? (all.Count > 0 ? all.Max(p => p.Y) : 1);
        if (x1 <= x0) x1 = x0 + 1;
        if (y1 <= y0) y1 = y0 + 1;
        string N(double v) => v.ToString("0.##", CultureInfo.InvariantCulture);
        double Px(double x) => left + (x - x0) / (x1 - x0) * (w - left - right);
        double Py(double y) => h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
        var sb = new StringBuilder();
        sb.AppendLine($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">");
        sb.AppendLine($"<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
        sb.AppendLine($"<text x=\"{w / 2}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{Escape(title)}</text>");
        sb.AppendLine($"<line x1=\"{left}\" y1=\"{h - bottom}\" x2=\"{w - right}\" y2=\"{h - bottom}\" stroke=\"black\"/>");
        sb.AppendLine($"<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{h - bottom}\" stroke=\"black\"/>");
        sb.AppendLine($"<text x=\"{left}\" y=\"{h - bottom + 15}\" text-anchor=\"middle\">{N(x0)}</text>");
        sb.AppendLine($"<text x=\"{w - right}\" y=\"{h - bottom + 15}\" text-anchor=\"middle\">{N(x1)}</text>");
        sb.AppendLine($"<text x=\"{(left + w - right) / 2}\" y=\"{h - 8}\" text-anchor=\"middle\">{Escape(xLabel)}</text>");
        sb.AppendLine($"<text x=\"{left - 5}\" y=\"{h - bottom}\" text-anchor=\"end\">{N(y0)}</text>");
        sb.AppendLine($"<text x=\"{left - 5}\" y=\"{top + 5}\" text-anchor=\"end\">{N(y1)}</text>");
        for (int i = 0; i < series.Count; i++)
        {
            string color = Colors[i % Colors.Length];
            var pts = string.Join(" ", series[i].Points.Select(p => $"{N(Px(p.X))},{N(Py(p.Y))}"));
            sb.AppendLine($"<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{pts}\"/>");
            sb.AppendLine($"<rect x=\"{w - right + 10}\" y=\"{top + 18 * i}\" width=\"12\" height=\"12\" fill=\"{color}\"/>");
            sb.AppendLine($"<text x=\"{w - right + 28}\" y=\"{top + 18 * i + 11}\">{Escape(series[i].Name)}</text>");
        }
        sb.AppendLine("</svg>");
        return sb.ToString();
    }

    private static string Escape(string s) => s.Replace("&", "&amp;").Replace("<", "&lt;").Replace(">", "&gt;");
}
