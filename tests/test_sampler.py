"""llada.generate against the naive official sampler, token for token."""

import pytest
import torch

import llada
from llada.sampler import StepEvent, transfer_schedule

from checkpoints import SHAPES, make_checkpoint
from naive_llada import NaiveLLaDA, naive_generate, transfer_counts

SETTINGS = {
    "one-block": dict(steps=16, gen_length=16, block_length=16),
    "two-per-step": dict(steps=8, gen_length=16, block_length=16),
    "semi-ar": dict(steps=9, gen_length=24, block_length=8),
    "uneven": dict(steps=10, gen_length=20, block_length=10),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), seed=11, **SHAPES[request.param])


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory):
    """Predicts EOS and EoT at a good share of positions."""
    return make_checkpoint(tmp_path_factory.mktemp("eos"), seed=4, boost_stop_tokens=3.0, **SHAPES["gqa"])


def prompts(cfg, padded, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
        mask[2, :8] = 0
        ids[mask == 0] = cfg.pad_token_id
        return ids, mask
    return ids[:1], None


def check_against_oracle(folder, padded=False, device="cpu", **kw):
    model = llada.load_model(folder, device=device, dtype=torch.float32)
    oracle = NaiveLLaDA(folder)
    cfg = model.config
    prompt, mask = prompts(cfg, padded)
    got = llada.generate(model, prompt, mask, **kw).cpu()
    want = naive_generate(
        oracle.forward, prompt, mask, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
        eot_id=oracle.eot_id, **kw,
    )
    assert got.shape == (prompt.shape[0], prompt.shape[1] + kw["gen_length"])
    assert not (got == cfg.mask_token_id).any()
    assert torch.equal(got, want)
    return got


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("padded", [False, True], ids=["single", "left-padded"])
def test_greedy_matches_official(checkpoint, setting, padded):
    check_against_oracle(checkpoint, padded, **SETTINGS[setting])


def test_greedy_matches_official_on_device(checkpoint, device):
    check_against_oracle(checkpoint, True, device=device, **SETTINGS["semi-ar"])


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "mask"])
def test_cfg_matches_official(checkpoint, padded):
    out = check_against_oracle(checkpoint, padded, cfg_scale=1.5, **SETTINGS["semi-ar"])
    plain = llada.generate(llada.load_model(checkpoint, device="cpu"), *prompts(
        llada.load_config(checkpoint), padded), **SETTINGS["semi-ar"])
    assert not torch.equal(out, plain)  # guidance changed something


def test_confidence_eos_eot_inf_ranks_stop_tokens_last(eos_checkpoint):
    cfg = llada.load_config(eos_checkpoint)
    stops = torch.tensor([cfg.eos_token_id, cfg.eot_token_id])
    kw = dict(SETTINGS["two-per-step"], padded=True)
    last = check_against_oracle(eos_checkpoint, confidence_eos_eot_inf=True, **kw)
    plain = check_against_oracle(eos_checkpoint, **kw)
    assert torch.isin(last, stops).any()  # stop tokens are still committed
    assert not torch.equal(last, plain)


def test_confidence_eos_eot_inf_order_within_a_step(eos_checkpoint):
    """Whenever a step commits a stop-token prediction, every position the
    step leaves masked was also predicting a stop token (one block)."""
    model = llada.load_model(eos_checkpoint, device="cpu")
    cfg = model.config
    prompt, mask = prompts(cfg, padded=True)
    stops = torch.tensor([cfg.eos_token_id, cfg.eot_token_id])
    full_mask = torch.cat([mask, torch.ones(3, 16, dtype=torch.long)], 1)
    canvases = []
    llada.generate(model, prompt, mask, steps=8, gen_length=16, block_length=16,
                   confidence_eos_eot_inf=True, on_step=lambda s, n, c: canvases.append(c.clone()))
    before = torch.cat([prompt, torch.full((3, 16), cfg.mask_token_id)], 1)
    checked = 0
    for canvas in canvases:
        pred = model(before, full_mask).logits.argmax(-1)
        new = (before == cfg.mask_token_id) & (canvas != cfg.mask_token_id)
        left = canvas == cfg.mask_token_id
        assert torch.equal(canvas[new], pred[new])
        for r in range(3):
            if torch.isin(canvas[r][new[r]], stops).any():
                checked += 1
                assert torch.isin(pred[r][left[r]], stops).all()
        before = canvas
    assert checked > 0


