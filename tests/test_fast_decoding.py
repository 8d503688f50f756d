"""Fast decoding: policies, caches, early stop, re-masking, infilling, streaming."""

import copy
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llada
from llada.model import KVCache
from llada.policies import DecodePolicy, entropy_bound_select, ranking_scores, select
from llada.sampler import BlockEvent, StepEvent

from checkpoints import SHAPES, make_checkpoint
from naive_llada import NaiveLLaDA

POLICIES = {
    "threshold": DecodePolicy(commit="threshold", threshold=0.5),
    "threshold-1.0": DecodePolicy(commit="threshold", threshold=1.0),
    "threshold-0.0": DecodePolicy(commit="threshold", threshold=0.0),
    "factor": DecodePolicy(commit="factor", factor=1.0),
    "entropy-bound": DecodePolicy(commit="entropy_bound", gamma=0.5),
    "margin": DecodePolicy(commit="threshold", ranking="margin", threshold=0.3),
    "entropy-ranking": DecodePolicy(commit="factor", ranking="entropy"),
    "dual": DecodePolicy.fast(),
    "prefix": DecodePolicy(commit="threshold", cache="prefix"),
    "schedule-dual": DecodePolicy(cache="dual"),
    "early-stop": DecodePolicy(commit="threshold", early_stop=True),
    "remask": DecodePolicy(commit="threshold", threshold=0.3, remask_below=0.2),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gqa"), seed=5, boost_stop_tokens=2.0, **SHAPES["gqa"])


@pytest.fixture(scope="module", params=[False, True], ids=["separate", "packed"])
def model(folder, request):
    # CPU on every machine: the tests build their inputs on the CPU, and they
    # compare cached with uncached decodes exactly, which the CPU kernels give.
    # Both weight layouts: load_model packs the projections on CUDA only.
    model = llada.load_model(folder, dtype=torch.float32, device="cpu")
    return llada.model.pack_projections(model, request.param)


def prompt_batch(model, padded=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        ids[mask == 0] = model.config.pad_token_id
    return ids, mask


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_fills_the_canvas(model, name):
    prompt, mask = prompt_batch(model)
    out, stats = llada.generate(model, prompt, mask, steps=16, gen_length=16, block_length=8,
                                policy=POLICIES[name], return_stats=True)
    assert out.shape == (3, 7 + 16)
    assert not (out == model.config.mask_token_id).any()
    assert torch.equal(out[:, :7], prompt)
    assert 1 <= stats.nfe <= 16 + 16  # re-masking may add steps, bounded
    assert stats.committed >= 3 * 16


def test_adaptive_policies_save_forwards_on_a_confident_model(model):
    # Threshold 0: every candidate passes, so a block takes one step.
    prompt, mask = prompt_batch(model)
    _, stats = llada.generate(model, prompt, mask, steps=16, gen_length=16, block_length=8,
                              policy=POLICIES["threshold-0.0"], return_stats=True)
    assert stats.nfe == 2
    assert stats.tokens_per_forward == 3 * 16 / 2


def test_cache_refreshed_every_step_equals_no_cache(model):
    prompt, mask = prompt_batch(model)
    kw = dict(steps=12, gen_length=24, block_length=8)
    exact = llada.generate(model, prompt, mask, **kw)
    for cache in ("dual", "prefix"):
        cached = llada.generate(model, prompt, mask, **kw,
                                policy=DecodePolicy(cache=cache, refresh_every=1))
        assert torch.equal(cached, exact), cache


def test_cached_decoding_under_autocast(model):
    # The cache takes the dtype autocast runs the projections in, not the
    # weights' dtype.
    prompt, mask = prompt_batch(model)
    kw = dict(steps=12, gen_length=24, block_length=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = llada.generate(model, prompt, mask, **kw)
        for cache in ("dual", "prefix"):
            refreshed = llada.generate(model, prompt, mask, **kw, policy=DecodePolicy(cache=cache, refresh_every=1))
            assert torch.equal(refreshed, exact), cache
            fast = llada.generate(model, prompt, mask, **kw, policy=DecodePolicy.fast(cache=cache))
            assert not (fast == model.config.mask_token_id).any()


def test_a_cache_made_under_inference_mode_serves_later_decodes(folder):
    # The model's pool keeps a decode's cache for the next call of its shape,
    # which may run outside inference mode and writes the cache in place.
    # (In float16 on the CPU, the cache write is torch's, which checks.)
    model = llada.load_model(folder, dtype=torch.float16, device="cpu")
    prompt, mask = prompt_batch(model)
    kw = dict(steps=12, gen_length=24, block_length=8, policy=DecodePolicy(cache="dual"))
    want = llada.generate(model, prompt, mask, **kw)
    llada.release_decode_workspace(model)
    with torch.inference_mode():
        assert torch.equal(llada.generate(model, prompt, mask, **kw), want)
    for _ in range(2):
        assert torch.equal(llada.generate(model, prompt, mask, **kw), want)
        with torch.inference_mode():
            assert torch.equal(llada.generate(model, prompt, mask, **kw), want)


@pytest.mark.parametrize("changed", [False, True], ids=["same-canvas", "block-changed"])
@pytest.mark.parametrize("fed", ["block", "block-and-after"])
def test_cached_forward_matches_the_naive_model_with_stale_keys(model, folder, changed, fed):
    # A cache holds every position's keys and values from the canvas of the
    # last full forward; a cached forward feeds only some positions, whose
    # own keys and values replace those there. The naive model computes the
    # same from its definition, also after the fed tokens changed (as they
    # do between a block's steps) and with key padding.
    g = torch.Generator().manual_seed(3)
    then = torch.randint(0, 256, (2, 20), generator=g)
    mask = torch.ones_like(then)
    mask[1, :4] = 0
    lo, hi = 8, (12 if fed == "block" else 20)
    now = then.clone()
    if changed:
        now[:, lo:hi] = torch.randint(0, 256, (2, hi - lo), generator=g)
    oracle, stale = NaiveLLaDA(folder), []
    oracle.forward(then, mask, record=stale)
    want = oracle.forward(now, mask, stale=stale, lo=lo, hi=hi)
    cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
    model(then, mask, cache=cache)
    got = model(now[:, lo:hi], mask, cache=cache, start=lo).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Unchanged, the cache is exact; changed, the stale keys show.
    exact = oracle.forward(now, mask)[:, lo:hi]
    assert torch.allclose(got, exact, rtol=1e-4, atol=1e-4) == (not changed)


def test_dual_cache_feeds_only_the_block(model):
    prompt, mask = prompt_batch(model)
    _, stats = llada.generate(model, prompt, mask, steps=16, gen_length=16, block_length=8,
                              policy=DecodePolicy(cache="dual"), return_stats=True)
    # Per block: one full forward (3 x 23 positions), then 7 block-only ones.
    assert stats.nfe == 16
    assert stats.positions == 2 * (3 * 23 + 7 * 3 * 8)


def test_a_row_that_finishes_first_stops_costing(tmp_path):
    # A head that favours EOS enough that one of four rows (not all) emits
    # EOS in its second block: early stop then fills the rest of that row
    # with EOS and feeds it no more, so the decode costs fewer positions
    # than the same decode without early stop.
    folder = make_checkpoint(tmp_path, seed=5, boost_stop_tokens=8.0, **SHAPES["gqa"])
    model = llada.load_model(folder, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(steps=24, gen_length=24, block_length=8, return_stats=True)
    out, stats = llada.generate(model, prompt, policy=DecodePolicy(commit="threshold", threshold=0.3,
                                                                   early_stop=True), **kw)
    full, full_stats = llada.generate(model, prompt, policy=DecodePolicy(commit="threshold", threshold=0.3), **kw)
    eos = model.config.eos_token_id
    # Blocks before the last that hold EOS, per row (the answer starts at 7).
    ended = [bool((row[7:15] == eos).any() or (row[15:23] == eos).any()) for row in out]
    assert any(ended) and not all(ended)
    for row, done, same in zip(out, ended, full):
        if done:
            hit = int(torch.nonzero(row[7:] == eos)[0]) + 7
            block_end = 7 + ((hit - 7) // 8 + 1) * 8
            assert block_end < 7 + 24
            assert (row[block_end:] == eos).all()
            assert not (same[block_end:] == eos).all()  # not what the model decodes there anyway
            assert torch.equal(row[:block_end], same[:block_end])
        else:
            assert torch.equal(row, same)
    assert stats.positions < full_stats.positions
    assert stats.committed < full_stats.committed


@pytest.mark.parametrize("logits_eos_inf", [False, True], ids=["eos-allowed", "no-eos"])
def test_remasking_masks_exactly_the_weak_decoded_tokens(model, logits_eos_inf):
    # After each commit, the tokens decoded at earlier steps of the active
    # block (not re-masked before) whose probability under this step's
    # prediction is below remask_below are masked again. The prediction is
    # recomputed here from the canvas before the step with a float64 softmax
    # over the tokens a step may choose: never the mask (an adaptive rule),
    # nor EOS under logits_eos_inf.
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))
    mask_id, below = model.config.mask_token_id, 0.2
    never = [mask_id] + ([model.config.eos_token_id] if logits_eos_inf else [])
    policy = DecodePolicy(commit="threshold", threshold=0.3, remask_below=below)
    before = torch.cat([prompt, torch.full((3, 16), mask_id)], dim=1)
    remasked_once = torch.zeros_like(before, dtype=torch.bool)
    steps_that_remasked = 0
    for event in llada.stream(model, prompt, steps=16, gen_length=16, block_length=8, policy=policy,
                              logits_eos_inf=logits_eos_inf):
        if not isinstance(event, StepEvent):
            continue
        start = 7 + 8 * event.block
        with torch.no_grad():
            logits = model(before).logits.double()
        logits[..., never] = -math.inf
        probs = torch.softmax(logits, dim=-1)
        p = probs.gather(2, before[:, :, None])[:, :, 0]  # of each position's current token
        in_block = torch.zeros_like(remasked_once)
        in_block[:, start:start + 8] = True
        masked = before == mask_id
        still_decoding = (masked & in_block).any(1)  # rows whose block is not yet full
        decoded = in_block & ~masked & ~remasked_once & still_decoding[:, None]
        want = decoded & (p < below)
        assert torch.equal(event.remasked, want), event.step
        assert (event.canvas[want] == mask_id).all()
        steps_that_remasked += bool(want.any())
        remasked_once |= want
        before = event.canvas.clone()
    assert steps_that_remasked >= 1
    assert not (before == mask_id).any()


class ConstantLogits(torch.nn.Module):
    """Logits that ignore the canvas, over 10 tokens (EoT 7, EOS 8, mask 9):
    token 5 is the best after EOS everywhere, by far at the first answer
    position (of prompts of length 2). Without EOS and the mask, token 5 has
    probability e^5 / (e^5 + 7) = 0.955 there and e^2 / (e^2 + 7) = 0.514
    elsewhere; EOS would take most of it (e^7 against e^5 + e^2 + ...)."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), dict(mask_token_id=9, eos_token_id=8, eot_token_id=7,
                                               embedding_size=10, max_sequence_length=64))()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to run on

    def forward(self, ids, attention_mask=None):
        logits = torch.zeros(*ids.shape, 10)
        logits[..., 5] = 2.0
        logits[:, 2, 5] = 5.0
        logits[..., 8] = 7.0
        return type("Output", (), {"logits": logits})()


def test_remasking_reads_the_probability_a_token_was_committed_with():
    # With EOS never predicted, token 5 is committed at 0.955 first, then at
    # 0.514 everywhere else, and the prediction never changes: no token ever
    # falls below 0.5, so re-masking changes nothing, not even the count of
    # forwards (one per position at threshold 0.9).
    model, prompt = ConstantLogits(), torch.tensor([[1, 2]])
    kw = dict(steps=4, gen_length=4, block_length=4, logits_eos_inf=True)
    want = torch.tensor([[1, 2, 5, 5, 5, 5]])
    for remask_below in (None, 0.5):
        policy = DecodePolicy(commit="threshold", threshold=0.9, remask_below=remask_below)
        out, stats = llada.generate(model, prompt, policy=policy, return_stats=True, **kw)
        assert torch.equal(out, want)
        assert (stats.nfe, stats.committed) == (4, 4), remask_below
    events = [e for e in llada.stream(model, prompt, policy=policy, **kw) if isinstance(e, StepEvent)]
    assert [e.positions() for e in events] == [[2], [3], [4], [5]]
    assert not any(e.remasked.any() for e in events)


def expected_first_commit(model, canvas, start, end, score, rule, k=None, factor=1.0, suppress=()):
    """Positions [B, T] that the first step commits, from model(canvas).logits
    with a float64 softmax: the masked positions of the block ranked by
    ``score`` (of the probabilities [N, V]), ties to the lower position;
    the top ``k``, or under the factor rule the largest n with
    (n + 1) (1 - c_n) < factor (at least one)."""
    with torch.no_grad():
        logits = model(canvas).logits.double()
    logits[..., list(suppress)] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    want = torch.zeros_like(canvas, dtype=torch.bool)
    for row in range(canvas.shape[0]):
        cand = [i for i in range(start, end) if canvas[row, i] == model.config.mask_token_id]
        values = {i: float(score(probs[row, i])) for i in cand}
        ranked = sorted(cand, key=lambda i: (-values[i], i))
        if rule == "topk":
            n = k
        else:
            n = max([j + 1 for j, i in enumerate(ranked) if (j + 2) * (1 - values[i]) < factor], default=1)
        want[row, ranked[:n]] = True
    return want


def margin_of(p):
    top = p.topk(2).values
    return top[0] - top[1]


def exp_negative_entropy_of(p):
    return torch.exp(torch.where(p > 0, p * p.log(), 0.0).sum())


@pytest.mark.parametrize("ranking, score", [("margin", margin_of), ("entropy", exp_negative_entropy_of),
                                            ("probability", lambda p: p.max())])
def test_a_ranking_commits_the_positions_it_scores_highest(model, ranking, score):
    # Under the fixed schedule (8 masks, 3 steps: 3, 3, 2) the first step
    # commits the three masked positions of each row with the best score,
    # computed here from the logits: the margin (top-1 minus top-2
    # probability), exp(-entropy), or the top-1 probability.
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))
    canvas = torch.cat([prompt, torch.full((3, 8), model.config.mask_token_id)], dim=1)
    want = expected_first_commit(model, canvas, 7, 15, score, "topk", k=3)
    event = next(llada.stream(model, prompt, steps=3, gen_length=8, block_length=8,
                              policy=DecodePolicy(ranking=ranking)))
    assert isinstance(event, StepEvent) and event.step == 0
    assert torch.equal(event.committed, want)
    if ranking != "probability":  # the check tells the ranking from the probability here
        assert not torch.equal(want, expected_first_commit(model, canvas, 7, 15, lambda p: p.max(), "topk", k=3))


def test_the_factor_rule_commits_what_it_defines(model):
    # commit="factor": with the confidences of the masked positions sorted
    # c1 >= c2 >= ..., the first step commits the largest n with
    # (n + 1) (1 - c_n) < factor (at least one). The adaptive rules never
    # choose the mask token, so its logit is left out of the softmax.
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))
    mask_id = model.config.mask_token_id
    canvas = torch.cat([prompt, torch.full((3, 8), mask_id)], dim=1)
    confidence = lambda p: p.max()  # noqa: E731
    want = expected_first_commit(model, canvas, 7, 15, confidence, "factor", factor=2.0, suppress=[mask_id])
    event = next(llada.stream(model, prompt, steps=8, gen_length=8, block_length=8,
                              policy=DecodePolicy(commit="factor", factor=2.0)))
    assert isinstance(event, StepEvent) and event.step == 0
    assert torch.equal(event.committed, want)
    # The rule commits more than the best position in some row: what the
    # fixed-k or a threshold rule (0.9 is above every confidence here) would
    # not.
    best = expected_first_commit(model, canvas, 7, 15, confidence, "topk", k=1, suppress=[mask_id])
    assert (want.sum(1) > best.sum(1)).any()


def test_only_the_fixed_schedule_checks_steps(model):
    prompt, mask = prompt_batch(model)
    kw = dict(gen_length=8, block_length=4, policy=DecodePolicy.fast())
    want = llada.generate(model, prompt, mask, steps=8, **kw)
    for steps in (5, 128):  # not a multiple of the blocks; more than gen_length
        assert torch.equal(llada.generate(model, prompt, mask, steps=steps, **kw), want)
        with pytest.raises(ValueError, match="steps"):
            llada.generate(model, prompt, mask, steps=steps, gen_length=8, block_length=4)


def test_gen_length_one(model):
    prompt, mask = prompt_batch(model)
    for policy in POLICIES.values():
        out = llada.generate(model, prompt, mask, steps=1, gen_length=1, block_length=1, policy=policy)
        assert not (out == model.config.mask_token_id).any()


def test_equal_confidences_terminate():
    # All scores equal: the rules still make progress, lowest positions first.
    scores = torch.full((2, 6), 0.5)
    scores[1, :2] = -math.inf
    for commit in ("threshold", "factor"):
        got = llada.select_positions(scores, commit, threshold=0.9, factor=0.1)
        assert got.sum(1).tolist() == [1, 1]
        assert got[0, 0] and got[1, 2]
    ent = torch.full((2, 6), 0.7)
    got = entropy_bound_select(ent, torch.isfinite(scores), gamma=0.0)
    assert got.sum(1).tolist() == [1, 1] and got[0, 0] and got[1, 2]
    got = entropy_bound_select(ent, torch.isfinite(scores), gamma=1.5)
    assert got.sum(1).tolist() == [3, 3]


def test_entropy_bound_sums_the_entries_before_the_largest_exactly():
    # U = both entries: sum(U) - max(U) is the first entry, 2**-25 above
    # gamma, so only the first is taken, whichever column holds it. A running
    # sum less the last entry, in float32, rounds at the size of 11.3 and
    # lands on gamma.
    low = 0.25 + 2**-25  # a float32 value, as 11.3 (rounded) and 0.25 are
    both = torch.ones(1, 2, dtype=torch.bool)
    for row, want in (([low, 11.3], [True, False]), ([11.3, low], [False, True])):
        got = entropy_bound_select(torch.tensor([row], dtype=torch.float32), both, gamma=0.25)
        assert got[0].tolist() == want
    # gamma is read as given: the float32 nearest 0.1 is above 0.1.
    got = entropy_bound_select(torch.tensor([[0.1, 5.0]], dtype=torch.float32), both, gamma=0.1)
    assert got[0].tolist() == [True, False]
    got = entropy_bound_select(torch.tensor([[0.25, 5.0]], dtype=torch.float32), both, gamma=0.25)
    assert got[0].tolist() == [True, True]  # equal to gamma is within the bound


def entropy_bound_reference(entropies, candidates, gamma):
    """The EB rule as DESIGN.md states it, in float64: the candidates sorted
    by entropy (ties: lower position), the largest prefix U with
    sum(H(U)) - max(H(U)) <= gamma, at least one."""
    order = sorted((i for i in range(len(entropies)) if candidates[i]), key=lambda i: (entropies[i], i))
    n = 1
    for m in range(1, len(order) + 1):
        u = [entropies[i] for i in order[:m]]
        if math.fsum(u) - max(u) <= gamma:
            n = m
    return set(order[:n])


def on_exact_grid(x):
    """The float32 value nearest x (>= 0) that is a multiple of 2**-40: sums
    of up to 2**8 such values below 16 are exact in float64, so the reference
    compares the exact sum with gamma, whatever the order of summing."""
    x = float(np.float32(max(x, 0.0)))
    return x if x >= 2**-16 else round(x * 2**40) / 2**40  # < 2**24 multiples: float32 too


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_entropy_bound_matches_the_rule_in_float64(seed):
    # Most rows put the k lowest entropies' sum within a few float32 units of
    # gamma, so that whether the next (larger) entry is taken turns on the
    # last bit; the other entropies go up to 12 (a whole vocabulary's). The
    # other columns are no candidates and hold anything.
    rng = random.Random(seed)
    rows, width = 48, 10
    entropy = torch.empty(rows, width, dtype=torch.float32)
    candidate = torch.zeros(rows, width, dtype=torch.bool)
    gamma = rng.choice([0.0, 0.1, 0.25, 0.3, 0.5, 1.0, 2.0, rng.uniform(0.0, 3.0)])
    for r in range(rows):
        n = rng.randint(0, width)
        values = [on_exact_grid(rng.uniform(gamma, 12.0)) for _ in range(n)]
        if n >= 2 and rng.random() < 0.8:
            k = rng.randint(1, n - 1)
            low = [on_exact_grid(rng.choice([0.0, rng.uniform(0.0, gamma / k)])) for _ in range(k - 1)]
            if low and rng.random() < 0.3:
                low[-1] = low[0]  # a tie
            rest = on_exact_grid(gamma - math.fsum(low))
            step = max(float(np.spacing(np.float32(rest))), 2**-40)
            low.append(on_exact_grid(rest + rng.randint(-2, 2) * step))
            values[:k] = low
        columns = rng.sample(range(width), n)
        for c in range(width):
            entropy[r, c] = rng.choice([0.0, math.nan, math.inf, 3.0])
        for c, v in zip(columns, values):
            entropy[r, c] = v
            candidate[r, c] = True
    got = entropy_bound_select(entropy, candidate, gamma)
    for r in range(rows):
        row = entropy[r].tolist()
        assert all(v == on_exact_grid(v) for v, c in zip(row, candidate[r].tolist()) if c)
        want = entropy_bound_reference(row, candidate[r].tolist(), gamma)
        assert set(torch.nonzero(got[r]).flatten().tolist()) == want, (row, candidate[r].tolist(), gamma)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["one column", "every column"])
def test_logits_without_a_valid_token_are_an_error(model, bad, where):
    # A NaN or +inf logit leaves no valid probability: the adaptive rules
    # would find no candidate and never end, the schedule would commit junk
    # (with every logit NaN, token -1, which no embedding holds), whatever
    # the ranking.
    broken = copy.deepcopy(model)
    with torch.no_grad():
        if where == "one column":
            broken.get_parameter("model.transformer.ff_out.weight")[5] = bad
        else:
            broken.get_parameter("model.transformer.ln_f.weight")[:] = bad
    prompt, mask = prompt_batch(model)
    policies = list(POLICIES.values()) + [DecodePolicy(ranking=r, commit=c) for r in ("margin", "entropy", "random")
                                          for c in ("schedule", "threshold")]
    for policy in policies:
        with pytest.raises(FloatingPointError, match="NaN or [+]inf"):
            llada.generate(broken, prompt, mask, steps=16, gen_length=16, block_length=8, policy=policy)


def test_infill_keeps_fixed_tokens_and_fills_the_gap(model):
    mask_id = model.config.mask_token_id
    g = torch.Generator().manual_seed(1)
    canvas = torch.randint(0, 256, (2, 20), generator=g)
    holes = torch.zeros(2, 20, dtype=torch.bool)
    holes[:, 5:12] = True
    holes[1, 15] = True
    canvas[holes] = mask_id
    for policy in (None, DecodePolicy.fast(), DecodePolicy(commit="factor", cache="prefix")):
        out = llada.infill(model, canvas, policy=policy, block_length=4)
        assert torch.equal(out[~holes], canvas[~holes])
        assert not (out == mask_id).any()
    assert (canvas[holes] == mask_id).all()  # the input is untouched


@pytest.mark.parametrize("block_length", [8, 4])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_infill_matches_generate_when_the_gap_is_at_the_end(model, padded, block_length):
    # A gap at the end is generation: the same blocks (one, or two of 4
    # with block_length 4) and steps give the same tokens.
    prompt, mask = prompt_batch(model, padded=padded)
    want = llada.generate(model, prompt, mask, steps=8, gen_length=8, block_length=block_length)
    canvas = torch.cat([prompt, torch.full((3, 8), model.config.mask_token_id)], dim=1)
    canvas_mask = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype)], dim=1)
    got = llada.infill(model, canvas, canvas_mask, steps=8, block_length=block_length)
    assert torch.equal(got, want)
    if block_length == 4:  # the blocks show: one block of 8 decodes otherwise
        one_block = llada.generate(model, prompt, mask, steps=8, gen_length=8, block_length=8)
        assert not torch.equal(one_block, want)
        assert torch.equal(llada.infill(model, canvas, canvas_mask, steps=8), one_block)
    if padded:  # the padding is seen: without the mask the padded row decodes otherwise
        assert not torch.equal(llada.infill(model, canvas, steps=8)[1], want[1])


def test_stream_events_reassemble_to_the_output(model):
    prompt, mask = prompt_batch(model)
    kw = dict(steps=16, gen_length=16, block_length=8)
    for policy in (None, DecodePolicy.fast()):
        want = llada.generate(model, prompt, mask, **kw, policy=policy)
        canvas = torch.full_like(want, model.config.mask_token_id)
        canvas[:, :7] = prompt
        blocks, stats = [], llada.DecodeStats()
        _, want_stats = llada.generate(model, prompt, mask, **kw, policy=policy, return_stats=True)
        for event in llada.stream(model, prompt, mask, **kw, policy=policy, stats=stats):
            if isinstance(event, StepEvent):
                canvas[event.committed] = event.canvas[event.committed]
            else:
                assert isinstance(event, BlockEvent)
                blocks.append(event.tokens)
        assert torch.equal(canvas, want)
        assert torch.equal(torch.cat(blocks, dim=1), want[:, 7:])
        assert stats == want_stats  # forwards, tokens and positions, counted live


def test_stream_events_count_their_own_decodes_forwards(model):
    # A DecodeStats may gather several decodes; an event's nfe is this one's.
    prompt, mask = prompt_batch(model)
    kw = dict(steps=16, gen_length=16, block_length=8)
    stats = llada.DecodeStats()
    for _ in range(2):
        events = list(llada.stream(model, prompt, mask, **kw, stats=stats))
        assert [e.nfe for e in events if isinstance(e, StepEvent)] == list(range(1, 17))
        assert [e.nfe for e in events if isinstance(e, BlockEvent)] == [8, 16]
    assert stats.nfe == 32
    # Two streams interleaved on one DecodeStats: each counts its own.
    first, second = (llada.stream(model, prompt, mask, **kw, stats=stats) for _ in range(2))
    counts = [[], []]
    for pair in zip(first, second):
        for count, event in zip(counts, pair):
            if isinstance(event, StepEvent):
                count.append(event.nfe)
    assert counts == [list(range(1, 17))] * 2
    assert stats.nfe == 64


@pytest.mark.parametrize("policy", [None, DecodePolicy.fast()], ids=["exact", "fast"])
def test_a_stream_can_stop_rows_at_a_block_end(model, policy):
    prompt, mask = prompt_batch(model)  # 3 rows of 7 tokens
    kw = dict(steps=24, gen_length=24, block_length=8, policy=policy)
    eos = model.config.eos_token_id
    want, full = llada.generate(model, prompt, mask, **kw, return_stats=True)
    stats, stopped_at, canvas = llada.DecodeStats(), [], None
    for event in llada.stream(model, prompt, mask, **kw, stats=stats):
        if isinstance(event, StepEvent):
            canvas = event.canvas  # live: the final canvas once the stream ends
        elif event.block == 0:
            with pytest.raises(ValueError, match="rows"):
                event.stop_rows(torch.tensor([True]))
            event.stop_rows(torch.tensor([False, True, False]))
            assert event.finished.tolist() == [False, True, False]
        else:
            stopped_at.append(event.finished.tolist())
    assert stopped_at == [[False, True, False]] * 2
    # Row 1 ends after its first block, the rest of it EOS; the others decode on, unchanged.
    assert torch.equal(canvas[1, :15], want[1, :15]) and (canvas[1, 15:] == eos).all()
    assert torch.equal(canvas[[0, 2]], want[[0, 2]])
    assert stats.positions < full.positions


def test_bad_policies_are_named():
    with pytest.raises(ValueError, match="commit"):
        DecodePolicy(commit="greedy")
    with pytest.raises(ValueError, match="cache"):
        DecodePolicy(cache="all")
    with pytest.raises(ValueError, match="remask_below"):
        DecodePolicy(remask_below=0.5)
    with pytest.raises(ValueError, match="remask_below"):
        DecodePolicy(commit="threshold", remask_below=1.5)
    with pytest.raises(ValueError, match="refresh_every"):
        DecodePolicy(refresh_every=-1)
    with pytest.raises(ValueError, match="threshold"):
        DecodePolicy(commit="threshold", threshold=2.0)
    with pytest.raises(ValueError, match="threshold"):
        DecodePolicy(commit="threshold", ranking="entropy", threshold=math.nan)
    # The entropy ranking's score, exp(-entropy), is in (0, 1] too.
    with pytest.raises(ValueError, match=r"^threshold: expected a value in \[0, 1\], got -5.0"):
        DecodePolicy(commit="threshold", ranking="entropy", threshold=-5.0)
    for name, value in (("threshold", "0.5"), ("factor", "1"), ("gamma", True), ("remask_below", "0.5")):
        with pytest.raises(TypeError, match=f"^{name}: expected a float"):
            DecodePolicy(commit="threshold", **{name: value})
    for name in ("early_stop", "cuda_graph"):
        with pytest.raises(TypeError, match=f"^{name}: expected a bool"):
            DecodePolicy(**{name: "no"})
    with pytest.raises(ValueError, match="refresh_every"):
        DecodePolicy(cache="dual", refresh_every=True)
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"^early_stop: expected a bool \(True or False\), got numpy\.bool"):
        DecodePolicy(early_stop=np.bool_(True))
    assert type(DecodePolicy(cache="dual", refresh_every=np.int64(2)).refresh_every) is int
    with pytest.raises(ValueError, match="^ranking: the entropy_bound rule"):
        DecodePolicy(commit="entropy_bound", ranking="margin")


def test_settings_the_policy_would_not_use_are_refused():
    import dataclasses

    for name, value, rule in (("threshold", 0.5, "threshold"), ("factor", 2.0, "factor"),
                              ("gamma", 0.3, "entropy_bound")):
        for other in ("schedule", "threshold", "factor", "entropy_bound"):
            if other == rule:
                assert getattr(DecodePolicy(commit=other, **{name: value}), name) == value
            else:
                with pytest.raises(ValueError, match=f"^{name}: used by commit='{rule}' only"):
                    DecodePolicy(commit=other, **{name: value})
    with pytest.raises(ValueError, match="^refresh_every: used with a cache"):
        DecodePolicy(refresh_every=2)
    with pytest.raises(ValueError, match="^cuda_graph: used with a cache"):
        DecodePolicy(cuda_graph=False)
    assert DecodePolicy(cache="prefix", refresh_every=2).refresh_every == 2
    # Switching the rule of a tuned policy would drop its setting: refused too.
    with pytest.raises(ValueError, match="^threshold:"):
        dataclasses.replace(DecodePolicy.fast(threshold=0.7), commit="factor")
    assert dataclasses.replace(DecodePolicy.fast(), commit="factor").commit == "factor"


def test_infill_refuses_more_steps_than_the_blocks_have_positions(model):
    # Two blocks of 3: at most 6 steps under the fixed schedule (more would
    # only add steps that commit nothing; a huge count would allocate its
    # schedule before failing). The adaptive rules count no steps.
    mask_id = model.config.mask_token_id
    canvas = torch.tensor([[3, mask_id, mask_id, 4, mask_id, mask_id, mask_id, 5]])
    assert (llada.infill(model, canvas, steps=6, block_length=3) != mask_id).all()
    for steps in (8, 10**10):
        with pytest.raises(ValueError, match=rf"^steps: expected at most 6 \(2 blocks of 3 positions\), "
                                             rf"got {steps}$"):
            llada.infill(model, canvas, steps=steps, block_length=3)
    fast = DecodePolicy(commit="threshold")
    assert (llada.infill(model, canvas, steps=10**10, block_length=3, policy=fast) != mask_id).all()


def test_an_infill_block_longer_than_the_span_is_the_span(model):
    # One block either way: the same tokens, and steps bounded by the gap's
    # 5 positions, not by the block length the caller gave (a huge one would
    # otherwise pad the schedule to it, or spin through empty steps).
    mask_id = model.config.mask_token_id
    canvas = torch.tensor([[3, mask_id, mask_id, 4, mask_id, mask_id, 5]])
    want = llada.infill(model, canvas, steps=5, block_length=5)
    for block_length in (6, 10**6, 10**20):
        assert torch.equal(llada.infill(model, canvas, steps=5, block_length=block_length), want)
        with pytest.raises(ValueError, match=r"^steps: expected at most 5 \(1 blocks of 5 positions\), got 6$"):
            llada.infill(model, canvas, steps=6, block_length=block_length)


@pytest.mark.parametrize("policy", [None, DecodePolicy(commit="threshold")], ids=["schedule", "threshold"])
def test_a_sampled_infill_row_does_not_depend_on_the_other_rows_gaps(model, policy):
    """A row's noise is keyed by its row and place in the canvas: moving
    another row's gap (which moves the batch's first masked column) leaves
    its sample as it was, in one block without a cache (blocks and cached
    windows span the batch's columns: see infill's block_length)."""
    mask_id = model.config.mask_token_id
    base = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    row = base.clone()
    row[5:10] = mask_id
    late, early = base.clone(), base.clone()
    late[6:8] = mask_id
    early[1:3] = mask_id
    for seed in range(3):
        kw = dict(temperature=1.0, seed=seed, policy=policy, block_length=None)
        with_late = llada.infill(model, torch.stack([row, late]), **kw)
        with_early = llada.infill(model, torch.stack([row, early]), **kw)
        assert torch.equal(with_late[0], with_early[0]), seed
        assert (with_late[0] != mask_id).all()


@pytest.mark.parametrize("policy", [DecodePolicy.fast(threshold=0.5), DecodePolicy(cache="dual")],
                         ids=["dual-threshold", "dual-schedule"])
def test_infill_rows_whose_gaps_span_the_same_columns_decode_as_alone(model, policy):
    # Blocks and the dual cache's windows are laid out from the batch's
    # first to its last masked column: when every row's masks span the same
    # columns, they are each row's own, and each row gets what it gets alone,
    # whatever the masks between (here 12, 6 and 7 of them, in blocks of 3).
    mask_id = model.config.mask_token_id
    canvas = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(3))
    canvas[0, 4:16] = mask_id
    canvas[1, [4, 5, 9, 10, 11, 15]] = mask_id
    canvas[2, [4, 7, 8, 12, 13, 14, 15]] = mask_id
    for kw in (dict(block_length=3), dict(block_length=3, cfg_scale=1.0)):
        batch = llada.infill(model, canvas, policy=policy, **kw)
        assert not (batch == mask_id).any()
        for row in range(3):
            assert torch.equal(batch[row], llada.infill(model, canvas[row], policy=policy, **kw)), (row, kw)


def test_bad_infill_arguments(model):
    with pytest.raises(ValueError, match="canvas"):
        llada.infill(model, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="canvas"):
        llada.infill(model, torch.zeros(1, 5))
    canvas = torch.full((1, 6), model.config.mask_token_id)
    with pytest.raises(ValueError, match="steps"):
        llada.infill(model, canvas, steps=5, block_length=2)
    mask_id, vocab = model.config.mask_token_id, model.config.embedding_size
    gap = torch.tensor([3, mask_id, mask_id, 4])
    for bad_id in (-1, vocab):
        with pytest.raises(ValueError, match="canvas: token ids"):
            llada.infill(model, torch.tensor([bad_id, mask_id, 4]))
    too_long = torch.full((model.config.max_sequence_length + 1,), mask_id)
    with pytest.raises(ValueError, match="canvas: length .* max_sequence_length"):
        llada.infill(model, too_long)
    with pytest.raises(TypeError, match="cfg_scale"):
        llada.infill(model, gap, cfg_scale="1")
    with pytest.raises(TypeError, match="seed"):
        llada.infill(model, gap, seed="1")
    with pytest.raises(ValueError, match="remasking"):
        llada.infill(model, gap, remasking="highest")
    with pytest.raises(TypeError, match="attention_mask"):
        llada.infill(model, gap, attention_mask=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        llada.infill(model, gap, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="attention_mask: values"):
        llada.infill(model, gap, attention_mask=torch.tensor([2, 1, 1, 1]))
    with pytest.raises(ValueError, match="canvas: holds mask tokens at padded positions"):
        llada.infill(model, gap, attention_mask=torch.tensor([1, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"policy: expected a DecodePolicy or one of \('exact', 'fast'\)"):
        llada.generate(model, torch.zeros(1, 3, dtype=torch.long), steps=4, gen_length=4,
                       block_length=4, policy="fastest")
    with pytest.raises(TypeError, match="policy: expected a DecodePolicy or a name"):
        llada.generate(model, torch.zeros(1, 3, dtype=torch.long), steps=4, gen_length=4,
                       block_length=4, policy=3)


@pytest.mark.parametrize("name, policy", [("exact", DecodePolicy()), ("fast", DecodePolicy.fast())])
def test_a_policy_by_name(model, name, policy):
    assert DecodePolicy.named(name) == policy
    prompt = torch.randint(0, model.config.mask_token_id, (1, 5), generator=torch.Generator().manual_seed(3))
    args = dict(steps=8, gen_length=16, block_length=8)
    assert torch.equal(llada.generate(model, prompt, policy=name, **args),
                       llada.generate(model, prompt, policy=policy, **args))


class StandIn(torch.nn.Module):
    """A stand-in model over 10 tokens (mask 9, EOS 8, EoT 7) whose logits
    [B, L, 10] are ``logits_of(ids)``."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), dict(mask_token_id=9, eos_token_id=8, eot_token_id=7,
                                              embedding_size=10, max_sequence_length=64))()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter: the sampler reads the device off it

    def forward(self, ids, attention_mask=None):
        return type("Out", (), {"logits": self.logits_of(ids)})()


