"""CUDA graphs for the cached decoding step.

Inside a block, every cached step runs the same forward: the block's ids
[B, W] (dual cache), or the block's and those of every position after it
(prefix cache), against a key/value cache that does not move, at the same
positions. At batch 1 such a forward is hundreds of small kernels, and
launching them from Python can take longer than running them. A captured
graph launches the whole forward at once.

A graph fixes the addresses of everything it reads and writes, so its inputs
live in static tensors that each step copies into: the ids, the positions
(a tensor, so one graph serves every block of its width) and the key mask.
The cache must stay the same object for as long as the graph is used, and
so must every weight: the graph reads them by address (in-place updates are
seen, replaced tensors are not). It keeps no reference to the model, so a
graph kept for later calls (see ``llada.workspace``) does not keep the
model alive.
"""

from __future__ import annotations

from typing import Optional

import torch

from .model import KVCache, LLaDAModel


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream every warm-up and capture on ``device`` runs on. One per
    device: torch's own capture stream lives on whichever device was current
    when it was first made, which need not be the model's; and one stream
    for all captures lets graphs that share a memory pool reuse each other's
    freed blocks (the allocator keeps blocks per stream)."""
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device)
    return stream


class CachedStepGraph:
    """One captured cached forward of width W for a batch of B rows, with
    the logits of its first ``logits_width`` positions (default: all W).

    Building it needs real inputs: the warm-up forward before the capture
    executes and writes the step's keys and values into the cache, so the
    constructor takes the step's true ids and start. Every call, the first
    included, then replays the graph and returns the logits an eager step
    would. Graphs given the same ``pool`` (``torch.cuda.graph_pool_handle()``)
    share their memory: one's replay may then overwrite what another
    returned, which is fine for graphs replayed one at a time, each output
    used before the next replay.
    """

    def __init__(self, model: LLaDAModel, cache: KVCache, key_mask: Optional[torch.Tensor],
                 ids: torch.Tensor, start: int, logits_width: Optional[int] = None, pool=None):
        self.cache = cache
        width = ids.shape[1]
        self.logits_width = width if logits_width is None else logits_width
        if not 0 < self.logits_width <= width:
            raise ValueError(f"logits_width: expected 1 .. {width}, got {logits_width}")
        # All positions: no slice, so the dual cache's graph is what it was.
        self.logits_at = None if self.logits_width == width else slice(0, self.logits_width)
        # Normal tensors, inputs and output, even when the decode that
        # captures runs under inference mode: later calls copy into them,
        # maybe outside it (see llada.workspace). Leaving inference mode turns
        # gradients on, hence no_grad.
        with torch.inference_mode(False), torch.no_grad():
            self.ids = ids.clone()
            self.base = torch.arange(ids.shape[1], device=ids.device)
            self.positions = self.base + start
            self.key_mask = None if key_mask is None else key_mask.clone()
            self._capture(model, pool)

    def _capture(self, model: LLaDAModel, pool) -> None:
        """Runs the warm-up forward, then captures the forward as
        ``self.graph`` with its output in ``self.logits``."""
        device = self.ids.device
        # Warm-up on a side stream, as torch requires before a capture: lazy
        # initialisation (cuBLAS handles, workspaces) must not be captured.
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward(model)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self.graph, pool=pool, stream=side):
            self.logits = self._forward(model)

    def _forward(self, model: LLaDAModel) -> torch.Tensor:
        return model(self.ids, self.key_mask, logits_at=self.logits_at, cache=self.cache,
                     positions=self.positions).logits

    def fits(self, cache: KVCache, key_mask: Optional[torch.Tensor], ids: torch.Tensor,
             logits_width: Optional[int] = None) -> bool:
        """Whether this graph can run a step with these inputs."""
        same_mask = (key_mask is None) == (self.key_mask is None)
        if key_mask is not None and same_mask:
            same_mask = key_mask.shape == self.key_mask.shape
        wanted = ids.shape[1] if logits_width is None else logits_width
        return (cache is self.cache and ids.shape == self.ids.shape and same_mask
                and wanted == self.logits_width)

    def __call__(self, key_mask: Optional[torch.Tensor], ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [B, logits_width, V] of ids [B, W] at positions start ..
        start + W. The result is the graph's output buffer: the next call
        (or, with a shared pool, the next replay of any graph of the pool)
        overwrites it."""
        self.ids.copy_(ids)
        torch.add(self.base, start, out=self.positions)
        if key_mask is not None:
            self.key_mask.copy_(key_mask)
        self.graph.replay()
        return self.logits
