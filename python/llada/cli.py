"""The ``llada`` command.

    llada generate --model PATH [--chat] [--steps N ...] [--policy fast] "prompt"
    llada infill --model PATH --prefix "..." --suffix "..." --length N
    llada train (--corpus stdlib | --task NAME) --out DIR ...
    llada make-random-checkpoint DIR [--size tiny|mid|8b-shape]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASK_GLYPH = {True: "░", False: "_"}  # terminal, plain text


def default_model_path() -> Optional[str]:
    """Where ``--model`` points when not given: the bundled code model."""
    from .train import default_model_path as bundled

    return bundled()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada", description="Masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", help="checkpoint folder (Hugging Face LLaDA format)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--steps", type=int, default=128)
    gen.add_argument("--gen-length", type=int, default=128)
    gen.add_argument("--block-length", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--cfg-scale", type=float, default=0.0)
    gen.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", help="default: cuda when available, else cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    gen.add_argument("--show-steps", action="store_true", help="show the canvas filling in")
    gen.add_argument("--stream", action="store_true", help="print the answer block by block as it is final")
    add_policy_arguments(gen)
    gen.set_defaults(run=run_generate)

    fill = sub.add_parser("infill", help="fill a gap between a prefix and a suffix")
    fill.add_argument("--model", help="checkpoint folder (Hugging Face LLaDA format)")
    fill.add_argument("--prefix", default="", help="text before the gap")
    fill.add_argument("--suffix", default="", help="text after the gap")
    fill.add_argument("--length", type=int, required=True, help="tokens to fill")
    fill.add_argument("--steps", type=int, default=None, help="default: one token per step")
    fill.add_argument("--block-length", type=int, default=None, help="default: the whole gap")
    fill.add_argument("--temperature", type=float, default=0.0)
    fill.add_argument("--seed", type=int, default=None)
    fill.add_argument("--device", help="default: cuda when available, else cpu")
    fill.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    add_policy_arguments(fill)
    fill.set_defaults(run=run_infill)

    # `llada train` has its own parser (llada.train); main() hands it the rest.
    sub.add_parser("train", help="train a small LLaDA model (see llada train --help)", add_help=False)

    rnd = sub.add_parser("make-random-checkpoint", help="write a random LLaDA checkpoint folder")
    rnd.add_argument("dir")
    rnd.add_argument("--size", choices=("tiny", "mid", "8b-shape"), default="tiny")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32, bfloat16 for 8b-shape")
    rnd.add_argument("--shards", type=int, default=None, help="default: 1, 8 for 8b-shape")
    rnd.set_defaults(run=run_make_random)
    return parser


def add_policy_arguments(parser) -> None:
    group = parser.add_argument_group("decoding policy (see llada.DecodePolicy)")
    group.add_argument("--policy", choices=("exact", "fast"), default="exact",
                       help="exact: the official algorithm; fast: dual cache + threshold 0.9")
    group.add_argument("--commit", choices=("schedule", "threshold", "factor", "entropy_bound"))
    group.add_argument("--threshold", type=float)
    group.add_argument("--factor", type=float)
    group.add_argument("--cache", choices=("none", "prefix", "dual"))
    group.add_argument("--early-stop", action="store_true", help="stop a row once a block holds EOS")
    group.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="on CUDA, replay dual-cache steps as a captured CUDA graph (default: on)")
    group.add_argument("--stats", action="store_true", help="print forwards and tokens per forward to stderr")


def policy_from_arguments(args):
    from .policies import DecodePolicy

    base = DecodePolicy.fast() if args.policy == "fast" else DecodePolicy()
    changes = {name: getattr(args, name) for name in ("commit", "threshold", "factor", "cache")
               if getattr(args, name) is not None}
    if args.early_stop:
        changes["early_stop"] = True
    if args.cuda_graph is not None:
        changes["cuda_graph"] = args.cuda_graph
    return DecodePolicy(**{**base.__dict__, **changes})


def load_for_cli(args, parser):
    """Model and tokenizer of --model (or the default), on --device/--dtype."""
    from .checkpoint import load_model, load_tokenizer

    path = args.model or default_model_path()
    if path is None:
        parser.error("--model is required (no default model is bundled yet)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(path, device=device, dtype=DTYPES[args.dtype] if args.dtype else None)
    return model, load_tokenizer(path)


def print_stats(stats) -> None:
    print(f"forwards {stats.nfe}, tokens per forward {stats.tokens_per_forward:.2f}, "
          f"positions per forward {stats.positions_per_forward:.1f}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return run_train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args, parser)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"llada: error: {e}", file=sys.stderr)
        return 2


def run_train(argv: list[str]) -> int:
    from .train import main as train_main

    return train_main(argv)


def run_make_random(args, parser) -> int:
    from .checkpoint import write_random_checkpoint

    big = args.size == "8b-shape"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if big else torch.float32)
    shards = args.shards if args.shards is not None else (8 if big else 1)
    path = write_random_checkpoint(args.dir, seed=args.seed, size=args.size, dtype=dtype, num_shards=shards)
    print(path)
    return 0


def run_generate(args, parser) -> int:
    from .sampler import generate

    model, tokenizer = load_for_cli(args, parser)
    cfg = model.config
    policy = policy_from_arguments(args)

    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    ids = tokenizer(text, add_special_tokens=not args.chat)["input_ids"]
    prompt = torch.tensor([ids], dtype=torch.long)
    stops = {cfg.eos_token_id, cfg.eot_token_id} - {None}

    options = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                   temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
                   seed=args.seed, policy=policy)
    if args.stream:
        return stream_answer(model, prompt, tokenizer, stops, options, args.stats)
    with _StepDisplay(args.show_steps, args.steps, tokenizer, cfg.mask_token_id, len(ids), stops) as show:
        out, stats = generate(model, prompt, on_step=show.update, return_stats=True, **options)
    print(decode_answer(tokenizer, out[0, len(ids):].tolist(), stops))
    if args.stats:
        print_stats(stats)
    return 0


def stream_answer(model, prompt, tokenizer, stops, options, show_stats) -> int:
    """Prints the answer as each block becomes final, up to the first stop token."""
    from .sampler import BlockEvent, DecodeStats, stream

    answer, shown, stats = [], "", DecodeStats()
    for event in stream(model, prompt, **options, stats=stats):
        if not isinstance(event, BlockEvent):
            continue
        answer += event.tokens[0].tolist()
        text = decode_answer(tokenizer, answer, stops)
        # Print only what is new; hold back a trailing partial character.
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
        if any(t in stops for t in answer):
            break
    print(decode_answer(tokenizer, answer, stops)[len(shown):])
    if show_stats:
        print_stats(stats)
    return 0


def run_infill(args, parser) -> int:
    from .sampler import infill

    if args.length < 1:
        parser.error(f"--length: expected a positive number of tokens, got {args.length}")
    model, tokenizer = load_for_cli(args, parser)
    cfg = model.config
    prefix = tokenizer(args.prefix, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(args.suffix, add_special_tokens=False)["input_ids"]
    canvas = torch.tensor(prefix + [cfg.mask_token_id] * args.length + suffix, dtype=torch.long)
    out, stats = infill(model, canvas, steps=args.steps, block_length=args.block_length,
                        temperature=args.temperature, seed=args.seed,
                        policy=policy_from_arguments(args), return_stats=True)
    gap = out[len(prefix): len(prefix) + args.length].tolist()
    stops = {cfg.eos_token_id, cfg.eot_token_id} - {None}
    print(args.prefix + tokenizer.decode([t for t in gap if t not in stops], skip_special_tokens=True)
          + args.suffix)
    if args.stats:
        print_stats(stats)
    return 0


def decode_answer(tokenizer, ids: list[int], stops: set[int]) -> str:
    """The answer text: tokens up to the first EOS/EoT, specials dropped."""
    for i, t in enumerate(ids):
        if t in stops:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def render_canvas(tokenizer, ids: list[int], mask_id: int, glyph: str, stops: set[int]) -> str:
    """The generated part with masks visible; runs of tokens decode together so
    multi-byte characters survive."""
    pieces, run = [], []
    for t in ids:
        if t == mask_id:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=True))
                run = []
            pieces.append(glyph)
        elif t not in stops:
            run.append(t)
    if run:
        pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces)


class _StepDisplay:
    """Progress on stderr, and with --show-steps the canvas: redrawn in place
    on a terminal (rich Live), one line per step when stdout is not one."""

    def __init__(self, show_steps, total, tokenizer, mask_id, prompt_len, stops):
        self.show_steps, self.total = show_steps, total
        self.tokenizer, self.mask_id, self.prompt_len, self.stops = tokenizer, mask_id, prompt_len, stops
        self.tty = sys.stdout.isatty()
        self.live = self.bar = None

    def __enter__(self):
        if self.show_steps and self.tty:
            from rich.live import Live

            self.live = Live("", refresh_per_second=20, transient=False)
            self.live.__enter__()
        elif not self.show_steps and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, file=sys.stderr, unit="step", leave=False)
        return self

    def update(self, step, total, canvas):
        if self.bar is not None:
            self.bar.update(1)
        if not self.show_steps:
            return
        text = render_canvas(
            self.tokenizer, canvas[0, self.prompt_len:].tolist(), self.mask_id,
            MASK_GLYPH[self.tty], self.stops,
        )
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text(f"step {step + 1}/{total}\n{text}"))
        else:
            # One line per step: escape line breaks and other control characters.
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
            print(f"step {step + 1}/{total}: {text}", flush=True)

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()
        return False


if __name__ == "__main__":
    sys.exit(main())