class EndsWhenAskedTo(StandIn):
    """Rows whose first token is 1 predict EOS everywhere, the others token 5
    (so only some rows finish early)."""

    def logits_of(self, ids):
        logits = torch.zeros(*ids.shape, 10)
        logits[..., 5] = 5.0
        logits[ids[:, 0] == 1, :, 8] = 6.0
        return logits


class PredictsTheMask(StandIn):
    """The top prediction everywhere is the mask token (given ``mask_logit``
    9), then token 5, but EOS at the last position."""

    def __init__(self, mask_logit=9.0):
        super().__init__()
        self.mask_logit = mask_logit

    def logits_of(self, ids):
        logits = torch.zeros(*ids.shape, 10)
        logits[..., 9] = self.mask_logit
        logits[..., 5] = 4.0 + torch.arange(ids.shape[1]) / 100  # later positions surer
        logits[:, -1, 8] = 8.5  # EOS, sure, at the end
        return logits


@pytest.mark.parametrize("commit", ["threshold", "factor", "entropy_bound"])
def test_adaptive_rules_never_commit_the_mask_token(commit):
    # Committing the mask token would leave the canvas as it was, and a rule
    # that commits until the block is full would repeat that step forever.
    prompt = torch.tensor([[1, 2, 3]])
    steps = 0
    for event in llada.stream(PredictsTheMask(), prompt, steps=8, gen_length=8, block_length=8,
                              policy=DecodePolicy(commit=commit)):
        steps += isinstance(event, StepEvent)
        assert steps <= 8, "no progress"
    assert not (event.tokens == 9).any() and (event.tokens[0, :-1] == 5).all() and event.tokens[0, -1] == 8


