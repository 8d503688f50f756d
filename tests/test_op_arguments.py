"""What every op wrapper refuses or accepts beyond its tensors' shapes: inputs
that ask for a gradient (the ops have no backward), scalar arguments of the
wrong type, and a default device other than the one the references compute
on."""

import numpy as np
import pytest
import torch

from llada import ops


def _inputs(device):
    """Per op: a call of the wrapper on keyword tensors, those tensors (all
    floating), and a call of the torch.ops.llada op with them that returns
    a floating output."""
    g = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, w, cs = rand(2, 3, 64), rand(64), rand(1, 3, 64)
    qkv = dict(q=rand(1, 3, 2, 64), k=rand(1, 3, 2, 64), v=rand(1, 3, 2, 64))
    cache = [torch.zeros(1, 5, 2, 64, device=device) for _ in range(2)]
    positions = torch.tensor([4, 0, 2], device=device)
    llada = torch.ops.llada
    return {
        "rms_norm": (lambda t: ops.rms_norm(t["x"], t["weight"], 1e-5), dict(x=x, weight=w),
                     lambda t: llada.rms_norm(t["x"], t["weight"], 1e-5)),
        "add_rms_norm": (lambda t: ops.add_rms_norm(t["x"], t["residual"], t["weight"], 1e-5)[1],
                         dict(x=x, residual=rand(2, 3, 64), weight=w),
                         lambda t: llada.add_rms_norm(t["x"], t["residual"], t["weight"], 1e-5)[1]),
        "rope": (lambda t: ops.rope(t["x"], t["cos"], t["sin"]),
                 dict(x=rand(1, 3, 2, 64), cos=cs, sin=cs.flip(-1)),
                 lambda t: llada.rope(t["x"], t["cos"], t["sin"])),
        "silu_mul": (lambda t: ops.silu_mul(t["gate"], t["up"]), dict(gate=x, up=rand(2, 3, 64)),
                     lambda t: llada.silu_mul(t["gate"], t["up"])),
        "attention": (lambda t: ops.attention(t["q"], t["k"], t["v"]), qkv,
                      lambda t: llada.attention(t["q"], t["k"], t["v"], None, None)),
        "sample_tokens": (lambda t: ops.sample_tokens(t["logits"], 1.0, 5).confidence,
                          dict(logits=rand(4, 33)),
                          lambda t: llada.sample_tokens(t["logits"], torch.empty(0, dtype=torch.int64, device=device),
                                                        1.0, 5)[1]),
        # The caches are inputs too: written in place, they would keep a
        # tangent or a history that no longer describes them.
        "store_kv": (lambda t: ops.store_kv(t["k"], t["v"], t["cos"], t["sin"], t["cache_k"], t["cache_v"],
                                            positions) or t["cache_v"].clone(),
                     dict(k=qkv["k"], v=qkv["v"], cos=cs, sin=cs.flip(-1), cache_k=cache[0], cache_v=cache[1]),
                     None),
    }


OPS = ["rms_norm", "add_rms_norm", "rope", "silu_mul", "attention", "sample_tokens", "store_kv"]


@pytest.mark.parametrize("op", OPS)
def test_wrappers_refuse_inputs_that_require_grad(device, op):
    """Each floating input that asks for a gradient is named before the op
    runs (a result without the op's gradient would be silently wrong); under
    no_grad or inference_mode the same call gives the result of detached
    inputs."""
    call, tensors, _ = _inputs(device)[op]
    want = call(tensors).clone()
    for name in tensors:
        asking = {key: t.clone().requires_grad_(key == name) for key, t in tensors.items()}
        with pytest.raises(RuntimeError, match=rf"^{name}: requires grad, but llada\.ops\.{op} is an inference "
                                               r"op without a backward; call it under torch\.no_grad\(\)"):
            call(asking)
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                got = call(asking)
            assert not got.requires_grad
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_wrappers_refuse_forward_mode_tangents(device, op):
    """A tangent (torch.func.jvp, forward_ad) does not show in requires_grad,
    and the ops have no derivative: each input that carries one is named,
    under no_grad too (which does not turn forward mode off); the primals
    alone give the plain result."""
    import torch.autograd.forward_ad as fwAD

    call, tensors, _ = _inputs(device)[op]
    want = call(tensors).clone()
    for name in tensors:
        with fwAD.dual_level():
            dual = {key: fwAD.make_dual(t, torch.ones_like(t)) if key == name else t for key, t in tensors.items()}
            for mode in (torch.enable_grad, torch.no_grad):
                with mode(), pytest.raises(RuntimeError, match=rf"^{name}: carries a forward-mode tangent "
                                                               rf".* llada\.ops\.{op} is an inference op"):
                    call(dual)
            primals = {key: fwAD.unpack_dual(t).primal for key, t in dual.items()}
            torch.testing.assert_close(call(primals), want, rtol=0, atol=0)