def test_logits_eos_inf_never_predicts_eos(eos_checkpoint):
    out = check_against_oracle(eos_checkpoint, True, logits_eos_inf=True, **SETTINGS["semi-ar"])
    assert not (out[:, 9:] == llada.load_config(eos_checkpoint).eos_token_id).any()


def test_random_remasking_matches_documented_stream(checkpoint):
    a = check_against_oracle(checkpoint, True, remasking="random", seed=5, **SETTINGS["semi-ar"])
    b = check_against_oracle(checkpoint, True, remasking="random", seed=6, **SETTINGS["semi-ar"])
    assert not torch.equal(a, b)


def test_temperature_is_reproducible_and_valid(checkpoint):
    model = llada.load_model(checkpoint, device="cpu")
    cfg = model.config
    prompt, mask = prompts(cfg, padded=True)
    kw = dict(SETTINGS["semi-ar"], temperature=1.0)
    a = llada.generate(model, prompt, mask, seed=1, **kw)
    assert torch.equal(a, llada.generate(model, prompt, mask, seed=1, **kw))
    assert not torch.equal(a, llada.generate(model, prompt, mask, seed=2, **kw))
    assert torch.equal(a[:, :9], prompt)
    # Valid ids (the fixed schedule, as the official algorithm, may commit
    # the mask id when a random model samples it).
    assert ((a >= 0) & (a < cfg.embedding_size)).all()
    # A vanishing temperature is the greedy decoder, also where logits / T
    # would overflow float32.
    greedy = llada.generate(model, prompt, mask, **SETTINGS["semi-ar"])
    for tiny in (1e-6, 1e-38):
        assert torch.equal(llada.generate(model, prompt, mask, seed=3, **dict(kw, temperature=tiny)), greedy)


@pytest.mark.parametrize("temperature,seed,row_keys", [(1.0, 2, None), (1.0, 3, None), (0.5, 4, [5, 0, 7])],
                         ids=["seed2", "seed3", "row-keys"])
def test_temperature_matches_documented_noise(checkpoint, temperature, seed, row_keys):
    """Sampling against the oracle's Gumbel-max over the documented noise,
    keyed by the seed, the step of its block, the row (or its key) and the
    place in the answer: a left-padded batch, three blocks of three steps.

    Exact equality is safe here: llada scores in float32 and the oracle in
    float64, but in these cases (fixed checkpoints, prompts and seeds) the
    best and second-best noisy scores of every sampled position are at least
    2.8e-3 apart and the confidences on either side of every step's cut at
    least 7e-5, far above float32 rounding. The seeds are ones where the
    random checkpoints never sample the mask id (llada keeps a committed mask
    token, the official algorithm fills it again: a documented difference)."""
    out = check_against_oracle(checkpoint, True, temperature=temperature, seed=seed, row_keys=row_keys,
                               **SETTINGS["semi-ar"])
    greedy = llada.generate(llada.load_model(checkpoint, device="cpu"), *prompts(
        llada.load_config(checkpoint), padded=True), **SETTINGS["semi-ar"])
    assert not torch.equal(out, greedy)  # the noise changed something


@pytest.mark.parametrize("policy", [None, llada.DecodePolicy(commit="threshold", threshold=0.5)],
                         ids=["schedule", "threshold"])
def test_row_keys_key_each_rows_noise_in_place_of_its_batch_row(checkpoint, policy):
    # The reference is the default keying: row k of a batch of copies of one
    # prompt samples with key k. A row given key k alone must sample the same.
    model = llada.load_model(checkpoint, device="cpu")
    prompt = prompts(model.config, padded=False)[0]
    kw = dict(SETTINGS["semi-ar"], temperature=1.0, seed=4, policy=policy)
    copies = llada.generate(model, prompt.repeat(5, 1), **kw)
    assert len({tuple(row.tolist()) for row in copies}) == 5  # copies are different samples
    for k in range(5):
        assert torch.equal(llada.generate(model, prompt, row_keys=[k], **kw)[0], copies[k]), k
    assert torch.equal(llada.generate(model, prompt.repeat(2, 1), row_keys=(4, 1), **kw), copies[[4, 1]])
    events = llada.stream(model, prompt.repeat(2, 1), row_keys=torch.tensor([3, 2]), **kw)
    *_, last = (event.canvas.clone() for event in events if isinstance(event, StepEvent))
    assert torch.equal(last, copies[[3, 2]])
    # Without row_keys (or with the default ones) nothing changes.
    assert torch.equal(llada.generate(model, prompt.repeat(5, 1), row_keys=range(5), **kw), copies)


