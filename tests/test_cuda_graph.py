"""The cached step as a CUDA graph: the positions-tensor forward it captures
equals the eager one, a replay equals an eager step at any block (a prefix
step's too, with the block's logits only), and decoding with graphs gives
the tokens of decoding without, also when a later call replays the graphs an
earlier call captured; on the CPU, an eager stand-in for the graph runs the
sampler's side of it."""

import gc
import types
import weakref
from dataclasses import replace

import pytest
import torch

import llada
from llada import workspace as workspaces
from llada.cuda_graph import CachedStepGraph
from llada.model import KVCache
from llada.policies import DecodePolicy
from llada.sampler import BlockEvent, StepEvent

from checkpoints import TINY, make_checkpoint
from conftest import needs_cuda

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


@needs_cuda
def test_replay_of_a_prefix_step_equals_the_eager_step(folder):
    # A prefix-cache step feeds the block and everything after it, and takes
    # the logits of the block only.
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (2, 40), generator=g).cuda()
    mask = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    mask[0, :3] = False
    cache = filled_cache(model, ids, mask)
    fed = ids[:, 16:].clone()
    fed[:, :8] = torch.randint(0, 256, (2, 8), generator=g).cuda()
    graph = CachedStepGraph(model, cache, mask, fed, 16, 8)
    replayed = graph(mask, fed, 16).clone()
    assert replayed.shape == (2, 8, model.config.embedding_size)
    eager = model(fed, mask, logits_at=slice(0, 8), cache=cache, start=16).logits
    assert torch.equal(replayed, eager)
    assert graph.fits(cache, mask, fed, 8) and not graph.fits(cache, mask, fed, 24)


def test_a_graph_takes_logits_of_1_to_w_positions(folder):
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 12))
    cache = filled_cache(model, ids, None)
    for width in (0, 9):
        with pytest.raises(ValueError, match="logits_width"):
            CachedStepGraph(model, cache, None, ids[:, 4:], 4, width)


def padded_prompts(seed, row, pad, device="cuda"):
    """Three random prompts of 7 tokens; ``row`` has ``pad`` left pads."""
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(seed)).to(device)
    mask = torch.ones_like(prompt)
    mask[row, :pad] = 0
    return prompt, mask


@needs_cuda
def test_decoding_with_graphs_gives_the_same_tokens(folder, graphs):
    # (Rows ending early, which changes the graphs' batch, are tested below.)
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(2, row=1, pad=3)
    kw = dict(steps=16, gen_length=32, block_length=8, return_stats=True)
    for policy in (DecodePolicy(cache="dual"), DecodePolicy.fast(), DecodePolicy(cache="prefix"),
                   DecodePolicy.fast(cache="prefix")):
        assert policy.cuda_graph  # the default
        eager, eager_stats = llada.generate(model, prompt, mask, **kw, policy=replace(policy, cuda_graph=False))
        graphs["replayed"].clear()
        graphed, graphed_stats = llada.generate(model, prompt, mask, **kw, policy=policy)
        assert graphs["replayed"], policy
        assert torch.equal(eager, graphed), policy
        assert eager_stats.nfe == graphed_stats.nfe


@needs_cuda
def test_whole_block_steps_on_cuda_decide_as_queried_row_steps(folder, monkeypatch):
    # On CUDA, every step at temperature 0 takes the whole block's logits
    # (with any cache or none; with or without graphs); steps over the
    # queried rows only must agree.
    from llada import sampler

    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(3, row=2, pad=2)
    kw = dict(steps=16, gen_length=32, block_length=8, return_stats=True)
    policies = (DecodePolicy(), DecodePolicy(cache="prefix"), DecodePolicy(cache="dual"), DecodePolicy.fast(),
                DecodePolicy(commit="factor", cache="dual", cuda_graph=False))
    whole = [llada.generate(model, prompt, mask, **kw, policy=p) for p in policies]
    monkeypatch.setattr(sampler._Forward, "_whole_block_wanted", staticmethod(lambda canvas: False))
    for policy, (want, want_stats) in zip(policies, whole):
        got, got_stats = llada.generate(model, prompt, mask, **kw, policy=policy)
        assert torch.equal(got, want), policy
        assert got_stats == want_stats


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """Without a GPU, a stand-in for the graph runs its forward eagerly at
    each "replay" (into the same output buffer), so the sampler's side of
    graphed steps runs on the CPU: what each graph is fed, which of its
    logits a step takes, which graphs are kept for the next call. Returns
    the list of stand-ins made; decoding uses them once ``enable()`` is called."""
    from llada import sampler

    made = []

    class EagerStandIn(CachedStepGraph):
        def _capture(self, model, pool):
            self.logits = self._forward(model)  # the warm-up: it writes the step's keys and values
            self.graph = types.SimpleNamespace(replay=lambda: self.logits.copy_(self._forward(model)))
            made.append(self)

    def enable():
        monkeypatch.setattr(workspaces, "CachedStepGraph", EagerStandIn)
        monkeypatch.setattr(sampler._Forward, "_graphs_run_on", staticmethod(lambda ids: True))
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    return types.SimpleNamespace(made=made, enable=enable)


