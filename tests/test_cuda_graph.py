"""The cached step as a CUDA graph: the positions-tensor forward it captures
equals the eager one, a replay equals an eager step at any block, and
decoding with graphs gives the tokens of decoding without."""

import pytest
import torch

import llada
from llada.cuda_graph import CachedStepGraph
from llada.model import KVCache
from llada.policies import DecodePolicy

from checkpoints import TINY, make_checkpoint

_NO_GPU = "no CUDA GPU present" if not torch.cuda.is_available() else None
_NO_KERNELS = "llada was built without CUDA kernels" if not llada.cuda_kernels_available() else None
needs_cuda = pytest.mark.skipif(bool(_NO_GPU or _NO_KERNELS), reason=_NO_GPU or _NO_KERNELS or "")

# Head dim 64 and grouped heads, so the fused attention op runs inside the graph.
SHAPE = dict(TINY, d_model=128, n_heads=2, n_kv_heads=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("graph"), seed=3, boost_stop_tokens=1.0, **SHAPE)


def filled_cache(model, ids, mask):
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], ids.device, model.dtype)
    model(ids, mask, cache=cache)
    return cache


def test_positions_tensor_equals_start(folder):
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 24))
    cache = filled_cache(model, ids, None)
    by_start = model(ids[:, 8:16], cache=cache, start=8).logits
    by_tensor = model(ids[:, 8:16], cache=cache, positions=torch.arange(8, 16)).logits
    assert torch.equal(by_start, by_tensor)


def test_bad_positions_are_named(folder):
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 12))
    cache = filled_cache(model, ids, None)
    with pytest.raises(ValueError, match="positions"):
        model(ids[:, :4], cache=cache, positions=torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="positions"):
        model(ids[:, :4], cache=cache, positions=torch.arange(5))
    with pytest.raises(ValueError, match="start"):
        model(ids[:, 4:8], cache=cache, start=4, positions=torch.arange(4, 8))
    with pytest.raises(ValueError, match="positions"):
        model(ids[:, :4], positions=torch.arange(4))


def test_cuda_graph_flag_is_ignored_on_cpu(folder):
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    prompt = torch.randint(0, 256, (2, 6))
    kw = dict(steps=8, gen_length=16, block_length=8)
    eager = llada.generate(model, prompt, None, **kw, policy=DecodePolicy(cache="dual", cuda_graph=False))
    graphed = llada.generate(model, prompt, None, **kw, policy=DecodePolicy(cache="dual"))
    assert torch.equal(eager, graphed)
    with pytest.raises(TypeError, match="cuda_graph"):
        DecodePolicy(cuda_graph="yes")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_equals_the_eager_step_at_every_block(folder, dtype):
    model = llada.load_model(folder, device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 32), generator=g).cuda()
    mask = torch.ones(2, 32, dtype=torch.bool, device="cuda")
    mask[1, :5] = False  # a left-padded row
    cache = filled_cache(model, ids, mask)
    graph = None
    for start in (8, 16, 24):
        block = torch.randint(0, 256, (2, 8), generator=g).cuda()
        if graph is None:
            graph = CachedStepGraph(model, cache, mask, block, start)
        replayed = graph(mask, block, start).clone()
        # The eager step writes the same keys and values the replay wrote.
        eager = model(block, mask, cache=cache, start=start).logits
        assert torch.equal(replayed, eager), start


def padded_prompts(seed, row, pad):
    """Three random prompts of 7 tokens on CUDA; ``row`` has ``pad`` left pads."""
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(seed)).cuda()
    mask = torch.ones_like(prompt)
    mask[row, :pad] = 0
    return prompt, mask


@needs_cuda
def test_decoding_with_graphs_gives_the_same_tokens(folder):
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(2, row=1, pad=3)
    kw = dict(steps=16, gen_length=32, block_length=8, return_stats=True)
    for policy in (DecodePolicy(cache="dual"), DecodePolicy.fast(), DecodePolicy.fast(early_stop=True)):
        assert policy.cuda_graph  # the default
        eager, eager_stats = llada.generate(
            model, prompt, mask, **kw, policy=DecodePolicy(**{**policy.__dict__, "cuda_graph": False})
        )
        graphed, graphed_stats = llada.generate(model, prompt, mask, **kw, policy=policy)
        assert torch.equal(eager, graphed), policy
        assert eager_stats.nfe == graphed_stats.nfe


@needs_cuda
def test_whole_block_steps_on_cuda_decide_as_queried_row_steps(folder, monkeypatch):
    # On CUDA, cached dual-cache steps take the whole block's logits (with or
    # without graphs); steps over the queried rows only must agree.
    from llada import sampler

    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(3, row=2, pad=2)
    kw = dict(steps=16, gen_length=32, block_length=8, return_stats=True)
    policies = (DecodePolicy(cache="dual"), DecodePolicy.fast(),
                DecodePolicy(commit="factor", cache="dual", cuda_graph=False))
    whole = [llada.generate(model, prompt, mask, **kw, policy=p) for p in policies]
    monkeypatch.setattr(sampler._Forward, "_whole_block_wanted", staticmethod(lambda canvas: False))
    for policy, (want, want_stats) in zip(policies, whole):
        got, got_stats = llada.generate(model, prompt, mask, **kw, policy=policy)
        assert torch.equal(got, want), policy
        assert got_stats == want_stats
