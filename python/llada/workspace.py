"""Decoding workspaces: a cached decode's key/value cache and the CUDA graphs
captured against it, kept per model for the next call of the same shape.

A graph costs a warm-up forward and a capture, a few percent of a whole
decode at LLaDA-8B shape, and a server or benchmark repeats its shapes. A
decode checks a workspace out of its model's pool, holds it alone, and
checks it back in when it ends (see ``llada.sampler``).
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch

from . import devices
from . import model as model_module
from .cuda_graph import CachedStepGraph
from .model import KVCache

_WORKSPACES_PER_MODEL = 2  # the most recently returned
# Dual cache: a decode's block width, and a narrower last block (infill).
# Prefix cache: one per block (its width is the block and all after it), so
# enough for 64 blocks (a 2048-token answer in blocks of 32). The graphs of
# a workspace share their memory pool: each adds little beyond its logits.
_GRAPHS_PER_WORKSPACE = 64

# Keyed weakly by the model rather than stored on it: nothing is added to the
# module (no buffer, nothing in state_dict, deepcopy or pickle), and a pool
# goes away with its model. Nothing in a pool refers to the model (a
# CachedStepGraph keeps no reference to it), which would keep it alive.
# No lock: list append and remove are atomic, and a lock could deadlock, as
# the garbage collector may close a dropped stream (which then gives its
# workspace back) in the very thread that holds the lock.
_pools: "weakref.WeakKeyDictionary[torch.nn.Module, list[Workspace]]" = weakref.WeakKeyDictionary()


class Workspace:
    """A key/value cache and the graphs captured against it (newest first).
    One decode at a time holds it: out of the pool while in use. Its graphs
    share one memory pool: they replay one at a time, and a step uses its
    logits before the next replay."""

    def __init__(self, key, weights, cache: KVCache):
        self.key = key  # (device, cache dtype, batch rows, total length, has a key mask)
        self.weights = weights  # _weights_fingerprint of the model when checked out
        self.cache = cache
        self.graphs: list[CachedStepGraph] = []
        self.graph_pool = None  # a CUDA graph memory pool, made with the first graph
        self.done: Optional[torch.cuda.Event] = None  # recorded when last given back, on CUDA

    def graph(self, model, key_mask, ids, start, logits_width) -> CachedStepGraph:
        """A graph of the cached step over ``ids`` [B, W] with the logits of
        its first ``logits_width`` positions: a kept one that fits, else a
        new capture (which runs the step's warm-up forward)."""
        for graph in self.graphs:
            if graph.fits(self.cache, key_mask, ids, logits_width):
                return graph
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = CachedStepGraph(model, self.cache, key_mask, ids, start, logits_width, self.graph_pool)
        self.graphs = [graph] + self.graphs[: _GRAPHS_PER_WORKSPACE - 1]
        return graph


def _weights_fingerprint(model) -> tuple:
    """What a kept graph assumes beyond its inputs: every weight still where
    (and what dtype) it was at capture, since a graph reads them by address
    (in-place updates keep both), and the same attention kernels (backend,
    whether the Hopper kernel may run and its pipeline: the op reads those
    switches at each launch, a replay never does)."""
    kernels = (model_module._attention_backend, os.environ.get("LLADA_ATTENTION_SM90", ""),
               os.environ.get("LLADA_ATTENTION_SM90_PIPELINE", ""))
    return kernels, tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def checkout(model, key) -> Workspace:
    """Takes a workspace for ``key`` out of the model's pool (the most
    recently returned that fits), or makes a new one."""
    weights = _weights_fingerprint(model)
    pool = _pools.setdefault(model, [])
    kept = _take_kept(pool, key, weights)
    if kept is not None:
        return kept
    device, dtype, rows, total, _ = key
    # Made outside inference mode, whatever the caller's: decodes after this
    # one write the cache in place, which torch refuses for an inference
    # tensor outside inference mode (and allows for a normal one inside).
    with torch.inference_mode(False), torch.no_grad():
        try:
            return Workspace(key, weights, KVCache(model.config, rows, total, device, dtype))
        except RuntimeError as e:  # torch.OutOfMemoryError on a GPU; a plain RuntimeError on the CPU
            # Workspaces kept for other shapes must not cost this decode its
            # memory; with nothing kept to free, a retry would fail alike.
            if not devices.out_of_memory(e) or not drop_kept(model):
                raise
        # Retried out of the handler, so that a second failure is not
        # reported as raised while handling the first.
        return Workspace(key, weights, KVCache(model.config, rows, total, device, dtype))


def drop_kept(model) -> bool:
    """Drops the workspaces kept in ``model``'s pool for later calls (not
    those decodes hold now), giving their memory back to torch's allocator;
    whether there were any. A decode that runs out of memory calls it and
    tries once more."""
    pool = _pools.get(model)
    if not pool:
        return False
    pool.clear()
    return True


def _take_kept(pool: list, key, weights) -> Optional[Workspace]:
    """Takes the most recently returned workspace for ``key`` out of
    ``pool``, after dropping those made for other ``weights``; None if
    there is none. (A function of its own so that no local variable of
    checkout still refers to a pooled workspace when checkout clears the
    pool.)"""
    for workspace in list(pool):
        if workspace.weights != weights:
            _take(pool, workspace)  # weights replaced: its graphs would read stale memory
    for workspace in reversed(list(pool)):
        if workspace.key == key and _take(pool, workspace):
            if workspace.done is not None:
                # Its last decode may have run on another stream: the cache
                # is overwritten only after that decode's work.
                torch.cuda.current_stream(key[0]).wait_event(workspace.done)
            return workspace
    return None


def _take(pool: list, workspace: Workspace) -> bool:
    """Removes ``workspace`` from ``pool``; False if another thread took it first."""
    try:
        pool.remove(workspace)
    except ValueError:
        return False
    return True


def checkin(model, workspace: Workspace) -> None:
    """Returns ``workspace`` to the model's pool, as its most recent entry."""
    if workspace.key[0].type == "cuda":
        workspace.done = torch.cuda.Event()
        workspace.done.record(torch.cuda.current_stream(workspace.key[0]))
    pool = _pools.setdefault(model, [])
    pool.append(workspace)
    del pool[:-_WORKSPACES_PER_MODEL]  # the least recently returned go


def release_decode_workspace(model) -> None:
    """Frees (to torch's allocator) the key/value caches and CUDA graphs
    that cached decoding keeps for ``model`` between calls.

    A cached decode (``DecodePolicy(cache=...)``) leaves its cache, and on
    CUDA the graphs captured against it, to the next call of the same shape
    (device, dtype, batch rows, total length, padding mask or none,
    guidance or none; and for a graph, the block width), which then skips
    the allocation, the warm-up and the capture. At most two are kept per
    model, and a decode holds one alone until it ends, so decodes running
    at once (interleaved streams) never share one. A decode that runs out
    of memory while some are kept (including the one of its own larger
    batch, which rows that ended left) drops them all and tries once more. A model that
    ``torch.compile`` made shares its module's workspaces. Graphs are not reused
    after the model's weights are replaced (updating them in place is fine)
    or the attention backend, ``LLADA_ATTENTION_SM90`` or
    ``LLADA_ATTENTION_SM90_PIPELINE`` changes; call this
    after changing torch's global matmul settings (TF32, reduced-precision
    reductions), which a captured graph keeps. Decodes running
    now keep theirs and return them when they end.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _pools.pop(model_module.llada_model_of(model) or model, None)
