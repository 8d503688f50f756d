"""Monte Carlo estimate of log p(answer | prompt) under a masked diffusion LM.

The estimate is the evidence lower bound: draw a number l of answer tokens to
mask (1 <= l <= L, L the answer length), mask a random set of that size, and
score the masked tokens with cross-entropy weighted by L / l; minus the mean
over draws lower-bounds the log-likelihood. Within each batch of draws the
mask counts are stratified — evenly spaced over 1..L from a random start —
which lowers the variance at no cost. The prompt is never masked.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from .sampler import check_model, check_seed, device_of
from .token_ids import check_token_id, check_token_ids, is_int


# The most draws (and draws per forward) an estimate takes: torch indexes
# with 64-bit ints, and a batch's mask counts multiply its size by the answer's
# length. (Far fewer take hours already.)
MAX_DRAWS = 2**31 - 1


def stratified_mask_counts(
    batch: int, length: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """(batch,) mask counts in 1..length, evenly spaced from a random start.

    Each count on its own is uniform over 1..length, as the estimate's
    weight length / count needs: the spacing is rounded down, the same way
    for every start (rounding to nearest favours even counts at halves)."""
    start = int(torch.randint(1, length + 1, (), generator=generator))
    offsets = torch.arange(batch, dtype=torch.long) * length // batch
    return (start - 1 + offsets) % length + 1


def _ids(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dim() == 2 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 1 or x.dtype != torch.long:
            raise ValueError(f"{name}: expected a 1-D int64 tensor of token ids, got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        return x
    if isinstance(x, (list, tuple)):
        bad = next((i for i in x if not is_int(i)), None)
        if bad is not None:
            raise TypeError(f"{name}: expected token ids (ints), got an element of type {type(bad).__name__}")
        ids = [int(i) for i in x]
        if ids and not -2**63 <= min(ids) <= max(ids) < 2**63:  # beyond what a tensor of ids holds
            raise ValueError(f"{name}: token ids must lie in [0, vocabulary size), got {min(ids)}..{max(ids)}")
        return torch.tensor(ids, dtype=torch.long)
    raise TypeError(f"{name}: expected a tensor or a list of token ids, got {type(x).__name__}")


@torch.no_grad()
def log_likelihood(
    model,
    prompt,
    answer,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    mask_id: Optional[int] = None,
    seed: Optional[int] = None,
) -> float:
    """Estimate log p(answer | prompt) with ``mc_num`` masked draws.

    Args:
        model: called as ``model(ids).logits`` on (batch, Lp + La) ids.
        prompt, answer: 1-D token ids (tensors or lists); the answer non-empty.
        mc_num: number of draws, a multiple of ``batch_size`` (both at
            most ``MAX_DRAWS``).
        cfg_scale: > 0 applies classifier-free guidance against the same
            draw with the whole prompt masked.
        mask_id: defaults to the model config's ``mask_token_id``.
        seed: makes the estimate deterministic.
    """
    check_model(model, "log_likelihood")
    prompt = _ids(prompt, "prompt")
    answer = _ids(answer, "answer")
    if answer.numel() == 0:
        raise ValueError("answer: expected at least one token")
    for name, value in (("mc_num", mc_num), ("batch_size", batch_size)):
        if not is_int(value) or not 1 <= value <= MAX_DRAWS:
            raise ValueError(f"{name}: expected a positive int up to {MAX_DRAWS}, got {value!r}")
    mc_num, batch_size = int(mc_num), int(batch_size)
    if mc_num % batch_size:
        raise ValueError(f"mc_num: expected a positive multiple of batch_size ({batch_size}), got {mc_num}")
    if not isinstance(cfg_scale, numbers.Real) or isinstance(cfg_scale, bool) or not (
            math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale: expected a finite value >= 0, got {cfg_scale!r}")
    check_seed(seed)
    config = getattr(model, "config", None)
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("mask_id: not given and the model's config has no mask_token_id")
    check_token_id("mask_id", mask_id, config)
    for name, ids in (("prompt", prompt), ("answer", answer)):
        check_token_ids(name, ids, config)
        if bool((ids == mask_id).any()):
            raise ValueError(f"{name}: contains the mask id {mask_id}, which the estimate puts there itself")
    max_len = getattr(config, "max_sequence_length", None)
    if max_len is not None and prompt.numel() + answer.numel() > max_len:
        # The prompt alone leaves no room for any answer: it is the one too long.
        name = "prompt" if prompt.numel() >= max_len else "answer"
        raise ValueError(f"{name}: prompt ({prompt.numel()}) and answer ({answer.numel()}) tokens exceed the "
                         f"model's max_sequence_length {max_len}")
    device = device_of(model, fallback=prompt.device)  # a stand-in without parameters: the prompt's
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    lp, la = prompt.numel(), answer.numel()
    # Each moved on its own: a prompt and an answer may come on different devices.
    sequence = torch.cat([prompt.to(device), answer.to(device)])
    total = 0.0
    for _ in range(mc_num // batch_size):
        counts = stratified_mask_counts(batch_size, la, generator)
        # A random set of `count` answer positions per row: rank random keys.
        ranks = torch.rand(batch_size, la, generator=generator).argsort(dim=1).argsort(dim=1)
        masked_answer = ranks < counts[:, None]
        masked = torch.cat([torch.zeros(batch_size, lp, dtype=torch.bool), masked_answer], dim=1)
        masked = masked.to(device)
        noisy = torch.where(masked, mask_id, sequence.expand(batch_size, -1))
        logits = model(noisy).logits
        if cfg_scale > 0:
            unconditional = noisy.clone()
            unconditional[:, :lp] = mask_id
            un = model(unconditional).logits
            # Where both passes agree (-inf included: -inf - -inf is NaN) guidance changes nothing.
            logits = torch.where(logits == un, logits, un + (cfg_scale + 1) * (logits - un))
        targets = sequence.expand(batch_size, -1)[masked]
        ce = F.cross_entropy(logits[masked].float(), targets, reduction="none")
        weight = (la / counts.to(device=device, dtype=torch.float32))[:, None].expand(-1, lp + la)
        total += float((ce * weight[masked]).sum()) / batch_size
    if math.isnan(total):  # (-inf is an answer the model rules out)
        raise FloatingPointError("the logits hold NaN or +inf (or, with cfg_scale, -inf in the pass without the "
                                 "prompt only, which guidance makes +inf), so the estimate is not a number: check "
                                 "the weights, the dtype (16 bits may overflow where float32 does not) and cfg_scale")
    return -total / (mc_num // batch_size)