@pytest.mark.parametrize("commit", ["schedule", "threshold"])
def test_infill_never_leaves_a_mask(commit):
    # Generation under the fixed schedule may commit the mask token, as the
    # official code does; infilling promises every gap filled.
    canvas = torch.tensor([[1, 2, 9, 9, 9, 9, 3]])
    out = llada.infill(PredictsTheMask(), canvas, policy=DecodePolicy(commit=commit))
    assert not (out == 9).any()
    assert torch.equal(out[:, [0, 1, 6]], canvas[:, [0, 1, 6]])
    assert (out[0, 2:6] == 5).all()  # the next best prediction
    if commit == "schedule":
        official = llada.generate(PredictsTheMask(), canvas[:, :2], steps=4, gen_length=4, block_length=4)
        assert (official[0, 2:] == 9).any()


@pytest.mark.parametrize("commit", ["schedule", "threshold", "factor", "entropy_bound"])
def test_eos_goes_last_under_every_rule(commit):
    # The surest prediction is EOS at the block's end: committed first, but
    # with confidence_eos_eot_inf only in the step that fills the block.
    model, prompt = PredictsTheMask(mask_logit=0.0), torch.tensor([[1, 2, 3]])
    settings = {"threshold": dict(threshold=0.95), "factor": dict(factor=0.5), "entropy_bound": dict(gamma=1.0)}
    policy = DecodePolicy(commit=commit, **settings.get(commit, {}))
    for stop_last in (False, True):
        events = [e for e in llada.stream(model, prompt, steps=4, gen_length=4, block_length=4,
                                          confidence_eos_eot_inf=stop_last, policy=policy)
                  if isinstance(e, StepEvent)]
        eos_step = next(i for i, e in enumerate(events) if 6 in e.positions())
        assert eos_step == (len(events) - 1 if stop_last else 0)
        assert len(events) > 1


