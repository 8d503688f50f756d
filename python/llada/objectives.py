"""The masked-diffusion training objectives of LLaDA.

Both losses corrupt a clean sequence by masking each token independently with
a probability p drawn per sequence, then score the model's predictions at the
masked positions with cross-entropy weighted by 1/p. That weighting makes the
loss an upper bound on the negative log-likelihood (the ELBO of a masked
diffusion model).

- Pretraining: t ~ U(0, 1), p = (1 - eps) t + eps, every position may be
  masked, the sum is normalised by B * L. With a small probability the batch
  is cropped to a random length first, so the model also sees short inputs.
- SFT: the prompt is never masked and each sequence's sum is normalised by
  its answer length (EOS padding at the end of answers is part of the answer,
  so the model learns where to stop); the result is averaged over the batch.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .token_ids import check_token_id

DEFAULT_EPS = 1e-3


class Corruption(NamedTuple):
    """A masked copy of a batch and how it was made."""

    noisy: torch.Tensor  # (B, L) ids with masked positions set to the mask id
    masked: torch.Tensor  # (B, L) bool
    p_mask: torch.Tensor  # (B,) masking probability of each sequence


def _check_ids(input_ids: torch.Tensor, name: str = "input_ids") -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty (B, L) tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype != torch.long:
        raise TypeError(f"{name}: expected dtype torch.int64, got {input_ids.dtype}")


def _check_keep(keep, shape: tuple) -> None:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"keep: expected a bool tensor of shape {shape}, got "
                        f"{keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__}")
    # Broadcasting one row to every row (or a column to every position) would be no error.
    if tuple(keep.shape) != shape:
        raise ValueError(f"keep: expected shape {shape} (that of input_ids), got {tuple(keep.shape)}")


def corrupt(
    input_ids: torch.Tensor,
    mask_id: int,
    eps: float = DEFAULT_EPS,
    t: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Corruption:
    """Masks each token of row b with probability p_b = (1 - eps) t_b + eps.

    Args:
        mask_id: the id masked positions get, an int >= 0.
        t: (B,) diffusion times, a floating-point tensor of values in
            [0, 1]; drawn uniformly from [0, 1) when None.
        keep: (B, L) bool, positions never masked (the prompt in SFT).
    """
    _check_ids(input_ids)
    check_token_id("mask_id", mask_id, None)
    if not 0 <= eps < 1:
        raise ValueError(f"eps: expected a value in [0, 1), got {eps}")
    b, l = input_ids.shape
    if keep is not None:
        _check_keep(keep, (b, l))
    device = input_ids.device
    if t is None:
        t = torch.rand(b, generator=generator, device=device)
    else:
        _check_times(t, b)
    p_mask = (1 - eps) * t.to(device=device, dtype=torch.float32) + eps
    masked = torch.rand(b, l, generator=generator, device=device) < p_mask[:, None]
    if keep is not None:
        masked &= ~keep
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return Corruption(noisy, masked, p_mask)


def _check_times(t, b: int) -> None:
    """Given times must be ones a masking probability is made of: outside
    [0, 1] (or NaN) p_mask is no probability, and the loss no bound."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"t: expected a floating-point tensor of shape ({b},), got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.shape != (b,):
        raise ValueError(f"t: expected shape ({b},), got {tuple(t.shape)}")
    inside = (t >= 0) & (t <= 1)  # NaN fails both comparisons
    if not bool(inside.all()):
        row = int((~inside).nonzero()[0, 0])
        raise ValueError(f"t: expected values in [0, 1], got {float(t[row])} in row {row}")


def weighted_masked_ce(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Sum over masked positions of cross-entropy(logits, target) * weight.

    ``weight`` is (B, L) or broadcastable to it; the cross-entropy is computed
    in float32 whatever the logits dtype.
    """
    weight = weight.expand_as(masked)
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    return (ce * weight[masked]).sum()


def pretraining_loss(
    model: Callable,
    input_ids: torch.Tensor,
    mask_id: int,
    eps: float = DEFAULT_EPS,
    crop_probability: float = 0.01,
    t: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The LLaDA pretraining loss of one batch (a scalar tensor).

    ``mask_id`` must lie in the vocabulary, where ``model.config`` gives its
    ``embedding_size``."""
    _check_ids(input_ids)
    check_token_id("mask_id", mask_id, getattr(model, "config", None))
    if not 0 <= crop_probability <= 1:
        raise ValueError(f"crop_probability: expected a value in [0, 1], got {crop_probability}")
    device = input_ids.device
    if crop_probability > 0 and torch.rand((), generator=generator, device=device) < crop_probability:
        length = int(torch.randint(1, input_ids.shape[1] + 1, (), generator=generator, device=device))
        input_ids = input_ids[:, :length]
    b, l = input_ids.shape
    noisy, masked, p_mask = corrupt(input_ids, mask_id, eps, t, generator=generator)
    logits = model(noisy).logits
    return weighted_masked_ce(logits, input_ids, masked, 1.0 / p_mask[:, None]) / (b * l)


def sft_loss(
    model: Callable,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    mask_id: int,
    eps: float = DEFAULT_EPS,
    t: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The LLaDA SFT loss of one batch of prompt + answer rows (a scalar).

    ``prompt_lengths`` (B,) gives how many leading tokens of each row are
    prompt; the rest (EOS padding included) is answer. ``mask_id`` must lie
    in the vocabulary, where ``model.config`` gives its ``embedding_size``.
    """
    _check_ids(input_ids)
    check_token_id("mask_id", mask_id, getattr(model, "config", None))
    b, l = input_ids.shape
    prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
    if prompt_lengths.is_floating_point() or prompt_lengths.is_complex() or prompt_lengths.dtype == torch.bool:
        # A length of 2.5 would keep 3 prompt tokens and count 5.5 answer tokens.
        raise TypeError(f"prompt_lengths: expected integer token counts, got dtype {prompt_lengths.dtype}")
    if prompt_lengths.shape != (b,):
        raise ValueError(f"prompt_lengths: expected shape ({b},), got {tuple(prompt_lengths.shape)}")
    if (prompt_lengths < 0).any() or (prompt_lengths >= l).any():
        raise ValueError(f"prompt_lengths: expected values in [0, {l}) so every row has an answer")
    keep = torch.arange(l, device=input_ids.device)[None, :] < prompt_lengths[:, None]
    noisy, masked, p_mask = corrupt(input_ids, mask_id, eps, t, keep=keep, generator=generator)
    logits = model(noisy).logits
    answer_lengths = (l - prompt_lengths).float()
    weight = 1.0 / (p_mask * answer_lengths)
    return weighted_masked_ce(logits, input_ids, masked, weight[:, None]) / b
