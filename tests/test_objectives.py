"""The training losses and the likelihood estimator, against direct sums."""

import math

import numpy as np
import pytest
import torch

from llada.likelihood import log_likelihood, stratified_mask_counts
from llada.objectives import corrupt, pretraining_loss, sft_loss

MASK = 7
VOCAB = 11


class FixedLogits(torch.nn.Module):
    """A stand-in model: returns preset logits and records what it was fed."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.seen = []
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the device

    def forward(self, ids):
        self.seen.append(ids.clone())
        return type("Out", (), {"logits": self.logits[:, : ids.shape[1]]})()


class Unigram(torch.nn.Module):
    """Predicts every position with the same distribution q, whatever the
    context, so log p(answer) is exactly sum(log q[answer]) and the ELBO is
    unbiased for it."""

    def __init__(self, q):
        super().__init__()
        self.log_q = torch.nn.Parameter(q.log())
        self.config = type("Config", (), {"mask_token_id": MASK, "embedding_size": VOCAB,
                                          "max_sequence_length": 16})()

    def forward(self, ids):
        b, l = ids.shape
        return type("Out", (), {"logits": self.log_q.expand(b, l, -1)})()


def direct_loss(logits, targets, noisy, weight_of_row):
    total = 0.0
    for b in range(targets.shape[0]):
        for i in range(targets.shape[1]):
            if noisy[b, i] == MASK:
                log_p = torch.log_softmax(logits[b, i].double(), dim=0)[targets[b, i]]
                total += -float(log_p) * weight_of_row[b]
    return total


def test_pretraining_loss_matches_direct_sum():
    torch.manual_seed(0)
    ids = torch.randint(0, MASK, (3, 9))
    logits = torch.randn(3, 9, VOCAB)
    model = FixedLogits(logits)
    t = torch.tensor([0.2, 0.5, 0.9])
    loss = pretraining_loss(model, ids, MASK, eps=1e-3, crop_probability=0.0, t=t)
    p = (1 - 1e-3) * t + 1e-3
    want = direct_loss(logits, ids, model.seen[0], [1 / float(pb) for pb in p]) / ids.numel()
    assert math.isclose(float(loss), want, rel_tol=1e-5)


def test_sft_loss_matches_direct_sum_and_never_masks_prompt():
    torch.manual_seed(1)
    ids = torch.randint(0, MASK, (2, 10))
    logits = torch.randn(2, 10, VOCAB)
    model = FixedLogits(logits)
    prompt_lengths = torch.tensor([3, 6])
    t = torch.tensor([0.99, 0.99])
    loss = sft_loss(model, ids, prompt_lengths, MASK, t=t)
    noisy = model.seen[0]
    assert torch.equal(noisy[0, :3], ids[0, :3]) and torch.equal(noisy[1, :6], ids[1, :6])
    assert (noisy[0, 3:] == MASK).sum() > 0
    p = (1 - 1e-3) * 0.99 + 1e-3
    weights = [1 / (p * (10 - 3)), 1 / (p * (10 - 6))]
    want = direct_loss(logits, ids, noisy, weights) / 2
    assert math.isclose(float(loss), want, rel_tol=1e-5)


def test_corruption_rate_follows_t():
    g = torch.Generator().manual_seed(2)
    ids = torch.zeros(4, 20000, dtype=torch.long)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    c = corrupt(ids, MASK, eps=1e-3, t=t, generator=g)
    want = torch.tensor([0.001, 0.25075, 0.5005, 1.0])  # (1 - eps) t + eps, by hand
    torch.testing.assert_close(c.p_mask, want)
    rate = c.masked.float().mean(dim=1)
    assert torch.allclose(rate, want, atol=0.015)
    # At t = 0 only eps masks: about 20 of 20000 (atol alone cannot tell eps from 0).
    assert 5 <= int(c.masked[0].sum()) <= 60 and bool(c.masked[3].all())
    assert torch.equal(c.masked, c.noisy == MASK) and bool((c.noisy[~c.masked] == 0).all())


def replayed_times(seed, batch, length=None):
    """The diffusion times a loss given ``torch.Generator().manual_seed(seed)``
    draws, replayed on a fresh generator: first the crop's two draws (when
    ``length`` is given, a crop to a length that must come out), then t, in
    float64."""
    replay = torch.Generator().manual_seed(seed)
    if length is not None:
        assert float(torch.rand((), generator=replay)) < 1.0
        assert int(torch.randint(1, length + 1, (), generator=replay)) <= length
    return torch.rand(batch, generator=replay).double()


def test_drawn_times_are_uniform_on_zero_to_one():
    eps, n = 1e-3, 200_000
    c = corrupt(torch.zeros(n, 1, dtype=torch.long), MASK, eps=eps, generator=torch.Generator().manual_seed(5))
    # t is the first draw from the generator: p = (1 - eps) t + eps with exactly that t.
    t = torch.rand(n, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c.p_mask, (1 - eps) * t + eps)
    # And t is U(0, 1): the times p_mask stands for, sorted, follow the uniform CDF
    # (Kolmogorov-Smirnov distance; about 0.003 is typical for n = 200000, 0.5 for U(0, 0.5)).
    times = ((c.p_mask.double() - eps) / (1 - eps)).sort().values
    assert float(times[0]) >= -1e-6 and float(times[-1]) <= 1 + 1e-6
    ranks = torch.arange(n, dtype=torch.float64)
    distance = torch.maximum((ranks + 1) / n - times, times - ranks / n).max()
    assert float(distance) < 0.01
    assert abs(float(times.mean()) - 0.5) < 0.005 and float(times[-1]) > 0.99
    # Each position is masked with its row's p: about E[p] = (1 - eps) / 2 + eps of them.
    assert abs(float(c.masked.double().mean()) - ((1 - eps) / 2 + eps)) < 0.006


@pytest.mark.parametrize("crop_probability, seed", [(0.0, 8), (1.0, 9)])
def test_pretraining_loss_with_drawn_times_matches_direct_sum(crop_probability, seed):
    torch.manual_seed(6)
    b, l = 4, 12
    ids = torch.randint(0, MASK, (b, l))
    logits = torch.randn(b, l, VOCAB)
    model = FixedLogits(logits)
    loss = pretraining_loss(model, ids, MASK, eps=1e-3, crop_probability=crop_probability,
                            generator=torch.Generator().manual_seed(seed))
    noisy = model.seen[0]
    length = noisy.shape[1]
    assert length == l or crop_probability == 1.0
    t = replayed_times(seed, b, l if crop_probability == 1.0 else None)
    p = (1 - 1e-3) * t + 1e-3
    want = direct_loss(logits, ids[:, :length], noisy, [1 / float(pb) for pb in p]) / (b * length)
    assert want > 0  # some positions were masked
    assert math.isclose(float(loss), want, rel_tol=1e-5)


def test_sft_loss_with_drawn_times_matches_direct_sum():
    torch.manual_seed(7)
    b, l = 4, 12
    ids = torch.randint(0, MASK, (b, l))
    logits = torch.randn(b, l, VOCAB)
    model = FixedLogits(logits)
    prompt_lengths = [0, 3, 6, 11]
    loss = sft_loss(model, ids, torch.tensor(prompt_lengths), MASK, eps=1e-3,
                    generator=torch.Generator().manual_seed(10))
    p = (1 - 1e-3) * replayed_times(10, b) + 1e-3
    weights = [1 / (float(p[row]) * (l - prompt_lengths[row])) for row in range(b)]
    want = direct_loss(logits, ids, model.seen[0], weights) / b
    assert want > 0
    assert math.isclose(float(loss), want, rel_tol=1e-5)


def test_pretraining_crop_shortens_the_batch():
    model = FixedLogits(torch.randn(2, 50, VOCAB))
    ids = torch.randint(0, MASK, (2, 50))
    g = torch.Generator().manual_seed(3)
    pretraining_loss(model, ids, MASK, crop_probability=1.0, generator=g)
    assert model.seen[0].shape[1] < 50


def test_stratified_counts_cover_the_range():
    g = torch.Generator().manual_seed(4)
    counts = stratified_mask_counts(16, 40, g)
    assert counts.min() >= 1 and counts.max() <= 40
    assert len(set(counts.tolist())) == 16  # evenly spaced, no repeats


@pytest.mark.parametrize("batch, length", [(16, 4), (16, 8), (4, 10), (2, 3), (16, 40), (7, 5), (3, 1)])
def test_each_stratified_count_is_uniform(batch, length):
    # Over the random start, every count in 1..length is equally likely in
    # every row, or the weight length / count biases the estimate.
    by_start = {}
    for seed in range(10_000):
        counts = stratified_mask_counts(batch, length, torch.Generator().manual_seed(seed))
        by_start.setdefault(int(counts[0]), counts)  # row 0 is the start itself
        if len(by_start) == length:
            break
    assert sorted(by_start) == list(range(1, length + 1))
    per_row = torch.stack(list(by_start.values()))  # [starts, batch]
    for row in per_row.T:
        assert sorted(row.tolist()) == list(range(1, length + 1))


def test_likelihood_is_unbiased_and_spread_shrinks():
    q = torch.softmax(torch.randn(VOCAB), dim=0)
    model = Unigram(q)
    prompt = [1, 2, 3]
    answer = [4, 0, 0, 5, 1, 2]
    exact = float(q.log()[answer].sum())

    def spread(mc_num):
        estimates = [log_likelihood(model, prompt, answer, mc_num=mc_num, batch_size=8, seed=s)
                     for s in range(12)]
        return torch.tensor(estimates)

    small, large = spread(8), spread(128)
    assert large.std() < small.std() / 2
    assert abs(float(large.mean()) - exact) < 4 * float(large.std()) / math.sqrt(12) + 1e-6
    # A likely answer ranks above a corrupted one.
    ranked = [i for i in q.argsort(descending=True).tolist() if i != MASK]
    likely, unlikely = [ranked[0]] * 6, [ranked[-1]] * 6
    assert log_likelihood(model, prompt, likely, seed=0) > log_likelihood(model, prompt, unlikely, seed=0)


def test_likelihood_is_deterministic_for_a_seed():
    model = Unigram(torch.softmax(torch.randn(VOCAB), dim=0))
    a = log_likelihood(model, [1, 2], [3, 4, 5], mc_num=32, batch_size=8, seed=9)
    b = log_likelihood(model, [1, 2], [3, 4, 5], mc_num=32, batch_size=8, seed=9)
    assert a == b


def test_bad_arguments():
    model = Unigram(torch.softmax(torch.randn(VOCAB), dim=0))
    with pytest.raises(ValueError, match="answer"):
        log_likelihood(model, [1], [])
    with pytest.raises(ValueError, match="mc_num"):
        log_likelihood(model, [1], [2], mc_num=10, batch_size=4)
    with pytest.raises(TypeError, match="prompt"):
        log_likelihood(model, "text", [2])
    with pytest.raises(ValueError, match="cfg_scale"):
        log_likelihood(model, [1], [2], cfg_scale=-1)
    with pytest.raises(ValueError, match="batch_size"):
        log_likelihood(model, [1], [2], batch_size=0)
    with pytest.raises(ValueError, match="mc_num"):
        log_likelihood(model, [1], [2], mc_num=16.0)
    with pytest.raises(TypeError, match="seed"):
        log_likelihood(model, [1], [2], seed="0")
    with pytest.raises(ValueError, match="seed"):
        log_likelihood(model, [1], [2], seed=2**63)
    with pytest.raises(ValueError, match="cfg_scale"):
        log_likelihood(model, [1], [2], cfg_scale=math.inf)
    with pytest.raises(ValueError, match="mask_id"):
        log_likelihood(model, [1], [2], mask_id=VOCAB)
    with pytest.raises(TypeError, match="mask_id"):
        log_likelihood(model, [1], [2], mask_id=3.0)
    with pytest.raises(TypeError, match="answer: expected token ids"):
        log_likelihood(model, [1], [2, 3.0])
    assert log_likelihood(model, [np.int64(1)], [2], seed=0) == log_likelihood(model, [1], [2], seed=0)
    # numpy ints count as ints everywhere, as in generate.
    assert log_likelihood(model, [1], [2], mc_num=np.int64(16), batch_size=np.int32(8), seed=np.int64(3)) == \
        log_likelihood(model, [1], [2], mc_num=16, batch_size=8, seed=3)
    with pytest.raises(ValueError, match=r"^answer: token ids must lie in \[0, vocabulary size\), got 2\.\.10{20}$"):
        log_likelihood(model, [1], [2, 10**20])
    with pytest.raises(ValueError, match=r"^prompt: token ids must lie in"):
        log_likelihood(model, [-2**70], [2])
    with pytest.raises(ValueError, match="prompt: token ids"):
        log_likelihood(model, [VOCAB], [2])
    with pytest.raises(ValueError, match="answer: token ids"):
        log_likelihood(model, [1], [-1])
    with pytest.raises(ValueError, match="answer: contains the mask id"):
        log_likelihood(model, [1], [2, MASK])
    with pytest.raises(ValueError, match="prompt: contains the mask id"):
        log_likelihood(model, [MASK], [2])
    with pytest.raises(ValueError, match="max_sequence_length"):
        log_likelihood(model, [1] * 10, [2] * 7)
    log_likelihood(model, [1] * 10, [2] * 6, mc_num=8, batch_size=8)  # exactly 16 tokens fit
    with pytest.raises(ValueError, match="prompt_lengths"):
        sft_loss(model, torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 4]), MASK)
    with pytest.raises(TypeError, match="input_ids"):
        pretraining_loss(model, torch.zeros(2, 4), MASK)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU present")


@pytest.mark.parametrize("model_device, prompt_device", [
    ("cpu", "cpu"),
    pytest.param("cuda", "cuda", marks=CUDA),  # the answer, a list, on the CPU
    pytest.param("cpu", "cuda", marks=CUDA),
])
def test_likelihood_takes_a_prompt_and_an_answer_on_different_devices(model_device, prompt_device):
    # An answer of one token repeated: every draw that masks l of its L
    # tokens scores L / l * l * log q[3], so the estimate is exactly L log q[3].
    q = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(4)), dim=0)
    model = Unigram(q).to(model_device)
    prompt = torch.tensor([1, 2], device=prompt_device)
    got = log_likelihood(model, prompt, [3, 3, 3], mc_num=16, batch_size=8, seed=0)
    assert math.isclose(got, 3 * math.log(float(q[3])), rel_tol=1e-5)


def test_guidance_is_neutral_when_the_prompt_does_not_matter():
    # For a context-free model the guided logits equal the plain ones.
    model = Unigram(torch.softmax(torch.randn(VOCAB), dim=0))
    plain = log_likelihood(model, [1, 2], [3, 4, 5], mc_num=16, batch_size=8, seed=5)
    guided = log_likelihood(model, [1, 2], [3, 4, 5], mc_num=16, batch_size=8, seed=5, cfg_scale=2.0)
    assert math.isclose(plain, guided, rel_tol=1e-5)


def test_trained_model_prefers_the_right_answer():
    # The bundled sort model: the sorted answer must outscore a shuffled one.
    from pathlib import Path

    import llada
    from llada import tasks
    from llada.tokenizer import read_tokenizer

    folder = Path(llada.__file__).parent / "task_models" / "sort"
    model = llada.load_model(folder, dtype=torch.float32)
    tok = read_tokenizer(folder)
    task = tasks.get_task("sort")
    for example in tasks.held_out_set(task, 3):
        prompt = tok.encode(example.prompt).ids
        right = tok.encode(example.answer, add_special_tokens=False).ids  # no BOS inside the answer
        wrong = right[::-1] if right[::-1] != right else right[1:] + right[:1]
        good = log_likelihood(model, prompt, right, mc_num=32, batch_size=16, seed=0)
        bad = log_likelihood(model, prompt, wrong, mc_num=32, batch_size=16, seed=0)
        assert good > bad + 1.0, (example, good, bad)


class BagOfTokens(torch.nn.Module):
    """A stand-in whose logits at position i are the sum of a row per token
    of the whole input plus a row for i: masking the prompt changes every
    position's logits, so guided and plain estimates differ. Records what it
    was fed, which gives each draw's mask without replaying the generator."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g))
        self.position = torch.nn.Parameter(torch.randn(16, VOCAB, generator=g))
        self.config = type("Config", (), {"mask_token_id": MASK, "embedding_size": VOCAB,
                                          "max_sequence_length": 16})()
        self.seen = []

    def forward(self, ids):
        self.seen.append(ids.clone())
        logits = self.table[ids].sum(dim=1, keepdim=True) + self.position[: ids.shape[1]]
        return type("Out", (), {"logits": logits})()


