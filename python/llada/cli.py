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
import io
import itertools
import math
import os
import sys
from typing import Optional

import torch

from .policies import CACHES, COMMIT_RULES, POLICY_NAMES, RANKINGS, RULE_OF_SETTING, DecodePolicy
from .devices import out_of_memory
from .prompts_file import Line, output_line, progress_bar, prompt_of, read_prompts, read_scoring_lines

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASK_GLYPH = {True: "░", False: "_"}  # terminal, plain text
# --prompts-file: batches decoded (and grouped by prompt length) between outputs.
PROMPTS_FILE_WINDOW = 8
# What each subcommand can do about running out of memory, in its own flags.
OUT_OF_MEMORY_HINTS = {
    "generate": "a smaller --gen-length (or, with --prompts-file, --batch-size) needs less",
    "chat": "a smaller --gen-length needs less",
    "infill": "a smaller --length needs less",
    "likelihood": "a smaller --batch-size needs less",
}


DTYPE_HELP = "default: bfloat16 on cuda (float16 on GPUs before compute capability 8.0), float32 on cpu"


def seed_argument(text: str) -> int:
    """--seed: an int the decoding takes (see llada.sampler.check_seed)."""
    from .sampler import check_seed

    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    try:
        check_seed(seed)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("seed: ")) from None
    return seed


