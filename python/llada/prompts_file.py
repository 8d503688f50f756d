"""The JSON Lines files of ``--prompts-file``: one prompt per line, read
whole and checked before any decoding (the command encodes every line
before it decodes one), each line's object kept so that its output line
carries every key it had (an id, a reference answer) as the line wrote it;
and the progress bar of a run over one."""

from __future__ import annotations

import json
import sys
from typing import NamedTuple


class Line(NamedTuple):
    """A line of a prompts file: where it was ("--prompts-file FILE line N",
    for errors about it), its value, and its text as the file has it."""

    where: str
    value: object
    text: str


def _not_json(constant: str):
    # Python's json reads NaN and Infinity, which JSON has not: an output line
    # that kept one would be no JSON either.
    raise ValueError(f"{constant} is not a JSON value")


class LongInteger:
    """A JSON integer too long for Python's int (over 4300 digits): kept as
    its text, which the output line copies as it was."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:  # inside a list or dict, as the file wrote it
        return self.text


def _integer(text: str):
    return int(text) if len(text) <= 4000 else LongInteger(text)


def read_json_lines(path: str) -> list[Line]:
    """The lines of a JSON Lines file (``-``: standard input); blank lines
    are skipped."""
    name = "standard input" if path == "-" else path
    if path == "-" and sys.stdin is None:  # started with standard input closed (`<&-`)
        raise ValueError("--prompts-file -: standard input is closed; give the prompts there or name a file")
    try:
        # Bytes from either source, decoded alike: a file opened as text would
        # take a lone "\r" (JSON whitespace) for a line break, which JSON Lines
        # does not (a "\r" before "\n" is whitespace at the end of its line).
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
        # utf-8-sig: a byte order mark at the start is not part of the JSON.
        text = data.decode("utf-8-sig")
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
            value = json.loads(line, parse_constant=_not_json, parse_int=_integer)
            json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{where}: nested too deeply for Python's json to read") from None
        except UnicodeEncodeError:
            # An escape such as "\ud800" (half of a UTF-16 pair) is no character: no
            # tokenizer takes it, and strict JSON readers refuse it in the output line.
            raise ValueError(f"{where}: holds a lone surrogate escape (\\ud800-\\udfff), which is not text") from None
        except ValueError as e:  # NaN or Infinity
            raise ValueError(f"{where}: not JSON ({e})") from None
        values.append(Line(where, value, line))
    if not values:
        raise ValueError(f"--prompts-file {name}: holds no prompts")
    return values


def _as_json(value) -> str:
    """``value`` as JSON for an error message, a LongInteger as its digits
    (which json.dumps cannot write)."""
    try:
        return _json_text(value)
    except RecursionError:  # nested deeper than this recursion goes: a LongInteger in quotes
        return json.dumps(value, ensure_ascii=False, default=str)


def _json_text(value) -> str:
    if isinstance(value, LongInteger):
        return value.text
    if isinstance(value, list):
        return "[" + ", ".join([_json_text(item) for item in value]) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join([f"{_json_text(key)}: {_json_text(item)}" for key, item in value.items()]) + "}"
    return json.dumps(value, ensure_ascii=False)


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
                             f'objects, got {_as_json(item["messages"])}')
    elif not isinstance(item["prompt"], str):
        raise ValueError(f'{where}: "prompt": expected a string, '
                         f'got {_as_json(item["prompt"])}')


def _check_output_key(item: dict, key: str, where: str) -> None:
    if key in item:
        raise ValueError(f'{where}: has the key "{key}", which its output line would '
                         f'overwrite (rename it)')


def read_prompts(path: str, chat: bool) -> list[Line]:
    """The prompts of ``llada generate --prompts-file`` (see
    :func:`read_json_lines`), each value an object: {"prompt": text} for a
    line that is a string; an object with a "prompt" string or a "messages"
    list as it stands: its other keys (an id, a reference) go to its output
    line, so it may not have the output's "answer"."""
    lines = []
    for line in read_json_lines(path):
        item = {"prompt": line.value} if isinstance(line.value, str) else line.value
        _check_prompt(item, line.where, chat, 'a JSON string, or an object with a "prompt" string'
                      + (' or a "messages" list' if chat else ""))
        _check_output_key(item, "answer", line.where)
        lines.append(line._replace(value=item))
    return lines


def read_scoring_lines(path: str, chat: bool) -> list[Line]:
    """The lines of ``llada likelihood --prompts-file`` (see
    :func:`read_json_lines`): objects with a "prompt" string or a "messages"
    list, and "answers", a non-empty list of strings; other keys go to the
    output line, which adds "log_likelihoods"."""
    lines = []
    for line in read_json_lines(path):
        item, where = line.value, line.where
        expected = ('an object with a "prompt" string' + (' or a "messages" list' if chat else "")
                    + ' and "answers", a non-empty list of strings')
        _check_prompt(item, where, chat, expected)
        answers = item.get("answers")
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{where}: expected {expected}")
        _check_output_key(item, "log_likelihoods", where)
        lines.append(line)
    return lines


def output_line(line: Line, key: str, value) -> str:
    """The output line of ``line``: its object with ``key`` added (``value``
    as JSON: no NaN or Infinity). The line's own text is kept as the file
    wrote it: read back and written again, a number such as 1e400 would
    become Infinity, and 12345678901234567.5 would lose digits."""
    added = f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False, allow_nan=False)}"
    # (JSON whitespace is all str.strip takes off: the text starts and ends
    # with the value's own quote or brace.)
    # A "\r" inside a line can only be whitespace between JSON values (a
    # string may not hold one raw); written as is, text-mode readers would
    # take it for a line break.
    text = line.text.strip().replace("\r", " ")
    if text.startswith('"'):  # a string: the prompt
        return f'{{"prompt": {text}, {added}}}'
    # An object: its last "}" closes it, and it has a key ("prompt" or "messages") before the new one.
    return f"{text[:-1].rstrip()}, {added}}}"


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
