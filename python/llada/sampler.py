"""The exact LLaDA sampler: the official semi-autoregressive low-confidence
remasking algorithm (DESIGN.md section 3), built on the decoding ops.

At temperature 0 it makes the same decisions as the official ``generate``
(ties between equal confidences go to the lower position), while computing
the LM head only where a token can be committed: the masked positions of the
active block.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch

from . import ops
from .model import LLaDAModel

REMASKING = ("low_confidence", "random")
_INT64_MAX = 2**63 - 1


def transfer_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per row and step, [B, steps]: masked // steps each
    step, plus one more in the first masked % steps steps."""
    step = torch.arange(steps, device=masked.device)
    return masked[:, None] // steps + (step[None, :] < masked[:, None] % steps).long()


def step_seed(seed: int, step: int) -> int:
    """A distinct noise key per step; the ops hash it, so a simple odd-constant
    mix is enough to keep steps apart."""
    return (seed * 0x9E3779B97F4A7C15 + step) & _INT64_MAX


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
    on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Fill ``gen_length`` masked positions after ``prompt`` by iterative unmasking.

    Args:
        model: a :class:`LLaDAModel` (or any model whose ``model(ids,
            attention_mask=...).logits`` is [B, L, V]).
        prompt: int64 [B, Lp], left-padded with the pad id when rows differ.
        attention_mask: [B, Lp] of 1/0 (0 = padding), or None.
        steps: forwards in all; each of the ``gen_length // block_length``
            blocks gets ``steps / num_blocks`` of them.
        gen_length, block_length: canvas length, and the semi-autoregressive
            block size (gen_length for a single block).
        temperature: 0 = greedy; > 0 samples softmax(logits / temperature)
            with counter-based Gumbel noise keyed by (seed, step).
        cfg_scale: classifier-free guidance; > 0 adds a pass with the prompt
            masked: logits = un + (cfg_scale + 1) * (cond - un).
        remasking: 'low_confidence' (probability of the prediction) or
            'random' (torch.rand from a CPU generator seeded with ``seed``).
        mask_id: defaults to ``model.config.mask_token_id``.
        logits_eos_inf: never predict EOS.
        confidence_eos_eot_inf: positions predicting EOS or EoT are committed
            only after every other candidate of the row.
        seed: makes temperature > 0 and 'random' reproducible; None draws one
            from torch's global generator.
        on_step: called as ``on_step(step, total_steps, canvas)`` after every
            step; ``canvas`` is the live [B, Lp + gen_length] tensor (read only).

    Returns:
        int64 [B, Lp + gen_length] on the model's device: prompt, then answer.
    """
    config = getattr(model, "config", None)
    mask_id = _config_id(config, "mask_token_id", mask_id, 126336)
    eos_id = _config_id(config, "eos_token_id", None, 126081)
    eot_id = _config_id(config, "eot_token_id", None, 126348)
    _validate(config, prompt, attention_mask, steps, gen_length, block_length, temperature,
              cfg_scale, remasking, mask_id, seed)
    if seed is None:
        seed = int(torch.randint(0, _INT64_MAX, (1,)))

    device = _device_of(model)
    b, lp = prompt.shape
    total = lp + gen_length
    canvas = torch.full((b, total), mask_id, dtype=torch.long, device=device)
    canvas[:, :lp] = prompt.to(device)
    key_mask = None
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        key_mask = torch.ones(b, total, dtype=torch.bool, device=device)
        key_mask[:, :lp] = attention_mask.to(device) != 0

    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    suppress = [eos_id] if logits_eos_inf else None
    last_ids = torch.tensor([eos_id, eot_id if eot_id is not None else eos_id], device=device)
    random_conf = torch.Generator().manual_seed(seed) if remasking == "random" else None

    for blk in range(num_blocks):
        start, end = lp + blk * block_length, lp + (blk + 1) * block_length
        in_block = torch.zeros(b, total, dtype=torch.bool, device=device)
        in_block[:, start:end] = True
        schedule = transfer_schedule((canvas[:, start:end] == mask_id).sum(1), steps_per_block)
        for i in range(steps_per_block):
            step = blk * steps_per_block + i
            k = schedule[:, i]
            # Drawn every step, so the stream matches one draw per official step.
            noise = torch.rand(b, total, generator=random_conf) if random_conf is not None else None
            active = (canvas == mask_id) & in_block & (k > 0)[:, None]
            if bool(active.any()):
                logits = _logits_at(model, canvas, key_mask, active, cfg_scale, lp, mask_id)
                choice = ops.sample_tokens(logits, temperature, step_seed(seed, step), suppress)
                conf = choice.confidence if noise is None else noise.to(device)[active]
                if confidence_eos_eot_inf:
                    # Confidences lie in [0, 1]: minus 2 ranks these after every
                    # other candidate while keeping them candidates, in order.
                    conf = torch.where(torch.isin(choice.tokens, last_ids), conf - 2.0, conf)
                confidence = torch.full((b, total), -math.inf, dtype=torch.float32, device=device)
                confidence[active] = conf.float()
                x0 = canvas.masked_scatter(active, choice.tokens)
                accepted = ops.select_positions(confidence, "topk", k)
                ops.commit_tokens(canvas, x0, accepted, mask_id)
            if on_step is not None:
                on_step(step, steps, canvas)
    return canvas


def _logits_at(model, canvas, key_mask, at, cfg_scale, lp, mask_id):
    """Logits [N, V] of the positions ``at`` (row-major), with guidance."""
    if cfg_scale <= 0:
        return _forward_at(model, canvas, key_mask, at)
    uncond = canvas.clone()
    uncond[:, :lp] = mask_id
    both = _forward_at(
        model,
        torch.cat([canvas, uncond]),
        None if key_mask is None else torch.cat([key_mask, key_mask]),
        torch.cat([at, at]),
    )
    cond, un = both.chunk(2)
    return un + (cfg_scale + 1) * (cond - un)


def _forward_at(model, ids, key_mask, at):
    if isinstance(model, LLaDAModel):
        return model(ids, key_mask, logits_at=at).logits
    return model(ids, attention_mask=key_mask).logits[at].contiguous()


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    return torch.device(device)


def _config_id(config, key, given, default):
    if given is not None:
        return given
    value = getattr(config, key, None) if config is not None else None
    return default if value is None else int(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate(config, prompt, attention_mask, steps, gen_length, block_length, temperature,
              cfg_scale, remasking, mask_id, seed):
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if not _is_int(value):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    if steps > gen_length:
        raise ValueError(f"steps ({steps}) must not exceed gen_length ({gen_length})")
    for name, value in (("temperature", temperature), ("cfg_scale", cfg_scale)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: must be finite and >= 0, got {value}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
    if not _is_int(mask_id):
        raise TypeError(f"mask_id: expected an int, got {type(mask_id).__name__}")

    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt: expected a torch.Tensor, got {type(prompt).__name__}")
    if prompt.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"prompt: expected an integer tensor (int64), got {prompt.dtype}")
    if prompt.dim() != 2:
        raise ValueError(
            f"prompt: expected shape [batch, length], got {tuple(prompt.shape)} "
            "(use prompt[None] for a single prompt)"
        )
    if prompt.shape[0] == 0:
        raise ValueError("prompt: the batch is empty")
    vocab = getattr(config, "embedding_size", None)
    if vocab is not None and not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id: {mask_id} is outside the vocabulary [0, {vocab})")
    if prompt.numel():
        lo, hi = int(prompt.min()), int(prompt.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(f"prompt: token ids must lie in [0, {vocab}), got {lo}..{hi}")
        if bool((prompt == mask_id).any()):
            raise ValueError(f"prompt: contains the mask id {mask_id}; use llada infilling for that")
    max_len = getattr(config, "max_sequence_length", None)
    if max_len is not None and prompt.shape[1] + gen_length > max_len:
        raise ValueError(
            f"prompt: length {prompt.shape[1]} + gen_length {gen_length} exceeds the "
            f"model's max_sequence_length {max_len}"
        )

    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}"
            )
        if attention_mask.shape != prompt.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(prompt.shape)} (the prompt's), "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask: values must be 0 or 1")
