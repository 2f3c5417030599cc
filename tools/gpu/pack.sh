#!/usr/bin/env bash
# Here (no GPU): packs the CLI and KernelBench for the GPU machine with ../shared/gpu/pack.sh, and ref-llama-25m
# as .gpu/model.tar.xz (raw, it would push the carried tree past the device tool's 64 MiB).
#
# The shared script is read from ../shared each time, not copied, and run with one change: its entry-point scan
# ends on a .dll without an apphost in every publish of ours, which under `set -o pipefail` stops it with status 1
# before it packs anything; here that scan is allowed to end so.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
shared=$(cd "${DISPNATIVE_SHARED:-$root/../shared}" && pwd)
cd "$root"
sed -e 's/| head -1)/| head -1 || true)/' -e "s#\$(dirname \"\$0\")#$shared/gpu#" "$shared/gpu/pack.sh" \
  | bash -s -- tools/DispNative.Cli/DispNative.Cli.csproj tools/DispNative.KernelBench/DispNative.KernelBench.csproj
tar -C "$shared/models" -cf - ref-llama-25m | xz -T2 -3 > .gpu/model.tar.xz
echo ".gpu/ is $(du -sh .gpu | cut -f1) with the model"
