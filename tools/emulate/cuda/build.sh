#!/usr/bin/env bash
# Builds the CUDA emulator: one shared library that stands in for libcuda, NVRTC and cuBLASLt (see cuda_emulator.cpp),
# and emu_selftest, which checks that it reports what a GPU would (out/emu_selftest out/libcudaemu.so).
#   bash tools/emulate/cuda/build.sh [OUT_DIR]   (default: tools/emulate/cuda/out; needs g++ ≥ 12 on x86-64 Linux)
# Then, for example:
#   export DISPNATIVE_CUDA_LIBRARY=$PWD/tools/emulate/cuda/out/libcudaemu.so
#   export DISPNATIVE_NVRTC_LIBRARY=$DISPNATIVE_CUDA_LIBRARY DISPNATIVE_CUBLASLT_LIBRARY=$DISPNATIVE_CUDA_LIBRARY
#   export DISPNATIVE_KERNEL_CACHE=$PWD/tools/emulate/cuda/out/kernels
#   dotnet tools/DispNative.Cli/bin/Release/net10.0/DispNative.dll selftest
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"
mkdir -p "$out"
{
  printf 'static const char EMU_DEVICE_H[] = R"EMU_TEXT('; cat "$here/emu_device.h"; printf ')EMU_TEXT";\n'
  printf 'static const char EMU_API_H[] = R"EMU_TEXT('; cat "$here/emu_api.h"; printf ')EMU_TEXT";\n'
} > "$out/emu_texts.h"
"${DISPNATIVE_EMU_CXX:-g++}" -std=c++17 -O2 -g -fPIC -shared -fvisibility=hidden -I "$here" -I "$out" \
  -o "$out/libcudaemu.so.tmp" "$here/cuda_emulator.cpp" -ldl
mv "$out/libcudaemu.so.tmp" "$out/libcudaemu.so"
# emu_selftest: the emulator's own checks (run it with the library's path).
"${DISPNATIVE_EMU_CXX:-g++}" -std=c++17 -O1 -o "$out/emu_selftest" "$here/emu_selftest.cpp" -ldl
echo "$out/libcudaemu.so"