@pytest.mark.parametrize("whole_block", [False, True])
@pytest.mark.parametrize("policy", [DecodePolicy(cache="prefix"), DecodePolicy(cache="dual"),
                                    DecodePolicy.fast(cache="prefix", early_stop=True)],
                         ids=["prefix", "dual", "prefix-threshold-early-stop"])
def test_graphed_decoding_on_the_cpu_with_an_eager_stand_in(tmp_path, monkeypatch, stand_in_graphs, policy,
                                                             whole_block):
    from llada import sampler

    made = stand_in_graphs.made
    monkeypatch.setattr(sampler._Forward, "_whole_block_wanted", staticmethod(lambda canvas: whole_block))
    folder = make_checkpoint(tmp_path, seed=3, boost_stop_tokens=8.0, **SHAPE)
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    kw = dict(steps=16, gen_length=32, block_length=8, return_stats=True)
    want, want_stats = llada.generate(model, prompt, mask, **kw, policy=replace(policy, cuda_graph=False))
    stand_in_graphs.enable()
    for call in range(2):
        got, got_stats = llada.generate(model, prompt, mask, **kw, policy=policy)
        assert torch.equal(got, want) and got_stats == want_stats, call
        if call == 0:
            captured = len(made)
    assert len(made) == captured  # the second call replays the first call's graphs
    widths = sorted({g.ids.shape[1] for g in made})
    if policy.cache == "dual":
        assert widths == [8] and all(g.logits_width == 8 for g in made)
    elif not policy.early_stop:  # blocks at 7, 15, 23, 31 of 39 positions
        assert widths == [8, 16, 24, 32] and all(g.logits_width == 8 for g in made)


def decode_stopping_row_1(model, prompt, mask, policy):
    """Decodes 4 blocks of 8 with row 1 of 3 stopped by hand after the
    first block, so that the later blocks' steps feed 2 rows."""
    blocks = []
    for event in llada.stream(model, prompt, mask, steps=16, gen_length=32, block_length=8, policy=policy):
        if isinstance(event, BlockEvent):
            if event.block == 0:
                event.stop_rows(torch.tensor([False, True, False]))
            blocks.append(event.tokens)
    return torch.cat(blocks, 1)


ROW_LEAVING_POLICIES = {"dual": DecodePolicy(cache="dual"), "prefix": DecodePolicy(cache="prefix")}


def test_graphs_captured_under_inference_mode_serve_later_decodes(folder, device, stand_in_graphs, graphs):
    # A graph's inputs and output are copied into and read by later calls,
    # which may run outside inference mode.
    model = llada.load_model(folder, device=device, dtype=torch.float32)
    if device == "cpu":
        stand_in_graphs.enable()
    prompt, mask = padded_prompts(4, row=0, pad=2, device=device)
    kw = dict(steps=16, gen_length=32, block_length=8)
    want = llada.generate(model, prompt, mask, **kw, policy=DecodePolicy(cache="dual", cuda_graph=False))
    llada.release_decode_workspace(model)
    with torch.inference_mode():
        first = llada.generate(model, prompt, mask, **kw, policy=DecodePolicy(cache="dual"))
    made = list(stand_in_graphs.made if device == "cpu" else graphs["captured"])
    assert len(made) == 1
    got = llada.generate(model, prompt, mask, **kw, policy=DecodePolicy(cache="dual"))
    assert list(stand_in_graphs.made if device == "cpu" else graphs["captured"]) == made  # replayed
    assert torch.equal(first, want) and torch.equal(got, want)


