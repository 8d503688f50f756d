"""The JSON Lines files of ``--prompts-file``: one prompt per line, read
whole and checked before any decoding (the command encodes every line
before it decodes one), each line's object kept so that its output line
carries every key it had (an id, a reference answer); and the progress bar
of a run over one."""

from __future__ import annotations

import json
import sys


def read_json_lines(path: str) -> list[tuple[str, object]]:
    """The values of a JSON Lines file (``-``: standard input), each with
    where it was, "--prompts-file FILE line N", for errors about it; blank
    lines are skipped."""
    name = "standard input" if path == "-" else path
    try:
        # utf-8-sig: a byte order mark at the start is not part of the JSON.
        if path == "-":
            text = sys.stdin.buffer.read().decode("utf-8-sig")
        else:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
    except OSError as e:
        raise FileNotFoundError(f"--prompts-file {name}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {name}: not valid UTF-8 text ({e.reason})") from None
    values = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"--prompts-file {name} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            # An escape such as "\ud800" (half of a UTF-16 pair) is no character: no
            # tokenizer takes it, and the line could not be written back out.
            raise ValueError(f"{where}: holds a lone surrogate escape (\\ud800-\\udfff), which is not text") from None
        values.append((where, value))
    if not values:
        raise ValueError(f"--prompts-file {name}: holds no prompts")
    return values


def _check_prompt(item, where: str, chat: bool, expected: str) -> None:
    """A line holds either a "prompt" string or, with --chat, a non-empty
    "messages" list (its messages are checked when it is encoded)."""
    if not isinstance(item, dict) or not ("prompt" in item or "messages" in item):
        raise ValueError(f"{where}: expected {expected}")
    if "prompt" in item and "messages" in item:
        raise ValueError(f'{where}: has both "prompt" and "messages"; give one')
    if "messages" in item:
        if not chat:
            raise ValueError(f'{where}: "messages" (a conversation) needs --chat')
        if not (isinstance(item["messages"], list) and item["messages"]):
            raise ValueError(f'{where}: "messages": expected a non-empty list of {{"role", "content"}} '
                             f'objects, got {json.dumps(item["messages"], ensure_ascii=False)}')
    elif not isinstance(item["prompt"], str):
        raise ValueError(f'{where}: "prompt": expected a string, '
                         f'got {json.dumps(item["prompt"], ensure_ascii=False)}')


def _check_output_key(item: dict, key: str, where: str) -> None:
    if key in item:
        raise ValueError(f'{where}: has the key "{key}", which its output line would '
                         f'overwrite (rename it)')


def read_prompts(path: str, chat: bool) -> list[tuple[str, dict]]:
    """The prompts of ``llada generate --prompts-file``, each as an object
    (with where it was, see :func:`read_json_lines`): {"prompt": text} for
    a line that is a string; an object with a "prompt" string or a
    "messages" list as it stands: its other keys (an id, a reference) go to
    its output line, so it may not have the output's "answer"."""
    lines = []
    for where, item in read_json_lines(path):
        if isinstance(item, str):
            item = {"prompt": item}
        _check_prompt(item, where, chat, 'a JSON string, or an object with a "prompt" string'
                      + (' or a "messages" list' if chat else ""))
        _check_output_key(item, "answer", where)
        lines.append((where, item))
    return lines


def read_scoring_lines(path: str, chat: bool) -> list[tuple[str, dict]]:
    """The lines of ``llada likelihood --prompts-file`` (with where each
    was): objects with a "prompt" string or a "messages" list, and
    "answers", a non-empty list of strings; other keys go to the output
    line, which adds "log_likelihoods"."""
    lines = []
    for where, item in read_json_lines(path):
        expected = ('an object with a "prompt" string' + (' or a "messages" list' if chat else "")
                    + ' and "answers", a non-empty list of strings')
        _check_prompt(item, where, chat, expected)
        answers = item.get("answers")
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{where}: expected {expected}")
        _check_output_key(item, "log_likelihoods", where)
        lines.append((where, item))
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
