"""The model's matrix products, and how the CPU does them with 16-bit weights.

Most CPUs have no bfloat16 or float16 arithmetic (no AVX512-BF16, no AMX),
and torch multiplies such matrices there several times slower than float32
ones (on an AVX2 EPYC, 3.5-7x slower at LLaDA-8B's projection shapes). A
16-bit model is what fits an 8B checkpoint in a desktop's memory, so there a
product without gradient converts the weight to float32 a tile of rows at a
time (a few MB, which the cache holds while float32 BLAS reads it) and
multiplies in float32. It runs at float32 speed and keeps the 16-bit memory
footprint. The result is the same as torch's 16-bit product up to the order
of the float32 sums, rounded once to the input's dtype.

``LLADA_CPU_MATMUL`` (or :func:`set_cpu_matmul`) picks: ``auto`` (the
default: float32 tiles unless the CPU multiplies the dtype natively),
``float32`` (always tiles) or ``native`` (always torch's 16-bit product).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import autodiff

CPU_MATMUL_MODES = ("auto", "float32", "native")
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_TILE_BYTES = 8 << 20  # of float32 weight rows: measured best among 1-8 MB
_MIN_TILE_ROWS = 128  # fewer rows per product and BLAS runs below its speed

_cpu_matmul = os.environ.get("LLADA_CPU_MATMUL", "auto")
if _cpu_matmul not in CPU_MATMUL_MODES:
    raise ValueError(f"LLADA_CPU_MATMUL: expected one of {CPU_MATMUL_MODES}, got {_cpu_matmul!r}")


def set_cpu_matmul(mode: str) -> None:
    """How CPU products with bfloat16/float16 weights run (see the module)."""
    global _cpu_matmul
    if mode not in CPU_MATMUL_MODES:
        raise ValueError(f"mode: expected one of {CPU_MATMUL_MODES}, got {mode!r}")
    _cpu_matmul = mode


def _cpu_multiplies_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for products in ``dtype`` (AVX512-BF16
    or AMX for bfloat16, AMX-FP16 for float16), where torch's own product is
    the fast one. torch reports them through private functions: without
    them, assume not."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    else:
        checks = ("_is_amx_fp16_supported",)
    return any(getattr(cpu, name, lambda: False)() for name in checks)


# Asked once, here: torch.compile cannot trace the questions.
_NATIVE = {dtype: _cpu_multiplies_natively(dtype) for dtype in _HALF_DTYPES}


def _tiles_in_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Cheapest tests first: every projection of every forward asks.
    if not x.is_cpu or weight.dtype not in _HALF_DTYPES or x.dtype != weight.dtype:
        return False
    if autodiff.needs_derivative(x) or autodiff.needs_derivative(weight):
        return False
    # Under CPU autocast F.linear casts both operands to autocast's dtype, and
    # the result has that dtype: torch's product is the one that does so.
    if torch.is_autocast_enabled("cpu"):
        return False
    return _cpu_matmul == "float32" or (_cpu_matmul == "auto" and not _NATIVE[weight.dtype])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] times weight [N, K] transposed: [..., N], as F.linear gives
    it (x's dtype, or autocast's)."""
    if not _tiles_in_float32(x, weight):
        return F.linear(x, weight)
    rows = max(_MIN_TILE_ROWS, _TILE_BYTES // (4 * max(1, weight.shape[1])))
    x32 = x.float()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    for first in range(0, weight.shape[0], rows):
        out[..., first:first + rows] = F.linear(x32, weight[first:first + rows].float())
    return out


class Linear(nn.Linear):
    """nn.Linear without bias whose product is :func:`linear` (same names,
    parameters and state_dict)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
