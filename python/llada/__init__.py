"""llada: a fast inference engine for masked diffusion language models."""

import torch  # noqa: F401  (loads libtorch before the extension needs it)

try:
    from . import _C
except ImportError as e:  # said plainly: otherwise it surfaces as a circular import, or a torch library
    raise ImportError(f"llada: the compiled extension llada._C did not load ({e}); it is not built, or was "
                      "built against another torch: build it with `pip install --no-build-isolation .` "
                      "(or `./dev.sh build` in a clone)") from e
from . import devices, ops
from .ops import (TokenChoice, add_rms_norm, attention, commit_tokens, rms_norm, rope, sample_tokens,
                  select_positions, silu_mul, store_kv)
from .model import LLaDAConfig, LLaDAModel
from .checkpoint import load_config, load_model, load_tokenizer, write_random_checkpoint
from .likelihood import log_likelihood
from .policies import DecodePolicy
from .sampler import DecodeStats, generate, infill, stream
from .workspace import release_decode_workspace
from .engine import Engine, load

__version__ = _C.__version__


def cuda_kernels_available() -> bool:
    """Whether the CUDA kernels were compiled into this build of llada.

    This says nothing about whether a GPU is present (see
    ``torch.cuda.is_available()``) or whether the kernels run on it (see
    ``llada.devices.kernels_run_on``).
    """
    return bool(_C.cuda_compiled())


def hopper_attention_available() -> bool:
    """Whether ``llada.attention`` can run its Hopper kernel here (see
    ``LLADA_ATTENTION_SM90``): the current GPU is compute capability 9.0
    (H100, H200) and this build includes that kernel (architecture 90 or
    90a among its CUDA architectures, see ``llada.devices.builds_hopper_attention``)."""
    if not (cuda_kernels_available() and torch.cuda.is_available()):
        return False
    built = devices.builds_hopper_attention(_C.cuda_architectures())
    return built and torch.cuda.get_device_capability() == (9, 0)


__all__ = [
    "DecodePolicy",
    "DecodeStats",
    "Engine",
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
    "hopper_attention_available",
    "load",
    "load_config",
    "load_model",
    "load_tokenizer",
    "devices",
    "ops",
    "rms_norm",
    "add_rms_norm",
    "rope",
    "sample_tokens",
    "select_positions",
    "silu_mul",
    "store_kv",
    "write_random_checkpoint",
]
