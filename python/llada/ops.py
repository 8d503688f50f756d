"""The decoding ops: typed wrappers over ``torch.ops.llada.*``, their fake
kernels, and the pure-torch reference implementations that define them.

Each op has three implementations that must agree: the CUDA kernel, the C++ CPU
twin, and the reference here. The references are the specification and the
test oracle; they favour clarity (and float64) over speed. On a GPU this
build has no code for (see :mod:`llada.devices`) each op runs its reference.

Ops
---
``sample_tokens(logits, temperature, seed, suppress_ids)``
    Per row of ``logits [N, V]``: the chosen token, its softmax probability,
    the top-1 minus top-2 probability margin and the entropy of the softmax.
``select_positions(confidence, rule, k, threshold, factor)``
    Which positions of ``confidence [B, L]`` to commit this step.
``commit_tokens(canvas, x0, accepted, mask_id, remask)``
    Write the accepted predictions into the canvas in place, optionally
    re-mask positions, and return the masked count left per row.
``attention(q, k, v, key_mask, scale)``
    Bidirectional attention with grouped-query heads and key padding.
``rms_norm(x, weight, eps)``
    The model's RMSNorm in one pass: float32 inside, rounded as the
    checkpoint's code rounds.
``add_rms_norm(x, residual, weight, eps)``
    A residual add and the RMSNorm of its result in one pass.
``rope(x, cos, sin)``
    The model's rotary embedding of queries or keys in one pass, with the
    composition's bits.
``silu_mul(gate, up)``
    The MLP's gated activation ``silu(gate) * up`` in one pass.
``store_kv(k, v, cos, sin, cache_k, cache_v, positions)``
    Keys rotated and stored, values stored, into a KV cache in one pass.
"""

from __future__ import annotations

import collections.abc
import contextlib
import math
import numbers
from typing import NamedTuple, Optional, Sequence

import torch

from . import _C  # noqa: F401  (loading the extension registers torch.ops.llada)
from . import autodiff, devices
from .token_ids import is_int

SELECTION_RULES = ("topk", "threshold", "factor")


class TokenChoice(NamedTuple):
    """Result of :func:`sample_tokens`; every field has shape ``[N]``.

    tokens: int64 chosen ids (-1 for a row with no finite, unsuppressed logit).
    confidence: float32 softmax(logits)[token] (-inf for such a row).
    margin: float32 top-1 minus top-2 probability of softmax(logits).
    entropy: float32 entropy of softmax(logits), in nats.
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    margin: torch.Tensor
    entropy: torch.Tensor


def _require_tensors(*named: tuple[str, object]) -> None:
    """A clear error naming the first argument that is not a tensor."""
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def _float_arg(name: str, value) -> float:
    """A real-number argument (a Python or numpy int or float), as the
    kernels' double; a bool or a string is a mistake, not a number."""
    if type(value) is float:  # the common case, checked first: every op call passes here
        return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    return float(value)


# --------------------------------------------------------------------------
# Gradients
#
# The ops are inference ops: they have no backward. Each wrapper refuses
# inputs that ask for a gradient (rather than return a result whose backward
# would leave their gradient out), and each functional llada:: op has an
# autograd formula that raises, so that calling torch.ops.llada.* directly
# cannot drop a gradient silently either. The model runs the differentiable
# compositions (the *_reference functions, torch's SDPA) whenever a gradient
# is needed.
# --------------------------------------------------------------------------


_DIFFERENTIABLE = "use llada.ops.{}_reference, the differentiable composition the model trains with"
# What gives a gradient in place of each op.
_INSTEAD = {
    "sample_tokens": "pass logits.detach() (a choice has no gradient; torch.softmax(logits, -1) "
                     "gives differentiable probabilities)",
    "attention": "use llada.model.attention, which runs torch's scaled_dot_product_attention "
                 "when a gradient is needed",
    **{op: _DIFFERENTIABLE.format(op) for op in ("rms_norm", "add_rms_norm", "rope", "silu_mul", "store_kv")},
}
_WITHOUT_BACKWARD = ("call it under torch.no_grad() or torch.inference_mode(), or "
                     "for a gradient {}")


