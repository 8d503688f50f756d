"""Instruction mix of the main loop of each CUDA kernel in a source file, from
its compiled machine code (SASS): a check of what a kernel change does to the
work per iteration that runs without a GPU.

    python scripts/sass_loop_stats.py csrc/cuda/attention.cu [--arch 90] [--filter mma_kernel]

Compiles the file with nvcc, disassembles it with cuobjdump (from PATH, or the
copy bundled with triton), and for every kernel prints its registers and
spills, the highest register its code names (above the count ptxas reports
when the kernel raises its budget with setmaxnreg), the performance remarks
ptxas makes about it (e.g. warpgroup MMAs serialised: C7520) and, for its largest loop
that holds tensor-core MMAs or global loads, the instruction count and the
most frequent opcodes. A loop body holds every
branch of the loop, taken or not: compare variants of one kernel, not kernels.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z0-9_]+)")
BRANCH = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P[0-9T]+\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)")
# Tensor-core MMAs: a warp's (HMMA) and, on Hopper, a warpgroup's (HGMMA).
MMAS = ("HMMA", "HGMMA")
# Loads from global memory: plain, asynchronous to shared memory (LDGSTS),
# and the Hopper tensor memory accelerator's (UTMALDG).
GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG")


def find_cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton  # the CUDA build of torch ships it with a cuobjdump
    except ImportError:
        sys.exit("cuobjdump: not on PATH and triton is not installed")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not bundled.exists():
        sys.exit(f"cuobjdump: not on PATH nor at {bundled}")
    return str(bundled)


def compile_and_disassemble(source: Path, arch: str) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "kernel.o"
        build = subprocess.run(
            ["nvcc", "-std=c++20", "-O3", f"-arch=sm_{arch}", f"-I{ROOT / 'csrc' / 'include'}",
             "--expt-relaxed-constexpr", "-Xptxas", "-v", "-c", str(source), "-o", str(obj)],
            capture_output=True, text=True)
        if build.returncode != 0:
            sys.exit(build.stderr)
        sass = subprocess.run([find_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True)
        return build.stderr, sass.stdout


def resources(ptxas_log: str) -> dict[str, str]:
    """Mangled kernel name -> 'N registers, S bytes spilled'."""
    out, name, spill = {}, None, "0"
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name] = f"{m.group(1)} registers, {spill} bytes spilled"
            name = None
    return out


def remarks(ptxas_log: str) -> dict[str, collections.Counter]:
    """Mangled kernel name -> its ptxas performance remarks ("C7520 ...",
    without the line number), counted."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in ptxas_log.splitlines():
        m = re.search(r"\((C\d+)\) (.*) in (?:the )?function '(\w+)'", line)
        if m:
            text = re.sub(r" in around line \d+", "", m.group(2))
            out[m.group(3)][f"{m.group(1)} {text}"] += 1
    return out


def main_loop(body: str) -> collections.Counter | None:
    """Opcodes of the largest backward-branch range holding an MMA or a load."""
    code = [(int(a, 16), op) for a, op in INSTRUCTION.findall(body)]
    best = None
    for src, dst in ((int(a, 16), int(b, 16)) for a, b in BRANCH.findall(body)):
        if dst >= src:
            continue
        ops = [op for at, op in code if dst <= at <= src]
        if any(op in MMAS or op in GLOBAL_LOADS for op in ops) and (best is None or len(ops) > len(best)):
            best = ops
    return collections.Counter(best) if best else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--arch", default="90", help="SM architecture, e.g. 80 or 90 (default 90)")
    parser.add_argument("--filter", default="", help="only kernels whose mangled name contains this")
    args = parser.parse_args()
    log, sass = compile_and_disassemble(args.source, args.arch)
    used, notes = resources(log), remarks(log)
    for chunk in re.split(r"\n\s+Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        name = name.strip()
        if args.filter not in name:
            continue
        highest = max((int(r) for r in re.findall(r"\bR(\d+)\b", body)), default=-1)
        local = len(re.findall(r"\b(?:STL|LDL)\b", body))
        print(f"{name}\n  {used.get(name, '?')}; highest register R{highest}, {local} local loads/stores")
        for note, n in notes.get(name, {}).items():
            print(f"  ptxas remark x{n}: {note}")
        loop = main_loop(body)
        if loop is None:
            print("  no loop with MMAs or global loads")
            continue
        total = sum(loop.values())
        mma = sum(loop[op] for op in MMAS)
        per_mma = f", {total / mma:.1f} per MMA" if mma else ""
        print(f"  main loop: {total} instructions{per_mma}")
        print("  " + ", ".join(f"{op} {n}" for op, n in loop.most_common(12)))


if __name__ == "__main__":
    main()
