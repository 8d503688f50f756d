"""Text in, text out: a model and its tokenizer together.

``llada.generate``, ``llada.stream`` and ``llada.infill`` work on token ids.
An :class:`Engine` takes and returns strings: it applies the chat template,
tokenizes, left-pads batches of prompts (masking the padding out), and
decodes each answer up to its first EOS/EoT. The decoding itself is theirs,
with their arguments and their errors.
"""

from __future__ import annotations

import inspect
import os
import re
import uuid
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from .checkpoint import load_model, load_tokenizer
from .likelihood import log_likelihood
from .model import LLaDAModel, llada_model_of
from .sampler import BlockEvent, DecodeStats, check_row_keys, infill, stream
from .token_ids import is_int

# A prompt: text, or (for chat) a conversation of {"role": ..., "content": ...} messages.
Prompt = Union[str, Sequence[dict]]


def load(path: Union[str, os.PathLike, None] = None, *, device=None, dtype: Optional[torch.dtype] = None
         ) -> "Engine":
    """An :class:`Engine` for the checkpoint folder at ``path`` (default: the
    small code model bundled with llada), loaded as :func:`llada.load_model`
    does (device: CUDA when available; dtype: bfloat16 on CUDA, float16 on
    GPUs before compute capability 8.0, float32 on CPU)."""
    if path is None:
        from .train import default_model_path

        path = default_model_path()
    # The tokenizer first: a folder without one fails in a moment, not after
    # reading every weight (for LLaDA-8B, minutes and 16 GB).
    tokenizer = load_tokenizer(path)
    check_chat_template(tokenizer)
    return Engine(load_model(path, device=device, dtype=dtype), tokenizer)