def _refuse_gradient(op: str, *named: tuple[str, Optional[torch.Tensor]]) -> None:
    """A clear error naming the first input of ``op`` that asks for a
    derivative: it requires grad while grad mode is on, or it carries a
    forward-mode tangent (which ``requires_grad`` does not show)."""
    if not (torch.is_grad_enabled() or autodiff.in_dual_level()):  # decoding: one test per call
        return
    for name, value in named:
        if value is None:
            continue
        if autodiff.wants_gradient(value):
            raise RuntimeError(
                f"{name}: requires grad, but llada.ops.{op} is an inference op without a backward; "
                + _WITHOUT_BACKWARD.format(_INSTEAD[op])
            )
        if autodiff.wants_tangent(value):
            raise RuntimeError(
                f"{name}: carries a forward-mode tangent (torch.func.jvp, torch.autograd.forward_ad), but "
                f"llada.ops.{op} is an inference op without derivatives; pass the primal alone, or for a "
                f"derivative {_INSTEAD[op]}"
            )


def _below_autograd():
    """Where a wrapper has checked that no input needs a gradient: run the op
    as its autograd formula would in that case, without the formula's Python
    dispatch (which costs more than the op on small inputs under no_grad).
    torch.compile cannot trace the guard; there the formula is traced once."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # (no autograd to pass there)
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def _register_no_backward(op: str) -> None:
    schema = getattr(torch.ops.llada, op).default._schema
    names = [arg.name for arg in schema.arguments]

    def backward(ctx, *grads):
        wanted = [name for name, needed in zip(names, ctx.needs_input_grad) if needed]
        raise RuntimeError(
            f"llada::{op} has no backward (an inference op), so it cannot give a gradient for "
            f"{', '.join(wanted)}: " + _WITHOUT_BACKWARD.format(_INSTEAD[op])
        )

    torch.library.register_autograd(f"llada::{op}", backward)


# --------------------------------------------------------------------------
# Counter-based Gumbel noise, shared bit-for-bit by every implementation.
#
# Each (seed, row, column) maps to a 32-bit hash; its top 23 bits n give a
# uniform u = (n + 1/2) / 2^23, exact in float32 and never 0 or 1, and
# g = -log(-log(u)) is the Gumbel sample. The hash is a keyed double round of
# a 32-bit avalanche mixer, so the noise depends only on the key and not on
# how the work is split across threads or devices.
# --------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without
    overflowing int64 (the constant is split into 16-bit halves)."""
    lo = (x * (c & 0xFFFF)) & _MASK32
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    return int(_mix32(torch.tensor([x & _MASK32], dtype=torch.int64, device="cpu"))[0])


def gumbel_row_keys(seed: int, row: int) -> tuple[int, int]:
    """The two 32-bit keys of one row (the kernels compute the same)."""
    s = _mix32_int((seed & _MASK32) ^ _mix32_int(((seed >> 32) + _GOLDEN) & _MASK32))
    k1 = _mix32_int(s ^ ((row * _GOLDEN) & _MASK32) ^ ((row >> 32) & _MASK32))
    k2 = _mix32_int(k1 + 0x632BE5AB)
    return k1, k2


