"""rms_norm against its reference (the torch composition the checkpoint's code
uses), on CPU and CUDA.

Accuracy criteria: float32 agrees with the reference to a few ulps (only the
order of the sum of squares differs). The 16-bit types round twice, like the
reference; where the float32 normalisation differs in its last bit, a rounding
may go the other way, so an element may differ by up to 2 ulps of its dtype,
and only a small fraction of elements may differ at all.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llada
from llada.model import RMSNorm
from llada.ops import add_rms_norm_reference, rms_norm_reference

from conftest import assert_close_in_ulps, assert_new_tensor_like, poison_allocator

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}


def make_inputs(shape, dtype, device, seed=0):
    """Rows at scales from 1e-3 to 1e3 (the normalisation must undo them) and
    a weight around 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    if x.dim() > 1:
        x = x * torch.logspace(-3, 3, x.shape[-2]).unsqueeze(-1)
    w = 1 + 0.5 * torch.randn(shape[-1], generator=gen)
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


def check(x, w, eps):
    poison_allocator(x.device.type, [x.numel() * x.element_size() * 2])
    got = llada.rms_norm(x, w, eps)
    assert_new_tensor_like(got, x)
    assert_close_in_ulps(got, rms_norm_reference(x, w, eps), float32_rtol=1e-5)


SHAPES = [(1, 1), (3, 17), (2, 5, 4096), (64, 4095), (7, 130), (0, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(device, dtype, shape):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    x, w = make_inputs(shape, dtype, device)
    check(x, w, 1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1.0])
def test_eps_and_zero_rows(device, eps):
    x, w = make_inputs((4, 256), torch.float32, device, seed=1)
    x[1] = 0  # 0 with eps > 0; 0 * inf = nan with eps = 0, as in the reference
    check(x, w, eps)
    check(x.bfloat16(), w.bfloat16(), eps)


def test_strided_input(device):
    """A transposed view is read as the tensor it represents."""
    x, w = make_inputs((64, 6), torch.float32, device, seed=2)
    xt = x.t()  # [6, 64], not contiguous
    w64 = torch.randn(64, device=device)
    check(xt, w64, 1e-5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 20), dim=st.integers(1, 600), eps=st.sampled_from([0.0, 1e-5, 0.1]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_cpu(rows, dim, eps, scale, seed):
    x, w = make_inputs((rows, dim), torch.float32, "cpu", seed)
    x = x * scale + 0.1  # no all-zero row, so eps = 0 stays finite
    check(x, w, eps)
    check(x.bfloat16(), w.bfloat16(), eps)


def test_inputs_not_modified(device):
    x, w = make_inputs((3, 100), torch.bfloat16, device, seed=3)
    before = (x.clone(), w.clone())
    llada.rms_norm(x, w, 1e-5)
    assert torch.equal(before[0], x) and torch.equal(before[1], w)


def test_opcheck(device):
    x, w = make_inputs((3, 4, 64), torch.float32, device, seed=4)
    torch.library.opcheck(torch.ops.llada.rms_norm.default, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.llada.rms_norm.default, (x.bfloat16(), w.bfloat16(), 0.0))


def test_bad_input(device):
    x, w = make_inputs((3, 64), torch.float32, device, seed=5)
    with pytest.raises(TypeError, match="x: expected dtype"):
        llada.rms_norm(x.double(), w.double(), 1e-5)
    with pytest.raises(TypeError, match="x: expected dtype"):
        llada.rms_norm(x.long(), w.long(), 1e-5)
    if device == "cpu":
        with pytest.raises(TypeError, match="x: expected dtype float32 or bfloat16"):
            llada.rms_norm(x.half(), w.half(), 1e-5)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        llada.rms_norm(x, w.bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="weight: expected 64 elements"):
        llada.rms_norm(x, w[:63], 1e-5)
    with pytest.raises(ValueError, match="weight: expected a 1-D"):
        llada.rms_norm(x, w[None], 1e-5)
    with pytest.raises(ValueError, match="x: expected at least one dimension"):
        llada.rms_norm(x[0, 0], w[:1], 1e-5)
    for eps in (math.nan, math.inf, -1e-5):
        with pytest.raises(ValueError, match="eps"):
            llada.rms_norm(x, w, eps)
    with pytest.raises(TypeError, match="x"):
        llada.rms_norm(x.tolist(), w, 1e-5)
    with pytest.raises(TypeError, match="weight"):
        llada.rms_norm(x, w.tolist(), 1e-5)
    if device == "cuda":
        with pytest.raises(ValueError, match="weight: expected to be on the device of x"):
            llada.rms_norm(x, w.cpu(), 1e-5)


def norm_by_hand(x, w, eps):
    """RMSNorm written out in float64: x / sqrt(mean(x^2) + eps) * w."""
    x64 = x.double()
    return x64 / (x64.square().mean(-1, keepdim=True) + eps).sqrt() * w.double()


def check_training_path(out, grads, x, w, eps, outputs_by_hand):
    """The training path's outputs and gradients (of the sum of their
    squares) agree with the same computation in float64 by hand."""
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    want = outputs_by_hand(x64, w64, eps)
    sum(t.square().sum() for t in want).backward()
    for got, ref in zip(out, want):
        torch.testing.assert_close(got.detach().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0].double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1].double(), w64.grad, rtol=1e-4, atol=1e-5)


