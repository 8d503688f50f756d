"""The LLaDA forward against the naive oracle on tiny random checkpoints."""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import llada
from llada.model import KVCache, LLaDAConfig, count_parameters, pack_projections

from checkpoints import SHAPES, TINY, make_checkpoint
from naive_llada import NaiveLLaDA


def rel_err(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def left_padded_batch(cfg, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, 256, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    ids[mask == 0] = cfg.pad_token_id
    return ids, mask


@pytest.fixture(scope="module", params=[
    dict(SHAPES["mha"]),
    dict(SHAPES["gqa"]),
    dict(TINY, n_kv_heads=1),
    dict(TINY, weight_tying=True, n_kv_heads=2),
    dict(TINY, embedding_size=288),
], ids=["mha", "gqa", "mqa", "tied", "padded-embedding"])
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=7, **request.param)


PACKED = pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])


@PACKED
@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_oracle(checkpoint, device, padded, packed):
    model = pack_projections(llada.load_model(checkpoint, device=device, dtype=torch.float32), packed)
    oracle = NaiveLLaDA(checkpoint)
    ids, mask = left_padded_batch(model.config, [11, 6, 1] if padded else [11, 11, 11])
    am = mask if padded else None
    got = model(ids.to(device), None if am is None else am.to(device)).logits.cpu()
    want = oracle.forward(ids, am)
    assert got.shape == (3, 11, model.config.embedding_size)
    assert rel_err(got, want) < 1e-5


@PACKED
def test_logits_at_selects_rows(checkpoint, device, packed):
    model = pack_projections(llada.load_model(checkpoint, device=device, dtype=torch.float32), packed)
    ids, mask = left_padded_batch(model.config, [9, 5], seed=1)
    ids, mask = ids.to(device), mask.to(device)
    full = model(ids, mask).logits
    where = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.4
    where[0, 3] = True
    rows = model(ids, mask, logits_at=where.to(device)).logits
    assert rows.shape == (int(where.sum()), model.config.embedding_size)
    assert rel_err(rows, full[where.to(device)]) < 1e-5
    where[1] = False  # a row with nothing to compute
    rows = model(ids, mask, logits_at=where.to(device)).logits
    assert rel_err(rows, full[where.to(device)]) < 1e-5
    none = model(ids, mask, logits_at=torch.zeros_like(where, device=device)).logits
    assert none.shape == (0, model.config.embedding_size)
    positions = torch.tensor([[8, 0, 3], [2, 2, 7]], device=device)
    picked = model(ids, mask, logits_at=positions).logits
    assert rel_err(picked, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))) < 1e-5
    for cut in (slice(2, 6), slice(None), slice(-3, None), slice(4, 4), slice(7, 100), slice(-100, -2),
                slice(6, 2), slice(None, None, 1)):
        sliced = model(ids, mask, logits_at=cut).logits
        assert sliced.shape == full[:, cut].shape
        if sliced.numel():
            assert rel_err(sliced, full[:, cut]) < 1e-5


@PACKED
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_low_precision_close_to_fp32_oracle(checkpoint, device, dtype, tol, packed):
    model = pack_projections(llada.load_model(checkpoint, device=device, dtype=dtype), packed)
    assert model.dtype == dtype
    ids, mask = left_padded_batch(model.config, [10, 4], seed=3)
    got = model(ids.to(device), mask.to(device)).logits
    assert got.dtype == dtype
    assert rel_err(got.cpu(), NaiveLLaDA(checkpoint).forward(ids, mask)) < tol


def test_padding_keys_are_ignored(checkpoint):
    """Changing the token under a padding key must not change any other logit."""
    model = llada.load_model(checkpoint, device="cpu")
    ids, mask = left_padded_batch(model.config, [8, 5], seed=4)
    other = ids.clone()
    other[1, 0] = 3
    a, b = model(ids, mask).logits, model(other, mask).logits
    assert torch.allclose(a[:, 1:], b[:, 1:], rtol=0, atol=1e-5)
    assert not torch.allclose(model(ids).logits[1], model(other).logits[1])


