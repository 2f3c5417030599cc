namespace DispNative.KernelBench;

/// <summary>The issues' acceptance targets beside what a benchmark measured, printed at the end as one line each with
/// "met" or "MISSED". The targets are stated for LLaMA-2-7B shapes at 2048 tokens: other shapes (and <c>--smoke</c>)
/// print the figures without a verdict.</summary>
internal sealed class IssueTargets(bool applies)
{
    private readonly List<(string Issue, string Target, string Measured, bool Met)> _rows = [];

    /// <summary>Records <paramref name="measured"/> ≥ <paramref name="threshold"/>; null (a peak the driver does not
    /// report) records nothing.</summary>
    public void AtLeast(int issue, string target, double? measured, double threshold, Func<double, string> format)
    {
        if (measured is double m) _rows.Add(($"issue {issue}", target, format(m), m >= threshold));
    }

    public void AtMost(int issue, string target, double measured, double threshold, Func<double, string> format)
        => _rows.Add(($"issue {issue}", target, format(measured), measured <= threshold));

    public void Print()
    {
        if (_rows.Count == 0) return;
        Console.WriteLine();
        Console.WriteLine(applies ? "acceptance targets (LLaMA-2-7B shape, 2048 tokens):"
                                  : "acceptance targets: not judged here (they are stated for LLaMA-2-7B shape at 2048 tokens)");
        foreach (var r in _rows)
            Console.WriteLine($"  {r.Issue}: {r.Target,-66} {r.Measured,14}  {(applies ? r.Met ? "met" : "MISSED" : "-")}");
        if (applies) Console.WriteLine($"  {_rows.Count(r => r.Met)} met, {_rows.Count(r => !r.Met)} missed");
    }

    public static bool AppliesTo(Engine.Models.ModelConfig shape, int tokens) => shape == BenchShapes.Llama2_7B && tokens == 2048;
}