@needs_cuda
def test_no_graphs_under_autocast(folder, graphs):
    # Autocast keeps its casts of the weights in a cache that a graph would
    # read by address after autocast dropped it: cached steps run eagerly.
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(4, row=0, pad=2)
    kw = dict(steps=16, gen_length=32, block_length=8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = llada.generate(model, prompt, mask, **kw, policy=DecodePolicy.fast())
    assert not (out == model.config.mask_token_id).any()
    assert graphs["captured"] == []
    llada.generate(model, prompt, mask, **kw, policy=DecodePolicy.fast())
    assert graphs["captured"]  # without autocast, the steps are graphed


@pytest.mark.parametrize("name", list(ROW_LEAVING_POLICIES))
def test_graphs_for_the_rows_left_on_the_cpu_with_an_eager_stand_in(folder, stand_in_graphs, name):
    policy = ROW_LEAVING_POLICIES[name]
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    want = decode_stopping_row_1(model, prompt, mask, replace(policy, cuda_graph=False))
    assert (want[1, 8:] == model.config.eos_token_id).all()
    stand_in_graphs.enable()
    assert torch.equal(decode_stopping_row_1(model, prompt, mask, policy), want)
    assert {g.ids.shape[0] for g in stand_in_graphs.made} == {3, 2}


@needs_cuda
@pytest.mark.parametrize("name", list(ROW_LEAVING_POLICIES))
def test_graphs_for_the_rows_left(folder, graphs, name):
    policy = ROW_LEAVING_POLICIES[name]
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(14, row=0, pad=2)
    want = decode_stopping_row_1(model, prompt, mask, replace(policy, cuda_graph=False))
    got = decode_stopping_row_1(model, prompt, mask, policy)
    assert torch.equal(got, want)
    assert {g.ids.shape[0] for g in graphs["replayed"]} == {3, 2}


SYNC_FREE_POLICIES = {
    "exact": DecodePolicy(),
    "prefix": DecodePolicy(cache="prefix"),
    "prefix-eager": DecodePolicy(cache="prefix", cuda_graph=False),
    "dual": DecodePolicy(cache="dual"),
    "dual-eager": DecodePolicy(cache="dual", cuda_graph=False),
}


@needs_cuda
@pytest.mark.parametrize("name", list(SYNC_FREE_POLICIES))
def test_steps_inside_a_block_never_wait_for_the_device(folder, name):
    # At temperature 0 under the fixed schedule the host reads results only
    # between blocks; inside one it queues step after step, so the device
    # never runs dry waiting for Python. Any synchronising call (a read-back,
    # a count, a blocking copy) in such a step raises here. (A block's end,
    # after its last step, reads back whether the logits were valid.)
    policy = SYNC_FREE_POLICIES[name]
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(4, row=1, pad=2)
    kw = dict(steps=16, gen_length=32, block_length=8, policy=policy)
    want = llada.generate(model, prompt, mask, **kw)  # also leaves its graphs for the next call
    events = llada.stream(model, prompt, mask, **kw)
    previous, checked = None, 0
    while True:
        inside_block = isinstance(previous, StepEvent) and previous.step % 4 != 3  # 4 steps per block
        torch.cuda.set_sync_debug_mode("error" if inside_block else "default")
        try:
            previous = next(events)
        except StopIteration:
            break
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked += inside_block
    assert checked == 12  # 4 blocks of 4 steps: after each but a block's last
    assert torch.equal(previous.tokens, want[:, -8:])


@pytest.fixture
def graphs(monkeypatch):
    """The graphs decoding captures, and the graph each replay runs."""
    log = dict(captured=[], replayed=[])

    class Logged(CachedStepGraph):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            log["captured"].append(self)

        def __call__(self, *args):
            log["replayed"].append(self)
            return super().__call__(*args)

    monkeypatch.setattr(workspaces, "CachedStepGraph", Logged)
    return log


@needs_cuda
def test_a_second_call_replays_the_first_calls_graph(folder, graphs):
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    kw = dict(steps=16, gen_length=32, block_length=8)
    first_prompt, first_mask = padded_prompts(4, row=0, pad=2)
    prompt, mask = padded_prompts(5, row=2, pad=4)  # the same shape, other tokens and padding
    for policy in (DecodePolicy(cache="dual"), DecodePolicy.fast()):
        llada.release_decode_workspace(model)
        want = llada.generate(model, prompt, mask, **kw, policy=replace(policy, cuda_graph=False))
        graphs["captured"].clear()
        graphs["replayed"].clear()
        first = llada.generate(model, first_prompt, first_mask, **kw, policy=policy)
        (graph,) = graphs["captured"]
        replays = len(graphs["replayed"])
        got = llada.generate(model, prompt, mask, **kw, policy=policy)
        assert graphs["captured"] == [graph]  # nothing captured again
        assert len(graphs["replayed"]) > replays and set(graphs["replayed"]) == {graph}
        assert torch.equal(got, want), policy
        assert not torch.equal(first[:, 7:], got[:, 7:])  # the answers too, not only the prompts


@needs_cuda
def test_replaced_weights_are_captured_again(folder, graphs):
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(6, row=1, pad=3)
    kw = dict(steps=16, gen_length=32, block_length=8)
    graphed, eager = DecodePolicy(cache="dual"), DecodePolicy(cache="dual", cuda_graph=False)
    before = llada.generate(model, prompt, mask, **kw, policy=graphed)
    (old,) = graphs["captured"]
    head = model.model.transformer["ff_out"]
    # Updated in place: the kept graph reads the new values.
    with torch.no_grad():
        head.weight.mul_(-1.0)
    want = llada.generate(model, prompt, mask, **kw, policy=eager)
    assert not torch.equal(want, before)  # the change shows in the tokens
    assert torch.equal(llada.generate(model, prompt, mask, **kw, policy=graphed), want)
    assert graphs["captured"] == [old]
    # Replaced: a graph replaying the old addresses would read freed memory.
    head.weight = torch.nn.Parameter(head.weight.detach() * -1.0)
    want = llada.generate(model, prompt, mask, **kw, policy=eager)
    assert torch.equal(llada.generate(model, prompt, mask, **kw, policy=graphed), want)
    assert len(graphs["captured"]) == 2 and graphs["captured"][1] is not old
    assert torch.equal(want, before)  # negated twice: the first weights again


@needs_cuda
def test_interleaved_streams_with_graphs(folder, graphs):
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    kw = dict(steps=16, gen_length=32, block_length=8, policy=DecodePolicy.fast())
    eager = dict(kw, policy=DecodePolicy.fast(cuda_graph=False))
    inputs = [padded_prompts(seed, row=seed % 3, pad=2) for seed in (7, 8)]
    want = [llada.generate(model, prompt, mask, **eager) for prompt, mask in inputs]
    llada.generate(model, *inputs[0], **kw)  # leaves a graph that either stream could take
    (kept,) = graphs["captured"]
    streams = [llada.stream(model, prompt, mask, **kw) for prompt, mask in inputs]
    canvases = [None, None]
    while streams[0] is not None or streams[1] is not None:  # one event of each in turn
        for i, it in enumerate(streams):
            event = None if it is None else next(it, None)
            if event is None:
                streams[i] = None
            elif isinstance(event, StepEvent):
                canvases[i] = event.canvas
    assert all(torch.equal(got, w) for got, w in zip(canvases, want))
    # The first stream took the kept graph; the second captured its own.
    assert len(graphs["captured"]) == 2 and set(graphs["replayed"]) == set(graphs["captured"])
    # A stream left mid-block gives its graph back in a state the next decode can use.
    it = llada.stream(model, *inputs[1], **kw)
    for _ in range(3):
        next(it)
    it.close()
    assert torch.equal(llada.generate(model, *inputs[1], **kw), want[1])
    assert len(graphs["captured"]) == 2


@needs_cuda
def test_kept_graphs_do_not_keep_the_model_alive(folder):
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(9, row=0, pad=1)
    llada.generate(model, prompt, mask, steps=16, gen_length=32, block_length=8, policy=DecodePolicy.fast())
    assert any(ws.graphs for ws in workspaces._pools.get(model, []))  # a graph is kept
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


@needs_cuda
def test_infill_keeps_a_graph_per_block_width(folder, graphs):
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    canvas = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(10)).cuda()
    canvas[:, 3:17] = model.config.mask_token_id  # 14 holes in blocks of 4: the last one 2 wide
    kw = dict(block_length=4, steps=8)
    want = llada.infill(model, canvas, **kw, policy=DecodePolicy.fast(cuda_graph=False))
    assert torch.equal(llada.infill(model, canvas, **kw, policy=DecodePolicy.fast()), want)
    assert sorted(g.ids.shape[1] for g in graphs["captured"]) == [2, 4]
    assert torch.equal(llada.infill(model, canvas, **kw, policy=DecodePolicy.fast()), want)
    assert len(graphs["captured"]) == 2


@needs_cuda
def test_prefix_cache_keeps_a_graph_per_block(folder, graphs):
    model = llada.load_model(folder, device="cuda", dtype=torch.float32)
    prompt, mask = padded_prompts(11, row=1, pad=2)
    kw = dict(steps=16, gen_length=32, block_length=8)
    want = llada.generate(model, prompt, mask, **kw, policy=DecodePolicy(cache="prefix", cuda_graph=False))
    assert torch.equal(llada.generate(model, prompt, mask, **kw, policy=DecodePolicy(cache="prefix")), want)
    # Blocks of 8 at 7, 15, 23 and 31 of 39 positions: each feeds itself and what follows.
    assert sorted(g.ids.shape[1] for g in graphs["captured"]) == [8, 16, 24, 32]
    assert all(g.logits_width == 8 for g in graphs["captured"])
    replays = len(graphs["replayed"])
    assert torch.equal(llada.generate(model, prompt, mask, **kw, policy=DecodePolicy(cache="prefix")), want)
    assert len(graphs["captured"]) == 4 and len(graphs["replayed"]) > replays
