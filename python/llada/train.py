"""Train small LLaDA models from scratch: ``python -m llada.train ...``.

Two modes, both with the LLaDA objectives of :mod:`llada.objectives`:

- pretraining (``--corpus stdlib`` or ``--corpus DIR``): a byte-level BPE
  tokenizer is learned from the training files, the files become one token
  stream (``BOS file EOS BOS file EOS ...``) and each step draws random
  windows of ``--seq-len`` tokens (:func:`llada.objectives.pretraining_loss`);
- SFT (``--task sort|add|perm``): (prompt, answer) pairs of a synthetic task from
  :mod:`llada.tasks`, answers padded with EOS to a fixed length
  (:func:`llada.objectives.sft_loss`).

The options of one mode only (``MODE_OPTIONS``: --vocab-size,
--held-out-fraction and --seq-len for pretraining; --train-examples,
--eval-examples and --accuracy-examples for SFT) are refused in the other.

The loop is plain PyTorch: AdamW, linear warm-up then cosine decay, gradient
clipping, bf16 autocast on CUDA. Every ``--eval-every`` steps the loss on a
fixed set of held-out batches (same windows, same masks each time, so the
numbers are comparable) goes to ``train_log.csv``. The output folder is a
Hugging Face LLaDA checkpoint (config.json, model.safetensors, tokenizer
files) that :func:`llada.load_model` reads, plus ``training_state.pt``
(optimizer, schedule, step, RNG states) and ``train_args.json``, so
``--resume DIR`` continues the run where it stopped.

On ``--resume`` the run's recorded options are reused. Only how far it goes
and how it is run may change (``CHANGEABLE_ON_RESUME``: --steps to extend it,
the cosine then following the new total, --stop-at, --eval-every,
--save-every, --device, --progress). Everything else -- data, tokenizer,
model shape, seed, the optimizer and its schedule, the evaluation that makes
``train_log.csv`` comparable -- is fixed: giving it with another value than
the run's is an error, whether or not that value is the default. So
``train_args.json`` always holds the values the run uses.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import INDEX_FILE, config_to_dict, load_config, load_model, memory_shortfall, save_weights
from .devices import out_of_memory
from .model import LLaDAConfig, LLaDAModel, count_parameters
from .objectives import pretraining_loss, sft_loss

STATE_FILE = "training_state.pt"
ARGS_FILE = "train_args.json"
LOG_FILE = "train_log.csv"
DATA_FILE = "data.json"
WEIGHTS_FILE = "model.safetensors"
CONTENT_KEY = "content_sha256"  # in data.json; runs saved before it was added lack it
STAGING_DIR = ".saving"  # a save's files before they are renamed into place
LOG_FIELDS = ["step", "lr", "train_loss", "eval_loss", "eval_accuracy", "tokens", "elapsed_s"]
# The files a save renames into place before STATE_FILE (the tokenizer's three among them).
SAVED_FILES = ("config.json", ARGS_FILE, DATA_FILE, WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")


def default_model_path() -> str:
    """The folder of the bundled default model (a small Python code model)."""
    return str(Path(__file__).resolve().parent / "default_model")


# --------------------------------------------------------------------------
# Pretraining data: a corpus of text files
# --------------------------------------------------------------------------

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages"}


def corpus_files(corpus: str) -> tuple[Path, list[Path]]:
    """(root, sorted *.py files) of ``corpus``: 'stdlib' is the standard
    library of the running interpreter without its test directories and
    site-packages; anything else is a directory searched the same way."""
    root = Path(sysconfig.get_paths()["stdlib"] if corpus == "stdlib" else corpus).resolve()
    if not root.is_dir():
        raise ValueError(f"--corpus: {root} is not a directory")
    files = sorted(
        p for p in root.rglob("*.py")
        if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    if not files:
        raise ValueError(f"--corpus: no *.py files under {root} outside folders named "
                         f"{', '.join(sorted(EXCLUDED_DIRS))}")
    for p in files:
        # The run's data.json records the paths as UTF-8 JSON, and hashes them:
        # a name that is not UTF-8 (say Latin-1) has no such form.
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(p).decode("utf-8", errors="backslashreplace")
            raise ValueError(f"--corpus: the file name {shown} is not UTF-8; rename the file, or move it "
                             f"out of the corpus") from None
    return root, files


def describe_files(root: Path, files: list[Path]) -> dict:
    """Which files exactly: count, bytes, a sha256 of the sorted
    'relative/path<TAB>size' lines and one of the sorted
    'relative/path<TAB>sha256 of the file's bytes' lines (``content_sha256``:
    an edit that keeps a file's size changes it), plus the Python that
    supplied them."""
    def digest(lines: list[str]) -> str:
        return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()

    names = [p.relative_to(root).as_posix() for p in files]
    return {
        "root": str(root),
        "python_version": sys.version.split()[0],
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "sha256": digest([f"{name}\t{p.stat().st_size}" for name, p in zip(names, files)]),
        CONTENT_KEY: digest([f"{name}\t{file_sha256(p)}" for name, p in zip(names, files)]),
    }


def split_files(files: list[Path], held_out_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded shuffle; the first ``held_out_fraction`` (at least one file) is held out."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction: expected a value in (0, 1), got {held_out_fraction}")
    order = list(files)
    random.Random(seed).shuffle(order)
    n = max(1, round(held_out_fraction * len(order)))
    return sorted(order[n:]), sorted(order[:n])


def read_text(path: Path) -> str:
    # A few stdlib files hold stray non-UTF-8 bytes; replacing them is harmless.
    return path.read_bytes().decode("utf-8", errors="replace")


def token_stream(tok, files: list[Path], bos: int, eos: int) -> torch.Tensor:
    """``BOS file EOS`` for every file, concatenated (int32 to save memory).

    A file's text is plain text: a special token's string in it (code about
    tokenizers has them) is encoded as the characters it is made of, never as
    the special id, so the mask id is never a target and EOS only ends files."""
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        encodings = tok.encode_batch([read_text(p) for p in files], add_special_tokens=False)
    finally:
        tok.encode_special_tokens = before  # the tokenizer is shared: leave it as it was
    ids = []
    for enc in encodings:
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``length`` tokens of ``stream``, each start drawn
    uniformly from every start that fits (the last one ends the stream)."""
    if stream.numel() < length:
        raise ValueError(f"seq_len: {length} is longer than the token stream ({stream.numel()})")
    starts = torch.randint(0, stream.numel() - length + 1, (batch,), generator=generator)
    return torch.stack([stream[s : s + length] for s in starts.tolist()]).long()


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def build_config(args, vocab_size: int, ids: dict, max_len: int) -> LLaDAConfig:
    mlp = args.mlp_hidden or 64 * math.ceil(8 * args.d_model / 3 / 64)  # Llama's 8/3 ratio
    return LLaDAConfig(
        d_model=args.d_model, n_heads=args.n_heads, n_kv_heads=args.n_heads, n_layers=args.n_layers,
        mlp_hidden_size=mlp, vocab_size=vocab_size, embedding_size=vocab_size,
        max_sequence_length=max_len, rope_theta=10000.0, weight_tying=args.weight_tying,
        mask_token_id=ids["mask"], eos_token_id=ids["eos"], pad_token_id=ids["eos"],
        bos_token_id=ids["bos"], eot_token_id=ids["eot"],
    )