def test_parameter_count_and_names(checkpoint):
    from safetensors import safe_open

    model = llada.load_model(checkpoint, device="cpu")
    # Counted from the checkpoint file itself, not from llada's model.
    with safe_open(str(Path(checkpoint) / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert count_parameters(model.config) == stored == sum(p.numel() for p in model.parameters())
    names = set(dict(model.named_parameters()))
    assert "model.transformer.blocks.1.up_proj.weight" in names
    assert ("model.transformer.ff_out.weight" in names) != model.config.weight_tying


def test_logits_at_rejects_bad_shapes(tmp_path):
    model = llada.load_model(make_checkpoint(tmp_path), device="cpu")
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="logits_at"):
        model(ids, logits_at=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="logits_at"):
        model(ids, logits_at=torch.tensor([[0, 5], [1, 1]]))
    with pytest.raises(ValueError, match="logits_at"):
        model(ids, logits_at=torch.ones(2, 5))
    with pytest.raises(ValueError, match="logits_at.*step 1"):
        model(ids, logits_at=slice(0, 5, 2))
    with pytest.raises(TypeError, match="logits_at"):
        model(ids, logits_at=[0, 1])
    with pytest.raises(TypeError, match="logits_at.*ints"):
        model(ids, logits_at=slice(0.5, 3))


def test_bad_ids_and_masks_are_named(tmp_path):
    model = llada.load_model(make_checkpoint(tmp_path), device="cpu")
    for ids in (torch.zeros(5, dtype=torch.long), torch.zeros(1, 2, 5, dtype=torch.long),
                torch.zeros(2, 5), torch.zeros(0, 5, dtype=torch.long), [[1, 2]]):
        with pytest.raises(ValueError, match="^input_ids"):
            model(ids)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^attention_mask: expected a tensor of shape \(2, 5\)"):
        model(ids, torch.ones(2, 4))
    cache = KVCache(model.config, 2, 9, torch.device("cpu"), torch.float32)
    model(ids, torch.ones(2, 9), cache=cache, start=4)  # with a cache the mask covers every position
    with pytest.raises(ValueError, match=r"^attention_mask: expected a tensor of shape \(2, 9\)"):
        model(ids, torch.ones(2, 5), cache=cache, start=4)


def test_a_cache_that_does_not_fit_the_model_is_named(tmp_path):
    # A cache of fewer layers would skip blocks, one of another dtype or
    # shape fail deep inside: each is refused by name before any work.
    model = llada.load_model(make_checkpoint(tmp_path), device="cpu")
    config, ids = model.config, torch.zeros(2, 5, dtype=torch.long)
    fewer = dataclasses.replace(config, n_layers=config.n_layers - 1)
    for cache, match in (
        (KVCache(fewer, 2, 9, "cpu", torch.float32), f"holds {config.n_layers - 1} layers"),
        (KVCache(config, 2, 9, "cpu", torch.bfloat16), "expected keys and values torch.float32"),
        (KVCache(dataclasses.replace(config, n_kv_heads=1, n_heads=config.n_heads), 2, 9, "cpu", torch.float32),
         "expected keys and values"),
    ):
        with pytest.raises(ValueError, match=f"^cache: {match}"):
            model(ids, cache=cache, start=4)
    cache = KVCache(config, 2, 9, "cpu", torch.float32)
    for start in (2.5, True):
        with pytest.raises(TypeError, match="^start: expected an int"):
            model(ids, cache=cache, start=start)
    for mask in (None, torch.ones(2, 9)):  # a mask's expected shape comes from the cache: checked after it
        with pytest.raises(TypeError, match="^cache: expected a KVCache, got list$"):
            model(ids, mask, cache=[], start=4)


def test_positions_that_are_not_a_tensor_are_named_with_their_type(tmp_path):
    # A list failed on a missing attribute, a numpy array with a message
    # that printed the expected shape as the one got.
    model = llada.load_model(make_checkpoint(tmp_path), device="cpu")
    cache = KVCache(model.config, 2, 10, "cpu", torch.float32)
    model(torch.zeros(2, 10, dtype=torch.long), cache=cache)
    for positions, got in (([0, 1, 2, 3, 4, 5], "list"), (np.arange(6), "ndarray")):
        with pytest.raises(TypeError, match=rf"^positions: expected an int64 tensor \[6\] on cpu, got {got}$"):
            model(torch.zeros(2, 6, dtype=torch.long), cache=cache, positions=positions)


def test_an_attention_mask_that_is_not_a_tensor_is_named_with_its_type(tmp_path):
    # A numpy mask of the right shape was refused as if its shape were wrong.
    model = llada.load_model(make_checkpoint(tmp_path), device="cpu")
    ids = torch.zeros(2, 6, dtype=torch.long)
    cache = KVCache(model.config, 2, 10, "cpu", torch.float32)
    for mask, got in ((np.ones((2, 6)), "ndarray"), ([[1] * 6] * 2, "list")):
        with pytest.raises(TypeError, match=rf"^attention_mask: expected a tensor of shape \(2, 6\), got {got}$"):
            model(ids, mask)
    with pytest.raises(TypeError, match=r"^attention_mask: expected a tensor of shape \(2, 10\), got ndarray$"):
        model(ids, np.ones((2, 10)), cache=cache)


def test_numpy_ints_bound_a_logits_slice(tmp_path):
    # As in Python's own slicing.
    checkpoint = make_checkpoint(tmp_path)
    model = llada.load_model(checkpoint, device="cpu")
    ids, _ = left_padded_batch(model.config, [7, 7], seed=5)
    want = NaiveLLaDA(checkpoint).forward(ids)
    for cut, rows in ((slice(np.int64(1), np.int32(3)), slice(1, 3)), (slice(np.int64(-3), None), slice(4, 7)),
                      (slice(None, np.uint8(100)), slice(0, 7))):
        got = model(ids, logits_at=cut).logits
        assert got.shape == (2, rows.stop - rows.start, model.config.embedding_size)
        assert rel_err(got, want[:, rows]) < 1e-5


def test_start_none_without_a_cache_is_no_start(tmp_path):
    # Without a cache start means nothing, so None (no start) is as good as the default.
    checkpoint = make_checkpoint(tmp_path)
    model = llada.load_model(checkpoint, device="cpu")
    ids, _ = left_padded_batch(model.config, [7, 7], seed=6)
    assert rel_err(model(ids, start=None).logits, NaiveLLaDA(checkpoint).forward(ids)) < 1e-5
    with pytest.raises(ValueError, match="^start, positions: only meaningful with a cache$"):
        model(ids, start=2)


def test_start_none_with_a_cache_is_where_positions_say(tmp_path):
    # None is "no start": position 0, or the positions given instead.
    model = llada.load_model(make_checkpoint(tmp_path), device="cpu")
    ids, _ = left_padded_batch(model.config, [9, 9], seed=7)
    want = model(ids).logits
    cache = KVCache(model.config, 2, 9, "cpu", torch.float32)
    assert rel_err(model(ids, cache=cache, start=None).logits, want) < 1e-5
    cache = KVCache(model.config, 2, 9, "cpu", torch.float32)
    model(ids, cache=cache)  # every position's keys, as a full forward sees them
    tail = model(ids[:, 4:], cache=cache, start=None, positions=torch.arange(4, 9)).logits
    assert rel_err(tail, want[:, 4:]) < 1e-5
    with pytest.raises(ValueError, match="^start: give either start or positions, not both$"):
        model(ids[:, 4:], cache=cache, start=4, positions=torch.arange(4, 9))


SIZES = ["d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
         "max_sequence_length"]


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("value", [0, -2, True, 2.0, "4", None])
def test_config_sizes_must_be_positive_ints(name, value):
    # 0 heads would divide by zero, 0 layers fail in the forward, a float or
    # a bool size deep inside torch: each is refused by name at the config.
    with pytest.raises(ValueError, match=f"^{name}: expected an int >= 1, got {re.escape(repr(value))}$"):
        LLaDAConfig(**{name: value})


@pytest.mark.parametrize("name, value, expected", [
    *[("rope_theta", v, "a finite number > 0") for v in (0, 0.0, -1e4, math.nan, math.inf, np.float32(math.nan),
                                                        10**400, "1e4", True, None)],
    *[("rms_norm_eps", v, "a finite number >= 0") for v in (-1.0, -1e-30, math.nan, -math.inf, "1e-5", False,
                                                           None)],
    *[("weight_tying", v, "True or False") for v in ("no", 0, 1, None, np.bool_(True))],
], ids=lambda v: repr(v) if len(repr(v)) < 24 else f"{type(v).__name__}-{len(repr(v))}-digits")
def test_config_rope_theta_norm_eps_and_tying_are_checked(name, value, expected):
    # rope_theta <= 0 or NaN would make every logit NaN, a negative eps fail
    # inside the norm naming its own eps, and weight_tying="no" tie the head.
    with pytest.raises(ValueError, match=f"^{name}: expected {expected}, got {re.escape(repr(value))}$"):
        LLaDAConfig(**{name: value})


def test_config_takes_python_and_numpy_numbers_as_floats():
    config = LLaDAConfig(rope_theta=np.float32(10000.0), rms_norm_eps=0, weight_tying=True)
    assert (config.rope_theta, config.rms_norm_eps, config.weight_tying) == (10000.0, 0.0, True)
    assert type(config.rope_theta) is float and type(config.rms_norm_eps) is float
    config = LLaDAConfig(rope_theta=500000, rms_norm_eps=np.float64(1e-6))
    assert (config.rope_theta, config.rms_norm_eps) == (500000.0, 1e-6)
    assert type(config.rope_theta) is float and type(config.rms_norm_eps) is float


SMALL = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=1, mlp_hidden_size=128, vocab_size=300,
             embedding_size=300, bos_token_id=296, eos_token_id=297, pad_token_id=297, eot_token_id=298,
             mask_token_id=299)