def test_schedule_matches_official(checkpoint):
    for n, steps in [(16, 16), (16, 5), (3, 4), (0, 2), (7, 7)]:
        got = transfer_schedule(torch.tensor([n]), steps)[0].tolist()
        assert got == transfer_counts(n, steps)
    model = llada.load_model(checkpoint, device="cpu")
    prompt, mask = prompts(model.config, padded=True)
    masked = []
    llada.generate(model, prompt, mask, steps=6, gen_length=20, block_length=10,
                   on_step=lambda s, n, c: masked.append((c == model.config.mask_token_id).sum(1)))
    left = [20 - sum(transfer_counts(10, 3)[: s + 1]) for s in range(3)]
    left += [10 - sum(transfer_counts(10, 3)[: s + 1]) for s in range(3)]
    assert [m.tolist() for m in masked] == [[x] * 3 for x in left]


def test_foreign_model_without_logits_at(checkpoint):
    """Any model with the HF interface works (full logits, rows picked after)."""
    model = llada.load_model(checkpoint, device="cpu")

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.config = model.config

        def forward(self, ids, attention_mask=None):
            return self.inner(ids, attention_mask)

    prompt, mask = prompts(model.config, padded=True)
    kw = SETTINGS["semi-ar"]
    assert torch.equal(llada.generate(Wrapped(), prompt, mask, **kw), llada.generate(model, prompt, mask, **kw))


