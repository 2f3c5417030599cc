#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu, after tools/gpu/pack.sh here): runs the GPU checks and benchmarks,
# each into $OUT/<name>.txt, and prints each one's exit status and last lines.
#
#   bash tools/gpu/check.sh [selftest] [bench] [infer] [train] [torch-infer] [torch-train]    (default: all)
#
# One device call may run 600 s: the limits below keep selftest+bench+infer and train+torch-* under it.
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
[ -d .gpu/models/ref-llama-25m ] || { mkdir -p .gpu/models && tar -C .gpu/models -xJf .gpu/model.tar.xz; }
step() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name: exit $?"
  tail -n 4 "$out/$name.txt"
}
for what in "${@:-selftest bench infer train torch-infer torch-train}"; do
  for w in $what; do
    case $w in
      selftest)    step selftest 200 bash .gpu/run.sh DispNative.Cli selftest --reference-model .gpu/models/ref-llama-25m ;;
      bench)       step bench 170 bash .gpu/run.sh DispNative.KernelBench gpu ;;
      infer)       step infer 170 bash .gpu/run.sh DispNative.KernelBench infer ;;
      train)       step train 240 bash .gpu/run.sh DispNative.KernelBench train ;;
      torch-infer) step torch-infer 120 python3 tools/reference/torch_baselines.py infer ;;
      torch-train) step torch-train 120 python3 tools/reference/torch_baselines.py train ;;
      *) echo "unknown step '$w' (selftest, bench, infer, train, torch-infer, torch-train)" >&2; exit 2 ;;
    esac
  done
done
