"""Synthetic tasks whose answers can be checked exactly, for measuring how
decoding policies trade quality for speed.

Each task needs the whole prompt (bidirectional context) to produce any
answer token, and its answers are verified exactly:

- ``sort``: ``sort 3 1 4 1 5 9 2 6 5 3 =`` -> ``1 1 2 3 3 4 5 5 6 9``. Each output
  position depends on the counts of every digit in the prompt.
- ``add``: ``add 4 7 1 + 5 8 3 =`` -> ``1 0 5 4`` (3-digit operands, the sum
  written most-significant digit first and padded with EOS to 4 tokens).
  A digit depends on the carries coming from every digit to its right.
- ``perm``: ``perm 3 1 4 5 9 2 =`` -> any ordering of those six distinct
  digits; the training answers are random orderings. Unlike the two tasks
  above, the answer tokens are not independent given the prompt (each
  position's marginal is spread over all six digits), so committing several
  tokens in one step can repeat a digit: this task separates decoding
  policies that the deterministic tasks cannot.

Prompts of a task all have the same number of tokens, so training rows and
decoding canvases have one shape. Tokens are whitespace-separated words (see
:func:`llada.tokenizer.word_tokenizer`). Examples are drawn from a seeded
``random.Random``, so a (task, seed, n) triple always gives the same list.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from .token_ids import is_int

DIGITS = [str(d) for d in range(10)]


@dataclass(frozen=True)
class Example:
    prompt: str  # words separated by single spaces, no special tokens
    answer: str  # the correct answer, same convention


@dataclass(frozen=True)
class Task:
    name: str
    words: tuple[str, ...]  # the vocabulary beyond the special tokens
    prompt_tokens: int  # every prompt has exactly this many tokens
    answer_tokens: int  # gen_length: the longest answer; shorter ones pad with EOS
    draw: Callable[[random.Random], Example]
    solve: Callable[[str], Optional[str]]  # a correct answer of a prompt, None if malformed
    # For tasks with many correct answers: (prompt words, answer words) -> valid?
    accepts: Optional[Callable[[list, list], bool]] = None
    # Every prompt in a fixed order, and the example of a prompt (its answer
    # drawn from the generator where there are many): how make_examples takes
    # the last prompts of a nearly used-up task. None where there are too
    # many prompts to list (random draws then always find enough).
    every_prompt: Optional[Callable[[], Iterable[str]]] = None
    example: Optional[Callable[[str, random.Random], Example]] = None

    def check(self, prompt: str, answer: str) -> bool:
        """Whether ``answer`` (whitespace-insensitive) is a correct answer."""
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise TypeError("prompt, answer: expected str")
        expected = self.solve(prompt)
        if expected is None:
            return False
        if self.accepts is not None:
            return self.accepts(prompt.split(), answer.split())
        return answer.split() == expected.split()


# --------------------------------------------------------------------------
# sort
# --------------------------------------------------------------------------

SORT_LENGTH = 10


def _draw_sort(rng: random.Random) -> Example:
    digits = [rng.choice(DIGITS) for _ in range(SORT_LENGTH)]
    prompt = "sort " + " ".join(digits) + " ="
    return Example(prompt, _solve_sort(prompt))


def _solve_sort(prompt: str) -> Optional[str]:
    words = prompt.split()
    if len(words) != SORT_LENGTH + 2 or words[0] != "sort" or words[-1] != "=":
        return None
    digits = words[1:-1]
    if not all(d in DIGITS for d in digits):
        return None
    return " ".join(sorted(digits))


# --------------------------------------------------------------------------
# add
# --------------------------------------------------------------------------

ADD_DIGITS = 3


def _draw_add(rng: random.Random) -> Example:
    a, b = rng.randrange(10**ADD_DIGITS), rng.randrange(10**ADD_DIGITS)
    prompt = f"add {' '.join(f'{a:0{ADD_DIGITS}d}')} + {' '.join(f'{b:0{ADD_DIGITS}d}')} ="
    return Example(prompt, _solve_add(prompt))


def _every_add() -> Iterable[str]:
    for a, b in itertools.product(range(10**ADD_DIGITS), repeat=2):
        yield f"add {' '.join(f'{a:0{ADD_DIGITS}d}')} + {' '.join(f'{b:0{ADD_DIGITS}d}')} ="


def _solve_add(prompt: str) -> Optional[str]:
    words = prompt.split()
    n = ADD_DIGITS
    if len(words) != 2 * n + 3 or words[0] != "add" or words[n + 1] != "+" or words[-1] != "=":
        return None
    a, b = words[1 : n + 1], words[n + 2 : 2 * n + 2]
    if not all(d in DIGITS for d in a + b):
        return None
    return " ".join(str(int("".join(a)) + int("".join(b))))


# --------------------------------------------------------------------------
# perm
# --------------------------------------------------------------------------

PERM_LENGTH = 6


def _draw_perm(rng: random.Random) -> Example:
    digits = rng.sample(DIGITS, PERM_LENGTH)
    answer = rng.sample(digits, PERM_LENGTH)  # any order is right: the data is multimodal
    return Example("perm " + " ".join(digits) + " =", " ".join(answer))


def _every_perm() -> Iterable[str]:
    for digits in itertools.permutations(DIGITS, PERM_LENGTH):
        yield "perm " + " ".join(digits) + " ="


def _perm_example(prompt: str, rng: random.Random) -> Example:
    return Example(prompt, " ".join(rng.sample(prompt.split()[1:-1], PERM_LENGTH)))


def _solve_perm(prompt: str) -> Optional[str]:
    words = prompt.split()
    if len(words) != PERM_LENGTH + 2 or words[0] != "perm" or words[-1] != "=":
        return None
    digits = words[1:-1]
    if not all(d in DIGITS for d in digits) or len(set(digits)) != PERM_LENGTH:
        return None
    return " ".join(digits)


def _accepts_perm(prompt: list, answer: list) -> bool:
    return sorted(answer) == sorted(prompt[1:-1])


TASKS: dict[str, Task] = {
    "sort": Task("sort", ("sort", "=", *DIGITS), SORT_LENGTH + 2, SORT_LENGTH, _draw_sort, _solve_sort),
    "add": Task("add", ("add", "+", "=", *DIGITS), 2 * ADD_DIGITS + 3, ADD_DIGITS + 1, _draw_add, _solve_add,
                every_prompt=_every_add, example=lambda prompt, rng: Example(prompt, _solve_add(prompt))),
    "perm": Task("perm", ("perm", "=", *DIGITS), PERM_LENGTH + 2, PERM_LENGTH, _draw_perm, _solve_perm,
                 _accepts_perm, every_prompt=_every_perm, example=_perm_example),
}

# How many distinct prompts each task has: a training set and its held-out
# set together can hold no more.
DISTINCT_PROMPTS = {"sort": len(DIGITS) ** SORT_LENGTH, "add": 10 ** (2 * ADD_DIGITS),
                    "perm": math.perm(len(DIGITS), PERM_LENGTH)}


def get_task(name: str) -> Task:
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


# --------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------


def make_examples(task: str | Task, n: int, seed: int, exclude: Sequence[Example] = ()) -> list[Example]:
    """``n`` distinct examples drawn with ``seed``, none of whose prompts is in
    ``exclude`` (so a training set can avoid the held-out prompts). Any ``n``
    up to the number of prompts outside ``exclude`` can be had."""
    task = get_task(task) if isinstance(task, str) else task
    if not is_int(n) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    n = int(n)
    rng = random.Random(f"{task.name}:{seed}")
    seen = {e.prompt for e in exclude}
    out: list[Example] = []
    for _ in range(50 * n + 1000):  # bounded, in case the task space is too small
        if len(out) == n:
            break
        example = task.draw(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
    if len(out) < n and task.every_prompt is not None:
        # Few prompts are left, and random draws rarely hit them: list them
        # and take a seeded sample. (Only once the draws above gave up, so
        # every set they can supply is drawn as it always was.)
        rest = [prompt for prompt in task.every_prompt() if prompt not in seen]
        out += [task.example(prompt, rng) for prompt in rng.sample(rest, min(n - len(out), len(rest)))]
        if len(out) < n:
            raise ValueError(f"n: task {task.name!r} has {len(out)} distinct prompts outside exclude; "
                             f"expected at most that, got {n}")
    if len(out) < n:
        raise ValueError(f"n: task {task.name!r} could not supply {n} distinct examples")
    return out


TEST_SEED = 1234  # the held-out set of every task: make_examples(task, n, TEST_SEED)


def held_out_set(task: str | Task, n: int = 500) -> list[Example]:
    return make_examples(task, n, TEST_SEED)


def tokenizer_for(task: str | Task):
    from .tokenizer import word_tokenizer

    task = get_task(task) if isinstance(task, str) else task
    return word_tokenizer(task.words)


def encode_sft(tok, task: Task, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``BOS prompt answer EOS...`` of one length for SFT, and the prompt
    length (BOS included) of each row. The answer is padded with EOS to
    ``task.answer_tokens`` so the model learns where answers end."""
    from .tokenizer import special_ids

    eos = special_ids(tok)["eos"]
    rows, prompt_lengths = [], []
    for e in examples:
        prompt = tok.encode(e.prompt).ids  # BOS + prompt words
        answer = tok.encode(e.answer, add_special_tokens=False).ids
        if len(prompt) != task.prompt_tokens + 1 or len(answer) > task.answer_tokens:
            raise ValueError(f"examples: {e} does not fit task {task.name!r}")
        rows.append(prompt + answer + [eos] * (task.answer_tokens - len(answer)))
        prompt_lengths.append(len(prompt))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(prompt_lengths, dtype=torch.long)


