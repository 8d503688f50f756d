"""Shared fixtures: the devices every op test runs on, and output poisoning."""

import pytest
import torch

import llada
import llada.devices


def _cuda_skip_reason():
    """Why the CUDA tests cannot test llada's CUDA kernels here, or None.
    Where the kernels do not cover the GPU, the ops run torch compositions,
    which the tests would only compare with themselves."""
    if not torch.cuda.is_available():
        return "no CUDA GPU present"
    if not llada.cuda_kernels_available():
        return "llada was built without CUDA kernels"
    built, capability = llada._C.cuda_architectures(), torch.cuda.get_device_capability(0)
    if not llada.devices.architectures_cover(built, capability):
        return f"llada's CUDA kernels (architectures {built}) do not run on this GPU (compute {capability})"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
needs_cuda = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def poison_allocator(device: str, shapes_bytes: list[int]) -> None:
    """Make the memory the test's next allocations get garbage, so that an
    op's output elements it forgets to write show up instead of lucky zeros.

    On CUDA, freed blocks full of 0xFF bytes go back to torch's caching
    allocator, which hands them out again. The CPU allocator does not reuse
    blocks that reliably (large ones come back from the system zeroed), so
    there torch fills every new tensor (NaN, or an integer type's largest
    value) until the test ends: torch's deterministic mode does that."""
    if torch.device(device).type == "cpu":
        torch.utils.deterministic.fill_uninitialized_memory = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        return
    blocks = [
        torch.full((n,), 0xFF, dtype=torch.uint8, device=device) for n in shapes_bytes
    ]
    del blocks


@pytest.fixture(autouse=True)
def _end_cpu_poisoning():
    """Each test starts and ends without poison_allocator's CPU fill."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


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


MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def assert_close_in_ulps(got: torch.Tensor, want: torch.Tensor, float32_rtol: float) -> None:
    """got against a reference that rounds the same way but may compute a
    last bit differently: float32 within float32_rtol; a 16-bit type within
    2 ulps per element (a last-bit difference before a rounding may send it
    the other way), with at most 2% of the elements differing at all. NaN
    where the reference has NaN; equal infinities agree."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=float32_rtol, atol=1e-37, equal_nan=True)
        return
    g, r = got.float(), want.float()
    assert torch.equal(g.isnan(), r.isnan()), "NaN where the reference has none, or the reverse"
    g, r = g[~g.isnan()], r[~r.isnan()]
    size = torch.maximum(g.abs(), r.abs()).clamp_min(torch.finfo(got.dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(size)) - MANTISSA_BITS[got.dtype])
    diff = torch.where(g == r, 0.0, (g - r).abs())
    assert (diff <= 2 * ulp).all(), f"max error {(diff / ulp).max().item():.1f} ulp"
    if diff.numel() >= 1000:
        assert (diff > 0).float().mean().item() < 0.02, "too many elements differ from the reference"
