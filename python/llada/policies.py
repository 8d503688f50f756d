"""Decoding policies: how many and which masked positions to commit per step,
how to rank them, and how to reuse work between steps.

The default policy is the official LLaDA algorithm (a fixed number of tokens
per step, ranked by the probability of the prediction, a full forward every
step). The others trade a little accuracy for far fewer forwards:

commit (how many positions per step)
    ``"schedule"``  the official fixed schedule: each block's masked count
                    spread evenly over its steps.
    ``"threshold"`` every candidate whose score is >= ``threshold`` (0.9),
                    and at least the best one. Confident steps commit many
                    tokens, hard ones a single token.
    ``"factor"``    with scores sorted c1 >= c2 >= ..., the largest n with
                    (n + 1) (1 - c_n) < ``factor`` (1.0); at least one.
    ``"entropy_bound"``  sort by entropy (ascending) and accept the largest
                    prefix whose entropies, minus the largest, sum to at most
                    ``gamma``: the EB sampler's bound on the joint error.
    The adaptive rules (all but the schedule) never commit the mask token
    (the schedule, as the official code, may) and ignore ``steps``.
ranking (which positions count as confident)
    ``"probability"`` top-1 probability (the official "low_confidence"),
    ``"margin"`` top-1 minus top-2 probability, ``"entropy"`` exp(-entropy),
    ``"random"`` uniform noise (the official "random").
    Each is a score in [0, 1], so that the threshold and factor rules read
    it as they read a probability. exp(-H) ranks as -H does, the lowest
    entropy first, except that entropies it rounds to one float32 value tie
    (all below about 3e-8 give 1.0; ties go to the lower position, as
    everywhere). Up to float32 rounding it never exceeds the top-1
    probability (the entropy is at least the min-entropy, -log p_max): a
    threshold on it is at least as strict as the same threshold on the
    top-1 probability (the probability ranking at temperature 0). Where the
    two are equal or nearly so (a prediction close to uniform over its
    likeliest tokens) it can come out a few units in the last place above.
    ``entropy_bound`` orders by entropy itself: it takes no other ranking.
cache (what is recomputed per step)
    ``"none"``   a full forward every step (exact).
    ``"prefix"`` at each block start one full forward fills every position's
                 keys and values; later steps feed the block and everything
                 after it, attending to the cached prefix.
    ``"dual"``   as prefix, but later steps feed only the active block and
                 reuse the cached keys and values on both sides of it.
    ``refresh_every`` > 0 also refreshes the cache every that many steps.
cuda_graph (on by default)
    with a cache (prefix or dual) on a CUDA device, each cached step replays
    a captured CUDA graph of its forward instead of launching its kernels one
    by one from Python (see llada.cuda_graph). It computes logits at every
    position of the block rather than only the masked ones. The dual cache
    needs one graph for all blocks; the prefix cache one per block, as what
    it feeds shrinks block by block. Ignored on the CPU; turning it off
    without a cache is an error.
early_stop
    once a finished block of a row holds EOS, the rest of that row's canvas
    becomes EOS and the row needs no more forwards. When infilling, an EOS
    ends only its own gap: the gaps after given text are still filled. The
    EOS written is final: re-masking never opens an ended gap again.
remask_below
    error correction (adaptive commit rules only): after each commit, tokens
    decoded at earlier steps of the active block whose probability under the
    current prediction is below this value are masked again, each position at
    most once, so decoding still terminates. The probability is the one a
    commit is scored on: the mask token, and EOS under logits_eos_inf, take
    no share of it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional

import torch

from . import ops
from .token_ids import is_int

COMMIT_RULES = ("schedule", "threshold", "factor", "entropy_bound")
RANKINGS = ("probability", "margin", "entropy", "random")
CACHES = ("none", "prefix", "dual")
POLICY_NAMES = ("exact", "fast")  # DecodePolicy.named


@dataclass(frozen=True)
class DecodePolicy:
    """How to decode; see the module documentation for each field."""

    commit: str = "schedule"
    threshold: float = 0.9
    factor: float = 1.0
    gamma: float = 0.1
    ranking: str = "probability"
    cache: str = "none"
    refresh_every: int = 0
    early_stop: bool = False
    remask_below: Optional[float] = None
    cuda_graph: bool = True

    def __post_init__(self):
        for name, allowed in (("commit", COMMIT_RULES), ("ranking", RANKINGS), ("cache", CACHES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("threshold", "factor", "gamma", "remask_below"):
            value = getattr(self, name)
            if not (value is None and name == "remask_below") and not _is_real(value):
                raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
        for name in ("early_stop", "cuda_graph"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                kind = type(value)
                where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
                raise TypeError(f"{name}: expected a bool (True or False), got {where}{kind.__qualname__}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold: expected a finite value, got {self.threshold}")
        if not 0.0 <= self.threshold <= 1.0 and self.ranking in ("probability", "margin", "entropy"):
            raise ValueError(f"threshold: expected a value in [0, 1], got {self.threshold}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"factor: expected a finite value > 0, got {self.factor}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma: expected a finite value >= 0, got {self.gamma}")
        if not is_int(self.refresh_every) or self.refresh_every < 0:
            raise ValueError(f"refresh_every: expected an int >= 0, got {self.refresh_every!r}")
        object.__setattr__(self, "refresh_every", int(self.refresh_every))  # a numpy int too
        # A setting the chosen rule would not use is an error, not a silent no-op
        # (as the CLI's flags are). It is told from the default by its value.
        for name, rule in RULE_OF_SETTING.items():
            if self.commit != rule and getattr(self, name) != DEFAULTS[name]:
                raise ValueError(f"{name}: used by commit={rule!r} only; this policy has commit={self.commit!r}")
        if self.commit == "entropy_bound" and self.ranking != DEFAULTS["ranking"]:
            raise ValueError(f"ranking: the entropy_bound rule orders positions by entropy itself; "
                             f"this policy has ranking={self.ranking!r}")
        if self.cuda_graph != DEFAULTS["cuda_graph"] and self.cache == "none":
            raise ValueError("cuda_graph: used with a cache ('prefix' or 'dual') only; this policy has cache='none'")
        if self.refresh_every and self.cache == "none":
            raise ValueError("refresh_every: used with a cache ('prefix' or 'dual') only; this policy has cache='none'")
        if self.remask_below is not None:
            if not 0.0 < self.remask_below < 1.0:
                raise ValueError(f"remask_below: expected a value in (0, 1), got {self.remask_below}")
            if self.commit == "schedule":
                raise ValueError(
                    "remask_below: needs a commit rule that adapts the step count "
                    "(threshold, factor or entropy_bound), not the fixed schedule"
                )

    @classmethod
    def fast(cls, **overrides) -> "DecodePolicy":
        """Dual cache + threshold 0.9: the published fast setting."""
        return cls(**{"commit": "threshold", "cache": "dual", **overrides})

    @classmethod
    def named(cls, name: str) -> "DecodePolicy":
        """A policy by its name, as the CLI's ``--policy`` takes it: ``"exact"``
        (the official algorithm) or ``"fast"``."""
        if name not in POLICY_NAMES:
            raise ValueError(f"policy: expected a DecodePolicy or one of {POLICY_NAMES}, got {name!r}")
        return cls.fast() if name == "fast" else cls()


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# The commit rule each rule-specific setting tunes, and the settings' defaults.
RULE_OF_SETTING = {"threshold": "threshold", "factor": "factor", "gamma": "entropy_bound"}
DEFAULTS = {f.name: f.default for f in fields(DecodePolicy)}


def ranking_scores(choice: ops.TokenChoice, ranking: str, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Per predicted position, the score that ranks it (higher = surer;
    -inf: no candidate)."""
    if ranking == "probability":
        return choice.confidence  # -inf or NaN where there is no prediction
    if ranking == "margin":
        score = choice.margin
    elif ranking == "entropy":
        # In (0, 1], as a probability: -entropy (<= 0) would pass no
        # threshold, and the factor rule's (n + 1)(1 - c_n) would stay >= 2.
        score = torch.exp(-choice.entropy)
    else:
        score = noise
    # A position without a prediction (logits all -inf or NaN: token -1,
    # confidence -inf; a NaN logit: confidence NaN) is no candidate under any
    # ranking, as under the probability's: its margin and entropy say nothing.
    return torch.where(choice.confidence >= 0, score, -math.inf)