@pytest.mark.parametrize("op", [op for op in OPS if op != "store_kv"])
def test_direct_op_backward_raises(device, op):
    """torch.ops.llada.* called directly: the output asks for a gradient as
    torch's ops do, and backward names the op and the input instead of
    leaving the op's share of the gradient out."""
    _, tensors, direct = _inputs(device)[op]
    name = next(iter(tensors))
    asking = {key: t.clone().requires_grad_(key == name) for key, t in tensors.items()}
    out = direct(asking)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=rf"llada::{op} has no backward .* gradient for {name}: "
                                           r"call it under torch\.no_grad\(\)"):
        out.float().sum().backward()


@pytest.mark.parametrize("name", ["k", "v", "cos", "sin", "cache_k", "cache_v"])
def test_direct_store_kv_refuses_inputs_that_require_grad(device, name):
    """store_kv writes the caches in place, so it has no history to carry a
    gradient: called directly, it refuses any float input that asks for
    one, before writing anything; under no_grad it writes as usual."""
    _, tensors, _ = _inputs(device)["store_kv"]
    args = dict(tensors, cache_k=torch.zeros(1, 5, 2, 64, device=device),
                cache_v=torch.zeros(1, 5, 2, 64, device=device))
    asking = {key: t.clone().requires_grad_(key == name) for key, t in args.items()}
    positions = torch.tensor([4, 0, 2], device=device)
    order = ("k", "v", "cos", "sin", "cache_k", "cache_v")
    with pytest.raises(RuntimeError, match=rf"^{name}: requires grad, but llada::store_kv writes the caches "
                                           r"in place and has no backward; call it under torch\.no_grad\(\)"):
        torch.ops.llada.store_kv(*(asking[key] for key in order), positions)
    assert not asking["cache_k"].detach().any() and not asking["cache_v"].detach().any()
    with torch.no_grad():
        torch.ops.llada.store_kv(*(asking[key] for key in order), positions)
    want = [torch.zeros(1, 5, 2, 64, device=device) for _ in range(2)]
    ops.store_kv_reference(args["k"], args["v"], args["cos"], args["sin"], *want, positions)
    torch.testing.assert_close(asking["cache_v"].detach(), want[1], rtol=0, atol=0)


