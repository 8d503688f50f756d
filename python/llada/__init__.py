"""llada: a fast inference engine for masked diffusion language models."""

import torch  # noqa: F401  (loads libtorch before the extension needs it)

from . import _C, ops
from .ops import TokenChoice, attention, commit_tokens, rms_norm, rope, sample_tokens, select_positions
from .model import LLaDAConfig, LLaDAModel
from .checkpoint import load_config, load_model, load_tokenizer, write_random_checkpoint
from .likelihood import log_likelihood
from .policies import DecodePolicy
from .sampler import DecodeStats, generate, infill, release_decode_workspace, stream

__version__ = _C.__version__


def cuda_kernels_available() -> bool:
    """Whether the CUDA kernels were compiled into this build of llada.

    This says nothing about whether a GPU is present (see
    ``torch.cuda.is_available()``); both are needed to run them.
    """
    return bool(_C.cuda_compiled())


__all__ = [
    "DecodePolicy",
    "DecodeStats",
    "infill",
    "log_likelihood",
    "release_decode_workspace",
    "stream",
    "LLaDAConfig",
    "LLaDAModel",
    "TokenChoice",
    "attention",
    "commit_tokens",
    "cuda_kernels_available",
    "generate",
    "load_config",
    "load_model",
    "load_tokenizer",
    "ops",
    "rms_norm",
    "rope",
    "sample_tokens",
    "select_positions",
    "write_random_checkpoint",
]