def check_training_memory(cfg: LLaDAConfig, device: torch.device, what: str) -> None:
    """Refuses, before any allocation, a model whose training state cannot
    fit on ``device``: the weights, their gradients and AdamW's two moments,
    all float32 (activations come on top)."""
    shortfall = memory_shortfall(cfg, device, torch.float32, copies=4)
    if shortfall is not None:
        raise MemoryError(f"{what}: {shortfall} (training keeps the weights, their gradients and "
                          f"AdamW's two moments in float32)")


def init_weights(model: LLaDAModel, seed: int) -> None:
    """N(0, 0.02) everywhere, residual outputs shrunk by 1/sqrt(2 n_layers)
    (GPT-2 style) so the residual stream does not grow with depth; norms 1."""
    gen = torch.Generator().manual_seed(seed)
    n_layers = model.config.n_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
                continue
            std = 0.02
            if name.endswith("attn_out.weight") or ("blocks" in name and name.endswith(".ff_out.weight")):
                std /= math.sqrt(2 * n_layers)
            p.copy_(torch.randn(p.shape, generator=gen) * std)


# --------------------------------------------------------------------------
# Optimization
# --------------------------------------------------------------------------


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices only; norm gains stay free (decaying them toward 0 hurts).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR: linear 0 -> 1 over ``warmup`` steps, then a
    cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def save_checkpoint(folder: Path, model: LLaDAModel, tok, state: dict, args, data_info: dict) -> None:
    """Write the HF folder + resume state.

    Every file is written into a staging folder first and then renamed into
    place, so a save interrupted while writing (a full disk, a second Ctrl-C)
    leaves the previous one intact. The renames are not one step: the state
    records a hash of the weights it belongs with, which resume checks
    (:func:`check_weights_match`), and it is renamed last."""
    from .tokenizer import write_tokenizer_files

    if (folder / INDEX_FILE).exists():
        # model.safetensors beside a sharded checkpoint's index makes a folder
        # no loader can read unambiguously.
        raise ValueError(f"{folder}: holds {INDEX_FILE} (a sharded checkpoint); saving {WEIGHTS_FILE} beside "
                         "it would leave two sets of weights; pick another folder")
    folder.mkdir(parents=True, exist_ok=True)
    earlier = (folder / STATE_FILE).is_file()  # a save of this run is there to fall back on
    staging = folder / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted save left
    staging.mkdir()
    # Copies: packed weights share buffers (pack_projections), which
    # some safetensors releases refuse to save.
    weights = {k: v.detach().to("cpu", torch.float32, copy=True).contiguous()
               for k, v in model.state_dict().items()}
    try:
        save_weights(weights, staging / WEIGHTS_FILE)
        torch.save(dict(state, weights_sha256=file_sha256(staging / WEIGHTS_FILE)), staging / STATE_FILE)
        for name, obj in (
            ("config.json", config_to_dict(model.config)),
            (ARGS_FILE, vars(args)),
            (DATA_FILE, data_info),
        ):
            with open(staging / name, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
        write_tokenizer_files(staging, tok, model.config.max_sequence_length)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):  # a full disk: torch.save says RuntimeError
            kept = ("the previous save is kept" if earlier else
                    "there is no earlier save to keep; the same command starts the run over")
            raise OSError(f"{folder}: the save failed ({str(e).splitlines()[0]}); {kept}") from None
        raise
    names = sorted(p.name for p in staging.iterdir() if p.name != STATE_FILE) + [STATE_FILE]
    for name in names:
        os.replace(staging / name, folder / name)
    staging.rmdir()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stopped_before_first_save(folder: Path) -> bool:
    """Whether ``folder`` holds only what a new run writes before its first
    save is complete: a train_log.csv without rows, the staging folder of a
    save cut off while writing and, beside it, the files such a save had
    renamed into place before it was cut off. A new run may start there:
    nothing in it is a run to resume or anyone else's file. (Any later save
    comes after the step-0 row of the log.)"""
    if (folder / STATE_FILE).exists():
        return False
    staging = (folder / STAGING_DIR).is_dir()
    for entry in folder.iterdir():
        if entry.name == STAGING_DIR and entry.is_dir():
            continue
        if entry.name == LOG_FILE and entry.is_file() and log_without_rows(entry):
            continue
        if staging and entry.name in SAVED_FILES and entry.is_file():
            continue
        return False
    return True