def is_utf8(text: str) -> bool:
    """Bytes that are not UTF-8 reach Python as lone surrogates, which no
    tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_argument(text: str) -> str:
    if not is_utf8(text):
        raise argparse.ArgumentTypeError("not valid UTF-8 text")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada", description="Masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a prompt")
    gen.add_argument("prompt", nargs="?", type=text_argument, help="the prompt text (or --prompts-file)")
    gen.add_argument("--prompts-file", metavar="FILE",
                     help="many prompts, decoded in batches: JSON Lines (- reads standard input), "
                          'each line a string, an object with a "prompt" string, or (with --chat) '
                          'an object with "messages", a conversation of {"role", "content"} objects; '
                          'prints one JSON object per prompt, in the file\'s order: the line\'s '
                          'object (its other keys, such as an id, kept as written) with the "answer" added')
    gen.add_argument("--batch-size", type=int,
                     help="with --prompts-file: prompts decoded together, left-padded; of every "
                          "8 batches' prompts, the longest share the first batch (default: 8)")
    add_decoding_arguments(gen, chat_flag=True)
    gen.add_argument("--show-steps", action="store_true",
                     help="show the canvas filling in (a mask shows as ░ at a terminal, as _ in a file or pipe)")
    gen.add_argument("--stream", action="store_true", help="print the answer block by block as it is final")
    add_policy_arguments(gen)
    gen.set_defaults(run=run_generate, parser=gen)

    talk = sub.add_parser("chat", help="talk with a chat model, turn by turn (reads standard input)")
    add_decoding_arguments(talk, chat_flag=False)
    add_policy_arguments(talk)
    talk.set_defaults(run=run_chat, parser=talk)

    fill = sub.add_parser("infill", help="fill a gap between a prefix and a suffix")
    fill.add_argument("--model", help="checkpoint folder (Hugging Face LLaDA format); default: the bundled model")
    fill.add_argument("--prefix", default="", type=text_argument, help="text before the gap")
    fill.add_argument("--suffix", default="", type=text_argument, help="text after the gap")
    fill.add_argument("--length", type=int, required=True, help="tokens to fill")
    fill.add_argument("--steps", type=int, help="steps under the fixed schedule, an equal share per block; a "
                                                "block with fewer tokens to fill than its share takes one "
                                                "forward per token (default: one token per step); an "
                                                "adaptive --commit "
                                                "decides its own")
    fill.add_argument("--block-length", type=int, default=None,
                      help="tokens decoded as one semi-autoregressive block (default: the whole gap; "
                           "a longer block is the whole gap)")
    fill.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    fill.add_argument("--seed", type=seed_argument, help="for sampling and random ranking")
    fill.add_argument("--device", help="default: cuda when available, else cpu")
    fill.add_argument("--dtype", choices=sorted(DTYPES), help=DTYPE_HELP)
    add_policy_arguments(fill)
    fill.set_defaults(run=run_infill, parser=fill)

    score = sub.add_parser("likelihood", help="estimate log p(answer | prompt)")
    score.add_argument("--model", help="checkpoint folder (Hugging Face LLaDA format); default: the bundled model")
    score.add_argument("--prompt", type=text_argument, help="the prompt text (or --prompts-file)")
    score.add_argument("--answer", action="append", type=text_argument,
                       help="the answer text to score (repeatable: one estimate per line, in order, "
                            "every answer with the same Monte Carlo draws)")
    score.add_argument("--prompts-file", metavar="FILE",
                       help='many prompts: JSON Lines (- reads standard input), each line an object with a '
                            '"prompt" string (or, with --chat, "messages", a conversation) and "answers", a '
                            'list of answer texts; prints each line\'s object, in order, with '
                            '"log_likelihoods" added (one per answer, all with the same draws; null for an '
                            'estimate of -inf, an answer the model rules out)')
    score.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    score.add_argument("--system", metavar="TEXT", type=text_argument,
                       help="with --chat: a system message before the prompt")
    score.add_argument("--mc-num", type=int, default=128, help="Monte Carlo draws (default: 128)")
    score.add_argument("--batch-size", type=int, default=16, help="draws per forward (default: 16)")
    score.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (default: 0, off)")
    score.add_argument("--seed", type=seed_argument, help="makes the estimate repeatable")
    score.add_argument("--device", help="default: cuda when available, else cpu")
    score.add_argument("--dtype", choices=sorted(DTYPES), help=DTYPE_HELP)
    score.set_defaults(run=run_likelihood, parser=score)

    # `llada train` has its own parser (llada.train); main() hands it the rest.
    sub.add_parser("train", help="train a small LLaDA model (see llada train --help)", add_help=False)

    rnd = sub.add_parser("make-random-checkpoint", help="write a random LLaDA checkpoint folder")
    rnd.add_argument("dir", metavar="DIR", help="the folder to write (created; it must not hold a checkpoint)")
    rnd.add_argument("--size", choices=("tiny", "mid", "8b-shape"), default="tiny",
                     help="tiny (default) for tests, mid for benchmarks, 8b-shape: LLaDA-8B's shapes")
    rnd.add_argument("--seed", type=seed_argument, default=0, help="seed of the random weights (default: 0)")
    rnd.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32, bfloat16 for 8b-shape")
    rnd.add_argument("--shards", type=int, default=None, help="default: 1, 8 for 8b-shape")
    rnd.set_defaults(run=run_make_random, parser=rnd)
    return parser


def add_decoding_arguments(parser, chat_flag: bool) -> None:
    """The model, the prompt's template and the decoding, shared by generate and chat."""
    parser.add_argument("--model", help="checkpoint folder (Hugging Face LLaDA format); default: the bundled model")
    if chat_flag:
        parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--system", metavar="TEXT", type=text_argument,
                        help="a system message before the prompt" + (" (with --chat)" if chat_flag else ""))
    parser.add_argument("--steps", type=int,
                        help="forwards in all under the fixed schedule (default: --gen-length, one token "
                             "per step); an adaptive --commit decides its own")
    parser.add_argument("--gen-length", type=int, default=128, help="tokens to generate (default: 128)")
    parser.add_argument("--block-length", type=int, default=32,
                        help="tokens decoded as one semi-autoregressive block (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--cfg-scale", type=float, default=0.0,
                        help="classifier-free guidance scale (default: 0, off)")
    parser.add_argument("--remasking", choices=("low_confidence", "random"),
                        help="the official ranking option: low_confidence (the default) ranks by the model's "
                             "confidence, as --ranking says; random is --ranking random")
    parser.add_argument("--seed", type=seed_argument, help="for sampling and random ranking")
    parser.add_argument("--stop", action="append", metavar="TEXT", type=text_argument,
                        help="end the answer before this text (repeatable; in bash, $'\\n\\n' is two "
                             "line breaks); no block after the one that completes it is decoded"
                             + (", but with --show-steps, which shows every block" if chat_flag else ""))
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=DTYPE_HELP)


