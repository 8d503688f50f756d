"""Benchmark of llada.attention against torch's scaled_dot_product_attention,
every SDPA backend available on the device (flash, efficient, cuDNN, math,
selected with torch.nn.attention.sdpa_kernel), in the same run.

    python bench/bench_attention.py                 # CPU, float32
    python bench/bench_attention.py --device cuda   # GPU, bfloat16, full shapes

Shapes: "full" runs every query against every key (a plain forward, Lq = Lk);
"cache" runs one 32-token block of queries against the whole sequence (cached
decoding). H=32, D=128; full L = 512..4096 at B=1 and L=1024 at B=8; cache
Lk = 512..4096 at B=1 and 1024 at B=8. The CPU run takes a few minutes on
2 cores.

On an sm_90 GPU (H100, H200) with a build for it, "llada" runs the Hopper
kernel where the op's plan takes it, and two more columns time each kernel
alone: "llada mma" (LLADA_ATTENTION_SM90=0: the tensor-core kernel of
attention.cu) and "llada sm90" (=always: the Hopper kernel). On the full
shapes, one more column per pipeline variant of the Hopper kernel's 128-row
blocks times it with LLADA_ATTENTION_SM90_PIPELINE set ("sm90 two-q", ...).
LLADA_ATTENTION_SM90=0 in the environment leaves the Hopper kernel out
altogether.

Every contender's output, llada's included, is checked once per shape
against the float64 reference (llada.ops.attention_reference), as the tests
check the op: its largest error may be at most twice that of torch's plain
composition of attention in the same dtype (plus 2e-5 in float32). A wrong
contender is not timed: its cells read "wrong", and a wrong SDPA backend is
never the best one. A llada column that raises reads "failed" (one whose CUDA
graph cannot be captured, "no graph" in the second table). The run exits
non-zero if any llada column is wrong or failed.
The contenders are timed in turn over three rounds, each keeping its best,
with each one's setting (SDPA backend, environment variables) entered around
its timing rather than around each call. The table reports TFLOP/s (4 B H Lq
Lk D flops per call) and llada's speed as a multiple of the best SDPA
backend.
On CUDA a second table times each contender's calls captured in a CUDA
graph (timing.GRAPH_CALLS calls a graph, which share the launch of its
replay) and replayed: the kernels alone, without the Python work of a call,
which the first table's small shapes are partly made of (a model decoding
under CUDA graphs pays only the kernels).
Each shape's results also print as soon as they are measured, one "RESULT
attention" line for llada (the op's default plan) and one "RESULT
attention_variant" line per other llada column, so that a run cut short
keeps the shapes it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import llada
from llada.ops import attention_reference
from timing import GRAPH_CALLS, cuda_graphed, time_interleaved

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@contextlib.contextmanager
def _environment(settings):
    """The environment variables `settings` set (llada.attention reads them per call)."""
    os.environ.update(settings)
    try:
        yield
    finally:
        for name in settings:
            del os.environ[name]


ONE_KERNEL = {"llada mma": {"LLADA_ATTENTION_SM90": "0"}, "llada sm90": {"LLADA_ATTENTION_SM90": "always"}}
# The Hopper kernel's other pipelines for 128-row blocks (timed on the full
# shapes; LLADA_BENCH_SM90_PIPELINES, when set, lists the ones to time).
PIPELINES = {f"sm90 {name}": {"LLADA_ATTENTION_SM90": "always", "LLADA_ATTENTION_SM90_PIPELINE": name}
             for name in llada._C.sm90_pipelines()[1:]
             if name in os.environ.get("LLADA_BENCH_SM90_PIPELINES", name).split()}


class Checker:
    """Whether an output of attention(q, k, v) is right: its largest error
    against the float64 reference at most twice that of torch's plain
    composition of attention in q's dtype, plus 2e-5 in float32 (the
    float32 tests' absolute tolerance) or 1e-6 otherwise."""

    def __init__(self, q, k, v):
        # A few heads at a time (heads are independent here: as many kv heads
        # as query heads), so that the [B, heads, Lq, Lk] scores of the long
        # shapes stay small.
        b, lq, h, _ = q.shape
        step = max(1, 2**25 // (b * lq * k.shape[1]))
        heads = [slice(i, i + step) for i in range(0, h, step)]
        self.want = torch.cat([attention_reference(q[:, :, s], k[:, :, s], v[:, :, s]) for s in heads], dim=2)
        plain = torch.cat([attention_reference(q[:, :, s], k[:, :, s], v[:, :, s], dtype=q.dtype)
                           for s in heads], dim=2)
        self.allowed = 2 * self.error(plain) + (2e-5 if q.dtype == torch.float32 else 1e-6)

    def error(self, out) -> float:
        """The largest absolute error of out (NaN if out has a NaN: max propagates it)."""
        return (out.double() - self.want).abs().max().item()

    def wrong(self, kind, name, out) -> bool:
        """Whether out is wrong; if so, says by how much."""
        err = self.error(out)
        if err <= self.allowed:
            return False
        print(f"  {kind} {name}: wrong: error {err:.3g} against the float64 reference, "
              f"allowed {self.allowed:.3g}; not timed", flush=True)
        return True


def cases() -> list[tuple[str, int, int, int, int, int]]:
    """(kind, B, H, Lq, Lk, D)."""
    full = [(1, 32, l, l) for l in (512, 1024, 2048, 4096)] + [(8, 32, 1024, 1024)]
    cache = [(1, 32, 32, l) for l in (512, 1024, 2048, 4096)] + [(8, 32, 32, 1024)]
    return [("full", *c, 128) for c in full] + [("cache", *c, 128) for c in cache]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per measurement")
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    min_time = args.min_time if args.min_time is not None else (0.2 if device == "cuda" else 0.5)
    if device == "cuda" and not (torch.cuda.is_available() and llada.cuda_kernels_available()):
        raise SystemExit("CUDA benchmark needs a GPU and llada built with CUDA kernels")
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {dtype}", flush=True)

    # With the Hopper kernel available and not turned off, "llada" is the
    # op's default plan (so the variable goes) beside each kernel alone.
    sm90 = device == "cuda" and llada.hopper_attention_available() and os.environ.get("LLADA_ATTENTION_SM90") != "0"
    if sm90:
        os.environ.pop("LLADA_ATTENTION_SM90", None)
        os.environ.pop("LLADA_ATTENTION_SM90_PIPELINE", None)
    gen = torch.Generator().manual_seed(0)
    rows, graph_rows = [], []
    llada_wrong = []  # (kind, shape, name, what) of each llada column that was wrong or failed
    for kind, b, h, lq, lk, d in cases():
        q = torch.randn(b, lq, h, d, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(b, lk, h, d, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(b, lk, h, d, generator=gen).to(device=device, dtype=dtype)
        flops = 4.0 * b * h * lq * lk * d
        shape = f"B={b} H={h} Lq={lq} Lk={lk} D={d}"
        checker = Checker(q, k, v)
        # SDPA wants [B, H, L, D]; the transposes are views, as in a model.
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        # Each contender's setting (a backend, environment variables) is
        # entered around its timing, not around each call.
        # wrong: contender -> "wrong" (output against the reference) or
        # "failed" (raised); such a contender is not timed.
        contenders, contexts, wrong = {}, {}, {}
        variants = {**ONE_KERNEL, **(PIPELINES if kind == "full" else {})} if sm90 else {}
        for name, setting in {"llada": {}, **variants}.items():
            try:
                with _environment(setting):
                    out = llada.attention(q, k, v)
            except RuntimeError as e:  # a launch error leaves the context usable; the row goes on without it
                print(f"  {kind} {name}: failed ({str(e).splitlines()[0][:100]}); not timed", flush=True)
                wrong[name] = "failed"
                continue
            if checker.wrong(kind, name, out):
                wrong[name] = "wrong"
            else:
                contenders[name] = lambda: llada.attention(q, k, v)
                if setting:
                    contexts[name] = lambda setting=setting: _environment(setting)
            del out
        llada_wrong += [(kind, shape, name, what) for name, what in wrong.items()]
        for name, backend in BACKENDS.items():
            if device == "cpu" and name != "math" and name != "flash":
                continue  # CPU has only these two
            try:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
            except RuntimeError as e:  # backend not available for this shape/dtype/device
                print(f"  {kind} {name}: unavailable ({str(e).splitlines()[0][:80]})", flush=True)
                continue
            if checker.wrong(kind, name, out):
                wrong[name] = "wrong"
            else:
                contenders[name] = lambda: F.scaled_dot_product_attention(qt, kt, vt)
                contexts[name] = lambda backend=backend: sdpa_kernel([backend])
            del out
        del checker
        us = time_interleaved(contenders, device, min_time, contexts=contexts)
        tflops = {name: flops / t / 1e6 for name, t in us.items()}
        graph_tflops, graph_wrong = None, None
        if device == "cuda":
            graphed, graph_wrong = {}, dict(wrong)
            for name, fn in contenders.items():
                try:
                    with contexts.get(name, contextlib.nullcontext)():
                        graphed[name] = cuda_graphed(fn)
                except RuntimeError as e:
                    print(f"  {kind} {name}: no CUDA graph ({str(e).splitlines()[0][:80]})", flush=True)
                    graph_wrong[name] = "no graph"
                    if name not in BACKENDS:  # llada's ops are meant to be captured
                        llada_wrong.append((kind, shape, name, "no CUDA graph"))
            # A replay runs GRAPH_CALLS calls.
            us = time_interleaved(graphed, device, min_time)
            del graphed
            graph_tflops = {name: flops * GRAPH_CALLS / t / 1e6 for name, t in us.items()}
            graph_rows.append((kind, shape, graph_tflops, graph_wrong))
        rows.append((kind, shape, tflops, wrong))
        # Each row's result as soon as it is measured, so that a run cut
        # short still reports the shapes it got through.
        for name in {"llada": {}, **variants}:
            tag = "attention" if name == "llada" else "attention_variant"
            text = f"eager {result_text(tflops, wrong, name)}"
            if graph_tflops is not None:
                text += f"; CUDA graphs {result_text(graph_tflops, graph_wrong, name)}"
            print(f"RESULT {tag} {kind} {shape} {name}: {text}", flush=True)
        del q, k, v, qt, kt, vt

    print_table(f"attention, {dtype}, {device}: TFLOP/s (higher is better), each call launched from Python",
                rows)
    if graph_rows:
        print_table(f"attention, {dtype}, {device}: TFLOP/s of the kernels alone (CUDA graph replays)", graph_rows)
    if llada_wrong:
        raise SystemExit("llada's attention is wrong (against the float64 reference) or failed at: "
                         + "; ".join(f"{kind} {shape} {name} ({what})" for kind, shape, name, what in llada_wrong))


def result_text(tflops, wrong, name) -> str:
    """name's TFLOP/s in a row and its multiple of the row's best SDPA
    backend, or why it has none ("wrong", "failed", "no graph")."""
    if name in wrong:
        return wrong[name]
    if not tflops.get(name):
        return "n/a"
    best_name, best = best_sdpa(tflops)
    against = f"x{tflops[name] / best:.2f} of SDPA {best_name}" if best else "no SDPA backend ran"
    return f"{tflops[name]:.3f} TFLOP/s {against}"


def best_sdpa(tflops):
    """The fastest SDPA backend of a row and its TFLOP/s (None, 0 if none ran;
    a wrong backend is never timed, so never the best)."""
    return max(((n, t) for n, t in tflops.items() if n in BACKENDS and t), key=lambda x: x[1], default=(None, 0.0))


def print_table(title, rows):
    """rows: (kind, shape, {contender: TFLOP/s}, {contender not timed: why, e.g. "wrong"})."""
    names = [n for n in BACKENDS if any(t.get(n) or n in w for _, _, t, w in rows)]
    ours = ["llada"] + [n for n in {**ONE_KERNEL, **PIPELINES} if any(n in t or n in w for _, _, t, w in rows)]
    print()
    print(title)
    print()
    print("| kind | shape | " + " | ".join(ours) + " | " + " | ".join(f"SDPA {n}" for n in names) + " | "
          + " | ".join(f"{n} / best SDPA" for n in ours) + " |")
    print("|---|---|" + "---|" * (2 * len(ours) + len(names)))

    def cell(t, wrong, n):
        return wrong[n] if n in wrong else f"{t[n]:.3f}" if t.get(n) else "n/a"

    def ratio(t, wrong, n, best_name, best):
        return wrong[n] if n in wrong else f"{t[n] / best:.2f}x ({best_name})" if t.get(n) and best else "n/a"

    for kind, shape, t, wrong in rows:
        best_name, best = best_sdpa(t)
        mine = " | ".join(cell(t, wrong, n) for n in ours)
        cells = " | ".join(cell(t, wrong, n) for n in names)
        ratios = " | ".join(ratio(t, wrong, n, best_name, best) for n in ours)
        print(f"| {kind} | {shape} | {mine} | {cells} | {ratios} |")


if __name__ == "__main__":
    main()
