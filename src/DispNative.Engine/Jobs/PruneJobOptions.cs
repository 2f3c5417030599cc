using System.Globalization;
using DispNative.Engine.Builtin;
using DispNative.Engine.Disp;
using DispNative.Engine.IO;
using DispNative.Engine.Training;
using Microsoft.Extensions.Configuration;

namespace DispNative.Engine.Jobs;

/// <summary>Everything <c>DispNative run</c> needs, read from configuration keys (<c>Model:Path</c>, <c>Training:Steps</c>, …)
/// and validated before any work starts.</summary>
public sealed record PruneJobOptions
{
    public required string ModelPath { get; init; }
    public string? TokenizerPath { get; init; }
    public string Device { get; init; } = "auto";
    /// <summary>Storage type of the saved pruned weights; null = that of the source model.</summary>
    public DType? DType { get; init; }
    public required IReadOnlyList<string> CalibrationFiles { get; init; }
    public int CalibrationBlockSize { get; init; } = 2048;
    public int? CalibrationMaxBlocks { get; init; }
    public bool DeterministicMasks { get; init; }
    /// <summary>Per-layer activation checkpointing in the LM pass of training: null = where a block's activations would
    /// not fit (see <see cref="Devices.MaskedModel"/>).</summary>
    public bool? CheckpointLayers { get; init; }
    public required TrainingOptions Training { get; init; }
    public required IReadOnlyList<string> EvaluationFiles { get; init; }
    public int EvaluationBlockSize { get; init; } = 2048;
    public int? EvaluationMaxBlocks { get; init; }
    public required string OutputDirectory { get; init; }
    public bool Overwrite { get; init; }

    /// <summary>The keys that take a list (JSON arrays; <c>Key:0</c>, <c>Key:1</c> on the command line).</summary>
    private static readonly string[] ListKeys = ["Calibration:Files", "Evaluation:Files"];
    private static readonly string[] Sections = ["Model", "Calibration", "Pruning", "Training", "Evaluation", "Output"];
    private static readonly string[] Keys =
    [
        "Model:Path", "Model:Tokenizer", "Model:Device", "Model:DType", "Calibration:Files", "Calibration:BlockSize", "Calibration:MaxBlocks",
        "Pruning:PruneRatio", "Pruning:Mode", "Pruning:Lambda", "Pruning:Deterministic", "Training:Steps", "Training:BatchSize",
        "Training:LearningRate", "Training:WeightDecay", "Training:Seed", "Training:LogEvery", "Training:CheckpointEvery",
        "Training:CosineSchedule", "Training:ClipNorm", "Training:CheckpointLayers",
        "Evaluation:Files", "Evaluation:BlockSize", "Evaluation:MaxBlocks", "Output:Directory", "Output:Overwrite",
    ];

    /// <summary>The known key a few edits away from <paramref name="key"/> (a typo), if one is.</summary>
    private static string? ClosestKey(string key)
    {
        static int Distance(string a, string b)
        {
            var row = Enumerable.Range(0, b.Length + 1).ToArray();
            for (int i = 1; i <= a.Length; i++)
            {
                int diagonal = row[0];
                row[0] = i;
                for (int j = 1; j <= b.Length; j++)
                {
                    int next = Math.Min(Math.Min(row[j], row[j - 1]) + 1, diagonal + (char.ToLowerInvariant(a[i - 1]) == char.ToLowerInvariant(b[j - 1]) ? 0 : 1));
                    (diagonal, row[j]) = (row[j], next);
                }
            }
            return row[b.Length];
        }
        var best = Keys.MinBy(k => Distance(key, k))!;
        return Distance(key, best) <= Math.Max(2, best.Length / 5) ? best : null;
    }

