"""Fast decoding against the exact sampler: tokens/s, forwards (NFE), tokens per
forward and positions fed per forward, for each policy, on one random model.

    python bench/bench_decoding.py                        # CPU, mid-size model
    python bench/bench_decoding.py --device cuda --shape 8b
    python bench/bench_decoding.py --compile              # also the model torch.compile made
    python bench/bench_decoding.py --dtype bfloat16       # a 16-bit model on the CPU

The baseline is exact mode with one token per step (steps = gen_length),
measured in the same run; ratios are against it ("n/a" if it failed). A
second table gives the throughput of batches (all rows' tokens per second,
against batch 1 in the same run, "n/a" if that failed), and a last one times
the parts of a dual-cache block on their own, and where one forward's and
one whole decode's device time goes. Random weights say nothing about
quality (see bench/quality.py for that), only about speed.

A row that raises reads "failed"; a row that only launches the same
computation differently (eager steps instead of CUDA graphs, a first call)
must give the same tokens as the row it varies, and reads "wrong" if not.
Either way the whole report still prints, then the script exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager, nullcontext

import torch

import llada
from llada.checkpoint import random_config, random_model
from llada.model import pack_projections

SHAPES = {
    "mid": dict(size="mid", prompt=64, gen=128, block=32),
    "8b": dict(size="8b-shape", prompt=256, gen=256, block=32),
}
BASELINE = "exact, 1 token/step"  # the row the others' ratios are against
# Rows that differ from another only in how its computation is launched (or
# in starting without a workspace): their tokens must equal that row's.
SAME_TOKENS_AS = {
    "dual cache, 4 tokens/step, first call": "dual cache, 4 tokens/step",
    "prefix cache, 4 tokens/step, first call": "prefix cache, 4 tokens/step",
    "prefix cache, 4 tokens/step, eager": "prefix cache, 4 tokens/step",
    "dual cache, 4 tokens/step, eager": "dual cache, 4 tokens/step",
    "dual cache + threshold 0.9, eager": "dual cache + threshold 0.9",
}


@contextmanager
def without_hopper(model):
    """On an H100/H200 the default rows run the Hopper attention kernel where
    the op's plan takes it; this turns it off (LLADA_ATTENTION_SM90=0)."""
    saved = os.environ.get("LLADA_ATTENTION_SM90")
    os.environ["LLADA_ATTENTION_SM90"] = "0"
    try:
        yield model
    finally:
        if saved is None:
            del os.environ["LLADA_ATTENTION_SM90"]
        else:
            os.environ["LLADA_ATTENTION_SM90"] = saved


@contextmanager
def separate_projections(model):
    """On CUDA the model's q/k/v and ff_proj/up_proj weights are packed (one
    GEMM per group); this gives each weight its own buffer and GEMM."""
    pack_projections(model, False)
    try:
        yield model
    finally:
        pack_projections(model, True)


@contextmanager
def compiled(model):
    """The model as torch.compile makes it (inductor, default mode). The
    untimed first call compiles; on CUDA the cached steps' graphs capture
    the eager forward, so compiling changes the block-start forwards."""
    yield torch.compile(model)