def direct_estimate(log_probs, masked, sequence, answer_length):
    """The likelihood estimate from the draws, summed by hand: -mean over
    rows of the sum over masked positions of CE * answer length / count."""
    total = 0.0
    for b in range(masked.shape[0]):
        count = int(masked[b].sum())
        for i in range(len(sequence)):
            if masked[b, i]:
                total += -float(log_probs[b, i, sequence[i]]) * answer_length / count
    return -total / masked.shape[0]


def guided_log_probs(model, noisy, lp, scale):
    """log-softmax of un + (scale + 1) * (cond - un), with cond from the
    noisy row as is and un from the same row with the prompt masked; the
    logits recomputed here in float64 from the model's tables."""
    table, position = model.table.detach().double(), model.position.detach().double()
    un_input = noisy.clone()
    un_input[:, :lp] = MASK
    cond = table[noisy].sum(dim=1, keepdim=True) + position[: noisy.shape[1]]
    un = table[un_input].sum(dim=1, keepdim=True) + position[: noisy.shape[1]]
    return torch.log_softmax(un + (scale + 1) * (cond - un), dim=-1)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_guided_likelihood_of_one_token_is_the_guided_log_prob(scale):
    # With one answer token every draw masks it (count 1, weight 1), so the
    # estimate is exactly log p of the answer under the guided logits,
    # whatever the seed and mc_num.
    model = BagOfTokens(seed=12)
    prompt, answer = [1, 2, 3], [5]
    noisy = torch.tensor([prompt + [MASK]])
    want = float(guided_log_probs(model, noisy, len(prompt), scale)[0, -1, answer[0]])
    plain = float(guided_log_probs(model, noisy, len(prompt), 0.0)[0, -1, answer[0]])
    assert abs(want - plain) > 0.5  # the prompt matters to this model, so guidance shows
    got = log_likelihood(model, prompt, answer, mc_num=8, batch_size=4, cfg_scale=scale, seed=3)
    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5)


