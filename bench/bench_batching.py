"""Many prompts of mixed lengths through Engine.generate: batches formed in
the list's order against batches formed by prompt length (the default), as
all rows' tokens per second and the positions each forward feeds.

    python bench/bench_batching.py                         # CPU, mid-size model (about 6 minutes)
    python bench/bench_batching.py --device cuda --shape 8b

Every row of a batch is left-padded to its longest prompt, so a batch that
mixes a long prompt with short ones spends most of each forward on padding.
The prompts are random text of a byte-level tokenizer (one token per
character), their lengths drawn uniformly between a quarter of and twice
the shape's prompt length. Random weights: speed only, not quality.

With a cache, each batch of a timed call allocates a key/value cache (and
on CUDA captures its step graphs), in both orderings: the model keeps the
workspaces of its two most recent decode shapes only (see
llada.release_decode_workspace), and the default run's four batches have
four padded lengths, so no warm-up could leave them all. Each timed call
therefore starts with none kept: both orderings pay one allocation per
batch shape, whatever an earlier call left.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import llada
from llada.checkpoint import random_config, random_model, write_tokenizer

SHAPES = {
    "mid": dict(size="mid", prompt=64, gen=128, block=32),
    "8b": dict(size="8b-shape", prompt=256, gen=256, block=32),
}


def make_engine(shape: str, device: str, dtype: torch.dtype) -> llada.Engine:
    cfg = random_config(SHAPES[shape]["size"])
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder), cfg)
        tokenizer = llada.load_tokenizer(folder)
    return llada.Engine(random_model(cfg, seed=0, device=device, dtype=dtype), tokenizer)


def make_prompts(count: int, prompt_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    return ["".join(rng.choice(letters) for _ in range(rng.randint(prompt_len // 4, 2 * prompt_len)))
            for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs per row; the best counts")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    engine = make_engine(args.shape, args.device, dtype)
    prompts = make_prompts(args.prompts, shape["prompt"], seed=0)
    gen, block = shape["gen"], shape["block"]
    lengths = sorted(len(p) for p in prompts)
    print(f"model {args.shape} ({dtype}), device {args.device}, {len(prompts)} prompts of "
          f"{lengths[0]}-{lengths[-1]} tokens, gen {gen}, block {block}, batches of {args.batch_size}")

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for policy_name, policy in (("exact, 4 tokens/step", llada.DecodePolicy()),
                                ("dual cache, 4 tokens/step", llada.DecodePolicy(cache="dual"))):
        base = None
        for order, by_length in (("list order", False), ("by length", True)):
            options = dict(steps=gen // 4, gen_length=gen, block_length=block, policy=policy,
                           batch_size=args.batch_size, by_length=by_length)
            engine.generate(prompts[: args.batch_size], **options)  # warm-up (one-time costs)
            best, stats = None, None
            for _ in range(args.repeats):
                llada.release_decode_workspace(engine.model)  # see the module's docstring
                stats = llada.DecodeStats()
                sync()
                start = time.perf_counter()
                engine.generate(prompts, stats=stats, **options)
                sync()
                seconds = time.perf_counter() - start
                best = seconds if best is None else min(best, seconds)
            tps = len(prompts) * gen / best
            base = base or tps
            rows.append((policy_name, order, stats.positions_per_forward, tps, tps / base))
            print(f"RESULT batching {args.shape} {args.device} policy='{policy_name}' order='{order}' "
                  f"tok_per_s={tps:.1f} x_list_order={tps / base:.2f}", flush=True)
    print()
    print("| policy | batches formed | positions/forward | tokens/s, all rows | x list order |")
    print("|---|---|---:|---:|---:|")
    for policy_name, order, ppf, tps, ratio in rows:
        print(f"| {policy_name} | {order} | {ppf:.0f} | {tps:.1f} | {ratio:.2f} |")
    print("With a cache, each timed call allocates every batch's cache (on CUDA also captures its graphs), "
          "in both orderings.")


if __name__ == "__main__":
    main()
