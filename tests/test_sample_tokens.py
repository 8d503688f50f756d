"""sample_tokens against its float64 reference, on CPU and CUDA."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llada
from llada import devices
from llada.ops import gumbel_noise_reference, sample_tokens_reference

from conftest import needs_cuda, poison_allocator

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_logits(n, v, dtype, device, generator=None, scale=3.0):
    x = torch.randn(n, v, generator=generator, dtype=torch.float32) * scale
    return x.to(dtype=dtype, device=device)


def assert_matches_reference(logits, temperature=0.0, seed=0, suppress_ids=None):
    n, v = logits.shape
    poison_allocator(logits.device.type, [n * 8, n * 4, n * 4, n * 4])
    got = llada.sample_tokens(logits, temperature, seed, suppress_ids)
    want = sample_tokens_reference(logits, temperature, seed, suppress_ids)
    got = [t.cpu() for t in got]
    want = [t.cpu() for t in want]
    if temperature == 0:
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    else:
        # The kernels' Gumbel noise uses a float32 log; a token may only differ
        # from the float64 reference where two scores tie to ~1e-5.
        x = logits.detach().cpu().double()
        if suppress_ids is not None:
            x[:, [i for i in suppress_ids if 0 <= i < v]] = -math.inf
        score = x / temperature + gumbel_noise_reference(seed, n, v)
        for row in torch.nonzero(got[0] != want[0]).flatten().tolist():
            assert got[0][row] >= 0, f"row {row}: no token chosen"
            gap = float(score[row, want[0][row]] - score[row, got[0][row]])
            assert gap < 1e-4, f"row {row}: token {got[0][row]} vs {want[0][row]}, gap {gap}"
    # The kernel computes in float32 whatever the logits dtype, so the same
    # tolerance holds for every dtype (the inputs are exact in float32).
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=1e-7, equal_nan=False)
    torch.testing.assert_close(got[2], want[2], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (64, 1000), (4, 126464)])
def test_argmax_matches_reference(device, dtype, shape):
    logits = random_logits(*shape, dtype, device)
    assert_matches_reference(logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_sampling_matches_reference(device, dtype, temperature):
    logits = random_logits(16, 5003, dtype, device)
    assert_matches_reference(logits, temperature=temperature, seed=1234)


def test_suppressed_ids_are_never_chosen(device):
    logits = random_logits(32, 777, torch.bfloat16, device)
    best = logits.float().argmax(dim=1)
    ids = sorted(set(best.tolist()))[:64]
    assert_matches_reference(logits, suppress_ids=ids)
    assert_matches_reference(logits, temperature=1.0, seed=5, suppress_ids=ids)
    tokens = llada.sample_tokens(logits, suppress_ids=ids).tokens.cpu()
    assert not any(t in ids for t in tokens.tolist())


def test_suppress_ids_as_tensor_ignores_out_of_range(device):
    logits = random_logits(8, 100, torch.float32, device)
    best = int(logits[0].argmax())
    # Also ids that an int32 would wrap onto a row's best column.
    ids = torch.tensor([3, 250, -7, 2**32 + best, best - 2**32], device=device)
    got = llada.sample_tokens(logits, suppress_ids=ids)
    want = sample_tokens_reference(logits, suppress_ids=[3])
    torch.testing.assert_close(got.tokens.cpu(), want.tokens.cpu())


def test_ties_go_to_the_lowest_index(device):
    logits = torch.zeros(3, 1000, device=device)
    logits[1, [10, 500, 900]] = 5.0
    logits[2, :] = -math.inf
    logits[2, [7, 8]] = 1.0
    out = llada.sample_tokens(logits)
    assert out.tokens.cpu().tolist() == [0, 10, 7]
    assert out.margin.cpu().tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out.entropy[0].cpu(), torch.tensor(math.log(1000.0)))
    torch.testing.assert_close(out.confidence[2].cpu(), torch.tensor(0.5))


def test_rows_without_a_finite_logit(device):
    logits = random_logits(4, 50, torch.float32, device)
    logits[1] = -math.inf
    logits[3, 1:] = -math.inf
    for temperature in (0.0, 1.0):
        out = llada.sample_tokens(logits, temperature=temperature, seed=9)
        assert out.tokens[1].item() == -1
        assert out.confidence[1].item() == -math.inf
        assert out.tokens[3].item() == 0
        assert out.confidence[3].item() == 1.0
        assert out.margin[3].item() == 1.0
        # Exactly 0 on every device: ties in the entropy ranking go to the
        # lower position only if one-hot rows do not differ by rounding.
        assert out.entropy[3].item() == 0.0
        assert_matches_reference(logits, temperature=temperature, seed=9)
    far = random_logits(1, 5000, torch.float32, device)
    far[0, 4321] = 200.0  # every other term underflows next to this one
    assert llada.sample_tokens(far).entropy.item() == 0.0
    everything = list(range(50))[:64]
    out = llada.sample_tokens(logits[:, :50], suppress_ids=everything)
    assert (out.tokens == -1).all()


def test_a_nan_logit_makes_the_probabilities_nan(device):
    # The decoder stops on a NaN confidence, so no device may drop the NaN:
    # the chosen token is the best of the others, never the NaN's column.
    logits = torch.full((3, 5000), -math.inf, device=device)
    logits[0] = random_logits(1, 5000, torch.float32, device)[0]
    logits[0, 17] = math.nan
    logits[1, 3] = 2.0
    logits[1, 4000] = math.nan  # far from the row's only finite logit
    logits[2, 9] = math.nan  # nothing else: no finite logit, as for an all -inf row
    for temperature in (0.0, 1.0):
        out = llada.sample_tokens(logits, temperature=temperature, seed=3)
        assert out.tokens[1].item() == 3 and out.tokens[0].item() != 17
        if temperature == 0.0:
            assert out.tokens[0].item() == int(logits[0].nan_to_num(-math.inf).argmax())
        for row in (0, 1):
            assert out.confidence[row].isnan() and out.margin[row].isnan() and out.entropy[row].isnan()
        assert out.tokens[2].item() == -1 and out.confidence[2].item() == -math.inf


def test_reference_answers_as_the_kernels_on_nan_and_inf_logits(monkeypatch):
    # The reference runs in the op's place on a GPU this build has no code
    # for, so on logits outside the contract too it must answer as the
    # kernels do: a NaN is never chosen and makes the row's probabilities NaN;
    # the first +inf is chosen, and makes them NaN as well.
    v = 300
    logits = random_logits(8, v, torch.float32, "cpu")
    logits[0, 17] = math.nan
    logits[1] = -math.inf
    logits[1, 3], logits[1, 250] = 2.0, math.nan  # the NaN far from the only finite logit
    logits[2, [7, 30]] = math.inf
    logits[3, 40], logits[3, 41] = math.nan, math.inf
    logits[4] = -math.inf
    logits[4, 9] = math.nan  # no logit above -inf: nothing to choose
    logits[5] = -math.inf
    logits[5, 100] = math.inf
    logits[6] = logits[6].abs() + 1.0  # every logit positive: x / T overflows first
    best_of_the_others = int(logits[0].nan_to_num(-math.inf).argmax())

    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("torch.ops.llada.sample_tokens ran")

    for temperature in (0.0, 1e-308, 5e-324, 0.5, 1.0, 2.5):
        kernel = llada.sample_tokens(logits, temperature, seed=3)
        with monkeypatch.context() as m:  # as on a GPU without code in this build
            m.setattr(devices, "kernels_run_on", lambda device: False)
            m.setattr(torch.ops.llada, "sample_tokens", kernel_must_not_run)
            reference = llada.sample_tokens(logits, temperature, seed=3)
        assert torch.equal(reference.tokens, kernel.tokens), temperature
        tokens = reference.tokens.tolist()
        assert tokens[1:6] == [3, 7, 41, -1, 100] and tokens[0] != 17, temperature
        if temperature < 1e-300:  # below the noise's reach: the argmax
            assert tokens[0] == best_of_the_others and tokens[6] == int(logits[6].argmax())
        for got, want in zip(reference[1:], kernel[1:]):
            assert torch.equal(got.isnan(), want.isnan()), temperature
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, equal_nan=True)
        assert reference.confidence[[0, 1, 2, 3, 5]].isnan().all()
        assert reference.entropy[[0, 1, 2, 3, 5]].isnan().all()
        assert reference.confidence[4] == -math.inf and reference.entropy[4] == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_masked_with_the_lowest_finite_value(device, dtype):
    # torch.finfo(dtype).min is a common mask value; for float32 and bfloat16
    # it times log2(e) overflows float32, which must not turn into NaN sums.
    lowest = torch.finfo(dtype).min
    v = 20000  # rows 16-byte aligned: the GPU reads them in vectors, several in flight
    logits = random_logits(4, v, dtype, device)
    logits[0] = lowest  # the whole row
    logits[1, :256] = lowest  # ids 0..255, which the first threads read first
    logits[2, 256:] = lowest  # all but ids 0..255
    logits[3, ::2] = lowest  # every other id
    for temperature in (0.0, 1.0):
        assert_matches_reference(logits, temperature, seed=5)
        out = llada.sample_tokens(logits, temperature, seed=5)
        if temperature == 0.0 or lowest < -1e30:  # float16's -65504 is not beyond the noise
            assert out.tokens[0].item() == 0  # all tie, the noise far below their spacing
        assert out.margin[0].item() == 0.0
        torch.testing.assert_close(out.confidence[0].cpu(), torch.tensor(1.0 / v), rtol=2e-5, atol=0)
        torch.testing.assert_close(out.entropy[0].cpu(), torch.tensor(math.log(v)), rtol=2e-5, atol=0)
        assert 256 <= out.tokens[1].item() and out.tokens[2].item() < 256 and out.tokens[3].item() % 2 == 1
        assert all(t.isfinite().all() for t in out[1:])


def test_largest_noise_matches_reference(device):
    # Under seed 0, row key 175 hashes column 43649 to the largest u the noise
    # can draw. It must stay below 1: a u rounded up to 1 gives log(0) and a
    # noise of 88 where the true one is 16.6, so the column wins every draw.
    seed, row, col = 0, 175, 43649
    noise = gumbel_noise_reference(seed, [row], col + 1)[0]
    assert int(noise.argmax()) == col and 16.6 < float(noise[col]) < 16.7
    logits = torch.zeros(1, col + 1, device=device)
    logits[0, col] = -10.0  # far below the row's best draw
    keys = torch.tensor([row], device=device)
    got = llada.sample_tokens(logits, 1.0, seed, noise_rows=keys)
    want = sample_tokens_reference(logits, 1.0, seed, noise_rows=keys)
    assert int(want.tokens) != col
    assert int(got.tokens) == int(want.tokens)
    torch.testing.assert_close(got.confidence.cpu(), want.confidence.cpu(), rtol=2e-5, atol=1e-7)


def test_noise_rows_key_each_rows_noise(device):
    # Row r sampled with key k draws what the row of index k draws, so a row
    # keeps its sample whichever rows are sampled with it.
    logits = random_logits(12, 301, torch.float32, device, scale=0.5)  # flat: the noise decides
    everything = llada.sample_tokens(logits, 1.0, 7)
    pick = torch.tensor([9, 2, 5], device=device)
    some = llada.sample_tokens(logits[pick], 1.0, 7, noise_rows=pick)
    assert torch.equal(some.tokens, everything.tokens[pick])
    assert not torch.equal(llada.sample_tokens(logits[pick], 1.0, 7).tokens, some.tokens)
    keys = torch.tensor([5, 2**40, -3, 0], device=device)
    got = llada.sample_tokens(logits[:4], 1.0, 7, noise_rows=keys)
    want = sample_tokens_reference(logits[:4], 1.0, 7, noise_rows=keys)
    assert torch.equal(got.tokens.cpu(), want.tokens.cpu())


def test_strided_rows_are_read_in_place(device):
    wide = random_logits(10, 300, torch.bfloat16, device)
    view = wide[::2, 5:205]  # row stride 600, columns contiguous
    assert not view.is_contiguous()
    assert_matches_reference(view)
    assert_matches_reference(view, temperature=0.7, seed=2)


def test_zero_rows(device):
    out = llada.sample_tokens(torch.empty(0, 10, device=device))
    assert all(t.shape == (0,) for t in out)


def test_same_seed_same_sample_and_seeds_differ(device):
    logits = random_logits(64, 4000, torch.bfloat16, device, scale=0.5)
    a = llada.sample_tokens(logits, temperature=1.0, seed=77).tokens
    b = llada.sample_tokens(logits, temperature=1.0, seed=77).tokens
    c = llada.sample_tokens(logits, temperature=1.0, seed=78).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_follow_the_tempered_softmax(device):
    # Rows of identical logits are independent draws (the noise is keyed by row).
    base = torch.tensor([2.0, 1.0, 0.0, -1.0])
    temperature = 0.8
    rows = 20000
    logits = base.expand(rows, 4).contiguous().to(device)
    tokens = llada.sample_tokens(logits, temperature=temperature, seed=11).tokens.cpu()
    freq = torch.bincount(tokens, minlength=4).double() / rows
    want = torch.softmax(base.double() / temperature, dim=0)
    # Four standard errors of a binomial proportion.
    tol = 4 * torch.sqrt(want * (1 - want) / rows)
    assert torch.all((freq - want).abs() < tol), (freq, want)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    v=st.integers(1, 300),
    temperature=st.sampled_from([0.0, 0.3, 1.0]),
    levels=st.integers(1, 6),
    neg_inf_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**63 - 1),
)
def test_property_edge_cases_cpu(n, v, temperature, levels, neg_inf_fraction, seed):
    # Few distinct values force ties; -inf entries and whole -inf rows appear.
    g = torch.Generator().manual_seed(seed % (2**31))
    logits = torch.randint(0, levels, (n, v), generator=g).float()
    logits[torch.rand(n, v, generator=g) < neg_inf_fraction] = -math.inf
    assert_matches_reference(logits, temperature=temperature, seed=seed)


@needs_cuda
def test_cuda_matches_cpu_bit_for_bit_tokens():
    logits = random_logits(128, 126464, torch.bfloat16, "cpu", scale=1.0)
    for temperature in (0.0, 1.0):
        cpu = llada.sample_tokens(logits, temperature=temperature, seed=3)
        gpu = llada.sample_tokens(logits.cuda(), temperature=temperature, seed=3)
        assert torch.equal(cpu.tokens, gpu.tokens.cpu())
        torch.testing.assert_close(cpu.confidence, gpu.confidence.cpu(), rtol=2e-5, atol=1e-7)


def test_opcheck(device):
    logits = random_logits(5, 33, torch.bfloat16, device)
    ids = torch.tensor([1, 4], device=device)
    keys = torch.arange(5, device=device) * 3
    for args in [(logits, ids, 0.0, 0), (logits, ids, 1.5, 42), (logits, ids, 1.5, 42, keys)]:
        torch.library.opcheck(torch.ops.llada.sample_tokens.default, args)


def test_bad_input(device):
    good = random_logits(2, 10, torch.float32, device)
    with pytest.raises(TypeError, match="logits"):
        llada.sample_tokens(good.long())
    with pytest.raises(TypeError, match="logits"):
        llada.sample_tokens(good.tolist())
    with pytest.raises(ValueError, match="logits"):
        llada.sample_tokens(good[0])
    with pytest.raises(ValueError, match="logits"):
        llada.sample_tokens(good.t())  # columns not contiguous
    with pytest.raises(ValueError, match="logits"):
        llada.sample_tokens(torch.empty(3, 0, device=device))
    with pytest.raises(ValueError, match="temperature"):
        llada.sample_tokens(good, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        llada.sample_tokens(good, temperature=float("nan"))
    with pytest.raises(ValueError, match="suppress_ids"):
        llada.sample_tokens(good, suppress_ids=[3, 10])
    with pytest.raises(TypeError, match="suppress_ids"):
        llada.sample_tokens(good, suppress_ids=torch.tensor([1.7], device=device))
    with pytest.raises(TypeError, match="suppress_ids"):
        llada.sample_tokens(good, suppress_ids=[1.7])
    with pytest.raises(TypeError, match="suppress_ids"):
        llada.sample_tokens(good, suppress_ids=[[1]])
    with pytest.raises(ValueError, match="seed"):
        llada.sample_tokens(good, 1.0, seed=2**63)
    with pytest.raises(TypeError, match="seed"):
        llada.sample_tokens(good, 1.0, seed=1.5)
    with pytest.raises(ValueError, match="suppress_ids"):
        llada.sample_tokens(good, suppress_ids=torch.arange(65))
    with pytest.raises(TypeError, match="suppress_ids"):
        torch.ops.llada.sample_tokens(good, torch.tensor([1.0], device=device), 0.0, 0)
    with pytest.raises(ValueError, match="noise_rows: expected one key per row"):
        llada.sample_tokens(good, 1.0, 0, noise_rows=torch.arange(3, device=device))
    with pytest.raises(TypeError, match="noise_rows"):
        llada.sample_tokens(good, 1.0, 0, noise_rows=torch.arange(2, device=device).float())
    if device == "cuda":
        with pytest.raises(ValueError, match="suppress_ids"):
            torch.ops.llada.sample_tokens(good, torch.tensor([1]), 0.0, 0)


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-44, 1e-300, 1e-308, 5e-324])
def test_tiny_temperatures_sample_the_argmax(device, temperature):
    # logits / T overflows float32 here (45 / 1e-38 is +inf, as is 44 / 1e-38),
    # and from about 1e-307 float64 too: the draw must still be the argmax.
    logits = torch.tensor([[10.0, 45.0, 44.0, -3.0], [0.0, -1.0, 0.5, 0.25]], device=device)
    got = llada.sample_tokens(logits, temperature, seed=1)
    want = sample_tokens_reference(logits, temperature, seed=1)
    assert got.tokens.cpu().tolist() == want.tokens.tolist() == [1, 2]