def test_guided_likelihood_matches_a_direct_sum_over_the_draws():
    # Several answer tokens: the draws are read back from what the model was
    # fed (the rows with the prompt intact), and the estimate recomputed from
    # them: -mean over rows of sum over masked positions of CE * L / count.
    model = BagOfTokens(seed=13)
    prompt, answer = [1, 2, 3], [4, 0, 6, 5, 2]
    lp, la, scale = len(prompt), len(answer), 1.5
    got = log_likelihood(model, prompt, answer, mc_num=8, batch_size=8, cfg_scale=scale, seed=4)
    noisy = model.seen[0]  # the first call of the batch sees the prompt
    assert noisy.shape == (8, lp + la) and torch.equal(noisy[:, :lp], torch.tensor(prompt).expand(8, -1))
    masked = noisy == MASK
    assert masked[:, lp:].sum(dim=1).min() >= 1
    log_probs = guided_log_probs(model, noisy, lp, scale)
    assert math.isclose(got, direct_estimate(log_probs, masked, prompt + answer, la), rel_tol=1e-5)


@pytest.mark.parametrize("t, error, message", [
    (torch.tensor([1.5, 0.5]), ValueError, r"t: expected values in \[0, 1\], got 1.5 in row 0"),
    (torch.tensor([0.5, -0.5]), ValueError, r"t: expected values in \[0, 1\], got -0.5 in row 1"),
    (torch.tensor([0.5, math.nan]), ValueError, r"t: expected values in \[0, 1\], got nan in row 1"),
    ([0.5, 0.5], TypeError, "t: expected a floating-point tensor of shape \\(2,\\), got list"),
    (torch.tensor([0, 1]), TypeError, "t: expected a floating-point tensor of shape \\(2,\\), got torch.int64"),
])
def test_diffusion_times_outside_zero_to_one_are_refused(t, error, message):
    # p_mask = (1 - eps) t + eps must be a probability: the loss bounds the NLL only then.
    ids = torch.randint(0, MASK, (2, 8))
    model = FixedLogits(torch.zeros(2, 8, VOCAB))
    with pytest.raises(error, match=message):
        pretraining_loss(model, ids, MASK, crop_probability=0, t=t)
    with pytest.raises(error, match=message):
        sft_loss(model, ids, torch.tensor([2, 2]), MASK, t=t)


