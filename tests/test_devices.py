"""Which GPUs the compiled kernels run on, and decoding without them: on a
GPU the build has no code for, every op runs its reference and the model its
torch compositions, with the results of the kernels."""

import re
import warnings

import pytest
import torch

import llada
from llada import devices
from llada.policies import DecodePolicy

from checkpoints import SHAPES, make_checkpoint

OPS = ("sample_tokens", "select_positions", "commit_tokens", "attention", "rms_norm", "add_rms_norm",
       "rope", "silu_mul", "store_kv")


@pytest.mark.parametrize("architectures, capability, runs", [
    # The default build: SASS and PTX of 80 and 90.
    ("80,90", (8, 0), True),
    ("80,90", (8, 6), True),     # SASS of the family
    ("80,90", (8, 9), True),
    ("80,90", (9, 0), True),
    ("80,90", (10, 0), True),    # PTX, compiled by the driver
    ("80,90", (12, 0), True),
    ("80,90", (7, 5), False),    # a T4: nothing old enough
    ("80,90", (7, 0), False),    # a V100
    ("90", (8, 0), False),       # PTX runs only on newer GPUs
    ("80-real", (8, 6), True),
    ("80-real", (9, 0), False),  # SASS alone: its family only
    ("86-real", (8, 0), False),  # ... at or above its minor version
    ("80-virtual", (8, 0), True),
    ("80-virtual", (9, 0), True),
    ("90a", (9, 0), True),       # code for that one architecture
    ("90a", (10, 0), False),
    ("100f", (10, 3), True),     # ... or its family
    ("100f", (12, 0), False),
    ("80;90", (7, 5), False),    # CMake's own separator
    ("75-real;90", (7, 5), True),
    ("native", (7, 5), True),
    ("", (9, 0), False),         # no CUDA kernels built
])
def test_architectures_cover(architectures, capability, runs):
    assert devices.architectures_cover(architectures, capability) is runs


@pytest.fixture
def fresh_answers(monkeypatch):
    """No answer cached for any device, before and after the test."""
    devices._cuda_kernels_run_on.cache_clear()
    monkeypatch.setattr(devices, "_answers", {})
    yield
    devices._cuda_kernels_run_on.cache_clear()


