"""Shared fixtures: the devices every op test runs on, and output poisoning."""

import pytest
import torch

import llada

_NO_GPU = "no CUDA GPU present" if not torch.cuda.is_available() else None
_NO_KERNELS = "llada was built without CUDA kernels" if not llada.cuda_kernels_available() else None

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            bool(_NO_GPU or _NO_KERNELS), reason=_NO_GPU or _NO_KERNELS or ""
        ),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def poison_allocator(device: str, shapes_bytes: list[int]) -> None:
    """Hand back freed blocks full of 0xFF bytes, so that an op's output
    elements it forgets to write show up as garbage instead of lucky zeros."""
    blocks = [
        torch.full((n,), 0xFF, dtype=torch.uint8, device=device) for n in shapes_bytes
    ]
    del blocks


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a busy
    machine the extra thread only spins (often 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_new_tensor_like(got: torch.Tensor, like: torch.Tensor) -> None:
    """An op's output for input ``like``: a contiguous tensor of its shape,
    dtype and device."""
    assert got.shape == like.shape and got.dtype == like.dtype and got.device == like.device
    assert got.is_contiguous()