class Engine:
    """A :class:`LLaDAModel` (or what ``torch.compile`` made of one) and its
    tokenizer (see :func:`load`)."""

    def __init__(self, model: LLaDAModel, tokenizer):
        if llada_model_of(model) is None:
            raise TypeError(f"model: expected a LLaDAModel, got {type(model).__name__}")
        if not callable(getattr(tokenizer, "apply_chat_template", None)):
            raise TypeError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
        check_chat_template(tokenizer)
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.stop_ids = {config.eos_token_id, config.eot_token_id} - {None}
        self.pad_id = config.eos_token_id  # masked out: any id but the mask would do

    def token_ids(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False
                  ) -> list[int]:
        """The ids the tokenizer makes of ``text`` as it stands (no chat
        template; the special tokens it adds around a text, e.g. BOS, only
        with ``add_special_tokens``)."""
        # verbose=False: no warning from transformers that the text is longer
        # than the model's context; every caller checks the length and names
        # what is too long.
        options = dict(split_special_tokens=True) if split_special_tokens else {}  # else the tokenizer's own
        return self.tokenizer(text, add_special_tokens=add_special_tokens, verbose=False, **options)["input_ids"]

    def encode(self, prompt: Prompt, chat: bool = False, system: Optional[str] = None) -> list[int]:
        """The prompt's token ids. With ``chat``, the prompt goes through the
        chat template, ready for the assistant's answer: a str as one user
        turn, or a conversation (a list of ``{"role": ..., "content": ...}``
        messages, e.g. earlier turns) as it stands; ``system`` adds a system
        message first."""
        self._check_encode_options(chat, system)
        return self._encode_prompt(prompt, chat, system)

    def _check_encode_options(self, chat: bool, system: Optional[str]) -> None:
        """What :meth:`encode` checks whatever the prompt: a list of prompts
        checks it once, and its errors name no prompt."""
        if not chat:
            if system is not None:
                raise ValueError("system: a system message needs chat=True")
            return
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat: the tokenizer has no chat template (a base model?); "
                             "leave chat off to use the text as it stands")
        if system is not None:
            if not isinstance(system, str):
                raise TypeError(f"system: expected a str, got {type(system).__name__}")
            _check_unicode("system", system)

    def _encode_prompt(self, prompt: Prompt, chat: bool, system: Optional[str]) -> list[int]:
        """:meth:`encode` once :meth:`_check_encode_options` passed: what
        fails from here fails for this prompt."""
        if not chat:
            if _is_conversation(prompt):
                raise ValueError("prompt: a conversation (a list of messages) needs chat=True")
            if not isinstance(prompt, str):
                raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
            _check_unicode("prompt", prompt)
            return self.token_ids(prompt, add_special_tokens=True)
        messages = _messages(prompt)
        # A role is plain text too. Refused rather than hidden as a message's
        # text is: a template compares it ("user", "assistant").
        special, _ = self._special_tokens()
        for i, message in enumerate(messages):
            found = special.search(message["role"]) if special is not None else None
            if found is not None:
                raise ValueError(f"prompt[{i}]: role: expected plain text, got {message['role']!r}, which spells "
                                 f"the special token {found.group()!r}")
        if system is not None:
            if any(message["role"] == "system" for message in messages):
                raise ValueError("system: the conversation already has a system message")
            messages = [{"role": "system", "content": system}] + messages
        return self._chat_ids(messages)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        """The ids of ``messages`` through the chat template, ready for the
        assistant's answer."""
        # A message's text is plain text: one that spells a special token (a
        # user writing "<|eot_id|>") must not end its turn or hold the mask.
        # Each such spelling goes through the template as a marker, and is
        # tokenized on its own with special tokens split.
        spelled: list[str] = []
        tag = f"\ue000{uuid.uuid4().hex}"  # private-use: no template or text gives it meaning

        def hide(match: re.Match) -> str:
            spelled.append(match.group())
            return f"{tag}{len(spelled) - 1}\ue001"

        special, special_ids = self._special_tokens()
        if special is not None:
            messages = [dict(message, content=special.sub(hide, message["content"])) for message in messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:
            from jinja2 import TemplateError

            if not isinstance(e, TemplateError):
                raise
            # Templates raise on what they do not take (e.g. roles out of order).
            raise ValueError(f"chat: the tokenizer's chat template failed on this conversation: "
                             f"{type(e).__name__}: {e}") from None
        if not spelled:
            return self.token_ids(text)
        # A template may leave a message out or repeat it (its markers with
        # it), but one that changed a marker would leave its text behind.
        marker = re.compile(f"{tag}(\\d+)\ue001", re.IGNORECASE)
        parts = marker.split(text)
        if any(re.search(tag, part, re.IGNORECASE) for part in parts[::2]):
            raise ValueError("chat: the tokenizer's chat template changed the messages' text where it spells "
                             "special tokens; those messages cannot be kept as plain text")
        ids = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                ids += self.token_ids(part) if part else []
            else:
                plain = self.token_ids(spelled[int(part)], split_special_tokens=True)
                if special_ids.intersection(plain):  # e.g. a word-level vocabulary's own word
                    raise ValueError(f"chat: a message spells the special token {spelled[int(part)]!r}, "
                                     f"which this tokenizer cannot tokenize as plain text")
                ids += plain
        # Tokenized in parts, the text must stay the template's: a tokenizer
        # that marks where each text starts (a sentencepiece-style one adds
        # a space there) would change it.
        whole = "".join(part if i % 2 == 0 else spelled[int(part)] for i, part in enumerate(parts))
        as_text = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if self.tokenizer.decode(ids, **as_text) != self.tokenizer.decode(
                self.token_ids(whole), **as_text):
            raise ValueError(f"chat: a message spells the special token {spelled[0]!r}, which this tokenizer "
                             f"cannot keep as plain text without changing the text around it")
        return ids

    def _special_tokens(self) -> tuple[Optional[re.Pattern], set[int]]:
        """A pattern matching the text of every special token (None if there
        is none), and their ids; read again when special tokens are added."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        listed = getattr(self.tokenizer, "all_special_tokens", ())
        key = (len(decoder), len(listed))
        if getattr(self, "_specials_key", None) != key:
            special = {i: str(token) for i, token in decoder.items() if getattr(token, "special", False)}
            texts = sorted({t for t in [*special.values(), *listed] if t}, key=len, reverse=True)  # longest first
            pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
            ids = set(special) | set(getattr(self.tokenizer, "all_special_ids", ()))
            self._specials, self._specials_key = (pattern, ids), key
        return self._specials

    def _encode_named(self, prompt: Prompt, chat: bool, system: Optional[str], index: Optional[int]) -> list[int]:
        """:meth:`_encode_prompt`, its errors naming ``prompts[index]`` when
        the prompt is one of a list: "prompt: ..." and "prompt[2]: ..." become
        "prompts[index]: ..." and "prompts[index][2]: ...", and an error naming
        another argument for this prompt ("system: ...", "chat: ...") is
        located in it, as "prompts[index]: system: ..."."""
        try:
            return self._encode_prompt(prompt, chat, system)
        except (TypeError, ValueError) as e:
            # llada's own errors are plain TypeError/ValueError; a subclass
            # (e.g. UnicodeDecodeError) is someone else's, and goes on as it is.
            if index is None or type(e) not in (TypeError, ValueError):
                raise
            message = str(e)
            if message.startswith("prompt"):
                named = f"prompts[{index}]{message[len('prompt'):]}"
            elif message.startswith(("system: ", "chat: ")):
                named = f"prompts[{index}]: {message}"
            else:
                raise
            raise type(e)(named) from None

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        """The text of generated ids (a list, any iterable of ints, or a 1-D
        tensor) up to the first EOS/EoT, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
                raise ValueError(f"ids: expected a 1-D tensor of token ids, got {ids.dtype} {tuple(ids.shape)}")
            ids = ids.tolist()
        if isinstance(ids, str):
            raise TypeError(f"ids: expected token ids (ints >= 0), got {ids!r}")
        try:
            ids = list(ids)  # once: an iterator checked, then read again, would be empty
        except TypeError:
            raise TypeError(f"ids: expected token ids (ints >= 0), got {type(ids).__name__}") from None
        if not all(is_int(t) and t >= 0 for t in ids):
            raise TypeError(f"ids: expected token ids (ints >= 0), got {ids!r}")
        ids = [int(t) for t in ids]
        # (An id below it that the tokenizer lacks has no text: the tokenizer skips it.)
        vocab = self.model.config.embedding_size
        if any(t >= vocab for t in ids):
            raise ValueError(f"ids: token ids must lie in [0, {vocab}), got {max(ids)}")
        for i, token in enumerate(ids):
            if token in self.stop_ids:
                ids = ids[:i]
                break
        return self._text(ids)

    def _text(self, ids: list[int]) -> str:
        # No clean-up of spaces: it would change the model's text (" ," is
        # code too), and a streamed answer's pieces would not join to it.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], *, chat: bool = False,
                 system: Optional[str] = None, batch_size: int = 8, by_length: bool = True,
                 stop: Union[str, Sequence[str]] = (), stats: Optional[DecodeStats] = None,
                 row_keys: Optional[Sequence[int]] = None, **options) -> Union[str, list[str]]:
        """The answer to a prompt, or the answers to a list of prompts in order.
        A prompt is a str or, with ``chat``, a conversation (see :meth:`encode`,
        which ``system`` goes to).

        A list is decoded ``batch_size`` prompts at a time, each batch
        left-padded to its longest prompt. With ``by_length`` (the default)
        the batches are formed longest prompt first, so that prompts of
        similar lengths share a batch and little of it is padding; otherwise
        in the list's order. With a temperature, a prompt's sampling noise
        is keyed by its index in the list, or by its key in ``row_keys``
        (ints >= 0, one per prompt; a list of one for a single prompt), as
        :func:`llada.generate`'s ``row_keys``: it depends on the seed and
        that key, not on ``batch_size`` nor on the prompts that share its
        batch (but 'random' ranking draws for each batch as a whole). In
        bfloat16 or float16 a prompt's left padding and its batch's shape
        change roundings, which can change its answer even at temperature 0
        (``batch_size=1`` avoids it); in float32 they differ too little to
        change an answer except at near ties. An answer ends at its first EOS/EoT
        and before the first of the ``stop`` strings it holds, and its row
        costs no forward after the block that completes that end.
        ``options`` are the decoding arguments of :func:`llada.stream` (those
        of :func:`llada.generate` but ``on_step`` and ``return_stats``:
        ``steps``, ``gen_length``, ``block_length``, ``temperature``,
        ``cfg_scale``, ``remasking``, ``seed``, ``policy``, ...). A
        :class:`DecodeStats` passed as ``stats`` gathers the work of every
        batch.
        """
        single = isinstance(prompts, str) or _is_conversation(prompts)
        texts = [prompts] if single else _prompt_list(prompts)
        if not _is_positive_int(batch_size):
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(by_length, bool):
            raise TypeError(f"by_length: expected a bool, got {type(by_length).__name__}")
        stop = _stop_strings(stop)
        _check_stats(stats)
        # Every prompt is encoded and checked first: a bad one fails before any decoding.
        self._check_encode_options(chat, system)
        encoded = [self._encode_named(text, chat, system, None if single else i) for i, text in enumerate(texts)]
        gen_length = options.get("gen_length", _STREAM_DEFAULTS["gen_length"])
        self._check_prompts(encoded, gen_length, "prompt" if single else "prompts")
        if row_keys is None:
            row_keys = range(len(texts))
        # Checked for the whole list here, so that an error names the
        # prompt's own index (a bad gen_length is left to the decoding).
        row_keys = check_row_keys(row_keys, len(texts), gen_length if _is_positive_int(gen_length) else 1, "prompt")
        order = list(range(len(texts)))
        if by_length:
            order.sort(key=lambda i: -len(encoded[i]))  # stable: equal lengths keep their order
        answers = [""] * len(texts)
        for first in range(0, len(order), batch_size):
            batch = order[first: first + batch_size]
            keys = [row_keys[i] for i in batch]
            for i, answer in zip(batch, self._answer_batch([encoded[i] for i in batch], stop, stats,
                                                           dict(options, row_keys=keys))):
                answers[i] = answer
        return answers[0] if single else answers

    def prompt_problem(self, ids: list[int], gen_length, gen_length_name: str = "gen_length") -> Optional[str]:
        """What is wrong with an encoded prompt for an answer of
        ``gen_length`` tokens (named ``gen_length_name`` in the message), or
        None: it holds the mask token, or it and the answer exceed the
        model's context (a bad ``gen_length`` is left to the decoding to name)."""
        config = self.model.config
        max_len, mask_id = config.max_sequence_length, config.mask_token_id
        if mask_id in ids:
            return f"the text holds the mask token ({mask_id}), which only gaps may; fill gaps with infill or fill"
        # A numpy int too; added as a Python int, which cannot wrap around.
        if is_int(gen_length) and max_len is not None and len(ids) + int(gen_length) > max_len:
            return (f"{len(ids)} tokens and {gen_length_name} {gen_length} exceed the model's "
                    f"max_sequence_length {max_len}")
        return None

    def _check_prompts(self, encoded: list[list[int]], gen_length, name: str) -> None:
        for i, ids in enumerate(encoded):
            if (problem := self.prompt_problem(ids, gen_length)) is not None:
                raise ValueError(f"{name if name == 'prompt' else f'{name}[{i}]'}: {problem}")

    def _answer_batch(self, rows: list[list[int]], stop: tuple[str, ...], stats: Optional[DecodeStats],
                      options: dict) -> list[str]:
        """The answers to a batch of encoded prompts. A row stops costing
        forwards once a finished block holds its end (EOS/EoT or a stop
        string): blocks are final once finished, so what later blocks would
        decode can no longer change its answer."""
        prompt, attention_mask = self._pad(rows)
        answers: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        events = stream(self.model, prompt, attention_mask, stats=stats, **options)
        try:
            for event in events:
                if not isinstance(event, BlockEvent):
                    continue
                ending = [False] * len(rows)
                finished = event.finished.tolist()
                for r, tokens in enumerate(event.tokens.tolist()):
                    if done[r]:
                        continue
                    answers[r] += tokens
                    ending[r] = (bool(self.stop_ids.intersection(tokens))
                                 or (bool(stop) and cut_at_stop(self.decode(answers[r]), stop)[1]))
                    done[r] = ending[r] or finished[r]
                if all(done):
                    break
                if any(ending):
                    event.stop_rows(torch.tensor(ending))
        finally:
            events.close()
        return [cut_at_stop(self.decode(ids), stop)[0] for ids in answers]

    def stream(self, prompt: Prompt, *, chat: bool = False, system: Optional[str] = None,
               stop: Union[str, Sequence[str]] = (), stats: Optional[DecodeStats] = None,
               **options) -> Iterator[str]:
        """The answer to one prompt (see :meth:`encode` for ``chat`` and
        ``system``), piece by piece: each piece is the text a
        finished block added, so the pieces join to :meth:`generate`'s answer.
        It ends at the first EOS/EoT, or before the first of the ``stop``
        strings, without decoding further blocks. ``options`` are
        :func:`llada.stream`'s."""
        stop = _stop_strings(stop)
        _check_stats(stats)
        encoded = self.encode(prompt, chat, system)
        self._check_prompts([encoded], options.get("gen_length", _STREAM_DEFAULTS["gen_length"]), "prompt")
        ids = torch.tensor([encoded], dtype=torch.long)
        answer, shown = [], ""
        events = stream(self.model, ids, stats=stats, **options)
        try:
            for event in events:
                if not isinstance(event, BlockEvent):
                    continue
                answer += event.tokens[0].tolist()
                text, stopped = cut_at_stop(self.decode(answer), stop)
                if stopped or self.stop_ids.intersection(event.tokens[0].tolist()):
                    break
                ready = _final_part(text, stop)
                if len(ready) > len(shown):
                    yield ready[len(shown):]
                    shown = ready
        finally:
            events.close()
        rest = cut_at_stop(self.decode(answer), stop)[0][len(shown):]
        if rest:
            yield rest

    def infill(self, prefix: str, suffix: str, length: int, *, stats: Optional[DecodeStats] = None,
               **options) -> str:
        """The text of ``length`` tokens generated between ``prefix`` and
        ``suffix`` (neither changes; the model attends to both), EOS/EoT
        tokens dropped, such that ``prefix + text + suffix`` reads as the
        whole: ``fill([prefix, length, suffix])[0]``."""
        for name, text in (("prefix", prefix), ("suffix", suffix)):
            if not isinstance(text, str):
                raise TypeError(f"{name}: expected a str, got {type(text).__name__}")
            _check_unicode(name, text)
        if not is_int(length):
            raise TypeError(f"length: expected a positive int, got {type(length).__name__}")
        return self._fill([prefix, length, suffix], ("prefix", "length", "suffix"), "length", "prefix/suffix",
                          stats, options)[0]

    def fill(self, parts: Sequence[Union[str, int]], *, stats: Optional[DecodeStats] = None,
             **options) -> list[str]:
        """Fills the gaps of a template, e.g. ``["def f(x):\n    return ", 8,
        "\n\nprint(f(", 3, "))\n"]``: each str is fixed text (tokenized on
        its own, never changed), each int a gap of that many tokens. The
        model fills every gap at once, attending to all of the text (after
        the ids the tokenizer starts an encoded text with, e.g. BOS). Returns
        the gaps' texts in order, EOS/EoT tokens dropped, each with the
        separators its decoder puts at its seams: the parts, gaps replaced
        by their texts, join to the whole text (a character whose tokens two
        gaps share is the later gap's). ``options`` are
        :func:`llada.infill`'s (``steps``: default one token per step;
        ``block_length``: default all the gaps in one block)."""
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"parts: expected a list of str and int, got {type(parts).__name__}")
        return self._fill(parts, [f"parts[{i}]" for i in range(len(parts))], "parts", "parts", stats, options)

    def _fill(self, parts, names: Sequence[str], whole: str, texts_name: str, stats, options) -> list[str]:
        """:meth:`fill`, with ``names`` naming each part in errors, ``whole``
        the argument a template too long for the model is blamed on, and
        ``texts_name`` the one blamed when its texts alone leave no room
        for its gaps."""
        _check_stats(stats)
        mask_id = self.model.config.mask_token_id
        # The canvas starts as an encoded prompt does (e.g. with BOS): the
        # model reads text after it, as when generating.
        lead = self._leading_special_ids()
        pieces, strings = [lead], [""]  # token ids or a gap's length; the caller's text, None for a gap
        for part, name in zip(parts, names):
            if isinstance(part, str):
                _check_unicode(name, part)
                ids = self.token_ids(part)
                if mask_id in ids:  # it would be filled as one more gap
                    raise ValueError(f"{name}: the text holds the mask token ({mask_id}), which only gaps may")
                pieces.append(ids)
            elif is_int(part):
                if part < 1:
                    raise ValueError(f"{name}: expected a positive number of tokens (a gap's length), got {part}")
                pieces.append(int(part))
            else:
                raise TypeError(f"{name}: expected a str or a positive int (a gap's length), got {part!r}")
            strings.append(None if is_int(part) else part)
        is_gap = [string is None for string in strings]
        if not any(is_gap):
            raise ValueError("parts: holds no gap (a positive int) to fill")
        sizes = [piece if gap else len(piece) for piece, gap in zip(pieces, is_gap)]
        max_len = self.model.config.max_sequence_length
        texts, gaps = sum(size for size, gap in zip(sizes, is_gap) if not gap), sum(is_gap)
        if texts + gaps > max_len:  # not even one token per gap fits: no gap length is to blame
            raise ValueError(f"{texts_name}: the texts make {texts} tokens, which leave no room for "
                             f"{'a gap' if gaps == 1 else f'{gaps} gaps'} in the model's max_sequence_length {max_len}")
        if sum(sizes) > max_len:  # checked before the masks are laid out: a gap may be huge
            raise ValueError(f"{whole}: text and gaps make {sum(sizes)} tokens, more than the model's "
                             f"max_sequence_length {max_len}")
        canvas = [token for piece, gap in zip(pieces, is_gap) for token in ([mask_id] * piece if gap else piece)]
        out, work = infill(self.model, torch.tensor(canvas, dtype=torch.long), return_stats=True, **options)
        if stats is not None:
            stats.add(work)
        start = 0
        for i, size in enumerate(sizes):
            if is_gap[i]:
                pieces[i] = [t for t in out[start: start + size].tolist() if t not in self.stop_ids]
            start += size
        return self._gap_texts(pieces, strings)

    def _gap_texts(self, pieces: list[list[int]], strings: list[Optional[str]]) -> list[str]:
        """The text of each gap (``strings[i]`` None; else the caller's text
        of ``pieces[i]``) as it reads between the caller's texts. A decoder
        may put a separator at a seam (a word-level one a space between two
        words) that decoding a gap alone drops. So a gap's text is the text
        decoded through it less the texts before it, with the separator the
        next (non-empty) text gets: the caller's texts and the gaps' texts
        join to the whole text decoded. Where the decoder does not give back
        the caller's texts before a gap as they are (a double space, say), a
        gap's text is its tokens decoded alone with the separators a decoder
        puts at its two seams, each found from the gap and its neighbour (a
        gap with no tokens of its own: from the tokens on either side).
        A gap's text ends where a character does: a character whose bytes
        (byte-level tokens) two gaps share is the text of the later one."""
        decoded = [self._text([t for piece in pieces[: i + 1] for t in piece]) for i in range(len(pieces))]
        whole = decoded[-1]
        joined, texts = "", []
        for i, string in enumerate(strings):
            if string is not None:
                joined += string
                continue
            if decoded[i].startswith(joined):
                text = decoded[i][len(joined):]
                # Decoded up to the gap's end, a character whose last bytes
                # the next gap holds reads as U+FFFD; the whole text has it.
                end = len(text)
                while end and text[end - 1] == "\ufffd" and not whole.startswith(joined + text[:end]):
                    end -= 1
                if whole.startswith(joined + text[:end]):
                    text = text[:end]
            else:
                previous = next((pieces[j] for j in range(i - 1, -1, -1) if pieces[j]), [])
                text = self._seam(previous, pieces[i]) + self._text(pieces[i])
            after = next((j for j in range(i + 1, len(strings)) if strings[j] != ""), None)
            if after is not None and strings[after] is not None:
                before, rest, given = joined + text, decoded[after], strings[after]
                if rest.startswith(before) and rest.endswith(given) and len(rest) - len(given) >= len(before):
                    text += rest[len(before): len(rest) - len(given)]
                else:
                    # A gap filled with EOS only has no tokens of its own: the
                    # texts on its two sides meet there, with their separator.
                    left = next((pieces[j] for j in range(i, -1, -1) if pieces[j]), [])
                    text += self._seam(left, pieces[after])
            texts.append(text)
            joined += text
        return texts

    def _seam(self, left: list[int], right: list[int]) -> str:
        """What the decoder puts between the texts of ``left`` and ``right``
        when it decodes them together (a word-level one: a space); "" where
        decoding them together is not their two texts with something between."""
        if not left or not right:
            return ""
        first, second, both = self._text(left), self._text(right), self._text(left + right)
        if both.startswith(first) and both.endswith(second) and len(both) >= len(first) + len(second):
            return both[len(first): len(both) - len(second)]
        return ""

    def _leading_special_ids(self) -> list[int]:
        """The ids the tokenizer puts before a text's own (e.g. BOS)."""
        for probe in ("a", "0", ".", "x y"):
            plain = self.token_ids(probe)
            if plain:  # a text that tokenizes to something, to find it in the full ids
                full = self.token_ids(probe, add_special_tokens=True)
                starts = [i for i in range(len(full) - len(plain) + 1) if full[i: i + len(plain)] == plain]
                return full[: starts[0]] if starts else []
        return []

    def log_likelihood(self, prompt: Prompt, answer: str, *, chat: bool = False, system: Optional[str] = None,
                       **options) -> float:
        """An estimate of log p(answer | prompt) (the prompt as :meth:`encode`
        makes it; the answer's text tokenized as it stands). ``options`` are
        :func:`llada.log_likelihood`'s (``mc_num``, ``batch_size``,
        ``cfg_scale``, ``seed``)."""
        if not isinstance(answer, str):
            raise TypeError(f"answer: expected a str, got {type(answer).__name__}")
        _check_unicode("answer", answer)
        answer_ids = self.token_ids(answer)
        return log_likelihood(self.model, self.encode(prompt, chat, system), answer_ids, **options)

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids [B, Lp] and the attention mask marking the real tokens."""
        width = max(len(row) for row in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(row)) + row for row in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
        return ids, mask


def check_chat_template(tokenizer) -> None:
    """A tokenizer's chat template, where it has one, is Jinja text (or, as
    transformers reads a list of named templates, a dict of them): anything
    else fails only when first applied, with a message naming neither."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None or isinstance(template, str):
        return
    if isinstance(template, dict) and all(isinstance(t, str) for t in template.values()):
        return
    shown = repr(template) if len(repr(template)) <= 60 else f"{repr(template)[:57]}..."
    raise ValueError(f'tokenizer: its chat template (tokenizer_config.json\'s "chat_template"): expected Jinja '
                     f"template text (a string), got {type(template).__name__} {shown}")