def _top_k_stop_predictions_last(scores: torch.Tensor, stop: torch.Tensor, k) -> torch.Tensor:
    """The fixed schedule's choice with the ``stop`` positions (those
    predicting EOS or EoT) ranked after every other candidate of their row:
    per row, the first k[b] candidates ordered by (is stop, -score,
    position). Two stable sorts, no arithmetic on the scores (which would
    round near-equal ones into ties), and no host sync."""
    candidate = scores > -math.inf  # NaN is no candidate, as in select_positions
    order = torch.sort(torch.where(candidate, scores, -math.inf), dim=1, descending=True, stable=True).indices
    group = torch.where(candidate, stop.to(torch.int8), 2)  # others, then stops, then non-candidates
    order = order.gather(1, torch.sort(group.gather(1, order), dim=1, stable=True).indices)
    rank = torch.arange(scores.shape[1], device=scores.device)
    # An int stays one: a tensor made from it would be a copy to the device, which waits.
    limit = k if isinstance(k, int) else k.reshape(-1, 1)
    take = (rank[None, :] < limit) & candidate.gather(1, order)
    return torch.zeros_like(candidate).scatter(1, order, take)


def entropy_bound_select(entropy: torch.Tensor, candidate: torch.Tensor, gamma: float) -> torch.Tensor:
    """EB rule on [B, L] entropies: per row, the largest prefix U of the
    candidates sorted by entropy (ties: lower position) with
    sum(H(U)) - max(H(U)) <= gamma; at least one when there is a candidate."""
    h = torch.where(candidate, entropy, math.inf)
    order = torch.sort(h, dim=1, stable=True).indices
    sorted_h = h.gather(1, order)
    # With ascending entropies, sum(U) - max(U) is the sum of all but the
    # last. It is summed as such, since a running sum less the last entry
    # rounds at the size of that largest entry, and in float64 against gamma
    # as given, since float32 would round both near the boundary.
    finite_h = torch.nan_to_num(sorted_h.double(), posinf=0.0)
    before = torch.zeros_like(finite_h)
    before[:, 1:] = torch.cumsum(finite_h[:, :-1], dim=1)
    take = (before <= gamma) & torch.isfinite(sorted_h)
    take[:, 0] &= torch.isfinite(sorted_h[:, 0])
    accepted = torch.zeros_like(candidate)
    return accepted.scatter(1, order, take)