def test_diffusion_times_at_both_ends_are_taken():
    ids = torch.randint(0, MASK, (2, 8))
    noisy, masked, p_mask = corrupt(ids, MASK, eps=0.0, t=torch.tensor([0.0, 1.0]))
    assert p_mask.tolist() == [0.0, 1.0] and masked.sum(1).tolist() == [0, 8]


@pytest.mark.parametrize("lengths", [[2.5, 2.5], [2.0, 2.0], torch.tensor([2.5, 2.5]), [True, False]])
def test_prompt_lengths_must_be_token_counts(lengths):
    # 2.5 would keep 3 prompt tokens unmasked but normalise by 5.5 answer tokens.
    ids = torch.randint(0, MASK, (2, 8))
    with pytest.raises(TypeError, match="prompt_lengths: expected integer token counts"):
        sft_loss(FixedLogits(torch.zeros(2, 8, VOCAB)), ids, lengths, MASK, t=torch.ones(2))


@pytest.mark.parametrize("mask_id, error, message", [
    (VOCAB, ValueError, r"^mask_id: 11 is outside the vocabulary \[0, 11\)$"),
    (-1, ValueError, r"^mask_id: -1 is outside the vocabulary \[0, 11\)$"),
    (10**20, ValueError, r"^mask_id: 100000000000000000000 is outside the vocabulary \[0, 11\)$"),
    (MASK + 0.7, TypeError, r"^mask_id: expected an int, got float$"),
    (float(MASK), TypeError, r"^mask_id: expected an int, got float$"),
    (True, TypeError, r"^mask_id: expected an int, got bool$"),
])
def test_the_losses_take_a_mask_id_of_the_models_vocabulary(mask_id, error, message):
    model = Unigram(torch.softmax(torch.randn(VOCAB), dim=0))  # its config embeds VOCAB ids
    ids = torch.randint(0, MASK, (2, 8))
    with pytest.raises(error, match=message):
        pretraining_loss(model, ids, mask_id, crop_probability=0, t=torch.ones(2))
    with pytest.raises(error, match=message):
        sft_loss(model, ids, torch.tensor([2, 2]), mask_id, t=torch.ones(2))


