"""rope against its reference (the torch composition the checkpoint's code
uses), on CPU and CUDA: every implementation computes each product and sum
in float32 on its own, so the results must be bit-identical."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llada
from llada.model import apply_rope, rope_tables
from llada.ops import rope_reference

from conftest import assert_new_tensor_like, poison_allocator

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}


def make_inputs(b, l, h, d, dtype, device, per_row=False, seed=0):
    """x ~ N(0, 4); the tables of LLaDA's RoPE at scattered positions (as a
    cached block or gathered rows see them), one set per batch row or shared."""
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(b, l, h, d, generator=gen)
    positions = torch.randint(0, 4096, (b if per_row else 1, l), generator=gen)
    cos, sin = rope_tables(positions.reshape(-1), d, 500000.0)
    shape = (b if per_row else 1, l, d)
    return x.to(device=device, dtype=dtype), cos.reshape(shape).to(device), sin.reshape(shape).to(device)


def check(x, cos, sin):
    poison_allocator(x.device.type, [x.numel() * x.element_size() * 2])
    got = llada.rope(x, cos, sin)
    want = rope_reference(x, cos, sin)
    assert_new_tensor_like(got, x)
    assert torch.equal(got, want), f"max difference {(got.float() - want.float()).abs().max().item():.3g}"


SHAPES = [(1, 1, 1, 2), (2, 17, 4, 64), (3, 32, 32, 128), (1, 300, 2, 128), (2, 5, 3, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_matches_reference_bit_for_bit(device, dtype, shape, per_row):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    check(*make_inputs(*shape, dtype, device, per_row))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), l=st.integers(1, 40), h=st.integers(1, 5), half=st.integers(1, 70),
       per_row=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_cpu(b, l, h, half, per_row, seed):
    x, cos, sin = make_inputs(b, l, h, 2 * half, torch.float32, "cpu", per_row, seed)
    check(x, cos, sin)
    check(x.bfloat16(), cos, sin)


def test_strided_input(device):
    """q sliced out of a fused projection: not contiguous, read as it is."""
    x, cos, sin = make_inputs(2, 9, 4, 64, torch.float32, device, seed=1)
    wide = torch.randn(2, 9, 4, 192, device=device)
    wide[..., 64:128] = x
    check(wide[..., 64:128], cos, sin)
    # Every stride its own: heads outermost, then positions.
    check(x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3), cos, sin)
    # A non-contiguous head dimension is copied first, not misread.
    check(torch.randn(2, 9, 4, 64, 2, device=device)[..., 0], cos, sin)


def test_empty(device):
    x, cos, sin = make_inputs(2, 0, 4, 64, torch.float32, device)
    assert llada.rope(x, cos, sin).shape == (2, 0, 4, 64)


def test_inputs_not_modified(device):
    x, cos, sin = make_inputs(2, 7, 3, 64, torch.bfloat16, device, seed=2)
    before = [t.clone() for t in (x, cos, sin)]
    llada.rope(x, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, cos, sin)))


def test_opcheck(device):
    x, cos, sin = make_inputs(2, 5, 3, 64, torch.float32, device, seed=3)
    torch.library.opcheck(torch.ops.llada.rope.default, (x, cos, sin))
    torch.library.opcheck(torch.ops.llada.rope.default, (x.bfloat16(), cos.expand(2, 5, 64).contiguous(),
                                                         sin.expand(2, 5, 64).contiguous()))


def test_bad_input(device):
    x, cos, sin = make_inputs(2, 5, 3, 64, torch.float32, device, seed=4)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        llada.rope(x[0], cos, sin)
    with pytest.raises(TypeError, match="x: expected dtype"):
        llada.rope(x.double(), cos, sin)
    if device == "cpu":
        with pytest.raises(TypeError, match="x: expected dtype float32 or bfloat16"):
            llada.rope(x.half(), cos, sin)
    with pytest.raises(ValueError, match="x: expected an even head dim"):
        llada.rope(x[..., :63], cos[..., :63], sin[..., :63])
    with pytest.raises(TypeError, match="cos: expected dtype"):
        llada.rope(x, cos.double(), sin)
    with pytest.raises(TypeError, match="sin: expected dtype"):
        llada.rope(x, cos, sin.bfloat16())
    with pytest.raises(ValueError, match="cos: expected shape"):
        llada.rope(x, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="cos: expected shape"):
        llada.rope(x, cos.expand(3, 5, 64), sin.expand(3, 5, 64))
    with pytest.raises(ValueError, match="cos: expected a 3-D"):
        llada.rope(x, cos[0], sin[0])
    with pytest.raises(ValueError, match="sin: expected the shape of cos"):
        llada.rope(x, cos, sin.expand(2, 5, 64))
    with pytest.raises(TypeError, match="x"):
        llada.rope(x.tolist(), cos, sin)
    if device == "cuda":
        with pytest.raises(ValueError, match="cos: expected to be on the device of x"):
            llada.rope(x, cos.cpu(), sin)


def test_model_rope_uses_it_and_keeps_gradients(device, monkeypatch):
    """The model rotates through the fused op in inference and through the
    differentiable composition when a gradient is needed; the same bits."""
    calls, fused = [], llada.ops.rope

    def counting_rope(*args):
        calls.append(args[0].shape)
        return fused(*args)

    monkeypatch.setattr(llada.model.ops, "rope", counting_rope)
    x, cos, sin = make_inputs(2, 7, 3, 64, torch.float32, device, seed=5)
    with torch.no_grad():
        inference = apply_rope(x, cos, sin)
    assert calls == [x.shape]
    xg = x.clone().requires_grad_(True)
    trained = apply_rope(xg, cos, sin)
    trained.square().sum().backward()
    assert calls == [x.shape], "the training path must keep the differentiable composition"
    assert torch.equal(inference, trained.detach()) and xg.grad is not None
