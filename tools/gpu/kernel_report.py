#!/usr/bin/env python3
"""What NVIDIA's compiler makes of kernels/*.cu, without a GPU: each entry point's registers, spills and shared memory
(ptxas through NVRTC), and with cuobjdump at hand, how many global loads are in flight when each is first used (its
SASS, straight-line: a load counts as in flight from its issue to the first instruction that reads its registers).

    python3 tools/gpu/kernel_report.py [--arch sm_90] [--nvrtc LIB] [--cuobjdump PATH] [--inflight REGEX] [KERNEL ...]

KERNEL: file names without .cu (default: all), compiled in parallel. --inflight: entries whose loads to report (needs
cuobjdump: on PATH, /usr/local/cuda/bin, or given). On the GPU machine: tools/gpu/check.sh report.
Any NVRTC 11.2+ works (README "NVIDIA's compiler without a GPU" shows how to get 11.8 and cuobjdump on the dev machine);
its register allocation and schedules may differ from the GPU machine's NVRTC.
"""
import argparse
import concurrent.futures
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = os.path.join(ROOT, "kernels")


def compile_cubin(lib, name, arch):
    """NVRTC compile of kernels/NAME.cu with every header, as KernelCompiler does, plus ptxas's report."""
    headers = sorted(glob.glob(os.path.join(KERNELS, "*.cuh")))
    names = [os.path.basename(h).encode() for h in headers]
    texts = [open(h, "rb").read() for h in headers]
    n = len(headers)
    prog = ctypes.c_void_p()
    source = open(os.path.join(KERNELS, name + ".cu"), "rb").read()
    lib.nvrtcCreateProgram(ctypes.byref(prog), source, (name + ".cu").encode(), n,
                           (ctypes.c_char_p * n)(*texts), (ctypes.c_char_p * n)(*names))
    opts = [f"-arch={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"{name}.cu does not compile:\n{log.value.decode()}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw, log.value.decode()


def resources(log):
    """(entry, registers, spill stores, spill loads, shared bytes) per entry, from ptxas's -v report."""
    entry, spill, out = None, (0, 0), []
    for line in log.split("\n"):
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry, spill = m.group(1), (0, 0)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
        if m and entry:
            out.append((entry, int(m.group(1)), spill[0], spill[1], int(m.group(2) or 0)))
    return out


def sass(cuobjdump, cubin, entry):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-sass", "-fun", entry, f.name], capture_output=True, text=True, check=True).stdout
    return [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,6}\*/\s+(.*?)\s*;", text)]


def loads_in_flight(instructions):
    """For each global or generic load in order: loads issued and not yet read when its result is first read."""
    pending, report = [], []
    for text in instructions:
        body = re.sub(r"^@!?U?P\w+\s+", "", text)
        parts = body.split(None, 1)
        op, operands = parts[0], (parts[1].split(",") if len(parts) > 1 else [])
        store = op.startswith(("ST", "RED", "ATOM"))
        sources = operands if store else operands[1:]
        read = {int(r) for o in sources for r in re.findall(r"\bR(\d+)\b", o)}
        for o in sources:
            m = re.search(r"\[R(\d+)\.64", o)
            if m:
                read |= {int(m.group(1)), int(m.group(1)) + 1}
        still = []
        for regs in pending:
            if regs & read:
                report.append(len(pending))
            else:
                still.append(regs)
        pending = still
        dest = re.match(r"\s*R(\d+)", operands[0]) if operands and not store else None
        if op.startswith(("LDG", "LD.E")) and dest:
            base = int(dest.group(1))
            written = set(range(base, base + (4 if ".128" in op else 2 if ".64" in op else 1)))
            pending = [r - written for r in pending if r - written] + [written]
        elif dest:
            pending = [r - {int(dest.group(1))} for r in pending if r - {int(dest.group(1))}]
        if op in ("EXIT", "RET"):
            pending = []
    return report


NVRTC_NAMES = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2"]
NVRTC_DIRS = ["", "/usr/local/cuda/lib64/", "/usr/local/cuda/targets/x86_64-linux/lib/"]


def load_nvrtc(path):
    for candidate in [path] if path else [d + n for n in NVRTC_NAMES for d in NVRTC_DIRS]:
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            pass
    sys.exit("no NVRTC library loads (README: NVIDIA's compiler without a GPU)")


# Files the engine builds for sm_90a on sm_90 where NVRTC is 12+ (KernelCompiler.ArchitectureFor): wgmma exists only there.
SM90A_KERNELS = {"attention_wgmma"}


def nvrtc_major(lib):
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value


def report(job):
    """One kernel file's lines (run in a worker process: NVRTC compiles files in parallel)."""
    name, arch, nvrtc, cuobjdump, inflight = job
    lib = load_nvrtc(nvrtc)
    if arch == "sm_90" and name in SM90A_KERNELS and nvrtc_major(lib) >= 12:
        arch = "sm_90a"
    cubin, log = compile_cubin(lib, name, arch)
    # ptxas's "Potential Performance Loss" notes (wgmma serialized, and the like), as they are.
    lines = [f"{name + '.cu':20} ({arch}) {line.strip()}" for line in log.split("\n") if "Performance Loss" in line]
    for entry, regs, stores, loads, smem in resources(log):
        lines.append(f"{name + '.cu':20} {entry:58} {regs:4} {f'{stores}/{loads}':>11} {smem:6}")
        if inflight and cuobjdump and re.search(inflight, entry):
            counts = loads_in_flight(sass(cuobjdump, cubin, entry))
            lines.append(f"    loads in flight at first use ({len(counts)} loads): {' '.join(map(str, counts))}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kernels", nargs="*")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--nvrtc", default=None, help="library to load (default: libnvrtc.so.13, .12, .11.2)")
    p.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or
                   ("/usr/local/cuda/bin/cuobjdump" if os.path.exists("/usr/local/cuda/bin/cuobjdump") else None))
    p.add_argument("--inflight", default=None, help="regular expression: entries whose loads in flight to print")
    a = p.parse_args()
    load_nvrtc(a.nvrtc)   # fail here, once, if none loads
    if a.inflight and not a.cuobjdump:
        sys.exit("--inflight needs cuobjdump (--cuobjdump PATH)")
    names = a.kernels or sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(KERNELS, "*.cu")))
    print(f"{'kernel':20} {'entry':58} {'regs':>4} {'spill st/ld':>11} {'smem':>6}")
    with concurrent.futures.ProcessPoolExecutor() as pool:
        for lines in pool.map(report, [(n, a.arch, a.nvrtc, a.cuobjdump, a.inflight) for n in names]):
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