@pytest.mark.parametrize("mask_id, error, message", [
    (-1, ValueError, r"^mask_id: expected an id in \[0, 2\*\*63\), got -1$"),
    (2**63, ValueError, r"^mask_id: expected an id in \[0, 2\*\*63\), got 9223372036854775808$"),
    (MASK + 0.7, TypeError, r"^mask_id: expected an int, got float$"),
    (torch.tensor(MASK), TypeError, r"^mask_id: expected an int, got Tensor$"),
])
def test_corrupt_takes_an_int_mask_id(mask_id, error, message):
    with pytest.raises(error, match=message):
        corrupt(torch.zeros(2, 8, dtype=torch.long), mask_id, t=torch.ones(2))


def test_a_mask_id_is_any_int_of_the_vocabulary():
    ids = torch.randint(0, MASK, (2, 8))
    # numpy ints count as ints; with t = 1 and eps = 0 every position is masked.
    assert corrupt(ids, np.int64(VOCAB - 1), eps=0.0, t=torch.ones(2)).noisy.tolist() == [[VOCAB - 1] * 8] * 2
    # Unigram's loss with every (answer) position masked at p = 1: the mean of -log q over them.
    q = torch.softmax(torch.randn(VOCAB, dtype=torch.float64), dim=0)
    model = Unigram(q.float())
    with torch.no_grad():
        loss = pretraining_loss(model, ids, VOCAB - 1, eps=0.0, crop_probability=0, t=torch.ones(2))
        assert math.isclose(float(loss), float(-q.log()[ids].mean()), rel_tol=1e-5)
        loss = sft_loss(model, ids, torch.tensor([2, 2]), 0, eps=0.0, t=torch.ones(2))
        assert math.isclose(float(loss), float(-q.log()[ids[:, 2:]].mean()), rel_tol=1e-5)


