"""Which GPUs the compiled kernels run on, and decoding without them: on a
GPU the build has no code for, every op runs its reference and the model its
torch compositions, with the results of the kernels."""

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


def test_a_gpu_without_code_is_reported_once(monkeypatch):
    monkeypatch.setattr(devices._C, "cuda_compiled", lambda: True)
    monkeypatch.setattr(devices._C, "cuda_architectures", lambda: "80,90")
    check = devices._cuda_kernels_run_on.__wrapped__  # not the per-device cache
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    with pytest.warns(RuntimeWarning, match=r"architectures 80,90\) do not run on cuda:1 \(compute capability 7.5"):
        assert not check(1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check(1)
    monkeypatch.setattr(devices._C, "cuda_compiled", lambda: False)  # built without nvcc
    with pytest.warns(RuntimeWarning, match="this build has no CUDA kernels"):
        assert not check(1)


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


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                               ((12, 0), torch.bfloat16)])
def test_gpus_before_ampere_load_in_float16(capability, dtype):
    # They have no bfloat16 arithmetic: torch would emulate it, slowly.
    assert llada.checkpoint.cuda_default_dtype(capability) == dtype
