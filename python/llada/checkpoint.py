"""Hugging Face LLaDA folders: read them (config, weights, tokenizer) and write
random ones in the same format for tests and benchmarks.

A folder holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and the tokenizer files. Weights go one
tensor at a time onto the target device and dtype, into a model built on the
meta device, so a model never exists twice in memory. On the CPU a weight whose
file dtype is the target dtype is not copied at all: it stays a view of the
file's memory map, read as it is used (see :func:`load_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .model import LLaDAConfig, LLaDAModel, count_parameters, pack_projections
from .token_ids import is_int

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Config keys whose value selects a feature: the values we implement, and the
# official code's default (configuration_llada.ModelConfig), which is what a
# missing key means there. A key whose default we do not implement must be
# given: running LLaDA-8B's value in its place would run another model. Any
# other value is rejected rather than silently ignored.
SUPPORTED_VALUES = {
    # key: (supported values, official default)
    "alibi": ((False,), False),
    "block_type": (("llama",), "sequential"),
    "block_group_size": ((1,), 1),
    "include_bias": ((False,), False),
    "include_qkv_bias": ((False,), False),
    "bias_for_layer_norm": ((False, None), None),
    "layer_norm_type": (("rms",), "default"),  # "default" is LayerNorm, mean subtracted
    "layer_norm_with_affine": ((True,), True),
    "attention_layer_norm": ((False,), False),
    "activation_type": (("silu",), "swiglu"),
    "rope": ((True,), False),
    "rope_full_precision": ((True,), True),
    "scale_logits": ((False,), False),
    "input_emb_norm": ((False,), False),
    "clip_qkv": ((None,), None),
    # True: one key/value head; None: n_kv_heads says (see config_from_dict).
    "multi_query_attention": ((None, False, True), None),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

SPECIAL_TOKENS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "eot": "<|eot_id|>",
    "mask": "<|mdm_mask|>",
}


# --------------------------------------------------------------------------
# config.json <-> LLaDAConfig
# --------------------------------------------------------------------------


def config_from_dict(raw: dict, eot_token_id: Optional[int] = None, source: str = "config.json") -> LLaDAConfig:
    """Validate a config.json dict and turn it into an :class:`LLaDAConfig`.

    An optional key that is missing or null takes the official code's
    default (configuration_llada.ModelConfig's: max_sequence_length 1024,
    embedding_size 50304, rope_theta 10000.0, ...; its model reads a null
    embedding_size as vocab_size, and so do we), except the special token
    ids, which take LLaDA-8B's, as the errors about them say. A feature key
    whose default we do not implement must be given (see
    ``SUPPORTED_VALUES``). ``eot_token_id`` is the id of ``<|eot_id|>`` in
    tokenizer.json, used when config.json has no ``eot_token_id`` (LLaDA's
    has none). ``source`` names ``raw`` in errors.
    """
    if not isinstance(raw, Mapping):
        raise TypeError(f"raw: expected a dict (the JSON object of {source}), got {type(raw).__name__}")
    if eot_token_id is not None and not is_int(eot_token_id):
        raise TypeError(f"eot_token_id: expected None or an int, got {eot_token_id!r}")
    if eot_token_id is not None and eot_token_id < 0:
        raise ValueError(f"eot_token_id: expected None or an int >= 0, got {eot_token_id}")
    model_type = raw.get("model_type", "llada")
    if model_type != "llada":
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (expected 'llada')")
    for key, (allowed, default) in SUPPORTED_VALUES.items():
        supported = ", ".join(repr(a) for a in allowed)
        if key not in raw:
            if default not in allowed:
                raise ValueError(f"{source}: {key} is missing, which in the official LLaDA code means "
                                 f"{default!r}: not supported (supported: {supported})")
        # Types compared too: 1 == True in Python, but `1` is no JSON boolean.
        elif not any(raw[key] == a and type(raw[key]) is type(a) for a in allowed):
            raise ValueError(f"{source}: {key} = {raw[key]!r} is not supported (supported: {supported})")

    def given(key, required=False):
        value = raw.get(key)
        if value is None and required:
            raise ValueError(f"{source}: required key {key!r} is missing or null")
        return value

    def bad(key, expected):
        return ValueError(f"{source}: {key}: expected {expected}, got {raw[key]!r}")

    def integer(key, default=None, minimum=1, required=False):
        value = given(key, required)
        if value is None:
            return default
        # bool is an int in Python, but `true` is no size in JSON.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise bad(key, "a positive integer" if minimum else "a non-negative integer")
        return value

    def number(key, default, minimum, inclusive):
        value = given(key)
        if value is None:
            return default
        expected = f"a finite number {'>=' if inclusive else '>'} {minimum}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(key, expected)
        # No comparison holds for NaN; the upper bound rejects inf and ints beyond float range.
        if not ((minimum <= value if inclusive else minimum < value) and value <= sys.float_info.max):
            raise bad(key, expected)
        return float(value)

    def boolean(key, default):
        value = given(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad(key, "true or false")
        return value

    d_model = integer("d_model", required=True)
    n_heads = integer("n_heads", required=True)
    n_layers = integer("n_layers", required=True)
    vocab_size = integer("vocab_size", required=True)
    mlp_hidden_size = integer("mlp_hidden_size")
    if mlp_hidden_size is None:  # mlp_ratio counts only without mlp_hidden_size
        mlp_hidden_size = int(number("mlp_ratio", 4, 0, inclusive=False) * d_model)
        if mlp_hidden_size < 1:
            raise bad("mlp_ratio", f"a value that gives at least 1 hidden unit with d_model {d_model}")

    # Each special id with where it came from, so that an error blames the right source.
    def special_id(key, fallback=(None, None)):
        value = integer(key, minimum=0)
        return fallback if value is None else (value, f"{source}: {key} = {value}")

    def llada_8b(key, value):
        return value, f"{key} = {value} (the LLaDA-8B default; {source} gives no {key})"

    eos = special_id("eos_token_id", llada_8b("eos_token_id", 126081))
    ids = {
        "mask_token_id": special_id("mask_token_id", llada_8b("mask_token_id", 126336)),
        "eos_token_id": eos,
        "pad_token_id": special_id("pad_token_id", eos),  # LLaDA pads with EOS
        "bos_token_id": special_id("bos_token_id"),
        "eot_token_id": special_id(
            "eot_token_id", (eot_token_id, f"tokenizer.json: <|eot_id|> has id {eot_token_id}, which")),
    }

    # The official rule: multi_query_attention true means one key/value head,
    # false as many as query heads; giving n_kv_heads as well is an error there
    # unless the two agree.
    n_kv_heads = integer("n_kv_heads")
    multi_query = raw.get("multi_query_attention")
    if multi_query is not None:
        implied = 1 if multi_query else n_heads
        if n_kv_heads is not None and n_kv_heads != implied:
            raise ValueError(f"{source}: multi_query_attention = {multi_query!r} means {implied} key/value "
                             f"head(s), but n_kv_heads = {n_kv_heads}")
        n_kv_heads = implied
    elif n_kv_heads is None:
        n_kv_heads = n_heads

    # Missing is not null here: the official ModelConfig's default is 50304
    # rows (GPT-2's vocabulary padded), and its model reads a null as vocab_size.
    if "embedding_size" in raw:
        embedding_size = integer("embedding_size", vocab_size)
    elif vocab_size <= 50304:
        embedding_size = 50304
    else:
        raise ValueError(f"{source}: embedding_size is missing, which in the official LLaDA code means 50304 rows, "
                         f"fewer than vocab_size = {vocab_size}; give embedding_size (null means vocab_size)")

    fields = dict(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        n_layers=n_layers,
        mlp_hidden_size=mlp_hidden_size,
        vocab_size=vocab_size,
        embedding_size=embedding_size,
        max_sequence_length=integer("max_sequence_length", 1024),
        rope_theta=number("rope_theta", 10000.0, 0, inclusive=False),
        # The norm kernels accept 0; a negative eps can make the rsqrt NaN.
        rms_norm_eps=number("rms_norm_eps", 1e-5, 0, inclusive=True),
        weight_tying=boolean("weight_tying", True),
        extra=dict(raw),
        **{key: value for key, (value, _) in ids.items()},
    )
    # LLaDAConfig refuses these ids too, but would blame them on config.json
    # where they are LLaDA-8B defaults or come from tokenizer.json. An
    # embedding smaller than the vocabulary is its error to name first.
    if embedding_size >= vocab_size:
        for key, (value, origin) in ids.items():
            if value is not None and value >= embedding_size:
                raise ValueError(f"{origin} is outside the embedding ({embedding_size} rows)")
    try:
        return LLaDAConfig(**fields)
    except ValueError as e:  # sizes that do not fit together, e.g. d_model and n_heads
        raise ValueError(f"{source}: {e}") from None


def config_to_dict(cfg: LLaDAConfig) -> dict:
    """The config.json a LLaDA checkpoint with this shape carries."""
    if not isinstance(cfg, LLaDAConfig):
        raise TypeError(f"cfg: expected an LLaDAConfig, got {type(cfg).__name__}")
    raw = {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "attention_layer_norm": False,
        "block_type": "llama",
        "d_model": cfg.d_model,
        "embedding_size": cfg.embedding_size,
        "eos_token_id": cfg.eos_token_id,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": cfg.mask_token_id,
        "max_sequence_length": cfg.max_sequence_length,
        "mlp_hidden_size": cfg.mlp_hidden_size,
        "mlp_ratio": 4,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "n_layers": cfg.n_layers,
        "pad_token_id": cfg.pad_token_id,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": cfg.rope_theta,
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": cfg.vocab_size,
        "weight_tying": cfg.weight_tying,
    }
    if cfg.bos_token_id is not None:
        raw["bos_token_id"] = cfg.bos_token_id
    return raw


def save_weights(tensors: dict, path: Path) -> None:
    """A safetensors file with the permissions of any other new file (the
    umask's): safetensors itself makes it readable by its owner only."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read where the system tells it: setting it to read
    it back would make another thread's new files world-writable meanwhile."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # the safe value, for the moment it is set
    os.umask(umask)
    return umask


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; a file that does not parse, or holds
    something else, is a ValueError naming it (json's own error does not)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def _special_id_from_tokenizer(folder: Path, content: str) -> Optional[int]:
    """The id of an added token in tokenizer.json, read without a tokenizer."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    added = _read_json(path).get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(token, dict) for token in added):
        raise ValueError(f"{path}: added_tokens: expected a list of objects")
    for token in added:
        if token.get("content") == content:
            i = token.get("id")
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"{path}: added token {content!r}: expected a non-negative integer id, got {i!r}")
            return i
    return None


def load_config(path: str | os.PathLike) -> LLaDAConfig:
    """Read and validate ``config.json`` of a checkpoint folder.

    config.json has no EoT id; it is taken from ``<|eot_id|>`` in tokenizer.json.
    """
    folder = _folder(path)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; a LLaDA checkpoint folder needs {CONFIG_FILE}")
    return config_from_dict(_read_json(file), _special_id_from_tokenizer(folder, SPECIAL_TOKENS["eot"]))


def _folder(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {folder} is not a directory")
    return folder


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _weight_files(folder: Path) -> dict[str, Optional[set[str]]]:
    """Map each safetensors file of the folder to the weight names the index
    lists in it (None = no index: the file holds what it holds)."""
    index = folder / INDEX_FILE
    if index.is_file() and (folder / WEIGHTS_FILE).is_file():
        # Which weights are the model's? transformers reads model.safetensors
        # and ignores the index; neither choice is safe to make silently.
        raise ValueError(f"{folder}: holds both {WEIGHTS_FILE} and {INDEX_FILE}, two sets of weights; "
                         "remove the one that is not the model's")
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: has no 'weight_map' object")
        files: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            # Shards sit beside the index: anything else ("", ".", "../x", "/x") is no shard.
            if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file:
                raise ValueError(f"{index}: weight_map[{name!r}]: expected a file name in the folder, got {file!r}")
            files.setdefault(file, set()).add(name)
        for file in files:
            if not (folder / file).is_file():
                raise FileNotFoundError(f"{folder / file}: missing (listed in {INDEX_FILE})")
        return files
    if (folder / WEIGHTS_FILE).is_file():
        return {WEIGHTS_FILE: None}
    raise FileNotFoundError(f"{folder}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))


def _open_weights(path: Path, device: torch.device):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt", device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _check_and_assign(model, shapes, name, file, tensor, dtype):
    where = f"weight {name} (in {file})"
    if tuple(tensor.shape) != shapes[name]:
        note = ""
        if name in (EMBEDDING_WEIGHT, HEAD_WEIGHT) and "embedding_size" not in model.config.extra:
            note = " (config.json: embedding_size is missing, which the official LLaDA code takes as 50304 rows)"
        raise ValueError(f"{where}: expected shape {list(shapes[name])}, got {list(tensor.shape)}{note}")
    if not tensor.is_floating_point():  # an int or bool tensor is no weight, whatever the cast gives
        raise ValueError(f"{where}: expected a floating-point dtype, got {tensor.dtype}")
    converted = tensor.to(dtype)
    # A cast to a narrower range (float32 or bfloat16 to float16) turns the
    # values beyond it into inf, and the logits into NaN. One check of the
    # result, and a closer look only where it failed.
    limit = torch.finfo(dtype).max
    if limit < torch.finfo(tensor.dtype).max and not torch.isfinite(converted).all():
        overflow = torch.isfinite(tensor) & ~torch.isfinite(converted)
        if overflow.any():
            wider = "torch.float32" if dtype == torch.bfloat16 else "torch.bfloat16 or torch.float32"
            raise ValueError(f"{where}: holds {tensor[overflow][0].item():g}, beyond the range of dtype "
                             f"{dtype} (at most {limit:g} in magnitude); load the model as {wider}")
    _assign(model, name, converted)


EMBEDDING_WEIGHT = "model.transformer.wte.weight"
HEAD_WEIGHT = "model.transformer.ff_out.weight"


def _tied_head_note(cfg: LLaDAConfig) -> str:
    """Why a tied model has no head of its own: weight_tying, which the
    official code takes to be true when config.json does not give it."""
    given = "is true" if "weight_tying" in cfg.extra else "is missing, which the official LLaDA code takes as true"
    return f" (config.json: weight_tying {given}: the embedding is the head)"


def cuda_default_dtype(capability: tuple[int, int]) -> torch.dtype:
    """bfloat16 on GPUs that compute in it (compute capability 8.0 on),
    float16 on older ones, where bfloat16 would be emulated."""
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def resolve_device_dtype(device, dtype):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if device.type == "cpu":
        device = torch.device("cpu")  # "cpu:0" is the same device, but safetensors accepts only "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device} requested but there are {torch.cuda.device_count()} CUDA devices")
    if dtype is None:
        if device.type == "cuda":
            dtype = cuda_default_dtype(torch.cuda.get_device_capability(device))
        else:
            dtype = torch.float32
    _check_weight_dtype(dtype, FILE_DTYPES)
    return device, dtype


def _available_host_memory() -> Optional[int]:
    """Bytes this machine can still give a process (MemAvailable plus free
    swap, from /proc/meminfo), and no more than the process's control group
    (a container's memory limit) has left; None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        machine = sum(int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError, IndexError):
        machine = None
    group = _cgroup_memory_left()
    known = [n for n in (machine, group) if n is not None]
    return min(known) if known else None


def _cgroup_memory_left(root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """What the memory limit of this process's control group leaves (cgroup
    v2: memory.max less memory.current; v1: memory.limit_in_bytes less
    memory.usage_in_bytes), or None without a limit. The usage counts the
    page cache too, whose inactive part (e.g. a checkpoint just copied in)
    the kernel gives back under pressure: that part counts as left."""
    for folder, limit_name, usage_name, inactive_name in (
            (root, "memory.max", "memory.current", "inactive_file"),
            (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        try:
            limit = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1 writes a huge number for none
            return None
        return max(0, int(limit) - usage + _memory_stat(folder / "memory.stat", inactive_name))
    return None


def _memory_stat(path: Path, key: str) -> int:
    """One counter of a cgroup's memory.stat ("key value" lines), 0 if absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _format_bytes(n: int) -> str:
    """A size in the largest of GB, MB, kB it reaches, so that a small model reads as more than 0.0 GB."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _format_count(n: int) -> str:
    """A parameter count in the largest of billions, millions, thousands it reaches."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def memory_shortfall(cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype, copies: int = 1) -> Optional[str]:
    """What ``copies`` tensors the size of the weights of a model with config
    ``cfg`` take as ``dtype`` and what ``device`` has free, when they do not
    fit there; None when they fit or the free memory cannot be read."""
    params = count_parameters(cfg)
    need = params * dtype.itemsize * copies
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        where = f"{device} has {_format_bytes(free)} free"
    else:
        free = _available_host_memory()
        where = f"this machine has {_format_bytes(free or 0)} of memory available"
    if free is None or need <= free:
        return None
    held = "" if copies == 1 else f" {copies} times over"
    return f"the model's {_format_count(params)} parameters take {_format_bytes(need)} as {dtype}{held}, but {where}"


def _check_memory(cfg: LLaDAConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Refuses, before reading any weight, a model whose weights alone do not
    fit where they are going: an 8B model in float32 takes 32 GB, and
    running out half-way through loading it kills the process (or stalls
    the machine) instead of saying why."""
    shortfall = memory_shortfall(cfg, device, dtype)
    if shortfall is None:
        return
    hint = ""
    if dtype == torch.float32 and memory_shortfall(cfg, device, torch.bfloat16) is None:
        hint = (f"; as torch.bfloat16 they take {_format_bytes(count_parameters(cfg) * 2)} "
                f"(CLI: --dtype bfloat16)")
    raise MemoryError(f"dtype: {shortfall}{hint}")


def load_model(
    path: str | os.PathLike,
    device: Optional[str | torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> LLaDAModel:
    """Load a Hugging Face LLaDA checkpoint folder as a :class:`LLaDAModel`.

    Args:
        path: the folder (config.json, model.safetensors or its shards and
            model.safetensors.index.json, not both).
        device: default CUDA when available, else CPU.
        dtype: float32, bfloat16 or float16; default bfloat16 on CUDA
            (float16 below compute capability 8.0) and float32 on CPU.

    On CUDA the projections that share an input are packed (see
    :func:`llada.model.pack_projections`). A model whose weights do not fit
    in the device's free memory (the host's available memory and swap, on
    the CPU) raises MemoryError before any weight is read.

    On the CPU, the weights of a file already in the dtype loaded are not
    copied: the parameters are views of a private memory map of the
    .safetensors file, read from disk as they are used. Writing to them
    leaves the file as it was, but a file overwritten in place changes the
    loaded model, and one truncated kills the process (SIGBUS); replace
    such files by writing a new one and renaming it over the old.
    """
    folder = _folder(path)
    cfg = load_config(folder)
    device, dtype = resolve_device_dtype(device, dtype)
    files = _weight_files(folder)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # safetensors needs an index
    _check_memory(cfg, device, dtype)
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    shapes = expected_shapes(model)
    loaded = set()
    for file, listed in files.items():
        with _open_weights(folder / file, device) as f:
            stored = set(f.keys())
            for name in sorted(stored | (listed or set())):
                if name not in stored:
                    raise ValueError(f"weight {name}: listed in {INDEX_FILE} but absent from {file}")
                if name not in shapes:
                    raise ValueError(f"weight {name} (in {file}): not part of a LLaDA model with this config"
                                     f"{_tied_head_note(cfg) if name == HEAD_WEIGHT else ''}")
                # A tensor the index does not list is as unexpected as one the model lacks.
                if listed is not None and name not in listed:
                    raise ValueError(f"weight {name} (in {file}): not listed for {file} in {INDEX_FILE}")
                _check_and_assign(model, shapes, name, file, f.get_tensor(name), dtype)
                loaded.add(name)
    missing = sorted(set(shapes) - loaded)
    if missing:
        raise ValueError(
            f"weight {missing[0]}: missing from the checkpoint (expected shape "
            f"{list(shapes[missing[0]])}; {len(missing)} weight(s) missing in all)"
        )
    if device.type == "cuda":
        pack_projections(model)
    return model.eval()


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer (a transformers fast tokenizer, chat template
    included), read from the folder only: never the network."""
    folder = _folder(path)
    if not (folder / "tokenizer.json").is_file():
        # (Without it transformers would try to build one from other files,
        # and fail asking for packages rather than naming the file.)
        raise FileNotFoundError(f"{folder}: no tokenizer.json (the fast tokenizer's file)")
    # Small files, which transformers reads too (config.json for the model
    # type) and whose errors there name no file.
    for name in (*TOKENIZER_FILES[1:], "config.json"):
        if (folder / name).is_file():
            _read_json(folder / name)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers warns that config.json's model_type is unknown to it; the
    # tokenizer does not depend on it.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # local_files_only: the folder alone, and no network (the process's
        # offline setting is the caller's). Real LLaDA folders name their own
        # code in config.json (auto_map); the tokenizer needs none of it, and
        # transformers would ask on standard input.
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        # None of these names its file: a JSONDecodeError, the bare Exception
        # of tokenizers, a TypeError or KeyError from transformers where
        # tokenizer.json parses but holds no tokenizer.
        from .tokenizer import read_tokenizer

        _read_json(folder / "tokenizer.json")  # raises, naming the file, where it does not parse
        read_tokenizer(folder)  # raises, naming the file, where it is no tokenizer
        raise ValueError(f"{folder}: the tokenizer files cannot be read ({type(e).__name__}: {e})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer.padding_side = "left"
    return tokenizer


# --------------------------------------------------------------------------
# Random checkpoints
# --------------------------------------------------------------------------

SIZES = {
    "tiny": dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=160,
                 vocab_size=288, max_sequence_length=512),
    "mid": dict(d_model=512, n_heads=8, n_kv_heads=8, n_layers=8, mlp_hidden_size=1376,
                vocab_size=32000, max_sequence_length=2048),
    "8b-shape": dict(),  # the LLaDAConfig defaults are LLaDA-8B's
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def random_config(size: str = "tiny", **overrides) -> LLaDAConfig:
    """A config of a named size; special ids go to the top of a small vocab."""
    return LLaDAConfig(**_random_config_fields(size, overrides))


def _random_config_fields(size: str, overrides: dict) -> dict:
    """The LLaDAConfig fields of :func:`random_config` that differ from the defaults."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {list(SIZES)}, got {size!r}")
    values = dict(SIZES[size])
    values.update(overrides)
    vocab = values.get("vocab_size", LLaDAConfig.vocab_size)
    values.setdefault("embedding_size", vocab)
    if vocab < LLaDAConfig.mask_token_id + 1:
        # Small vocabularies: byte tokens first, then the four special tokens.
        top = vocab - 1
        values.setdefault("mask_token_id", top)
        values.setdefault("eot_token_id", top - 1)
        values.setdefault("eos_token_id", top - 2)
        values.setdefault("bos_token_id", top - 3)
        values.setdefault("pad_token_id", values["eos_token_id"])
    return values


# random_weights seeds each weight's generator with seed * 1_000_003 plus a
# CRC-32, which torch takes below 2**64.
MAX_SEED = (2**64 - 2**32) // 1_000_003

# The dtypes of a checkpoint's weights (those load_model takes), and of a
# random model, which may also be float64 (its forward runs the pure-torch
# references). An int dtype would truncate the draws to a few integers.
FILE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODEL_DTYPES = FILE_DTYPES + (torch.float64,)


def _check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed: expected an int in [0, {MAX_SEED}], got {seed!r}")


def _check_weight_dtype(dtype, allowed: tuple[torch.dtype, ...]) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = [str(d) for d in allowed]
        raise TypeError(f"dtype: expected {', '.join(names[:-1])} or {names[-1]}, got {dtype!r}")


def _check_random_arguments(cfg, seed, dtype) -> None:
    if not isinstance(cfg, LLaDAConfig):
        raise TypeError(f"cfg: expected an LLaDAConfig, got {type(cfg).__name__}")
    _check_seed(seed)
    _check_weight_dtype(dtype, MODEL_DTYPES)


def random_weights(
    cfg: LLaDAConfig, seed: int = 0, dtype=torch.float32, device="cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight, each drawn from its own generator so a
    weight depends only on (seed, name). Scales keep activations O(1) and the
    logits spread (std ~2), so decoding decisions are well separated.

    ``seed`` is an int in [0, ``MAX_SEED``]; ``dtype`` torch.float32,
    torch.bfloat16, torch.float16 or torch.float64. Both are checked here,
    not when the first weight is drawn."""
    _check_random_arguments(cfg, seed, dtype)
    return _random_weights(cfg, seed, dtype, device)


def _random_weights(cfg: LLaDAConfig, seed: int, dtype, device) -> Iterator[tuple[str, torch.Tensor]]:
    with torch.device("meta"):
        shapes = expected_shapes(LLaDAModel(cfg))
    for name, shape in shapes.items():
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * t
        elif name.endswith("wte.weight"):
            pass
        elif name == HEAD_WEIGHT:
            t = t * (2.0 / shape[1] ** 0.5)
        else:
            t = t * shape[1] ** -0.5
        yield name, t.to(dtype)


def random_model(cfg: LLaDAConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> LLaDAModel:
    """A randomly initialised model built directly on ``device`` (no files),
    with its projections packed on CUDA as ``load_model`` does. ``seed`` and
    ``dtype`` as in :func:`random_weights`."""
    _check_random_arguments(cfg, seed, dtype)
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    for name, tensor in random_weights(cfg, seed, dtype, device):
        _assign(model, name, tensor)
    if torch.device(device).type == "cuda":
        pack_projections(model)
    return model.eval()


def _special_token_ids(cfg: LLaDAConfig) -> dict[str, int]:
    """The special ids of :func:`write_tokenizer`'s tokenizer: distinct, and
    above its 256 byte tokens."""
    ids = {
        "bos": cfg.bos_token_id, "eos": cfg.eos_token_id,
        "eot": cfg.eot_token_id, "mask": cfg.mask_token_id,
    }
    for kind, i in ids.items():
        if i is None or not 256 <= i < cfg.embedding_size:
            raise ValueError(f"{kind}_token_id: must lie in [256, {cfg.embedding_size}), got {i}")
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"special token ids must be distinct, got {ids}")
    return ids


def write_tokenizer(folder: Path, cfg: LLaDAConfig) -> None:
    """A byte-level tokenizer (256 byte tokens, ids 0..255, no merges) plus the
    LLaDA special tokens at the config's ids, and a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ids = _special_token_ids(cfg)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({SPECIAL_TOKENS[kind]: i for kind, i in ids.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tok.save(str(folder / "tokenizer.json"))

    special_map = {
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["eos"],
        "mask_token": SPECIAL_TOKENS["mask"],
    }
    tok_config = dict(
        special_map,
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=cfg.max_sequence_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    _write_json(folder / "tokenizer_config.json", tok_config)
    _write_json(folder / "special_tokens_map.json", special_map)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _checked_random_config(size: str, config_overrides: Optional[dict]) -> LLaDAConfig:
    """The config of write_random_checkpoint, through the checks load_model
    makes of config.json, so that no folder is written that it refuses."""
    overrides = {} if config_overrides is None else config_overrides
    if not isinstance(overrides, dict):
        raise TypeError(f"config_overrides: expected a dict of LLaDAConfig fields, got {type(overrides).__name__}")
    names = [f.name for f in dataclasses.fields(LLaDAConfig) if f.name != "extra"]
    for key in overrides:
        if key not in names:
            raise ValueError(f"config_overrides: {key!r} is not a LLaDAConfig field (fields: {', '.join(names)})")
    # The config.json it writes, EoT id included (tokenizer.json holds that one).
    raw = dict(config_to_dict(LLaDAConfig()), eot_token_id=LLaDAConfig.eot_token_id)
    raw.update(_random_config_fields(size, overrides))
    cfg = config_from_dict(raw, source="config_overrides")
    try:
        _special_token_ids(cfg)
    except ValueError as e:
        raise ValueError(f"config_overrides: {e}") from None
    return cfg


_CHECKPOINT_FILES = {CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"}


def write_random_checkpoint(
    path: str | os.PathLike,
    config_overrides: Optional[dict] = None,
    seed: int = 0,
    *,
    size: str = "tiny",
    dtype: torch.dtype = torch.float32,
    num_shards: int = 1,
) -> Path:
    """Write a random LLaDA checkpoint folder in the real Hugging Face format.

    Args:
        path: the folder to create (or fill: it must not hold a checkpoint).
        config_overrides: LLaDAConfig fields replacing those of ``size``;
            the result must pass the checks ``load_model`` makes of config.json.
        seed: the weights depend only on (seed, weight name); an int in
            [0, ``MAX_SEED``] (``(2**64 - 2**32) // 1_000_003``).
        size: "tiny", "mid" or "8b-shape" (see ``SIZES``).
        dtype: storage dtype of the weights: torch.float32, torch.bfloat16
            or torch.float16.
        num_shards: > 1 writes model-0000i-of-0000n.safetensors and the index;
            at most one shard per weight.

    Every argument is checked before anything is written, and a failure while
    writing removes what this call wrote.
    """
    import shutil

    _check_seed(seed)
    if os.fspath(path) == "":
        raise ValueError("path: expected a folder, got an empty path")
    _check_weight_dtype(dtype, FILE_DTYPES)
    cfg = _checked_random_config(size, config_overrides)
    with torch.device("meta"):
        names = list(expected_shapes(LLaDAModel(cfg)))
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards: expected an int in [1, {len(names)}] (one weight per shard at most), "
                         f"got {num_shards!r}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"path: {folder} is a file, not a folder")
    if folder.is_dir():
        # Never over a checkpoint: a real one would be lost, and random
        # weights beside its shards would make a folder of neither.
        held = sorted(f.name for f in folder.iterdir() if f.name in _CHECKPOINT_FILES
                      or (f.name.startswith("model-") and f.name.endswith(".safetensors")))
        if held:
            raise FileExistsError(f"path: {folder} already holds a checkpoint ({', '.join(held)}); "
                                  "pick a new folder")
    new_folders = [p for p in (folder, *folder.parents) if not p.exists()]
    kept = set(folder.iterdir()) if folder.is_dir() else set()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / CONFIG_FILE, config_to_dict(cfg))
        write_tokenizer(folder, cfg)
        # Exactly num_shards shards, of as even sizes as the weights allow.
        groups = [names[i * len(names) // num_shards: (i + 1) * len(names) // num_shards]
                  for i in range(num_shards)]
        weights = random_weights(cfg, seed, dtype)
        weight_map, total = {}, 0
        for i, group in enumerate(groups):
            # Only one shard's tensors are held at a time (8B shapes are 16 GB).
            shard = dict(next(weights) for _ in group)
            total += sum(t.numel() * t.element_size() for t in shard.values())
            file = WEIGHTS_FILE if num_shards == 1 else f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            save_weights(shard, folder / file)
            weight_map.update({name: file for name in group})
        if num_shards > 1:
            _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    except BaseException:
        # A half-written folder would pass for a checkpoint (and block a retry).
        if new_folders:
            shutil.rmtree(new_folders[-1], ignore_errors=True)
        else:
            for f in set(folder.iterdir()) - kept:
                f.unlink()
        raise
    return folder


__all__ = [
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_model",
    "load_tokenizer",
    "random_config",
    "random_model",
    "random_weights",
    "write_random_checkpoint",
]
