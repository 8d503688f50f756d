"""The GEMMs of a LLaDA-8B forward on the GPU: how close each comes to reading
its weights at the memory's speed, per BLAS library.

    python bench/bench_gemm.py [--rows 32 512]

A cached decoding step multiplies a few rows (the block: 32) by every weight
of the model, so its GEMMs are bound by reading the weights: the speed that
matters is weight bytes per second, against the device's copy bandwidth
measured in the same run. Each shape is timed over enough copies of its
weight to overflow the L2 cache, as a step that reads 16 GB of weights does.
Rows: the packed q/k/v projection and its three separate parts, attn_out,
the packed ff_proj/up_proj and its two parts, ff_out and the head; with
torch's default BLAS library and with cuBLASLt.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from timing import time_us

D, MLP, VOCAB = 4096, 12288, 126464

# (name, [weight shapes [N, K]] run one after the other on the same input)
GEMMS = [
    ("q, k, v packed", [(3 * D, D)]),
    ("q, k, v separate", [(D, D)] * 3),
    ("attn_out", [(D, D)]),
    ("ff_proj, up_proj packed", [(2 * MLP, D)]),
    ("ff_proj, up_proj separate", [(MLP, D)] * 2),
    ("ff_out", [(D, MLP)]),
    ("head", [(VOCAB, D)]),
]


def copy_gbps(min_time: float) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), "cuda", min_time)
    return 2 * src.numel() / us / 1e3


def gemm_case(rows: int, shapes: list[tuple[int, int]], min_time: float) -> tuple[float, float]:
    """(us per call, weight bytes per call): the GEMMs of `shapes` on one
    input of `rows` rows, cycling over weight copies that overflow L2."""
    k = shapes[0][1]
    x = torch.randn(1, rows, k, device="cuda", dtype=torch.bfloat16)
    weight_bytes = sum(n * kk * 2 for n, kk in shapes)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = max(2, -(-4 * l2 // weight_bytes))
    sets = [[torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * kk**-0.5 for n, kk in shapes]
            for _ in range(copies)]
    turn = [0]

    def call():
        for w in sets[turn[0] % copies]:
            F.linear(x, w)
        turn[0] += 1

    return time_us(call, "cuda", min_time), weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--min-time", type=float, default=0.2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    copy = copy_gbps(args.min_time)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s")
    print()
    print("| GEMMs | rows | BLAS | us | weight GB/s | % of copy |")
    print("|---|---:|---|---:|---:|---:|")
    default = torch.backends.cuda.preferred_blas_library()
    try:
        for rows in args.rows:
            for name, shapes in GEMMS:
                for library in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(library)
                    us, weight_bytes = gemm_case(rows, shapes, args.min_time)
                    gbps = weight_bytes / us / 1e3
                    print(f"| {name} | {rows} | {library} | {us:.1f} | {gbps:.0f} | {gbps / copy:.0%} |",
                          flush=True)
    finally:
        torch.backends.cuda.preferred_blas_library(default)


if __name__ == "__main__":
    main()
