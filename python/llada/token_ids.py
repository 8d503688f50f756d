"""The checks every entry point makes of the token ids (and other
integers) it is given."""

from __future__ import annotations

import numbers

import torch


def is_int(value) -> bool:
    """An integer (a Python or numpy int), and not a bool, which Python
    counts as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_token_ids(name: str, ids: torch.Tensor, config) -> None:
    """Every id of ``ids`` indexes the model's embedding (``config.embedding_size``
    rows, when the config says); otherwise a ValueError naming ``name``."""
    vocab = getattr(config, "embedding_size", None)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(f"{name}: token ids must lie in [0, {vocab}), got {lo}..{hi}")