@pytest.mark.parametrize("name, value", [
    *[(name, v) for name in ("mask_token_id", "eos_token_id", "pad_token_id")
      for v in (None, True, "299", 299.0, -1, 300, 5000)],
    *[(name, v) for name in ("bos_token_id", "eot_token_id") for v in (True, False, "0", 1.0, -1, 300, 5000)],
], ids=repr)
def test_config_special_ids_must_be_rows_of_the_embedding(name, value):
    # True would be token 1, None the 8B mask id in the sampler, 5000 an EoT
    # that never stops a 300-row model: each is refused by name at the config.
    optional = "None or " if name in ("bos_token_id", "eot_token_id") else ""
    message = f"{name}: expected {optional}an int in [0, 300) (the embedding's rows), got {value!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LLaDAConfig(**dict(SMALL, **{name: value}))


def test_config_takes_special_ids_within_the_embedding():
    # Its padding rows (beyond vocab_size) included; BOS and EoT may be absent,
    # as in LLaDA's config.json.
    config = LLaDAConfig(**dict(SMALL, vocab_size=290, mask_token_id=np.int64(299), eos_token_id=0,
                                pad_token_id=0, bos_token_id=None, eot_token_id=None))
    assert (config.mask_token_id, config.eos_token_id, config.bos_token_id, config.eot_token_id) == \
        (299, 0, None, None)
    default = LLaDAConfig()  # LLaDA-8B's ids
    assert (default.mask_token_id, default.eos_token_id, default.pad_token_id, default.bos_token_id,
            default.eot_token_id) == (126336, 126081, 126081, 126080, 126348)