def gumbel_noise_reference(seed: int, rows: int | Sequence[int], cols: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [rows, cols] in float64, keyed by (seed, row, col);
    ``rows`` is a count, or each row's key."""
    keys = range(rows) if isinstance(rows, int) else [int(r) for r in rows]
    # On the CPU, whatever the default device: the references compute there.
    col = torch.arange(cols, dtype=torch.int64, device="cpu")
    out = torch.empty(len(keys), cols, dtype=torch.float64, device="cpu")
    for i, r in enumerate(keys):
        k1, k2 = gumbel_row_keys(seed, r)
        h = _mix32((_mix32(col ^ k1) + k2) & _MASK32)
        u = ((h >> 9).to(torch.float64) + 0.5) * 2.0**-23
        out[i] = -torch.log(-torch.log(u))
    return out


# --------------------------------------------------------------------------
# sample_tokens
# --------------------------------------------------------------------------


def _int_arg(name: str, value, low: int = -2**63, high: int = 2**63 - 1) -> int:
    """An integer argument the kernels take as int64: neither truncated from
    a float nor wrapped around."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {value}")
    return int(value)


def _suppress_tensor(suppress_ids, device) -> torch.Tensor:
    if suppress_ids is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    if isinstance(suppress_ids, torch.Tensor):
        return suppress_ids.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    return torch.tensor(suppress_ids, dtype=torch.int64, device=device)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    seed: int = 0,
    suppress_ids: Optional[Sequence[int] | torch.Tensor] = None,
    noise_rows: Optional[torch.Tensor] = None,
) -> TokenChoice:
    """Choose one token per row of ``logits`` and score it, in one pass.

    Args:
        logits: ``[N, V]`` float32, bfloat16 or float16; the last dimension must
            be contiguous (row strides are free). Logits are finite or -inf.
        temperature: 0 takes the argmax (lowest index on ties); > 0 takes the
            argmax of ``logits / temperature + Gumbel noise``, i.e. a sample of
            ``softmax(logits / temperature)``. Below 1 the score is
            ``logit + temperature * noise`` in float32, so far below 1 the
            noise drops under the logits' spacing: tokens whose logits tie
            (or differ by an ulp) then favour the lower index, as at 0 (for
            logits near 20, slightly at 1e-4, always below about 1e-7).
        seed: keys the counter-based noise with (seed, row, column), so the same
            seed gives the same sample on every device and launch shape.
        suppress_ids: token ids treated as -inf logits everywhere (e.g. EOS); at
            most 64. Ids outside [0, V) match no column (a Python list of
            them is rejected up front).
        noise_rows: int64 ``[N]`` on logits' device, or None: the key of each
            row's noise in place of its index, so that a row keeps its sample
            whichever rows are sampled with it (the decoder keys a position by
            its batch row and place in the answer).

    Returns:
        :class:`TokenChoice` with the chosen ids and, computed in float32 from
        ``softmax(logits)`` (not the tempered distribution), the chosen token's
        probability, the top-1 minus top-2 margin and the entropy.
    """
    _require_tensors(("logits", logits))
    _refuse_gradient("sample_tokens", ("logits", logits))
    temperature = _float_arg("temperature", temperature)
    seed = _int_arg("seed", seed)
    if isinstance(suppress_ids, torch.Tensor):
        if suppress_ids.is_floating_point() or suppress_ids.is_complex() or suppress_ids.dtype == torch.bool:
            raise TypeError(f"suppress_ids: expected an integer tensor, got {suppress_ids.dtype}")
    elif suppress_ids is not None:
        if not isinstance(suppress_ids, collections.abc.Iterable) or isinstance(suppress_ids, (str, bytes)):
            raise TypeError(f"suppress_ids: expected ints (a list, a set, an array...), an integer tensor "
                            f"or None, got {type(suppress_ids).__name__}")
        # A Python list can be checked for free; a tensor on the GPU would cost
        # a sync, so there out-of-range ids simply match no column. Against
        # logits of the wrong shape there is no range: the op names logits.
        bounds = (0, logits.shape[1] - 1) if logits.dim() == 2 and logits.shape[1] >= 1 else ()
        suppress_ids = [_int_arg("suppress_ids", i, *bounds) for i in suppress_ids]
    suppress = _suppress_tensor(suppress_ids, logits.device)
    if not devices.kernels_run_on(logits.device):
        torch.ops.llada.check_sample_tokens(logits, suppress, temperature, noise_rows)
        return sample_tokens_reference(logits, temperature, seed, suppress_ids, noise_rows)
    with _below_autograd():
        out = torch.ops.llada.sample_tokens(logits, suppress, temperature, seed, noise_rows)
    return TokenChoice(*out)


@torch.library.register_fake("llada::sample_tokens")
def _sample_tokens_fake(logits, suppress_ids, temperature, seed, noise_rows=None):
    n = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        logits.new_empty(n, dtype=torch.int64),
        logits.new_empty(n, **f32),
        logits.new_empty(n, **f32),
        logits.new_empty(n, **f32),
    )


def sample_tokens_reference(
    logits: torch.Tensor,
    temperature: float = 0.0,
    seed: int = 0,
    suppress_ids: Optional[Sequence[int] | torch.Tensor] = None,
    noise_rows: Optional[torch.Tensor] = None,
) -> TokenChoice:
    """The specification of :func:`sample_tokens`, in float64 torch."""
    x = logits.detach().to(device="cpu", dtype=torch.float64).clone()
    n, v = x.shape
    ids = _suppress_tensor(suppress_ids, "cpu")
    ids = ids[(ids >= 0) & (ids < v)]
    x[:, ids] = -math.inf

    # A row can be chosen from when some logit is above -inf (a NaN is not).
    # Logits outside the contract get the kernels' answers: a NaN is never
    # chosen but makes the row's probabilities NaN; a +inf is chosen (the first
    # one) and makes them NaN too.
    choosable = (x > -math.inf).any(dim=1)
    if temperature > 0:
        keys = n if noise_rows is None else noise_rows.tolist()
        noise = gumbel_noise_reference(seed, keys, v)
        # Below 1 the noise is scaled down rather than the logits up: the same
        # argmax, and x / temperature would overflow even float64 for a tiny
        # temperature (45 / 1e-308 is +inf, a tie with every positive logit).
        score = x + temperature * noise if temperature < 1 else x / temperature + noise
    else:
        score = x
    # torch.argmax returns the first maximal index (the documented tie-break),
    # but takes NaN for the maximum.
    score = torch.where(score.isnan(), -math.inf, score)
    tokens = torch.where(choosable, torch.argmax(score, dim=1), -1)

    p = torch.softmax(x, dim=1)
    p = torch.where(choosable[:, None], p, 0.0)
    confidence = torch.where(
        choosable, p.gather(1, tokens.clamp(min=0)[:, None])[:, 0], -math.inf
    )
    top2 = p.topk(min(2, v), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if v > 1 else 0.0)
    # 0 log 0 is 0; a NaN probability stays NaN.
    plogp = torch.where(p == 0, 0.0, p * torch.log(p))
    entropy = -plogp.sum(dim=1)
    dev = logits.device
    return TokenChoice(
        tokens.to(dev),
        confidence.to(device=dev, dtype=torch.float32),
        torch.where(choosable, margin, 0.0).to(device=dev, dtype=torch.float32),
        torch.where(choosable, entropy, 0.0).to(device=dev, dtype=torch.float32),
    )


# --------------------------------------------------------------------------
# select_positions
# --------------------------------------------------------------------------


def select_positions(
    confidence: torch.Tensor,
    rule: str = "topk",
    k: Optional[torch.Tensor | int] = None,
    threshold: float = 0.9,
    factor: float = 1.0,
) -> torch.Tensor:
    """Decide which positions to commit; returns a bool mask ``[B, L]``.

    A position is a candidate when its confidence is not -inf (NaN is treated
    as -inf). Candidates are ranked by confidence, descending; ties go to the
    lower position. The accepted set is always a prefix of that ranking:

    - ``"topk"``: the first ``k[b]`` candidates of row b (all of them if fewer);
      ``k`` is an int64 tensor ``[B]`` of values >= 0, or an int for every row
      (which, unlike a tensor on the GPU, is checked without a sync).
    - ``"threshold"``: every candidate with confidence >= ``threshold``, and at
      least the best one if the row has any candidate.
    - ``"factor"``: with ranked confidences c_1 >= c_2 >= ..., the largest n
      with ``(n + 1) * (1 - c_n) < factor``; at least one if any candidate.
    """
    _require_tensors(("confidence", confidence))
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule: expected one of {SELECTION_RULES}, got {rule!r}")
    threshold, factor = _float_arg("threshold", threshold), _float_arg("factor", factor)
    k_all = -1
    if rule == "topk":
        if k is None:
            raise ValueError("k: required for rule='topk'")
        if not isinstance(k, torch.Tensor):
            k_all = _int_arg("k", k, 0)
    k_tensor = k if isinstance(k, torch.Tensor) and rule == "topk" else torch.empty(
        0, dtype=torch.int64, device=confidence.device)
    if not devices.kernels_run_on(confidence.device):
        torch.ops.llada.check_select_positions(confidence, k_tensor, SELECTION_RULES.index(rule), threshold,
                                               factor, k_all)
        return select_positions_reference(confidence, rule, k_all if k_all >= 0 else k, threshold, factor)
    return torch.ops.llada.select_positions(
        confidence, k_tensor, SELECTION_RULES.index(rule), threshold, factor, k_all
    )


@torch.library.register_fake("llada::select_positions")
def _select_positions_fake(confidence, k, rule, threshold, factor, k_all=-1):
    return torch.empty_like(confidence, dtype=torch.bool)


def select_positions_reference(
    confidence: torch.Tensor,
    rule: str = "topk",
    k: Optional[torch.Tensor | int] = None,
    threshold: float = 0.9,
    factor: float = 1.0,
) -> torch.Tensor:
    """The specification of :func:`select_positions`, row by row.

    The tests run in float32, as in the kernels (``threshold`` and ``factor``
    are rounded to float32 first), so that boundary cases agree exactly.
    """
    c = confidence.detach().to(device="cpu", dtype=torch.float32)
    b, l = c.shape
    # On the CPU, whatever the default device: the reference computes there.
    f32 = lambda x: torch.tensor(x, dtype=torch.float32, device="cpu")  # noqa: E731
    threshold, factor = f32(threshold), f32(factor)
    if rule == "topk":
        ks = torch.as_tensor(k, device="cpu").expand(b).tolist() if not isinstance(k, int) else [k] * b
    accepted = torch.zeros(b, l, dtype=torch.bool, device="cpu")
    for row in range(b):
        cand = [i for i in range(l) if not (math.isnan(c[row, i]) or c[row, i] == -math.inf)]
        ranked = sorted(cand, key=lambda i: (-float(c[row, i]), i))
        values = [c[row, i] for i in ranked]
        if rule == "topk":
            n = min(int(ks[row]), len(ranked))
        elif rule == "threshold":
            n = sum(1 for v in values if v >= threshold)
        else:
            n = max(
                [j + 1 for j, v in enumerate(values) if f32(j + 2) * (1 - v) < factor],
                default=0,
            )
        if rule != "topk" and ranked:
            n = max(n, 1)
        accepted[row, ranked[:n]] = True
    return accepted.to(confidence.device)


# --------------------------------------------------------------------------
# commit_tokens
# --------------------------------------------------------------------------


def commit_tokens(
    canvas: torch.Tensor,
    x0: torch.Tensor,
    accepted: torch.Tensor,
    mask_id: int,
    remask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply one step's decision to ``canvas`` **in place**.

    ``canvas[accepted] = x0[accepted]``, then ``canvas[remask] = mask_id``
    (re-masking wins where both are set). ``canvas`` and ``x0`` are int64
    ``[B, L]``; ``accepted`` and ``remask`` are bool ``[B, L]``.

    Returns:
        int64 ``[B]``: how many positions of each row still hold ``mask_id``.
    """
    _require_tensors(("canvas", canvas), ("x0", x0), ("accepted", accepted))
    if remask is not None:
        _require_tensors(("remask", remask))
    mask_id = _int_arg("mask_id", mask_id)
    if not devices.kernels_run_on(canvas.device):
        torch.ops.llada.check_commit_tokens(canvas, x0, accepted, remask)
        return commit_tokens_reference(canvas, x0, accepted, mask_id, remask)
    return torch.ops.llada.commit_tokens(canvas, x0, accepted, remask, mask_id)


@torch.library.register_fake("llada::commit_tokens")
def _commit_tokens_fake(canvas, x0, accepted, remask, mask_id):
    return canvas.new_empty(canvas.shape[0], dtype=torch.int64)


def commit_tokens_reference(canvas, x0, accepted, mask_id, remask=None):
    """The specification of :func:`commit_tokens` (also in place)."""
    canvas[accepted] = x0[accepted]
    if remask is not None:
        canvas[remask] = mask_id
    return (canvas == mask_id).sum(dim=1)


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Bidirectional (non-causal) attention ``softmax(q k^T * scale) v``.

    Args:
        q: ``[B, Lq, Hq, D]`` queries.
        k, v: ``[B, Lk, Hkv, D]`` keys and values; ``Lk`` may differ from
            ``Lq`` (cached decoding: a block of queries against the whole
            sequence). ``Hq`` must be a multiple of ``Hkv``: query head ``h``
            reads kv head ``h // (Hq // Hkv)`` (``repeat_interleave``
            grouping), without materialising repeated keys.
        key_mask: optional bool ``[B, Lk]``, True for keys to attend to
            (padding is False). A query row with no valid key outputs zeros.
        scale: the score scale; ``1 / sqrt(D)`` by default.

    D is 64 or 128. q, k, v share a dtype: float32 or bfloat16 on CPU
    (computed in float32), float32, bfloat16 or float16 on CUDA (float32
    accumulation, tensor cores for the 16-bit types). Their last dimension must
    be contiguous; other strides are free (e.g. a slice of a K/V cache).
    On an H100/H200 the 16-bit types with D = 128 run a Hopper kernel
    (warpgroup MMAs, TMA) where it measured faster; the environment variable
    ``LLADA_ATTENTION_SM90=0`` turns it off.

    Returns:
        ``[B, Lq, Hq, D]`` contiguous, in q's dtype.
    """
    _require_tensors(("q", q), ("k", k), ("v", v))
    if key_mask is not None and not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask: expected a torch.Tensor or None, got {type(key_mask).__name__}")
    _refuse_gradient("attention", ("q", q), ("k", k), ("v", v))
    if scale is not None:
        scale = _float_arg("scale", scale)
    if not devices.kernels_run_on(q.device):
        torch.ops.llada.check_attention(q, k, v, key_mask, scale)
        return attention_reference(q, k, v, key_mask, scale, dtype=torch.float32).to(q.dtype)
    with _below_autograd():
        return torch.ops.llada.attention(q, k, v, key_mask, scale)


@torch.library.register_fake("llada::attention")
def _attention_fake(q, k, v, key_mask=None, scale=None):
    return q.new_empty(q.shape)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The specification of :func:`attention`, computed in ``dtype`` (float64
    by default) on q's device and returned in that dtype: repeat the kv heads,
    mask the scores, softmax, and zero the rows with no valid key."""
    d = q.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    group = q.shape[2] // k.shape[2]
    qd = q.to(dtype).transpose(1, 2)  # [B, Hq, Lq, D]
    kd = k.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    vd = v.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qd @ kd.transpose(-1, -2)) * s  # [B, Hq, Lq, Lk]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], -math.inf)
    p = torch.softmax(scores, dim=-1)
    if key_mask is not None:
        # A row with no valid key is all -inf, so its softmax is NaN: it
        # outputs zeros. A NaN from the inputs themselves stays NaN.
        p = torch.where(key_mask.any(dim=-1)[:, None, None, None], p, 0.0)
    return (p @ vd).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dimension, as LLaDA's blocks compute it:
    ``weight * (x * rsqrt(mean(x**2, -1) + eps)).to(x.dtype)`` with the
    normalisation in float32 (see :func:`rms_norm_reference`).

    Args:
        x: ``[..., dim]``; float32 or bfloat16 on CPU, also float16 on CUDA.
        weight: ``[dim]``, x's dtype and device.
        eps: added to the mean square; finite and >= 0.

    Returns:
        A new contiguous tensor of x's shape and dtype.
    """
    _require_tensors(("x", x), ("weight", weight))
    _refuse_gradient("rms_norm", ("x", x), ("weight", weight))
    eps = _float_arg("eps", eps)
    if not devices.kernels_run_on(x.device):
        torch.ops.llada.check_rms_norm(x, None, weight, eps)
        return rms_norm_reference(x, weight, eps).contiguous()
    with _below_autograd():
        return torch.ops.llada.rms_norm(x, weight, eps)


@torch.library.register_fake("llada::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The specification of :func:`rms_norm`: normalise in float32, round to
    x's dtype, then multiply by the weight in that dtype (two roundings, as
    in the checkpoint's training code)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``rms_norm(s, weight, eps)`` in one pass: a
    block's residual add and the norm that follows it (see
    :func:`add_rms_norm_reference`).

    Args:
        x, residual: ``[..., dim]``, one shape, dtype and device (as for
            :func:`rms_norm`).
        weight: ``[dim]``, x's dtype and device.
        eps: added to the mean square; finite and >= 0.

    Returns:
        ``(s, normed)``: two new contiguous tensors of x's shape and dtype.
    """
    _require_tensors(("x", x), ("residual", residual), ("weight", weight))
    _refuse_gradient("add_rms_norm", ("x", x), ("residual", residual), ("weight", weight))
    eps = _float_arg("eps", eps)
    if not devices.kernels_run_on(x.device):
        torch.ops.llada.check_rms_norm(x, residual, weight, eps)
        s, normed = add_rms_norm_reference(x, residual, weight, eps)
        return s.contiguous(), normed.contiguous()
    with _below_autograd():
        return torch.ops.llada.add_rms_norm(x, residual, weight, eps)


