"""End-to-end exact generation: llada.generate against the naive
official-equivalent path, on a random LLaDA-shaped model.

The naive path is the official algorithm as published: a full forward of the
whole canvas every step, logits for every position and the full vocabulary,
softmax over all of them, top-k per row. Both paths run the same llada model
weights, so the ratio measures the sampler, not a different transformer.

    python bench/bench_generate.py                          # CPU, mid-size model
    python bench/bench_generate.py --device cuda --shape 8b # LLaDA-8B shape, bf16

The 8B run also measures the machine's matmul rate and memory bandwidth and
prints each path's roofline floor of one step: max(FLOPs / rate, weight
bytes / bw). A naive step is a full forward with logits at every position;
a llada step computes the last block's queries, attention and MLP, and the
logits, at the active block's positions only (on CUDA the whole block; on
the CPU only its masked positions, so there its floor is a little high).
"of its floor" is the path's floor divided by its measured time per step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import torch

import llada
from llada.checkpoint import random_config, random_model
from llada.model import count_parameters

CASES = {
    # shape: (config size, dtype, prompt, gen, block, list of step counts)
    "mid": ("mid", torch.float32, 64, 128, 32, [128]),
    "8b": ("8b-shape", torch.bfloat16, 256, 256, 32, [256, 64]),
}


@torch.no_grad()
def official_generate(model, prompt, steps, gen_length, block_length, mask_id, on_step=None):
    """The official temperature-0 sampler (batch without padding), with its
    softmax in float32 and ties broken toward the lower position."""
    b, lp = prompt.shape
    x = torch.full((b, lp + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :lp] = prompt
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for blk in range(num_blocks):
        end = lp + (blk + 1) * block_length
        n = (x[:, end - block_length : end] == mask_id).sum(1, keepdim=True)
        counts = n // steps + (torch.arange(steps, device=x.device)[None] < n % steps).long()
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x).logits
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.float(), dim=-1)
            x0_p = p.gather(-1, x0[..., None])[..., 0]
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(mask_index)
            for r in range(b):
                order = torch.sort(confidence[r], descending=True, stable=True).indices
                transfer[r, order[: counts[r, i]]] = True
            x[transfer] = x0[transfer]
            if on_step is not None:
                on_step(blk * steps + i, steps * num_blocks, x)
    return x


def run_path(name, model, prompt, steps, gen, block, on_step=None):
    if name == "naive":
        return official_generate(model, prompt, steps, gen, block, model.config.mask_token_id, on_step)
    return llada.generate(model, prompt, steps=steps, gen_length=gen, block_length=block, on_step=on_step)


def cpu_peak_memory(name, shape, seed):
    """Peak RSS growth of one path (one step per block) in a fresh process:
    in one process the paths would reuse each other's freed pages."""
    cmd = [sys.executable, __file__, "--shape", shape, "--seed", str(seed), "--memory-probe", name]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or the
    process RSS sampled every 5 ms on CPU (approximate)."""

    def __init__(self, device):
        self.device = device

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.base
        return False


def timed(device, fn):
    """Run ``fn(on_step)``; return its output, the median step time (robust
    to a busy machine), the total time and, on CUDA, the peak memory (on CPU
    a sampling thread would disturb the timing: see cpu_peak_memory)."""
    stamps = []

    def on_step(step, total, canvas):
        _sync(device)
        stamps.append(time.perf_counter())

    mem = PeakMemory(device)
    if device.type == "cuda":
        mem.__enter__()
    start = time.perf_counter()
    out = fn(on_step)
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        mem.__exit__(None, None, None)
    steps = torch.tensor([b - a for a, b in zip([start] + stamps, stamps)])
    return out, float(steps.median()), seconds, getattr(mem, "bytes", None)


def matmul_rate(device, dtype, m=512, k=4096, n=12288, reps=20):
    a = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    for _ in range(3):
        a @ w.T
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ w.T
    _sync(device)
    return 2 * m * k * n * reps / (time.perf_counter() - start)


def bandwidth(device, nbytes=2 << 30, reps=10):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - start)  # read + write


def forward_flops(cfg, length, query_rows):
    """Matmul FLOPs of one forward over ``length`` positions whose last block
    computes queries, attention, its output projection and the MLP, and
    whose head computes logits, for ``query_rows`` positions only (keys and
    values still for all, as LLaDAModel does given ``logits_at``);
    ``query_rows=length`` is a full forward."""
    d, kv, m, layers = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.mlp_hidden_size, cfg.n_layers
    queried = (layers - 1) * length + query_rows  # rows through the query side, over all layers
    keys_values = 2 * layers * length * 2 * d * kv
    query_side = 2 * queried * (2 * d * d + 3 * d * m)  # q and attention out; gate, up and down
    attn = 4 * queried * length * d  # scores and weighted values, every head
    return keys_values + query_side + attn + 2 * query_rows * d * cfg.embedding_size


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(CASES), default=None,
                        help="default: mid on cpu, 8b on cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of each path, best kept (default: 2 on cpu, 1 on cuda)")
    parser.add_argument("--memory-probe", choices=("naive", "llada"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.repeat is None:
        args.repeat = 1 if device.type == "cuda" else 2
    shape = args.shape or ("8b" if device.type == "cuda" else "mid")
    size, dtype, lp, gen, block, step_counts = CASES[shape]
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32

    cfg = random_config(size)
    model = random_model(cfg, seed=args.seed, device=device, dtype=dtype)
    prompt = torch.randint(0, min(cfg.vocab_size, cfg.mask_token_id) - 4, (1, lp),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    weight_bytes = count_parameters(cfg) * torch.finfo(dtype).bits // 8
    if args.memory_probe:
        with PeakMemory(device) as mem:
            run_path(args.memory_probe, model, prompt, gen // block, gen, block)
        print(mem.bytes)
        return
    print(f"model: {shape} ({count_parameters(cfg) / 1e6:.0f}M parameters, {dtype}), device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"prompt {lp}, gen {gen}, block {block}, batch 1, temperature 0")

    floors = None  # path -> its roofline floor of one step, in seconds
    if shape == "8b":
        rate, bw = matmul_rate(device, dtype), bandwidth(device)
        length = lp + gen
        print(f"measured: matmul {rate / 1e12:.0f} TFLOP/s, copy bandwidth {bw / 1e9:.0f} GB/s; "
              f"{weight_bytes / 1e9:.1f} GB of weights")
        floors = {}
        for name, query_rows in (("naive", length), ("llada", block)):
            flops = forward_flops(cfg, length, query_rows)
            floors[name] = max(flops / rate, weight_bytes / bw)
            print(f"one {name} step (logits at {query_rows} of {length} positions): {flops / 1e12:.2f} TFLOP "
                  f"-> floor {floors[name] * 1e3:.2f} ms")

    # Warm up both paths (allocator, kernels) on a short run.
    official_generate(model, prompt, 2, block, block, cfg.mask_token_id)
    llada.generate(model, prompt, steps=2, gen_length=block, block_length=block)

    rows = []
    for steps in step_counts:
        # Alternate the paths and keep each one's best run: a shared machine's
        # speed drifts over minutes, and this keeps the drift out of the ratio.
        best = {}
        for _ in range(args.repeat):
            for name in ("naive", "llada"):
                run = timed(device, lambda cb: run_path(name, model, prompt, steps, gen, block, cb))
                if name not in best or run[1] < best[name][1]:
                    best[name] = run
        (want, s_naive, t_naive, m_naive), (got, s_ours, t_ours, m_ours) = best["naive"], best["llada"]
        if device.type == "cpu":
            m_naive, m_ours = (cpu_peak_memory(name, shape, args.seed) for name in ("naive", "llada"))
        same = float((got == want).float().mean())
        if dtype == torch.float32 and same != 1.0:
            raise SystemExit(f"outputs differ at steps={steps}: {same:.4f} of tokens equal")
        for name, step_s, t, mem in (("naive", s_naive, t_naive, m_naive), ("llada", s_ours, t_ours, m_ours)):
            rows.append((name, steps, step_s * 1e3, t, gen / (step_s * steps), s_naive / step_s,
                         mem / 2**20, None if floors is None else floors[name] / step_s, same))

    print()
    floor_col = " | of its floor" if floors is not None else ""
    print("tokens/s and x naive use the median step time; total is the wall clock of the run")
    if floors is not None:
        print("of its floor: the path's roofline floor of one step (above) over its median step time")
    print(f"| path | steps | ms/step | total s | tokens/s | x naive | peak extra MiB{floor_col} | same tokens |")
    print(f"|---|---|---|---|---|---|---{'|---' if floors is not None else ''}|---|")
    for name, steps, ms, total, tps, ratio, mib, eff, same in rows:
        eff_col = f" | {eff:.2f}" if eff is not None else ""
        print(f"| {name} | {steps} | {ms:.1f} | {total:.1f} | {tps:.1f} | {ratio:.2f} | {mib:.0f}{eff_col} "
              f"| {same:.4f} |")
    for name, steps, ms, total, tps, ratio, mib, eff, same in rows:
        if name == "llada":
            print(f"RESULT generate {shape} {device.type} steps={steps}: llada {tps:.1f} tok/s, "
                  f"{ratio:.2f}x naive, same tokens {same:.4f}")
    if floors is not None:
        for steps in step_counts:
            print(f"llada at its floor: {gen / (steps * floors['llada']):.1f} tokens/s at {steps} steps")


if __name__ == "__main__":
    main()
