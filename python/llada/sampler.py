"""The LLaDA sampler, built on the decoding ops: the official
semi-autoregressive low-confidence remasking algorithm (the default policy)
and every other decoding policy of :mod:`llada.policies`.

With the default policy at temperature 0 it makes the same decisions as the
official ``generate``
(ties between equal confidences go to the lower position), while computing
the LM head only where a token can be committed: the masked positions of the
active block.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from . import devices, ops
from .model import llada_model_of
from .policies import DecodePolicy, ranking_scores, select
from .token_ids import check_token_ids, is_int
from .workspace import Workspace, checkin, checkout, drop_kept

REMASKING = ("low_confidence", "random")
_INT64_MAX = 2**63 - 1
_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def transfer_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per row and step, [B, steps]: masked // steps each
    step, plus one more in the first masked % steps steps."""
    step = torch.arange(steps, device=masked.device)
    return masked[:, None] // steps + (step[None, :] < masked[:, None] % steps).long()


def step_seed(seed: int, step: int) -> int:
    """A distinct noise key per step; the ops hash it, so a simple odd-constant
    mix is enough to keep steps apart."""
    return (seed * 0x9E3779B97F4A7C15 + step) & _INT64_MAX


class DecodeStats:
    """Work done by one decoding call."""

    def __init__(self):
        self.nfe = 0  # forward passes (a guided step counts one: both halves run batched)
        self.positions = 0  # positions fed through the model, summed over forwards and rows
        self._committed = 0
        self._pending: Optional[torch.Tensor] = None  # counted on the device, not yet read

    def __repr__(self) -> str:
        return f"DecodeStats(nfe={self.nfe}, committed={self.committed}, positions={self.positions})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, DecodeStats):
            return NotImplemented
        return (self.nfe, self.committed, self.positions) == (other.nfe, other.committed, other.positions)

    @property
    def committed(self) -> int:
        """Tokens committed (re-masked ones count again)."""
        if self._pending is not None:
            self._committed += int(self._pending)
            self._pending = None
        return self._committed

    def add(self, other: "DecodeStats") -> None:
        """Counts ``other``'s work too (e.g. the batches of one request)."""
        if not isinstance(other, DecodeStats):
            raise TypeError(f"other: expected a DecodeStats, got {type(other).__name__}")
        self.nfe += other.nfe
        self.positions += other.positions
        self._committed += other.committed

    def count_committed(self, accepted: torch.Tensor) -> None:
        """Adds accepted.sum() without reading it back: a step stays free of
        host syncs, and the count is read when ``committed`` is."""
        n = accepted.sum()
        self._pending = n if self._pending is None else self._pending + n

    @property
    def tokens_per_forward(self) -> float:
        return self.committed / max(self.nfe, 1)

    @property
    def positions_per_forward(self) -> float:
        return self.positions / max(self.nfe, 1)


@dataclass
class StepEvent:
    """One decoding step: what it committed, re-masked and ended where.

    Replaying the events in order on the canvas the decode started from
    rebuilds its result: at each event, set the ``committed`` positions to
    their tokens (read from ``canvas`` then), then the ``remasked`` ones to
    the mask id, then the ``filled`` ones to EOS. (The three sets never
    overlap: a step commits masked positions, re-masks tokens decoded at
    earlier steps of its block, and early stop fills positions after it.)
    Rows ended by :meth:`BlockEvent.stop_rows` are the caller's doing: the
    EOS it writes shows in no step event.
    """

    step: int
    block: int
    nfe: int  # forwards this decode has run so far
    canvas: torch.Tensor  # [B, T], live: read it before the next event
    committed: torch.Tensor  # [B, T] bool
    scores: torch.Tensor  # [B, T] float32, the ranking score of committed positions
    remasked: Optional[torch.Tensor] = None  # [B, T] bool, with remask_below
    # [B, T] bool, with early_stop on the last step of each block (None on
    # the others): the positions set to EOS after it, in the rows whose
    # finished block holds an EOS.
    filled: Optional[torch.Tensor] = None

    def positions(self, row: int = 0) -> list[int]:
        return torch.nonzero(self.committed[row]).flatten().tolist()

    def tokens(self, row: int = 0) -> list[int]:
        return self.canvas[row][self.committed[row]].tolist()


