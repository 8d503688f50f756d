"""The ``llada`` command.

    llada generate --model PATH [--chat] [--steps N ...] [--policy fast] "prompt"
    llada generate --model PATH --prompts-file prompts.jsonl [--batch-size N ...]
    llada chat --model PATH [--system "..."] [--policy fast ...]
    llada infill --model PATH --prefix "..." --suffix "..." --length N
    llada likelihood --model PATH --prompt "..." --answer "..." [--mc-num N]
    llada train (--corpus stdlib | --task NAME) --out DIR ...
    llada make-random-checkpoint DIR [--size tiny|mid|8b-shape]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from .policies import CACHES, COMMIT_RULES, POLICY_NAMES, RANKINGS, RULE_OF_SETTING, DecodePolicy
from .prompts_file import progress_bar, prompt_of, read_prompts, read_scoring_lines

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASK_GLYPH = {True: "░", False: "_"}  # terminal, plain text
# --prompts-file: batches decoded (and grouped by prompt length) between outputs.
PROMPTS_FILE_WINDOW = 8


DTYPE_HELP = "default: bfloat16 on cuda (float16 on GPUs before compute capability 8.0), float32 on cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada", description="Masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a prompt")
    gen.add_argument("prompt", nargs="?", help="the prompt text (or --prompts-file)")
    gen.add_argument("--prompts-file", metavar="FILE",
                     help="many prompts, decoded in batches: JSON Lines (- reads standard input), "
                          'each line a string, an object with a "prompt" string, or (with --chat) '
                          'an object with "messages", a conversation of {"role", "content"} objects; '
                          'prints one JSON object per prompt, in the file\'s order: the line\'s '
                          'object (its other keys, such as an id, kept) with the "answer" added')
    gen.add_argument("--batch-size", type=int, default=8,
                     help="with --prompts-file: prompts decoded together, left-padded; of every "
                          "8 batches' prompts, the longest share the first batch (default: 8)")
    add_decoding_arguments(gen, chat_flag=True)
    gen.add_argument("--show-steps", action="store_true", help="show the canvas filling in")
    gen.add_argument("--stream", action="store_true", help="print the answer block by block as it is final")
    add_policy_arguments(gen)
    gen.set_defaults(run=run_generate)

    talk = sub.add_parser("chat", help="talk with a chat model, turn by turn (reads standard input)")
    add_decoding_arguments(talk, chat_flag=False)
    add_policy_arguments(talk)
    talk.set_defaults(run=run_chat)

    fill = sub.add_parser("infill", help="fill a gap between a prefix and a suffix")
    fill.add_argument("--model", help="checkpoint folder (Hugging Face LLaDA format); default: the bundled model")
    fill.add_argument("--prefix", default="", help="text before the gap")
    fill.add_argument("--suffix", default="", help="text after the gap")
    fill.add_argument("--length", type=int, required=True, help="tokens to fill")
    fill.add_argument("--steps", type=int, default=None, help="default: one token per step")
    fill.add_argument("--block-length", type=int, default=None, help="default: the whole gap")
    fill.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    fill.add_argument("--seed", type=int, default=None, help="for sampling and random ranking")
    fill.add_argument("--device", help="default: cuda when available, else cpu")
    fill.add_argument("--dtype", choices=sorted(DTYPES), help=DTYPE_HELP)
    add_policy_arguments(fill)
    fill.set_defaults(run=run_infill)

    score = sub.add_parser("likelihood", help="estimate log p(answer | prompt)")
    score.add_argument("--model", help="checkpoint folder (Hugging Face LLaDA format); default: the bundled model")
    score.add_argument("--prompt", help="the prompt text (or --prompts-file)")
    score.add_argument("--answer", action="append",
                       help="the answer text to score (repeatable: one estimate per line, in order, "
                            "every answer with the same Monte Carlo draws)")
    score.add_argument("--prompts-file", metavar="FILE",
                       help='many prompts: JSON Lines (- reads standard input), each line an object with a '
                            '"prompt" string (or, with --chat, "messages", a conversation) and "answers", a '
                            'list of answer texts; prints each line\'s object, in order, with '
                            '"log_likelihoods" added (one per answer, all with the same draws)')
    score.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    score.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the prompt")
    score.add_argument("--mc-num", type=int, default=128, help="Monte Carlo draws (default: 128)")
    score.add_argument("--batch-size", type=int, default=16, help="draws per forward (default: 16)")
    score.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (default: 0, off)")
    score.add_argument("--seed", type=int, default=None, help="makes the estimate repeatable")
    score.add_argument("--device", help="default: cuda when available, else cpu")
    score.add_argument("--dtype", choices=sorted(DTYPES), help=DTYPE_HELP)
    score.set_defaults(run=run_likelihood)

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


def add_decoding_arguments(parser, chat_flag: bool) -> None:
    """The model, the prompt's template and the decoding, shared by generate and chat."""
    parser.add_argument("--model", help="checkpoint folder (Hugging Face LLaDA format); default: the bundled model")
    if chat_flag:
        parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--system", metavar="TEXT",
                        help="a system message before the prompt" + (" (with --chat)" if chat_flag else ""))
    parser.add_argument("--steps", type=int, default=128,
                        help="forwards in all under the fixed schedule (default: 128)")
    parser.add_argument("--gen-length", type=int, default=128, help="tokens to generate (default: 128)")
    parser.add_argument("--block-length", type=int, default=32,
                        help="tokens decoded as one semi-autoregressive block (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--cfg-scale", type=float, default=0.0,
                        help="classifier-free guidance scale (default: 0, off)")
    parser.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence",
                        help="the official ranking option (--ranking offers more)")
    parser.add_argument("--seed", type=int, default=None, help="for sampling and random ranking")
    parser.add_argument("--stop", action="append", metavar="TEXT",
                        help="end the answer before this text (repeatable; in bash, $'\\n\\n' is two "
                             "line breaks); no block after the one that completes it is decoded")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=DTYPE_HELP)