def policies(gen: int, block: int, device: str, compile_row: bool):
    """(name, steps, policy, fresh, setting): the exact baseline first. On
    CUDA the caches replay their steps as CUDA graphs (the default: one per
    block for the prefix cache, one for all for the dual cache); the eager
    rows without graphs show what the graphs save. A cached decode reuses
    the cache (and graphs) an earlier call of its shape left; a `fresh` row
    first releases them, so it pays for the allocation and the captures as a
    model's first call does. A `setting` row runs under a context that
    changes one thing from the default (and gives the model to decode with)."""
    P = llada.DecodePolicy
    rows = [
        (BASELINE, gen, P(), False, None),
        ("exact, 4 tokens/step", gen // 4, P(), False, None),
        ("dual cache, 4 tokens/step", gen // 4, P(cache="dual"), False, None),
        ("dual cache, 4 tokens/step, first call", gen // 4, P(cache="dual"), True, None),
        ("dual cache + threshold 0.9", gen, P.fast(), False, None),
        ("dual cache + factor 1.0", gen, P(commit="factor", cache="dual"), False, None),
        ("prefix cache, 4 tokens/step", gen // 4, P(cache="prefix"), False, None),
    ]
    if device == "cuda":
        rows += [
            ("prefix cache, 4 tokens/step, first call", gen // 4, P(cache="prefix"), True, None),
            ("prefix cache, 4 tokens/step, eager", gen // 4, P(cache="prefix", cuda_graph=False), False, None),
            ("dual cache, 4 tokens/step, eager", gen // 4, P(cache="dual", cuda_graph=False), False, None),
            ("dual cache + threshold 0.9, eager", gen, P.fast(cuda_graph=False), False, None),
            ("dual cache, 4 tokens/step, projections not packed", gen // 4, P(cache="dual"), False,
             separate_projections),
        ]
    if compile_row:
        rows.append(("dual cache, 4 tokens/step, torch.compile", gen // 4, P(cache="dual"), False, compiled))
    if device == "cuda" and llada.hopper_attention_available() and os.environ.get("LLADA_ATTENTION_SM90") != "0":
        rows.append(("dual cache, 4 tokens/step, without the Hopper kernel", gen // 4, P(cache="dual"), False,
                     without_hopper))
    return rows



def run(model, prompt, steps, gen, block, policy, device):
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    out, stats = llada.generate(model, prompt, steps=steps, gen_length=gen, block_length=block,
                                policy=policy, return_stats=True)
    sync()
    return time.perf_counter() - start, out, stats


def ratio_text(tps: float, base) -> str:
    """tps as a multiple of the baseline's tokens/s; "n/a" when the baseline
    failed (another row must not stand in for it under its name)."""
    return f"{tps / base:.2f}" if base else "n/a"


def batch_throughput(model, cfg, shape, device: str, repeats: int) -> list[str]:
    """Dual cache at 4 tokens per step for a batch of rows: every row's
    tokens per second, against batch 1. The padded batch's prompts are
    left-padded to the longest (lengths down to 3/4 of it), as a batch of
    real prompts is. Returns the names of the batches that failed."""
    prompt_len, gen, block = shape["prompt"], shape["gen"], shape["block"]
    policy = llada.DecodePolicy(cache="dual")
    g = torch.Generator().manual_seed(2)
    cases = []
    for batch, padded in ((1, False), (4, False), (8, False), (8, True)):
        prompt = torch.randint(0, min(cfg.vocab_size, 30000), (batch, prompt_len), generator=g)
        mask = None
        if padded:
            lengths = torch.randint(prompt_len * 3 // 4, prompt_len + 1, (batch,), generator=g)
            lengths[0] = prompt_len
            mask = (torch.arange(prompt_len)[None, :] >= prompt_len - lengths[:, None]).long()
        cases.append((batch, padded, prompt, mask))
    rows, base, failed = [], None, []
    for batch, padded, prompt, mask in cases:
        def decode():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            llada.generate(model, prompt, mask, steps=gen // 4, gen_length=gen, block_length=block, policy=policy)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        name = f"{batch}" + (", left-padded" if padded else "")
        try:
            decode()  # the batch's first call: its cache and graphs
            tps = batch * gen / min(decode() for _ in range(repeats))
        except RuntimeError as error:  # out of memory, say: the other rows still run
            rows.append((name, "failed", ""))
            failed.append(f"batch '{name}'")
            print(f"RESULT decoding_batch {device} batch='{name}' FAILED: {str(error).splitlines()[0]}", flush=True)
            continue
        if batch == 1 and not padded:
            base = tps
        ratio = ratio_text(tps, base)
        rows.append((name, f"{tps:.1f}", ratio))
        print(f"RESULT decoding_batch {device} batch='{name}' tok_per_s={tps:.1f} x_batch1={ratio}", flush=True)
    print()
    print("| batch (dual cache, 4 tokens/step) | tokens/s, all rows | x batch 1 |")
    print("|---|---:|---:|")
    for name, tps, ratio in rows:
        print(f"| {name} | {tps} | {ratio} |")
    return failed


def step_anatomy(model, prompt_len: int, gen: int, block: int, device: str, min_time: float) -> None:
    """Where a dual-cache block's time goes: the block-start forward over the
    whole sequence, a cached forward of the block (eagerly, and on CUDA as a
    replayed graph) and the sampler's ops of one step; and the tokens/s they
    imply at 4 tokens per step (one full forward, then cached steps)."""
    from llada.cuda_graph import CachedStepGraph
    from llada.model import KVCache
    from timing import time_us

    cfg = model.config
    total, lo, hi = prompt_len + gen, prompt_len, prompt_len + block
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(cfg.vocab_size, 30000), (1, total), generator=g).to(device)
    cache = KVCache(cfg, 1, total, device, model.dtype)
    # The block's positions as slices, as the decoder's whole-block steps
    # pass them on CUDA: a bool mask would add host syncs to the forwards
    # (counting and gathering its positions) that decoding never pays.
    rows = {
        "full forward (fills the cache)": lambda: model(ids, None, logits_at=slice(lo, hi), cache=cache),
        "cached forward of the block": lambda: model(ids[:, lo:hi], None, logits_at=slice(0, block), cache=cache,
                                                     start=lo),
    }
    if device == "cuda":
        graph = CachedStepGraph(model, cache, None, ids[:, lo:hi], lo)
        rows["cached forward, CUDA graph"] = lambda: graph(None, ids[:, lo:hi], lo)
    logits = model(ids, None, logits_at=slice(lo, hi), cache=cache).logits  # [1, block, V]
    logits = logits.view(block, logits.shape[-1])  # one row per position, as the decoder samples them
    canvas = ids.clone()
    k = torch.full((1,), 4, dtype=torch.int64, device=device)

    def sampler_ops():
        choice = llada.sample_tokens(logits)
        grid = torch.full((1, total), -float("inf"), device=device)
        grid[:, lo:hi] = choice.confidence
        accepted = llada.select_positions(grid, "topk", k)
        x0 = canvas.clone()
        x0[:, lo:hi] = choice.tokens
        llada.commit_tokens(canvas, x0, accepted, cfg.mask_token_id)

    rows["sampler ops of a step (approx.)"] = sampler_ops
    ms = {name: time_us(fn, device, min_time) / 1e3 for name, fn in rows.items()}
    print()
    print(f"| step anatomy (prompt {prompt_len}, gen {gen}, block {block}) | ms |")
    print("|---|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} |")
    steps = block // 4
    for cached in [n for n in ms if n.startswith("cached")]:
        block_ms = ms["full forward (fills the cache)"] + (steps - 1) * ms[cached] + steps * ms[
            "sampler ops of a step (approx.)"]
        print(f"| implied tokens/s, 4 tokens/step, {cached} | {block / block_ms * 1e3:.0f} |")
    device_time("cached forward", rows["cached forward of the block"], device,
                ms["cached forward of the block"], calls=5)


def device_time(title: str, fn, device: str, wall_ms: float, calls: int, top: int = 12) -> None:
    """The kernels (CPU: ops) a call of fn spends its device time in, from
    the profiler: the biggest first, per call. Device time well below the
    wall time means the GPU waits on the host (launches, syncs, Python)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [(getattr(e, attribute), e.count, e.key) for e in prof.key_averages()]
    events = sorted([e for e in events if e[0] > 0], reverse=True)
    busy_us = sum(e[0] for e in events) / calls
    print()
    print(f"| {title}, {'kernel' if cuda else 'op'} (device busy {busy_us / 1e3:.2f} ms "
          f"of {wall_ms:.2f} ms wall) | calls | us | share |")
    print("|---|---:|---:|---:|")
    for total_us, count, name in events[:top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        print(f"| `{short}` | {count / calls:g} | {total_us / calls:.1f} | {total_us / calls / busy_us:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--repeats", type=int, default=2, help="runs per policy; the best counts")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="the model's dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="add a row for the model compiled by torch.compile (its compilation untimed)")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    cfg = random_config(shape["size"])
    model = random_model(cfg, seed=0, device=args.device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(cfg.vocab_size, 30000), (1, shape["prompt"]), generator=g)
    gen, block = shape["gen"], shape["block"]
    print(f"model {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{dtype}), device {args.device}, prompt {shape['prompt']}, gen {gen}, block {block}, batch 1")

    run(model, prompt, gen // 4, gen, block, llada.DecodePolicy(cache="dual"), args.device)  # warm-up
    rows, base = [], None
    tokens = {}  # row name -> the tokens it decoded
    failed = []  # what failed, for the exit status once everything is printed
    for name, steps, policy, fresh, setting in policies(gen, block, args.device, args.compile):
        best = None
        try:
            with setting(model) if setting else nullcontext(model) as decoder:
                if policy.cache != "none" and not fresh:
                    # Untimed: the cache and graphs this shape needs (a
                    # setting's own, or the prefix cache's one per block),
                    # which the timed calls then reuse.
                    run(decoder, prompt, steps, gen, block, policy, args.device)
                for _ in range(args.repeats):
                    if fresh:
                        llada.release_decode_workspace(decoder)
                    seconds, out, stats = run(decoder, prompt, steps, gen, block, policy, args.device)
                    best = seconds if best is None else min(best, seconds)
        except RuntimeError as error:  # one failing path must not cost the other rows
            rows.append((name, None))
            failed.append(f"policy '{name}'")
            print(f"RESULT decoding {args.shape} {args.device} policy='{name}' FAILED: "
                  f"{str(error).splitlines()[0]}", flush=True)
            continue
        tokens[name] = out
        tps = gen / best
        if name == BASELINE:
            base = tps
        ratio = ratio_text(tps, base)
        rows.append((name, (stats.nfe, stats.tokens_per_forward, stats.positions_per_forward, tps, ratio)))
        print(f"RESULT decoding {args.shape} {args.device} policy='{name}' nfe={stats.nfe} "
              f"tok_per_s={tps:.1f} x_exact={ratio}", flush=True)
        same_as = SAME_TOKENS_AS.get(name)
        if same_as in tokens and not torch.equal(out, tokens[same_as]):
            # Timed all the same; "wrong" in the table.
            rows[-1] = (f"{name} (wrong: tokens differ from '{same_as}')", rows[-1][1])
            failed.append(f"policy '{name}' (tokens differ from '{same_as}')")
            print(f"RESULT decoding {args.shape} {args.device} policy='{name}' FAILED: "
                  f"its tokens differ from those of '{same_as}'", flush=True)

    print()
    print("| policy | NFE | tokens/forward | positions/forward | tokens/s | x exact |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, figures in rows:
        if figures is None:
            print(f"| {name} | failed | | | | |")
            continue
        nfe, tpf, ppf, tps, ratio = figures
        print(f"| {name} | {nfe} | {tpf:.2f} | {ppf:.1f} | {tps:.1f} | {ratio} |")
    failed += batch_throughput(model, cfg, shape, args.device, args.repeats)
    with torch.no_grad():
        step_anatomy(model, shape["prompt"], gen, block, args.device, 0.5 if args.device == "cuda" else 1.0)
    # A whole decode with the default fast path: what the GPU does between
    # the forwards, and how long it waits on the host.
    default = ("dual cache, 4 tokens/step", gen // 4, llada.DecodePolicy(cache="dual"))
    seconds, _, _ = run(model, prompt, default[1], gen, block, default[2], args.device)
    device_time(f"one decode, {default[0]}",
                lambda: run(model, prompt, default[1], gen, block, default[2], args.device),
                args.device, seconds * 1e3, calls=1)
    if failed:
        raise SystemExit(f"{len(failed)} row(s) failed (see their RESULT lines): {'; '.join(failed)}")


if __name__ == "__main__":
    main()