def decode_answer(tok, ids: Sequence[int]) -> str:
    """The text of generated ids, up to the first EOS/EoT."""
    from .tokenizer import special_ids

    special = special_ids(tok)
    stops = {special["eos"], special["eot"]}
    out = []
    for i in ids:
        if i in stops:
            break
        out.append(i)
    return tok.decode(out, skip_special_tokens=False)


@torch.no_grad()
def evaluate(
    model,
    tok,
    task: str | Task,
    examples: Sequence[Example],
    *,
    steps: Optional[int] = None,
    block_length: Optional[int] = None,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    batch_size: int = 128,
    seed: int = 0,
    policy=None,
    generate_fn: Optional[Callable] = None,
) -> float:
    """Exact-match accuracy of ``llada.generate`` on ``examples``.

    Defaults are the full-step single-block schedule: steps = block_length =
    gen_length = ``task.answer_tokens``; ``policy`` is a
    :class:`llada.DecodePolicy`. ``generate_fn`` (same signature as
    :func:`llada.generate`) lets benchmarks plug in other decoders.
    """
    from .sampler import check_model, device_of, generate

    task = get_task(task) if isinstance(task, str) else task
    if not examples:
        raise ValueError("examples: expected at least one example")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    batch_size = int(batch_size)
    gen_length = task.answer_tokens
    steps = gen_length if steps is None else steps
    block_length = gen_length if block_length is None else block_length
    generate_fn = generate if generate_fn is None else generate_fn
    check_model(model, None)
    device = device_of(model)
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompt = torch.tensor([tok.encode(e.prompt).ids for e in batch], device=device)
        out = generate_fn(
            model, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
            temperature=temperature, remasking=remasking, seed=seed + start, policy=policy,
        )
        for e, row in zip(batch, out[:, prompt.shape[1] :].tolist()):
            correct += task.check(e.prompt, decode_answer(tok, row))
    return correct / len(examples)


__all__ = [
    "Example",
    "TASKS",
    "Task",
    "decode_answer",
    "encode_sft",
    "evaluate",
    "get_task",
    "make_examples",
    "held_out_set",
    "tokenizer_for",
]