def test_the_smallest_config_makes_a_working_model():
    from llada.checkpoint import random_model

    sizes = dict.fromkeys(SIZES, 1) | dict(d_model=2)  # RoPE needs an even head size
    config = LLaDAConfig(**sizes, mask_token_id=0, eos_token_id=0, pad_token_id=0, bos_token_id=None,
                         eot_token_id=None)
    assert config.head_dim == 2
    logits = random_model(config)(torch.zeros(1, 1, dtype=torch.long)).logits
    assert logits.shape == (1, 1, 1) and bool(logits.isfinite().all())


def forward_with_backend(model, ids, mask, backend):
    """The model's logits with the given attention backend, and how many
    times it called the fused attention op."""
    from llada.model import set_attention_backend

    calls = []
    fused = llada.ops.attention
    set_attention_backend(backend)
    try:
        llada.ops.attention = lambda *a, **k: calls.append(1) or fused(*a, **k)
        return model(ids, mask).logits, len(calls)
    finally:
        llada.ops.attention = fused
        set_attention_backend("llada")


@pytest.mark.parametrize("backend", ["llada", "sdpa"])
def test_fused_attention_backend_matches_oracle(tmp_path, device, backend):
    # Head dim 64 (GQA 2:1): the shape the fused attention kernels serve.
    folder = make_checkpoint(tmp_path, seed=3, d_model=128, n_heads=2, n_kv_heads=1)
    oracle = NaiveLLaDA(folder)
    ids = torch.randint(0, 256, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    want = oracle.forward(ids, mask)
    model = llada.load_model(folder, dtype=torch.float32, device=device)
    got, calls = forward_with_backend(model, ids.to(device), mask.to(device), backend)
    # One call per layer; on CUDA float32 goes to SDPA (the op's float32
    # kernel there is a test reference, not a fast path).
    assert calls == (2 if backend == "llada" and device == "cpu" else 0)
    rel = (got.double().cpu() - want).abs().max() / want.abs().max()
    assert rel < 1e-5
    if device == "cuda" and backend == "llada":
        # In bfloat16 (the tensor-core kernels): no further off the oracle
        # than twice the model with torch's attention.
        model = llada.load_model(folder, dtype=torch.bfloat16, device=device)
        errors = {}
        for name in ("llada", "sdpa"):
            logits, calls = forward_with_backend(model, ids.to(device), mask.to(device), name)
            assert calls == (2 if name == "llada" else 0)
            errors[name] = (logits.double().cpu() - want).abs().max().item()
        assert errors["llada"] <= 2 * errors["sdpa"], errors


def projection_storages(model):
    """Per block, the distinct storages of (q, k, v) and of (ff_proj, up_proj)."""
    def storages(*linears):
        return len({linear.weight.untyped_storage().data_ptr() for linear in linears})
    return [(storages(b.q_proj, b.k_proj, b.v_proj), storages(b.ff_proj, b.up_proj))
            for b in model.model.transformer["blocks"]]


def test_packing_keeps_the_parameters(tmp_path, device, monkeypatch):
    folder = make_checkpoint(tmp_path, seed=5, **SHAPES["gqa"])
    model = llada.load_model(folder, device=device, dtype=torch.float32)
    n_layers = model.config.n_layers
    # load_model packs on CUDA only (one wide GEMM pays there, not on CPU).
    assert projection_storages(model) == [(1, 1) if device == "cuda" else (3, 2)] * n_layers
    before = {name: t.clone() for name, t in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0)).to(device)
    linear, gemms = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: gemms.append(1) or linear(*a))
    logits = {}
    for packed in (True, True, False, False, True):  # each way twice: a no-op the second time
        pack_projections(model, packed)
        assert projection_storages(model) == [(1, 1) if packed else (3, 2)] * n_layers
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[name], t) for name, t in before.items())
        assert not any(p.requires_grad for p in model.parameters())
        gemms.clear()
        logits[packed] = model(ids).logits
        # Per block: q, k, v | attn_out | ff_proj, up_proj | ff_out; then the head.
        assert len(gemms) == n_layers * (4 if packed else 7) + 1
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    # Converted on CUDA, a model is packed again; elsewhere every weight gets
    # its own buffer, and the forward notices and runs one GEMM each.
    half = model.to(torch.bfloat16)
    assert projection_storages(half) == [(1, 1) if device == "cuda" else (3, 2)] * n_layers
    assert list(half.state_dict()) == list(before)
    want = llada.load_model(folder, device=device, dtype=torch.bfloat16)(ids).logits
    torch.testing.assert_close(half(ids).logits, want, rtol=0, atol=0)
    if device == "cuda":
        moved = llada.load_model(folder, device="cpu", dtype=torch.float32).cuda()
        assert projection_storages(moved) == [(1, 1)] * n_layers
        assert projection_storages(moved.cpu()) == [(3, 2)] * n_layers


