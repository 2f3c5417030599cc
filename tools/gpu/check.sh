#!/usr/bin/env bash
# On the GPU machine (device tool, carry .gpu, after tools/gpu/pack.sh here): runs the GPU checks and benchmarks,
# each into $OUT/<name>.txt, and prints each one's exit status and last lines.
#
#   bash tools/gpu/check.sh [selftest] [bench] [infer] [train] [torch-infer] [torch-train] [profile-norms] [profile-infer] [report]
#   (default: all but the profiles and the report)
#
# report: what this machine's NVRTC makes of the kernels (no GPU used): registers, spills, and loads in flight in the
# decode GEMVs and the persistent decode kernel (tools/gpu/kernel_report.py with its cuobjdump).
# profile-norms: Nsight Compute on the row kernels of `KernelBench gpu` (gather-norm, index-add and the fused pair;
# cold L2, clocks as they are): duration, DRAM bytes and throughput, registers, occupancy and warp stalls, one CSV.
# profile-infer: kernel durations of one prefill and two decode steps of the dense and the pruned 7B-shape model, and of
# three steps after an 80-token prompt (the third with the other decode attention blocks)
# (`KernelBench infer --profile`), summed per phase and kernel by tools/gpu/kernel_times.py.
# One device call may run 600 s: the steps run in the order given, each under its own limit cut to what is left of
# CHECK_SECONDS (default 590), so name the most important first; a step with under 10 s left is skipped.
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
[ -d .gpu/models/ref-llama-25m ] || { mkdir -p .gpu/models && tar -C .gpu/models -xJf .gpu/model.tar.xz; }
deadline=$((SECONDS + ${CHECK_SECONDS:-590}))
step() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 10 ]; then echo "== $name: skipped, ${left} s left of CHECK_SECONDS"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name: exit $? (limit ${limit} s)"
  tail -n 4 "$out/$name.txt"
}
for what in "${@:-selftest bench infer train torch-infer torch-train}"; do
  for w in $what; do
    case $w in
      selftest)    step selftest 200 bash .gpu/run.sh DispNative.Cli selftest --reference-model .gpu/models/ref-llama-25m ;;
      bench)       step bench 170 bash .gpu/run.sh DispNative.KernelBench gpu ;;
      infer)       step infer 240 bash .gpu/run.sh DispNative.KernelBench infer ;;
      train)       step train 240 bash .gpu/run.sh DispNative.KernelBench train ;;
      torch-infer) step torch-infer 120 python3 tools/reference/torch_baselines.py infer ;;
      torch-train) step torch-train 120 python3 tools/reference/torch_baselines.py train ;;
      report)      step report 90 python3 tools/gpu/kernel_report.py --inflight 'gemv_bf16_to_f32_u|gemv_(norm_)?swiglu_bf16_u|decode_layers_bf16' ;;
      profile-norms)
        step profile-norms 300 /usr/local/cuda/bin/ncu --kernel-name regex:'gather|index_add' --cache-control all --clock-control none \
          --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats \
          --metrics dram__bytes_read.sum,dram__bytes_write.sum -f -o /tmp/profile-norms bash .gpu/run.sh DispNative.KernelBench gpu --repeats 2
        /usr/local/cuda/bin/ncu -i /tmp/profile-norms.ncu-rep --csv --page details > "$out/profile-norms.csv" 2>&1
        echo "== profile-norms.csv: $(wc -l < "$out/profile-norms.csv") lines" ;;
      profile-infer)
        step profile-infer 420 /usr/local/cuda/bin/ncu --profile-from-start off --metrics gpu__time_duration.sum --print-units base \
          --cache-control none --clock-control none -f -o /tmp/profile-infer bash .gpu/run.sh DispNative.KernelBench infer --decode 16 --profile
        /usr/local/cuda/bin/ncu -i /tmp/profile-infer.ncu-rep --csv --page raw --print-units base > "$out/profile-infer.csv" 2>&1
        python3 tools/gpu/kernel_times.py "$out/profile-infer.csv" > "$out/profile-infer-summary.txt" 2>&1
        echo "== profile-infer-summary.txt (decode steps at 81-83 keys):"; grep -A 14 "at 8[123] keys" "$out/profile-infer-summary.txt" ;;
      *) echo "unknown step '$w' (selftest, bench, infer, train, torch-infer, torch-train, profile-norms, profile-infer, report)" >&2; exit 2 ;;
    esac
  done
done