def log_without_rows(path: Path) -> bool:
    """Whether ``path`` is a train_log.csv that holds its header only."""
    if path.stat().st_size > 1000:  # far more than the header
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return list(csv.reader(f)) == [LOG_FIELDS]


def check_weights_match(folder: Path, state: dict) -> None:
    """The weights in ``folder`` are the ones its resume state was saved
    with: a save cut off between its renames pairs one save's weights with
    the other's optimizer state and step, which must not resume silently.
    (States written before the hash was recorded are taken as they are.)"""
    expected = state.get("weights_sha256")
    weights = folder / WEIGHTS_FILE
    if expected is not None and weights.is_file() and file_sha256(weights) != expected:
        raise ValueError(f"{folder}: {WEIGHTS_FILE} and {STATE_FILE} (step {state['step']}) come from different "
                         f"saves (a save was cut off between renaming the two), so the run cannot resume "
                         f"from them")


def rng_state(generators: dict) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


class Data:
    """Batches for one mode: ``batch(n, generator)`` -> (ids, prompt_lengths or None)."""

    def __init__(self, args, tok=None):
        from .tokenizer import special_ids

        self.args = args
        if args.task:
            from . import tasks

            self.task = tasks.get_task(args.task)
            self.tok = tok or tasks.tokenizer_for(self.task)
            held_out = tasks.held_out_set(self.task, args.eval_examples)
            train = tasks.make_examples(self.task, args.train_examples, args.seed, exclude=held_out)
            self.train_rows, self.train_prompt = tasks.encode_sft(self.tok, self.task, train)
            self.eval_rows, self.eval_prompt = tasks.encode_sft(self.tok, self.task, held_out)
            self.held_out = held_out
            self.seq_len = self.train_rows.shape[1]
            self.info = {"task": self.task.name, "train_examples": len(train), "train_seed": args.seed,
                         "held_out_examples": len(held_out), "held_out_seed": tasks.TEST_SEED}
        else:
            from .tokenizer import train_bpe

            root, files = corpus_files(args.corpus)
            train_files, held_files = split_files(files, args.held_out_fraction, args.seed)
            if not train_files:
                held = ", ".join(p.relative_to(root).as_posix() for p in held_files)
                raise ValueError(f"--corpus: the training split is empty: all {len(files)} *.py file(s) under "
                                 f"{root} are held out for evaluation ({held}); give a corpus with more files "
                                 "or a smaller --held-out-fraction")
            # The tokenizer sees the training files only.
            self.tok = tok or train_bpe((read_text(p) for p in train_files), args.vocab_size)
            bos, eos = special_ids(self.tok)["bos"], special_ids(self.tok)["eos"]
            self.train_stream = token_stream(self.tok, train_files, bos, eos)
            self.eval_stream = token_stream(self.tok, held_files, bos, eos)
            self.seq_len = args.seq_len
            for name, stream in (("training", self.train_stream), ("held-out", self.eval_stream)):
                if stream.numel() < self.seq_len:
                    raise ValueError(f"--seq-len: {self.seq_len} is longer than the {name} token stream "
                                     f"of --corpus {args.corpus} ({stream.numel()} tokens)")
            self.info = {
                "corpus": describe_files(root, files),
                "train_files": describe_files(root, train_files),
                "held_out_files": [p.relative_to(root).as_posix() for p in held_files],
                "train_tokens": self.train_stream.numel(),
                "held_out_tokens": self.eval_stream.numel(),
            }
        self.ids = special_ids(self.tok)

    def batch(self, n: int, generator: torch.Generator, held_out: bool = False):
        if self.args.task:
            rows, prompt = (self.eval_rows, self.eval_prompt) if held_out else (self.train_rows, self.train_prompt)
            pick = torch.randint(0, rows.shape[0], (n,), generator=generator)
            return rows[pick], prompt[pick]
        stream = self.eval_stream if held_out else self.train_stream
        return random_windows(stream, n, self.seq_len, generator), None