def test_packed_model_trains_like_a_separate_one(tmp_path):
    """With gradients the projections run one GEMM each (a GEMM over the
    packed buffer would not give each parameter its gradient); an optimizer
    step through the views updates the packed buffer in place."""
    folder = make_checkpoint(tmp_path, seed=6)
    models = [llada.load_model(folder, device="cpu", dtype=torch.float32).train() for _ in range(2)]
    pack_projections(models[1])
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in models:
        for p in model.parameters():
            p.requires_grad_(True)
        model(ids).logits.logsumexp(-1).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)
    assert projection_storages(models[1])[0] == (1, 1)
    with torch.no_grad():
        torch.testing.assert_close(models[1](ids).logits, models[0](ids).logits, rtol=1e-5, atol=1e-5)


def test_training_only_k_and_v_projections_gets_their_gradients(tmp_path):
    """Frozen embeddings and q_proj, trainable k_proj and v_proj: the queries
    need no gradient, the keys and values do, so the model must take the
    differentiable attention (torch's SDPA) and give the gradients the sdpa
    backend gives."""
    from llada.model import set_attention_backend

    folder = make_checkpoint(tmp_path, seed=8, d_model=128, n_heads=2, n_kv_heads=1)  # head dim 64
    model = llada.load_model(folder, dtype=torch.float32, device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    block = model.model.transformer["blocks"][0]
    trained = (block.k_proj.weight, block.v_proj.weight)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    grads = {}
    try:
        for backend in ("llada", "sdpa"):
            set_attention_backend(backend)
            for w in trained:
                w.requires_grad_(True)
                w.grad = None
            model(ids).logits.logsumexp(-1).mean().backward()
            grads[backend] = [w.grad for w in trained]
    finally:
        set_attention_backend("llada")
    for got, want in zip(grads["llada"], grads["sdpa"]):
        assert want is not None and want.abs().sum() > 0
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_cache_write_of_values_that_need_a_gradient_keeps_it():
    """store_kv with keys that need no gradient and values that do: the
    composition runs, and the values' gradient flows from the cache."""
    from llada.model import store_kv

    g = torch.Generator().manual_seed(9)
    k, v = torch.randn(1, 3, 2, 64, generator=g), torch.randn(1, 3, 2, 64, generator=g).requires_grad_(True)
    cos, sin = torch.ones(1, 3, 64), torch.zeros(1, 3, 64)  # the identity rotation
    cache_k, cache_v = torch.zeros(1, 5, 2, 64), torch.zeros(1, 5, 2, 64)
    positions = torch.tensor([4, 0, 2])
    store_kv(k, v, cos, sin, cache_k, cache_v, positions)
    weights = torch.randn(1, 5, 2, 64, generator=g)
    (cache_v * weights).sum().backward()
    torch.testing.assert_close(v.grad, weights[:, positions], rtol=0, atol=0)
    torch.testing.assert_close(cache_k[:, positions], k, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_mode_derivatives_agree_with_reverse_mode(tmp_path, dtype):
    """torch.func.jvp through the model, which its kernels cannot give: the
    model must take its differentiable compositions for tangents, as it does
    for gradients. Forward and reverse mode then agree, <u, J t> = <J^T u, t>
    (a dropped tangent makes the left side wrong, not an error)."""
    folder = make_checkpoint(tmp_path, seed=8, d_model=128, n_heads=2, n_kv_heads=1)  # head dim 64
    model = llada.load_model(folder, dtype=dtype, device="cpu")
    params = {name: p.detach() for name, p in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    tangents = {name: torch.randn(p.shape, generator=g).to(dtype) for name, p in params.items()}
    ids = torch.randint(0, 256, (2, 9), generator=g)

    def logits_of(weights):
        return torch.func.functional_call(model, weights, (ids,)).logits.float()

    _, forward = torch.func.jvp(logits_of, (params,), (tangents,))
    _, pull_back = torch.func.vjp(logits_of, params)
    u = torch.randn(forward.shape, generator=g)
    (gradients,) = pull_back(u)
    left = (u * forward).sum().double()
    right = sum((gradients[name].double() * tangents[name].double()).sum() for name in params)
    assert left.abs() > 0
    torch.testing.assert_close(left, right, rtol=1e-4 if dtype == torch.float32 else 3e-2, atol=0)


def test_forward_mode_derivatives_through_a_cache(tmp_path):
    """A cached forward differentiated by a cache's keys (the model writes
    the caches, so a tangent there must take the compositions too): forward
    and reverse mode agree, <u, J t> = <J^T u, t>."""
    folder = make_checkpoint(tmp_path, seed=9, d_model=128, n_heads=2, n_kv_heads=1)  # head dim 64
    model = llada.load_model(folder, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 256, (1, 8), generator=g)
    filled = KVCache(model.config, 1, 8, "cpu", torch.float32)
    with torch.no_grad():
        model(ids, cache=filled, start=0)
    keys, others = filled.layers[0][0], filled.layers

    def logits_of(k0):
        cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
        cache.layers = [(k0.clone(), others[0][1].clone())] + [(k.clone(), v.clone()) for k, v in others[1:]]
        return model(ids[:, 4:6], cache=cache, start=4).logits

    t = torch.randn(keys.shape, generator=g)
    _, forward = torch.func.jvp(logits_of, (keys,), (t,))
    _, pull_back = torch.func.vjp(logits_of, keys)
    u = torch.randn(forward.shape, generator=g)
    (gradient,) = pull_back(u)
    left, right = (u * forward).sum().double(), (gradient * t).sum().double()
    assert left.abs() > 0
    torch.testing.assert_close(left, right, rtol=1e-4, atol=0)