@pytest.mark.parametrize("keep, error, message", [
    (torch.ones(2, 6, dtype=torch.long), TypeError, r"^keep: expected a bool tensor of shape \(2, 6\), got torch.int64$"),
    (torch.ones(2, 6), TypeError, r"^keep: expected a bool tensor of shape \(2, 6\), got torch.float32$"),
    ([[True] * 6] * 2, TypeError, r"^keep: expected a bool tensor of shape \(2, 6\), got list$"),
    (torch.ones(2, 7, dtype=torch.bool), ValueError, r"^keep: expected shape \(2, 6\) \(that of input_ids\), "
                                                    r"got \(2, 7\)$"),
    # These two would broadcast: one row (or column) of keep taken for every row.
    (torch.ones(6, dtype=torch.bool), ValueError, r"^keep: expected shape \(2, 6\) \(that of input_ids\), "
                                                  r"got \(6,\)$"),
    (torch.ones(2, 1, dtype=torch.bool), ValueError, r"^keep: expected shape \(2, 6\) \(that of input_ids\), "
                                                     r"got \(2, 1\)$"),
])
def test_keep_is_a_bool_tensor_of_the_batchs_shape(keep, error, message):
    with pytest.raises(error, match=message):
        corrupt(torch.randint(0, MASK, (2, 6)), MASK, t=torch.ones(2), keep=keep)


