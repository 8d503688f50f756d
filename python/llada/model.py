"""The LLaDA transformer: a bidirectional Llama-style mask predictor.

    h = x + attn_out(attention(rope(q), rope(k), v))      q, k, v from attn_norm(x)
    y = h + ff_out(silu(ff_proj(m)) * up_proj(m))          m = ff_norm(h)
    logits = head(ln_f(y))

Each residual add is done by the norm that reads its result
(``ops.add_rms_norm``, one kernel): a block returns ``h`` and the
``ff_out(...)`` term apart, and the next block's attn_norm (or ln_f) adds them.

Module names mirror the Hugging Face checkpoint (``model.transformer.wte``,
``model.transformer.blocks.{i}.q_proj``, ...), so ``state_dict()`` keys are the
checkpoint's weight names and loading needs no renaming table.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import autodiff, devices, ops
from .linear import Linear, linear
from .token_ids import is_int


# The fields of LLaDAConfig that count something: each at least 1.
_SIZE_FIELDS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
                "max_sequence_length")

# The special token ids: each a row of the embedding; the optional ones may be
# None, as LLaDA's config.json gives no BOS or EoT id.
_ID_FIELDS = ("mask_token_id", "eos_token_id", "pad_token_id")
_OPTIONAL_ID_FIELDS = ("bos_token_id", "eot_token_id")


@dataclass
class LLaDAConfig:
    """The shape and special ids of a LLaDA model (defaults: LLaDA-8B)."""

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    # Rows of the embedding and the head; may exceed vocab_size (padding rows),
    # and the logits are this wide, as in the official model.
    embedding_size: int = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    bos_token_id: Optional[int] = 126080
    eot_token_id: Optional[int] = 126348
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self):
        # First, as the checks below divide by them and a model needs at least one of each.
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            if not is_int(value) or value < 1:  # is_int: True is no size
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        # A rope_theta <= 0 or NaN makes every logit NaN without an error, and a
        # negative eps can make the norm's rsqrt NaN; the bounds are config.json's.
        self.rope_theta = _finite_number("rope_theta", self.rope_theta, inclusive=False)
        self.rms_norm_eps = _finite_number("rms_norm_eps", self.rms_norm_eps, inclusive=True)
        # Any other value would pick the head by its truthiness: "no" ties it.
        if not isinstance(self.weight_tying, bool):
            raise ValueError(f"weight_tying: expected True or False, got {self.weight_tying!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ValueError(
                f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})"
            )
        # Last, as the bound is embedding_size. An id beyond it would fail far
        # from here under another name, or never match a token (an EoT that
        # never stops); True would be the id 1.
        for name in _ID_FIELDS + _OPTIONAL_ID_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_ID_FIELDS:
                continue
            if not is_int(value) or not 0 <= value < self.embedding_size:
                optional = "None or " if name in _OPTIONAL_ID_FIELDS else ""
                raise ValueError(f"{name}: expected {optional}an int in [0, {self.embedding_size}) "
                                 f"(the embedding's rows), got {value!r}")


def _finite_number(name: str, value, inclusive: bool) -> float:
    """``value`` as a float where it is a finite real number (a Python or
    numpy int or float, not a bool) above 0, or at 0 too when ``inclusive``;
    otherwise a ValueError naming ``name``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if math.isfinite(number) and (number >= 0 if inclusive else number > 0):
            return number
    raise ValueError(f"{name}: expected a finite number {'>=' if inclusive else '>'} 0, got {value!r}")