def runtime_warnings(fn):
    """fn's result and the messages of every RuntimeWarning it raised (each
    one: not deduplicated by Python's warning filters)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_gpu_without_code_is_reported_once(monkeypatch, fresh_answers):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices._C, "cuda_compiled", lambda: True)
    monkeypatch.setattr(devices._C, "cuda_architectures", lambda: "80,90")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    check = devices._cuda_kernels_run_on
    runs, said = runtime_warnings(lambda: [check(1), check(1), devices.kernels_run_on(torch.device("cuda", 1))])
    assert runs == [False, False, False]
    assert len(said) == 1
    assert re.search(r"architectures 80,90\) do not run on cuda:1 \(compute capability 7.5", said[0])
    # Another device: its own warning, once.
    runs, said = runtime_warnings(lambda: [check(2), check(2)])
    assert runs == [False, False] and len(said) == 1 and "on cuda:2 (compute" in said[0]
    # The current device is looked up on every call (it may change), and still said once.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    runs, said = runtime_warnings(lambda: [devices.kernels_run_on(torch.device("cuda")) for _ in range(3)])
    assert runs == [False] * 3 and len(said) == 1 and "on cuda:3 (compute" in said[0]

    devices._cuda_kernels_run_on.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check(1) and check(1)
    devices._cuda_kernels_run_on.cache_clear()
    monkeypatch.setattr(devices._C, "cuda_compiled", lambda: False)  # built without nvcc
    runs, said = runtime_warnings(lambda: [check(1), check(1)])
    assert runs == [False, False] and len(said) == 1
    assert said[0].startswith("llada: this build has no CUDA kernels") and "on cuda:1 in" in said[0]


def test_devices_other_than_cuda_go_to_the_dispatcher():
    assert devices.kernels_run_on(torch.device("cpu"))
    assert devices.kernels_run_on(torch.device("meta"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("devices"), seed=3, **SHAPES["gqa"])
    return llada.load_model(folder, dtype=torch.float32, device="cpu")


@pytest.fixture
def no_kernels(monkeypatch):
    """As on a GPU without code in this build: the kernels report that they
    cannot run, and calling one fails the test."""
    monkeypatch.setattr(devices, "kernels_run_on", lambda device: False)
    for name in OPS:
        def called(*args, name=name, **kwargs):
            raise AssertionError(f"torch.ops.llada.{name} ran")
        monkeypatch.setattr(torch.ops.llada, name, called)


@pytest.mark.parametrize("policy", [None, DecodePolicy(cache="dual"), DecodePolicy.fast(cache="prefix"),
                                    DecodePolicy(commit="threshold", remask_below=0.3)],
                         ids=["exact", "dual", "prefix-threshold", "remask"])
def test_decoding_without_the_kernels_gives_the_same_tokens(model, policy, request):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (2, 6), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    kw = dict(steps=16, gen_length=16, block_length=8, policy=policy)
    with torch.no_grad():
        logits = model(prompt, mask).logits
    want = llada.generate(model, prompt, mask, **kw)
    request.getfixturevalue("no_kernels")
    with torch.no_grad():
        assert torch.allclose(model(prompt, mask).logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(llada.generate(model, prompt, mask, **kw), want)


def test_every_op_runs_its_reference_without_the_kernels(no_kernels):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    choice = llada.sample_tokens(logits, temperature=0.7, seed=4, suppress_ids=[2])
    want = llada.ops.sample_tokens_reference(logits, temperature=0.7, seed=4, suppress_ids=[2])
    assert all(torch.equal(a, b) for a, b in zip(choice, want))
    confidence = torch.rand(2, 9, generator=g)
    assert torch.equal(llada.select_positions(confidence, "topk", k=3).sum(1), torch.tensor([3, 3]))
    assert torch.equal(llada.select_positions(confidence, "threshold", threshold=0.5),
                       llada.ops.select_positions_reference(confidence, "threshold", threshold=0.5))
    canvas = torch.tensor([[9, 9, 1]])
    assert llada.commit_tokens(canvas, torch.tensor([[4, 5, 6]]), torch.tensor([[True, False, False]]), 9).tolist() == [1]
    assert canvas.tolist() == [[4, 9, 1]]
    q, k = torch.randn(1, 5, 4, 64, generator=g), torch.randn(1, 7, 2, 64, generator=g)
    out = llada.attention(q, k, k)
    assert out.dtype == q.dtype and torch.allclose(out, llada.ops.attention_reference(q, k, k).float(), atol=1e-5)
    x, w = torch.randn(2, 3, 8, generator=g), torch.randn(8, generator=g)
    assert torch.equal(llada.rms_norm(x, w, 1e-5), llada.ops.rms_norm_reference(x, w, 1e-5))
    s, normed = llada.add_rms_norm(x, x, w, 1e-5)
    assert torch.equal(s, 2 * x) and torch.equal(normed, llada.ops.rms_norm_reference(2 * x, w, 1e-5))
    cos, sin = torch.randn(1, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    assert torch.equal(llada.rope(q, cos, sin), llada.ops.rope_reference(q, cos, sin))
    assert torch.equal(llada.silu_mul(x, w.expand(2, 3, 8)), torch.nn.functional.silu(x) * w)
    cache_k, cache_v = torch.zeros(1, 9, 4, 64), torch.zeros(1, 9, 4, 64)
    llada.store_kv(q, q, cos, sin, cache_k, cache_v, torch.tensor([0, 2, 4, 6, 8]))
    assert torch.equal(cache_k[:, ::2], llada.ops.rope_reference(q, cos, sin))
    assert torch.equal(cache_v[:, ::2], q) and not cache_v[:, 1::2].any()


def test_every_op_passes_its_arguments_to_its_reference_without_the_kernels(no_kernels):
    g = torch.Generator().manual_seed(2)
    ref = llada.ops
    # sample_tokens: temperature > 0, suppressed ids and per-row noise keys.
    logits = torch.randn(16, 50, generator=g)
    rows = torch.randperm(1000, generator=g)[:16]
    kw = dict(temperature=1.5, seed=7, suppress_ids=[2, 30])
    choice = llada.sample_tokens(logits, noise_rows=rows, **kw)
    want = ref.sample_tokens_reference(logits, 1.5, 7, [2, 30], rows)
    assert all(torch.equal(a, b) for a, b in zip(choice, want))
    assert not torch.equal(want.tokens, ref.sample_tokens_reference(logits, 1.5, 7, [2, 30]).tokens)
    assert not torch.isin(choice.tokens, torch.tensor([2, 30])).any()
    # select_positions: every rule, with k, threshold and factor other than their defaults.
    confidence = torch.rand(4, 12, generator=g) ** 0.3
    confidence[1, 3] = -torch.inf
    k = torch.tensor([0, 2, 5, 12])
    for rule, args in [("topk", dict(k=k)), ("topk", dict(k=4)), ("threshold", dict(threshold=0.7)),
                       ("factor", dict(factor=2.5)), ("threshold", dict(threshold=0.7, factor=2.5))]:
        got = llada.select_positions(confidence, rule, **args)
        assert torch.equal(got, ref.select_positions_reference(confidence, rule, **args)), (rule, args)
    assert not torch.equal(llada.select_positions(confidence, "threshold", threshold=0.7),
                           llada.select_positions(confidence, "threshold"))
    assert not torch.equal(llada.select_positions(confidence, "factor", factor=2.5),
                           llada.select_positions(confidence, "factor"))
    # commit_tokens: re-masking wins over accepting.
    canvas = torch.tensor([[9, 9, 9, 1], [9, 3, 9, 9]])
    accepted = torch.tensor([[True, True, False, False], [False, False, True, True]])
    remask = torch.tensor([[False, True, False, True], [False, False, False, True]])
    x0 = torch.tensor([[4, 5, 6, 7], [8, 8, 8, 8]])
    assert llada.commit_tokens(canvas, x0, accepted, 9, remask).tolist() == [3, 2]
    assert canvas.tolist() == [[4, 9, 9, 9], [9, 3, 8, 9]]
    # attention: a key mask (a row of padding, a batch row with no valid key) and a scale.
    q, k = torch.randn(3, 5, 4, 64, generator=g), torch.randn(3, 7, 2, 64, generator=g)
    v = torch.randn(3, 7, 2, 64, generator=g)
    key_mask = torch.ones(3, 7, dtype=torch.bool)
    key_mask[0, 4:] = False
    key_mask[2] = False
    out = llada.attention(q, k, v, key_mask, scale=0.3)
    want = ref.attention_reference(q, k, v, key_mask, 0.3)
    assert out.dtype == q.dtype and torch.allclose(out, want.float(), atol=1e-5)
    assert not out[2].any()
    assert not torch.allclose(want, ref.attention_reference(q, k, v, key_mask), atol=1e-3)
    assert not torch.allclose(want, ref.attention_reference(q, k, v, None, 0.3), atol=1e-3)


def _bad_calls():
    """Calls each op refuses, one per argument check: (name, call)."""
    x, w = torch.randn(2, 8), torch.ones(8)
    conf = torch.rand(2, 6)
    canvas, x0 = torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    acc = torch.ones(2, 5, dtype=torch.bool)
    q, kv = torch.randn(1, 3, 4, 64), torch.randn(1, 5, 2, 64)
    cos, sin = torch.ones(1, 5, 64), torch.zeros(1, 5, 64)
    cache = torch.zeros(1, 9, 2, 64)
    at = torch.arange(5)
    return [
        ("logits 1-D", lambda: llada.sample_tokens(torch.randn(5))),
        ("logits int", lambda: llada.sample_tokens(torch.ones(2, 5, dtype=torch.long))),
        ("temperature < 0", lambda: llada.sample_tokens(x, temperature=-1.0)),
        ("temperature nan", lambda: llada.sample_tokens(x, temperature=float("nan"))),
        ("noise_rows short", lambda: llada.sample_tokens(x, 1.0, noise_rows=torch.tensor([1]))),
        ("factor < 0", lambda: llada.select_positions(conf, "factor", factor=-1.0)),
        ("threshold nan", lambda: llada.select_positions(conf, "threshold", threshold=float("nan"))),
        ("confidence float64", lambda: llada.select_positions(conf.double(), "topk", k=1)),
        ("k rows", lambda: llada.select_positions(conf, "topk", k=torch.tensor([1]))),
        ("k < 0", lambda: llada.select_positions(conf, "topk", k=torch.tensor([1, -2]))),
        ("canvas int32", lambda: llada.commit_tokens(canvas.int(), x0, acc, 9)),
        ("x0 shape", lambda: llada.commit_tokens(canvas, x0[:, :3], acc, 9)),
        ("accepted long", lambda: llada.commit_tokens(canvas, x0, acc.long(), 9)),
        ("key_mask float", lambda: llada.attention(q, kv, kv, torch.ones(1, 5))),
        ("key_mask shape", lambda: llada.attention(q, kv, kv, torch.ones(1, 4, dtype=torch.bool))),
        ("head dim 32", lambda: llada.attention(q[..., :32], kv[..., :32], kv[..., :32])),
        ("kv heads", lambda: llada.attention(q, torch.randn(1, 5, 3, 64), torch.randn(1, 5, 3, 64))),
        ("v dtype", lambda: llada.attention(q, kv, kv.double())),
        ("scale", lambda: llada.attention(q, kv, kv, scale=1e300)),
        ("weight shape", lambda: llada.rms_norm(x, torch.ones(1), 1e-5)),
        ("eps < 0", lambda: llada.rms_norm(x, w, -1.0)),
        ("weight dtype", lambda: llada.rms_norm(x.bfloat16(), w, 1e-5)),
        ("x float16", lambda: llada.rms_norm(x.half(), w.half(), 1e-5)),
        ("residual shape", lambda: llada.ops.add_rms_norm(x, x[:1], w, 1e-5)),
        ("rope odd dim", lambda: llada.rope(torch.randn(1, 5, 2, 7), cos[..., :7], sin[..., :7])),
        ("cos float64", lambda: llada.rope(kv, cos.double(), sin)),
        ("sin shape", lambda: llada.rope(kv, cos, sin[:, :4])),
        ("up shape", lambda: llada.silu_mul(torch.randn(2, 4), torch.randn(1, 4))),
        ("up dtype", lambda: llada.silu_mul(torch.randn(2, 4), torch.randn(2, 4).bfloat16())),
        ("cache dtype", lambda: llada.store_kv(kv, kv, cos, sin, cache.double(), cache.clone(), at)),
        ("one cache", lambda: llada.store_kv(kv, kv, cos, sin, cache, cache, at)),
        ("k in a cache", lambda: llada.store_kv(cache[:, :5], kv, cos, sin, cache, cache.clone(), at)),
        ("positions length", lambda: llada.store_kv(kv, kv, cos, sin, cache, cache.clone(), at[:4])),
    ]


@pytest.mark.parametrize("name, call", _bad_calls(), ids=[name for name, _ in _bad_calls()])
def test_without_the_kernels_the_ops_refuse_what_the_kernels_refuse(name, call, request):
    with pytest.raises(Exception) as by_kernel:
        call()
    request.getfixturevalue("no_kernels")
    with pytest.raises(Exception) as by_reference:
        call()
    assert (by_reference.type, str(by_reference.value)) == (by_kernel.type, str(by_kernel.value))


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                               ((12, 0), torch.bfloat16)])
def test_gpus_before_ampere_load_in_float16(capability, dtype):
    # They have no bfloat16 arithmetic: torch would emulate it, slowly.
    assert llada.checkpoint.cuda_default_dtype(capability) == dtype


@pytest.mark.parametrize("device", ["cpu", "meta", "cpu:0"])
def test_kernels_run_on_takes_a_device_name(device):
    assert devices.kernels_run_on(device) is True


@pytest.mark.parametrize("device", ["cuda:1", 1])
def test_kernels_run_on_takes_a_gpu_name_or_index(monkeypatch, fresh_answers, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices._C, "cuda_compiled", lambda: True)
    monkeypatch.setattr(devices._C, "cuda_architectures", lambda: "80,90")
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (7, 5))
    runs, said = runtime_warnings(lambda: devices.kernels_run_on(device))
    assert runs is False and asked == [1] and "on cuda:1 (compute capability 7.5" in said[0]


@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda"), torch.device("cuda", 1)])
def test_kernels_run_on_a_machine_without_a_gpu_answers_no(monkeypatch, fresh_answers, device):
    # Without a GPU (or its driver), torch raises when asked about one: the
    # answer is that the kernels run on no CUDA device, and nothing is said.
    def no_driver(*args):
        raise RuntimeError("Found no NVIDIA driver on your system.")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", no_driver)
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_driver)
    monkeypatch.setattr(devices._C, "cuda_compiled", lambda: True)
    runs, said = runtime_warnings(lambda: [devices.kernels_run_on(device) for _ in range(2)])
    assert runs == [False, False] and said == []


@pytest.mark.parametrize("device, says", [
    ("cpux", "device: expected what torch.device accepts, got 'cpux'"),
    ("cuda:x", "device: expected what torch.device accepts, got 'cuda:x'"),
    (-1, "device: expected what torch.device accepts, got -1"),
    (True, "device: expected a torch.device, a str or an int, got bool"),
    (3.5, "device: expected a torch.device, a str or an int, got float"),
    (None, "device: expected a torch.device, a str or an int, got NoneType"),
    ([0], "device: expected a torch.device, a str or an int, got list"),
])
def test_kernels_run_on_names_a_bad_device(device, says):
    with pytest.raises(TypeError, match=f"^{re.escape(says)}$"):
        devices.kernels_run_on(device)


def _cmake_hopper_rule():
    """The regular expression with which cmake/kernels.cmake decides to
    compile the Hopper attention kernel."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "cmake" / "kernels.cmake").read_text()
    rules = re.findall(r'if\(LLADA_CUDA_ARCHITECTURES MATCHES "([^"]+)"\)', text)
    assert len(rules) == 1, rules
    return re.compile(rules[0])


@pytest.mark.parametrize("architectures, built", [
    ("80;90", True), ("90", True), ("90a", True), ("80;90-real", True), ("90a-real", True),
    ("90-virtual", True), ("90a-virtual", True), ("80;86-real;90a-real", True),
    ("80", False), ("90f", False), ("900", False), ("100", False), ("89", False), ("all", False),
    ("native", False), ("", False),
])
def test_hopper_attention_is_available_where_the_build_compiles_it(monkeypatch, architectures, built):
    assert bool(_cmake_hopper_rule().search(architectures)) is built  # the build's own rule
    # The extension reports CMake's list joined with commas.
    monkeypatch.setattr(llada._C, "cuda_architectures", lambda: architectures.replace(";", ","))
    monkeypatch.setattr(llada, "cuda_kernels_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert llada.hopper_attention_available() is built
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert llada.hopper_attention_available() is False
