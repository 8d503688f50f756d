"""Which devices llada's compiled kernels run on.

The CPU kernels run on every CPU. A GPU runs the CUDA kernels only if this
build holds code it can execute: machine code (SASS) of its architecture
family at or below its minor version, or PTX of an architecture no newer
than it, which the driver compiles for it when the module loads. The
default build (architectures 80 and 90, each as SASS and PTX) covers
compute capability 8.0 and newer. On an older GPU (a T4 or a V100, say),
or with a build made without nvcc, the model runs torch compositions and
SDPA, and each op of ``llada.ops`` its reference, in place of the kernels:
the same results, only slower.
"""

from __future__ import annotations

import functools
import re
import warnings

import torch

from . import _C


def kernels_run_on(device: torch.device | str | int) -> bool:
    """Whether llada's compiled kernels can run on ``device`` (a
    ``torch.device``, or what ``torch.device`` takes: "cuda:0", "cpu", 0).
    Devices other than CUDA GPUs are left to the op dispatcher (CPU: always;
    meta, for fake tensors: their fake kernels). Where torch sees no CUDA
    GPU, none of them is one the kernels run on."""
    try:
        runs = _answers.get(device)  # every op asks: one lookup
    except TypeError:  # unhashable, so no device either
        runs = None
    if runs is None:
        if not isinstance(device, torch.device):  # only the ops ask often, with torch.device objects
            return kernels_run_on(_as_device(device))
        if device.type != "cuda":
            runs = True
        elif not torch.cuda.is_available():  # no GPU here (or no driver): nothing to run the kernels on
            runs = False
        elif device.index is None:  # the current device, which may change
            return _cuda_kernels_run_on(torch.cuda.current_device())
        else:
            runs = _cuda_kernels_run_on(device.index)
        _answers[device] = runs
    return runs


_answers: dict[torch.device, bool] = {}


def _as_device(device) -> torch.device:
    # bool is an int, but True is no device index.
    if not isinstance(device, (str, int)) or isinstance(device, bool):
        raise TypeError(f"device: expected a torch.device, a str or an int, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError:  # "Invalid device string", "Expected one of cpu, cuda, ..."
        raise TypeError(f"device: expected what torch.device accepts, got {device!r}") from None


@functools.cache
def _cuda_kernels_run_on(index: int) -> bool:
    # Said once per device: the results are the same, but slower.
    if not _C.cuda_compiled():
        warnings.warn(f"llada: this build has no CUDA kernels (built without nvcc, or with LLADA_CUDA=OFF); torch "
                      f"compositions run on cuda:{index} in their place", RuntimeWarning, stacklevel=2)
        return False
    capability = torch.cuda.get_device_capability(index)
    runs = architectures_cover(_C.cuda_architectures(), capability)
    if not runs:
        warnings.warn(f"llada: this build's CUDA kernels (architectures {_C.cuda_architectures()}) do not run "
                      f"on cuda:{index} (compute capability {capability[0]}.{capability[1]}); torch "
                      "compositions run in their place", RuntimeWarning, stacklevel=2)
    return runs


# One entry of a CMake CUDA architecture list: "80", "90a", "86-real", "80-virtual".
_ARCHITECTURE = re.compile(r"(\d+)([af]?)(?:-(real|virtual))?")


def architectures_cover(architectures: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``architectures`` (CMake's list: "80;90" or
    "80,90"; a plain number is SASS and PTX, ``-real`` SASS alone,
    ``-virtual`` PTX alone; ``a`` marks code for that one architecture,
    ``f`` for its family) runs on a GPU of compute ``capability``."""
    major, minor = capability
    gpu = 10 * major + minor
    for entry in re.split(r"[;,]", architectures):
        entry = entry.strip()
        if entry in ("all", "all-major", "native"):
            return True  # built for every GPU, or for the one that built it
        match = _ARCHITECTURE.fullmatch(entry)
        if match is None:
            continue
        number, specific, kind = int(match[1]), match[2], match[3]
        same_family = number // 10 == major and number % 10 <= minor
        if specific == "a":
            if number == gpu:
                return True
        elif specific == "f":
            if same_family:
                return True
        elif (kind != "virtual" and same_family) or (kind != "real" and number <= gpu):
            return True
    return False


def builds_hopper_attention(architectures: str) -> bool:
    """Whether a build for ``architectures`` (as in :func:`architectures_cover`)
    holds the Hopper attention kernel: cmake/kernels.cmake compiles it when
    an entry is 90 or 90a, as SASS, PTX or both (90f does not count)."""
    for entry in re.split(r"[;,]", architectures):
        match = _ARCHITECTURE.fullmatch(entry.strip())
        if match is not None and int(match[1]) == 90 and match[2] in ("", "a"):
            return True
    return False


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is torch running out of memory: an OutOfMemoryError
    on a GPU, a plain RuntimeError from the CPU's allocator."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
