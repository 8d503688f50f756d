"""The JSON Lines files of ``--prompts-file``: one prompt per line, read
whole and checked before any decoding, each line's object kept so that its
output line carries every key it had (an id, a reference answer); and the
progress bar of a run over one."""

from __future__ import annotations

import json
import sys


def read_json_lines(path: str) -> list[tuple[int, object]]:
    """The values of a JSON Lines file (``-``: standard input) with their
    line numbers; blank lines are skipped."""
    try:
        if path == "-":
            path = "standard input"
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise FileNotFoundError(f"--prompts-file: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file: {path} is not UTF-8 text ({e.reason})") from None
    values = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts-file: {path}, line {number}: not JSON ({e.msg})") from None
    if not values:
        raise ValueError(f"--prompts-file: {path} holds no prompts")
    return values


def _has_one_prompt(item) -> bool:
    """An object with either a "prompt" string or a "messages" list (a
    conversation, checked when it is encoded)."""
    return isinstance(item, dict) and (isinstance(item.get("prompt"), str) ^ isinstance(item.get("messages"), list))


def _check_output_key(item: dict, key: str, where: str) -> None:
    if key in item:
        raise ValueError(f'--prompts-file: {where}: has the key "{key}", which its output line would '
                         f'overwrite (rename it)')


def read_prompts(path: str) -> list[dict]:
    """The prompts of ``llada generate --prompts-file``, each as an object:
    {"prompt": text} for a line that is a string; an object with a "prompt"
    string or a "messages" list as it stands: its other keys (an id, a
    reference) go to its output line, so it may not have the output's
    "answer"."""
    lines = []
    for number, item in read_json_lines(path):
        where = f"{'standard input' if path == '-' else path}, line {number}"
        if isinstance(item, str):
            item = {"prompt": item}
        if not _has_one_prompt(item):
            raise ValueError(f'--prompts-file: {where}: expected a JSON string, or an object '
                             f'with either a "prompt" string or a "messages" list')
        _check_output_key(item, "answer", where)
        lines.append(item)
    return lines


def read_scoring_lines(path: str) -> list[dict]:
    """The lines of ``llada likelihood --prompts-file``: objects with a
    "prompt" string or a "messages" list, and "answers", a non-empty list
    of strings; other keys go to the output line, which adds
    "log_likelihoods"."""
    lines = []
    for number, item in read_json_lines(path):
        where = f"{'standard input' if path == '-' else path}, line {number}"
        answers = item.get("answers") if isinstance(item, dict) else None
        if not (_has_one_prompt(item) and isinstance(answers, list) and answers
                and all(isinstance(a, str) for a in answers)):
            raise ValueError(f'--prompts-file: {where}: expected an object with either a "prompt" string '
                             f'or a "messages" list, and "answers", a non-empty list of strings')
        _check_output_key(item, "log_likelihoods", where)
        lines.append(item)
    return lines


def prompt_of(line: dict):
    """A line's prompt: its "prompt" text or its "messages" conversation."""
    return line["prompt"] if "prompt" in line else line["messages"]


def progress_bar(total: int, wanted: bool = True):
    """A bar of the prompts done, on standard error, shown only when it is a
    terminal and the output goes elsewhere (a file): on the same terminal
    it would garble the printed lines."""
    from tqdm import tqdm

    shown = wanted and sys.stderr.isatty() and not sys.stdout.isatty()
    return tqdm(total=total, unit="prompt", file=sys.stderr, disable=not shown, dynamic_ncols=True)
