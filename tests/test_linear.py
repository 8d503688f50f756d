"""CPU products with 16-bit weights in float32 tiles (llada.linear) against a
float64 reference, and the switch that picks them."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llada
from llada import linear as linear_module
from llada.linear import Linear, linear, set_cpu_matmul

from checkpoints import SHAPES, make_checkpoint
from conftest import poison_allocator


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 24 rows, so that small weights span several (and a last, partial one)."""
    monkeypatch.setattr(linear_module, "_TILE_BYTES", 24 * 4 * 40)
    monkeypatch.setattr(linear_module, "_MIN_TILE_ROWS", 1)


@pytest.fixture
def products(monkeypatch):
    """Records (input dtype, weight dtype, weight shape) of each F.linear call
    that llada.linear makes, so a test can tell which path ran: the results
    alone agree either way."""
    calls = []
    torch_linear = F.linear

    def recording(x, weight, *args, **kwargs):
        calls.append((x.dtype, weight.dtype, tuple(weight.shape)))
        return torch_linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(linear_module.F, "linear", recording)
    yield calls


@pytest.fixture
def mode():
    yield set_cpu_matmul
    set_cpu_matmul("auto")


def _error(got, x, w):
    want = x.double() @ w.double().T
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 40), (7, 40), (2, 5, 40)], ids=["one-row", "rows", "batched"])
def test_float32_tiles_against_float64(small_tiles, mode, products, dtype, shape):
    mode("float32")
    g = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(83, 40, generator=g).to(dtype)  # 3 full tiles and a partial one
    poison_allocator("cpu", [2 * x.numel() * 83 * 4])
    got = linear(x, w)
    # The tiled path ran: one float32 product per 24-row tile of the weight.
    tile = (torch.float32, torch.float32)
    assert products == [(*tile, (24, 40))] * 3 + [(*tile, (11, 40))]
    products.clear()
    assert got.shape == (*shape[:-1], 83) and got.dtype == dtype
    # Each element is the float32 sum rounded once: within half a 16-bit ulp
    # of the exact product, plus float32 rounding.
    want = x.double() @ w.double().T
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    assert ((got.double() - want).abs() <= want.abs() * ulp / 2 * 1.01 + 1e-5).all()
    # And no worse than torch's own 16-bit product.
    assert _error(got, x, w) <= 2 * _error(F.linear(x, w), x, w) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_mode_is_one_16_bit_product(small_tiles, mode, products, dtype):
    mode("native")
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 40, generator=g).to(dtype), torch.randn(83, 40, generator=g).to(dtype)
    got = linear(x, w)
    assert products == [(dtype, dtype, (83, 40))]
    assert torch.equal(got, F.linear(x, w))


def test_native_and_float32_weights_are_torch_products(mode):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 16, generator=g).bfloat16(), torch.randn(8, 16, generator=g).bfloat16()
    mode("native")
    assert torch.equal(linear(x, w), F.linear(x, w))
    mode("float32")
    x32, w32 = x.float(), w.float()
    assert torch.equal(linear(x32, w32), F.linear(x32, w32))  # float32 weights: torch's product


def test_gradients_take_torch_product(small_tiles, mode, products):
    mode("float32")
    layer = Linear(40, 83).bfloat16()
    x = torch.randn(4, 40).bfloat16().requires_grad_()
    y = layer(x)
    # The tiles' values would pass assert_close below too: what must hold is
    # one bfloat16 product, which autograd differentiates as torch's own.
    assert products == [(torch.bfloat16, torch.bfloat16, (83, 40))]
    layer(x.detach())  # the weight alone asking for gradients is enough
    assert products[1:] == [(torch.bfloat16, torch.bfloat16, (83, 40))]
    with torch.no_grad():  # and without grad the same call tiles again
        layer(x)
    assert len(products) == 2 + 4 and all(call[:2] == (torch.float32,) * 2 for call in products[2:])
    y.float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    torch.testing.assert_close(y, F.linear(x, layer.weight))


def test_empty_shapes_match_torch(mode):
    mode("float32")
    for x_shape, w_shape in [((2, 3, 0), (4, 0)), ((0, 5), (4, 5)), ((2, 5), (0, 5))]:
        x, w = torch.randn(x_shape).bfloat16(), torch.randn(w_shape).bfloat16()
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=0, atol=0)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode: expected one of"):
        set_cpu_matmul("fast")
    run = subprocess.run([sys.executable, "-c", "import llada"], capture_output=True, text=True,
                         env={**os.environ, "LLADA_CPU_MATMUL": "fast"}, timeout=120)
    assert run.returncode != 0
    assert "LLADA_CPU_MATMUL: expected one of ('auto', 'float32', 'native'), got 'fast'" in run.stderr


@torch.no_grad()
def test_bfloat16_model_close_either_way(tmp_path, mode, small_tiles):
    folder = make_checkpoint(tmp_path, seed=2, **SHAPES["gqa"])
    model = llada.load_model(folder, dtype=torch.bfloat16, device="cpu")
    reference = llada.load_model(folder, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, model.config.mask_token_id, (2, 13), generator=torch.Generator().manual_seed(0))
    want = reference(ids).logits
    errors = {}
    for name in ("float32", "native"):
        mode(name)
        errors[name] = (model(ids).logits.double() - want).abs().max().item()
    assert errors["float32"] <= 2 * errors["native"] + 1e-3


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16], ids=["cast-bf16", "cast-fp16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["float32", "native", "auto"])
@torch.no_grad()
def test_cpu_autocast_gives_torch_product(small_tiles, mode, name, dtype, cast):
    """Under CPU autocast F.linear multiplies in autocast's dtype and returns
    it; llada.linear must give the same tensor, whatever its mode."""
    mode(name)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 40, generator=g).to(dtype), torch.randn(83, 40, generator=g).to(dtype)
    with torch.autocast("cpu", dtype=cast):
        got = linear(x, w)
    want = F.linear(x.to(cast), w.to(cast))  # what autocast does, spelled out
    assert got.dtype == cast
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float16_model_decodes_under_bfloat16_autocast(tmp_path, mode):
    """A float16 model under bfloat16 autocast, cached (fast) decoding: the
    float32 tiles must return autocast's dtype as torch's product does, or
    the cache writes mix float16 and bfloat16."""
    folder = make_checkpoint(tmp_path, seed=3, **SHAPES["gqa"])
    model = llada.load_model(folder, dtype=torch.float16, device="cpu")
    prompt = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for name in ("native", "float32"):
        mode(name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[name] = llada.generate(model, prompt, steps=4, gen_length=8, block_length=4,
                                           policy=llada.DecodePolicy.fast())
    assert torch.equal(outputs["float32"], outputs["native"])


@pytest.mark.parametrize("name", ["float32", "native"])
def test_output_on_the_input_device_whatever_the_default(small_tiles, mode, name):
    mode(name)
    x, w = torch.randn(3, 40).bfloat16(), torch.randn(83, 40).bfloat16()
    want = linear(x, w)
    with torch.device("meta"):
        got = linear(x, w)
    assert got.device == torch.device("cpu")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