def decoding_options(args, policy) -> dict:
    # Adaptive rules decide their own steps: the library takes and ignores any count.
    steps = args.gen_length if args.steps is None else args.steps
    options = dict(steps=steps, gen_length=args.gen_length, block_length=args.block_length,
                   temperature=args.temperature, cfg_scale=args.cfg_scale, seed=args.seed, policy=policy)
    if args.remasking is not None:  # otherwise the library's default
        options["remasking"] = args.remasking
    return options


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
    if "ranking" in changes and commit == "entropy_bound":
        fail("--ranking: the entropy_bound rule orders positions by entropy itself and takes no ranking")
    if "refresh_every" in changes and cache == "none":
        fail("--refresh-every: applies with a cache (--cache prefix or dual); this policy has no cache")
    if "cuda_graph" in changes and cache == "none":
        fail(f"--{'' if args.cuda_graph else 'no-'}cuda-graph: applies with a cache (--cache prefix or dual); "
             "this policy has no cache")
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

    from .checkpoint import resolve_device_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # checked on its own first, so that only its errors are named as the flag
        resolve_device_dtype(device, torch.float32)
    except ValueError as e:  # "device: ...": named as the user wrote it
        raise ValueError(f"--device: {str(e).partition(': ')[2]}") from None
    return load(args.model, device=device, dtype=DTYPES[args.dtype] if args.dtype else None)