    /// <summary>The configuration's keys as their source spells them (the merged view's casing of a section depends on
    /// which other keys exist); a key set by several sources once, as the one that wins spells it.</summary>
    private static IEnumerable<string> KeysAsWritten(IConfiguration config)
    {
        if (config is not IConfigurationRoot root) return config.AsEnumerable().Select(kv => kv.Key);
        static IEnumerable<string> Below(IConfigurationProvider p, string? parent)
        {
            foreach (var child in p.GetChildKeys([], parent).Distinct(StringComparer.OrdinalIgnoreCase))
            {
                string path = parent == null ? child : ConfigurationPath.Combine(parent, child);
                if (p.TryGet(path, out _)) yield return path;
                foreach (var k in Below(p, path)) yield return k;
            }
        }
        var seen = new HashSet<string>(StringComparer.OrdinalIgnoreCase);
        var keys = new List<string>();
        foreach (var provider in root.Providers.Reverse())
            foreach (var key in Below(provider, null))
                if (seen.Add(key)) keys.Add(key);
        keys.Sort(StringComparer.OrdinalIgnoreCase);
        return keys;
    }

    /// <summary>Reads and validates every key; all problems are reported together, each with its key. Relative paths
    /// are taken from <paramref name="baseDirectory"/> (the configuration file's folder).</summary>
    public static PruneJobOptions FromConfiguration(IConfiguration config, string baseDirectory)
    {
        var problems = new List<string>();
        var ignoreCase = StringComparer.OrdinalIgnoreCase;
        foreach (var key in KeysAsWritten(config))
        {
            int colon = key.IndexOf(':');
            if (colon < 0)
            {
                if (Sections.Contains(key, ignoreCase))
                    problems.Add($"{key}: expected a section ({string.Join(", ", Keys.Where(k => k.StartsWith(key + ":", StringComparison.OrdinalIgnoreCase)))}), not a value");
                continue;
            }
            if (!Sections.Contains(key[..colon], ignoreCase)) continue;
            var indexed = System.Text.RegularExpressions.Regex.Match(key, @"^(.*):\d+$");
            string normalized = indexed.Success ? indexed.Groups[1].Value : key;
            if (indexed.Success && Keys.Contains(normalized, ignoreCase) && !ListKeys.Contains(normalized, ignoreCase))
            {
                string problem = $"{normalized}: expected one value, not a list";
                if (!problems.Contains(problem)) problems.Add(problem);
                continue;
            }
            if (!Keys.Contains(normalized, ignoreCase) && !Sections.Contains(normalized, ignoreCase))
                problems.Add(ClosestKey(normalized) is string near
                    ? $"{key}: unknown key (did you mean {near}?)"
                    : $"{key}: unknown key (known keys: {string.Join(", ", Keys)})");
        }

        string? Str(string key) => config[key] is { } v && v.Trim().Length > 0 ? v.Trim() : null;
        string FullPath(string value) => TinyModel.IsBuiltin(value) ? value : Path.GetFullPath(value, baseDirectory);
        string? OptPath(string key) => Str(key) is { } v ? FullPath(v) : null;   // a missing one: see Problems()
        T Parse<T>(string key, T fallback, Func<string, (bool Ok, T Value)> parse, string expected, Func<T, string?>? check = null)
        {
            var v = Str(key);
            if (v == null) return fallback;
            var (ok, value) = parse(v);
            if (!ok) { problems.Add($"{key}: '{v}' is not {expected}"); return fallback; }
            if (check?.Invoke(value) is { } bad) { problems.Add($"{key}: {bad} (got {v})"); return fallback; }
            return value;
        }
        int Int(string key, int fallback, int min) => Parse(key, fallback, s => (int.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out var i), i),
            "an integer", i => i < min ? $"must be at least {min}" : null);
        int? OptInt(string key, int min) => Str(key) == null ? null : Int(key, min, min);
        double Dbl(string key, double fallback, Func<double, string?> check) => Parse(key, fallback,
            s => (double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && double.IsFinite(d), d), "a number", check);
        bool Bool(string key) => Parse(key, false, s => (bool.TryParse(s, out var b), b), "true or false");
        string Choice(string key, string fallback, params string[] allowed) => Parse(key, fallback,
            s => (allowed.Contains(s.ToLowerInvariant()), s.ToLowerInvariant()), $"one of {string.Join(" | ", allowed)}");
        List<string> Files(string key)
        {
            var section = config.GetSection(key);
            var list = section.GetChildren().Select(c => c.Value).Where(v => !string.IsNullOrWhiteSpace(v)).Select(v => FullPath(v!.Trim())).ToList();
            if (list.Count == 0 && Str(key) is { } single) list.Add(FullPath(single));
            return list;
        }

