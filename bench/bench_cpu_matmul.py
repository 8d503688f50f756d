"""The CPU products of a 16-bit LLaDA-8B forward: torch's own bfloat16 product
against llada.linear's float32 tiles of the bfloat16 weight, with float32
weights (twice the memory) as the yardstick.

    python bench/bench_cpu_matmul.py [--rows 32 288] [--dtype bfloat16]

Rows: 32 is a cached step (the block), 288 a block-start forward (prompt 256
plus the block). Ratios are against torch's 16-bit product, measured in the
same run. On a CPU with AVX512-BF16 or AMX, llada keeps torch's product by
default (LLADA_CPU_MATMUL=auto); the table still shows both.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from llada.linear import linear, set_cpu_matmul
from timing import time_us

D, MLP = 4096, 12288
SHAPES = [("q, k, v, attn_out", (D, D)), ("ff_proj, up_proj", (MLP, D)), ("ff_out", (D, MLP)),
          ("head (8192 of 126464 rows)", (8192, D))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 288])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, {args.dtype}")
    print()
    print(f"| rows | product [N, K] | torch {args.dtype} GFLOP/s | float32 tiles GFLOP/s | "
          "float32 weights GFLOP/s | tiles x torch |")
    print("|---:|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for rows in args.rows:
        for name, (n, k) in SHAPES:
            x = torch.randn(rows, k, generator=g).to(dtype)
            w = torch.randn(n, k, generator=g).to(dtype)
            x32, w32 = x.float(), w.float()
            flop = 2 * rows * n * k

            def tiles():
                set_cpu_matmul("float32")
                try:
                    return linear(x, w)
                finally:
                    set_cpu_matmul("auto")

            # Checked first: the tiles' float32 sums, rounded once, against the float32 product.
            torch.testing.assert_close(tiles(), F.linear(x32, w32).to(dtype), rtol=1e-2, atol=1e-2)
            us = [time_us(fn, "cpu", args.min_time) for fn in (lambda: F.linear(x, w), tiles,
                                                               lambda: F.linear(x32, w32))]
            rates = [flop / t / 1e3 for t in us]
            print(f"| {rows} | {name} [{n}, {k}] | {rates[0]:.1f} | {rates[1]:.1f} | {rates[2]:.1f} | "
                  f"{us[0] / us[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