def norm_counting_calls(device, monkeypatch, op: str):
    """A model RMSNorm of width 96 with a weight around 1, and the list of
    input shapes the fused op `op` is called with from now on."""
    calls, fused = [], getattr(llada.ops, op)

    def counting(*args):
        calls.append(args[0].shape)
        return fused(*args)

    monkeypatch.setattr(llada.model.ops, op, counting)
    norm = RMSNorm(96, 1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(96))
    return norm, calls


def test_model_norm_uses_it_and_keeps_gradients(device, monkeypatch):
    """The model's RMSNorm goes through the fused op in inference, with the
    reference's values, and still trains (the composition, which has a
    gradient)."""
    norm, calls = norm_counting_calls(device, monkeypatch, "rms_norm")
    x = torch.randn(2, 7, 96, device=device)
    with torch.no_grad():
        inferred = norm(x)
        torch.testing.assert_close(inferred, rms_norm_reference(x, norm.weight, 1e-5), rtol=1e-5, atol=1e-30)
    assert calls == [x.shape]
    xg = x.clone().requires_grad_(True)
    out = norm(xg)
    out.square().sum().backward()
    assert calls == [x.shape], "the training path must keep the differentiable composition"
    torch.testing.assert_close(out.detach(), inferred, rtol=1e-5, atol=1e-30)
    check_training_path([out], [xg.grad, norm.weight.grad], x, norm.weight, 1e-5,
                        lambda x, w, eps: [norm_by_hand(x, w, eps)])


# add_rms_norm: the residual add and the norm of its result in one pass.


def check_add(x, residual, w, eps):
    poison_allocator(x.device.type, [x.numel() * x.element_size() * 2])
    total, normed = llada.add_rms_norm(x, residual, w, eps)
    want_total, want_normed = add_rms_norm_reference(x, residual, w, eps)
    assert_new_tensor_like(total, x)
    assert_new_tensor_like(normed, x)
    assert torch.equal(total, want_total), "the sum must be the torch sum exactly"
    assert_close_in_ulps(normed, want_normed, float32_rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_add_matches_reference(device, dtype, shape):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    x, w = make_inputs(shape, dtype, device)
    # A residual of the same size as x: the sum rounds in every element.
    residual, _ = make_inputs(shape, dtype, device, seed=9)
    check_add(x, residual, w, 1e-5)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 12), dim=st.integers(1, 600), eps=st.sampled_from([1e-5, 0.1]),
       seed=st.integers(0, 2**31 - 1))
