"""CUDA graphs for the cached decoding step.

Inside a block, every dual-cache step runs the same forward: the block's ids
[B, W] against a key/value cache that does not move, at the same positions.
At batch 1 such a forward is hundreds of small kernels, and launching them
from Python can take longer than running them. A captured graph launches the
whole forward at once.

A graph fixes the addresses of everything it reads and writes, so its inputs
live in static tensors that each step copies into: the ids, the positions
(a tensor, so one graph serves every block) and the key mask. The cache must
stay the same object for as long as the graph is used, and so must every
weight: the graph reads them by address (in-place updates are seen, replaced
tensors are not). It keeps no reference to the model, so a graph kept for
later calls (see ``llada.sampler``) does not keep the model alive.
"""

from __future__ import annotations

from typing import Optional

import torch

from .model import KVCache, LLaDAModel


class CachedStepGraph:
    """One captured cached forward of width W for a batch of B rows.

    Building it needs real inputs: the warm-up forward before the capture
    executes and writes the block's keys and values into the cache, so the
    constructor takes the step's true ids and start. Every call, the first
    included, then replays the graph and returns the logits an eager step
    would.
    """

    def __init__(self, model: LLaDAModel, cache: KVCache, key_mask: Optional[torch.Tensor],
                 ids: torch.Tensor, start: int):
        device = ids.device
        self.cache = cache
        self.ids = ids.clone()
        self.base = torch.arange(ids.shape[1], device=device)
        self.positions = self.base + start
        self.key_mask = None if key_mask is None else key_mask.clone()
        # Warm-up on a side stream, as torch requires before a capture: lazy
        # initialisation (cuBLAS handles, workspaces) must not be captured.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward(model)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(model)

    def _forward(self, model: LLaDAModel) -> torch.Tensor:
        return model(self.ids, self.key_mask, cache=self.cache, positions=self.positions).logits

    def fits(self, cache: KVCache, key_mask: Optional[torch.Tensor], ids: torch.Tensor) -> bool:
        """Whether this graph can run a step with these inputs."""
        same_mask = (key_mask is None) == (self.key_mask is None)
        if key_mask is not None and same_mask:
            same_mask = key_mask.shape == self.key_mask.shape
        return cache is self.cache and ids.shape == self.ids.shape and same_mask

    def __call__(self, key_mask: Optional[torch.Tensor], ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [B, W, V] of ids [B, W] at positions start .. start + W.
        The result is the graph's output buffer: the next call overwrites it."""
        self.ids.copy_(ids)
        torch.add(self.base, start, out=self.positions)
        if key_mask is not None:
            self.key_mask.copy_(key_mask)
        self.graph.replay()
        return self.logits