@pytest.mark.parametrize("policy", [
    DecodePolicy(commit="factor", factor=6.0),
    DecodePolicy(commit="entropy_bound", gamma=5.0),
    DecodePolicy(commit="threshold", ranking="entropy", threshold=math.exp(-5.0)),  # entropy <= 5
], ids=["factor", "entropy-bound", "entropy-threshold"])
def test_eos_last_decodes_each_row_as_alone(stop_model, policy):
    # Rules that read the scores' values (not only their order) must not see
    # values that depend on the other rows of the batch.
    prompt = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(steps=16, gen_length=16, block_length=8, confidence_eos_eot_inf=True, policy=policy)
    batch = llada.generate(stop_model, prompt, **kw)
    config = stop_model.config
    assert torch.isin(batch[:, 7:], torch.tensor([config.eos_token_id, config.eot_token_id])).any()
    for row in range(len(prompt)):
        assert torch.equal(llada.generate(stop_model, prompt[row:row + 1], **kw)[0], batch[row])


def test_eos_last_events_report_the_scores_themselves(stop_model):
    # Ranking EOS/EoT last changes which positions are committed, not the
    # scores a step event reports.
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(steps=16, gen_length=16, block_length=8)

    def step_events(stops_last):
        return [e for e in llada.stream(stop_model, prompt, confidence_eos_eot_inf=stops_last, **kw)
                if isinstance(e, StepEvent)]

    plain, stops_last = step_events(False), step_events(True)
    assert torch.equal(stops_last[0].scores, plain[0].scores)  # the same canvas, so the same scores
    committed = torch.cat([e.scores[e.committed] for e in stops_last])
    assert ((committed > 0) & (committed <= 1)).all()


