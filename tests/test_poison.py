"""The tests' output poisoning (conftest.poison_allocator) itself: memory an
op gets after it holds garbage, whatever the size, so an element the op
forgets to write cannot pass as a lucky zero."""

import pytest
import torch

from conftest import DEVICES, poison_allocator


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [3, 1000, 1 << 22])  # small, a reused block, a fresh mapping
def test_new_memory_after_poisoning_is_garbage(device, numel):
    poison_allocator(device, [numel * 4, numel * 8])
    floats = torch.empty(numel, device=device)
    ints = torch.empty(numel, dtype=torch.long, device=device)
    assert not (floats == 0).any()
    assert not (ints == 0).any()