@dataclass
class BlockEvent:
    """A finished block: its tokens are final."""

    block: int
    start: int
    end: int
    nfe: int  # forwards this decode has run so far
    tokens: torch.Tensor  # [B, end - start]
    finished: torch.Tensor  # [B] bool: rows needing no more forwards
    _stop_rows: Optional[Callable[[torch.Tensor], None]] = field(default=None, repr=False, compare=False)

    def stop_rows(self, rows: torch.Tensor) -> None:
        """Ends these rows ([B] bool) here, as early stop does: the rest of
        each row becomes EOS and costs no more forwards. Call it before
        asking for the next event (e.g. once a row's text holds a stop
        string: what later blocks decode cannot change this block's)."""
        if not (isinstance(rows, torch.Tensor) and rows.dtype == torch.bool and rows.shape == self.finished.shape):
            got = f"{rows.dtype} of shape {list(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"rows: expected a bool tensor of shape {list(self.finished.shape)}, got {got}")
        if self._stop_rows is None:
            raise RuntimeError("stop_rows: this event is not from a running decode")
        self._stop_rows(rows)
        self.finished |= rows.to(self.finished.device)


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    seed: Optional[int] = None,
    *,
    policy: Optional[DecodePolicy] = None,
    row_keys: Optional[Sequence[int]] = None,
    on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    return_stats: bool = False,
):
    """Fill ``gen_length`` masked positions after ``prompt`` by iterative unmasking.

    With the default ``policy`` this is the official LLaDA algorithm: the same
    tokens at temperature 0 (but see ``confidence_eos_eot_inf``, and a mask
    token the model itself commits stays: the README says more).

    Args:
        model: a :class:`LLaDAModel`, or what ``torch.compile`` made of one
            (or any model whose ``model(ids, attention_mask=...).logits`` is
            [B, L, V]; caches need one of the first two).
        prompt: int64 [B, Lp], left-padded with the pad id when rows differ.
        attention_mask: [B, Lp] of 1/0 (0 = padding), or None.
        steps: forwards in all under the fixed schedule; each of the
            ``gen_length // block_length`` blocks gets ``steps / num_blocks``.
            Adaptive commit rules ignore it (they stop when a block is full),
            and only the fixed schedule checks it against the blocks.
        gen_length, block_length: canvas length, and the semi-autoregressive
            block size (gen_length for a single block).
        temperature: 0 = greedy; > 0 samples softmax(logits / temperature)
            with counter-based Gumbel noise keyed by (seed, step of the
            block, batch row or its ``row_keys`` key, place in the answer):
            a row's noise does not depend on the other rows of the batch
            (its answer can, in 16-bit dtypes: padding and the batch's shape
            change roundings).
        cfg_scale: classifier-free guidance; > 0 adds a pass with the prompt
            masked: logits = un + (cfg_scale + 1) * (cond - un).
        remasking: 'low_confidence' (probability of the prediction) or
            'random' (torch.rand from a CPU generator seeded with ``seed``);
            ``policy.ranking`` offers more.
        mask_id: defaults to ``model.config.mask_token_id``.
        logits_eos_inf: never predict EOS.
        confidence_eos_eot_inf: positions predicting EOS or EoT are committed
            only after every other candidate of the row (under the adaptive
            rules: only in a step where the row has no other candidate).
        seed: makes temperature > 0 and 'random' reproducible; None draws one
            from torch's global generator.
        policy: a :class:`DecodePolicy` (commit rule, ranking, cache, early
            stop, re-masking), or the name ``"exact"`` (the default: the
            official algorithm) or ``"fast"`` (:meth:`DecodePolicy.fast`).
        row_keys: the key of each row's sampling noise in place of its
            index in the batch (ints >= 0, one per row; default 0..B-1),
            e.g. each prompt's index in a longer list decoded in several
            batches: a prompt then draws the same noise whichever batch it
            lands in. ('random' ranking draws for the whole batch and is
            not keyed by row.)
        on_step: called as ``on_step(step, total_steps, canvas)`` after every
            step; ``canvas`` is the live [B, Lp + gen_length] tensor (read
            only). ``total_steps`` is ``steps`` under the fixed schedule and
            None under the adaptive rules, which decide their own count.
        return_stats: also return a :class:`DecodeStats`.

    Returns:
        int64 [B, Lp + gen_length] on the model's device: prompt, then answer
        (and the stats when ``return_stats``).

    Raises:
        FloatingPointError: the model's logits held NaN or +inf (or nothing
            finite) at a position, by the end of the block it happened in.
    """
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step: expected a callable or None, got {type(on_step).__name__}")
    _check_bool("return_stats", return_stats)
    canvas, key_mask, args = _prepare_generate(
        model, prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
        remasking, mask_id, logits_eos_inf, confidence_eos_eot_inf, seed, policy, row_keys,
    )
    total_steps = steps if args["policy"].commit == "schedule" else None
    stats = DecodeStats()
    for event in _decode(model, canvas, key_mask, stats=stats, **args):
        if on_step is not None and isinstance(event, StepEvent):
            on_step(event.step, total_steps, canvas)
    return (canvas, stats) if return_stats else canvas


@torch.no_grad()
def stream(
    model,
    prompt: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    seed: Optional[int] = None,
    *,
    policy: Optional[DecodePolicy] = None,
    row_keys: Optional[Sequence[int]] = None,
    stats: Optional[DecodeStats] = None,
):
    """Like :func:`generate` (same arguments), but an iterator of
    :class:`StepEvent` (one per step) and :class:`BlockEvent` (one per
    finished block) while decoding. The step events' ``canvas`` is one live
    tensor: once the iterator ends it holds generate's result.
    A :class:`DecodeStats` passed as ``stats`` is kept up to date as it runs."""
    if stats is not None and not isinstance(stats, DecodeStats):
        raise TypeError(f"stats: expected a DecodeStats or None, got {type(stats).__name__}")
    canvas, key_mask, args = _prepare_generate(
        model, prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
        remasking, mask_id, logits_eos_inf, confidence_eos_eot_inf, seed, policy, row_keys, method="stream",
    )
    yield from _decode(model, canvas, key_mask, stats=DecodeStats() if stats is None else stats, **args)