def test_early_stop_ends_a_row_only_on_a_decoded_eos(model):
    # The EOS id also pads rows and may be given text: neither ends a row.
    m, eos = model.config.mask_token_id, model.config.eos_token_id
    padded = torch.tensor([[10, m, m, m, 12, 13, 14, 15], [eos, eos, eos, 20, 21, m, m, m]])
    cases = [(padded, torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]]), 2),
             (torch.tensor([[10, m, eos, m, m, m]]), None, 3)]
    for canvas, mask, block_length in cases:
        outs = [llada.infill(model, canvas, mask, block_length=block_length,
                             policy=DecodePolicy(commit="threshold", early_stop=early))
                for early in (False, True)]
        assert not (outs[0][canvas == m] == eos).any()  # nothing decoded ends a row
        assert torch.equal(outs[1], outs[0])


def test_finished_rows_leave_the_batch():
    model = EndsWhenAskedTo()
    prompt = torch.tensor([[1, 2, 3], [2, 2, 3], [1, 4, 4]])
    policy = DecodePolicy(commit="threshold", threshold=0.3, early_stop=True)
    kw = dict(steps=24, gen_length=24, block_length=8, policy=policy)
    out, stats = llada.generate(model, prompt, **kw, return_stats=True)
    assert (out[[0, 2], 3:] == 8).all() and (out[1, 3:] == 5).all()
    # Rows are independent: the batch gives each row what it gets alone.
    for r in range(3):
        assert torch.equal(out[r], llada.generate(model, prompt[r : r + 1], **kw)[0])
    # Rows 0 and 2 end after the first block and are no longer fed.
    assert stats.nfe == 3
    assert stats.positions == 3 * 27 + 1 * 27 + 1 * 27