@torch.library.register_fake("llada::add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification of :func:`add_rms_norm`: the sum in x's dtype (as
    torch adds: in float32, rounded once), then :func:`rms_norm_reference`
    of it."""
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


# --------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, half-split convention, as the model applies
    it to queries and keys (see :func:`rope_reference`); bit-identical to it.

    Args:
        x: ``[B, L, H, D]`` with D even; float32 or bfloat16 on CPU, also
            float16 on CUDA.
        cos, sin: float32 ``[B or 1, L, D]``, the tables of each position
            (shared by the batch rows when the first dimension is 1).

    Returns:
        A new contiguous tensor of x's shape and dtype.
    """
    _require_tensors(("x", x), ("cos", cos), ("sin", sin))
    _refuse_gradient("rope", ("x", x), ("cos", cos), ("sin", sin))
    if not devices.kernels_run_on(x.device):
        torch.ops.llada.check_rope(x, cos, sin)
        return rope_reference(x, cos, sin).contiguous()
    with _below_autograd():
        return torch.ops.llada.rope(x, cos, sin)


@torch.library.register_fake("llada::rope")
def _rope_fake(x, cos, sin):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The specification of :func:`rope`: in float32,
    ``x * cos + cat(-x2, x1) * sin`` with ``x1, x2`` the halves of the last
    dimension and the tables broadcast over heads, then x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------
