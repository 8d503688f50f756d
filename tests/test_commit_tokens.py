"""commit_tokens against its reference, on CPU and CUDA."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llada
from llada.ops import commit_tokens_reference

from conftest import poison_allocator

MASK = 126336


def random_step(b, l, device, generator, with_remask=True):
    canvas = torch.randint(0, 1000, (b, l), generator=generator)
    canvas[torch.rand(b, l, generator=generator) < 0.6] = MASK
    x0 = torch.randint(0, 1000, (b, l), generator=generator)
    accepted = torch.rand(b, l, generator=generator) < 0.3
    remask = (torch.rand(b, l, generator=generator) < 0.1) if with_remask else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(canvas), move(x0), move(accepted), move(remask)


def check(canvas, x0, accepted, remask):
    want_canvas = canvas.clone()
    want_remaining = commit_tokens_reference(want_canvas, x0, accepted, MASK, remask)
    x0_before = x0.clone()
    poison_allocator(canvas.device.type, [canvas.shape[0] * 8])
    remaining = llada.commit_tokens(canvas, x0, accepted, MASK, remask)
    assert torch.equal(canvas.cpu(), want_canvas.cpu())
    assert torch.equal(remaining.cpu(), want_remaining.cpu())
    assert torch.equal(x0, x0_before)


@pytest.mark.parametrize("shape", [(1, 1), (1, 32), (8, 4096), (5, 333)])
@pytest.mark.parametrize("with_remask", [False, True])
def test_matches_reference(device, shape, with_remask):
    g = torch.Generator().manual_seed(0)
    check(*random_step(*shape, device, g, with_remask))


def test_remask_wins_and_counts(device):
    canvas = torch.tensor([[MASK, MASK, 5, 6]], device=device)
    x0 = torch.tensor([[1, 2, 3, 4]], device=device)
    accepted = torch.tensor([[True, True, False, False]], device=device)
    remask = torch.tensor([[True, False, False, True]], device=device)
    remaining = llada.commit_tokens(canvas, x0, accepted, MASK, remask)
    assert canvas.cpu().tolist() == [[MASK, 2, 5, MASK]]
    assert remaining.cpu().tolist() == [2]


def test_nothing_accepted_and_all_accepted(device):
    g = torch.Generator().manual_seed(1)
    canvas, x0, accepted, _ = random_step(3, 64, device, g)
    check(canvas, x0, torch.zeros_like(accepted), None)
    check(canvas, x0, torch.ones_like(accepted), None)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), l=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       with_remask=st.booleans())
def test_property_cpu(b, l, seed, with_remask):
    g = torch.Generator().manual_seed(seed)
    check(*random_step(b, l, "cpu", g, with_remask))


def test_opcheck(device):
    g = torch.Generator().manual_seed(2)
    canvas, x0, accepted, remask = random_step(2, 16, device, g)
    torch.library.opcheck(torch.ops.llada.commit_tokens.default, (canvas, x0, accepted, remask, MASK))
    torch.library.opcheck(torch.ops.llada.commit_tokens.default, (canvas, x0, accepted, None, MASK))


def test_bad_input(device):
    g = torch.Generator().manual_seed(3)
    canvas, x0, accepted, remask = random_step(2, 8, device, g)
    with pytest.raises(TypeError, match="canvas"):
        llada.commit_tokens(canvas.int(), x0, accepted, MASK)
    with pytest.raises(TypeError, match="canvas"):
        llada.commit_tokens(canvas.tolist(), x0, accepted, MASK)
    with pytest.raises(ValueError, match="canvas"):
        llada.commit_tokens(canvas[0], x0[0], accepted[0], MASK)
    with pytest.raises(ValueError, match="canvas"):
        llada.commit_tokens(canvas.t(), x0.t(), accepted.t(), MASK)
    with pytest.raises(ValueError, match="x0"):
        llada.commit_tokens(canvas, x0[:, :4], accepted, MASK)
    with pytest.raises(TypeError, match="mask_id"):
        llada.commit_tokens(canvas, x0, accepted, 0.5)
    with pytest.raises(TypeError, match="x0"):
        llada.commit_tokens(canvas, x0.float(), accepted, MASK)
    with pytest.raises(TypeError, match="accepted"):
        llada.commit_tokens(canvas, x0, accepted.long(), MASK)
    with pytest.raises(ValueError, match="remask"):
        llada.commit_tokens(canvas, x0, accepted, MASK, remask[:1])
    with pytest.raises(TypeError, match="remask"):
        llada.commit_tokens(canvas, x0, accepted, MASK, remask.int())
    if device == "cuda":
        with pytest.raises(ValueError, match="x0"):
            llada.commit_tokens(canvas, x0.cpu(), accepted, MASK)


def test_inputs_sharing_memory_with_the_canvas(device):
    # x0 shifted against the canvas would be read after being overwritten;
    # x0 being the canvas itself reads each element before writing it.
    buffer = torch.arange(8, device=device)[None].repeat(1, 1)
    accepted = torch.ones(1, 6, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match=r"^x0: shares memory with canvas"):
        llada.commit_tokens(buffer[:, 1:7], buffer[:, 0:6], accepted, MASK)
    assert buffer.tolist() == [list(range(8))], "a refused call wrote"
    canvas = torch.tensor([[1, MASK, 3]], device=device)
    remaining = llada.commit_tokens(canvas, canvas, torch.ones_like(canvas, dtype=torch.bool), MASK)
    assert canvas.tolist() == [[1, MASK, 3]] and remaining.tolist() == [1]