        string? model = OptPath("Model:Path");
        string? tokenizer = OptPath("Model:Tokenizer");
        string device = Choice("Model:Device", "auto", "auto", "cpu", "cuda");
        string dtype = Choice("Model:DType", "auto", "auto", "f32", "bf16", "f16");
        var calibration = Files("Calibration:Files");
        int calBlock = Int("Calibration:BlockSize", 2048, 2);
        int? calMax = OptInt("Calibration:MaxBlocks", 1);
        var d = new TrainingOptions();
        var training = new TrainingOptions
        {
            PruneRatio = Str("Pruning:PruneRatio") == null ? Missing("Pruning:PruneRatio", problems)
                : Dbl("Pruning:PruneRatio", 0.5, r => r is > 0 and < 1 ? null : "must be strictly between 0 and 1"),
            Mode = SiteLayout.ParseMode(Choice("Pruning:Mode", "disp", "disp", "same")),
            Lambda = Dbl("Pruning:Lambda", d.Lambda, l => l > 0 ? null : "must be positive"),
            Steps = Int("Training:Steps", d.Steps, 1),
            BatchSize = Int("Training:BatchSize", d.BatchSize, 1),
            LearningRate = Dbl("Training:LearningRate", d.LearningRate, l => l > 0 ? null : "must be positive"),
            WeightDecay = Dbl("Training:WeightDecay", d.WeightDecay, w => w >= 0 ? null : "must be ≥ 0"),
            Seed = Parse("Training:Seed", 0UL, s => (ulong.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out var u), u), "a non-negative integer"),
            LogEvery = Int("Training:LogEvery", d.LogEvery, 1),
            CheckpointEvery = Int("Training:CheckpointEvery", d.CheckpointEvery, 1),
            CosineSchedule = Bool("Training:CosineSchedule"),
            ClipNorm = Str("Training:ClipNorm") == null ? null : Dbl("Training:ClipNorm", 1, c => c > 0 ? null : "must be positive"),
        };
        bool deterministic = Bool("Pruning:Deterministic");
        bool? checkpointLayers = Choice("Training:CheckpointLayers", "auto", "auto", "true", "false") switch { "true" => true, "false" => false, _ => null };
        var evaluation = Files("Evaluation:Files");
        int evalBlock = Int("Evaluation:BlockSize", 2048, 2);
        int? evalMax = OptInt("Evaluation:MaxBlocks", 1);
        string? output = OptPath("Output:Directory");
        bool overwrite = Bool("Output:Overwrite");

        var options = new PruneJobOptions
        {
            ModelPath = model ?? "", TokenizerPath = tokenizer, Device = device,
            DType = dtype switch { "f32" => IO.DType.F32, "bf16" => IO.DType.BF16, "f16" => IO.DType.F16, _ => null },
            CalibrationFiles = calibration, CalibrationBlockSize = calBlock, CalibrationMaxBlocks = calMax, DeterministicMasks = deterministic,
            Training = training, EvaluationFiles = evaluation, EvaluationBlockSize = evalBlock, EvaluationMaxBlocks = evalMax,
            OutputDirectory = output ?? "", Overwrite = overwrite, CheckpointLayers = checkpointLayers,
        };
        // What a value cannot say alone (missing paths and files, how the paths relate); a key already refused is not
        // reported again.
        static string KeyOf(string problem) => problem[..Math.Max(0, problem.IndexOf(": ", StringComparison.Ordinal))];
        var refused = problems.Select(KeyOf).ToHashSet(StringComparer.OrdinalIgnoreCase);
        problems.AddRange(options.Problems().Where(p => !refused.Contains(KeyOf(p))));
        if (problems.Count > 0) throw new InvalidSettingException("invalid configuration:\n  " + string.Join("\n  ", problems));
        return options;
    }

    /// <summary>Every problem of these options, each with its configuration key; empty when they are valid. Options made in
    /// code (a service calling <see cref="DispEngine.Prune"/>) get the same checks as a configuration file's, in
    /// <see cref="PruneJob.Run"/>.</summary>
    public List<string> Problems()
    {
        var p = new List<string>();
        void Input(string key, string path, string what)
        {
            if (!TinyModel.IsBuiltin(path) && FilePaths.InputProblem(path, what) is { } why) p.Add($"{key}: {why}");
        }
        void Files(string key, IReadOnlyList<string> files, int blockSize, int? maxBlocks, string section)
        {
            if (files.Count == 0) p.Add($"{key}: at least one file is required");
            foreach (var f in files) Input(key, f, "file");
            if (blockSize < 2) p.Add($"{section}:BlockSize: must be at least 2 (got {blockSize})");
            if (maxBlocks is < 1) p.Add($"{section}:MaxBlocks: must be at least 1 (got {maxBlocks})");
        }

        if (string.IsNullOrWhiteSpace(ModelPath)) p.Add("Model:Path: required");
        else if (!TinyModel.IsBuiltin(ModelPath) && !File.Exists(ModelPath) && !Directory.Exists(ModelPath)) p.Add($"Model:Path: not found: {ModelPath}");
        if (TokenizerPath != null) Input("Model:Tokenizer", TokenizerPath, "tokenizer");
        if (Device is not ("auto" or "cpu" or "cuda")) p.Add($"Model:Device: '{Device}' is not one of auto | cpu | cuda");
        Files("Calibration:Files", CalibrationFiles, CalibrationBlockSize, CalibrationMaxBlocks, "Calibration");
        p.AddRange(Training.Problems().Select(problem => $"Training: {problem}"));
        if (CalibrationMaxBlocks is int maxBlocks && Training.BatchSize > maxBlocks)
            p.Add($"Training:BatchSize: {Training.BatchSize} exceeds Calibration:MaxBlocks {maxBlocks}; a batch cannot repeat a block");
        Files("Evaluation:Files", EvaluationFiles, EvaluationBlockSize, EvaluationMaxBlocks, "Evaluation");

        if (string.IsNullOrWhiteSpace(OutputDirectory)) { p.Add("Output:Directory: required"); return p; }
        if (!string.IsNullOrWhiteSpace(ModelPath) && !TinyModel.IsBuiltin(ModelPath) &&
            Path.GetFullPath(OutputDirectory).TrimEnd('/') == Path.GetFullPath(ModelPath).TrimEnd('/'))
            p.Add("Output:Directory: must differ from Model:Path");
        // An input where the run writes its own files would be deleted or overwritten while it is being read.
        var inputs = new List<(string Key, string? Path)> { ("Model:Path", ModelPath), ("Model:Tokenizer", TokenizerPath) };
        inputs.AddRange(CalibrationFiles.Select(f => ("Calibration:Files", (string?)f)));
        inputs.AddRange(EvaluationFiles.Select(f => ("Evaluation:Files", (string?)f)));
        foreach (var (key, path) in inputs)
            if (!string.IsNullOrWhiteSpace(path) && !TinyModel.IsBuiltin(path) && PruneJob.ProducedEntryHolding(OutputDirectory, path) is { } entry)
                p.Add($"{key}: {path} is where the run writes its {entry}; move it or choose another Output:Directory");
        return p;
    }

    private static double Missing(string key, List<string> problems)
    {
        problems.Add($"{key}: required");
        return 0.5;
    }
}