def compute_loss(model, ids, prompt_lengths, mask_id, generator, device):
    ids = ids.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        if prompt_lengths is None:
            return pretraining_loss(model, ids, mask_id, generator=generator)
        return sft_loss(model, ids, prompt_lengths.to(device), mask_id, generator=generator)


@torch.no_grad()
def evaluate_loss(model, eval_batches, mask_id, device, seed: int) -> float:
    """Mean loss on the fixed held-out batches with masks from a fixed seed."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    losses = [float(compute_loss(model, ids, pl, mask_id, gen, device)) for ids, pl in eval_batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(args) -> Path:
    """Run (or resume) a training run; returns the output folder."""
    from .tokenizer import read_tokenizer

    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resuming = (out / STATE_FILE).is_file() and args.resume
    if resuming:
        # Checked before the training state is read: once read, AdamW's
        # moments would count twice. (Here rather than by load_model, whose
        # error is about its dtype argument.)
        check_training_memory(load_config(out), device, f"--resume: {out}")
        try:
            state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)
        except Exception as e:  # torch's errors on a damaged file name neither the file nor the cause
            raise ValueError(f"{out / STATE_FILE}: cannot be read ({type(e).__name__}: {e})") from None
        if args.steps <= state["step"]:
            raise ValueError(f"--steps: the run in {out} is already at step {state['step']}; "
                             f"give more --steps to continue it")
        if args.stop_at and args.stop_at <= state["step"]:
            raise ValueError(f"--stop-at: {args.stop_at} is not after the run's step {state['step']}")
        check_weights_match(out, state)
        # The mask generator's state is per device type.
        if state.get("device_type", device.type) != device.type:
            raise ValueError(f"--device: the run in {out} drew its masks on {state['device_type']}; "
                             f"resume it on {state['device_type']}, not {device}")
    torch.manual_seed(args.seed)

    data = Data(args, tok=read_tokenizer(out) if resuming else None)
    if resuming:
        check_same_data(out, data.info, args)
        model = load_model(out, device=device, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        vocab = data.tok.get_vocab_size()
        if args.max_len and args.max_len < data.seq_len:
            raise ValueError(f"--max-len: {args.max_len} is shorter than the data's sequences ({data.seq_len} "
                             f"tokens); give at least that, or 0 for the data's")
        cfg = build_config(args, vocab, data.ids, args.max_len or data.seq_len)
        check_training_memory(cfg, device, "the model of --d-model, --n-layers, --mlp-hidden, --vocab-size "
                                           "and --weight-tying")
        model = LLaDAModel(cfg)
        init_weights(model, args.seed)
        model.to(device)
    model.train()
    mask_id = model.config.mask_token_id

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.min_lr_ratio)
    )
    # Separate generators: data order and masks continue exactly on resume.
    generators = {"data": torch.Generator().manual_seed(args.seed + 1),
                  "mask": torch.Generator(device=device).manual_seed(args.seed + 2)}
    step, tokens, elapsed = 0, 0, 0.0
    # The mean train loss since the last evaluation: saved, so that a resumed
    # run logs what the uninterrupted one would.
    running, count = 0.0, 0
    if resuming:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], generators)
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        running, count = state.get("running_loss", (0.0, 0))
        # --steps may have changed: the next step's LR follows the schedule as it is now.
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step, args.warmup, args.steps, args.min_lr_ratio)

    eval_gen = torch.Generator().manual_seed(12345)
    eval_batches = [data.batch(args.batch_size, eval_gen, held_out=True) for _ in range(args.eval_batches)]
    n_params = count_parameters(model.config)
    print(f"llada.train: {n_params:,} parameters, seq_len {data.seq_len}, vocab "
          f"{model.config.vocab_size}, device {device}, start step {step}/{args.steps}", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    if resuming:
        # Rows logged after the last save (a run killed, or stopped by a
        # second Ctrl-C) belong to steps the resumed run does again.
        keep_log_rows_up_to(log_path, step)
    else:
        # The folder is empty, or holds only what a run stopped before its
        # first save left there (stopped_before_first_save): nothing to keep.
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(LOG_FIELDS)

    def log_eval(train_loss):
        row = {"step": step, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
               "eval_loss": evaluate_loss(model, eval_batches, mask_id, device, args.seed + 3),
               "eval_accuracy": "", "tokens": tokens, "elapsed_s": round(elapsed, 1)}
        if args.task and args.accuracy_examples:
            from . import tasks

            model.eval()
            row["eval_accuracy"] = tasks.evaluate(model, data.tok, data.task,
                                                  data.held_out[: args.accuracy_examples])
            model.train()
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] if not isinstance(row[k], float) else f"{row[k]:.5g}"
                                    for k in LOG_FIELDS])
        return row

    saved_at = step if resuming else None  # a resumed run starts from its save

    def checkpoint():
        nonlocal saved_at
        saved_at = step
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(generators), "step": step, "tokens": tokens, "elapsed_s": elapsed,
                 "running_loss": (running, count), "device_type": device.type}
        save_checkpoint(out, model, data.tok, state, args, dict(data.info, parameters=n_params))

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=not args.progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    stop = args.stop_at or args.steps
    with StopRequest() as stop_request:
        if not resuming:
            # Before the step-0 evaluation (which may take long): the run is
            # resumable from the start, however it stops.
            checkpoint()
        # Unless a run stopped after logging it; or asked to stop: a resumed run does it.
        if step == 0 and log_without_rows(log_path) and not stop_request.asked:
            log_eval("")
        while step < stop and not stop_request.asked:
            t0 = time.perf_counter()
            ids, prompt_lengths = data.batch(args.batch_size, generators["data"])
            loss = compute_loss(model, ids, prompt_lengths, mask_id, generators["mask"], device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            tokens += ids.numel()
            elapsed += time.perf_counter() - t0
            if not math.isfinite(value := loss.item()):
                # Stopped before any save takes the broken weights in.
                raise FloatingPointError(f"the training loss is {value} at step {step}; the last save "
                                         f"(step {saved_at}) is kept: a lower --lr may help")
            running, count = running + value, count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / count:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}",
                            refresh=False)
            if step % args.eval_every == 0 or step == args.steps:
                row = log_eval(running / count)
                bar.write(f"step {step}: train {running / count:.4f} eval {row['eval_loss']:.4f}"
                          + (f" acc {row['eval_accuracy']:.3f}" if row["eval_accuracy"] != "" else "")
                          + f" ({tokens / max(elapsed, 1e-9):.0f} tok/s)")
                running, count = 0.0, 0
            if step % args.save_every == 0:
                checkpoint()
        if saved_at != step:  # however the loop ended, what it did is saved and resumable
            checkpoint()
    if step < stop:  # asked to stop (Ctrl-C)
        bar.write(f"llada train: stopped at step {step}, saved; llada train --resume {out} continues")
    bar.close()
    return out


def check_same_data(folder: Path, info: dict, args) -> None:
    """A resumed run trains on the data it started with: the files (paths,
    sizes and contents) and split its data.json records, or the same task
    examples. A data.json saved before file contents were hashed records
    paths and sizes only, and only those are compared."""
    def comparable(value, recorded):
        # Where the files are, and which Python listed them, do not matter;
        # nor does what the recorded data.json does not hold.
        if isinstance(value, dict) and isinstance(recorded, dict):
            return {k: comparable(v, recorded.get(k)) for k, v in value.items()
                    if k not in ("root", "python_version", "parameters") and (k != CONTENT_KEY or k in recorded)}
        return value

    path = folder / DATA_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if saved is not None and comparable(saved, saved) != comparable(info, saved):
        flag, value = ("corpus", args.corpus) if args.corpus else ("task", args.task)
        raise ValueError(f"--{flag}: {value} no longer gives the data the run in {folder} trained on "
                         f"(see its {DATA_FILE}); resume it with that data")


def keep_log_rows_up_to(path: Path, step: int) -> None:
    """Drops the rows of the log past ``step`` (rewritten under a temporary
    name and renamed, as saves are)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= step]
    if len(kept) == len(rows):
        return
    with open(path.with_suffix(".tmp"), "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(path.with_suffix(".tmp"), path)


class StopRequest:
    """Ctrl-C while training: the first asks the run to stop after the step
    under way, saved, so that ``--resume`` continues it; a second stops at
    once, as usual (what the last save holds is kept). Only the main thread
    can handle signals; elsewhere Ctrl-C keeps its usual effect."""

    def __init__(self):
        self.asked = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        self.asked = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nllada train: stopping after this step to save (Ctrl-C again: stop now)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


# On --resume: these describe how far the run goes and how it is run, and may
# change; every other option is part of the run (its data, tokenizer, model,
# seed, optimizer and schedule, and the evaluation that makes train_log.csv
# comparable), so only its recorded value may be given.
CHANGEABLE_ON_RESUME = ("steps", "stop_at", "eval_every", "save_every", "device", "progress")

# The options of one mode only, with their defaults. The parser leaves them
# None, so that one given to a run of the other mode is refused whatever its
# value; a run's own mode then gets these defaults, and the other mode's stay
# None (null in train_args.json). Runs saved before recorded the other mode's
# defaults there; resume drops them.
MODE_OPTIONS = {
    "corpus": {"vocab_size": 4096, "held_out_fraction": 0.03, "seq_len": 256},
    "task": {"train_examples": 200_000, "eval_examples": 500, "accuracy_examples": 100},
}
MODE_NAMES = {"corpus": "pretraining (--corpus)", "task": "SFT (--task)"}


def build_parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    p = argparse.ArgumentParser(
        prog="llada train", description="Train a small LLaDA model from scratch.",
        epilog="--resume DIR continues the run saved in DIR with its recorded options. Of the others only "
               + ", ".join(flag(k) for k in CHANGEABLE_ON_RESUME)
               + " may be given with a new value (a larger --steps extends the run; the cosine then follows the"
               " new total); any other option may only repeat the run's value.")
    src = p.add_argument_group("data (one of --corpus, --task)")
    src.add_argument("--corpus", help="'stdlib' (this Python's standard library) or a directory of *.py files "
                                      f"(in either, folders named {', '.join(sorted(EXCLUDED_DIRS))} are left out)")
    src.add_argument("--task", choices=sorted(TASKS), help="a synthetic task of llada.tasks (SFT)")
    pretraining, sft = MODE_OPTIONS["corpus"], MODE_OPTIONS["task"]
    src.add_argument("--vocab-size", type=int,
                     help=f"BPE vocabulary (pretraining only; default {pretraining['vocab_size']})")
    src.add_argument("--held-out-fraction", type=float,
                     help=f"files held out (pretraining only; default {pretraining['held_out_fraction']})")
    src.add_argument("--seq-len", type=int,
                     help=f"window length (pretraining only; default {pretraining['seq_len']})")
    src.add_argument("--train-examples", type=int,
                     help=f"training examples (SFT only; default {sft['train_examples']})")
    src.add_argument("--eval-examples", type=int,
                     help=f"held-out examples (SFT only; default {sft['eval_examples']})")
    src.add_argument("--accuracy-examples", type=int,
                     help="held-out examples decoded at each evaluation (SFT only; 0 = off; default "
                          f"{sft['accuracy_examples']}); all of --eval-examples where that is fewer")

    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--n-layers", type=int, default=4)
    m.add_argument("--n-heads", type=int, default=4)
    m.add_argument("--mlp-hidden", type=int, default=0, help="0 = 8/3 d_model rounded up to 64")
    m.add_argument("--weight-tying", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--max-len", type=int, default=0, help="max_sequence_length in config.json (0 = the data's)")

    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR / peak LR, in [0, 1]")
    o.add_argument("--warmup", type=int, default=100, help="steps of linear LR warm-up")
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run")
    r.add_argument("--out", help="output folder (the checkpoint)")
    r.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (see below)")
    r.add_argument("--eval-every", type=int, default=100)
    r.add_argument("--eval-batches", type=int, default=4)
    r.add_argument("--save-every", type=int, default=500)
    r.add_argument("--stop-at", type=int, default=0,
                   help="save and stop at this step (at most --steps), leaving the schedule as for --steps "
                        "(0 = run to the end)")
    r.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The options of a run. A bad one exits as argparse does (status 2, a
    message naming the flag)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        args = resumed_args(parser, argv, args)
    elif mode := run_mode(vars(args)):  # without one, check_args names the problem
        given = {name for options in MODE_OPTIONS.values() for name in options if getattr(args, name) is not None}
        refuse_other_mode_options(parser, mode, given, "this run is")
        set_mode_options(args, mode)
        if mode == "corpus" and args.corpus != "stdlib":
            # Recorded as an absolute path: --resume works from any folder.
            args.corpus = str(Path(args.corpus).resolve())
    check_args(parser, args)
    return args


def run_mode(options: dict) -> Optional[str]:
    """'corpus' or 'task': the one of the two the options give (None for neither or both)."""
    if bool(options.get("corpus")) == bool(options.get("task")):
        return None
    return "corpus" if options.get("corpus") else "task"


def refuse_other_mode_options(parser: argparse.ArgumentParser, mode: str, given: set, subject: str) -> None:
    """An option of the other mode would be ignored: refused, named."""
    other = "task" if mode == "corpus" else "corpus"
    for name in MODE_OPTIONS[other]:
        if name in given:
            parser.error(f"argument {flag(name)}: only {MODE_NAMES[other]} runs use it; {subject} "
                         f"{MODE_NAMES[mode]}")


def set_mode_options(args: argparse.Namespace, mode: str) -> None:
    """The run's mode options not given take their defaults; the other mode's are None."""
    other = "task" if mode == "corpus" else "corpus"
    for name, default in MODE_OPTIONS[mode].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in MODE_OPTIONS[other]:
        setattr(args, name, None)


def resumed_args(parser: argparse.ArgumentParser, argv, args: argparse.Namespace) -> argparse.Namespace:
    """The recorded options of the run in ``--resume DIR``, with those given
    now that may change."""
    folder = Path(args.resume)
    if not (folder / ARGS_FILE).is_file() or not (folder / STATE_FILE).is_file():
        if folder.is_dir() and any(folder.iterdir()) and stopped_before_first_save(folder):
            parser.error(f"argument --resume: the run in {folder} stopped before its first save, so there is "
                         f"nothing to resume; start it over with the command that started it (--out {folder} "
                         f"may be given again)")
        parser.error(f"argument --resume: {folder} has no {ARGS_FILE} and {STATE_FILE} to resume from")
    try:
        with open(folder / ARGS_FILE, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError as e:
        parser.error(f"argument --resume: {folder / ARGS_FILE}: {e}")
    # What was typed, even a default: attributes set in advance get no defaults.
    unset = object()
    typed = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    given = {k: v for k, v in vars(typed).items() if v is not unset and k != "resume"}
    if "out" in given and Path(given.pop("out")).resolve() != folder.resolve():
        parser.error(f"argument --out: --resume {folder} writes to {folder}; leave --out out")
    mode = run_mode(saved)  # without one, check_args names the problem
    if mode:
        refuse_other_mode_options(parser, mode, set(given), f"the run in {folder} is")
    # The same folder written another way is the same corpus; a path is
    # never the run's "stdlib" keyword or its lack of a corpus (a --task run).
    corpus, saved_corpus = given.get("corpus"), saved.get("corpus")
    if corpus not in (None, "stdlib") and saved_corpus not in (None, "stdlib") and \
            Path(corpus).resolve() == Path(saved_corpus).resolve():
        given["corpus"] = saved_corpus
    for name, value in given.items():
        if name not in CHANGEABLE_ON_RESUME and value != saved.get(name):
            parser.error(f"argument {flag(name)}: cannot change on --resume: the run in {folder} has "
                         f"{saved.get(name)!r}, not {value!r}")
    merged = {**vars(parser.parse_args([])), **saved, **given}
    merged["out"], merged["resume"] = str(folder), str(folder)
    merged["stop_at"] = args.stop_at  # a pause point belongs to one invocation, not the run
    resumed = argparse.Namespace(**merged)
    if mode:
        set_mode_options(resumed, mode)
    return resumed


# Sizes and counts reach torch and the tokenizer trainer as C ints: beyond
# this they fail there with an overflow (or C++ stack frames) naming no flag.
MAX_INT_OPTION = 2**31 - 1


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    def fail(name: str, message: str):
        parser.error(f"argument {flag(name)}: {message}")

    if bool(args.corpus) == bool(args.task):
        parser.error("give exactly one of --corpus (pretraining) or --task (SFT)")
    if not args.out:
        fail("out", "an output folder is required (--out DIR)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail("out", f"{out} is a file, not a folder")
    if not args.resume and out.is_dir() and any(out.iterdir()) and not stopped_before_first_save(out):
        # A new run would overwrite what is there (a checkpoint, a run's log).
        fail("out", f"{out} is not empty; pick a new folder, or --resume {out} to continue the run saved there")
    positive = ["steps", "batch_size", "eval_every", "eval_batches", "save_every", "d_model", "n_layers", "n_heads"]
    positive += ["train_examples", "eval_examples"] if args.task else ["seq_len", "vocab_size"]
    for name in positive:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            fail(name, f"expected a positive int, got {value!r}")
        if value > MAX_INT_OPTION:
            fail(name, f"expected at most {MAX_INT_OPTION}, got {value}")
    if args.task:
        from .tasks import DISTINCT_PROMPTS

        room = DISTINCT_PROMPTS[args.task]
        if args.eval_examples >= room:
            fail("eval_examples", f"task {args.task!r} has {room} distinct prompts, and training needs some; "
                                  f"got {args.eval_examples}")
        if args.train_examples + args.eval_examples > room:
            fail("train_examples", f"task {args.task!r} has {room} distinct prompts; with --eval-examples "
                                   f"{args.eval_examples} held out, at most {room - args.eval_examples}, "
                                   f"got {args.train_examples}")
    for name in ("mlp_hidden", "max_len", "warmup", "stop_at") + (("accuracy_examples",) if args.task else ()):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 0:
            fail(name, f"expected an int >= 0, got {value!r}")
        if value > MAX_INT_OPTION:
            fail(name, f"expected at most {MAX_INT_OPTION}, got {value}")
    if args.stop_at > args.steps:
        fail("stop_at", f"{args.stop_at} is past --steps ({args.steps})")
    if not 0 <= args.seed < 2**32:
        fail("seed", f"expected an int in [0, 2**32), got {args.seed}")
    if args.d_model % args.n_heads or (args.d_model // args.n_heads) % 2:
        fail("d_model", f"{args.d_model} is not --n-heads ({args.n_heads}) times an even head size")
    if args.corpus:
        from .tokenizer import SPECIAL_LIST

        smallest = 256 + len(SPECIAL_LIST)  # the bytes and the special tokens
        if args.vocab_size < smallest:
            fail("vocab_size", f"expected at least {smallest}, got {args.vocab_size}")
        if not 0 < args.held_out_fraction < 1:
            fail("held_out_fraction", f"expected a value in (0, 1), got {args.held_out_fraction}")
    for name, ok, expected in (  # NaN fails every comparison
        ("lr", 0 < args.lr < math.inf, "a finite value > 0"),
        ("grad_clip", 0 < args.grad_clip < math.inf, "a finite value > 0"),
        ("weight_decay", 0 <= args.weight_decay < math.inf, "a finite value >= 0"),
        ("min_lr_ratio", 0 <= args.min_lr_ratio <= 1, "a value in [0, 1]"),
    ):
        if not ok:
            fail(name, f"expected {expected}, got {getattr(args, name)}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            fail("device", f"expected cpu or cuda[:N], got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            fail("device", f"{args.device}: no CUDA GPU is available here (--device cpu trains on the CPU)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            fail("device", f"{args.device}: there are only {torch.cuda.device_count()} CUDA device(s)")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)  # bad options exit with status 2, as argparse's own do
    try:
        out = train(args)
    except (ValueError, TypeError, OSError, OverflowError, FloatingPointError) as e:  # OSError: --out under a file
        print(f"llada train: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # Python's own, from an allocation, carries no message
        print(f"llada train: error: {str(e) or 'out of memory'}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        print(f"llada train: error: out of memory ({str(e).splitlines()[0]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C before the training loop (which saves on a first one), or a
        # second one in it: what the last save holds is kept.
        print("\nllada train: interrupted", file=sys.stderr)
        return 130
    print(f"llada train: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
