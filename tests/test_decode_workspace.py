"""Decoding workspaces kept across calls: a cached decode reuses the key/value
cache that an earlier decode of the same shape left for the model, gives the
tokens a fresh cache gives, and never shares one with another decode running
at the same time. (On CUDA the captured graphs come with the cache: see
test_cuda_graph.py.)"""

import gc
import math
import weakref

import pytest
import torch

import llada
from llada import workspace as workspaces
from llada import sampler
from llada.policies import DecodePolicy
from llada.sampler import StepEvent

from checkpoints import SHAPES, make_checkpoint

KW = dict(steps=8, gen_length=16, block_length=8)
POLICIES = [DecodePolicy(cache="dual"), DecodePolicy.fast(threshold=0.5), DecodePolicy(cache="prefix")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("workspace"), seed=7, boost_stop_tokens=4.0, **SHAPES["gqa"])


@pytest.fixture
def model(folder):
    return llada.load_model(folder, dtype=torch.float32, device="cpu")


def prompts(model, seed, batch=3, padded=True):
    ids = torch.randint(0, 256, (batch, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        mask[batch - 1, :3] = 0
        ids[mask == 0] = model.config.pad_token_id
    return ids, mask


def pooled(model):
    return list(workspaces._pools.get(model, []))


def fresh(model, *args, **kw):
    """The reference: a decode with nothing kept from earlier calls."""
    llada.release_decode_workspace(model)
    out = llada.generate(model, *args, **kw)
    llada.release_decode_workspace(model)
    return out


@pytest.fixture
def held(monkeypatch):
    """The caches each decode (its _Forward) computes with, in call order;
    checks at every checkout that no other decode holds the same workspace."""
    held = {}
    hold = sampler._Forward._hold_workspace

    def spy(self, ids):
        workspace = hold(self, ids)
        for other in held:
            assert other is self or other.workspace is not workspace, "two decodes share a workspace"
        held.setdefault(self, []).append(workspace.cache)
        return workspace

    monkeypatch.setattr(sampler._Forward, "_hold_workspace", spy)
    return held


def caches_of(held):
    """The distinct caches of each decode, in order."""
    return [list({id(c): c for c in caches}.values()) for caches in held.values()]


def poison(cache):
    for k, v in cache.layers:
        k.fill_(math.nan)
        v.fill_(math.nan)


@pytest.mark.parametrize("policy", POLICIES, ids=["dual", "fast", "prefix"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0], ids=["plain", "guided"])
def test_a_second_call_reuses_the_cache_and_gives_the_same_tokens(model, held, policy, cfg_scale):
    prompt, mask = prompts(model, seed=1)
    want = fresh(model, prompt, mask, **KW, cfg_scale=cfg_scale, policy=policy)
    held.clear()
    other, _ = prompts(model, seed=2)
    llada.generate(model, other, mask, **KW, cfg_scale=cfg_scale, policy=policy)
    (first,) = pooled(model)
    # What a pooled cache holds never shows: the next decode rewrites it all.
    poison(first.cache)
    got = llada.generate(model, prompt, mask, **KW, cfg_scale=cfg_scale, policy=policy)
    assert torch.equal(got, want)
    [[a], [b]] = caches_of(held)
    assert a is b is first.cache
    assert a.batch == 3 * (2 if cfg_scale else 1)
    assert pooled(model) == [first]


def test_infill_reuses_the_cache(model, held):
    mask_id = model.config.mask_token_id
    canvas = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    canvas[:, 4:15] = mask_id  # 11 holes in blocks of 4: a narrower last block
    kw = dict(block_length=4, policy=DecodePolicy.fast(threshold=0.5))
    llada.release_decode_workspace(model)
    want = llada.infill(model, canvas, **kw)
    poison(pooled(model)[0].cache)
    assert torch.equal(llada.infill(model, canvas, **kw), want)
    [[a], [b]] = caches_of(held)
    assert a is b


def test_another_shape_gets_another_workspace(model, held):
    policy = DecodePolicy(cache="dual")
    prompt, mask = prompts(model, seed=4)
    llada.release_decode_workspace(model)
    llada.generate(model, prompt, mask, **KW, policy=policy)
    llada.generate(model, prompt[:2], mask[:2], **KW, policy=policy)  # fewer rows, no padding
    llada.generate(model, prompt[:2], None, **KW, policy=policy)  # the same shape
    llada.generate(model, prompt[:2], None, steps=12, gen_length=24, block_length=8, policy=policy)
    [[a], [b], [c], [d]] = caches_of(held)
    assert (a.batch, a.total) == (3, 23) and (b.batch, b.total) == (2, 23)
    assert b is c and d is not c and (d.batch, d.total) == (2, 31)
    # Padding or none is part of the key too: graphs differ with a key mask.
    padded = mask[:2].clone()
    padded[1, :2] = 0
    llada.generate(model, prompt[:2], padded, **KW, policy=policy)
    assert caches_of(held)[-1][0] is not b


def test_the_pool_stays_bounded(model, held):
    prompt, _ = prompts(model, seed=5, padded=False)
    policy = DecodePolicy(cache="dual")
    llada.release_decode_workspace(model)
    for gen_length in (8, 16, 24, 32):
        llada.generate(model, prompt, steps=gen_length // 2, gen_length=gen_length, block_length=8,
                       policy=policy)
        assert len(pooled(model)) <= 2
    assert [w.cache.total for w in pooled(model)] == [7 + 24, 7 + 32]  # the most recent
    kept = {id(w.cache) for w in pooled(model)}
    llada.generate(model, prompt, steps=16, gen_length=32, block_length=8, policy=policy)
    llada.generate(model, prompt, steps=4, gen_length=8, block_length=8, policy=policy)
    assert id(caches_of(held)[-2][0]) in kept and id(caches_of(held)[-1][0]) not in kept


def test_interleaved_streams_never_share_a_workspace(model, held):
    policy = DecodePolicy.fast(threshold=0.5)
    (p1, m1), (p2, m2), (p3, m3) = (prompts(model, seed=s) for s in (6, 7, 8))
    want = [fresh(model, p, m, **KW, policy=policy) for p, m in ((p1, m1), (p2, m2), (p3, m3))]
    held.clear()
    # Warm the pool, so that both streams could take the kept workspace.
    llada.generate(model, p1, m1, **KW, policy=policy)
    live = {0: llada.stream(model, p1, m1, **KW, policy=policy),
            1: llada.stream(model, p2, m2, **KW, policy=policy)}
    last, inner, turn = {}, None, 0
    while live:  # one event of each in turn
        for name, it in list(live.items()):
            event = next(it, None)
            if event is None:
                del live[name]
            elif isinstance(event, StepEvent):
                last[name] = event.canvas  # live: the result once the stream ends
        turn += 1
        if turn == 3:  # and a decode started inside the streaming loop
            inner = llada.generate(model, p3, m3, **KW, policy=policy)
    assert torch.equal(last[0], want[0]) and torch.equal(last[1], want[1])
    assert torch.equal(inner, want[2])
    warm, in_a, in_b, in_inner = caches_of(held)
    assert in_a == warm  # the first stream took the kept one
    assert len({id(c) for c in in_a + in_b + in_inner}) == 3
    assert len(pooled(model)) == 2


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_stream_left_mid_way_gives_its_workspace_back(model, held, how):
    policy = DecodePolicy(cache="dual")
    prompt, mask = prompts(model, seed=9)
    want = fresh(model, prompt, mask, **KW, policy=policy)
    it = llada.stream(model, prompt, mask, **KW, policy=policy)
    assert isinstance(next(it), StepEvent)
    assert pooled(model) == []  # held by the stream
    if how == "close":
        it.close()
    else:
        del it
        gc.collect()
    (kept,) = pooled(model)
    assert torch.equal(llada.generate(model, prompt, mask, **KW, policy=policy), want)
    assert caches_of(held)[-1] == [kept.cache]


def test_a_failed_decode_gives_its_workspace_back(model):
    policy = DecodePolicy(cache="dual")
    prompt, mask = prompts(model, seed=10)
    llada.release_decode_workspace(model)

    def fail(step, steps, canvas):
        raise KeyError("stop")

    with pytest.raises(KeyError):
        llada.generate(model, prompt, mask, **KW, policy=policy, on_step=fail)
    assert len(pooled(model)) == 1


@pytest.fixture(scope="module")
def stop_folder(tmp_path_factory):
    """A checkpoint whose head favours EOS: with early stop, rows end after
    different blocks (see rows_leave)."""
    return make_checkpoint(tmp_path_factory.mktemp("stop"), seed=5, boost_stop_tokens=8.0, **SHAPES["gqa"])


def rows_leave(model):
    """A decode of four rows, some of which end before the others."""
    prompt = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(0))
    policy = DecodePolicy(commit="threshold", threshold=0.3, early_stop=True, cache="dual")
    return llada.generate(model, prompt, steps=24, gen_length=24, block_length=8, return_stats=True,
                          policy=policy)


def test_rows_leaving_the_batch_reuse_what_they_can(stop_folder, held):
    # Early stop: rows that end leave the batch, so a decode moves to smaller
    # workspaces; a repeat gives the same tokens and forwards, and reuses the
    # two kept (the full batch's and the last one).
    model = llada.load_model(stop_folder, dtype=torch.float32, device="cpu")
    want, want_stats = rows_leave(model)
    (first,) = caches_of(held)
    assert first[0].batch == 4 and len(first) > 1  # rows did leave
    got, got_stats = rows_leave(model)
    assert torch.equal(got, want) and got_stats == want_stats
    _, second = caches_of(held)
    assert second[0] is first[0] and second[-1] is first[-1]
    assert len(pooled(model)) == 2


def test_rows_leaving_the_batch_drop_the_larger_workspace_when_memory_runs_out(stop_folder, monkeypatch):
    # A decode that fits with all its rows must still fit when some leave:
    # if the smaller batch's forward runs out of memory beside the full
    # batch's cache, kept for later calls, that cache is dropped and the
    # forward runs again.
    model = llada.load_model(stop_folder, dtype=torch.float32, device="cpu")
    want = rows_leave(model)
    llada.release_decode_workspace(model)
    allocate, made = workspaces.KVCache, []

    def allocate_and_track(*args):
        cache = allocate(*args)
        made.append(weakref.ref(cache))
        return cache

    forward, tries = type(model).forward, []

    def forward_if_room(self, ids, *args, **kw):
        full_batch_cache_alive = any(ref() is not None and ref().batch == 4 for ref in made)
        tries.append((ids.shape[0], full_batch_cache_alive))
        if ids.shape[0] < 4 and full_batch_cache_alive:
            raise RuntimeError(CPU_OUT_OF_MEMORY)
        return forward(self, ids, *args, **kw)

    monkeypatch.setattr(workspaces, "KVCache", allocate_and_track)
    monkeypatch.setattr(type(model), "forward", forward_if_room)
    got = rows_leave(model)
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    # Rows left, and the first forward of a smaller batch ran out of memory...
    failed = next(i for i, (rows, alive) in enumerate(tries) if rows < 4 and alive)
    # ...and ran again with the full batch's cache gone, which stayed gone.
    assert tries[failed + 1] == (tries[failed][0], False)
    assert not any(alive for _, alive in tries[failed + 1:])
    assert 4 not in [w.cache.batch for w in pooled(model)]


def test_replaced_weights_are_not_reused(model, held):
    # On CUDA a kept graph would read the old weights; here, the cache shows
    # whether a workspace was reused.
    policy = DecodePolicy(cache="dual")
    prompt, mask = prompts(model, seed=11)
    llada.generate(model, prompt, mask, **KW, policy=policy)
    (first,) = pooled(model)
    head = model.model.transformer["ff_out"]
    with torch.no_grad():
        head.weight.mul_(1.5)  # in place: the same storage, still reusable
    llada.generate(model, prompt, mask, **KW, policy=policy)
    head.weight = torch.nn.Parameter(-head.weight.detach())  # replaced
    got = llada.generate(model, prompt, mask, **KW, policy=policy)
    (second,) = pooled(model)  # the stale one was dropped
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    llada.generate(model, prompt, mask, **KW, policy=policy)
    (third,) = pooled(model)
    assert [caches[0] for caches in caches_of(held)] == [first.cache, first.cache, second.cache, third.cache]
    assert len({id(first), id(second), id(third)}) == 3
    assert torch.equal(got, fresh(model, prompt, mask, **KW, policy=policy))


def test_another_attention_backend_is_not_reused(model, held, monkeypatch):
    # A kept graph would still run the attention it was captured with.
    policy = DecodePolicy(cache="dual")
    prompt, mask = prompts(model, seed=12)
    monkeypatch.setattr(llada.model, "_attention_backend", "llada")
    llada.generate(model, prompt, mask, **KW, policy=policy)
    monkeypatch.setattr(llada.model, "_attention_backend", "sdpa")
    llada.generate(model, prompt, mask, **KW, policy=policy)
    llada.generate(model, prompt, mask, **KW, policy=policy)
    fused, sdpa, sdpa_again = caches_of(held)
    assert fused != sdpa and sdpa == sdpa_again


@pytest.mark.parametrize("switch, value", [("LLADA_ATTENTION_SM90", "0"),
                                           ("LLADA_ATTENTION_SM90_PIPELINE", "two-q")])
def test_another_hopper_switch_is_not_reused(model, held, monkeypatch, switch, value):
    # The attention op reads its Hopper switches at each launch; a kept
    # graph replays whichever kernel it captured.
    policy = DecodePolicy(cache="dual")
    prompt, mask = prompts(model, seed=14)
    monkeypatch.delenv(switch, raising=False)
    llada.generate(model, prompt, mask, **KW, policy=policy)
    monkeypatch.setenv(switch, value)
    llada.generate(model, prompt, mask, **KW, policy=policy)
    llada.generate(model, prompt, mask, **KW, policy=policy)
    unset, off, off_again = caches_of(held)
    assert unset != off and off == off_again


def test_release_empties_the_pool(model, held):
    policy = DecodePolicy(cache="dual")
    prompt, mask = prompts(model, seed=13)
    want = llada.generate(model, prompt, mask, **KW, policy=policy)
    assert len(pooled(model)) == 1
    llada.release_decode_workspace(model)
    assert pooled(model) == []
    assert torch.equal(llada.generate(model, prompt, mask, **KW, policy=policy), want)
    first, second = caches_of(held)
    assert first != second
    llada.release_decode_workspace(torch.nn.Linear(2, 2))  # nothing kept: nothing to do
    with pytest.raises(TypeError, match="model"):
        llada.release_decode_workspace("model")


def test_the_pool_is_not_part_of_the_model_and_dies_with_it(folder):
    model = llada.load_model(folder, dtype=torch.float32, device="cpu")
    weights, attributes = list(model.state_dict()), set(vars(model))
    prompt, mask = prompts(model, seed=14)
    llada.generate(model, prompt, mask, **KW, policy=DecodePolicy(cache="dual"))
    assert len(pooled(model)) == 1
    assert list(model.state_dict()) == weights and set(vars(model)) == attributes
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


# What torch's CPU allocator raises when malloc fails: a plain RuntimeError.
CPU_OUT_OF_MEMORY = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 1064960 bytes. Error code 12 (Cannot allocate memory)")


def keep_two_other_shapes(model, policy):
    """Two decodes of shapes other than prompts(model, ...)'s default, both
    left in the pool; weak references to their caches."""
    llada.release_decode_workspace(model)
    for seed, batch in ((20, 2), (21, 1)):
        llada.generate(model, *prompts(model, seed, batch=batch), **KW, policy=policy)
    kept = pooled(model)
    assert len(kept) == 2
    return [weakref.ref(workspace.cache) for workspace in kept]


def test_running_out_of_cpu_memory_frees_the_kept_workspaces_and_retries(model, monkeypatch):
    # Kept caches of other shapes must not cost a decode its memory: on the
    # CPU too, where the allocator's error is no torch.OutOfMemoryError.
    policy = DecodePolicy(cache="dual")
    kept = keep_two_other_shapes(model, policy)
    allocate, alive_at_each_try = workspaces.KVCache, []

    def allocate_if_room(*args):
        # Room for the new cache only once no kept cache holds memory.
        alive_at_each_try.append(sum(ref() is not None for ref in kept))
        if alive_at_each_try[-1]:
            raise RuntimeError(CPU_OUT_OF_MEMORY)
        return allocate(*args)

    monkeypatch.setattr(workspaces, "KVCache", allocate_if_room)
    prompt, mask = prompts(model, seed=22)
    got = llada.generate(model, prompt, mask, **KW, policy=policy)
    assert alive_at_each_try == [2, 0]
    assert len(pooled(model)) == 1  # this decode's
    monkeypatch.undo()
    assert torch.equal(got, fresh(model, prompt, mask, **KW, policy=policy))


@pytest.mark.parametrize("policy", [DecodePolicy(cache="dual"), DecodePolicy(commit="threshold")],
                         ids=["dual", "no-cache"])
def test_a_forward_that_runs_out_of_memory_frees_the_kept_workspaces_and_retries(model, monkeypatch, policy):
    # The cache fits, but the block's first forward does not while workspaces
    # kept for other shapes hold memory: they are dropped and it runs again.
    prompt, mask = prompts(model, seed=25)
    want = fresh(model, prompt, mask, **KW, policy=policy)
    kept = keep_two_other_shapes(model, DecodePolicy(cache="dual"))
    forward, alive_at_each_try = type(model).forward, []

    def forward_if_room(self, *args, **kw):
        alive_at_each_try.append(sum(ref() is not None for ref in kept))
        if alive_at_each_try[-1]:
            raise RuntimeError(CPU_OUT_OF_MEMORY)
        return forward(self, *args, **kw)

    monkeypatch.setattr(type(model), "forward", forward_if_room)
    got = llada.generate(model, prompt, mask, **KW, policy=policy)
    assert alive_at_each_try[:2] == [2, 0] and set(alive_at_each_try[1:]) == {0}
    assert torch.equal(got, want)
    # Only this decode's workspace is kept (a decode without a cache has none).
    assert len(pooled(model)) == (0 if policy.cache == "none" else 1)


def test_a_graph_capture_that_runs_out_of_memory_frees_the_kept_workspaces_and_retries(model, monkeypatch):
    # On CUDA a cached step captures a graph, whose warm-up forward may run
    # out of memory too. Here a stand-in for the graph runs the eager step.
    policy = DecodePolicy(cache="dual")
    prompt, mask = prompts(model, seed=26)
    want = fresh(model, prompt, mask, **KW, policy=policy)
    kept = keep_two_other_shapes(model, policy)
    alive_at_each_capture = []

    def capture_if_room(workspace, base, key_mask, ids, start, logits_width):
        alive_at_each_capture.append(sum(ref() is not None for ref in kept))
        if alive_at_each_capture[-1]:
            raise RuntimeError(CPU_OUT_OF_MEMORY)

        def replay(key_mask, ids, start):
            return base(ids, key_mask, logits_at=slice(0, logits_width), cache=workspace.cache,
                        start=start).logits

        return replay

    monkeypatch.setattr(sampler._Forward, "_graphs_run_on", staticmethod(lambda ids: True))
    monkeypatch.setattr(workspaces.Workspace, "graph", capture_if_room)
    got = llada.generate(model, prompt, mask, **KW, policy=policy)
    assert alive_at_each_capture[:2] == [2, 0] and set(alive_at_each_capture[1:]) == {0}
    assert torch.equal(got, want)


def test_a_forward_that_fails_otherwise_or_with_nothing_kept_is_not_retried(model, monkeypatch):
    policy = DecodePolicy(cache="dual")
    tries = []

    def fail_with(error):
        def forward_and_fail(self, *args, **kw):
            tries.append(args)
            raise RuntimeError(error)
        return forward_and_fail

    keep_two_other_shapes(model, policy)
    monkeypatch.setattr(type(model), "forward", fail_with("not enough room on the abacus"))
    with pytest.raises(RuntimeError, match="^not enough room on the abacus$"):
        llada.generate(model, *prompts(model, seed=27), **KW, policy=policy)
    assert len(tries) == 1
    llada.release_decode_workspace(model)
    tries.clear()
    monkeypatch.setattr(type(model), "forward", fail_with(CPU_OUT_OF_MEMORY))
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory") as failure:
        llada.generate(model, *prompts(model, seed=27), **KW, policy=policy)
    assert len(tries) == 1 and failure.value.__context__ is None


def test_other_allocation_errors_propagate_and_keep_the_pool(model, monkeypatch):
    policy = DecodePolicy(cache="dual")
    keep_two_other_shapes(model, policy)
    before = pooled(model)
    tries = []

    def allocate_and_fail(*args):
        tries.append(args)
        raise RuntimeError("not enough room on the abacus")

    monkeypatch.setattr(workspaces, "KVCache", allocate_and_fail)
    with pytest.raises(RuntimeError, match="^not enough room on the abacus$"):
        llada.generate(model, *prompts(model, seed=23), **KW, policy=policy)
    assert len(tries) == 1 and pooled(model) == before


def test_running_out_of_memory_with_nothing_kept_raises_the_allocators_error(model, monkeypatch):
    llada.release_decode_workspace(model)
    tries = []

    def allocate_and_fail(*args):
        tries.append(args)
        raise RuntimeError(CPU_OUT_OF_MEMORY)

    monkeypatch.setattr(workspaces, "KVCache", allocate_and_fail)
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory") as failure:
        llada.generate(model, *prompts(model, seed=24), **KW, policy=DecodePolicy(cache="dual"))
    assert len(tries) == 1 and failure.value.__context__ is None and pooled(model) == []