def test_in_place_ops_bump_the_version_of_what_they_write(device):
    """Autograd tells a tensor it saved from one overwritten later by its
    version counter: store_kv bumps both caches', commit_tokens the
    canvas's, so a gradient that would read the overwritten canvas (gather
    saves its index) fails instead of being silently wrong."""
    _, tensors, _ = _inputs(device)["store_kv"]
    cache_k, cache_v = (torch.zeros(1, 5, 2, 64, device=device) for _ in range(2))
    before = cache_k._version, cache_v._version
    torch.ops.llada.store_kv(tensors["k"], tensors["v"], tensors["cos"], tensors["sin"], cache_k, cache_v,
                             torch.tensor([4, 0, 2], device=device))
    assert cache_k._version > before[0] and cache_v._version > before[1]

    logits = torch.randn(1, 5, 7, device=device, requires_grad=True)
    canvas = torch.full((1, 5), 3, device=device)
    picked = logits.log_softmax(-1).gather(-1, canvas[..., None]).sum()
    ops.commit_tokens(canvas, torch.zeros_like(canvas), torch.ones_like(canvas, dtype=torch.bool), 3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        picked.backward()


def test_wrappers_take_tensors_that_need_no_gradient_with_grad_on(device):
    """Grad mode alone (inputs without requires_grad) is no reason to refuse."""
    for op, (call, tensors, _) in _inputs(device).items():
        out = call(tensors)
        assert not out.requires_grad, op


# Scalar arguments: real numbers only, named when wrong.

def _scalar_calls():
    x, w = torch.randn(3, 8), torch.rand(8)
    q = torch.randn(1, 3, 2, 64)
    logits, confidence = torch.randn(2, 5), torch.rand(2, 6)
    return {
        "temperature": lambda v: ops.sample_tokens(logits, temperature=v, seed=1).tokens,
        "eps": lambda v: ops.rms_norm(x, w, v),
        "add_rms_norm eps": lambda v: ops.add_rms_norm(x, x, w, v)[1],
        "threshold": lambda v: ops.select_positions(confidence, "threshold", threshold=v),
        "factor": lambda v: ops.select_positions(confidence, "factor", factor=v),
        "scale": lambda v: ops.attention(q, q, q, scale=v),
    }


@pytest.mark.parametrize("argument", list(_scalar_calls()))
@pytest.mark.parametrize("bad", [None, "0.5", [0.5], True, torch.tensor(0.5)],
                         ids=["None", "str", "list", "bool", "tensor"])
def test_bad_scalars_are_named(argument, bad):
    if argument == "scale" and bad is None:
        pytest.skip("scale=None means 1/sqrt(D)")
    name = argument.split()[-1]
    with pytest.raises(TypeError, match=rf"^{name}: expected a float, got {type(bad).__name__}$"):
        _scalar_calls()[argument](bad)


@pytest.mark.parametrize("argument", list(_scalar_calls()))
def test_ints_and_numpy_scalars_are_floats(argument):
    call = _scalar_calls()[argument]
    value = 1 if argument in ("temperature", "factor", "threshold") else 0
    want = call(float(value))
    for same in (value, np.float32(value), np.int64(value)):
        torch.testing.assert_close(call(same), want, rtol=0, atol=0)
    torch.testing.assert_close(call(np.float64(0.25)), call(0.25), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [3, "ab", b"ab", 2.0], ids=["int", "str", "bytes", "float"])
def test_suppress_ids_must_be_ints_or_a_tensor(bad):
    with pytest.raises(TypeError, match=r"^suppress_ids: expected ints \(a list, a set, an array...\), "
                                        rf"an integer tensor or None, got {type(bad).__name__}$"):
        ops.sample_tokens(torch.randn(2, 5), suppress_ids=bad)


def test_suppress_ids_sequences_agree():
    logits = torch.randn(3, 9)
    want = ops.sample_tokens(logits, 1.0, 4, suppress_ids=torch.tensor([2, 5]))
    for ids in ([2, 5], (2, 5), range(2, 8, 3), [np.int64(2), 5], {5, 2}, np.array([2, 5])):
        got = ops.sample_tokens(logits, 1.0, 4, suppress_ids=ids)
        assert torch.equal(got.tokens, want.tokens)
        assert not torch.isin(got.tokens, torch.tensor([2, 5])).any()


# The references compute on the CPU whatever the default device.

def test_references_ignore_the_default_device():
    g = torch.Generator().manual_seed(3)
    confidence, logits = torch.rand(2, 6, generator=g), torch.randn(3, 7, generator=g)
    k = torch.tensor([1, 4])

    def run():
        return [
            ops.select_positions_reference(confidence, "threshold", threshold=0.5),
            ops.select_positions_reference(confidence, "factor", factor=1.5),
            ops.select_positions_reference(confidence, "topk", 2),
            ops.select_positions_reference(confidence, "topk", k),
            *ops.sample_tokens_reference(logits, 1.0, 3, suppress_ids=[1]),
            *ops.sample_tokens_reference(logits),
            ops.gumbel_noise_reference(3, 2, 7),
        ]

    want = run()
    with torch.device("meta"):
        got = run()
    for g_, w_ in zip(got, want):
        assert g_.device == torch.device("cpu")
        assert torch.equal(g_, w_)


def test_logits_of_the_wrong_shape_are_named_before_suppress_ids():
    # A list of ids is range-checked against the vocabulary, which logits of
    # the wrong shape do not have: the error is about logits.
    with pytest.raises(ValueError, match=r"^logits: expected a 2-D tensor"):
        ops.sample_tokens(torch.tensor(1.0), suppress_ids=[0])
    with pytest.raises(ValueError, match=r"^logits: expected at least one column"):
        ops.sample_tokens(torch.randn(2, 0), suppress_ids=[0])
    with pytest.raises(ValueError, match=r"^suppress_ids: expected an int in \[0, 4\], got 5$"):
        ops.sample_tokens(torch.randn(2, 5), suppress_ids=[5])


@pytest.mark.parametrize("name", ["x0", "accepted", "remask"])
def test_commit_tokens_names_a_missing_tensor(name):
    canvas = torch.zeros(2, 5, dtype=torch.long)
    args = dict(x0=torch.ones_like(canvas), accepted=torch.ones_like(canvas, dtype=torch.bool), remask=None)
    args[name] = [1, 2]
    with pytest.raises(TypeError, match=rf"^{name}: expected a torch.Tensor, got list$"):
        ops.commit_tokens(canvas, args["x0"], args["accepted"], 3, remask=args["remask"])
    assert not canvas.any()