def test_add_random_shapes_cpu(rows, dim, eps, seed):
    x, w = make_inputs((rows, dim), torch.float32, "cpu", seed)
    residual, _ = make_inputs((rows, dim), torch.float32, "cpu", seed + 1)
    check_add(x, residual, w, eps)
    check_add(x.bfloat16(), residual.bfloat16(), w.bfloat16(), eps)


def test_add_strided_and_unmodified(device):
    x, w = make_inputs((64, 6), torch.bfloat16, device, seed=2)
    residual, _ = make_inputs((6, 64), torch.bfloat16, device, seed=3)
    xt = x.t()  # [6, 64], not contiguous
    w64 = torch.randn(64, device=device, dtype=torch.bfloat16)
    before = (xt.clone(), residual.clone())
    check_add(xt, residual, w64, 1e-5)
    assert torch.equal(before[0], xt) and torch.equal(before[1], residual)


def test_add_opcheck(device):
    x, w = make_inputs((3, 4, 64), torch.float32, device, seed=4)
    residual, _ = make_inputs((3, 4, 64), torch.float32, device, seed=5)
    torch.library.opcheck(torch.ops.llada.add_rms_norm.default, (x, residual, w, 1e-5))
    torch.library.opcheck(torch.ops.llada.add_rms_norm.default,
                          (x.bfloat16(), residual.bfloat16(), w.bfloat16(), 0.0))


def test_add_bad_input(device):
    x, w = make_inputs((3, 64), torch.float32, device, seed=5)
    with pytest.raises(ValueError, match=r"residual: expected the shape of x \[3, 64\]"):
        llada.add_rms_norm(x, x[:2], w, 1e-5)
    with pytest.raises(TypeError, match="residual: expected dtype"):
        llada.add_rms_norm(x, x.bfloat16(), w, 1e-5)
    with pytest.raises(TypeError, match="residual"):
        llada.add_rms_norm(x, x.tolist(), w, 1e-5)
    with pytest.raises(ValueError, match="weight: expected 64 elements"):
        llada.add_rms_norm(x, x, w[:63], 1e-5)
    with pytest.raises(ValueError, match="eps"):
        llada.add_rms_norm(x, x, w, -1.0)
    if device == "cuda":
        with pytest.raises(ValueError, match="residual: expected to be on the device of x"):
            llada.add_rms_norm(x, x.cpu(), w, 1e-5)


def test_model_add_then_norm_uses_it_and_keeps_gradients(device, monkeypatch):
    """The model's residual adds go through add_rms_norm in inference, with
    the reference's values, and still train (the composition)."""
    norm, calls = norm_counting_calls(device, monkeypatch, "add_rms_norm")
    x, residual = torch.randn(2, 7, 96, device=device), torch.randn(2, 7, 96, device=device)
    with torch.no_grad():
        total, normed = norm.add_then_norm(x, residual)
    want_total, want_normed = add_rms_norm_reference(x, residual, norm.weight, 1e-5)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-30)
    assert calls == [x.shape]
    xg = x.clone().requires_grad_(True)
    out = norm.add_then_norm(xg, residual)
    sum(t.square().sum() for t in out).backward()
    assert calls == [x.shape], "the training path must keep the differentiable composition"
    assert torch.equal(out[0].detach(), total)
    torch.testing.assert_close(out[1].detach(), normed, rtol=1e-5, atol=1e-30)
    check_training_path(out, [xg.grad, norm.weight.grad], x, norm.weight, 1e-5,
                        lambda x, w, eps: [x + residual.double(), norm_by_hand(x + residual.double(), w, eps)])
    # A residual that broadcasts is added by torch, then normalised.
    with torch.no_grad():
        total, _ = norm.add_then_norm(x, residual[:1])
    assert torch.equal(total, x + residual[:1]) and calls == [x.shape]