def test_kept_positions_are_never_masked():
    ids = torch.randint(0, MASK, (2, 6))
    keep = torch.tensor([[True, False, False, True, False, False], [False] * 5 + [True]])
    c = corrupt(ids, MASK, eps=0.0, t=torch.ones(2), keep=keep)  # p = 1: all else is masked
    assert c.masked.tolist() == [[False, True, True, False, True, True], [True] * 5 + [False]]
    assert c.noisy.tolist() == [[ids[0, 0].item(), MASK, MASK, ids[0, 3].item(), MASK, MASK],
                                [MASK] * 5 + [ids[1, 5].item()]]


class RulesOutOneToken(BagOfTokens):
    """BagOfTokens whose last vocabulary entry gets -inf in every pass,
    conditional and unconditional alike (a token the model never predicts)."""

    def forward(self, ids):
        logits = super().forward(ids).logits.clone()
        logits[..., VOCAB - 1] = -math.inf
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("answer", [[5], [4, 0, 6]])
def test_guided_likelihood_survives_a_token_ruled_out_in_both_passes(answer):
    # The ruled-out entry has no probability either way, so the estimate is
    # the direct sum (as in the test above) under BagOfTokens' guided logits
    # restricted to the other entries.
    model = RulesOutOneToken(seed=12)
    restricted = BagOfTokens(seed=12)
    with torch.no_grad():
        restricted.table.data = model.table[:, : VOCAB - 1].clone()
        restricted.position.data = model.position[:, : VOCAB - 1].clone()
    prompt, scale = [1, 2, 3], 1.5
    lp, la = len(prompt), len(answer)
    got = log_likelihood(model, prompt, answer, mc_num=4, batch_size=4, cfg_scale=scale, seed=3)
    noisy = model.seen[0]
    masked = noisy == MASK
    log_probs = guided_log_probs(restricted, noisy, lp, scale)
    assert math.isfinite(got)
    assert math.isclose(got, direct_estimate(log_probs, masked, prompt + answer, la), rel_tol=1e-5)