@torch.no_grad()
def infill(
    model,
    canvas: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    steps: Optional[int] = None,
    block_length: Optional[int] = None,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    seed: Optional[int] = None,
    *,
    policy: Optional[DecodePolicy] = None,
    return_stats: bool = False,
):
    """Fill the masked positions of ``canvas`` (anywhere: between a prefix and
    a suffix, or scattered), attending to both sides; every other token is
    fixed and never changes.

    Args:
        canvas: integer [B, L] (or [L]) holding ``mask_id`` where tokens are wanted.
        steps: steps under the fixed schedule, an equal share per block (at
            most the blocks' positions); a block with fewer masks than its
            share takes one forward per mask, so fewer forwards may run.
            Defaults to one token per step in the block with the most masks.
        block_length: semi-autoregressive blocks over the span from the
            first to the last masked column of any row of the batch;
            defaults to the whole span, and a longer one acts as it. The blocks (and, with a cache, the
            positions each step feeds) are laid out on the batch's columns,
            not each row's: in a batch whose rows' gaps sit in different
            columns, a row's result can depend on the other rows, even at
            temperature 0. When every row's masked columns span the same
            first to last column, each row gets what it gets decoded alone
            (at temperature 0; sampling keys a row's noise by its index in
            the batch and its column).
        Other arguments as in :func:`generate`, except that a row's result
            can depend on the other rows (see ``block_length``).

    Returns:
        a new int64 tensor shaped like ``canvas`` with the masks filled.
    """
    check_model(model, "infill")
    config = getattr(model, "config", None)
    mask_id = _config_id(config, "mask_token_id", mask_id, 126336)
    _check_bool("return_stats", return_stats)
    if not isinstance(canvas, torch.Tensor) or canvas.dtype not in _ID_DTYPES:
        raise TypeError(f"canvas: expected an integer tensor (int64), got {getattr(canvas, 'dtype', type(canvas))}")
    squeeze = canvas.dim() == 1
    ids = canvas[None] if squeeze else canvas
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"canvas: expected shape [B, L] or [L], got {tuple(canvas.shape)}")
    _validate_sampling(config, temperature, cfg_scale, remasking, mask_id, seed)
    check_token_ids("canvas", ids, config)
    max_len = getattr(config, "max_sequence_length", None)
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"canvas: length {ids.shape[1]} exceeds the model's max_sequence_length {max_len}")
    _validate_attention_mask(attention_mask, canvas.shape, "the canvas's")
    if attention_mask is not None:
        attention_mask = attention_mask.reshape(ids.shape).to(ids.device)
        if bool(((ids == mask_id) & (attention_mask == 0)).any()):
            raise ValueError("canvas: holds mask tokens at padded positions (attention_mask 0)")
    masked_cols = torch.nonzero((ids == mask_id).any(0)).flatten()
    if masked_cols.numel() == 0:
        raise ValueError(f"canvas: holds no mask token ({mask_id}) to fill")
    first, last = int(masked_cols[0]), int(masked_cols[-1]) + 1
    span = last - first
    block_length = span if block_length is None else block_length
    if not is_int(block_length):
        raise TypeError(f"block_length: expected an int or None, got {type(block_length).__name__}")
    if block_length < 1:
        raise ValueError(f"block_length: expected a positive int, got {block_length!r}")
    # A block longer than the span is the span (the same one block), so that
    # padding and the bound on steps follow the gap, not a number the caller chose.
    block_length = min(int(block_length), span)
    num_blocks = -(-span // block_length)
    if steps is None:  # one token per step in the fullest block
        holes = (ids[:, first:last] == mask_id).long()
        per_block = torch.nn.functional.pad(holes, (0, num_blocks * block_length - span))
        steps = num_blocks * int(per_block.view(-1, num_blocks, block_length).sum(2).max())
    policy = resolve_policy(policy, remasking)
    if not is_int(steps):
        raise TypeError(f"steps: expected an int or None, got {type(steps).__name__}")
    if steps < 1 or (policy.commit == "schedule" and steps % num_blocks):
        raise ValueError(f"steps: expected a positive multiple of the block count ({num_blocks}), got {steps!r}")
    if policy.commit == "schedule" and steps > num_blocks * block_length:
        # More steps than a block has positions would only add empty steps.
        raise ValueError(f"steps: expected at most {num_blocks * block_length} ({num_blocks} blocks of "
                         f"{block_length} positions), got {steps!r}")
    key_mask = None
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        key_mask = (attention_mask != 0).to(device_of(model))
    work = ids.to(device=device_of(model), dtype=torch.long, copy=True)
    stats = DecodeStats()
    for _ in _decode(model, work, key_mask, stats=stats, filling=True, **_decode_args(
            config, mask_id, first, last, block_length, steps // num_blocks, temperature,
            cfg_scale, False, False, seed, policy)):
        pass
    out = work[0] if squeeze else work
    return (out, stats) if return_stats else out


def resolve_policy(policy, remasking) -> DecodePolicy:
    """The DecodePolicy that ``policy`` (None, a name or a DecodePolicy) and
    the official ``remasking`` option ask for together."""
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    if policy is None:
        policy = DecodePolicy()
    elif isinstance(policy, str):
        policy = DecodePolicy.named(policy)
    if not isinstance(policy, DecodePolicy):
        raise TypeError(f"policy: expected a DecodePolicy or a name, got {type(policy).__name__}")
    if remasking == "random":
        # The official name for ranking="random": it may not overrule a policy.
        if policy.commit == "entropy_bound":
            raise ValueError("remasking: 'random' ranks positions at random, which the policy's "
                             "entropy_bound rule does not use (it orders them by entropy)")
        if policy.ranking not in ("probability", "random"):
            raise ValueError(f"remasking: 'random' ranks positions at random, but the policy ranks "
                             f"them by {policy.ranking!r}")
        policy = replace(policy, ranking="random")
    return policy


def _prepare_generate(model, prompt, attention_mask, steps, gen_length, block_length, temperature,
                      cfg_scale, remasking, mask_id, logits_eos_inf, confidence_eos_eot_inf, seed,
                      policy, row_keys, method="generate"):
    check_model(model, method)
    config = getattr(model, "config", None)
    mask_id = _config_id(config, "mask_token_id", mask_id, 126336)
    policy = resolve_policy(policy, remasking)
    _validate(config, prompt, attention_mask, steps, gen_length, block_length, temperature,
              cfg_scale, remasking, mask_id, seed, logits_eos_inf, confidence_eos_eot_inf,
              policy.commit == "schedule")
    device = device_of(model)
    b, lp = prompt.shape
    if row_keys is not None:
        row_keys = torch.tensor(check_row_keys(row_keys, b, gen_length), dtype=torch.long, device=device)
    total = lp + gen_length
    canvas = torch.full((b, total), mask_id, dtype=torch.long, device=device)
    canvas[:, :lp] = prompt.to(device)
    key_mask = None
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        key_mask = torch.ones(b, total, dtype=torch.bool, device=device)
        key_mask[:, :lp] = attention_mask.to(device) != 0
    num_blocks = gen_length // block_length
    args = _decode_args(config, mask_id, lp, total, block_length, steps // num_blocks,
                        temperature, cfg_scale, logits_eos_inf, confidence_eos_eot_inf, seed, policy)
    return canvas, key_mask, dict(args, row_keys=row_keys)


def check_row_keys(row_keys, count: int, width: int, per: str = "batch row") -> list[int]:
    """``row_keys`` (a list, tuple or range of ints, or a 1-D integer
    tensor: one key >= 0 per ``per``) as Python ints. A position's noise key
    is its row's key * ``width`` + its place, which must stay an int64."""
    if isinstance(row_keys, torch.Tensor):
        if row_keys.dim() != 1 or row_keys.dtype not in _ID_DTYPES:
            raise TypeError(f"row_keys: expected a 1-D integer tensor or a list of ints, got {row_keys.dtype} "
                            f"of shape {list(row_keys.shape)}")
        row_keys = row_keys.tolist()
    if not isinstance(row_keys, (list, tuple, range)):
        raise TypeError(f"row_keys: expected a list of ints (one per {per}) or None, got {type(row_keys).__name__}")
    if len(row_keys) != count:
        raise ValueError(f"row_keys: expected one key per {per} ({count}), got {len(row_keys)}")
    limit = 2**63 // int(width)  # a numpy width would overflow at 2**63
    for i, key in enumerate(row_keys):
        if not is_int(key):
            raise TypeError(f"row_keys[{i}]: expected an int, got {type(key).__name__}")
        if not 0 <= key < limit:
            raise ValueError(f"row_keys[{i}]: expected an int in [0, {limit}), got {key}")
    return [int(key) for key in row_keys]


def _decode_args(config, mask_id, first, last, block_length, steps_per_block, temperature,
                 cfg_scale, logits_eos_inf, confidence_eos_eot_inf, seed, policy):
    # Python ints from here on: a numpy int64 seed would overflow in step_seed.
    seed = int(torch.randint(0, _INT64_MAX, (1,))) if seed is None else int(seed)
    mask_id, block_length, steps_per_block = int(mask_id), int(block_length), int(steps_per_block)
    first, last = int(first), int(last)  # last = prompt length + gen_length, which may be numpy
    eos_id = _config_id(config, "eos_token_id", None, 126081)
    eot_id = _config_id(config, "eot_token_id", None, 126348)
    return dict(
        mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, first=first, last=last,
        block_length=block_length, steps_per_block=steps_per_block, temperature=temperature,
        cfg_scale=cfg_scale, logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf, seed=seed, policy=policy,
    )


def _decode(model, canvas, key_mask, *, mask_id, eos_id, eot_id, first, last, block_length,
            steps_per_block, temperature, cfg_scale, logits_eos_inf, confidence_eos_eot_inf, seed,
            policy, stats, filling=False, row_keys=None):
    """The decoding loop, shared by every entry point: fills the masks of
    ``canvas`` [B, T] in columns first..last in place, yielding events.

    On a GPU the host runs ahead of the device as long as it never waits for
    a result. A step at temperature 0 (without random ranking or re-masking)
    waits at most once (under the fixed schedule, not at all): as a
    whole-block step (see :class:`_Forward`) it takes tokens and scores for
    every block position and keeps the active ones with ``where``, where
    indexing by a mask would wait for the count."""
    if policy.cache != "none" and llada_model_of(model) is None:
        raise ValueError(f"policy: cache={policy.cache!r} needs a llada LLaDAModel (or one torch.compile made)")
    device = canvas.device
    b, total = canvas.shape
    fixed = canvas != mask_id  # the prompt (and, when infilling, every given token)
    forward = _Forward(model, canvas, key_mask, fixed, cfg_scale, mask_id, policy, stats)
    suppress = [eos_id] if logits_eos_inf else []
    if policy.commit != "schedule" or filling:
        # A rule that commits until the block is full must never choose the
        # mask token: committing it changes nothing, and the step would repeat
        # forever. Infilling promises every gap filled. (Generation under the
        # fixed schedule keeps the official behaviour.)
        suppress.append(mask_id)
    suppress = suppress or None  # a list is checked at the first step
    stop_ids = torch.tensor([eos_id, eot_id if eot_id is not None else eos_id], device=device)
    noise_gen = torch.Generator().manual_seed(seed) if policy.ranking == "random" else None
    # Whole-block steps sample every block position: only at temperature 0 is
    # a row's choice independent of which other rows are sampled with it.
    whole_block_ok = temperature == 0 and noise_gen is None and policy.remask_below is None
    # Each position's noise key: its batch row (or the caller's key for
    # the row) and its place in the answer (in the canvas, when filling:
    # the span between the batch's first and last gaps depends on the other
    # rows), whatever the other rows are doing (see ops.sample_tokens'
    # noise_rows).
    noise_keys = None
    if temperature > 0:
        start, width = (0, total) if filling else (first, last - first)
        rows = torch.arange(b, device=device) if row_keys is None else row_keys
        noise_keys = (rows[:, None] * width
                      + torch.arange(total, device=device)[None, :] - start)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    remasked_once = torch.zeros(b, total, dtype=torch.bool, device=device)
    # The positions early stop set to EOS: final, like a finished block (when
    # infilling, a later block may hold them next to masks of a later gap).
    ended = torch.zeros(b, total, dtype=torch.bool, device=device)
    # The lowest probability of any step's chosen tokens, read where the loop
    # syncs anyway: NaN (or -inf, a row of logits with no finite value) means
    # the model predicted nothing, and an adaptive rule would wait forever.
    lowest = torch.ones((), device=device)
    step = 0
    num_blocks = -(-(last - first) // block_length)
    # The workspace goes back to the model's pool however the decode ends:
    # finished, failed, or a stream closed or dropped mid-way.
    try:
        for blk in range(num_blocks):
            start, end = first + blk * block_length, min(first + (blk + 1) * block_length, last)
            finished_now = finished.cpu()
            if bool(finished_now.all()):
                # Every row has stopped: the block is final as it is (EOS), at no cost.
                yield BlockEvent(blk, start, end, forward.nfe, canvas[:, start:end].clone(), finished.clone(),
                                 lambda rows: None)
                continue
            in_block = torch.zeros(b, total, dtype=torch.bool, device=device)
            in_block[:, start:end] = True
            alive = torch.nonzero(~finished).flatten() if bool(finished_now.any()) else None
            schedule = planned = None
            if policy.commit == "schedule":
                schedule = transfer_schedule((canvas[:, start:end] == mask_id).sum(1), steps_per_block)
                # Read once per block: each step then knows without a sync whether
                # it has work (a row commits exactly its k while it has masks) and
                # whether one k serves every live row.
                planned = schedule.cpu()[~finished_now]
            forward.new_block(start, end, alive)
            i = 0
            # A step's event waits until the next step begins or the block
            # ends: only then is it known whether early stop fills positions
            # after it.
            pending = None
            while True:
                masked = (canvas == mask_id) & in_block & ~finished[:, None]
                if schedule is not None:
                    if i == steps_per_block:
                        break
                    k = schedule[:, i]
                    active = masked & (k > 0)[:, None]
                    has_work = bool((planned[:, i] > 0).any())
                    if has_work and bool((planned[:, i] == planned[0, i]).all()):
                        k = int(planned[0, i])
                else:
                    k = None
                    active = masked
                # Drawn every step, so the stream matches one draw per official step.
                noise = torch.rand(b, total, generator=noise_gen) if noise_gen is not None else None
                if schedule is None:
                    more, lowest_yet = torch.stack((active.any().float(), lowest)).tolist()
                    _refuse_invalid_predictions(lowest_yet, blk)
                    if not more:
                        break
                elif not has_work:
                    i, step = i + 1, step + 1
                    continue
                if pending is not None:
                    yield pending
                    pending = None
                # With re-masking, earlier decoded tokens of the block are
                # scored too (not the EOS that early stop wrote: it is final).
                decoded = None
                if policy.remask_below is not None:
                    decoded = ~fixed & ~masked & ~ended & in_block & ~finished[:, None]
                query = active if decoded is None else active | decoded
                if whole_block_ok and forward.next_is_whole_block():
                    block = forward(query, whole_block=True)  # [B', W, V]
                    live, width, vocab = block.shape
                    choice = ops.sample_tokens(block.view(live * width, vocab), temperature,
                                               step_seed(seed, i), suppress)
                    spread = _BlockSpread(b, total, start, end, alive, live, width)
                    score_grid = spread(ranking_scores(choice, policy.ranking, None), -math.inf, active)
                    if confidence_eos_eot_inf:
                        stop = spread(torch.isin(choice.tokens, stop_ids), False, active)
                    entropy_grid = None
                    if policy.commit == "entropy_bound":
                        entropy_grid = spread(choice.entropy, 0.0, active)
                    x0 = spread(choice.tokens, canvas, active)
                    # Only the masked positions' predictions must be valid, as
                    # when only they are sampled.
                    chosen_confidence = spread(choice.confidence, 1.0, active)
                else:
                    logits = forward(query)
                    rows = logits if decoded is None else logits[active[query]]
                    choice = ops.sample_tokens(rows, temperature, step_seed(seed, i), suppress,
                                               None if noise_keys is None else noise_keys[active])
                    scores = ranking_scores(choice, policy.ranking,
                                            None if noise is None else noise.to(device)[active])
                    score_grid = torch.full((b, total), -math.inf, dtype=torch.float32, device=device)
                    score_grid[active] = scores.float()
                    if confidence_eos_eot_inf:
                        stop = torch.zeros(b, total, dtype=torch.bool, device=device)
                        stop[active] = torch.isin(choice.tokens, stop_ids)
                    entropy_grid = None
                    if policy.commit == "entropy_bound":
                        entropy_grid = torch.zeros(b, total, dtype=torch.float32, device=device)
                        entropy_grid[active] = choice.entropy
                    x0 = canvas.masked_scatter(active, choice.tokens)
                    chosen_confidence = choice.confidence
                if chosen_confidence.numel():
                    torch.minimum(lowest, chosen_confidence.amin(), out=lowest)
                if isinstance(suppress, list):
                    # Then a tensor: a list would be copied to the device every step.
                    suppress = torch.tensor(suppress, device=device)
                # Only the block holds candidates: the choice is made over its
                # columns (a sort of the block, not of the whole canvas).
                accepted = torch.zeros_like(active)
                accepted[:, start:end] = select(
                    policy, _columns(score_grid, start, end), _columns(entropy_grid, start, end), k,
                    _columns(stop, start, end) if confidence_eos_eot_inf else None)
                remask = None
                if decoded is not None:
                    # Each position at most once, and only in rows still decoding
                    # this block: a row's steps stay bounded by twice its masks.
                    remask = _weak_tokens(logits[decoded[query]], canvas[decoded], decoded,
                                          policy.remask_below, suppress)
                    remask &= ~remasked_once & active.any(1)[:, None]
                    remasked_once |= remask
                ops.commit_tokens(canvas, x0, accepted, mask_id, remask)
                stats.count_committed(accepted)
                pending = StepEvent(step, blk, forward.nfe, canvas, accepted, score_grid, remask)
                i, step = i + 1, step + 1
            # The gap (run of positions to fill) that goes on past this
            # block: when generating, all the rest of the canvas.
            gap_id = torch.cumsum(fixed, dim=1)
            open_gap = (gap_id == gap_id[:, end - 1:end]) & ~fixed & ~fixed[:, end - 1:end]

            def stop_rows(rows, end=end, open_gap=open_gap):
                """Ends the gap of rows ``rows`` [B] that goes on past this
                block: its masks become EOS, for good. A row with nothing
                else left to fill is done. Returns the positions filled
                ([B, T] bool); no host sync."""
                rows = rows.to(device) & ~finished
                rest = torch.zeros(b, total, dtype=torch.bool, device=device)
                rest[:, end:last] = True
                fill = rest & open_gap & rows[:, None] & (canvas == mask_id)
                canvas.masked_fill_(fill, eos_id)
                ended.logical_or_(fill)
                left = ((canvas[:, end:last] == mask_id) & ~fixed[:, end:last]).any(1)
                finished.logical_or_(rows & ~left)
                return fill

            if policy.early_stop:
                # An EOS decoded in the open gap ends that gap. Given text
                # (and padding) may hold the EOS id too, but ends nothing; an
                # EOS before given text ends only its own gap, so that
                # infilling still fills every later one.
                decoded_eos = (canvas == eos_id) & ~fixed & open_gap & in_block
                filled = stop_rows(decoded_eos.any(1))
                # Reported by the block's last step. A block without steps
                # fills nothing: no row had a mask in it, so an EOS there is
                # one early stop wrote before, whose gap is already all EOS.
                if pending is not None:
                    pending.filled = filled
            if pending is not None:
                yield pending
            _refuse_invalid_predictions(lowest.item(), blk)
            yield BlockEvent(blk, start, end, forward.nfe, canvas[:, start:end].clone(), finished.clone(), stop_rows)
    finally:
        forward.give_back()


def _columns(grid: Optional[torch.Tensor], start: int, end: int) -> Optional[torch.Tensor]:
    """Columns start..end of a [B, T] grid (or None), contiguous, as the ops take them."""
    return None if grid is None else grid[:, start:end].contiguous()


def _refuse_invalid_predictions(lowest: float, block: int) -> None:
    """Raises when a step's chosen tokens had no valid probability."""
    if not lowest >= 0.0:
        raise FloatingPointError(
            f"the logits in block {block} hold NaN or +inf, or no finite value at some position, "
            f"so no token can be chosen there: check the weights, the dtype (16 bits may overflow "
            f"where float32 does not) and cfg_scale")


class _BlockSpread:
    """Lays per-position values of a whole-block step ([B' * W], rows
    ``alive`` of the batch, or all) out on the [B, T] canvas grid, keeping
    them where ``active`` and ``fill`` (a scalar or a [B, T] tensor)
    elsewhere; no host sync."""

    def __init__(self, batch, total, start, end, alive, rows, width):
        self.batch, self.total, self.start, self.end = batch, total, start, end
        self.alive, self.rows, self.width = alive, rows, width

    def __call__(self, values, fill, active):
        grid = torch.zeros((self.batch, self.total), dtype=values.dtype, device=values.device)
        block = values.view(self.rows, self.width)
        if self.alive is None:
            grid[:, self.start:self.end] = block
        else:
            grid[:, self.start:self.end].index_copy_(0, self.alive, block)
        return torch.where(active, grid, fill)


def _weak_tokens(logits, tokens, where, below, suppress):
    """[B, T] bool: decoded positions (``where``) whose current token has
    probability < ``below`` under the latest prediction, read as the step
    reads it: with the ``suppress`` ids (a tensor, or None) at -inf. A token
    is then judged by the distribution it was committed from, not one where
    a token no step may choose (EOS under logits_eos_inf, the mask) takes a
    share."""
    logits = logits.float()
    if suppress is not None:
        logits = logits.index_fill(1, suppress, -math.inf)
    p = torch.softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    weak = torch.zeros_like(where)
    weak[where] = p < below
    return weak


class _Forward:
    """Logits at the queried positions, with guidance and the policy's cache.

    Without a cache every call is a full forward. With one, the first call of
    a block (and every ``refresh_every`` calls) is a full forward that fills
    the cache; the others feed only the block (dual) or the block and all
    after it (prefix), attending to the cached keys and values.

    A step on CUDA, with any cache or none, can instead return the logits of
    the whole block: taking only the queried rows would wait for their
    count, while the few extra rows cost the last layer's queries and MLP and
    the LM head little (and a replayed graph computes them anyway). On the
    CPU, where those rows cost their full share, only the queried rows run.

    The cache, and the graphs captured against it, come from the model's
    pool of workspaces (see :mod:`llada.workspace`); the decode holds one until
    :meth:`give_back`.
    """

    def __init__(self, model, canvas, key_mask, fixed, cfg_scale, mask_id, policy, stats):
        self.model, self.canvas, self.fixed, self.all_key_mask = model, canvas, fixed, key_mask
        # The LLaDAModel itself when ``model`` is one or was compiled from
        # one: it owns the workspaces, and CUDA graphs capture its eager
        # forward (a replayed graph launches nothing from Python anyway).
        self.base = llada_model_of(model)
        self.cfg_scale, self.mask_id, self.policy, self.stats = cfg_scale, mask_id, policy, stats
        # This decode's forwards, for its events: ``stats`` may also gather
        # other decodes', earlier or interleaved with this one.
        self.nfe = 0
        self.workspace: Optional[Workspace] = None

    def new_block(self, start, end, rows):
        """Starts a block; only ``rows`` (an index tensor, or None for all)
        still decode, so only they are fed (rows are independent)."""
        self.start, self.end, self.rows = start, end, rows
        self.calls = 0

    @staticmethod
    def _whole_block_wanted(canvas: torch.Tensor) -> bool:
        return canvas.is_cuda

    @staticmethod
    def _graphs_run_on(ids: torch.Tensor) -> bool:
        # Not under autocast: it keeps the weights' casts in a cache of its
        # own, which a graph would read by address after autocast dropped it.
        return ids.is_cuda and not torch.is_autocast_enabled("cuda")

    def _refresh_due(self) -> bool:
        every = self.policy.refresh_every
        return self.calls == 0 or bool(every and self.calls % every == 0)

    def next_is_whole_block(self) -> bool:
        """Whether the next call can return the whole block's logits."""
        return self.base is not None and self._whole_block_wanted(self.canvas)

    def __call__(self, query, whole_block=False):
        """Logits [N, V] of the True positions of ``query`` [B, T], row-major;
        rows outside ``self.rows`` must have none. With ``whole_block`` (when
        :meth:`next_is_whole_block`), logits [B', W, V] of every position of
        the block instead, for the rows ``self.rows`` (or all)."""
        ids, fixed, key_mask = self.canvas, self.fixed, self.all_key_mask
        if self.rows is not None:
            ids, fixed, query = ids[self.rows], fixed[self.rows], query[self.rows]
            key_mask = None if key_mask is None else key_mask[self.rows]
        if self.cfg_scale > 0:
            # The unconditional half sees every given token masked.
            uncond = torch.where(fixed, self.mask_id, ids)
            ids, query = torch.cat([ids, uncond]), torch.cat([query, query])
            key_mask = None if key_mask is None else torch.cat([key_mask, key_mask])
        self.key_mask = key_mask
        logits = self._run(ids, query, whole_block)
        self.stats.nfe += 1
        self.nfe += 1
        if self.cfg_scale > 0:
            cond, un = logits.chunk(2)
            # Where both halves agree (-inf included: -inf - -inf is NaN) guidance changes nothing.
            logits = torch.where(cond == un, cond, un + (self.cfg_scale + 1) * (cond - un))
        return logits

    def _run(self, ids, query, whole_block):
        policy, model = self.policy, self.model
        if self.base is None:
            self.stats.positions += ids.numel()
            return model(ids, attention_mask=self.key_mask).logits[query].contiguous()
        refresh = self._refresh_due()
        self.calls += 1
        if policy.cache == "none" or refresh:
            self.stats.positions += ids.numel()
            at = slice(self.start, self.end) if whole_block else query
            return self._freeing_kept_workspaces(lambda: self._full_forward(ids, at))
        lo, hi = self.start, (self.end if policy.cache == "dual" else ids.shape[1])
        self.stats.positions += ids.shape[0] * (hi - lo)
        cache = self.workspace.cache
        if policy.cuda_graph and self._graphs_run_on(ids):
            # The graph computes the logits of every position of the block
            # (into a buffer that the next replay overwrites), also when it
            # feeds what follows the block (prefix cache).
            fed, width = ids[:, lo:hi], self.end - lo
            graph = self._freeing_kept_workspaces(
                lambda: self.workspace.graph(self.base, self.key_mask, fed, lo, width))
            logits = graph(self.key_mask, fed, lo)
            return logits if whole_block else logits[query[:, lo:self.end]]
        if whole_block:
            return model(ids[:, lo:hi], self.key_mask, logits_at=slice(0, self.end - lo), cache=cache,
                         start=lo).logits
        return model(ids[:, lo:hi], self.key_mask, logits_at=query[:, lo:hi], cache=cache, start=lo).logits

    def _full_forward(self, ids, at):
        cache = None if self.policy.cache == "none" else self._hold_workspace(ids).cache
        return self.model(ids, self.key_mask, logits_at=at, cache=cache).logits

    def _freeing_kept_workspaces(self, run):
        """``run()`` (a full forward, or a graph's capture with its warm-up
        forward); run once more when it runs out of memory while the model's
        pool keeps workspaces for later calls, after dropping them: memory
        kept for other shapes must not cost this decode its forwards. The
        retry is safe: the forward rewrites whatever the failed one wrote."""
        try:
            return run()
        except RuntimeError as e:  # torch.OutOfMemoryError on a GPU; a plain RuntimeError on the CPU
            if not devices.out_of_memory(e) or not drop_kept(self.base):
                raise
        # Out of the handler: the failed forward's tensors, which the error's
        # traceback holds, are freed before the retry.
        return run()

    def _hold_workspace(self, ids) -> Workspace:
        """The workspace for a full forward over ``ids``: the one held if it
        has their shape, else one checked out for them (giving back the one
        held: finished rows left the batch, and a later call with all of them
        reuses it; should the smaller batch not fit beside it, the forward
        drops it and runs again). A full forward rewrites every position of
        the cache, so what a pooled cache held never shows."""
        key = (ids.device, self._cache_dtype(ids.device), ids.shape[0], ids.shape[1], self.key_mask is not None)
        if self.workspace is None or self.workspace.key != key:
            self.give_back()
            self.workspace = checkout(self.base, key)
        return self.workspace

    def _cache_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the model's keys and values: the weights', or the one
        torch.autocast runs the projections in."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.base.dtype

    def give_back(self) -> None:
        """Returns the workspace held (if any) to the model's pool."""
        if self.workspace is not None:
            workspace, self.workspace = self.workspace, None
            checkin(self.base, workspace)


def check_model(model, method: Optional[str]) -> None:
    """``model`` is something to call as ``model(ids).logits``; otherwise a
    TypeError naming it, before its first use fails with a puzzling error
    (an Engine holds its model in ``.model``, and has its own ``method``
    where one is named)."""
    from .engine import Engine  # here: the engine module imports this one

    if isinstance(model, Engine):
        instead = f", or call engine.{method}(...), which takes text" if method else ""
        raise TypeError(f"model: expected a model (an LLaDAModel, or what torch.compile made of one), got an "
                        f"Engine: pass engine.model{instead}")
    if not callable(model):
        raise TypeError(f"model: expected a model called as model(ids).logits (an LLaDAModel, or what "
                        f"torch.compile made of one), got {type(model).__name__}")


def device_of(model, fallback: Optional[torch.device] = None) -> torch.device:
    """Where ``model`` computes: its ``device``, or its first parameter's;
    ``fallback`` for a model with neither (a stand-in), else a TypeError."""
    device = getattr(model, "device", None)
    if device is None:
        parameters = getattr(model, "parameters", None)
        first = next(iter(parameters()), None) if callable(parameters) else None
        if first is None and fallback is not None:
            return torch.device(fallback)
        if first is None:
            raise TypeError(f"model: expected a `device` attribute or a parameter to read the device off, "
                            f"got {type(model).__name__} with neither")
        device = first.device
    return torch.device(device)


def _config_id(config, key, given, default):
    if given is not None:
        return given
    value = getattr(config, key, None) if config is not None else None
    return default if value is None else int(value)


def _validate(config, prompt, attention_mask, steps, gen_length, block_length, temperature,
              cfg_scale, remasking, mask_id, seed, logits_eos_inf, confidence_eos_eot_inf, fixed_schedule):
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if not is_int(value):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})"
        )
    num_blocks = gen_length // block_length
    # Only the fixed schedule counts steps; the other rules decide their own.
    if fixed_schedule and steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    if fixed_schedule and steps > gen_length:
        raise ValueError(f"steps ({steps}) must not exceed gen_length ({gen_length})")
    _validate_sampling(config, temperature, cfg_scale, remasking, mask_id, seed, logits_eos_inf,
                       confidence_eos_eot_inf)

    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt: expected a torch.Tensor, got {type(prompt).__name__}")
    if prompt.dtype not in _ID_DTYPES:
        raise TypeError(f"prompt: expected an integer tensor (int64), got {prompt.dtype}")
    if prompt.dim() != 2:
        raise ValueError(
            f"prompt: expected shape [batch, length], got {tuple(prompt.shape)} "
            "(use prompt[None] for a single prompt)"
        )
    if prompt.shape[0] == 0:
        raise ValueError("prompt: the batch is empty")
    check_token_ids("prompt", prompt, config)
    if prompt.numel() and bool((prompt == mask_id).any()):
        raise ValueError(f"prompt: contains the mask id {mask_id}; use llada infilling for that")
    max_len = getattr(config, "max_sequence_length", None)
    if max_len is not None and prompt.shape[1] + gen_length > max_len:
        raise ValueError(
            f"prompt: length {prompt.shape[1]} + gen_length {gen_length} exceeds the "
            f"model's max_sequence_length {max_len}"
        )
    _validate_attention_mask(attention_mask, prompt.shape, "the prompt's")


def _check_bool(name, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_seed(seed) -> None:
    """A seed is None or an int in [0, 2**63): the noise keys are 63-bit, so a
    larger or negative seed would alias another."""
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    if seed is not None and not 0 <= seed <= _INT64_MAX:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed}")


def _validate_sampling(config, temperature, cfg_scale, remasking, mask_id, seed,
                       logits_eos_inf=False, confidence_eos_eot_inf=False):
    """The arguments that generate and infill share beyond the ids."""
    for name, value in (("temperature", temperature), ("cfg_scale", cfg_scale)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: must be finite and >= 0, got {value}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    check_seed(seed)
    for name, value in (("logits_eos_inf", logits_eos_inf), ("confidence_eos_eot_inf", confidence_eos_eot_inf)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    if not is_int(mask_id):
        raise TypeError(f"mask_id: expected an int, got {type(mask_id).__name__}")
    vocab = getattr(config, "embedding_size", None)
    if vocab is not None and not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id: {mask_id} is outside the vocabulary [0, {vocab})")


def _validate_attention_mask(attention_mask, shape, whose):
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}"
        )
    if attention_mask.shape != shape:
        raise ValueError(
            f"attention_mask: expected shape {tuple(shape)} ({whose}), "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask: values must be 0 or 1")
