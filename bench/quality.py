"""Decoding quality vs. speed on the checkable task models.

For every model in python/llada/task_models/ and every decoding policy, the
accuracy on the task's held-out set (exact match with the one answer, or for
``perm`` a verified valid answer) and the NFE (forward passes
per batch of answers, as ``llada.generate``'s DecodeStats counts them, so
policies that stop early or skip steps are measured, not assumed; a CUDA
graph replay counts as the forward it is). Prints one markdown table.

    python bench/quality.py [--examples 500] [--device cpu]

``--examples`` is at most the held-out examples each model's training left
out (its data.json "held_out_examples"): more would score training prompts.

A policy is a name, a decoder with the signature of ``llada.generate`` and
the keyword arguments it gets for a given gen_length (with a
``llada.DecodePolicy`` for the faster rules: threshold, factor, entropy bound,
caches, re-masking); new policies are more entries of ``policies()``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import llada
from llada import tasks
from llada.tokenizer import read_tokenizer

TASK_MODELS = Path(llada.__file__).resolve().parent / "task_models"


@dataclass
class Policy:
    name: str
    decode: Callable  # same signature as llada.generate
    kwargs: Callable[[int], dict]  # gen_length -> steps, block_length, remasking, ...


def half_block(gen_length: int) -> int:
    """The largest proper divisor of gen_length (about half): two or more blocks."""
    return max(d for d in range(1, gen_length) if gen_length % d == 0) if gen_length > 1 else 1


def about_two_per_step(gen_length: int) -> dict:
    """Two tokens per step with the dual cache read: blocks of the answer's
    largest proper divisor of a length (about half of it) where that is 4
    tokens or more, else one block; each block ceil(block / 2) steps (an odd
    block's last step commits one token)."""
    block = half_block(gen_length) if half_block(gen_length) >= 4 else gen_length
    return dict(steps=(gen_length // block) * -(-block // 2), block_length=block, policy=P(cache="dual"))


def policies() -> list[Policy]:
    g = llada.generate
    return [
        Policy("fixed, steps = G", g, lambda n: dict(steps=n, block_length=n)),
        Policy("fixed, steps = G/2", g, lambda n: dict(steps=max(1, n // 2), block_length=n)),
        Policy("fixed, steps = G/4", g, lambda n: dict(steps=max(1, n // 4), block_length=n)),
        Policy("fixed, steps = G, random remasking", g,
               lambda n: dict(steps=n, block_length=n, remasking="random")),
        Policy("fixed, steps = G, semi-AR blocks", g,
               lambda n: dict(steps=n, block_length=half_block(n))),
        Policy("threshold 0.9", g, adaptive(P(commit="threshold", threshold=0.9))),
        Policy("threshold 0.7", g, adaptive(P(commit="threshold", threshold=0.7))),
        Policy("factor 1.0", g, adaptive(P(commit="factor", factor=1.0))),
        Policy("entropy bound 0.1", g, adaptive(P(commit="entropy_bound", gamma=0.1))),
        Policy("margin threshold 0.7", g, adaptive(P(commit="threshold", ranking="margin", threshold=0.7))),
        Policy("dual cache, 1 token/step, semi-AR", g,
               lambda n: dict(steps=n, block_length=half_block(n), policy=P(cache="dual"))),
        Policy("prefix cache, 1 token/step, semi-AR", g,
               lambda n: dict(steps=n, block_length=half_block(n), policy=P(cache="prefix"))),
        Policy("dual cache, about 2 tokens/step", g, about_two_per_step),
        Policy("dual cache + threshold 0.9, semi-AR", g,
               lambda n: dict(steps=n, block_length=half_block(n), policy=P.fast())),
        Policy("prefix cache + threshold 0.9, semi-AR", g,
               lambda n: dict(steps=n, block_length=half_block(n), policy=P(commit="threshold", cache="prefix"))),
        Policy("dual cache (refresh every 2) + threshold 0.9, semi-AR", g,
               lambda n: dict(steps=n, block_length=half_block(n), policy=P.fast(refresh_every=2))),
        Policy("threshold 0.9 + re-masking 0.3", g,
               adaptive(P(commit="threshold", threshold=0.9, remask_below=0.3))),
    ]


P = llada.DecodePolicy


def adaptive(policy) -> Callable[[int], dict]:
    """Arguments for an adaptive commit rule: one block; steps only bound
    the fixed schedule, so they are given as G."""
    return lambda n: dict(steps=n, block_length=n, policy=policy)


def run(model, tok, task, examples, policy: Policy, batch_size: int):
    stats = llada.DecodeStats()

    def counted(*args, **kwargs):
        # The decoder's own count: a hook on the model would miss the cached
        # steps that replay a CUDA graph.
        out, work = policy.decode(*args, return_stats=True, **kwargs)
        stats.add(work)
        return out

    kwargs = policy.kwargs(task.answer_tokens)
    start = time.perf_counter()
    acc = tasks.evaluate(model, tok, task, examples, batch_size=batch_size, generate_fn=counted, **kwargs)
    seconds = time.perf_counter() - start
    batches = -(-len(examples) // batch_size)
    return acc, stats.nfe / batches, kwargs, seconds


def task_run(folder: Path) -> dict | None:
    """The data.json of a task model's training run: its "task" and how many of
    the task's held-out examples the training left out ("held_out_examples":
    only those are unseen). None for a folder that is not a task run (e.g. a
    pretraining run saved next to the task runs)."""
    data_file = folder / "data.json"
    if not data_file.is_file():
        return None
    data = json.loads(data_file.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "task" not in data or "held_out_examples" not in data:
        return None
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500, help="held-out examples per task")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=str(TASK_MODELS), help="folder of task model folders")
    args = parser.parse_args(argv)

    if not Path(args.models).is_dir():
        parser.error(f"--models: expected a folder of task model folders, got {args.models!r}, "
                     f"which is not a folder")
    runs = {}  # folder -> its data.json
    for folder in sorted(p for p in Path(args.models).iterdir() if (p / "config.json").is_file()):
        if (data := task_run(folder)) is None:
            print(f'quality: skipping {folder}: not a task model (no data.json with "task" and '
                  f'"held_out_examples")', file=sys.stderr)
        else:
            runs[folder] = data
    if not runs:
        raise SystemExit(f"no task models under {args.models}")
    if args.examples < 1:
        parser.error(f"--examples: expected a positive int, got {args.examples}")
    if args.batch_size < 1:
        parser.error(f"--batch-size: expected a positive int, got {args.batch_size}")
    for folder, data in runs.items():
        if args.examples > (unseen := data["held_out_examples"]):
            parser.error(f"--examples: expected at most {unseen}, got {args.examples}: {folder.name}'s training "
                         f"left out only the first {unseen} held-out examples (its data.json "
                         f'"held_out_examples"); more would score it on training prompts')
    print(f"device: {args.device}; {args.examples} held-out examples per task; G = gen_length\n")
    print("| task | policy | steps | block | remasking | NFE | accuracy | seconds |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for folder, data in runs.items():
        # The run's own record of its task: the folder may be named anything.
        task = tasks.get_task(data["task"])
        model = llada.load_model(folder, device=args.device, dtype=torch.float32)
        tok = read_tokenizer(folder)
        examples = tasks.held_out_set(task, args.examples)
        for policy in policies():
            acc, nfe, kw, seconds = run(model, tok, task, examples, policy, args.batch_size)
            print(f"| {task.name} (G={task.answer_tokens}) | {policy.name} | {kw['steps']} | "
                  f"{kw['block_length']} | {kw.get('remasking', 'low_confidence')} | {nfe:.1f} | "
                  f"{100 * acc:.1f}% | {seconds:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
