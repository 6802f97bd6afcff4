"""Registers, shared memory and occupancy of every GPU kernel entry point (``nvcc --resource-usage``; no GPU needed).

Run (from the repository root, in the project's environment; nvcc on PATH)::

    python bench/bench_resources.py                  # sm_80 and sm_90, every kernels/*.cu, 128 threads per block
    python bench/bench_resources.py --arch sm_90 --threads 256

What it does: compiles each kernel file's inlined source (:func:`gpu_ali3d.kernels.kernel_source`) to a cubin with
``nvcc -cubin --resource-usage`` and the options its module gets from NVRTC (:func:`gpu_ali3d.kernels.nvrtc_options`:
the same flags, ``-DGPU_ALI3D_CUDA=1`` included), reads ptxas's registers, static shared memory and stack per entry
point, and computes the blocks per SM they allow at the launch's block size (``kernels.GPU_THREADS``) from the
architecture's limits (registers per SM, allocated per warp in units of 256; threads and blocks per SM; shared
memory per SM with 1 KB reserved per block), as CUDA's occupancy calculator does. Entry points that take dynamic
shared memory (score.cu, align.cu: the shift-phase table, :func:`gpu_ali3d.kernels.phase_table_bytes`) are
reported at the table of a box-64 and a box-128 run (K = 26 and 52 at the default band limit) and at the largest
(K = SCORE_MAX_K). Occupancy = resident warps / the SM's maximum warps.

Output: a table on stdout and JSON in ``bench/results/resources.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Per-SM limits (CUDA C Programming Guide, "Compute capabilities"): registers, max threads, max blocks, usable
#: shared memory per SM (bytes), shared memory the runtime reserves per block, register allocation unit (per warp).
ARCH_LIMITS = {
    "sm_80": dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024, reserved=1024, reg_unit=256, max_regs=255),
    "sm_90": dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024, reserved=1024, reg_unit=256, max_regs=255),
}
#: K (largest |kx|, |ky| of a sample) at which dynamic shared memory is reported: box 64 and 128 at the default
#: band limit (bench_align.py: kmax 25.6 at box 64), and the kernels' largest.
K_CASES = {"box64": 26, "box128": 52, "max": None}

_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def resource_usage(name: str, arch: str, kernel_dir=None) -> dict:
    """{entry point: {registers, smem_static, stack, spill_stores, spill_loads}} of kernel file ``<name>.cu``."""
    from gpu_ali3d import kernels

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH; install the CUDA toolkit")
    options = _options(kernels, name)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.cu"
        src.write_text(kernels.kernel_source(name, kernel_dir))
        proc = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "--resource-usage", *options, str(src),
                               "-o", str(Path(tmp) / f"{name}.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {name}.cu for {arch}:\n{proc.stderr}")
    return parse_resource_usage(proc.stdout + proc.stderr)


def parse_resource_usage(text: str) -> dict:
    """ptxas's ``--resource-usage`` report -> {entry point: {registers, smem_static, stack, spills}}."""
    out, current = {}, None
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        if (m := _STACK.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["smem_static"] = int(s.group(1)) if s else 0
    return {k: v for k, v in out.items() if "registers" in v}


def occupancy(registers: int, smem_bytes: int, threads: int, arch: str) -> dict:
    """Resident blocks per SM and occupancy (resident warps / max warps) at ``threads`` per block, and what limits it."""
    lim = ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by = {"threads": lim["threads"] // (warps * 32), "blocks": lim["blocks"],
          "registers": (lim["regs"] // regs_per_warp) // warps,
          "shared": lim["smem"] // (smem_bytes + lim["reserved"])}
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "registers"))
    return dict(blocks_per_sm=blocks, occupancy=blocks * warps * 32 / lim["threads"], limited_by=limiter)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=sorted(ARCH_LIMITS))
    ap.add_argument("--threads", type=int, default=None, help="threads per block (default kernels.GPU_THREADS)")
    ap.add_argument("--kernels", nargs="+", help="kernel files (default: every kernels/*.cu)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/resources.json)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from gpu_ali3d import kernels

    threads = a.threads or kernels.GPU_THREADS
    max_k = getattr(kernels, "SCORE_MAX_K", 1024)
    rows = []
    print(f"{threads} threads per block; occupancy = resident warps / max warps per SM")
    print(f"{'kernel':28s} {'arch':6s} {'regs':>4s} {'spill':>5s} {'static smem':>11s} "
          f"{'dynamic smem (box64 / box128 / max)':>36s} {'occupancy (box64 / max)':>24s}  limited by (box64 / max)")
    for name in a.kernels or kernels.kernel_names():
        for arch in a.arch:
            for entry, r in sorted(resource_usage(name, arch).items()):
                dyn = {case: (_dynamic_bytes(kernels, entry, max_k if k is None else k)) for case, k in K_CASES.items()}
                occ = {case: occupancy(r["registers"], r["smem_static"] + b, threads, arch) for case, b in dyn.items()}
                rows.append(dict(kernel=f"{name}.cu", entry=entry, arch=arch, threads=threads,
                                 options=list(_options(kernels, name)), **r, smem_dynamic=dyn, occupancy=occ))
                dyn_s = " / ".join(f"{b}" for b in dyn.values()) if any(dyn.values()) else "-"
                print(f"{entry:28s} {arch:6s} {r['registers']:4d} {r.get('spill_stores', 0):5d} "
                      f"{r['smem_static']:11d} {dyn_s:>36s} "
                      f"{occ['box64']['occupancy']:10.0%} / {occ['max']['occupancy']:4.0%}{'':8s}"
                      f"  {occ['box64']['limited_by']} / {occ['max']['limited_by']}")
    out = a.out or ROOT / "bench" / "results" / "resources.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(benchmark="kernel resources: nvcc --resource-usage and occupancy",
                                   date=time.strftime("%Y-%m-%d %H:%M:%S"), nvcc=_nvcc_version(),
                                   threads=threads, arch_limits={k: ARCH_LIMITS[k] for k in a.arch},
                                   k_cases={k: (max_k if v is None else v) for k, v in K_CASES.items()},
                                   rows=rows), indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


def _options(kernels, name: str) -> tuple:
    """The NVRTC options of module ``name`` (older trees: one list for every module)."""
    fn = getattr(kernels, "nvrtc_options", None)
    return tuple(fn(name)) if fn else tuple(kernels.NVRTC_OPTIONS)


def _dynamic_bytes(kernels, entry: str, k_index: int) -> int:
    """Dynamic shared memory a launch of ``entry`` asks for at K = k_index (0 for kernels that take none)."""
    fn = getattr(kernels, "phase_table_bytes", None)
    if fn is None or not entry.startswith(("score", "align")):
        return 0
    return int(fn(k_index))


def _nvcc_version() -> str:
    proc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True)
    return proc.stdout.strip().splitlines()[-1] if proc.stdout else ""


if __name__ == "__main__":
    sys.exit(main())