# silu_mul
# --------------------------------------------------------------------------


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one pass, rounded as the two torch ops round
    (see :func:`silu_mul_reference`) but for the kernels' own exp: a float32
    element may differ from torch's by a few ulps, and in the 16-bit types
    a rare element may round the other way.

    Args:
        gate, up: ``[..., dim]``, one shape, dtype and device; float32 or
            bfloat16 on CPU, also float16 on CUDA. Strided inputs whose
            leading dimensions merge into one row stride (e.g. the halves of
            a packed ``[..., 2 * dim]`` projection) are read where they lie.

    Returns:
        A new contiguous tensor of gate's shape and dtype.
    """
    _require_tensors(("gate", gate), ("up", up))
    _refuse_gradient("silu_mul", ("gate", gate), ("up", up))
    if not devices.kernels_run_on(gate.device):
        torch.ops.llada.check_silu_mul(gate, up)
        return silu_mul_reference(gate, up).contiguous()
    with _below_autograd():
        return torch.ops.llada.silu_mul(gate, up)


@torch.library.register_fake("llada::silu_mul")
def _silu_mul_fake(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The specification of :func:`silu_mul`: ``F.silu(gate) * up`` in
    gate's dtype (each op computing in float32 and rounding once)."""
    return torch.nn.functional.silu(gate) * up