def _prompt_list(prompts) -> list[Prompt]:
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a str, a conversation or a list of them, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    for i, prompt in enumerate(prompts):
        if not (isinstance(prompt, str) or _is_conversation(prompt)):
            raise TypeError(f"prompts[{i}]: expected a str or a conversation (a list of messages), "
                            f"got {type(prompt).__name__}")
    return list(prompts)


def _is_conversation(prompt) -> bool:
    """A list of messages (dicts), rather than a list of prompts."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def _messages(prompt) -> list[dict]:
    """The chat messages of a prompt: a str is one user turn; a conversation
    is checked (each message a dict with str "role" and "content")."""
    if isinstance(prompt, str):
        _check_unicode("prompt", prompt)
        return [{"role": "user", "content": prompt}]
    if not _is_conversation(prompt):
        raise TypeError(f"prompt: expected a str or a conversation (a non-empty list of messages), got {prompt!r}")
    for i, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise TypeError(f'prompt[{i}]: expected a message {{"role": str, "content": str}}, got {message!r}')
        _check_unicode(f"prompt[{i}]: role", message["role"])
        _check_unicode(f"prompt[{i}]", message["content"])
    return [dict(message) for message in prompt]


def _check_unicode(name: str, text: str) -> None:
    """Text is a string of characters: a lone surrogate ("\ud800", half of a
    UTF-16 pair) is none, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: not valid Unicode text (a lone surrogate at index {e.start})") from None


def _stop_strings(stop) -> tuple[str, ...]:
    given = stop
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
        raise TypeError(f"stop: expected a non-empty str or a list of them, got {given!r}")
    return tuple(stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first of the ``stop`` strings in it, and whether one was."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def _final_part(text: str, stop: tuple[str, ...]) -> str:
    """What of a growing answer's text can be shown: not a trailing partial
    character (a byte-level token may end mid-character), nor a trailing
    start of a stop string, which the next block may complete."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for k in range(min(end, max((len(s) for s in stop), default=1) - 1), 0, -1):
        if any(s.startswith(text[end - k:end]) for s in stop):
            end -= k
            break
    return text[:end]


# llada.stream's defaults, for the checks made before it runs.
_STREAM_DEFAULTS = {name: p.default for name, p in inspect.signature(stream).parameters.items()}


def _is_positive_int(value) -> bool:
    return is_int(value) and value >= 1


def _check_stats(stats) -> None:
    if stats is not None and not isinstance(stats, DecodeStats):
        raise TypeError(f"stats: expected a DecodeStats or None, got {type(stats).__name__}")