def test_finished_rows_leave_a_cached_guided_batch(tmp_path):
    # A checkpoint whose head favours EOS enough that one of four rows ends
    # after its second block; the others go on with the cache and guidance.
    folder = make_checkpoint(tmp_path, seed=5, boost_stop_tokens=8.0, **SHAPES["gqa"])
    model = llada.load_model(folder, dtype=torch.float32)
    prompt = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(0))
    policy = DecodePolicy(commit="threshold", threshold=0.3, early_stop=True, cache="dual")
    out, stats = llada.generate(model, prompt, steps=24, gen_length=24, block_length=8,
                                cfg_scale=1.0, policy=policy, return_stats=True)
    eos = model.config.eos_token_id
    assert not (out == model.config.mask_token_id).any()
    ended = [(row[7:15] == eos).any() or (row[15:23] == eos).any() for row in out]
    assert any(ended) and not all(ended)
    for row, done in zip(out, ended):
        if done:
            assert (row[23:] == eos).all()
    without = llada.generate(model, prompt, steps=24, gen_length=24, block_length=8, cfg_scale=1.0,
                             policy=DecodePolicy(commit="threshold", threshold=0.3, cache="dual"),
                             return_stats=True)[1]
    assert stats.positions < without.positions


WHOLE_BLOCK_CASES = {
    "exact": (DecodePolicy(), {}),
    "exact-guided": (DecodePolicy(), dict(cfg_scale=1.5)),
    "prefix": (DecodePolicy(cache="prefix"), {}),
    "prefix-threshold": (DecodePolicy(commit="threshold", threshold=0.5, cache="prefix"), {}),
    "prefix-refresh": (DecodePolicy(cache="prefix", refresh_every=2), {}),
    "schedule": (DecodePolicy(cache="dual"), {}),
    "threshold": (DecodePolicy.fast(threshold=0.5), {}),
    "factor": (DecodePolicy(commit="factor", cache="dual"), {}),
    "entropy-bound": (DecodePolicy(commit="entropy_bound", gamma=0.5, cache="dual"), {}),
    "margin": (DecodePolicy.fast(ranking="margin", threshold=0.3), {}),
    "entropy-ranking": (DecodePolicy(commit="factor", ranking="entropy", cache="dual"), {}),
    "refresh": (DecodePolicy(cache="dual", refresh_every=3), {}),
    "eos-last": (DecodePolicy(cache="dual"), dict(confidence_eos_eot_inf=True)),
    "eos-last-factor": (DecodePolicy(commit="factor", cache="dual"), dict(confidence_eos_eot_inf=True)),
    "no-eos": (DecodePolicy.fast(threshold=0.5), dict(logits_eos_inf=True)),
    "guided": (DecodePolicy.fast(threshold=0.5), dict(cfg_scale=1.5)),
}


@pytest.fixture(scope="module")
def stop_model(tmp_path_factory):
    """Predicts EOS often: ranking stop tokens last then changes decisions."""
    folder = make_checkpoint(tmp_path_factory.mktemp("stop"), seed=5, boost_stop_tokens=8.0, **SHAPES["gqa"])
    return llada.load_model(folder, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("name", list(WHOLE_BLOCK_CASES))
def test_whole_block_steps_decide_as_queried_row_steps(model, stop_model, monkeypatch, name):
    # Whole-block steps (what a step does on CUDA, to stay free of host
    # syncs) against steps over the queried rows only: the same tokens,
    # forwards and commits, for every cache, rule, ranking and option they
    # serve.
    from llada import sampler

    policy, options = WHOLE_BLOCK_CASES[name]
    if "eos" in name:
        model = stop_model
    prompt, mask = prompt_batch(model)
    kw = dict(steps=16, gen_length=16, block_length=8, policy=policy, return_stats=True, **options)
    want, want_stats = llada.generate(model, prompt, mask, **kw)
    calls = []  # whether whole-block, per forward
    run = sampler._Forward._run
    monkeypatch.setattr(sampler._Forward, "_whole_block_wanted", staticmethod(lambda canvas: True))
    monkeypatch.setattr(sampler._Forward, "_run", lambda self, ids, query, whole: calls.append(whole)
                        or run(self, ids, query, whole))
    got, got_stats = llada.generate(model, prompt, mask, **kw)
    assert torch.equal(got, want)
    assert got_stats == want_stats
    assert len(calls) == want_stats.nfe and all(calls)


@pytest.mark.parametrize("policy", [DecodePolicy(), DecodePolicy.fast(threshold=0.5)], ids=["exact", "fast"])
def test_whole_block_steps_check_only_the_masked_positions_predictions(model, monkeypatch, policy):
    # A whole-block step also predicts the block's decoded positions, which
    # it then ignores: NaN there must not stop the decode, as it does not
    # when only the masked positions are predicted.
    from llada import sampler

    prompt, mask = prompt_batch(model)
    kw = dict(steps=16, gen_length=16, block_length=8, policy=policy)
    want = llada.generate(model, prompt, mask, **kw)
    run = sampler._Forward._run

    def nan_where_decoded(self, ids, query, whole):
        logits = run(self, ids, query, whole)
        if whole:
            rows = slice(None) if self.rows is None else self.rows
            decoded = self.canvas[rows, self.start:self.end] != model.config.mask_token_id
            logits = logits.masked_fill(decoded[:, :, None].repeat(logits.shape[0] // decoded.shape[0], 1, 1),
                                        math.nan)
        return logits

    monkeypatch.setattr(sampler._Forward, "_whole_block_wanted", staticmethod(lambda canvas: True))
    monkeypatch.setattr(sampler._Forward, "_run", nan_where_decoded)
    assert torch.equal(llada.generate(model, prompt, mask, **kw), want)


def test_whole_block_steps_with_finished_rows(tmp_path, monkeypatch):
    # Rows that end early leave the batch: whole-block logits then cover the
    # live rows only, and are laid back onto the full batch.
    from llada import sampler

    folder = make_checkpoint(tmp_path, seed=5, boost_stop_tokens=8.0, **SHAPES["gqa"])
    model = llada.load_model(folder, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(0))
    policy = DecodePolicy(commit="threshold", threshold=0.3, early_stop=True, cache="dual")
    kw = dict(steps=24, gen_length=24, block_length=8, policy=policy, return_stats=True)
    want, want_stats = llada.generate(model, prompt, **kw)
    monkeypatch.setattr(sampler._Forward, "_whole_block_wanted", staticmethod(lambda canvas: True))
    got, got_stats = llada.generate(model, prompt, **kw)
    assert torch.equal(got, want)
    assert got_stats == want_stats
    # Some rows stopped after a block while others went on decoding.
    stopped_early = (want[:, 7 + 16:] == model.config.eos_token_id).all(1)
    assert stopped_early.any() and not stopped_early.all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 3),
    blocks=st.integers(1, 3),
    block_length=st.integers(1, 9),
    steps_per_block=st.integers(1, 6),
    commit=st.sampled_from(["schedule", "threshold", "factor", "entropy_bound"]),
    ranking=st.sampled_from(["probability", "margin", "entropy"]),
    cache=st.sampled_from(["none", "prefix", "dual"]),
    guided=st.booleans(),
    stops_last=st.booleans(),
    early_stop=st.booleans(),
)
def test_whole_block_steps_property(model, monkeypatch, seed, batch, blocks, block_length,
                                    steps_per_block, commit, ranking, cache, guided, stops_last, early_stop):
    from llada import sampler

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (batch, 5), generator=g)
    mask = torch.ones_like(prompt)
    mask[0, : seed % 3] = 0  # some left padding in the first row
    prompt[mask == 0] = model.config.pad_token_id
    setting = {"threshold": dict(threshold=0.4), "factor": dict(factor=1.5),
               "entropy_bound": dict(gamma=0.5)}.get(commit, {})
    if commit == "entropy_bound":
        ranking = "probability"  # the rule orders by entropy itself
    policy = DecodePolicy(commit=commit, ranking=ranking, cache=cache, early_stop=early_stop, **setting)
    steps_per_block = min(steps_per_block, block_length)  # at most one step per position
    kw = dict(steps=blocks * steps_per_block, gen_length=blocks * block_length, block_length=block_length,
              cfg_scale=1.0 if guided else 0.0, confidence_eos_eot_inf=stops_last, policy=policy,
              return_stats=True)
    with monkeypatch.context() as m:
        want, want_stats = llada.generate(model, prompt, mask, **kw)
        m.setattr(sampler._Forward, "_whole_block_wanted", staticmethod(lambda canvas: True))
        got, got_stats = llada.generate(model, prompt, mask, **kw)
    assert torch.equal(got, want)
    assert got_stats == want_stats


