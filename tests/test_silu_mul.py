"""silu_mul against its reference (torch's silu, then the product, each
rounded to the dtype), on CPU and CUDA.

Accuracy criteria: the kernels compute exp their own way (the CPU twin with
a polynomial, CUDA with expf), so float32 agrees to a few ulps; the 16-bit
types round twice, like the reference, and a last-bit difference before a
rounding may send it the other way: an element may differ by up to 2 ulps of
its dtype, and only a small fraction of elements may differ at all.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llada
from llada.ops import silu_mul_reference

from conftest import assert_close_in_ulps, assert_new_tensor_like, poison_allocator

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}


def make_inputs(shape, dtype, device, seed=0, scale=4.0):
    """gate spans silu's regimes (about -12 to 12: saturated, curved and
    linear); up ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    gate = scale * torch.randn(*shape, generator=gen)
    up = torch.randn(*shape, generator=gen)
    return gate.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)


def check(gate, up):
    poison_allocator(gate.device.type, [gate.numel() * gate.element_size()])
    got = llada.silu_mul(gate, up)
    want = silu_mul_reference(gate, up)
    assert_new_tensor_like(got, gate)
    # Both exps (ours and torch's) err by up to about 2 ulps, and in
    # saturated silu (gate near -17) in opposite directions, with the
    # division and product adding theirs: float32 within about 6 ulps.
    assert_close_in_ulps(got, want, float32_rtol=8e-7)


SHAPES = [(1,), (3, 17), (2, 32, 12288), (5, 4095), (0, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(device, dtype, shape):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    check(*make_inputs(shape, dtype, device))


def test_extremes(device):
    """Large |gate| (exp under- and overflows), zeros, infinities and NaN."""
    gate = torch.tensor([-1e30, -200.0, -89.0, -88.5, -87.5, -20.0, -0.0, 0.0, 1e-30, 20.0, 87.5, 88.5, 89.0,
                         200.0, 1e30, float("inf"), float("-inf"), float("nan")], device=device)
    up = torch.linspace(-2, 2, gate.numel(), device=device)
    check(gate, up)
    check(gate.bfloat16(), up.bfloat16())


def test_packed_halves_are_read_in_place(device):
    """gate and up as the two halves of one [..., 2 * dim] projection."""
    gate, up = make_inputs((2, 9, 64), torch.float32, device, seed=1)
    packed = torch.cat([gate, up], dim=-1)
    check(*packed.split(64, dim=-1))
    # Strides that cannot merge into one row stride are copied first.
    check(gate.transpose(0, 1), up.transpose(0, 1))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 20), dim=st.integers(1, 300), scale=st.floats(0.1, 30.0),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes_cpu(rows, dim, scale, seed):
    gate, up = make_inputs((rows, dim), torch.float32, "cpu", seed, scale)
    check(gate, up)
    check(gate.bfloat16(), up.bfloat16())


def test_inputs_not_modified(device):
    gate, up = make_inputs((3, 100), torch.bfloat16, device, seed=3)
    before = (gate.clone(), up.clone())
    llada.silu_mul(gate, up)
    assert torch.equal(before[0], gate) and torch.equal(before[1], up)


def test_opcheck(device):
    gate, up = make_inputs((3, 4, 64), torch.float32, device, seed=4)
    torch.library.opcheck(torch.ops.llada.silu_mul.default, (gate, up))
    torch.library.opcheck(torch.ops.llada.silu_mul.default, (gate.bfloat16(), up.bfloat16()))


def test_bad_input(device):
    gate, up = make_inputs((3, 64), torch.float32, device, seed=5)
    with pytest.raises(TypeError, match="gate: expected dtype"):
        llada.silu_mul(gate.double(), up.double())
    if device == "cpu":
        with pytest.raises(TypeError, match="gate: expected dtype float32 or bfloat16"):
            llada.silu_mul(gate.half(), up.half())
    with pytest.raises(TypeError, match="up: expected dtype"):
        llada.silu_mul(gate, up.bfloat16())
    with pytest.raises(ValueError, match=r"up: expected the shape of gate \[3, 64\]"):
        llada.silu_mul(gate, up[:, :63])
    with pytest.raises(ValueError, match="gate: expected at least one dimension"):
        llada.silu_mul(gate[0, 0], up[0, 0])
    with pytest.raises(TypeError, match="up"):
        llada.silu_mul(gate, up.tolist())
    if device == "cuda":
        with pytest.raises(ValueError, match="up: expected to be on the device of gate"):
            llada.silu_mul(gate, up.cpu())


def test_model_mlp_uses_it_and_keeps_gradients(device, monkeypatch):
    """The model's MLP goes through silu_mul in inference and through the
    differentiable composition when a gradient is needed."""
    from llada.model import silu_mul

    calls, fused = [], llada.ops.silu_mul
    monkeypatch.setattr(llada.model.ops, "silu_mul", lambda *a: calls.append(a[0].shape) or fused(*a))
    gate, up = make_inputs((2, 7, 96), torch.float32, device, seed=6)
    with torch.no_grad():
        inference = silu_mul(gate, up)
    assert calls == [gate.shape]
    gg = gate.clone().requires_grad_(True)
    trained = silu_mul(gg, up)
    trained.sum().backward()
    assert calls == [gate.shape], "the training path must keep the differentiable composition"
    torch.testing.assert_close(inference, trained.detach(), rtol=4e-7, atol=1e-37)
    assert gg.grad is not None