# --------------------------------------------------------------------------
# store_kv
# --------------------------------------------------------------------------


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Writes ``rope(k)`` and ``v`` into a KV cache at ``positions``, in
    place and in one pass (see :func:`store_kv_reference`): the rotation has
    :func:`rope`'s bits.

    Args:
        k, v: ``[B, L, H, D]``, one shape and dtype (as for :func:`rope`); the
            last dimension contiguous, other strides free (slices of a
            packed projection are read where they lie).
        cos, sin: float32 ``[B or 1, L, D]``, the tables of the L positions.
        cache_k, cache_v: ``[B, T, H, D]`` contiguous, k's dtype and device;
            two different tensors.
        positions: int64 ``[L]``, distinct, in ``[0, T)``: where position l
            goes. Checked on the CPU; on CUDA one outside the caches stops
            the kernel with a device-side error (as ``index_copy_`` does),
            since checking would wait for the device.
    """
    _require_tensors(("k", k), ("v", v), ("cos", cos), ("sin", sin), ("cache_k", cache_k),
                     ("cache_v", cache_v), ("positions", positions))
    # The op writes the caches in place and so has no autograd formula; its
    # C++ Autograd kernel refuses too (csrc/torch/in_place_autograd.cpp),
    # but this message says what to do instead.
    _refuse_gradient("store_kv", ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("cache_k", cache_k),
                     ("cache_v", cache_v))
    if not devices.kernels_run_on(k.device):
        torch.ops.llada.check_store_kv(k, v, cos, sin, cache_k, cache_v, positions)
        store_kv_reference(k, v, cos, sin, cache_k, cache_v, positions)
        return
    torch.ops.llada.store_kv(k, v, cos, sin, cache_k, cache_v, positions)


@torch.library.register_fake("llada::store_kv")
def _store_kv_fake(k, v, cos, sin, cache_k, cache_v, positions):
    return None


def store_kv_reference(k, v, cos, sin, cache_k, cache_v, positions) -> None:
    """The specification of :func:`store_kv`: :func:`rope_reference` of k,
    then two ``index_copy_`` along the caches' positions."""
    cache_k.index_copy_(1, positions, rope_reference(k, cos, sin))
    cache_v.index_copy_(1, positions, v)


# Each functional op gets an autograd formula that refuses (see Gradients).
# select_positions returns a bool mask, with nothing to differentiate;
# commit_tokens and store_kv write their inputs in place, which
# register_autograd does not take: csrc/torch/in_place_autograd.cpp holds
# their Autograd and version-counter kernels.
for _op in ("sample_tokens", "attention", "rms_norm", "add_rms_norm", "rope", "silu_mul"):
    _register_no_backward(_op)


# The argument checks run before a reference where no kernel runs
# (csrc/torch/argument_checks.cpp). Under torch.compile they are traced with
# fake tensors, whose values (select_positions' per-row k) cannot be read:
# their fake kernels check nothing. The compiled code runs the real ones
# where its backend keeps an op without outputs ("eager", "aot_eager");
# inductor drops them, leaving the references' own errors.
def _check_fake(*args) -> None:
    return None


for _op in ("sample_tokens", "select_positions", "commit_tokens", "attention", "rms_norm", "rope", "store_kv",
            "silu_mul"):
    torch.library.register_fake(f"llada::check_{_op}", _check_fake)