def decoding_options(args, policy) -> dict:
    return dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
                seed=args.seed, policy=policy)


def add_policy_arguments(parser) -> None:
    group = parser.add_argument_group("decoding policy (see llada.DecodePolicy)")
    group.add_argument("--policy", choices=POLICY_NAMES, default="exact",
                       help="exact: the official algorithm; fast: dual cache + threshold 0.9")
    group.add_argument("--commit", choices=COMMIT_RULES,
                       help="how many positions per step (default: schedule, the official one)")
    group.add_argument("--threshold", type=float, help="for --commit threshold (default: 0.9)")
    group.add_argument("--factor", type=float, help="for --commit factor (default: 1.0)")
    group.add_argument("--gamma", type=float, help="for --commit entropy_bound (default: 0.1)")
    group.add_argument("--ranking", choices=RANKINGS,
                       help="which positions count as confident (default: probability)")
    group.add_argument("--cache", choices=CACHES, help="what later steps of a block recompute (default: none)")
    group.add_argument("--refresh-every", type=int, metavar="N",
                       help="with a cache: also refresh it every N steps (default: 0, once per block)")
    group.add_argument("--remask-below", type=float, metavar="P",
                       help="re-mask earlier tokens of the block whose probability fell below P "
                            "(adaptive --commit rules only; default: off)")
    group.add_argument("--early-stop", action="store_true", help="stop a row once a block holds EOS")
    group.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="on CUDA, replay cached steps as captured CUDA graphs (default: on)")
    group.add_argument("--stats", action="store_true", help="print forwards and tokens per forward to stderr")


POLICY_FIELDS = ("commit", "threshold", "factor", "gamma", "ranking", "cache", "refresh_every",
                 "remask_below", "cuda_graph")


def policy_from_arguments(args, parser=None):
    """The DecodePolicy the flags ask for; a bad value is reported as its flag."""

    def fail(message):
        if parser is None:
            raise ValueError(message)
        parser.error(message)

    base = DecodePolicy.named(args.policy)
    changes = {name: getattr(args, name) for name in POLICY_FIELDS if getattr(args, name) is not None}
    if args.early_stop:
        changes["early_stop"] = True
    # A flag the policy would not use is an error, even when it gives the default.
    commit, cache = changes.get("commit", base.commit), changes.get("cache", base.cache)
    for name, rule in RULE_OF_SETTING.items():
        if name in changes and commit != rule:
            fail(f"--{name}: applies with --commit {rule}; this policy commits by {commit!r}")
    if "refresh_every" in changes and cache == "none":
        fail("--refresh-every: applies with a cache (--cache prefix or dual); this policy has no cache")
    try:
        return DecodePolicy(**{**base.__dict__, **changes})
    except ValueError as e:
        field, _, reason = str(e).partition(": ")
        if parser is None or field not in POLICY_FIELDS:
            raise
        fail(f"--{field.replace('_', '-')}: {reason}")


