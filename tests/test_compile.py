"""torch.compile: the model traces as one graph (the ops' fake kernels stand in
for the kernels), and a compiled model decodes with every policy, caches
included, as the eager one does."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import llada
from llada import linear as linear_module
from llada.model import KVCache
from llada.policies import DecodePolicy
from llada.train import default_model_path
from llada.workspace import _pools

from checkpoints import SHAPES, make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("compile"), seed=3, boost_stop_tokens=2.0, **SHAPES["gqa"])
    return llada.load_model(folder, dtype=torch.float32, device="cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo(one_thread):
    # Each test counts its own compilations, and none may quietly fall back
    # to eager after too many recompilations (a setting torch 2.6 lacks).
    config = torch._dynamo.config
    strict = {"fail_on_recompile_limit_hit": True} if hasattr(config, "fail_on_recompile_limit_hit") else {}
    torch._dynamo.reset()
    with config.patch(**strict):
        yield
    torch._dynamo.reset()


def _prompt(model, rows=1, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.mask_token_id, (rows, length), generator=g)


@torch.no_grad()
def test_forward_is_one_graph(model):
    ids = _prompt(model, rows=2, length=11)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for logits_at in (None, slice(4, 11)):
        want = model(ids, mask, logits_at=logits_at).logits
        got = compiled(ids, mask, logits_at=logits_at).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert counter.frame_count >= 1 and counter.op_count > 0


@torch.no_grad()
def test_cached_step_is_one_graph(model):
    """The forward a CUDA graph captures: a block fed at tensor positions,
    writing its keys and values into the cache in place (store_kv)."""
    ids = _prompt(model, length=12)
    positions = torch.arange(4, 8)
    caches = [KVCache(model.config, 1, 12, "cpu", torch.float32) for _ in range(2)]
    for cache in caches:
        model(ids, cache=cache)  # fill every position
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    block = ids[:, 4:8].flip(1)  # new tokens, so the cache must change
    want = model(block, cache=caches[0], positions=positions, logits_at=slice(0, 4)).logits
    got = compiled(block, cache=caches[1], positions=positions, logits_at=slice(0, 4)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (k0, v0), (k1, v1) in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(k1, k0, rtol=0, atol=0)
        torch.testing.assert_close(v1, v0, rtol=0, atol=0)
    assert counter.frame_count == 1


@torch.no_grad()
def test_bfloat16_cpu_products_trace(tmp_path, monkeypatch):
    """A 16-bit model on the CPU multiplies in float32 tiles (llada.linear),
    several tiles per weight here."""
    monkeypatch.setattr(linear_module, "_TILE_BYTES", 24 * 4 * 32)
    monkeypatch.setattr(linear_module, "_MIN_TILE_ROWS", 1)
    linear_module.set_cpu_matmul("float32")
    try:
        model = llada.load_model(make_checkpoint(tmp_path, seed=1, **SHAPES["gqa"]), dtype=torch.bfloat16,
                                 device="cpu")
        ids = _prompt(model, rows=2, length=9)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(ids).logits, model(ids).logits)
    finally:
        linear_module.set_cpu_matmul("auto")


@torch.no_grad()
def test_inductor_forward_matches_eager(model):
    ids = _prompt(model, rows=2, length=9, seed=1)
    compiled = torch.compile(model, fullgraph=True)  # inductor: generated code around the ops
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", [DecodePolicy(), DecodePolicy.fast(),
                                    DecodePolicy(commit="threshold", cache="prefix", threshold=0.5)],
                         ids=["exact", "dual", "prefix"])
def test_compiled_model_decodes_like_eager(model, policy):
    prompt = _prompt(model, rows=2, length=6, seed=2)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    args = dict(steps=8, gen_length=16, block_length=8, policy=policy)
    want = llada.generate(model, prompt, mask, **args)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    got, stats = llada.generate(compiled, prompt, mask, return_stats=True, **args)
    assert torch.equal(got, want)
    assert counter.frame_count >= 1  # the compiled forward ran
    assert stats.nfe > 0


def test_infill_and_likelihood_of_a_compiled_model(model):
    compiled = torch.compile(model, backend="aot_eager")
    canvas = _prompt(model, length=12, seed=4)[0]
    canvas[3:9] = model.config.mask_token_id
    args = dict(steps=6, block_length=6, policy=DecodePolicy(cache="dual"))
    assert torch.equal(llada.infill(compiled, canvas, **args), llada.infill(model, canvas, **args))
    prompt, answer = canvas[:3], _prompt(model, length=4, seed=5)[0]
    want = llada.log_likelihood(model, prompt, answer, mc_num=4, batch_size=4, seed=0)
    got = llada.log_likelihood(compiled, prompt, answer, mc_num=4, batch_size=4, seed=0)
    assert got == pytest.approx(want, rel=1e-6)


def test_engine_and_workspaces_take_a_compiled_model(model):
    compiled = torch.compile(model, backend="aot_eager")
    engine = llada.Engine(compiled, llada.load_tokenizer(default_model_path()))
    assert engine.model is compiled
    llada.generate(compiled, _prompt(model), steps=4, gen_length=8, block_length=4, policy=DecodePolicy.fast())
    assert _pools.get(model)  # the module's pool holds the decode's workspace
    llada.release_decode_workspace(compiled)
    assert model not in _pools


def test_other_wrappers_are_still_refused(model):
    with pytest.raises(ValueError, match="policy: cache='dual' needs a llada LLaDAModel"):
        llada.generate(torch.nn.Sequential(model), _prompt(model), steps=4, gen_length=4,
                       block_length=4, policy=DecodePolicy.fast())
    with pytest.raises(TypeError, match="model: expected a LLaDAModel"):
        llada.Engine(torch.nn.Sequential(model), None)
