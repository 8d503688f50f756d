"""rope against its reference (the torch composition the checkpoint's code
uses), on CPU and CUDA: every implementation computes each product and sum
in float32 on its own, so the results must be bit-identical."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llada
from llada.model import apply_rope, rope_tables
from llada.ops import rope_reference, store_kv_reference

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


# store_kv: keys rotated into a cache, values copied beside them, one pass.


def make_store_inputs(b, l, h, d, total, dtype, device, per_row=False, seed=0, packed=True):
    """k and v as slices of one packed projection ([B, L, 3 * H * D], as the
    model's q/k/v GEMM leaves them) or contiguous; caches full of other
    values; l distinct positions scattered over the total."""
    x, cos, sin = make_inputs(b, l, h, d, dtype, device, per_row, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if packed:
        qkv = torch.randn(b, l, 3 * h * d, generator=gen).to(device=device, dtype=dtype)
        qkv[..., h * d:2 * h * d] = x.reshape(b, l, h * d)
        k = qkv[..., h * d:2 * h * d].view(b, l, h, d)
        v = qkv[..., 2 * h * d:].view(b, l, h, d)
    else:
        k, v = x, torch.randn(b, l, h, d, generator=gen).to(device=device, dtype=dtype)
    cache_k = torch.randn(b, total, h, d, generator=gen).to(device=device, dtype=dtype)
    cache_v = torch.randn(b, total, h, d, generator=gen).to(device=device, dtype=dtype)
    positions = torch.randperm(total, generator=gen)[:l].to(device)
    return k, v, cos, sin, cache_k, cache_v, positions


def check_store(k, v, cos, sin, cache_k, cache_v, positions):
    want_k, want_v = cache_k.clone(), cache_v.clone()
    store_kv_reference(k, v, cos, sin, want_k, want_v, positions)
    before = [t.clone() for t in (k, v, cos, sin, positions)]
    assert llada.store_kv(k, v, cos, sin, cache_k, cache_v, positions) is None
    assert torch.equal(cache_k, want_k), f"keys differ by {(cache_k.float() - want_k.float()).abs().max():.3g}"
    assert torch.equal(cache_v, want_v), "values differ"
    assert all(torch.equal(a, b) for a, b in zip(before, (k, v, cos, sin, positions)))


@pytest.mark.parametrize("shape", [(1, 32, 8, 128, 300), (2, 17, 4, 64, 17), (3, 5, 3, 6, 40), (2, 0, 4, 64, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("packed", [False, True], ids=["contiguous", "packed"])
def test_store_kv_matches_reference_bit_for_bit(device, dtype, shape, per_row, packed):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    check_store(*make_store_inputs(*shape, dtype, device, per_row, seed=sum(shape), packed=packed))


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), l=st.integers(1, 20), extra=st.integers(0, 20), h=st.integers(1, 4),
       half=st.integers(1, 40), per_row=st.booleans(), packed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_store_kv_random_shapes_cpu(b, l, extra, h, half, per_row, packed, seed):
    for dtype in (torch.float32, torch.bfloat16):
        check_store(*make_store_inputs(b, l, h, 2 * half, l + extra, dtype, "cpu", per_row, seed, packed))


def test_store_kv_opcheck(device):
    args = make_store_inputs(2, 5, 3, 64, 11, torch.float32, device, seed=3, packed=False)
    torch.library.opcheck(torch.ops.llada.store_kv.default, args)


def test_store_kv_bad_input(device):
    k, v, cos, sin, ck, cv, pos = make_store_inputs(2, 5, 3, 64, 11, torch.float32, device, seed=4)
    with pytest.raises(ValueError, match="k: expected a 4-D"):
        llada.store_kv(k[0], v[0], cos, sin, ck, cv, pos)
    with pytest.raises(ValueError, match="v: expected the shape of k"):
        llada.store_kv(k, v[:, :4], cos, sin, ck, cv, pos)
    with pytest.raises(TypeError, match="v: expected dtype"):
        llada.store_kv(k, v.bfloat16(), cos, sin, ck, cv, pos)
    with pytest.raises(TypeError, match="cache_k: expected dtype"):
        llada.store_kv(k, v, cos, sin, ck.bfloat16(), cv, pos)
    with pytest.raises(ValueError, match=r"cache_k: expected shape \[2, T, 3, 64\]"):
        llada.store_kv(k, v, cos, sin, ck[:, :, :2], cv, pos)
    with pytest.raises(ValueError, match="cache_v: expected a contiguous tensor"):
        llada.store_kv(k, v, cos, sin, ck, cv.transpose(0, 1).contiguous().transpose(0, 1), pos)
    with pytest.raises(ValueError, match="cache_v: expected the shape of cache_k"):
        llada.store_kv(k, v, cos, sin, ck, cv[:, :10].contiguous(), pos)
    with pytest.raises(ValueError, match="cache_v: must be another tensor"):
        llada.store_kv(k, v, cos, sin, ck, ck, pos)
    with pytest.raises(TypeError, match="positions: expected dtype"):
        llada.store_kv(k, v, cos, sin, ck, cv, pos.int())
    with pytest.raises(ValueError, match="positions: expected 5 entries"):
        llada.store_kv(k, v, cos, sin, ck, cv, pos[:4])
    with pytest.raises(ValueError, match="cos: expected shape"):
        llada.store_kv(k, v, cos[:, :4], sin[:, :4], ck, cv, pos)
    with pytest.raises(TypeError, match="positions"):
        llada.store_kv(k, v, cos, sin, ck, cv, pos.tolist())
    if device == "cpu":
        before = (ck.clone(), cv.clone())
        for bad in (11, -1):
            with pytest.raises(ValueError, match=f"positions: entry 2 is {bad}, outside the caches' 11"):
                llada.store_kv(k, v, cos, sin, ck, cv, torch.tensor([0, 1, bad, 3, 4]))
        assert torch.equal(ck, before[0]) and torch.equal(cv, before[1]), "a refused call wrote"
    else:
        with pytest.raises(ValueError, match="positions: expected to be on the device of k"):
            llada.store_kv(k, v, cos, sin, ck, cv, pos.cpu())


def test_model_stores_its_cache_through_it(device, monkeypatch, tmp_path):
    """A cached forward writes each layer's keys and values with one store_kv
    call, and gives the logits of the uncached forward."""
    from checkpoints import make_checkpoint
    from llada.model import KVCache

    calls, fused = [], llada.ops.store_kv
    monkeypatch.setattr(llada.model.ops, "store_kv", lambda *a: calls.append(a[0].shape) or fused(*a))
    model = llada.load_model(make_checkpoint(tmp_path, seed=2), device=device, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    cache = KVCache(model.config, 2, 12, device, torch.float32)
    with torch.no_grad():
        full = model(ids).logits
        model(ids, cache=cache)
        part = model(ids[:, 4:9], cache=cache, start=4).logits
    torch.testing.assert_close(part, full[:, 4:9], rtol=1e-5, atol=1e-5)
    n_layers = model.config.n_layers
    assert [s[1] for s in calls] == [12] * n_layers + [5] * n_layers


def test_store_kv_refuses_inputs_sharing_memory_with_the_caches(device):
    # The kernel writes the caches while it reads k and v, in an order of its
    # own: a k or v inside a cache would give a result that depends on it.
    k, v, cos, sin, ck, cv, pos = make_store_inputs(1, 4, 3, 64, 11, torch.float32, device, seed=5)
    before = (ck.clone(), cv.clone())
    with pytest.raises(ValueError, match=r"^k: shares memory with cache_k"):
        llada.store_kv(ck[:, 0:4], v, cos, sin, ck, cv, pos)
    with pytest.raises(ValueError, match=r"^v: shares memory with cache_v"):
        llada.store_kv(k, cv[:, 2:6], cos, sin, ck, cv, pos)
    with pytest.raises(ValueError, match=r"^cache_v: shares memory with cache_k"):
        llada.store_kv(k, v, cos, sin, ck[:, :10], ck[:, 1:], pos)
    assert torch.equal(ck, before[0]) and torch.equal(cv, before[1]), "a refused call wrote"


def test_store_kv_refuses_strided_views_of_the_caches(device):
    # With two rows a slice of a cache is no longer dense, which torch's own
    # overlap test gives up on; such a k or v is still inside the cache.
    k, v, cos, sin, ck, cv, pos = make_store_inputs(2, 4, 3, 64, 11, torch.float32, device, seed=5)
    before = (ck.clone(), cv.clone())
    with pytest.raises(ValueError, match=r"^k: shares memory with cache_k"):
        llada.store_kv(ck[:, 0:4], v, cos, sin, ck, cv, pos)
    with pytest.raises(ValueError, match=r"^v: shares memory with cache_v"):
        llada.store_kv(k, cv[:, 7:], cos, sin, ck, cv, pos)
    with pytest.raises(ValueError, match=r"^v: shares memory with cache_k"):
        llada.store_kv(k, ck[:, 7:], cos, sin, ck, cv, pos)
    # The rotation tables too: a float32 cache's slice is a table's shape.
    with pytest.raises(ValueError, match=r"^cos: shares memory with cache_k"):
        llada.store_kv(k, v, ck[:1, :4, 0], sin, ck, cv, pos)
    with pytest.raises(ValueError, match=r"^sin: shares memory with cache_v"):
        llada.store_kv(k, v, cos, cv[:1, 2:6, 1], ck, cv, pos)
    assert torch.equal(ck, before[0]) and torch.equal(cv, before[1]), "a refused call wrote"
    # Strided views of another tensor in the same storage are fine.
    packed = torch.randn(2, 4, 2, 3, 64, device=device)
    llada.store_kv(packed[:, :, 0], packed[:, :, 1], cos, sin, ck, cv, pos)
    want = (before[0].clone(), before[1].clone())
    llada.ops.store_kv_reference(packed[:, :, 0], packed[:, :, 1], cos, sin, *want, pos)
    torch.testing.assert_close((ck, cv), want, rtol=0, atol=0)


def test_rope_shape_error_for_one_row(device):
    x = torch.randn(1, 3, 2, 8, device=device)
    cos = torch.ones(1, 4, 8, device=device)
    with pytest.raises(ValueError, match=r"cos: expected shape \[1, 3, 8\]"):
        llada.rope(x, cos, cos)