def load_for_cli(args):
    """An Engine for --model (or the bundled model), on --device/--dtype."""
    from .engine import load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(args.model, device=device, dtype=DTYPES[args.dtype] if args.dtype else None)


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
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, MemoryError, FloatingPointError) as e:
        print(f"llada: error: {e or type(e).__name__}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (e.g. `| head`): no traceback, and nothing more to
        # write, not even when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as for a process ended by SIGPIPE
    except KeyboardInterrupt:
        print("\nllada: interrupted", file=sys.stderr)
        return 130


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
    from .engine import cut_at_stop
    from .sampler import DecodeStats, generate

    if args.prompts_file is None and args.prompt is None:
        parser.error("prompt: give the prompt text, or --prompts-file")
    check_system(args, parser)
    if args.show_steps and args.stream:
        parser.error("--show-steps, --stream: pick one (the canvas as it fills, or the text by finished block)")
    if args.prompts_file is not None:
        if args.prompt is not None:
            parser.error("prompt: give either the prompt text or --prompts-file, not both")
        if args.show_steps or args.stream:
            parser.error("--show-steps and --stream follow one prompt, not --prompts-file")
        if args.batch_size < 1:
            parser.error(f"--batch-size: expected a positive number of prompts, got {args.batch_size}")
        lines = read_prompts(args.prompts_file)
        if not args.chat and any("messages" in line for line in lines):
            parser.error('--prompts-file: a line with "messages" (a conversation) needs --chat')
    policy = policy_from_arguments(args, parser)
    engine = load_for_cli(args)
    options = decoding_options(args, policy)
    stats, stop = DecodeStats(), tuple(args.stop or ())
    if args.prompts_file is not None:
        # A window of batches at a time, so that answers appear as the decoding
        # goes; within a window, batches are formed by prompt length.
        window = PROMPTS_FILE_WINDOW * args.batch_size
        with progress_bar(len(lines)) as bar:
            for first in range(0, len(lines), window):
                batch = lines[first: first + window]
                prompts = [prompt_of(line) for line in batch]
                answers = engine.generate(prompts, chat=args.chat, system=args.system,
                                          batch_size=args.batch_size, stop=stop, stats=stats, **options)
                for line, answer in zip(batch, answers):
                    print(json.dumps({**line, "answer": answer}, ensure_ascii=False), flush=True)
                bar.update(len(batch))
    elif args.stream:
        for piece in engine.stream(args.prompt, chat=args.chat, system=args.system, stop=stop, stats=stats,
                                   **options):
            print(piece, end="", flush=True)
        print()
    elif not args.show_steps:
        print(engine.generate(args.prompt, chat=args.chat, system=args.system, stop=stop, stats=stats, **options))
    else:
        # The whole canvas fills in on the screen, past the answer's end too.
        ids = engine.encode(args.prompt, args.chat, args.system)
        prompt = torch.tensor([ids], dtype=torch.long)
        with _StepDisplay(args.show_steps, args.steps, engine, len(ids)) as show:
            out, stats = generate(engine.model, prompt, on_step=show.update, return_stats=True, **options)
        print(cut_at_stop(engine.decode(out[0, len(ids):].tolist()), stop)[0])
    if args.stats:
        print_stats(stats)
    return 0


def run_chat(args, parser) -> int:
    """One user turn per line of standard input, each answered (printed as its
    blocks are final) with the whole conversation so far in the prompt.
    "/reset" starts a new conversation; end of input ends the chat, and at a
    terminal Ctrl-C stops the answer under way. Turns that no longer fit the
    model's context are dropped from the oldest on, with a note on standard
    error."""
    from .sampler import DecodeStats

    policy = policy_from_arguments(args, parser)
    engine = load_for_cli(args)
    options = decoding_options(args, policy)
    stats, stop = DecodeStats(), tuple(args.stop or ())
    room = engine.model.config.max_sequence_length - args.gen_length
    interactive = sys.stdin.isatty()
    if interactive:
        print('llada chat: one message per line; "/reset" starts over, Ctrl-C stops an answer, Ctrl-D ends.',
              file=sys.stderr)
    conversation: list[dict] = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/reset":
            conversation = []
            print("llada: a new conversation", file=sys.stderr)
            continue
        conversation.append({"role": "user", "content": text})
        while (length := len(engine.encode(conversation, True, args.system))) > room and len(conversation) > 1:
            conversation = conversation[2:]  # the oldest question and its answer
            print("llada: the conversation outgrew the model's context: dropped its oldest turn",
                  file=sys.stderr)
        if length > room:
            print(f"llada: error: the message alone is too long for the model's context "
                  f"({engine.model.config.max_sequence_length} tokens with --gen-length {args.gen_length})",
                  file=sys.stderr)
            conversation = []
            continue
        answer = []
        try:
            for piece in engine.stream(conversation, chat=True, system=args.system, stop=stop, stats=stats,
                                       **options):
                print(piece, end="", flush=True)
                answer.append(piece)
        except KeyboardInterrupt:
            if not interactive:
                raise
            # At a terminal Ctrl-C stops this answer, not the chat (and its loaded model).
            print(flush=True)
            print("llada: answer interrupted; the message is left out of the conversation", file=sys.stderr)
            conversation.pop()
            continue
        print(flush=True)
        conversation.append({"role": "assistant", "content": "".join(answer)})
    if args.stats:
        print_stats(stats)
    return 0


def check_system(args, parser) -> None:
    if args.system is not None and not args.chat:
        parser.error("--system: a system message needs --chat")


def run_likelihood(args, parser) -> int:
    check_system(args, parser)
    if args.prompts_file is None:
        if args.prompt is None or not args.answer:
            parser.error("--prompt and --answer: give both (or --prompts-file)")
        items = [{"prompt": args.prompt, "answers": args.answer}]
    else:
        if args.prompt is not None or args.answer:
            parser.error("--prompts-file: give either it or --prompt and --answer, not both")
        items = read_scoring_lines(args.prompts_file)
        if not args.chat and any("messages" in item for item in items):
            parser.error('--prompts-file: a line with "messages" (a conversation) needs --chat')
    engine = load_for_cli(args)
    # One seed for every answer: the same draws make their estimates'
    # differences less noisy than their values.
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**62, (1,)))
    with progress_bar(len(items), wanted=args.prompts_file is not None) as bar:
        for item in items:
            estimates = [engine.log_likelihood(prompt_of(item), answer, chat=args.chat, system=args.system,
                                               mc_num=args.mc_num, batch_size=args.batch_size,
                                               cfg_scale=args.cfg_scale, seed=seed)
                         for answer in item["answers"]]
            if args.prompts_file is None:
                print("\n".join(f"{estimate:.6f}" for estimate in estimates), flush=True)
            else:
                print(json.dumps({**item, "log_likelihoods": estimates}, ensure_ascii=False), flush=True)
            bar.update()
    return 0


def run_infill(args, parser) -> int:
    from .sampler import DecodeStats

    if args.length < 1:
        parser.error(f"--length: expected a positive number of tokens, got {args.length}")
    policy = policy_from_arguments(args, parser)
    engine = load_for_cli(args)
    stats = DecodeStats()
    gap = engine.infill(args.prefix, args.suffix, args.length, steps=args.steps,
                        block_length=args.block_length, temperature=args.temperature, seed=args.seed,
                        policy=policy, stats=stats)
    print(args.prefix + gap + args.suffix)
    if args.stats:
        print_stats(stats)
    return 0


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

    def __init__(self, show_steps, total, engine, prompt_len):
        self.show_steps, self.total = show_steps, total
        self.tokenizer, self.prompt_len, self.stops = engine.tokenizer, prompt_len, engine.stop_ids
        self.mask_id = engine.model.config.mask_token_id
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