def test_inputs_are_not_modified(checkpoint):
    model = llada.load_model(checkpoint, device="cpu")
    prompt, mask = prompts(model.config, padded=True)
    p0, m0 = prompt.clone(), mask.clone()
    out = llada.generate(model, prompt, mask, cfg_scale=1.0, **SETTINGS["semi-ar"])
    assert torch.equal(prompt, p0) and torch.equal(mask, m0)
    assert out.data_ptr() != prompt.data_ptr()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(gen_length=20, block_length=8), ValueError, "block_length"),
    (dict(steps=5, gen_length=16, block_length=8), ValueError, "number of blocks"),
    (dict(steps=32, gen_length=16, block_length=16), ValueError, "steps"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=8.0), TypeError, "steps"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(cfg_scale=float("nan")), ValueError, "cfg_scale"),
    (dict(remasking="top"), ValueError, "remasking"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(logits_eos_inf="yes"), TypeError, "logits_eos_inf"),
    (dict(confidence_eos_eot_inf=1), TypeError, "confidence_eos_eot_inf"),
    (dict(on_step=5), TypeError, "on_step"),
    (dict(return_stats="yes"), TypeError, "return_stats"),
    (dict(remasking="random", policy=llada.DecodePolicy(ranking="margin")), ValueError, "remasking"),
    (dict(gen_length=1024, block_length=1024, steps=8), ValueError, "max_sequence_length"),
    (dict(prompt=[[1, 2]]), TypeError, "prompt"),
    (dict(prompt=torch.ones(1, 3)), TypeError, "prompt"),
    (dict(prompt=torch.ones(3, dtype=torch.long)), ValueError, "prompt"),
    (dict(prompt=torch.ones(0, 3, dtype=torch.long)), ValueError, "empty"),
    (dict(prompt=torch.tensor([[1, 271]])), ValueError, "mask id"),
    (dict(prompt=torch.tensor([[1, 999]])), ValueError, "prompt"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.full((1, 3), 2)), ValueError, "attention_mask"),
    (dict(attention_mask="yes"), TypeError, "attention_mask"),
    (dict(row_keys=[0, 1]), ValueError, r"row_keys: expected one key per batch row \(1\), got 2"),
    (dict(row_keys=5), TypeError, "row_keys: expected a list of ints"),
    (dict(row_keys=[1.0]), TypeError, r"row_keys\[0\]: expected an int"),
    (dict(row_keys=[-1]), ValueError, r"row_keys\[0\]: expected an int in \[0, "),
    (dict(row_keys=[2**63 // 16]), ValueError, rf"row_keys\[0\]: expected an int in \[0, {2**63 // 16}\)"),
    (dict(row_keys=torch.tensor([[0]])), TypeError, "row_keys: expected a 1-D integer tensor"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    model = llada.load_model(make_checkpoint(tmp_path), device="cpu")
    args = dict(prompt=torch.tensor([[1, 2, 3]]), steps=8, gen_length=16, block_length=16)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        llada.generate(model, **args)


def test_an_engine_is_refused_with_the_way_to_its_model(tmp_path):
    # Before, generate failed reading the Engine's parameters.
    engine = llada.load(make_checkpoint(tmp_path), device="cpu")
    prompt = torch.tensor([[1, 2, 3]])
    calls = {
        "generate": lambda: llada.generate(engine, prompt, steps=4, gen_length=4, block_length=4),
        "stream": lambda: next(llada.stream(engine, prompt, steps=4, gen_length=4, block_length=4)),
        "infill": lambda: llada.infill(engine, torch.tensor([1, engine.model.config.mask_token_id, 3])),
    }
    for method, call in calls.items():
        with pytest.raises(TypeError, match=rf"^model: expected a model .*got an Engine: pass engine\.model, "
                                            rf"or call engine\.{method}\(\.\.\.\), which takes text$"):
            call()


@pytest.mark.parametrize("model,message", [
    (None, r"^model: expected a model called as model\(ids\)\.logits .*got NoneType$"),
    ({"weight": torch.zeros(2)}, r"^model: expected a model called as model\(ids\)\.logits .*got dict$"),
    # Callable, but nothing says which device the canvas goes to.
    (lambda ids, attention_mask=None: None,
     r"^model: expected a `device` attribute or a parameter .*got function with neither$"),
    (torch.nn.Identity(), r"^model: expected a `device` attribute or a parameter .*got Identity with neither$"),
])
def test_what_is_no_model_is_refused_by_name(model, message):
    with pytest.raises(TypeError, match=message):
        llada.generate(model, torch.tensor([[1, 2, 3]]), steps=4, gen_length=4, block_length=4, mask_id=0)


def test_numpy_integers_are_ints(checkpoint):
    # A numpy seed must not overflow the per-step noise keys (Python ints do not).
    np = pytest.importorskip("numpy")
    model = llada.load_model(checkpoint, device="cpu")
    prompt, mask = prompts(model.config, padded=True)
    for kw in (dict(temperature=1.0), dict(remasking="random")):
        kw.update(SETTINGS["semi-ar"])
        want = llada.generate(model, prompt, mask, seed=3, **kw)
        got = llada.generate(model, prompt, mask, seed=np.int64(3),
                             **dict(kw, steps=np.int64(kw["steps"]), block_length=np.int32(kw["block_length"])))
        assert torch.equal(got, want)
    m = model.config.mask_token_id
    canvas = torch.tensor([1, 2, m, m, 3])
    want = llada.infill(model, canvas, temperature=1.0, seed=5)
    assert torch.equal(llada.infill(model, canvas, temperature=1.0, seed=np.int64(5), block_length=np.int64(2)),
                       llada.infill(model, canvas, temperature=1.0, seed=5, block_length=2))
    # Any integer dtype is a canvas, as it is a prompt; the result is int64.
    got = llada.infill(model, canvas.int(), temperature=1.0, seed=5)
    assert got.dtype == torch.long and torch.equal(got, want)


def test_a_numpy_gen_length_with_row_keys(checkpoint):
    # The row keys' bound, 2**63 // gen_length, is a Python int past int64:
    # a numpy gen_length must not turn it into numpy arithmetic.
    np = pytest.importorskip("numpy")
    model = llada.load_model(checkpoint, device="cpu")
    prompt, mask = prompts(model.config, padded=True)
    kw = dict(steps=9, block_length=8, temperature=1.0, seed=3, return_stats=True,
              policy=llada.DecodePolicy(cache="dual"))
    want, want_stats = llada.generate(model, prompt, mask, gen_length=24, row_keys=[5, 0, 7], **kw)
    got, got_stats = llada.generate(model, prompt, mask, gen_length=np.int64(24),
                                    row_keys=[np.int64(5), 0, 7], **kw)
    assert torch.equal(got, want) and got_stats == want_stats
    assert type(got_stats.positions) is int
    with pytest.raises(ValueError, match=rf"row_keys\[0\]: expected an int in \[0, {2**63 // 24}\)"):
        llada.generate(model, prompt[:1], gen_length=np.int64(24), row_keys=[2**63 // 24], **kw)


def test_on_step_total_is_the_schedules_step_count_or_none(checkpoint):
    model = llada.load_model(checkpoint, device="cpu")
    prompt, mask = prompts(model.config, padded=True)
    totals = {}
    for policy in ("exact", llada.DecodePolicy(commit="threshold")):
        seen = set()
        llada.generate(model, prompt, mask, policy=policy, on_step=lambda s, n, c: seen.add(n),
                       **SETTINGS["semi-ar"])
        totals[str(policy)] = seen
    assert list(totals.values()) == [{SETTINGS["semi-ar"]["steps"]}, {None}]