def select(
    policy: DecodePolicy,
    scores: torch.Tensor,
    entropy: Optional[torch.Tensor],
    k: Optional[torch.Tensor | int],
    stop: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Which positions to commit: scores [B, L] float32 (-inf = not a
    candidate), entropies [B, L] for the EB rule, k [B] (or one int) for the
    schedule.

    ``stop`` [B, L] marks the positions predicting EOS or EoT, committed
    after every other candidate of their row. The fixed schedule commits a
    set count, so they stay candidates, ranked last. The other rules read
    the scores themselves (factor, EB): there a row's stop positions are
    candidates only in a step where nothing else is left in the row."""
    if stop is not None and policy.commit == "schedule":
        return _top_k_stop_predictions_last(scores, stop, k)
    if stop is not None:
        others = ((scores > -math.inf) & ~stop).any(dim=1, keepdim=True)
        scores = torch.where(stop & others, -math.inf, scores)
    if policy.commit == "schedule":
        return ops.select_positions(scores, "topk", k=k)
    if policy.commit == "threshold":
        return ops.select_positions(scores, "threshold", threshold=policy.threshold)
    if policy.commit == "factor":
        return ops.select_positions(scores, "factor", factor=policy.factor)
    return entropy_bound_select(entropy, torch.isfinite(scores), policy.gamma)