class LLaDAOutput(NamedTuple):
    """What the forward returns; ``.logits`` as in Hugging Face models."""

    logits: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the storage dtype; the weight multiplies
        # after the cast back, as in the checkpoint's training code. One kernel
        # when no gradient is needed; the (differentiable) composition otherwise.
        if _fused_norm_fits(x, self.weight):
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.rms_norm_reference(x, self.weight, self.eps)

    def add_then_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, norm(s))`` with ``s = x + residual``: a residual add and the
        norm of its result, in one kernel when no gradient is needed."""
        if _fused_norm_fits(x, self.weight) and _kernels_take(residual) and residual.shape == x.shape \
                and residual.dtype == x.dtype and residual.device == x.device:
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        s = x + residual
        return s, self(s)


def _kernels_take(x: torch.Tensor) -> bool:
    """Whether llada's compiled ops can stand in for a torch composition on
    x: no derivative wanted (they have none), a device they run on (see
    :mod:`llada.devices`), and a dtype they take (CPU float32/bfloat16;
    CUDA also float16)."""
    if autodiff.needs_derivative(x):
        return False
    device = x.device
    if device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16) and devices.kernels_run_on(device)
    return (device.type == "cuda" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and devices.kernels_run_on(device))


def _fused_norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if autodiff.needs_derivative(weight):
        return False
    return _kernels_take(x) and x.dtype == weight.dtype and x.device == weight.device


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin [L, head_dim] in float32 for the half-split convention."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by position (cos, sin [1 or B, L, D]); computed in
    float32, returned in x's dtype. One kernel (llada.ops.rope, the same bits)
    when no gradient is needed; the composition otherwise."""
    if _kernels_take(x) and cos.dtype == torch.float32:
        return ops.rope(x, cos, sin)
    return ops.rope_reference(x, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: one kernel (llada.ops.silu_mul) when no gradient is
    needed; the composition otherwise."""
    if _kernels_take(gate) and _kernels_take(up) and up.dtype == gate.dtype and up.shape == gate.shape:
        return ops.silu_mul(gate, up)
    return ops.silu_mul_reference(gate, up)


def store_kv(k, v, cos, sin, cache_k, cache_v, positions) -> None:
    """Rotates k and writes it and v into the caches at positions (int64
    [L]): one kernel (llada.ops.store_kv, the same bits) when no gradient is
    needed (by k, v or the caches, which it writes); the composition
    otherwise."""
    if (_kernels_take(k) and _kernels_take(v) and cos.dtype == torch.float32
            and not autodiff.needs_derivative(cache_k) and not autodiff.needs_derivative(cache_v)
            and v.dtype == cache_k.dtype == cache_v.dtype == k.dtype
            and cache_k.is_contiguous() and cache_v.is_contiguous()):
        ops.store_kv(k, v, cos, sin, cache_k, cache_v, positions)
    else:
        ops.store_kv_reference(k, v, cos, sin, cache_k, cache_v, positions)


_ID_DTYPES = (torch.int64, torch.int32)  # what the embedding looks up

ATTENTION_BACKENDS = ("llada", "sdpa")
# "llada": the fused kernels of llada.ops.attention wherever they support the
# shape and dtype (head dim 64 or 128; CPU float32/bfloat16, CUDA also
# float16) and no gradient is needed; torch's SDPA otherwise.
# "sdpa": always torch.nn.functional.scaled_dot_product_attention.
# Chosen with set_attention_backend() or the LLADA_ATTENTION variable.
_attention_backend = os.environ.get("LLADA_ATTENTION", "llada")
if _attention_backend not in ATTENTION_BACKENDS:
    raise ValueError(f"LLADA_ATTENTION: expected one of {ATTENTION_BACKENDS}, got {_attention_backend!r}")


def set_attention_backend(name: str) -> None:
    """Selects the attention the model runs: "llada" (default) or "sdpa"."""
    global _attention_backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"name: expected one of {ATTENTION_BACKENDS}, got {name!r}")
    _attention_backend = name


def _fused_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    # Any of the three may need a gradient (e.g. training k_proj and v_proj alone).
    # On CUDA the op's float32 kernel is a plain reference for its tests, far
    # slower than SDPA; the tensor-core kernels take bfloat16 and float16.
    return (_attention_backend == "llada" and q.shape[-1] in (64, 128)
            and (q.device.type == "cpu" or q.dtype != torch.float32)
            and _kernels_take(q) and _kernels_take(k) and _kernels_take(v))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Bidirectional attention, softmax(q k^T / sqrt(D)) v.

    q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D] with Hq a multiple of Hkv (query head
    h reads kv head h // (Hq / Hkv)); key_mask [B, Lk] bool, False = padding key,
    or None. Returns [B, Lq, Hq, D].
    """
    if _fused_attention_fits(q, k, v):
        return ops.attention(q, k, v, key_mask)
    if any(autodiff.wants_tangent(t) for t in (q, k, v)):
        # torch's SDPA kernels have no forward-mode derivative; the composition has.
        return ops.attention_reference(q, k, v, key_mask, dtype=torch.float32).to(q.dtype)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


class Block(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, kv, m = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.mlp_hidden_size
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, kv)
        self.v_proj = Linear(d, kv)
        self.attn_out = Linear(d, d)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = Linear(d, m)
        self.up_proj = Linear(d, m)
        self.ff_out = Linear(m, d)

    def forward(self, x, pending, cos, sin, key_mask, rows=None, cache=None, positions=None):
        """x [B, L, d] -> (h, f), each [B, L, d], whose sum is the block's
        output; or, given rows (int64 positions [B, K], or a slice of
        positions for every row), only the outputs at those positions,
        [B, K, d] each. Keys and values always come from every position;
        only the query side is cut down.

        The last residual add is left to whoever normalises the sum next
        (the next block's attn_norm, or ln_f), which does both in one
        kernel: ``pending`` is the previous block's f, added to x here
        (None for the first block).

        With a cache (this layer's ``(k, v)``, each [B, total, Hkv, D]), x
        holds the sequence positions ``positions`` (int64 [L]): their keys and
        values are written into the cache, and the queries attend to every
        cached position."""
        b, l, _ = x.shape
        if pending is None:
            a = self.attn_norm(x)
        else:
            x, a = self.attn_norm.add_then_norm(x, pending)
        if rows is None:
            q, k, v = _project(a, self.q_proj, self.k_proj, self.v_proj)
        else:  # queries only for the rows kept, below
            k, v = _project(a, self.k_proj, self.v_proj)
        k = k.view(b, l, self.n_kv_heads, self.head_dim)
        v = v.view(b, l, self.n_kv_heads, self.head_dim)
        if cache is not None:
            store_kv(k, v, cos, sin, *cache, positions)
            k, v = cache
        else:
            k = apply_rope(k, cos, sin)
        cos_q, sin_q = cos, sin
        if isinstance(rows, slice):
            x, a, cos_q, sin_q = x[:, rows], a[:, rows], cos[:, rows], sin[:, rows]
        elif rows is not None:
            x, a = _gather_rows(x, rows), _gather_rows(a, rows)
            cos_q, sin_q = cos[0][rows], sin[0][rows]
        if rows is not None:
            q = self.q_proj(a)
        q = apply_rope(q.view(b, -1, self.n_heads, self.head_dim), cos_q, sin_q)
        h, m = self.ff_norm.add_then_norm(x, self.attn_out(attention(q, k, v, key_mask).flatten(2)))
        gate, up = _project(m, self.ff_proj, self.up_proj)
        return h, self.ff_out(silu_mul(gate, up))


def _project(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """x through each of the layers: one GEMM when their weights lie back to
    back in one buffer (see pack_projections) and no gradient is needed,
    else one per layer. The packed outputs are views of one
    [..., sum of widths] tensor."""
    weights = [layer.weight for layer in layers]
    packed = None
    # torch.compile cannot trace storage addresses; it gets one GEMM each.
    gradient = any(autodiff.needs_derivative(w) for w in weights)
    if not (gradient or torch.compiler.is_compiling()):
        packed = _back_to_back(weights)
    if packed is None:
        return tuple(layer(x) for layer in layers)
    return linear(x, packed).split([w.shape[0] for w in weights], dim=-1)


def _back_to_back(weights: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The weights [N_i, K] as one [sum N_i, K] matrix when they are
    contiguous and lie back to back, in this order, in one storage; else
    None. Checked at every forward, so weights moved or replaced since they
    were packed (``model.to``, assignment) just run one GEMM each."""
    first = weights[0]
    storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for w in weights:
        if (w.data_ptr() != end or not w.is_contiguous() or w.dtype != first.dtype
                or w.untyped_storage().data_ptr() != storage):
            return None
        end += w.numel() * w.element_size()
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


def _projection_groups(block: Block) -> list[tuple[nn.Linear, ...]]:
    """The projections that read the same input, packed together."""
    return [(block.q_proj, block.k_proj, block.v_proj), (block.ff_proj, block.up_proj)]


def pack_projections(model: "LLaDAModel", pack: bool = True) -> "LLaDAModel":
    """Lays each block's q, k and v weights back to back in one buffer, and
    its ff_proj and up_proj weights in another, so that a forward runs one
    GEMM per group. A cached step reads every weight for a few rows, and
    wide GEMMs read faster: in an H200 profile of one at LLaDA-8B shape the
    4096-wide projections ran at 61% of the memory bandwidth and the
    12288-wide ones at 74-76%. The parameters stay what they were, as views
    of the buffers: names, values, dtypes and ``state_dict()`` keys do not
    change. ``pack=False`` gives every weight its own buffer again.

    ``load_model`` and ``random_model`` pack on CUDA, and so does moving
    or converting a model on CUDA (``model.to``, ``.cuda()``, ``.half()``);
    converting one elsewhere leaves every weight its own buffer. A forward
    checks the layout each time, so either layout runs. Returns the model.
    """
    for block in model.model.transformer["blocks"]:
        for group in _projection_groups(block):
            weights = [layer.weight for layer in group]
            if len({(w.dtype, w.device) for w in weights}) > 1 or weights[0].device.type == "meta":
                continue  # no buffer they could share
            if (_back_to_back(weights) is not None) == pack:
                continue
            if pack:
                buffer = torch.cat([w.detach() for w in weights])
                parts = buffer.split([w.shape[0] for w in weights])
            else:
                parts = [w.detach().clone() for w in weights]
            for layer, w, part in zip(group, weights, parts):
                layer.weight = nn.Parameter(part, requires_grad=w.requires_grad)
    return model


class _Backbone(nn.Module):
    """Holds ``transformer`` so parameter names start with ``model.transformer``."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                # No default random init: the weights come from a checkpoint
                # or train.init_weights. (normal_ on the meta device that the
                # loader builds on would also import torch._dynamo: ~2 s.)
                wte=nn.Embedding(cfg.embedding_size, cfg.d_model,
                                 _weight=torch.empty(cfg.embedding_size, cfg.d_model)),
                blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
                ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            )
        )
        if not cfg.weight_tying:
            self.transformer["ff_out"] = Linear(cfg.d_model, cfg.embedding_size)


class KVCache:
    """Keys (after RoPE) and values of every position of a sequence, per
    layer, each [B, total, Hkv, D]: what a forward over a slice of positions
    attends to. Filled by a full forward, refreshed slice by slice."""

    def __init__(self, config: "LLaDAConfig", batch: int, total: int, device, dtype):
        shape = (batch, total, config.n_kv_heads, config.head_dim)
        self.layers = [
            (torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
            for _ in range(config.n_layers)
        ]
        self.batch, self.total = batch, total
        self._fits = None  # what LLaDAModel last found its layers to fit (see _check_cache)


class LLaDAModel(nn.Module):
    """LLaDA mask predictor: ``model(input_ids, attention_mask).logits``."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)

    @property
    def device(self) -> torch.device:
        return self.model.transformer["wte"].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer["wte"].weight.dtype

    def _apply(self, fn, recurse=True):
        # Conversions (.to, .cuda, .half, ...) make every parameter anew, one
        # buffer each: on CUDA, pack the projections again.
        super()._apply(fn, recurse)
        if self.device.type == "cuda":
            pack_projections(self)
        return self

    def head_weight(self) -> torch.Tensor:
        t = self.model.transformer
        return t["wte"].weight if self.config.weight_tying else t["ff_out"].weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        logits_at: Optional[torch.Tensor | slice] = None,
        cache: Optional[KVCache] = None,
        start: Optional[int] = 0,
        positions: Optional[torch.Tensor] = None,
    ) -> LLaDAOutput:
        """Logits of every position, or only of the positions in ``logits_at``.

        Args:
            input_ids: int64 [B, L] (ids in [0, embedding_size): not checked
                here, as that would wait for the device every forward;
                ``generate``, ``infill`` and ``log_likelihood`` check theirs).
            attention_mask: [B, L] (with a cache: [B, cache.total]) of 1
                (attend) / 0 (padding key), or None. Padding positions still
                get logits; only keys are masked.
            logits_at: None for logits [B, L, V]; a bool mask [B, L] for logits
                [N, V] of its True positions in row-major order (like
                ``x[mask]``); int64 positions [B, K] for logits [B, K, V]; or
                a slice (step 1) of positions, the same for every row, for
                logits [B, K, V] (its bounds Python or numpy ints; under
                torch.compile, Python ints only: it traces a numpy int as a
                tensor, whose value no shape may depend on). The last block's queries and MLP, the final
                norm and the head then run on those rows only; keys and
                values still see every position. A slice is the only form
                that reads nothing back from the device (a mask needs its
                count, positions their range check).
            cache: a :class:`KVCache` of the whole sequence. ``input_ids`` are
                then the positions ``start .. start + L`` of it: their keys and
                values are written into the cache, every position's cached
                keys and values are attended to, RoPE uses the true positions,
                and ``attention_mask`` (if any) covers the whole sequence.
                ``logits_at`` counts positions of ``input_ids``.
            start: where ``input_ids`` begin in the cached sequence (None: 0,
                or where ``positions`` say).
            positions: instead of ``start``, the cached positions as an int64
                tensor [L] on the model's device. Nothing is read back to the
                host, so a forward taking them can be captured once as a CUDA
                graph and replayed at any position; they are not range-checked.
        """
        t = self.model.transformer
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in _ID_DTYPES:
            raise ValueError(f"input_ids: expected an int64 tensor [batch, length], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        b, l = input_ids.shape
        if b == 0 or l == 0:
            raise ValueError(f"input_ids: expected at least one row and one position, got {tuple(input_ids.shape)}")
        device = input_ids.device
        if cache is not None:
            self._check_cache(cache)
            start_given = start is not None
            start = 0 if start is None else start
            if not is_int(start):
                raise TypeError(f"start: expected an int, got {type(start).__name__}")
            if cache.batch != b or not 0 <= start <= cache.total - l:
                raise ValueError(
                    f"cache: holds {cache.batch} rows of {cache.total} positions; cannot take "
                    f"{b} rows at positions {start}..{start + l}"
                )
            if positions is None:
                positions = torch.arange(start, start + l, device=device)
            elif start_given and start != 0:
                raise ValueError("start: give either start or positions, not both")
            elif not isinstance(positions, torch.Tensor):
                raise TypeError(f"positions: expected an int64 tensor [{l}] on {device}, "
                                f"got {type(positions).__name__}")
            elif positions.dtype != torch.int64 or positions.shape != (l,) or positions.device != device:
                raise ValueError(
                    f"positions: expected int64 [{l}] on {device}, got {positions.dtype} "
                    f"{tuple(positions.shape)} on {positions.device}"
                )
        # Without a cache start has no meaning, so None (no start) is as good as the default 0.
        elif (start is not None and start != 0) or positions is not None:
            raise ValueError("start, positions: only meaningful with a cache")
        else:
            positions = torch.arange(l, device=device)
        if attention_mask is not None:
            # After the cache's checks: with a cache, the mask's shape is the cache's.
            keys = (b, l if cache is None else cache.total)
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask: expected a tensor of shape {keys}, "
                                f"got {type(attention_mask).__name__}")
            if tuple(attention_mask.shape) != keys:
                raise ValueError(f"attention_mask: expected a tensor of shape {keys}, "
                                 f"got {tuple(attention_mask.shape)}")
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.to(device=device) != 0
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos[None], sin[None]
        rows = keep = None
        if logits_at is not None:
            rows, keep = _query_rows(logits_at, b, l, device)
        layers = cache.layers if cache is not None else [None] * len(t["blocks"])
        x, pending = t["wte"](input_ids), None
        blocks = t["blocks"]
        for block, layer in zip(blocks[:-1], layers[:-1]):
            x, pending = block(x, pending, cos, sin, key_mask, cache=layer, positions=positions)
        # Nothing after the last block mixes positions, so it only needs to
        # produce the rows whose logits are wanted.
        x, pending = blocks[-1](x, pending, cos, sin, key_mask, rows, cache=layers[-1], positions=positions)
        if keep is not None:
            x, pending = x[keep], pending[keep]
        _, y = t["ln_f"].add_then_norm(x, pending)
        return LLaDAOutput(linear(y, self.head_weight()))


    def _check_cache(self, cache) -> None:
        """A cache this model can fill: one layer per block, each key and
        value [B, total, Hkv, D] on the model's device, in the dtype its
        projections compute in (the weights', or autocast's)."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")
        config, device = self.config, self.device
        if len(cache.layers) != config.n_layers:
            raise ValueError(f"cache: holds {len(cache.layers)} layers; the model has {config.n_layers}")
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.dtype
        # Every layer is checked once per cache and expectation, not every step.
        expected = (config.n_kv_heads, config.head_dim, dtype, device)
        if cache._fits == expected:
            return
        shape = (cache.batch, cache.total, config.n_kv_heads, config.head_dim)
        for layer in cache.layers:
            for t in layer:
                if t.shape != shape or t.dtype != dtype or t.device != device:
                    raise ValueError(f"cache: expected keys and values {dtype} {list(shape)} on {device}, "
                                     f"got {t.dtype} {list(t.shape)} on {t.device}")
        cache._fits = expected


def llada_model_of(model) -> Optional[LLaDAModel]:
    """The LLaDAModel that ``model`` is, or that ``torch.compile`` wrapped
    into it; None for any other module."""
    if isinstance(model, LLaDAModel):
        return model
    inner = getattr(model, "_orig_mod", None)  # what torch.compile returns keeps its module here
    return inner if isinstance(inner, LLaDAModel) else None


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, L, d] at positions rows [B, K] -> [B, K, d]."""
    return x.gather(1, rows[:, :, None].expand(-1, -1, x.shape[-1]))


def _slice_bound(bound, default: int, l: int) -> int:
    """A slice bound as ``slice.indices`` reads it for step 1 (which
    torch.compile cannot trace on every torch version)."""
    if bound is None:
        return default
    if not is_int(bound):  # numpy ints too, as Python's slicing takes them
        raise TypeError(f"logits_at: slice bounds must be ints or None, got {type(bound).__name__}")
    bound = int(bound)
    return min(max(bound + l if bound < 0 else bound, 0), l)


def _query_rows(logits_at, b: int, l: int, device):
    """Positions [B, K] (or a slice) to compute, and for a bool mask the
    [B, K] mask of those that are real (rows with fewer True entries are
    padded)."""
    if isinstance(logits_at, slice):
        if logits_at.step not in (None, 1):
            raise ValueError(f"logits_at: a slice must have step 1, got {logits_at}")
        first, stop = _slice_bound(logits_at.start, 0, l), _slice_bound(logits_at.stop, l, l)
        return slice(first, max(first, stop)), None
    if not isinstance(logits_at, torch.Tensor):
        raise TypeError(
            f"logits_at: expected a tensor or a slice, got {type(logits_at).__name__}"
        )
    if logits_at.dtype == torch.bool:
        if logits_at.shape != (b, l):
            raise ValueError(
                f"logits_at: expected a bool mask of shape {(b, l)}, got {tuple(logits_at.shape)}"
            )
        mask = logits_at.to(device)
        k = max(int(mask.sum(1).max()), 1)
        # A stable sort puts each row's True positions first, in ascending
        # order, so keep-selection below yields them in row-major order.
        rows = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :k]
        keep = torch.arange(k, device=device)[None, :] < mask.sum(1, keepdim=True)
        return rows, keep
    if logits_at.dtype not in (torch.int64, torch.int32) or logits_at.dim() != 2 or logits_at.shape[0] != b:
        raise ValueError(
            f"logits_at: expected a bool mask [B, L], int positions [B, K] with B={b} or a slice, "
            f"got dtype {logits_at.dtype} shape {tuple(logits_at.shape)}"
        )
    rows = logits_at.to(device=device, dtype=torch.int64)
    if rows.numel() and (rows.min() < 0 or rows.max() >= l):
        raise ValueError(f"logits_at: positions must lie in [0, {l}), got {rows.min()}..{rows.max()}")
    return rows, None


def count_parameters(config: LLaDAConfig) -> int:
    """Parameters of a model with this config, without building it."""
    d, kv, m = config.d_model, config.n_kv_heads * config.head_dim, config.mlp_hidden_size
    per_block = 2 * d + 2 * d * d + 2 * d * kv + 3 * d * m
    head = 0 if config.weight_tying else config.embedding_size * d
    return config.embedding_size * d + config.n_layers * per_block + d + head


__all__ = ["ATTENTION_BACKENDS", "set_attention_backend", "KVCache", "LLaDAConfig", "LLaDAModel", "LLaDAOutput", "attention", "count_parameters"]
