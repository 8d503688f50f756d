"""select_positions against its reference, on CPU and CUDA."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llada
from llada.ops import select_positions_reference

from conftest import needs_cuda, poison_allocator

RULES = ["topk", "threshold", "factor"]


def random_confidence(b, l, device, generator=None, levels=None, holes=0.3):
    c = torch.rand(b, l, generator=generator)
    if levels:  # few distinct values: many ties
        c = (c * levels).floor() / levels
    c[torch.rand(b, l, generator=generator) < holes] = -math.inf
    return c.to(device)


def check(confidence, rule, **kwargs):
    b, l = confidence.shape
    poison_allocator(confidence.device.type, [b * l])
    got = llada.select_positions(confidence, rule, **kwargs)
    want = select_positions_reference(confidence, rule, **kwargs)
    assert got.dtype == torch.bool and got.shape == (b, l)
    assert torch.equal(got.cpu(), want.cpu()), (confidence, got, want)
    return got


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 32), (8, 256), (3, 1000), (2, 4096)])
def test_matches_reference(device, rule, shape):
    g = torch.Generator().manual_seed(0)
    for levels in (None, 5):
        c = random_confidence(*shape, device, g, levels)
        k = torch.randint(0, 8, (shape[0],), generator=g).to(device)
        check(c, rule, k=k, threshold=0.7, factor=1.0)


def test_topk_edge_cases(device):
    c = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5], [0.1, -math.inf, 0.9, float("nan")], [-math.inf] * 4],
        device=device,
    )
    got = check(c, "topk", k=torch.tensor([2, 10, 3], device=device))
    assert got.cpu().tolist() == [
        [True, True, False, False],  # ties: lower positions first
        [True, False, True, False],  # k beyond the candidates: all of them
        [False] * 4,  # nothing to take
    ]
    assert not check(c, "topk", k=0).any()


def test_threshold_and_factor_take_at_least_one(device):
    c = torch.tensor([[0.2, 0.3, 0.1], [0.95, 0.97, 0.1], [-math.inf] * 3], device=device)
    got = check(c, "threshold", threshold=0.9)
    assert got.cpu().tolist() == [[False, True, False], [True, True, False], [False] * 3]
    assert check(c, "threshold", threshold=1.0).sum().item() == 2
    assert check(c, "threshold", threshold=0.0).sum().item() == 6
    # factor 1: n accepted while (n + 1)(1 - c_n) < 1.
    got = check(c, "factor", factor=1.0)
    assert got.cpu().tolist() == [[False, True, False], [True, True, False], [False] * 3]


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4),
    l=st.integers(1, 70),
    rule=st.sampled_from(RULES),
    levels=st.sampled_from([None, 1, 2, 4]),
    holes=st.floats(0.0, 1.0),
    threshold=st.floats(-0.5, 1.5),
    factor=st.floats(0.01, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_cpu(b, l, rule, levels, holes, threshold, factor, seed):
    g = torch.Generator().manual_seed(seed)
    c = random_confidence(b, l, "cpu", g, levels, holes)
    k = torch.randint(0, l + 3, (b,), generator=g)
    check(c, rule, k=k, threshold=threshold, factor=factor)


def test_negative_confidences_rank_too(device):
    # The op ranks any float scores, negative ones too.
    c = -torch.rand(2, 50).to(device) * 5
    for rule in RULES:
        check(c, rule, k=3, threshold=-1.0, factor=2.0)


def test_signed_zeros_are_a_tie(device):
    # -0.0 (a negated 0, say) ties with +0.0, so the lower position wins
    # whichever zero it holds.
    for row in ([-0.0, 0.0], [0.0, -0.0]):
        c = torch.tensor([row, [-1.0, -0.0]], device=device)
        for rule in RULES:
            got = check(c, rule, k=1, threshold=0.5, factor=0.5)
            assert got[0].tolist() == [True, False], (rule, row)


@needs_cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    for l in (32, 300, 8192, 16384):
        c = random_confidence(3, l, "cpu", g, levels=50)
        k = torch.tensor([0, 5, l])
        for rule in RULES:
            cpu = llada.select_positions(c, rule, k=k)
            gpu = llada.select_positions(c.cuda(), rule, k=k.cuda())
            assert torch.equal(cpu, gpu.cpu())


def test_opcheck(device):
    c = random_confidence(3, 20, device)
    k = torch.tensor([1, 2, 30], device=device)
    for rule in range(3):
        torch.library.opcheck(torch.ops.llada.select_positions.default, (c, k, rule, 0.5, 1.0))
    none = torch.empty(0, dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.llada.select_positions.default, (c, none, 0, 0.5, 1.0, 2))


def test_one_k_for_every_row_equals_a_k_per_row(device):
    c = random_confidence(4, 40, device)
    for k in (0, 1, 5, 40, 100):
        per_row = torch.full((4,), k, dtype=torch.int64, device=device)
        assert torch.equal(check(c, "topk", k=k), check(c, "topk", k=per_row)), k


def test_bad_input(device):
    c = random_confidence(2, 8, device)
    with pytest.raises(TypeError, match="confidence"):
        llada.select_positions(c.double(), "topk", k=1)
    with pytest.raises(TypeError, match="confidence"):
        llada.select_positions([[0.1]], "topk", k=1)
    with pytest.raises(ValueError, match="confidence"):
        llada.select_positions(c[0], "topk", k=1)
    with pytest.raises(ValueError, match="confidence"):
        llada.select_positions(c.t(), "topk", k=1)
    with pytest.raises(ValueError, match="rule"):
        llada.select_positions(c, "best")
    with pytest.raises(TypeError, match="k"):
        llada.select_positions(c, "topk", k=2.9)
    with pytest.raises(TypeError, match="k"):
        llada.select_positions(c, "topk", k=[1, 2])
    with pytest.raises(ValueError, match="k"):
        llada.select_positions(c, "topk", k=2**63)
    with pytest.raises(ValueError, match="k"):
        llada.select_positions(c, "topk")
    with pytest.raises(ValueError, match="k"):
        llada.select_positions(c, "topk", k=torch.tensor([1, -1], device=device))
    with pytest.raises(ValueError, match="k"):
        llada.select_positions(c, "topk", k=torch.tensor([1, 2, 3], device=device))
    with pytest.raises(TypeError, match="k"):
        llada.select_positions(c, "topk", k=torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(ValueError, match="k"):
        llada.select_positions(c, "topk", k=-2)
    op = torch.ops.llada.select_positions
    with pytest.raises(ValueError, match="k: expected values >= 0"):
        op(c, torch.empty(0, dtype=torch.int64, device=device), 0, 0.5, 1.0, -3)
    with pytest.raises(ValueError, match="k: expected an empty tensor"):
        op(c, torch.tensor([1, 1], device=device), 0, 0.5, 1.0, 1)
    with pytest.raises(ValueError, match="factor"):
        llada.select_positions(c, "factor", factor=0.0)
    with pytest.raises(ValueError, match="threshold"):
        llada.select_positions(c, "threshold", threshold=float("nan"))
    if device == "cuda":
        with pytest.raises(ValueError, match="k"):
            llada.select_positions(c, "topk", k=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="confidence"):
            llada.select_positions(torch.zeros(1, 16385, device=device), "topk", k=1)


def test_strided_k_is_read_by_its_strides(device):
    c = random_confidence(3, 8, device, holes=0.0)
    schedule = torch.tensor([[3, 1], [3, 1], [2, 1]], device=device)
    k = schedule[:, 0]  # a column view: stride 2
    assert not k.is_contiguous()
    got = check(c, "topk", k=k)
    assert got.sum(1).cpu().tolist() == [3, 3, 2]
