"""Tokenizers for the models we train ourselves, written in the Hugging Face
format that :func:`llada.checkpoint.load_tokenizer` reads.

Two kinds:

- :func:`train_bpe`: a byte-level BPE learned from text with the ``tokenizers``
  library (the default code model). Byte-level means any string encodes, and
  decoding gives back the exact text, whitespace included (code needs that).
- :func:`word_tokenizer`: a fixed word-level vocabulary for the synthetic
  tasks, where every symbol is one whitespace-separated token.

Both put the four LLaDA special tokens first (ids 0..3, see
``SPECIAL_ORDER``), and :func:`write_tokenizer_files` writes tokenizer.json,
tokenizer_config.json and special_tokens_map.json beside a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .checkpoint import CHAT_TEMPLATE, SPECIAL_TOKENS
from .token_ids import is_int

# Fixed ids 0..3, so a model's config never depends on what BPE learned.
SPECIAL_ORDER = ("bos", "eos", "mask", "eot")
SPECIAL_LIST = [SPECIAL_TOKENS[kind] for kind in SPECIAL_ORDER]
UNKNOWN = "<|unk|>"


def _add_bos_post_processor(tok) -> None:
    """Prepend BOS when ``add_special_tokens`` is on (the task tokenizers:
    every task row starts with BOS, so prompts must too)."""
    from tokenizers import processors

    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` learned from ``texts``.

    ``vocab_size`` counts everything: the special tokens, the 256 byte tokens
    and the merges; ``min_frequency`` (an int >= 0) is the fewest times a pair
    must occur to be merged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(texts, (str, bytes)):  # iterating it would train on its characters
        raise TypeError("texts: expected an iterable of texts, got one text")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_LIST):
        raise ValueError(f"vocab_size: expected an int >= {256 + len(SPECIAL_LIST)}, got {vocab_size!r}")
    if not is_int(min_frequency):
        raise TypeError(f"min_frequency: expected an int >= 0, got {type(min_frequency).__name__}")
    if min_frequency < 0:
        raise ValueError(f"min_frequency: expected an int >= 0, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # tokenizers counts in 64 bits; no pair occurs more often than that.
        min_frequency=min(int(min_frequency), 2**64 - 1),
        special_tokens=SPECIAL_LIST,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # No BOS post-processor: pretraining windows start anywhere in a file, so
    # a bare prompt like "def f(x):" is what the model saw most; BOS marks
    # file starts inside the token stream instead (see llada.train).
    return tok


def word_tokenizer(words: Iterable[str]):
    """A word-level tokenizer: special tokens, an unknown token, then ``words``
    in order. Text is split on whitespace; decoding joins with single spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if isinstance(words, (str, bytes)):  # iterating it would make its characters the words
        raise TypeError("words: expected an iterable of words, got one str")
    vocab = {}
    for word in [*SPECIAL_LIST, UNKNOWN, *words]:
        if not isinstance(word, str) or not word or any(c.isspace() for c in word):
            raise ValueError(f"words: each must be a non-empty str without whitespace, got {word!r}")
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_LIST)
    _add_bos_post_processor(tok)
    return tok


def special_ids(tok) -> dict[str, int]:
    """{'bos', 'eos', 'mask', 'eot'} -> id in a ``tokenizers.Tokenizer``."""
    ids = {kind: tok.token_to_id(SPECIAL_TOKENS[kind]) for kind in SPECIAL_ORDER}
    missing = [SPECIAL_TOKENS[k] for k, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer: special token(s) {missing} are missing")
    return ids


def write_tokenizer_files(folder: str | os.PathLike, tok, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, the
    files (and fields) :func:`llada.checkpoint.load_tokenizer` expects."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special_ids(tok)  # fail early on a tokenizer without the special tokens
    tok.save(str(folder / "tokenizer.json"))
    special_map = {
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["eos"],  # LLaDA pads with EOS
        "mask_token": SPECIAL_TOKENS["mask"],
    }
    config = dict(
        special_map,
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=int(model_max_length),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        with open(folder / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def read_tokenizer(folder: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of a checkpoint folder (tokenizer.json)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception that does not name the file
        raise ValueError(f"{path}: not a readable tokenizer ({e})") from None


__all__ = [
    "SPECIAL_ORDER",
    "read_tokenizer",
    "special_ids",
    "train_bpe",
    "word_tokenizer",
    "write_tokenizer_files",
]
