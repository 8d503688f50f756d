"""The checks every entry point makes of the token ids (and other
integers) it is given."""

from __future__ import annotations

import numbers

import torch


def is_int(value) -> bool:
    """An integer (a Python or numpy int), and not a bool, which Python
    counts as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_token_id(name: str, value, config) -> None:
    """``value`` is one int id the model's embedding indexes
    (``config.embedding_size`` rows, when the config says; any id an int64
    tensor holds otherwise); else an error naming ``name``."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    vocab = getattr(config, "embedding_size", None)
    if vocab is not None and not 0 <= value < vocab:
        raise ValueError(f"{name}: {value} is outside the vocabulary [0, {vocab})")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name}: expected an id in [0, 2**63), got {value}")


def check_token_ids(name: str, ids: torch.Tensor, config) -> None:
    """Every id of ``ids`` indexes the model's embedding (``config.embedding_size``
    rows, when the config says); otherwise a ValueError naming ``name``."""
    vocab = getattr(config, "embedding_size", None)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(f"{name}: token ids must lie in [0, {vocab}), got {lo}..{hi}")