class EosAt(StandIn):
    """Predicts token 5 everywhere but EOS at ``eos_at``."""

    def __init__(self, eos_at):
        super().__init__()
        self.eos_at = eos_at

    def logits_of(self, ids):
        logits = torch.zeros(*ids.shape, 10)
        logits[..., 5] = 5.0
        logits[:, self.eos_at, 8] = 6.0
        return logits


@pytest.mark.parametrize("policy", [DecodePolicy(early_stop=True),
                                    DecodePolicy(commit="threshold", early_stop=True)], ids=["schedule", "threshold"])
def test_an_eos_ends_only_its_own_gap_when_infilling(policy):
    # Gap 1 is positions 1-5, gap 2 positions 7-8; blocks of 2. The EOS
    # decoded at 2 ends gap 1 (3-5 become EOS without forwards), but text
    # given after it still needs gap 2 filled.
    canvas = torch.tensor([[1, 9, 9, 9, 9, 9, 3, 9, 9, 2]])
    out, stats = llada.infill(EosAt(2), canvas, block_length=2, policy=policy, return_stats=True)
    assert out.tolist() == [[1, 5, 8, 8, 8, 8, 3, 5, 5, 2]]
    _, full = llada.infill(EosAt(2), canvas, block_length=2, policy=replace(policy, early_stop=False),
                           return_stats=True)
    assert stats.nfe < full.nfe
    # An EOS before given text ends nothing after that text.
    canvas = torch.tensor([[1, 2, 9, 9, 7, 6, 4, 9, 9, 3]])
    assert llada.infill(EosAt(3), canvas, block_length=2, policy=policy).tolist() == [[1, 2, 5, 8, 7, 6, 4, 5, 5, 3]]


class EosWhere(StandIn):
    """Predicts token 5 everywhere but EOS at column ``eos_at[first]`` of a
    row whose first token is ``first`` (keyed by content: finished rows
    leave the batch)."""

    def __init__(self, eos_at):
        super().__init__()
        self.eos_at = eos_at
        self.seen = []  # the ids of every forward

    def logits_of(self, ids):
        self.seen.append(ids.clone())
        logits = torch.zeros(*ids.shape, 10)
        logits[..., 5] = 5.0
        for row, first in enumerate(ids[:, 0].tolist()):
            logits[row, self.eos_at[first], 8] = 6.0
        return logits


@pytest.mark.parametrize("commit", ["threshold", "factor", "entropy_bound"])
def test_the_eos_early_stop_writes_is_never_remasked(commit):
    # Gap 1 is positions 1-6, gap 2 position 8; blocks of 4: [1, 5) and
    # [5, 9). The EOS decoded at 2 ends gap 1 after block 0: 5 and 6 become
    # EOS. Block 1 holds them next to gap 2's mask, and the model gives EOS
    # there a probability far below remask_below (about 0.006), but they are
    # no decoded tokens to correct: the gap ended, and stays so.
    canvas = torch.tensor([[1, 9, 9, 9, 9, 9, 9, 3, 9, 2]])
    model = EosWhere({1: 2})
    policy = DecodePolicy(commit=commit, early_stop=True, remask_below=0.5)
    out = llada.infill(model, canvas, block_length=4, policy=policy)
    assert out.tolist() == [[1, 5, 8, 5, 5, 8, 8, 3, 5, 2]]
    # Block 0's forwards see masks in 1-4; every later one sees the EOS at 5 and 6.
    later = [ids for ids in model.seen if not (ids[0, 1:5] == 9).any()]
    assert later and all(ids[0, 5:7].tolist() == [8, 8] for ids in later)


class Replay:
    """Rebuilds a decode's canvas from ``start`` by its step events alone,
    applied as StepEvent documents: the committed positions take their
    tokens, then the re-masked ones the mask, then the filled ones EOS."""

    def __init__(self, start, mask_id, eos_id):
        self.canvas, self.mask_id, self.eos_id = start.clone(), mask_id, eos_id
        self.filled = 0  # positions the events reported filled

    def watch(self, events):
        for event in events:
            if isinstance(event, StepEvent):
                self.canvas[event.committed] = event.canvas[event.committed]
                if event.remasked is not None:
                    self.canvas[event.remasked] = self.mask_id
                if event.filled is not None:
                    self.canvas[event.filled] = self.eos_id
                    self.filled += int(event.filled.sum())
            yield event


EARLY_STOP_POLICIES = {
    "schedule": DecodePolicy(early_stop=True),
    "threshold": DecodePolicy(commit="threshold", threshold=0.3, early_stop=True),
    "factor": DecodePolicy(commit="factor", early_stop=True),
    "entropy-bound": DecodePolicy(commit="entropy_bound", gamma=0.5, early_stop=True),
    "remask": DecodePolicy(commit="threshold", threshold=0.3, remask_below=0.2, early_stop=True),
    "prefix": DecodePolicy(commit="threshold", threshold=0.3, cache="prefix", early_stop=True),
    "dual-remask": DecodePolicy.fast(threshold=0.3, remask_below=0.2, early_stop=True),
}


@pytest.mark.parametrize("name", list(EARLY_STOP_POLICIES))
def test_step_events_replay_to_the_output_with_early_stop(stop_model, name):
    # Row 1 holds EOS at the end of its second block (under every one of
    # these policies): early stop makes its third block EOS, which its
    # block's last step event reports. The other rows decode on.
    config = stop_model.config
    prompt = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    mask[2, :2] = 0
    prompt[mask == 0] = config.pad_token_id
    kw = dict(steps=24, gen_length=24, block_length=8, policy=EARLY_STOP_POLICIES[name])
    want = llada.generate(stop_model, prompt, mask, **kw)
    start = torch.cat([prompt, torch.full((4, 24), config.mask_token_id)], dim=1)
    replay = Replay(start, config.mask_token_id, config.eos_token_id)
    for _ in replay.watch(llada.stream(stop_model, prompt, mask, **kw)):
        pass
    assert torch.equal(replay.canvas, want)
    assert replay.filled > 0
    ended = (want[:, 7 + 16:] == config.eos_token_id).all(1)
    assert ended.tolist() == [False, True, False, False]


@pytest.mark.parametrize("policy", [DecodePolicy(early_stop=True),
                                    DecodePolicy(commit="threshold", early_stop=True),
                                    DecodePolicy(commit="factor", early_stop=True),
                                    DecodePolicy(commit="entropy_bound", early_stop=True),
                                    DecodePolicy(commit="threshold", early_stop=True, remask_below=0.5)],
                         ids=["schedule", "threshold", "factor", "entropy-bound", "remask"])
