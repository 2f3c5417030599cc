#!/usr/bin/env python3
"""Kernel time per phase from Nsight Compute's raw CSV of `KernelBench infer --profile` (tools/gpu/check.sh
profile-infer): the profiled work is, per model, one prefill and two one-token decode steps, then a prefill of 80 tokens
and three steps after it (the third with the decode attention in blocks of the other number of warps), each starting
with the embedding kernel. Prints each phase's total and its kernels grouped by name (count, mean), largest first.

    python3 tools/gpu/kernel_times.py profile-infer.csv [--top N]
"""
import csv
import sys
from collections import defaultdict

STEPS = ["prefill", "decode step 1", "decode step 2",
         "prefill of 80 tokens", "decode step 1 at 81 keys", "decode step 2 at 82 keys",
         "decode step 3 at 83 keys, attention blocks of the other number of warps"]
PHASES = [f"{model} {step}" for model in ("dense", "pruned") for step in STEPS]
TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def read(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r and "gpu__time_duration.sum" in r)
    header, units = rows[start], rows[start + 1]
    name, dur = header.index("Kernel Name"), header.index("gpu__time_duration.sum")
    scale = TO_US.get(units[dur].strip(), None)
    if scale is None:
        sys.exit(f"unknown unit '{units[dur]}' for gpu__time_duration.sum")
    return [(r[name], float(r[dur].replace(",", "")) * scale) for r in rows[start + 2:] if len(r) > dur and r[dur]]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 12
    kernels = read(sys.argv[1])
    phases = []
    for kernel, us in kernels:
        if kernel.startswith("embedding_") or not phases:
            phases.append([])
        phases[-1].append((kernel, us))
    if len(phases) != len(PHASES):
        print(f"note: {len(phases)} phases found, {len(PHASES)} expected; labels may not fit")
    for i, phase in enumerate(phases):
        label = PHASES[i] if i < len(PHASES) else f"phase {i + 1}"
        total = sum(us for _, us in phase)
        print(f"\n{label}: {len(phase)} kernels, {total / 1e3:.3f} ms of kernel time")
        groups = defaultdict(lambda: [0, 0.0])
        for kernel, us in phase:
            g = groups[kernel[:70]]
            g[0] += 1
            g[1] += us
        for kernel, (count, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"  {us / 1e3:9.3f} ms {100 * us / total:5.1f}%  {count:5d}x {us / count:8.2f} us  {kernel}")


if __name__ == "__main__":
    main()
