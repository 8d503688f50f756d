"""Loading Hugging Face LLaDA folders, their error cases, and the tokenizer."""

import json
import os
import re
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

import llada
from llada.checkpoint import (config_from_dict, config_to_dict, random_config, random_model, random_weights,
                              write_random_checkpoint)
from llada.cli import main

from checkpoints import TINY, make_checkpoint
from naive_llada import NaiveLLaDA


def edit_config(folder, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def edit_weights(folder, fn):
    file = str(folder / "model.safetensors")
    weights = load_file(file)
    fn(weights)
    save_file(weights, file)


def test_loaded_weights_are_the_files(tmp_path):
    folder = make_checkpoint(tmp_path, seed=3, n_kv_heads=2)
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    stored = load_file(str(folder / "model.safetensors"))
    params = dict(model.named_parameters())
    assert set(params) == set(stored)
    for name, tensor in stored.items():
        assert torch.equal(params[name], tensor), name
        assert not params[name].requires_grad
    assert not model.training


def test_sharded_checkpoint_loads_the_same_model(tmp_path):
    one = write_random_checkpoint(tmp_path / "one", TINY, seed=5)
    sharded = write_random_checkpoint(tmp_path / "sharded", TINY, seed=5, num_shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert not (sharded / "model.safetensors").exists()
    a = dict(llada.load_model(one, device="cpu").named_parameters())
    b = dict(llada.load_model(sharded, device="cpu").named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_with_both_a_single_file_and_shards_is_refused(tmp_path):
    # Two sets of weights: transformers reads model.safetensors, an index-first
    # loader the shards; which one is the model only the user knows.
    single = write_random_checkpoint(tmp_path / "single", TINY, seed=1)
    both = write_random_checkpoint(tmp_path / "both", TINY, seed=0, num_shards=2)
    shards = sorted(both.glob("model-*-of-00002.safetensors"))
    shutil.copy(single / "model.safetensors", both / "model.safetensors")
    with pytest.raises(ValueError) as e:
        llada.load_model(both, device="cpu")
    assert str(e.value) == (f"{both}: holds both model.safetensors and model.safetensors.index.json, "
                            "two sets of weights; remove the one that is not the model's")
    # With either removed, the folder loads the weights the files that are left hold.
    expected = {"only_shards": {k: v for shard in shards for k, v in load_file(str(shard)).items()},
                "both": load_file(str(single / "model.safetensors"))}
    only_shards = shutil.copytree(both, tmp_path / "only_shards")
    (only_shards / "model.safetensors").unlink()
    (both / "model.safetensors.index.json").unlink()
    for shard in shards:
        shard.unlink()
    for name, weights in expected.items():
        loaded = llada.load_model(tmp_path / name, device="cpu", dtype=torch.float32).state_dict()
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights), name
    assert not all(torch.equal(expected["both"][k], expected["only_shards"][k]) for k in expected["both"])


def test_random_checkpoint_arguments_are_checked_before_anything_is_written(tmp_path):
    folder = tmp_path / "new" / "ck"
    for kwargs, message in ((dict(num_shards=0), r"num_shards: expected an int in \[1, \d+\]"),
                            (dict(num_shards=10_000), r"num_shards: expected an int in \[1, \d+\]"),
                            (dict(seed=-1), r"seed: expected an int in \[0, \d+\]"),
                            (dict(seed=2**63), r"seed: expected an int in \[0, \d+\]")):
        with pytest.raises(ValueError, match=message):
            write_random_checkpoint(folder, TINY, **kwargs)
    with pytest.raises(ValueError, match="path: expected a folder, got an empty path"):
        write_random_checkpoint("", TINY)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        write_random_checkpoint(tmp_path / "file", TINY)
    assert [f.name for f in tmp_path.iterdir()] == ["file"]
    # Every shard asked for is written, however the weights divide.
    sharded = write_random_checkpoint(tmp_path / "eight", TINY, num_shards=8)
    assert len(list(sharded.glob("model-*-of-00008.safetensors"))) == 8


def test_a_failed_random_checkpoint_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    def failing_save(tensors, file, metadata=None):
        real_save(tensors, file, metadata=metadata)
        raise OSError("disk full")

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_random_checkpoint(tmp_path / "new" / "ck", TINY, num_shards=2)
    assert not (tmp_path / "new").exists()  # the folders it made are gone
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        write_random_checkpoint(tmp_path / "notes", TINY)
    assert [f.name for f in (tmp_path / "notes").iterdir()] == ["README.txt"]  # only what was there


BAD_RANDOM_CHECKPOINTS = [
    (dict(dtype=torch.int32), TypeError, "dtype: expected torch.float32, torch.bfloat16 or torch.float16, "
                                         "got torch.int32"),
    (dict(dtype="bfloat16"), TypeError, "dtype: expected torch.float32, torch.bfloat16 or torch.float16, "
                                        "got 'bfloat16'"),
    (dict(n_layers=0), ValueError, "config_overrides: n_layers: expected a positive integer, got 0"),
    (dict(n_heads=0), ValueError, "config_overrides: n_heads: expected a positive integer, got 0"),
    (dict(n_kv_heads=0), ValueError, "config_overrides: n_kv_heads: expected a positive integer, got 0"),
    (dict(n_heads=3), ValueError, "config_overrides: d_model (32) must be a multiple of n_heads (3)"),
    (dict(mlp_hidden_size=-1), ValueError, "config_overrides: mlp_hidden_size: expected a positive integer, "
                                           "got -1"),
    (dict(rope_theta=-1.0), ValueError, "config_overrides: rope_theta: expected a finite number > 0, got -1.0"),
    (dict(rms_norm_eps=float("nan")), ValueError, "config_overrides: rms_norm_eps: expected a finite number >= 0, "
                                                  "got nan"),
    (dict(mask_token_id=300), ValueError, "config_overrides: mask_token_id = 300 is outside the embedding "
                                          "(272 rows)"),
    (dict(eot_token_id=None), ValueError, "config_overrides: eot_token_id: must lie in [256, 272), got None"),
    (dict(heads=4), ValueError, "config_overrides: 'heads' is not a LLaDAConfig field (fields: d_model, "),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_RANDOM_CHECKPOINTS,
                         ids=[repr(kwargs) for kwargs, _, _ in BAD_RANDOM_CHECKPOINTS])
def test_random_checkpoint_dtype_and_config_are_checked_before_anything_is_written(tmp_path, kwargs, error,
                                                                                    message):
    dtype = {"dtype": kwargs.pop("dtype")} if "dtype" in kwargs else {}
    with pytest.raises(error, match="^" + re.escape(message)):
        write_random_checkpoint(tmp_path / "new" / "ck", dict(TINY, **kwargs), **dtype)
    assert list(tmp_path.iterdir()) == []


def test_dtype_and_device_are_applied(tmp_path, device):
    folder = make_checkpoint(tmp_path)
    model = llada.load_model(folder, device=device, dtype=torch.bfloat16)
    stored = load_file(str(folder / "model.safetensors"))
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == device
        assert torch.equal(p.cpu(), stored[name].to(torch.bfloat16))


def test_random_model_matches_written_checkpoint(tmp_path):
    folder = write_random_checkpoint(tmp_path, TINY, seed=9)
    direct = random_model(llada.load_config(folder), seed=9)
    ids = torch.randint(0, 256, (2, 7))
    assert torch.equal(direct(ids).logits, llada.load_model(folder, device="cpu")(ids).logits)


def test_random_model_and_weights_check_their_arguments():
    # An int dtype built a model of 0s and 1s that failed in its forward; a
    # seed beyond torch's range failed naming no argument.
    cfg = random_config()
    dtypes = "torch.float32, torch.bfloat16, torch.float16 or torch.float64"
    for make in (random_model, random_weights):  # random_weights at the call, not at the first weight
        for dtype in (torch.int32, torch.bool, "float32"):
            with pytest.raises(TypeError, match=f"^dtype: expected {dtypes}, got {re.escape(repr(dtype))}$"):
                make(cfg, dtype=dtype)
        for seed in (-1, 2**70, 1.0, True):
            message = f"seed: expected an int in [0, 18446688729348], got {seed!r}"
            with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
                make(cfg, seed=seed)
        with pytest.raises(TypeError, match="^cfg: expected an LLaDAConfig, got NoneType$"):
            make(None)
    # The dtypes it takes: each the float32 draws, cast.
    want = dict(random_model(cfg, seed=4).named_parameters())
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        got = dict(random_model(cfg, seed=4, dtype=dtype).named_parameters())
        assert all(torch.equal(got[name], want[name].to(dtype)) for name in want), dtype


def test_config_dict_helpers_check_their_arguments():
    raw = config_to_dict(random_config())
    for value in (None, [], "config.json"):
        with pytest.raises(TypeError, match=rf"^raw: expected a dict \(the JSON object of config\.json\), "
                                            rf"got {type(value).__name__}$"):
            config_from_dict(value)
    for value in ("x", True, 3.0):
        with pytest.raises(TypeError, match=f"^eot_token_id: expected None or an int, got {re.escape(repr(value))}$"):
            config_from_dict(raw, eot_token_id=value)
    with pytest.raises(ValueError, match=r"^eot_token_id: expected None or an int >= 0, got -1$"):
        config_from_dict(raw, eot_token_id=-1)
    assert config_from_dict(raw, eot_token_id=5).eot_token_id == 5
    for value in (None, raw):
        with pytest.raises(TypeError, match=f"^cfg: expected an LLaDAConfig, got {type(value).__name__}$"):
            config_to_dict(value)


def test_config_from_dict_blames_each_bad_id_on_its_source():
    raw = config_to_dict(random_config())  # 288 rows
    for key, value in (("mask_token_id", True), ("eos_token_id", "1"), ("pad_token_id", -1)):
        with pytest.raises(ValueError, match=f"^config.json: {key}: expected a non-negative integer, got {value!r}$"):
            config_from_dict(dict(raw, **{key: value}))
    with pytest.raises(ValueError, match=r"^config\.json: eos_token_id = 288 is outside the embedding \(288 rows\)$"):
        config_from_dict(dict(raw, eos_token_id=288))
    with pytest.raises(ValueError, match=r"^tokenizer\.json: <\|eot_id\|> has id 300, which is outside the "
                                         r"embedding \(288 rows\)$"):
        config_from_dict(raw, eot_token_id=300)
    # An embedding smaller than the vocabulary is named first, ahead of the ids beyond it.
    with pytest.raises(ValueError, match=r"^config\.json: embedding_size \(200\) must be >= vocab_size \(288\)$"):
        config_from_dict(dict(raw, embedding_size=200))


def test_config_values(tmp_path):
    folder = make_checkpoint(tmp_path)
    cfg = llada.load_config(folder)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.mlp_hidden_size) == (32, 4, 2, 80)
    # config.json carries no EoT id: it comes from <|eot_id|> in tokenizer.json.
    assert cfg.eot_token_id == NaiveLLaDA(folder).eot_id
    raw = json.loads((folder / "config.json").read_text())
    raw["mlp_ratio"] = 8
    assert config_from_dict(raw).mlp_hidden_size == 80  # mlp_ratio is ignored when set
    del raw["mlp_hidden_size"], raw["n_kv_heads"]
    cfg = config_from_dict(raw)
    assert cfg.mlp_hidden_size == 8 * 32 and cfg.n_kv_heads == cfg.n_heads


@pytest.mark.parametrize("key, default, supported", [
    ("layer_norm_type", "'default'", "'rms'"),  # LayerNorm, which subtracts the mean
    ("activation_type", "'swiglu'", "'silu'"),
    ("block_type", "'sequential'", "'llama'"),
    ("rope", "False", "True"),
])
def test_a_missing_key_whose_official_default_is_unsupported_is_refused(tmp_path, key, default, supported):
    # The official code reads a missing key as its ModelConfig default, not as LLaDA-8B's value.
    folder = make_checkpoint(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    del raw[key]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"^config\\.json: {key} is missing, which in the official LLaDA code "
                                         f"means {default}: not supported \\(supported: {supported}\\)$"):
        llada.load_config(folder)


def test_missing_keys_whose_official_default_is_supported_take_it(tmp_path):
    folder = make_checkpoint(tmp_path / "plain", seed=2)
    want = llada.load_model(folder, device="cpu")
    raw = json.loads((folder / "config.json").read_text())
    for key in ("alibi", "include_bias", "include_qkv_bias", "layer_norm_with_affine", "attention_layer_norm",
                "rope_full_precision", "scale_logits", "input_emb_norm"):
        del raw[key]
    (folder / "config.json").write_text(json.dumps(raw))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(llada.load_model(folder, device="cpu")(ids).logits, want(ids).logits)


def test_a_missing_weight_tying_means_tied(tmp_path):
    # The official default is true: a tied checkpoint need not say so.
    tied = make_checkpoint(tmp_path / "tied", seed=2, weight_tying=True)
    want = llada.load_model(tied, device="cpu")
    raw = json.loads((tied / "config.json").read_text())
    del raw["weight_tying"]
    (tied / "config.json").write_text(json.dumps(raw))
    model = llada.load_model(tied, device="cpu")
    assert model.config.weight_tying
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(model(ids).logits, want(ids).logits)
    # An untied head is then a weight too many, and the error says why.
    untied = make_checkpoint(tmp_path / "untied", seed=2)
    raw = json.loads((untied / "config.json").read_text())
    del raw["weight_tying"]
    (untied / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"^weight model\.transformer\.ff_out\.weight \(in model\.safetensors\): "
                                         r"not part of .* weight_tying is missing, which the official LLaDA code "
                                         r"takes as true"):
        llada.load_model(untied, device="cpu")


def test_missing_sizes_take_the_official_defaults(tmp_path):
    # configuration_llada.ModelConfig: max_sequence_length 1024, embedding_size
    # 50304; its model takes vocab_size rows for an embedding_size of null.
    folder = make_checkpoint(tmp_path, seed=2)
    want = llada.load_model(folder, device="cpu")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["vocab_size"] == raw["embedding_size"] == 272 and raw["max_sequence_length"] == 512
    edit_config(folder, embedding_size=None, max_sequence_length=None)
    cfg = llada.load_config(folder)
    assert (cfg.embedding_size, cfg.max_sequence_length) == (272, 1024)
    del raw["embedding_size"], raw["max_sequence_length"]
    (folder / "config.json").write_text(json.dumps(raw))
    cfg = llada.load_config(folder)
    assert (cfg.embedding_size, cfg.max_sequence_length) == (50304, 1024)
    with pytest.raises(ValueError, match=r"^weight model\.transformer\.ff_out\.weight \(in model\.safetensors\): "
                                         r"expected shape \[50304, 32\], got \[272, 32\] \(config\.json: "
                                         r"embedding_size is missing, which the official LLaDA code takes as 50304 "
                                         r"rows\)$"):
        llada.load_model(folder, device="cpu")

    # The official code's checkpoint of such a config: 50304 rows, the ones past the vocabulary unused.
    def pad_rows(weights):
        for name in ("model.transformer.wte.weight", "model.transformer.ff_out.weight"):
            weights[name] = torch.cat([weights[name], torch.zeros(50304 - 272, 32)])

    edit_weights(folder, pad_rows)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits = llada.load_model(folder, device="cpu")(ids).logits
    assert logits.shape == (1, 5, 50304)
    torch.testing.assert_close(logits[..., :272], want(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[..., 272:], torch.zeros(1, 5, 50304 - 272))
    # A vocabulary beyond those 50304 rows: the missing key cannot be what the folder means.
    with pytest.raises(ValueError, match=r"^config\.json: embedding_size is missing, which in the official LLaDA "
                                         r"code means 50304 rows, fewer than vocab_size = 60000; give "
                                         r"embedding_size \(null means vocab_size\)$"):
        config_from_dict(dict(raw, vocab_size=60000))


@pytest.mark.parametrize("multi_query, n_kv_heads, expected", [
    (None, None, 4), (None, 2, 2),
    (True, None, 1), (True, 1, 1), (True, 2, "multi_query_attention = True means 1 key/value head(s), but "
                                            "n_kv_heads = 2"),
    (False, None, 4), (False, 4, 4), (False, 2, "multi_query_attention = False means 4 key/value head(s), but "
                                              "n_kv_heads = 2"),
])
def test_multi_query_attention_follows_the_official_rule(tmp_path, multi_query, n_kv_heads, expected):
    raw = json.loads((make_checkpoint(tmp_path) / "config.json").read_text())
    raw.update(multi_query_attention=multi_query, n_kv_heads=n_kv_heads)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match="^config\\.json: " + re.escape(expected) + "$"):
            config_from_dict(raw)
    else:
        assert config_from_dict(raw).n_kv_heads == expected


@pytest.mark.parametrize("source, dtype, value, wider", [
    (torch.bfloat16, torch.float16, 1e5, "torch.bfloat16 or torch.float32"),
    (torch.float32, torch.float16, -7e4, "torch.bfloat16 or torch.float32"),
    (torch.float32, torch.bfloat16, 3.4e38, "torch.float32"),
])
def test_weights_beyond_the_range_of_dtype_are_refused(tmp_path, source, dtype, value, wider):
    folder = write_random_checkpoint(tmp_path, TINY, dtype=source)
    name = "model.transformer.blocks.1.ff_norm.weight"

    def put(weights):
        weights[name][3] = value

    edit_weights(folder, put)
    stored = load_file(str(folder / "model.safetensors"))[name][3].item()
    says = (f"weight {name} (in model.safetensors): holds {stored:g}, beyond the range of dtype {dtype} "
            f"(at most {torch.finfo(dtype).max:g} in magnitude); load the model as {wider}")
    with pytest.raises(ValueError, match=f"^{re.escape(says)}$"):
        llada.load_model(folder, device="cpu", dtype=dtype)
    assert llada.load_model(folder, device="cpu", dtype=source).get_parameter(name)[3].item() == stored


def test_weights_at_the_edge_of_float16_load_as_float16(tmp_path):
    folder = write_random_checkpoint(tmp_path, TINY)
    name = "model.transformer.blocks.1.ff_norm.weight"

    def put(weights):
        weights[name][:2] = torch.tensor([65504.0, -65519.0])  # the largest, and one that rounds to it

    edit_weights(folder, put)
    loaded = llada.load_model(folder, device="cpu", dtype=torch.float16).get_parameter(name)
    assert loaded[:2].tolist() == [65504.0, -65504.0]


def test_embedding_rows_beyond_vocab(tmp_path):
    folder = make_checkpoint(tmp_path, embedding_size=300)
    model = llada.load_model(folder, device="cpu")
    assert model.config.vocab_size == 272
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 300


@pytest.mark.parametrize("key,value", [
    ("alibi", True),
    ("block_type", "sequential"),
    ("include_bias", True),
    ("layer_norm_type", "default"),
    ("activation_type", "gelu"),
    ("rope", False),
    ("rope_full_precision", False),
    ("scale_logits", True),
    ("attention_layer_norm", True),
    ("block_group_size", 2),  # its weights would be named transformer.block_groups.G.J
    ("model_type", "llada_moe"),
])
def test_unsupported_config_value_is_rejected(tmp_path, key, value):
    folder = make_checkpoint(tmp_path)
    edit_config(folder, **{key: value})
    with pytest.raises(ValueError, match=f"{key}.*{value!r}"):
        llada.load_model(folder, device="cpu")


@pytest.mark.parametrize("key,value", [("d_model", None), ("n_heads", "4"), ("mask_token_id", 5000)])
def test_bad_shape_config_is_rejected(tmp_path, key, value):
    folder = make_checkpoint(tmp_path)
    edit_config(folder, **{key: value})
    with pytest.raises(ValueError, match=key):
        llada.load_config(folder)


def test_missing_files_are_named(tmp_path):
    folder = make_checkpoint(tmp_path / "a")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        llada.load_model(folder, device="cpu")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        llada.load_model(folder, device="cpu")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        llada.load_model(tmp_path / "nowhere", device="cpu")
    with pytest.raises(TypeError, match="path"):
        llada.load_model(3, device="cpu")

    sharded = write_random_checkpoint(tmp_path / "b", TINY, num_shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        llada.load_model(sharded, device="cpu")


def test_missing_weight_is_named(tmp_path):
    folder = make_checkpoint(tmp_path)
    edit_weights(folder, lambda w: w.pop("model.transformer.blocks.1.k_proj.weight"))
    with pytest.raises(ValueError, match=r"blocks\.1\.k_proj\.weight.*missing"):
        llada.load_model(folder, device="cpu")


def test_misshaped_weight_names_both_shapes(tmp_path):
    folder = make_checkpoint(tmp_path)
    name = "model.transformer.blocks.0.up_proj.weight"
    edit_weights(folder, lambda w: w.update({name: torch.zeros(81, 32)}))
    with pytest.raises(ValueError, match=r"up_proj\.weight.*\[80, 32\].*\[81, 32\]"):
        llada.load_model(folder, device="cpu")


def test_unexpected_weight_is_rejected(tmp_path):
    folder = make_checkpoint(tmp_path)
    edit_weights(folder, lambda w: w.update({"model.transformer.blocks.0.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        llada.load_model(folder, device="cpu")


def test_bad_dtype_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="dtype"):
        llada.load_model(make_checkpoint(tmp_path), device="cpu", dtype=torch.int32)


def test_tokenizer(tmp_path):
    folder = make_checkpoint(tmp_path)
    cfg = llada.load_config(folder)
    tok = llada.load_tokenizer(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>")}
    assert list(ids.values()) == [cfg.bos_token_id, cfg.eos_token_id, cfg.eot_token_id, cfg.mask_token_id]
    assert tok.eos_token_id == cfg.eos_token_id and tok.pad_token_id == cfg.pad_token_id
    text = "héllo, wörld ✓"
    encoded = tok(text)["input_ids"]
    assert max(encoded) < 256 and tok.decode(encoded) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|startoftext|>") and "hi<|eot_id|>" in chat


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"^device: cuda requested but CUDA is not available$"):
        llada.load_model(make_checkpoint(tmp_path), device="cuda")


@pytest.mark.parametrize("device, message", [
    ("cpux", r"^device: expected 'cpu', 'cuda' or 'cuda:N', got 'cpux'$"),
    ("meta", r"^device: expected 'cpu', 'cuda' or 'cuda:N', got 'meta'$"),
    (3.5, r"^device: expected 'cpu', 'cuda' or 'cuda:N', got 3\.5$"),
    ("cuda:99", r"^device: cuda:99 requested but (CUDA is not available|there are \d+ CUDA devices)$"),
], ids=["cpux", "meta", "3.5", "cuda:99"])
def test_bad_devices_are_named(tmp_path, device, message):
    with pytest.raises(ValueError, match=message):
        llada.load_model(make_checkpoint(tmp_path), device=device)


def test_a_model_too_large_for_memory_is_refused_before_loading(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path, seed=3)
    cfg = llada.checkpoint.load_config(folder)
    need = llada.model.count_parameters(cfg) * 4  # float32 bytes
    assert need == sum(t.numel() * 4 for t in load_file(str(folder / "model.safetensors")).values())

    def reading_is_a_failure(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: need - 1)
    with monkeypatch.context() as m:
        m.setattr("safetensors.safe_open", reading_is_a_failure)
        with pytest.raises(MemoryError, match=r"dtype: .* as torch.float32, but this machine has .*"
                                              r"as torch.bfloat16 they take"):
            llada.load_model(folder, device="cpu", dtype=torch.float32)
    assert llada.load_model(folder, device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16  # half fits

    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: need // 4)
    with pytest.raises(MemoryError) as error:
        llada.load_model(folder, device="cpu", dtype=torch.float32)
    assert "bfloat16" not in str(error.value)  # no hint that would not fit either

    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: None)  # not Linux: no check
    llada.load_model(folder, device="cpu", dtype=torch.float32)


def test_the_memory_error_gives_sizes_in_units_that_show_them(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path, seed=3)
    params = sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values())
    assert 1_000 <= params < 250_000  # thousands of parameters, under 1 MB as float32
    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: 4 * params - 1)
    with pytest.raises(MemoryError) as error:
        llada.load_model(folder, device="cpu", dtype=torch.float32)
    assert str(error.value) == (
        f"dtype: the model's {params / 1e3:.2f}K parameters take {4 * params / 1e3:.1f} kB as torch.float32, "
        f"but this machine has {(4 * params - 1) / 1e3:.1f} kB of memory available; as torch.bfloat16 they "
        f"take {2 * params / 1e3:.1f} kB (CLI: --dtype bfloat16)")
    # LLaDA-8B: 2 * 126464 * 4096 (embedding and head) + 32 blocks * (4 * 4096^2 + 3 * 4096 * 12288 + 2 * 4096)
    # + 4096 = 8,015,581,184 parameters.
    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: 500_000_000)
    with pytest.raises(MemoryError) as error:
        llada.checkpoint._check_memory(llada.LLaDAConfig(), torch.device("cpu"), torch.bfloat16)
    assert str(error.value) == ("dtype: the model's 8.02B parameters take 16.0 GB as torch.bfloat16, but this "
                                "machine has 500.0 MB of memory available")


def meminfo_kib(key):
    for line in open("/proc/meminfo"):
        name, value = line.split(":", 1)
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux's /proc/meminfo")
def test_available_host_memory_reads_this_machine(monkeypatch):
    monkeypatch.setattr(llada.checkpoint, "_cgroup_memory_left", lambda: None)  # a container's limit aside
    before = (meminfo_kib("MemAvailable") + meminfo_kib("SwapFree")) * 1024
    available = llada.checkpoint._available_host_memory()
    after = (meminfo_kib("MemAvailable") + meminfo_kib("SwapFree")) * 1024
    assert available is not None
    slack = 256 << 20  # other processes allocate and free between the reads
    assert min(before, after) - slack <= available <= max(before, after) + slack


def test_available_host_memory_is_none_without_proc_meminfo(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("/proc/meminfo")

    monkeypatch.setattr(llada.checkpoint, "open", missing, raising=False)  # shadows the builtin there
    monkeypatch.setattr(llada.checkpoint, "_cgroup_memory_left", lambda: None)
    assert llada.checkpoint._available_host_memory() is None


@pytest.mark.parametrize("version", [2, 1])
def test_a_containers_memory_limit_caps_what_is_available(tmp_path, monkeypatch, version):
    # /proc/meminfo shows the host's memory; a container may give the process
    # far less, and a load past that limit is killed half-way.
    v1 = tmp_path / "memory"
    v1.mkdir()
    # 1.5 MB used, of which 0.5 MB inactive page cache (given back under pressure).
    files = ({"memory.max": "3000000\n", "memory.current": "1500000\n",
              "memory.stat": "anon 1000000\ninactive_file 500000\nactive_file 0\n"} if version == 2 else
             {"memory/memory.limit_in_bytes": "3000000\n", "memory/memory.usage_in_bytes": "1500000\n",
              "memory/memory.stat": "cache 500000\ntotal_inactive_file 500000\n"})
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cgroup_memory_left = llada.checkpoint._cgroup_memory_left
    left = cgroup_memory_left(tmp_path)
    assert left == 2000000
    monkeypatch.setattr(llada.checkpoint, "_cgroup_memory_left", lambda: left)
    assert llada.checkpoint._available_host_memory() == left  # the host has more than 2 MB
    unlimited = tmp_path / "unlimited"
    (unlimited / "memory").mkdir(parents=True)
    (unlimited / "memory.max").write_text("max\n")
    (unlimited / "memory.current").write_text("5\n")
    (unlimited / "memory/memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")
    (unlimited / "memory/memory.usage_in_bytes").write_text("5\n")
    assert cgroup_memory_left(unlimited) is None
    assert cgroup_memory_left(tmp_path / "absent") is None


def test_saved_weights_take_the_umask_without_changing_it(tmp_path):
    umask = os.umask(0o027)
    try:
        llada.checkpoint.save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("theta", [0, -1.0, float("nan"), float("inf")])
def test_rope_theta_must_be_finite_and_positive(tmp_path, theta):
    folder = make_checkpoint(tmp_path)
    edit_config(folder, rope_theta=theta)  # json writes NaN and Infinity, and reads them back
    with pytest.raises(ValueError, match=r"config\.json: rope_theta: expected a finite number > 0"):
        llada.load_model(folder, device="cpu")


SHARD = "model-00002-of-00003.safetensors"


@pytest.mark.parametrize("file,text,says", [
    ("config.json", "{oops", "not valid JSON"),
    ("config.json", "\ufeff{}", "not valid JSON"),  # a UTF-8 BOM
    ("config.json", "[1, 2]", "expected a JSON object, got a list"),
    ("tokenizer.json", "{oops", "not valid JSON"),
    ("model.safetensors.index.json", "{oops", "not valid JSON"),
    ("model.safetensors.index.json", "[]", "expected a JSON object, got a list"),
    ("model.safetensors.index.json", '{"weight_map": []}', "weight_map"),
    ("model.safetensors.index.json", '{"weight_map": {"model.transformer.wte.weight": 3}}',
     r"weight_map\['model.transformer.wte.weight'\]: expected a file name in the folder, got 3"),
    ("model.safetensors.index.json", '{"weight_map": {"model.transformer.wte.weight": "."}}',
     "expected a file name in the folder, got '.'"),
    ("model.safetensors.index.json", '{"weight_map": {"model.transformer.wte.weight": "../x"}}',
     "expected a file name in the folder"),
    (SHARD, "", "not a readable safetensors file"),
    (SHARD, "garbage" * 10, "not a readable safetensors file"),
])
def test_unreadable_files_are_named(tmp_path, capsys, file, text, says):
    folder = write_random_checkpoint(tmp_path, TINY, num_shards=3)
    (folder / file).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{file}: .*{says}"):
        llada.load_model(folder, device="cpu")
    # The CLI prints such errors as one line, not a traceback.
    assert main(["likelihood", "--model", str(folder), "--prompt", "a", "--answer", "b",
                           "--mc-num", "1", "--batch-size", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llada: error: ") and file in err and err.count("\n") == 1


@pytest.mark.parametrize("file", ["tokenizer_config.json", "special_tokens_map.json"])
@pytest.mark.parametrize("text, says", [("{oops", "not valid JSON"), ("[]", "expected a JSON object, got a list")])
def test_unreadable_tokenizer_files_are_named(tmp_path, file, text, says):
    folder = make_checkpoint(tmp_path)
    (folder / file).write_text(text)
    with pytest.raises(ValueError, match=f"{file}: {says}"):
        llada.load_tokenizer(folder)


@pytest.mark.parametrize("edit", [
    lambda t: dict(t, model={"type": "BPE", "vocab": 3}),
    lambda t: dict(t, added_tokens=None),
    lambda t: {key: value for key, value in t.items() if key != "model"},
], ids=["bad-model", "null-added-tokens", "no-model"])
def test_a_tokenizer_json_that_is_no_tokenizer_is_named(tmp_path, capsys, edit):
    folder = make_checkpoint(tmp_path)
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: "):
        llada.load_tokenizer(folder)
    # The CLI prints it as one line, not a traceback.
    assert main(["generate", "--model", str(folder), "--device", "cpu", "--gen-length", "4", "--steps", "4",
                 "--block-length", "4", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llada: error: ") and str(path) in err and err.count("\n") == 1


def test_loading_a_tokenizer_opens_no_socket_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder = make_checkpoint(tmp_path)
    # As in a process that has not chosen offline mode.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    before = dict(os.environ)
    tok = llada.load_tokenizer(folder)
    assert attempts == []
    assert dict(os.environ) == before
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == llada.load_config(folder).mask_token_id


def test_a_missing_tokenizer_json_is_named(tmp_path):
    folder = make_checkpoint(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r": no tokenizer\.json \(the fast tokenizer's file\)$"):
        llada.load_tokenizer(folder)


def test_broken_tokenizer_json_is_named(tmp_path):
    from llada.tokenizer import read_tokenizer

    folder = make_checkpoint(tmp_path)
    path = folder / "tokenizer.json"
    good = json.loads(path.read_text())
    eot = next(t for t in good["added_tokens"] if t["content"] == "<|eot_id|>")

    path.write_text("{oops")
    for load in (llada.load_config, read_tokenizer):
        with pytest.raises(ValueError, match="tokenizer.json: not"):
            load(folder)
    for tokens, says in [([dict(eot, id=None)], "added token '<|eot_id|>': expected a non-negative integer id"),
                         ("x", "added_tokens: expected a list")]:
        path.write_text(json.dumps(dict(good, added_tokens=tokens)))
        with pytest.raises(ValueError, match=f"tokenizer.json: {says}"):
            llada.load_config(folder)

    # An id is blamed on where it came from, not on config.json that does not hold it.
    path.write_text(json.dumps(dict(good, added_tokens=[dict(eot, id=5000)])))
    with pytest.raises(ValueError, match=r"^tokenizer\.json: <\|eot_id\|> has id 5000, which is outside"):
        llada.load_config(folder)
    path.write_text(json.dumps(good))
    for key, default in [("mask_token_id", 126336), ("eos_token_id", 126081)]:
        raw = json.loads((folder / "config.json").read_text())
        raw[key] = None  # null is as good as missing: the default applies
        with pytest.raises(ValueError, match=rf"^{key} = {default} \(the LLaDA-8B default; "
                                             rf"config\.json gives no {key}\) is outside"):
            config_from_dict(raw)


@pytest.mark.parametrize("key,value,expected", [
    ("n_kv_heads", 0, "a positive integer"),
    ("embedding_size", 0, "a positive integer"),
    ("mlp_hidden_size", 0, "a positive integer"),
    ("mlp_hidden_size", 80.0, "a positive integer"),
    ("n_layers", True, "a positive integer"),
    ("n_kv_heads", "4", "a positive integer"),
    ("max_sequence_length", -1, "a positive integer"),
    ("bos_token_id", -1, "a non-negative integer"),
    ("weight_tying", "false", "true or false"),
    ("weight_tying", 0, "true or false"),
    ("rms_norm_eps", -1.0, "a finite number >= 0"),
    ("rms_norm_eps", float("nan"), "a finite number >= 0"),
    ("rms_norm_eps", "x", "a finite number >= 0"),
    ("rope_theta", "abc", "a finite number > 0"),
    ("rope_theta", True, "a finite number > 0"),
    ("mlp_ratio", "4", "a finite number > 0"),
    ("mlp_ratio", -1, "a finite number > 0"),
    ("mlp_ratio", 0.001, "a value that gives at least 1 hidden unit with d_model 32"),
])
def test_config_types_and_ranges_are_checked(tmp_path, key, value, expected):
    folder = make_checkpoint(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    if key == "mlp_ratio":
        del raw["mlp_hidden_size"]  # mlp_ratio counts only without it
    raw[key] = value
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"config.json: {key}: expected {expected}, got {value!r}"):
        llada.load_config(folder)


@pytest.mark.parametrize("key,value", [("rope", 1), ("alibi", 0)])
def test_feature_flags_must_be_json_booleans(tmp_path, key, value):
    folder = make_checkpoint(tmp_path)
    edit_config(folder, **{key: value})
    with pytest.raises(ValueError, match=f"config.json: {key} = {value} is not supported"):
        llada.load_config(folder)


def test_non_float_and_unlisted_weights_are_rejected(tmp_path):
    name = "model.transformer.blocks.0.up_proj.weight"
    for dtype in (torch.int32, torch.int64, torch.bool):
        folder = make_checkpoint(tmp_path / str(dtype))
        edit_weights(folder, lambda w: w.update({name: w[name].to(dtype)}))
        with pytest.raises(ValueError, match=rf"{name} \(in model\.safetensors\): expected a floating-point "
                                             rf"dtype, got {dtype}"):
            llada.load_model(folder, device="cpu")

    # A tensor in a shard that the index does not list there is an error, as
    # an unknown tensor in model.safetensors is.
    sharded = write_random_checkpoint(tmp_path / "sharded", TINY, num_shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = str(sharded / SHARD)
    weights = load_file(shard)
    listed = next(n for n, f in index["weight_map"].items() if f != SHARD)
    for extra, says in [("model.transformer.extra.weight", "not part of a LLaDA model"),
                        (listed, f"not listed for {SHARD} in model.safetensors.index.json")]:
        save_file(dict(weights, **{extra: torch.zeros(3)}), shard)
        with pytest.raises(ValueError, match=rf"weight {extra} \(in {SHARD}\): {says}"):
            llada.load_model(sharded, device="cpu")


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0)])
def test_cpu_with_an_index_loads(tmp_path, device):
    model = llada.load_model(make_checkpoint(tmp_path), device=device)
    assert all(p.device == torch.device("cpu") for p in model.parameters())