def print_stats(stats) -> None:
    print(f"forwards {stats.nfe}, tokens per forward {stats.tokens_per_forward:.2f}, "
          f"positions per forward {stats.positions_per_forward:.1f}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if sys.stderr is None:
        # Started with standard error closed (`2>&-`): print(file=None) would
        # put messages among the answers on standard output.
        sys.stderr = open(os.devnull, "w")
    if argv[:1] == ["train"]:  # it writes to standard error and files only
        return run_train(argv[1:])
    if sys.stdout is None:  # started with standard output closed (`>&-`): the answer would go nowhere
        print("llada: error: standard output is closed", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args, args.parser)
    except BrokenPipeError:
        # The reader left (e.g. `| head`): no traceback, and nothing more to
        # write, not even when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as for a process ended by SIGPIPE
    except (ValueError, TypeError, OSError, MemoryError, OverflowError, FloatingPointError) as e:
        # (OSError: a path under a file, no permission, a full disk; its text names the path.)
        print(f"llada: error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        hint = OUT_OF_MEMORY_HINTS.get(args.command)
        print(f"llada: error: out of memory ({str(e).splitlines()[0]})" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nllada: interrupted", file=sys.stderr)
        return 130


def run_train(argv: list[str]) -> int:
    from .train import main as train_main

    return train_main(argv)


def check_model(args, parser) -> None:
    if args.device is not None and not args.device.strip():
        parser.error("--device: expected cpu or cuda[:N], got an empty string")
    if args.model is not None and not os.path.isdir(args.model):
        parser.error(f"--model: {args.model} " + ("is not a folder" if os.path.exists(args.model)
                                                  else "does not exist"))


def check_counts(args, parser, *flags: str, most: Optional[int] = None) -> None:
    """Flags that count something: positive when given, and at most ``most``."""
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            parser.error(f"{flag}: expected a positive int, got {value}")
        if value is not None and most is not None and value > most:
            parser.error(f"{flag}: expected at most {most}, got {value}")


def check_scales(args, parser, *flags: str) -> None:
    """Flags such as --temperature: finite and not negative (argparse takes "nan" and "inf")."""
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"{flag}: expected a finite number >= 0, got {value}")


def check_steps(args, parser, policy, blocks: int, most: int, most_name: str) -> None:
    """--steps counts the fixed schedule's forwards, each block an equal share,
    up to ``most`` (named ``most_name``), the most the library takes: more
    steps than its blocks have positions would commit nothing."""
    if args.steps is None:
        return
    if policy.commit != "schedule":
        parser.error(f"--steps: the fixed schedule's step count; --commit {policy.commit} decides its own")
    if args.steps < 1 or args.steps % blocks or args.steps > most:
        parser.error(f"--steps: expected a multiple of the number of blocks ({blocks}), at most {most_name} "
                     f"({most}), got {args.steps}")


def check_decoding(args, parser, policy) -> None:
    """generate's and chat's flags, before the model loads (the prompts'
    lengths, which need its context size, are checked after)."""
    from .sampler import resolve_policy

    check_model(args, parser)
    check_counts(args, parser, "--gen-length", "--block-length")
    if args.gen_length % args.block_length:
        parser.error(f"--gen-length: expected a multiple of --block-length ({args.block_length}), "
                     f"got {args.gen_length}")
    check_steps(args, parser, policy, args.gen_length // args.block_length, args.gen_length, "--gen-length")
    check_scales(args, parser, "--temperature", "--cfg-scale")
    if not all(args.stop or ()):
        parser.error("--stop: expected a non-empty text")
    # Without --remasking the library's default applies, which keeps the policy's ranking.
    if args.remasking is not None:
        if policy.commit == "entropy_bound":
            parser.error(f"--remasking: the entropy_bound rule orders positions by entropy itself and "
                         f"takes no ranking, got --remasking {args.remasking}")
        # One of the two would be overruled: a flag the policy would not use is an error.
        if args.ranking is not None and (args.remasking == "random") != (args.ranking == "random"):
            parser.error(f"--remasking {args.remasking}, --ranking {args.ranking}: the two disagree "
                         f"(--remasking random is --ranking random; low_confidence, any other ranking); "
                         f"give one of them")
        try:
            resolve_policy(policy, args.remasking)
        except ValueError as e:  # "remasking: ..."
            parser.error(f"--{e}")


def encode_line(engine, args, where: str, line: dict) -> list[int]:
    """A line's prompt ids; an error names the line and, as the user wrote
    them, the flag or the line's key."""
    try:
        return engine.encode(prompt_of(line), args.chat, args.system)
    except (ValueError, TypeError) as e:
        field, _, reason = str(e).partition(": ")
        if field in ("chat", "system"):
            field = f"--{field}"
        elif "messages" in line:
            field = field.replace("prompt", "messages", 1)
        raise ValueError(f"{where}: {field}: {reason}") from None


def run_make_random(args, parser) -> int:
    from .checkpoint import write_random_checkpoint

    big = args.size == "8b-shape"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if big else torch.float32)
    shards = args.shards if args.shards is not None else (8 if big else 1)
    try:
        path = write_random_checkpoint(args.dir, seed=args.seed, size=args.size, dtype=dtype, num_shards=shards)
    except (ValueError, FileExistsError) as e:
        field, _, reason = str(e).partition(": ")
        flag = {"path": "DIR", "seed": "--seed", "num_shards": "--shards"}.get(field)
        if flag is None:
            raise
        parser.error(f"{flag}: {reason}")
    except OSError as e:  # e.g. a path under a file, no permission, a full disk
        parser.error(f"DIR: cannot write {args.dir} ({e.strerror or e})")
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
    if args.prompts_file is None:
        if args.batch_size is not None:
            parser.error("--batch-size: applies with --prompts-file")
        lines = [Line("prompt", {"prompt": args.prompt}, "")]
    else:
        if args.prompt is not None:
            parser.error("prompt: give either the prompt text or --prompts-file, not both")
        if args.show_steps or args.stream:
            parser.error("--show-steps and --stream follow one prompt, not --prompts-file")
        if args.batch_size is None:
            args.batch_size = 8
        check_counts(args, parser, "--batch-size")
        lines = read_prompts(args.prompts_file, args.chat)
    policy = policy_from_arguments(args, parser)
    check_decoding(args, parser, policy)
    engine = load_for_cli(args)
    # Every prompt is checked before any is decoded.
    for where, line, _ in lines:
        problem = engine.prompt_problem(encode_line(engine, args, where, line), args.gen_length, "--gen-length")
        if problem is not None:
            room = engine.model.config.max_sequence_length - args.gen_length
            raise ValueError(system_problem(engine, args, room, f"--gen-length ({args.gen_length} tokens)")
                             or f"{where}: {problem}")
    options = decoding_options(args, policy)
    stats, stop = DecodeStats(), tuple(args.stop or ())
    if args.prompts_file is not None:
        # A window of batches at a time, so that answers appear as the decoding
        # goes; within a window, batches are formed by prompt length.
        window = PROMPTS_FILE_WINDOW * args.batch_size
        with progress_bar(len(lines)) as bar:
            for first in range(0, len(lines), window):
                batch = lines[first: first + window]
                # Each prompt's noise is keyed by its line's place in the file:
                # copies of a prompt are different samples, and a prompt's
                # sample does not depend on --batch-size.
                answers = engine.generate([prompt_of(line.value) for line in batch], chat=args.chat,
                                          system=args.system, batch_size=args.batch_size, stop=stop, stats=stats,
                                          row_keys=range(first, first + len(batch)), **options)
                for line, answer in zip(batch, answers):
                    print(output_line(line, "answer", answer), flush=True)
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
        total = options["steps"] if policy.commit == "schedule" else None
        with _StepDisplay(total, engine, len(ids)) as show:
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
    error. A turn that fails (a message too long or not UTF-8) is reported
    and skipped; without a terminal, the exit status then says so."""
    from .sampler import DecodeStats

    if sys.stdin is None:  # started with standard input closed (`<&-`)
        parser.error("standard input is closed: llada chat reads the messages from it, one per line")
    policy = policy_from_arguments(args, parser)
    check_decoding(args, parser, policy)
    engine = load_for_cli(args)
    if not getattr(engine.tokenizer, "chat_template", None):
        parser.error(f"--model: {args.model or 'the bundled model'}'s tokenizer has no chat template (a base "
                     "model?): llada chat needs one; llada generate takes the text as it stands")
    options = decoding_options(args, policy)
    stats, stop = DecodeStats(), tuple(args.stop or ())
    max_len = engine.model.config.max_sequence_length
    room = max_len - args.gen_length
    if (least := len(engine.encode("", True, args.system))) > room:
        parser.error(system_problem(engine, args, room, f"--gen-length ({args.gen_length} tokens)")
                     or f"--gen-length: {args.gen_length} tokens and the chat template's {least} exceed the "
                        f"model's max_sequence_length {max_len}")
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 fails alone
    interactive = sys.stdin.isatty()
    if interactive:
        print('llada chat: one message per line; "/reset" starts over, Ctrl-C stops an answer, Ctrl-D ends.',
              file=sys.stderr)
    conversation: list[dict] = []
    failed = False
    for number in itertools.count(1):
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte order mark (a file saved so) is no part of the message
        if not text.strip():
            continue
        if not is_utf8(text):
            print(f"llada: error: standard input line {number}: not valid UTF-8 text", file=sys.stderr)
            failed = True
            continue
        if text.strip() == "/reset":
            conversation = []
            print("llada: a new conversation", file=sys.stderr)
            continue
        message = {"role": "user", "content": text}
        # The message alone must fit before older turns are dropped for it: a
        # message that fails leaves the conversation as it was.
        try:
            alone = engine.encode([message], True, args.system)
            problem = engine.prompt_problem(alone, None)
            if problem is None and len(alone) > room:
                problem = (f"the message alone is too long for the model's context ({max_len} tokens with "
                           f"--gen-length {args.gen_length})")
        except ValueError as e:  # the chat template refused it
            problem = str(e)
        if problem is not None:
            print(f"llada: error: standard input line {number}: {problem}", file=sys.stderr)
            failed = True
            continue
        conversation.append(message)
        while len(engine.encode(conversation, True, args.system)) > room and len(conversation) > 1:
            conversation = conversation[2:]  # the oldest question and its answer
            print("llada: the conversation outgrew the model's context: dropped its oldest turn",
                  file=sys.stderr)
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
    return 2 if failed and not interactive else 0


def check_system(args, parser) -> None:
    if args.system is not None and not args.chat:
        parser.error("--system: a system message needs --chat")


def system_problem(engine, args, room: int, room_name: str) -> Optional[str]:
    """The error for a --system message that, with the chat template, leaves
    less than ``room`` tokens of the model's context (for what ``room_name``
    names) to any prompt; None where it does not, or where the template
    alone leaves too little."""
    if args.system is None:
        return None
    template = len(engine.encode("", True))
    least = len(engine.encode("", True, args.system))
    if least <= room or template > room:
        return None
    return (f"--system: the system message's {least - template} tokens and the chat template's {template} "
            f"leave too little room for {room_name} in the model's max_sequence_length "
            f"{engine.model.config.max_sequence_length}")


def run_likelihood(args, parser) -> int:
    from .likelihood import MAX_DRAWS

    check_system(args, parser)
    if args.prompts_file is None:
        if args.prompt is None or not args.answer:
            parser.error("--prompt and --answer: give both (or --prompts-file)")
        items = [Line("--answer", {"prompt": args.prompt, "answers": args.answer}, "")]
    else:
        if args.prompt is not None or args.answer:
            parser.error("--prompts-file: give either it or --prompt and --answer, not both")
        items = read_scoring_lines(args.prompts_file, args.chat)
    check_model(args, parser)
    check_counts(args, parser, "--mc-num", "--batch-size", most=MAX_DRAWS)
    if args.mc_num % args.batch_size:
        parser.error(f"--mc-num: expected a multiple of --batch-size ({args.batch_size}), got {args.mc_num}")
    check_scales(args, parser, "--cfg-scale")
    engine = load_for_cli(args)
    # Every line is checked before any is scored.
    max_len, mask_id = engine.model.config.max_sequence_length, engine.model.config.mask_token_id
    holds_mask = f"the text holds the mask token ({mask_id}), which the estimate puts there itself"
    for where, item, _ in items:
        # A single prompt's errors name --prompt; a file's, the line.
        prompt_where = "--prompt" if args.prompts_file is None else where
        ids = encode_line(engine, args, prompt_where, item)
        if mask_id in ids:
            raise ValueError(f"{prompt_where}: {holds_mask}")
        length = len(ids)
        if length >= max_len:
            raise ValueError(system_problem(engine, args, max_len - 1, "an answer")
                             or f"{prompt_where}: its {length} tokens leave no room for an answer in the model's "
                                f"max_sequence_length {max_len}")
        for i, answer in enumerate(item["answers"], 1):
            answer_ids = engine.token_ids(answer)
            size = len(answer_ids)
            if not size:
                raise ValueError(f"{where}: answer {i} is empty (no tokens to score)")
            if mask_id in answer_ids:
                raise ValueError(f"{where}: answer {i}: {holds_mask}")
            if length + size > max_len:
                raise ValueError(f"{where}: answer {i}: the prompt's {length} tokens and its {size} exceed the "
                                 f"model's max_sequence_length {max_len}")
    # One seed for every answer: the same draws make their estimates'
    # differences less noisy than their values.
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**62, (1,)))
    with progress_bar(len(items), wanted=args.prompts_file is not None) as bar:
        for line in items:
            item = line.value
            estimates = [engine.log_likelihood(prompt_of(item), answer, chat=args.chat, system=args.system,
                                               mc_num=args.mc_num, batch_size=args.batch_size,
                                               cfg_scale=args.cfg_scale, seed=seed)
                         for answer in item["answers"]]
            if args.prompts_file is None:
                print("\n".join(f"{estimate:.6f}" for estimate in estimates), flush=True)
            else:
                # JSON has no -inf: null is an answer the model rules out.
                print(output_line(line, "log_likelihoods", [None if e == -math.inf else e for e in estimates]),
                      flush=True)
            bar.update()
    return 0


def run_infill(args, parser) -> int:
    from .sampler import DecodeStats

    policy = policy_from_arguments(args, parser)
    check_model(args, parser)
    check_counts(args, parser, "--length", "--steps", "--block-length")
    # The gap is one span of --length masks: a longer block is that span
    # (as llada.infill takes it), so a huge --block-length costs nothing.
    block_length = None if args.block_length is None else min(args.block_length, args.length)
    # llada.infill's bound: every position of every block (the last one may
    # hold fewer tokens to fill, and then runs fewer forwards).
    size = block_length or args.length
    blocks = -(-args.length // size)
    check_steps(args, parser, policy, blocks, blocks * size,
                "--length" if size == args.length else f"{blocks} block{'s' * (blocks > 1)} of --block-length")
    check_scales(args, parser, "--temperature")
    engine = load_for_cli(args)
    stats = DecodeStats()
    try:
        gap = engine.infill(args.prefix, args.suffix, args.length, steps=args.steps,
                            block_length=block_length, temperature=args.temperature, seed=args.seed,
                            policy=policy, stats=stats)
    except ValueError as e:  # "length: ...": named as the user wrote it
        field, _, reason = str(e).partition(": ")
        if field not in ("prefix", "suffix", "length", "prefix/suffix", "steps", "block_length"):
            raise
        raise ValueError(f"--{field.replace('/', '/--').replace('_', '-')}: {reason}") from None
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
    """The canvas as it fills (--show-steps): redrawn in place on a terminal
    (rich Live), one line per step when stdout is not one. ``total`` is the
    fixed schedule's step count; an adaptive rule has none to show."""

    def __init__(self, total, engine, prompt_len):
        self.total = total
        self.tokenizer, self.prompt_len, self.stops = engine.tokenizer, prompt_len, engine.stop_ids
        self.mask_id = engine.model.config.mask_token_id
        self.tty = sys.stdout.isatty()
        self.live = None

    def __enter__(self):
        if self.tty:
            from rich.live import Live

            self.live = Live("", refresh_per_second=20, transient=False)
            self.live.__enter__()
        return self

    def update(self, step, total, canvas):
        text = render_canvas(
            self.tokenizer, canvas[0, self.prompt_len:].tolist(), self.mask_id,
            MASK_GLYPH[self.tty], self.stops,
        )
        label = f"step {step + 1}" + (f"/{self.total}" if self.total is not None else "")
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text(f"{label}\n{text}"))
        else:
            # One line per step: escape line breaks and other control characters.
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
            print(f"{label}: {text}", flush=True)

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
        return False


if __name__ == "__main__":
    sys.exit(main())