def test_infill_step_events_replay_to_the_output_with_early_stop(monkeypatch, policy):
    # Blocks of 4: [1, 5) and [5, 9). Row 0's EOS at 2 ends its first gap
    # (5 and 6 become EOS), and its second gap is still filled; row 1's EOS
    # at 3 ends its only gap (5-8 become EOS), and the row.
    from llada import sampler

    canvas = torch.tensor([[1, 9, 9, 9, 9, 9, 9, 3, 9, 2],
                           [4, 6, 9, 9, 9, 9, 9, 9, 9, 2]])
    replay = Replay(canvas, 9, 8)
    decode = sampler._decode
    monkeypatch.setattr(sampler, "_decode", lambda *args, **kwargs: replay.watch(decode(*args, **kwargs)))
    out = llada.infill(EosWhere({1: 2, 4: 3}), canvas, block_length=4, policy=policy)
    assert out.tolist() == [[1, 5, 8, 5, 5, 8, 8, 3, 5, 2],
                            [4, 6, 5, 8, 5, 8, 8, 8, 8, 2]]
    assert torch.equal(replay.canvas, out)
    assert replay.filled == 2 + 4


class SharperByPosition(StandIn):
    """Predicts token 5 everywhere, with logit ``sharpness[position]`` (every
    other token's is 0): the larger, the lower the entropy."""

    def __init__(self, sharpness):
        super().__init__()
        self.sharpness = torch.tensor(sharpness, dtype=torch.float32)

    def logits_of(self, ids):
        logits = torch.zeros(*ids.shape, 10)
        logits[..., 5] = self.sharpness[: ids.shape[1]]
        return logits


def test_the_entropy_score_exceeds_the_top1_probability_only_by_rounding():
    # exp(-H) <= p_max, with equality for a prediction uniform over its m
    # likeliest tokens: there float32 may put it a few units in the last
    # place above, never more. The top-1 probability is computed here in
    # float64 from the logits, over LLaDA's vocabulary.
    vocab = 126464
    sizes = [1, 2, 3, 7, 19, 100, 1000, 4096, 50000, vocab - 1, vocab]
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.full((len(sizes), vocab), -1e4),
                        torch.randn(64, vocab, generator=g) * torch.rand(64, 1, generator=g) * 20])
    for row, m in enumerate(sizes):
        logits[row, :m] = 3.0
    score = ranking_scores(llada.ops.sample_tokens(logits), "entropy", None).double()
    p_max = torch.softmax(logits.double(), dim=-1).amax(-1)
    assert (score <= p_max * (1 + 8 * 2**-24)).all()
    uniform = score[: len(sizes)]
    torch.testing.assert_close(uniform, p_max[: len(sizes)], rtol=8 * 2**-24, atol=0)


@pytest.mark.parametrize("commit", ["threshold", "factor"])
def test_the_entropy_ranking_lets_a_rule_commit_many_tokens_per_step(commit):
    # The entropy ranking scores exp(-entropy), in (0, 1]: the threshold
    # (0.9) and factor (1.0) rules commit every position it qualifies, as
    # they do with a probability. The model's logits do not depend on the
    # ids, so each step's commits follow from the scores, computed here in
    # float64 (the adaptive rules leave the mask token, 9, out).
    sharpness = [0.0] * 3 + [9.0, 2.0, 7.0, 6.0, 10.0, 1.0, 8.0, 3.0]
    model = SharperByPosition(sharpness)
    logits = model.logits_of(torch.zeros(1, 11, dtype=torch.long))[0].double()
    logits[:, 9] = -math.inf
    p = torch.softmax(logits, dim=-1)
    score = torch.exp(torch.where(p > 0, p * p.log(), 0.0).sum(-1))
    # exp(-H) <= the top-1 probability: here position 6 passes 0.9 by
    # probability (0.981), not by exp(-entropy) (0.872).
    assert (score <= p.max(-1).values).all()
    assert p[6].max() > 0.9 > score[6]

    want, left = [], set(range(3, 11))
    while left:
        ranked = sorted(left, key=lambda i: (-float(score[i]), i))
        if commit == "threshold":
            n = max(1, sum(float(score[i]) >= 0.9 for i in ranked))
        else:
            n = max([j + 1 for j, i in enumerate(ranked) if (j + 2) * (1 - float(score[i])) < 1.0], default=1)
        want.append(sorted(ranked[:n]))
        left -= set(ranked[:n])
    assert want[0] == ([3, 5, 7, 9] if commit == "threshold" else [3, 5, 6, 7, 9])

    events = [e for e in llada.stream(model, torch.tensor([[1, 2, 3]]), steps=8, gen_length=8, block_length=8,
                                      policy=DecodePolicy(commit=commit, ranking="entropy"))
              if isinstance(e, StepEvent)]
    assert [e.positions() for e in events] == want
    for e in events:
        torch.testing.assert_close(e.scores[0, e.committed[0]], score[e.committed[0]].float())


def test_block_events_cover_the_canvas_after_every_row_stopped():
    # The row predicts EOS everywhere, so early stop ends it in block 0; the
    # later blocks still get their (free) events, so the events' tokens are
    # the whole answer.
    prompt = torch.tensor([[1, 2, 3]])
    kw = dict(steps=24, gen_length=24, block_length=8,
              policy=DecodePolicy(commit="threshold", threshold=0.3, early_stop=True))
    out, stats = llada.generate(EndsWhenAskedTo(), prompt, return_stats=True, **kw)
    blocks = [e for e in llada.stream(EndsWhenAskedTo(), prompt, **kw) if isinstance(e, BlockEvent)]
    assert [e.block for e in blocks] == [0, 1, 2]
    assert torch.equal(torch.cat([e.tokens for e in blocks], dim=1), out[:, 3:])
    assert blocks[1].nfe == blocks[2].nfe == blocks[0].nfe == stats.nfe
    assert all(bool(e.finished.all()) for e in blocks)


def official_stops_last(scores, stop, k):
    """Per row, the first k candidates ordered by (is stop, -score, position)."""
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for row in range(scores.shape[0]):
        cand = [i for i in range(scores.shape[1]) if scores[row, i] > -math.inf]
        ranked = sorted(cand, key=lambda i: (bool(stop[row, i]), -float(scores[row, i]), i))
        out[row, ranked[:int(k[row])]] = True
    return out


def test_schedule_ranks_stop_predictions_last_exactly():
    # Row 0's stop predictions differ by one float32 step: a shift by the
    # batch's score range would round them into a tie, set by the other row.
    a = torch.tensor(0.75)
    b = torch.nextafter(a, torch.tensor(1.0))
    scores = torch.tensor([[0.0, 0.0], [1.0, 1 / 61]])
    scores[0] = torch.stack([a, b])
    stop = torch.tensor([[True, True], [False, False]])
    policy = DecodePolicy()
    for k in (1, torch.tensor([1, 1])):
        assert select(policy, scores, None, k, stop).tolist() == [[False, True], [True, False]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        b, width = 3, 7
        scores = torch.randint(0, 4, (b, width), generator=generator).float() / 4  # many ties
        scores[torch.rand(b, width, generator=generator) < 0.3] = -math.inf
        scores[torch.rand(b, width, generator=generator) < 0.1] = math.nan
        stop = torch.rand(b, width, generator=generator) < 0.4
        k = torch.randint(0, width + 2, (b,), generator=generator)
        assert torch.equal(select(policy, scores, None, k, stop), official_stops_last(scores, stop, k))


class GivesSomeTokensMinusInfinity(StandIn):
    """Random logits (a function of the ids), with tokens 2-4 at ``never``."""

    def __init__(self, never):
        super().__init__()
        self.never = never

    def logits_of(self, ids):
        generator = torch.Generator().manual_seed(int(ids.sum()))
        logits = torch.randn(*ids.shape, 10, generator=generator)
        logits[..., 2:5] = self.never
        return logits


@pytest.mark.parametrize("policy", ["exact", DecodePolicy(commit="threshold")])
def test_guidance_keeps_tokens_the_model_never_predicts_out(policy):
    # -inf in both halves is -inf guided (not -inf - -inf = NaN): the same
    # decode as with a finite logit too small to ever be chosen.
    prompt = torch.tensor([[1, 6, 3]])
    kw = dict(steps=4, gen_length=4, block_length=4, cfg_scale=1.0, policy=policy)
    out = llada.generate(GivesSomeTokensMinusInfinity(-math.inf), prompt, **kw)
    assert torch.equal(out, llada.generate(GivesSomeTokensMinusInfinity(-1e30), prompt, **kw))
