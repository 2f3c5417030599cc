using System.CommandLine;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DispNative.Engine;
using DispNative.Engine.Evaluation;
using DispNative.Engine.Inference;
using DispNative.Engine.Jobs;
using Microsoft.Extensions.Configuration;
using DispNative.Engine.IO;
using DispNative.Engine.Disp;
using DispNative.Engine.Models;
using DispNative.Engine.Training;
using DispNative.Engine.Builtin;
using Spectre.Console;

namespace DispNative.Cli;

public static class Program
{
    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    /// <summary>Runs the CLI with the given writers (tests call this in-process).</summary>
    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var root = new RootCommand("DispNative: DISP-LLM structural pruning and inference for LLaMA-family models");
        root.Subcommands.Add(EvalCommand(stdout, stderr));
        root.Subcommands.Add(GenerateCommand(stdout, stderr));
        root.Subcommands.Add(InspectCommand(stdout, stderr));
        root.Subcommands.Add(TrainCommand(stdout, stderr));
        root.Subcommands.Add(PruneCommand(stdout, stderr));
        root.Subcommands.Add(SelfTestCommand(stdout, stderr));
        root.Subcommands.Add(RunCommand(stdout, stderr));
        var parse = root.Parse(args);
        return parse.Invoke(new InvocationConfiguration { Output = stdout, Error = stderr });
    }

    /// <summary>Refuses an empty or blank path while parsing (a file API would throw on it, or name no file at all).</summary>
    private static Option<T> PathOption<T>(Option<T> option)
    {
        option.Validators.Add(r =>
        {
            string[] values = r.GetValueOrDefault<T>() switch { string one => [one], string[] many => many, _ => [] };
            if (values.Any(string.IsNullOrWhiteSpace)) r.AddError($"{option.Name}: the path is empty");
        });
        return option;
    }

    private static Option<string> ModelOption() => PathOption<string>(new("--model") { Description = "Hugging Face model directory, llama2.c .bin, or builtin:tiny", Required = true });
    private static Option<string?> TokenizerOption() => PathOption<string?>(new("--tokenizer") { Description = "tokenizer file (required for a llama2.c .bin)" });
    private static Option<string> DeviceOption() => new("--device") { Description = "cpu | cuda | auto", DefaultValueFactory = _ => "auto" };
    private static Option<string> DTypeOption() => new("--dtype") { Description = "auto | f32 | bf16 | f16: storage type on CUDA (auto: bf16; the CPU computes in f32)", DefaultValueFactory = _ => "auto" };

    /// <summary>Runs a verb: user errors (bad files, bad values) print one line and exit 1, never a stack trace.</summary>
    private static int Guard(TextWriter stderr, Func<int> body)
    {
        try { return body(); }
        catch (DispNativeException e) { stderr.WriteLine($"error: {e.Message}"); return 1; }
        catch (IOException e) { stderr.WriteLine($"error: {e.Message}"); return 1; }
        catch (UnauthorizedAccessException e) { stderr.WriteLine($"error: {e.Message}"); return 1; }
        catch (DispNative.Interop.CudaOutOfMemoryException e) { stderr.WriteLine($"error: {e.Message}"); return 1; }
        catch (DispNative.Interop.CudaException e) { stderr.WriteLine($"error: CUDA: {e.Message}"); return 1; }
        catch (DispNative.Interop.NvrtcCompileException e) { stderr.WriteLine($"error: {e.Message}"); return 1; }
        catch (OutOfMemoryException e) { stderr.WriteLine($"error: out of host memory ({e.Message})"); return 1; }
        catch (OperationCanceledException) { stderr.WriteLine("cancelled"); return 130; }
    }

    /// <summary>Loads a model and places its runner on the chosen device (the caller disposes it).</summary>
    private static LoadedModel LoadModel(string model, string? tokenizer, string device, string dtype, TextWriter stderr)
    {
        string chosen = Devices.Resolve(device);
        var parsed = Devices.ParseDType(dtype);
        stderr.WriteLine($"loading {model} on {chosen}");
        return Devices.Load(TinyModel.Resolve(model), tokenizer, chosen, parsed);
    }

    private static Command EvalCommand(TextWriter stdout, TextWriter stderr)
    {
        var model = ModelOption(); var tok = TokenizerOption(); var device = DeviceOption(); var dtype = DTypeOption();
        var text = PathOption(new Option<string>("--text") { Description = "text file to score", Required = true });
        var blockSize = new Option<int>("--block-size") { Description = "tokens per block", Required = true };
        var maxBlocks = new Option<int?>("--max-blocks") { Description = "score at most this many blocks" };
        var json = PathOption(new Option<string?>("--json") { Description = "also write the result as JSON to this file" });
        var cmd = new Command("eval", "Perplexity of a model on a text (DISP-LLM/SliceGPT protocol)") { model, tok, device, dtype, text, blockSize, maxBlocks, json };
        cmd.SetAction(p => Guard(stderr, () =>
        {
            string textPath = TinyModel.Resolve(p.GetValue(text)!);
            int bs = p.GetValue(blockSize);
            int? mb = p.GetValue(maxBlocks);
            if (bs < 2) throw new InvalidSettingException($"--block-size must be at least 2 (got {bs})");
            if (mb is <= 0) throw new InvalidSettingException($"--max-blocks must be positive (got {mb})");
            FilePaths.RequireInput(textPath, "text file");
            if (p.GetValue(json) is string target && FilePaths.OutputProblem(target, "--json") is { } why)   // before the scoring, not after
                throw new InvalidSettingException(why);
            var content = File.ReadAllText(textPath);
            if (content.Length == 0) throw new InvalidSettingException($"text file is empty: {textPath}");
            using var m = LoadModel(p.GetValue(model)!, p.GetValue(tok), p.GetValue(device)!, p.GetValue(dtype)!, stderr);
            var ids = m.EncodeForScoring(content);
            PerplexityResult result = null!;
            ProgressConsole(stderr).Progress()
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask("perplexity");
                    result = Perplexity.Evaluate(m.Runner, ids, bs, mb, new SyncProgress<PerplexityProgress>(pr =>
                    {
                        task.MaxValue = pr.BlocksTotal;
                        task.Value = pr.BlocksDone;
                        task.Description = $"perplexity {pr.RunningPerplexity:F3}";
                    }));
                });
            if (p.GetValue(json) is string jsonPath)
            {
                var o = new JsonObject
                {
                    ["model"] = p.GetValue(model), ["text"] = textPath, ["block_size"] = bs, ["max_blocks"] = mb,
                    ["perplexity"] = result.Perplexity, ["nll"] = result.TotalNll, ["scored_tokens"] = result.ScoredTokens,
                    ["blocks"] = result.Blocks, ["tokens"] = result.TotalTokens, ["device"] = m.Runner.DeviceName,
                };
                File.WriteAllText(jsonPath, o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            }
            stdout.WriteLine($"perplexity: {result.Perplexity:F4} over {result.ScoredTokens} tokens");
            return 0;
        }));
        return cmd;
    }

    private static Command GenerateCommand(TextWriter stdout, TextWriter stderr)
    {
        var model = ModelOption(); var tok = TokenizerOption(); var device = DeviceOption(); var dtype = DTypeOption();
        var prompt = new Option<string>("--prompt") { Description = "prompt text", Required = true };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "tokens to generate", DefaultValueFactory = _ => 64 };
        var greedy = new Option<bool>("--greedy") { Description = "always take the most likely token (default unless --temperature is given)" };
        var temperature = new Option<float?>("--temperature") { Description = "sampling temperature" };
        var topP = new Option<float>("--top-p") { Description = "nucleus sampling mass", DefaultValueFactory = _ => 1f };
        var seed = new Option<ulong>("--seed") { Description = "sampling seed", DefaultValueFactory = _ => 0 };
        var cmd = new Command("generate", "Continue a prompt") { model, tok, device, dtype, prompt, maxNew, greedy, temperature, topP, seed };
        cmd.SetAction(p => Guard(stderr, () =>
        {
            float? t = p.GetValue(temperature);
            if (p.GetValue(greedy) && t != null) throw new InvalidSettingException("--greedy and --temperature exclude each other");
            foreach (var samplingOnly in new Option[] { topP, seed })
                if (t == null && p.GetResult(samplingOnly) is { Implicit: false })
                    throw new InvalidSettingException($"{samplingOnly.Name} applies only to sampling: give --temperature too (without it decoding is greedy)");
            var sampling = t is float temp ? new SamplingOptions(false, temp, p.GetValue(topP), p.GetValue(seed)) : new SamplingOptions();
            sampling.Validate();
            int n = p.GetValue(maxNew);
            if (n < 0) throw new InvalidSettingException($"--max-new-tokens must be non-negative (got {n})");
            string text = p.GetValue(prompt)!;
            if (text.Length == 0) throw new InvalidSettingException("--prompt is empty");
            using var m = LoadModel(p.GetValue(model)!, p.GetValue(tok), p.GetValue(device)!, p.GetValue(dtype)!, stderr);
            var ids = m.Tokenizer.Encode(text);
            var tokens = Generator.Stream(m, ids, n, sampling);   // checks the prompt and length before anything is printed
            stdout.Write(text);
            var streamer = new TextStreamer(m.Tokenizer, ids);
            foreach (int id in tokens)
            {
                stdout.Write(streamer.Push(id));
                stdout.Flush();
            }
            stdout.WriteLine();
            return 0;
        }));
        return cmd;
    }

    private static Command SelfTestCommand(TextWriter stdout, TextWriter stderr)
    {
        var device = new Option<string>("--device") { Description = "cuda (the only backend with kernels to check) or auto", DefaultValueFactory = _ => "cuda" };
        var reference = PathOption(new Option<string?>("--reference-model") { Description = "model directory with golden.json (e.g. ../shared/models/ref-llama-25m) for the golden checks" });
        var cmd = new Command("selftest", "Checks every CUDA kernel, the GEMMs and the GPU forward against the CPU reference") { device, reference };
        cmd.SetAction(p => Guard(stderr, () =>
        {
            string? refDir = p.GetValue(reference);
            if (refDir != null && !File.Exists(Path.Combine(refDir, "golden.json"))) throw new DispNativeException($"--reference-model: {refDir} has no golden.json");
            if (Devices.Resolve(p.GetValue(device)!) != "cuda")
                throw new DispNativeException($"selftest checks the CUDA backend, and none is usable here: {DispNative.Engine.Cuda.CudaDevice.Unavailable()}");
            using var gpu = DispNative.Engine.Cuda.CudaDevice.Open();
            stdout.WriteLine($"device: {gpu.Info}, driver {gpu.Info.DriverVersion}, NVRTC {DispNative.Interop.Nvrtc.Version}");
            stdout.WriteLine($"kernels: {gpu.Compiler.CompileAll()}, cache {gpu.Compiler.CacheDirectory}");
            var results = DispNative.Engine.Cuda.SelfTest.Run(gpu, DispNative.Engine.Cuda.SelfTest.Checks(refDir),
                r => stdout.WriteLine($"{(r.Passed ? "PASS" : "FAIL")}  {r.Name}: {r.Detail}"));
            int failed = results.Count(r => !r.Passed);
            stdout.WriteLine($"{results.Count - failed} passed, {failed} failed");
            return failed == 0 ? 0 : 1;
        }));
        return cmd;
    }

    private static Command InspectCommand(TextWriter stdout, TextWriter stderr)
    {
        var model = ModelOption();
        var cmd = new Command("inspect", "Architecture, parameter counts by kind and dtypes") { model };
        cmd.SetAction(p => Guard(stderr, () =>
        {
            string path = TinyModel.Resolve(p.GetValue(model)!);
            ModelConfig c;
            var dtypes = new SortedDictionary<string, long>();
            if (ModelLoader.FormatOf(path) == ModelFormat.HuggingFace)
            {
                c = ModelLoader.LoadConfig(path);
                using var ckpt = SafeTensorsCheckpoint.Open(path);
                foreach (var name in ckpt.Names)
                {
                    var info = ckpt.Info(name);
                    dtypes[info.DType.Name()] = dtypes.GetValueOrDefault(info.DType.Name()) + info.ElementCount;
                }
            }
            else
            {
                c = Llama2cImport.Load(path).Config;
                long total = c.ParameterCounts().Values.Sum();
                dtypes["F32"] = total;
            }
            var sb = new StringBuilder();
            sb.AppendLine($"model:         {path}");
            sb.AppendLine($"architecture:  {c.Architecture}");
            sb.AppendLine($"layers:        {c.NumLayers}");
            sb.AppendLine($"hidden:        {c.HiddenSize}");
            sb.AppendLine($"intermediate:  {c.IntermediateSize}");
            sb.AppendLine($"heads:         {c.NumHeads} (kv {c.NumKvHeads}, head_dim {c.HeadDim})");
            sb.AppendLine($"vocab:         {c.VocabSize}");
            sb.AppendLine($"rope_theta:    {c.RopeTheta}{(c.RopeScaling is { } s ? $" ({s.Type} x{s.Factor})" : "")}");
            sb.AppendLine($"tied head:     {c.TieWordEmbeddings}");
            sb.AppendLine("parameters:");
            foreach (var (kind, n) in c.ParameterCounts()) sb.AppendLine($"  {kind,-11} {n,14:N0}");
            sb.AppendLine($"  {"total",-11} {c.ParameterCounts().Values.Sum(),14:N0}");
            if (c.Disp is { } disp)
            {
                sb.AppendLine($"DISP-pruned:   mode {disp.Mode}, target prune ratio {disp.PruneRatioTarget}, from {disp.SourceModel ?? "(unknown)"}");
                sb.AppendLine($"  {"layer",-6}{string.Concat(DispInfo.SiteKeys.Select(k => $"{k,10}"))}");
                for (int l = 0; l < c.NumLayers; l++)
                    sb.AppendLine($"  {l,-6}{string.Concat(disp.Widths[l].Select(w => $"{w,10}"))}");
            }
            sb.AppendLine("stored dtypes (elements):");
            foreach (var (dt, n) in dtypes) sb.AppendLine($"  {dt,-11} {n,14:N0}");
            stdout.Write(sb.ToString());
            return 0;
        }));
        return cmd;
    }

    private static Command TrainCommand(TextWriter stdout, TextWriter stderr)
    {
        var model = ModelOption(); var tok = TokenizerOption(); var device = DeviceOption();
        var calibration = PathOption(new Option<string[]>("--calibration") { Description = "calibration text (.txt, documents split at blank lines) or .jsonl with a text field", Required = true, AllowMultipleArgumentsPerToken = true });
        var ratio = new Option<double>("--prune-ratio") { Description = "fraction of prunable parameters to remove, in (0, 1)", Required = true };
        var mode = new Option<string>("--mode") { Description = "disp (per-site masks) | same (one shared embedding mask)", DefaultValueFactory = _ => "disp" };
        var defaults = new TrainingOptions();
        var steps = new Option<int>("--steps") { Description = "optimisation steps", DefaultValueFactory = _ => defaults.Steps };
        var blockSize = new Option<int>("--block-size") { Description = "tokens per calibration block", DefaultValueFactory = _ => 2048 };
        var maxBlocks = new Option<int?>("--max-blocks") { Description = "use at most this many calibration blocks" };
        var batch = new Option<int>("--batch-size") { Description = "blocks per step", DefaultValueFactory = _ => defaults.BatchSize };
        var lambda = new Option<double>("--lambda") { Description = "regularizer weight", DefaultValueFactory = _ => defaults.Lambda };
        var lr = new Option<double>("--lr") { Description = "AdamW learning rate", DefaultValueFactory = _ => defaults.LearningRate };
        var wd = new Option<double>("--weight-decay") { Description = "AdamW weight decay", DefaultValueFactory = _ => defaults.WeightDecay };
        var seed = new Option<ulong>("--seed") { Description = "seed of the hypernetwork, data order and Gumbel noise", DefaultValueFactory = _ => 0 };
        var logEvery = new Option<int>("--log-every") { Description = "log every N steps", DefaultValueFactory = _ => defaults.LogEvery };
        var ckptEvery = new Option<int>("--checkpoint-every") { Description = "checkpoint every N steps", DefaultValueFactory = _ => defaults.CheckpointEvery };
        var cosine = new Option<bool>("--cosine") { Description = "cosine decay of the learning rate to 0 over the steps (default: constant)" };
        var clipNorm = new Option<double?>("--clip-norm") { Description = "clip the hypernetwork gradients' global norm to this (default: no clipping)" };
        var checkpointLayers = new Option<string>("--checkpoint-layers")
        {
            Description = "per-layer activation checkpointing in the LM pass: auto (where a block's activations would not fit), on, off",
            DefaultValueFactory = _ => "auto",
        };
        checkpointLayers.AcceptOnlyFromAmong("auto", "on", "off");
        var output = PathOption(new Option<string>("--out") { Description = "output directory (an interrupted run in it is resumed)", Required = true });
        var cmd = new Command("train", "Train the DISP-LLM hypernetwork (the LLM stays frozen)")
            { model, tok, device, calibration, ratio, mode, steps, blockSize, maxBlocks, batch, lambda, lr, wd, seed, logEvery, ckptEvery, cosine, clipNorm, checkpointLayers, output };
        cmd.SetAction(p => Guard(stderr, () =>
        {
            var options = new TrainingOptions
            {
                PruneRatio = p.GetValue(ratio), Mode = SiteLayout.ParseMode(p.GetValue(mode)!), Steps = p.GetValue(steps),
                BatchSize = p.GetValue(batch), Lambda = p.GetValue(lambda), LearningRate = p.GetValue(lr), WeightDecay = p.GetValue(wd),
                Seed = p.GetValue(seed), LogEvery = p.GetValue(logEvery), CheckpointEvery = p.GetValue(ckptEvery),
                CosineSchedule = p.GetValue(cosine), ClipNorm = p.GetValue(clipNorm),
            };
            var problems = options.Problems();
            int bs = p.GetValue(blockSize);
            if (bs < 2) problems.Add($"block size must be at least 2 (got {bs})");
            if (p.GetValue(maxBlocks) is <= 0) problems.Add($"max blocks must be positive (got {p.GetValue(maxBlocks)})");
            if (problems.Count > 0) throw new InvalidSettingException(string.Join("; ", problems));
            string outDir = p.GetValue(output)!;
            if (Directory.Exists(outDir) && Directory.EnumerateFileSystemEntries(outDir).Any() &&
                !File.Exists(Path.Combine(outDir, HypernetworkTrainer.CheckpointFile)))
                throw new InvalidSettingException($"{outDir} exists and holds no training checkpoint; choose a new output directory");
            var files = p.GetValue(calibration)!.Select(f => TinyModel.Resolve(f)).ToArray();
            foreach (var f in files) FilePaths.RequireInput(f, "calibration file");

            string dev = Devices.Resolve(p.GetValue(device)!);
            using var m = Devices.Load(TinyModel.Resolve(p.GetValue(model)!), p.GetValue(tok), dev);
            var ids = Calibration.Tokenize(files, m.Tokenizer, m.BosId);
            var blocks = Calibration.Blocks(ids, bs, p.GetValue(maxBlocks));
            stderr.WriteLine($"calibration: {ids.Length} tokens, {blocks.Count} blocks of {bs}");
            using var lm = Devices.MaskedModel(m, p.GetValue(checkpointLayers) switch { "on" => true, "off" => false, _ => null });
            var trainer = new HypernetworkTrainer(lm, options);
            bool named = false;
            return WithCtrlC(token =>
            {
                var result = trainer.Train(blocks, outDir, new SyncProgress<TrainLogEntry>(e =>
                {
                    // After a step, the CUDA pass also knows whether the activations fit or layers are checkpointed.
                    if (!named) stderr.WriteLine($"LM pass on {lm.DeviceName}");
                    named = true;
                    stderr.WriteLine($"step {e.Step,5}  ce {e.CrossEntropy:F4}  reg {e.RegLoss:F4}  r {e.Ratio:F4}  {e.TokensPerSecond:F0} tok/s");
                }), token);
                if (!named) stderr.WriteLine($"LM pass on {lm.DeviceName}");
                var last = result.Log.Count > 0 ? result.Log[^1] : null;
                stdout.WriteLine($"trained {result.Steps} steps{(result.ResumedFrom > 0 ? $" (resumed from {result.ResumedFrom})" : "")}" +
                                 (last != null ? $": ce {last.CrossEntropy:F4}, kept ratio {last.Ratio:F4} (target {1 - options.PruneRatio:F4})" : ""));
                stdout.WriteLine($"hypernetwork: {result.HypernetworkPath}");
                return 0;
            }, () => stderr.WriteLine($"interrupted at step {trainer.Step}; checkpoint saved in {outDir} (run the same command to resume)"));
        }));
        return cmd;
    }

    private static Command PruneCommand(TextWriter stdout, TextWriter stderr)
    {
        var model = ModelOption(); var tok = TokenizerOption();
        var hypernetwork = PathOption(new Option<string>("--hypernetwork") { Description = "hypernetwork.safetensors written by train or run", Required = true });
        var deterministic = new Option<bool>("--deterministic") { Description = "hard masks without Gumbel noise (default: the noise of the training seed, as run does)" };
        var dtype = new Option<string>("--dtype") { Description = "auto | f32 | bf16 | f16: storage of the pruned weights (auto: as the dense model)", DefaultValueFactory = _ => "auto" };
        var output = PathOption(new Option<string>("--out") { Description = "directory of the pruned model (must not exist)", Required = true });
        var cmd = new Command("prune", "Slice a dense model by the masks of a trained hypernetwork and save the pruned model")
            { model, tok, hypernetwork, deterministic, dtype, output };
        cmd.SetAction(p => Guard(stderr, () =>
        {
            string outDir = p.GetValue(output)!, hyperPath = p.GetValue(hypernetwork)!;
            var saveAs = Devices.ParseDType(p.GetValue(dtype)!);
            // Both checked again where they are used; here before the model loads.
            if (Directory.Exists(outDir) || File.Exists(outDir)) throw new InvalidSettingException($"--out: {outDir} already exists; not overwriting it");
            FilePaths.RequireInput(hyperPath, "hypernetwork file");
            string modelPath = TinyModel.Resolve(p.GetValue(model)!);
            using var dense = ModelLoader.Open(modelPath, p.GetValue(tok));   // read and sliced a layer at a time
            if (dense.Config.Disp != null) throw new InvalidSettingException($"--model: {modelPath} is already pruned; give its dense source");
            var saved = SavedHypernetwork.Load(hyperPath, dense.Config);
            var plan = saved.Plan(p.GetValue(deterministic));
            var config = Pruner.PrunedConfig(dense.Config, plan, saved.Mode.ToString().ToLowerInvariant(), saved.PruneRatio, p.GetValue(model));
            Pruner.Save(outDir, config, Pruner.Slicing(dense.Config, dense.Weights, plan), Pruner.SavedDType(dense.Config, saveAs),
                Pruner.TokenizerFilesOf(modelPath, p.GetValue(tok)));
            double kept = (double)config.PrunableParameters() / dense.Config.PrunableParameters();
            stdout.WriteLine($"kept {kept:P2} of prunable parameters ({config.ParameterCounts().Values.Sum():N0} of " +
                             $"{dense.Config.ParameterCounts().Values.Sum():N0} in total; target {1 - saved.PruneRatio:P0}, mode {config.Disp!.Mode})");
            stdout.WriteLine($"pruned model: {outDir}");
            return 0;
        }));
        return cmd;
    }

    private static Command RunCommand(TextWriter stdout, TextWriter stderr)
    {
        var file = new Argument<string>("config") { Description = "job configuration (JSON); see examples/prune.json" };
        var cmd = new Command("run", "Run a pruning job: load → calibrate → train hypernetwork → prune → save → evaluate → report. " +
                                     "Settings come from the JSON file, then DISPNATIVE_* environment variables (DISPNATIVE_Training__Steps=200), " +
                                     "then --Section:Key=value arguments (--Training:Steps=200).") { file };
        cmd.TreatUnmatchedTokensAsErrors = false;
        cmd.SetAction(p => Guard(stderr, () =>
        {
            string path = p.GetValue(file)!;
            FilePaths.RequireInput(path, "configuration file");
            IConfiguration config;
            try
            {
                config = new ConfigurationBuilder()
                    .AddJsonFile(Path.GetFullPath(path), optional: false, reloadOnChange: false)
                    .AddEnvironmentVariables("DISPNATIVE_")
                    .AddCommandLine(p.UnmatchedTokens.ToArray())
                    .Build();
            }
            catch (Exception e) when (e is FormatException or InvalidDataException or System.Text.Json.JsonException)
            {
                var messages = new List<string>();   // the innermost is the JSON parser's, with line and position
                for (Exception? x = e; x != null; x = x.InnerException) messages.Add(x.Message);
                throw new InvalidSettingException($"{path}: {string.Join(" ", messages)}");
            }
            var options = PruneJobOptions.FromConfiguration(config, Path.GetDirectoryName(Path.GetFullPath(path))!);
            return WithCtrlC(token =>
            {
                PruneJobResult result = null!;
                ProgressConsole(stderr).Progress()
                    .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn())
                    .Start(ctx =>
                    {
                        var tasks = new Dictionary<string, ProgressTask>();
                        result = PruneJob.Run(options, new SyncProgress<JobProgress>(jp =>
                        {
                            if (!tasks.TryGetValue(jp.Phase, out var task)) tasks[jp.Phase] = task = ctx.AddTask(jp.Phase);
                            task.MaxValue = Math.Max(jp.Total, 1e-9);
                            task.Value = jp.Done;
                            task.Description = jp.Detail == null ? jp.Phase : $"{jp.Phase}: {jp.Detail}";
                        }), cancellationToken: token);
                    });
                stdout.WriteLine($"dense perplexity:  {result.DensePerplexity:F4}");
                stdout.WriteLine($"pruned perplexity: {result.PrunedPerplexity:F4}");
                stdout.WriteLine($"kept {result.KeptRatioPrunable:P2} of prunable parameters ({result.PrunedParams:N0} of {result.DenseParams:N0} in total)");
                if (result is { DenseSpeed: { } ds, PrunedSpeed: { } ps })
                {
                    stdout.WriteLine($"prefill ({ds.PromptTokens} tokens): {ds.PrefillTokensPerSecond:F0} tokens/s dense, {ps.PrefillTokensPerSecond:F0} pruned " +
                                     $"({ps.PrefillTokensPerSecond / ds.PrefillTokensPerSecond:F2}x, {result.Metrics["device"]})");
                    stdout.WriteLine($"decode:  {ds.DecodeTokensPerSecond:F0} tokens/s dense, {ps.DecodeTokensPerSecond:F0} pruned " +
                                     $"({ps.DecodeTokensPerSecond / ds.DecodeTokensPerSecond:F2}x)");
                }
                stdout.WriteLine($"pruned model: {result.ModelDirectory}");
                stdout.WriteLine($"report: {Path.Combine(result.OutputDirectory, PruneJob.ReportFile)}");
                return 0;
            }, () => stderr.WriteLine($"interrupted; run the same command to resume from the checkpoint in {options.OutputDirectory}"));
        }));
        return cmd;
    }

    /// <summary>Runs long work with Ctrl+C wired to its cancellation token; an interruption prints
    /// <paramref name="onInterrupted"/>'s message and exits with 130.</summary>
    private static int WithCtrlC(Func<CancellationToken, int> work, Action onInterrupted)
    {
        using var cts = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) => { e.Cancel = true; cts.Cancel(); };
        Console.CancelKeyPress += onCancel;
        try { return work(cts.Token); }
        catch (OperationCanceledException)
        {
            onInterrupted();
            return 130;
        }
        finally { Console.CancelKeyPress -= onCancel; }
    }

    private static IAnsiConsole ProgressConsole(TextWriter stderr) =>
        AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(stderr) });
}
