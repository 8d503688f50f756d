"""attention against its float64 reference, on CPU and CUDA.

Accuracy criteria: float32 agrees with float64 to ~1e-5. For the 16-bit
types the inputs are first rounded to the dtype and the float64 reference
runs on those rounded inputs; on CUDA the op's error must then be at most
twice that of torch's own attention in the same dtype (SDPA), and on CPU
(float32 inside, one rounding of the output) within one bfloat16 rounding.
"""

import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import llada
from llada.ops import attention_reference

from conftest import DEVICES, assert_new_tensor_like, needs_cuda, poison_allocator

# Query rows per task of the CPU kernel (kAttentionCpuQueryTile in
# csrc/include/llada/attention.h): more queries than this reach a second tile.
CPU_QUERY_TILE = 256

DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}


def make_qkv(b, lq, lk, hq, hkv, d, dtype, device, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    # q scaled by 2 so the softmax is not flat (scores ~ N(0, 4)).
    q = 2 * torch.randn(b, lq, hq, d, generator=gen)
    k = torch.randn(b, lk, hkv, d, generator=gen)
    v = torch.randn(b, lk, hkv, d, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def padding_mask(b, lk, device, gen=None):
    """Row 0: random ~30% padding plus left padding; row 1: exactly one valid
    key (in the middle); row 2: no valid key; later rows: all valid."""
    gen = gen or torch.Generator().manual_seed(1)
    mask = torch.ones(b, lk, dtype=torch.bool)
    mask[0] = torch.rand(lk, generator=gen) > 0.3
    mask[0, : lk // 5] = False
    mask[0, -1] = True
    if b > 1:
        mask[1] = False
        mask[1, lk // 2] = True
    if b > 2:
        mask[2] = False
    return mask.to(device)


def sdpa(q, k, v, key_mask, scale):
    """torch's attention in the inputs' dtype, on their device."""
    group = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(group, dim=2).transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def check_against_reference(q, k, v, key_mask=None, scale=None):
    device, dtype = q.device.type, q.dtype
    poison_allocator(device, [q.numel() * q.element_size() * 2])
    got = llada.attention(q, k, v, key_mask, scale)
    assert_new_tensor_like(got, q)
    want = attention_reference(q, k, v, key_mask, scale)  # float64, on the rounded inputs
    got64 = got.double()
    assert torch.isfinite(got64).all(), "non-finite output"

    # Rows with no valid key are exactly zero.
    if key_mask is not None:
        empty = ~key_mask.any(dim=1)
        if empty.any():
            assert (got64[empty] == 0).all(), "a row with no valid key is not zero"
        live = ~empty
        got64, want, qs = got64[live], want[live], (q[live], k[live], v[live], key_mask[live])
    else:
        qs = (q, k, v, None)
    if got64.numel() == 0:
        return
    # The reference itself: torch's attention (SDPA) in float64 on the same
    # inputs gives the same numbers, so that the comparisons with torch's
    # error below cannot pass against a wrong reference (both off alike).
    in64 = [t if t is None or t.dtype == torch.bool else t.double() for t in qs]
    torch.testing.assert_close(want, sdpa(*in64, scale), rtol=1e-9, atol=1e-12,
                               msg=lambda m: f"attention_reference disagrees with float64 SDPA: {m}")

    if dtype == torch.float32:
        # Close to the float64 result; or, where large scores make float32's
        # rounding of them dominate, no further off than torch's own float32
        # attention (as the 16-bit case below).
        if not torch.allclose(got64, want, rtol=1e-4, atol=2e-5):
            err = (got64 - want).abs().max().item()
            torch_err = (sdpa(*qs, scale).double() - want).abs().max().item()
            assert err <= 2 * torch_err + 1e-6, f"error {err:.3g} vs torch SDPA {torch_err:.3g}"
    elif device == "cpu":
        # float32 inside, then one rounding to bfloat16 (relative 2^-9). The
        # float32 part may be off as much as the float32 check above allows:
        # 2e-5, or twice torch's float32 attention's error where large scores
        # make that larger (outputs near 0 after cancellation show it).
        torch32 = sdpa(*[t if t is None or t.dtype == torch.bool else t.float() for t in qs], scale)
        float32_allowance = max(2e-5, 2 * (torch32.double() - want).abs().max().item())
        torch.testing.assert_close(got64, want, rtol=2.0**-8, atol=float32_allowance)
    else:
        err = (got64 - want).abs().max().item()
        torch_err = (sdpa(*qs, scale).double() - want).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"error {err:.3g} vs torch SDPA {torch_err:.3g}"


SHAPES = [
    # b, lq, lk, hq, hkv, d
    (1, 1, 1, 1, 1, 64),
    (2, 17, 17, 2, 2, 128),
    (1, 255, 255, 2, 1, 64),
    (1, 17, 1000, 2, 2, 128),  # few query tiles: the CUDA split-KV path
    (2, 32, 300, 8, 2, 128),   # GQA, a cached-decoding block
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(device, dtype, shape):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    check_against_reference(*make_qkv(*shape, dtype, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lk", [1, 17, 255, 1000])
def test_key_padding(device, dtype, lk):
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    q, k, v = make_qkv(3, 17, lk, 8, 2, 64, dtype, device)
    check_against_reference(q, k, v, padding_mask(3, lk, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lk", [17, 1000])  # on CUDA, 1000 keys are split into chunks
def test_nan_inputs_stay_nan(device, dtype, lk):
    # Only a row without a valid key outputs zeros; a NaN in q or in a valid
    # key is not hidden.
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    q, k, v = make_qkv(2, 3, lk, 2, 2, 64, dtype, device)
    q[0, 1, 0, 0] = math.nan
    k[0, lk // 2, 1, 0] = math.nan
    mask = torch.ones(2, lk, dtype=torch.bool, device=device)
    mask[1] = False
    for out in (llada.attention(q, k, v, mask), attention_reference(q, k, v, mask)):
        assert out[0, 1, 0].isnan().all() and out[0, :, 1].isnan().all()
        assert out[0, [0, 2], 0].isfinite().all()
        assert torch.equal(out[1].cpu(), torch.zeros_like(out[1]).cpu())


def test_custom_scale_and_long_keys(device):
    dtype = torch.bfloat16
    q, k, v = make_qkv(1, 33, 2047, 4, 4, 128, dtype, device)
    check_against_reference(q, k, v, scale=0.3)
    check_against_reference(q, k, v, scale=-0.3)  # the largest score is the smallest product


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_many_query_tiles(device, dtype, d, masked):
    """Enough query tiles that the CUDA kernel takes 32 query rows per warp
    and does not split the keys; the last query and key tiles are partial,
    and without a mask the whole key tiles skip the per-key checks. On the
    CPU, 300 queries are two query tiles of the kernel (the second partial)
    and 400 keys end in a partial key tile; kept small for a short CPU run."""
    if dtype not in DTYPES[device]:
        pytest.skip(f"{dtype} is not supported on {device}")
    if device == "cuda":
        b, lq, lk, hq, hkv = 4, 380, 700, 32, 8
    else:
        b, lq, lk, hq, hkv = 1, 300, 400, 2, 1
        assert CPU_QUERY_TILE < lq < 2 * CPU_QUERY_TILE
    q, k, v = make_qkv(b, lq, lk, hq, hkv, d, dtype, device)
    check_against_reference(q, k, v, padding_mask(b, lk, device) if masked else None)


def test_strided_inputs(device):
    """q sliced out of a fused qkv projection; k, v a prefix of a longer cache."""
    b, lq, lk, h, d = 2, 19, 150, 4, 64
    dtype = torch.bfloat16
    qkv = torch.randn(b, lq, 3, h, d).to(device=device, dtype=dtype)
    cache_k = torch.randn(b, 400, h, d).to(device=device, dtype=dtype)
    cache_v = torch.randn(b, 400, h, d).to(device=device, dtype=dtype)
    q, k, v = qkv[:, :, 0], cache_k[:, :lk], cache_v[:, :lk]
    assert not q.is_contiguous() and not k.is_contiguous()
    check_against_reference(q, k, v, padding_mask(b, lk, device))
    # Element offsets that break 16-byte alignment are handled too.
    odd = torch.randn(b * lk * h * d + 3).to(device=device, dtype=dtype)[3:].view(b, lk, h, d)
    check_against_reference(q, odd, v)


def test_inputs_not_modified(device):
    q, k, v = make_qkv(1, 5, 9, 2, 1, 64, torch.float32, device)
    mask = padding_mask(1, 9, device)
    copies = [t.clone() for t in (q, k, v, mask)]
    llada.attention(q, k, v, mask)
    for before, after in zip(copies, (q, k, v, mask)):
        assert torch.equal(before, after)


def test_opcheck(device):
    q, k, v = make_qkv(2, 5, 7, 4, 2, 64, torch.float32, device, seed=3)
    mask = padding_mask(2, 7, device)
    torch.library.opcheck(torch.ops.llada.attention.default, (q, k, v, mask, None))
    torch.library.opcheck(torch.ops.llada.attention.default, (q, k, v, None, 0.5))
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    torch.library.opcheck(torch.ops.llada.attention.default, (qb, kb, vb, mask, None))


def test_bad_input(device):
    q, k, v = make_qkv(2, 5, 7, 4, 2, 64, torch.float32, device, seed=4)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="q"):
        llada.attention(q[0], k, v)
    with pytest.raises(ValueError, match="k: expected a number of kv heads"):
        llada.attention(q, k[:, :, :1].expand(2, 7, 3, 64), v[:, :, :1].expand(2, 7, 3, 64))
    with pytest.raises(ValueError, match="v"):
        llada.attention(q, k, v[:, :6])
    with pytest.raises(ValueError, match="k: expected the batch size"):
        llada.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="q: expected head dim 64 or 128"):
        llada.attention(q[..., :32], k[..., :32], v[..., :32])
    q128 = torch.randn(2, 5, 4, 128, device=device)
    with pytest.raises(ValueError, match="k: expected the head dim"):
        llada.attention(q128, k, v)
    with pytest.raises(TypeError, match="k"):
        llada.attention(q, k.double(), v)
    with pytest.raises(TypeError, match="v"):
        llada.attention(q, k, v.bfloat16())
    with pytest.raises(TypeError, match="q"):
        llada.attention(q.double(), k.double(), v.double())
    if device == "cpu":
        with pytest.raises(TypeError, match="q: expected dtype float32 or bfloat16"):
            llada.attention(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="key_mask"):
        llada.attention(q, k, v, mask[:, :6])
    with pytest.raises(TypeError, match="key_mask"):
        llada.attention(q, k, v, mask.float())
    with pytest.raises(TypeError, match="key_mask"):
        llada.attention(q, k, v, [True] * 7)
    with pytest.raises(TypeError, match="q"):
        llada.attention(q.tolist(), k, v)
    last_dim_strided = torch.randn(2, 5, 64, 4, device=device).transpose(2, 3)
    with pytest.raises(ValueError, match="q: expected a contiguous last"):
        llada.attention(last_dim_strided, k, v)
    with pytest.raises(ValueError, match="scale"):
        llada.attention(q, k, v, scale=math.nan)
    with pytest.raises(ValueError, match="scale: expected a finite float32"):
        llada.attention(q, k, v, scale=1e39)  # finite as a double only
    # Expanded, 2^31 keys take no memory; the error is k's, not q's.
    k_huge = k[:, :1].expand(2, 2**31, 2, 64)
    with pytest.raises(ValueError, match=r"^k: expected fewer than 2\^31 keys, got shape \[2, 2147483648, 2, 64\]"):
        llada.attention(q, k_huge, k_huge)
    q_huge = q[:, :1].expand(2, 2**31, 4, 64)
    with pytest.raises(ValueError, match=r"^q: expected at most 2\^30 heads and fewer than 2\^31 queries"):
        llada.attention(q_huge, k, v)
    if device == "cuda":
        with pytest.raises(ValueError, match="k: expected to be on the device of q"):
            llada.attention(q, k.cpu(), v)
        with pytest.raises(ValueError, match="key_mask"):
            llada.attention(q, k, v, mask.cpu())


def test_empty(device):
    q, k, v = make_qkv(1, 0, 5, 2, 2, 64, torch.float32, device)
    assert llada.attention(q, k, v).shape == (1, 0, 2, 64)
    q, k, v = make_qkv(1, 3, 0, 2, 2, 64, torch.bfloat16, device)
    poison_allocator(device, [q.numel() * q.element_size() * 2])
    out = llada.attention(q, k, v)
    assert (out == 0).all()  # written, not left as found


# ---------------------------------------------------------------------------
# Random cases (hypothesis): lengths, heads, padding, layouts and scales in
# combinations the hand-picked cases above do not reach.
# ---------------------------------------------------------------------------


@st.composite
def attention_cases(draw, head_dims=(64, 128), max_kv_heads=3):
    """A dict: sizes b, lq, lk, hq, hkv, d; the layout; a kind of padding
    per batch row (or no mask); the scale (None: the default); a seed."""
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, max_kv_heads))
    return dict(
        b=b, lq=draw(st.integers(1, 200)), lk=draw(st.integers(1, 600)), hkv=hkv,
        hq=hkv * draw(st.sampled_from([1, 2, 4])), d=draw(st.sampled_from(head_dims)),
        # q sliced out of a fused projection, or k and v a window of a longer cache
        layout=draw(st.sampled_from(["contiguous", "fused", "cache"])),
        rows=draw(st.none() | st.lists(st.sampled_from(["all", "random", "left", "one", "none"]),
                                       min_size=b, max_size=b)),
        scale=draw(st.none() | st.floats(0.02, 1.0)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def case_inputs(case, dtype, device):
    """q, k, v and the key mask (or None) of a drawn case."""
    b, lq, lk, hq, hkv, d = (case[n] for n in ("b", "lq", "lk", "hq", "hkv", "d"))
    gen = torch.Generator().manual_seed(case["seed"])
    if case["layout"] == "fused":
        wide = 2 * torch.randn(b, lq, (hq + 2 * hkv) * d, generator=gen)
        q = wide[..., : hq * d].view(b, lq, hq, d)
    else:
        q = 2 * torch.randn(b, lq, hq, d, generator=gen)
    if case["layout"] == "cache":
        extra = int(torch.randint(1, 50, (), generator=gen))
        offset = int(torch.randint(0, extra + 1, (), generator=gen))
        k = torch.randn(b, lk + extra, hkv, d, generator=gen)[:, offset:offset + lk]
        v = torch.randn(b, lk + extra, hkv, d, generator=gen)[:, offset:offset + lk]
    else:
        k, v = torch.randn(b, lk, hkv, d, generator=gen), torch.randn(b, lk, hkv, d, generator=gen)
    mask = None
    if case["rows"] is not None:
        mask = torch.ones(b, lk, dtype=torch.bool)
        for row, kind in enumerate(case["rows"]):
            if kind == "random":
                mask[row] = torch.rand(lk, generator=gen) < float(torch.rand((), generator=gen))
            elif kind == "left":
                mask[row, : int(torch.randint(0, lk, (), generator=gen))] = False
            elif kind == "one":
                mask[row] = False
                mask[row, int(torch.randint(0, lk, (), generator=gen))] = True
            elif kind == "none":
                mask[row] = False
        mask = mask.to(device)
    # Cast the views in place of copying them, so the layouts reach the op.
    q, k, v = (t.to(device=device, dtype=dtype) if t.is_contiguous() else _cast_view(t, dtype, device)
               for t in (q, k, v))
    return q, k, v, mask


def _cast_view(t, dtype, device):
    """t's values in dtype on device, with t's strides."""
    base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    base = base.to(device=device, dtype=dtype)
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None, derandomize=True)
@given(case=attention_cases())
# Large scores (scale 0.75 at D = 128): float32 rounding of them puts even
# torch's float32 attention 1.9e-5 off the float64 result.
@example(case=dict(b=1, lq=8, lk=504, hq=4, hkv=1, d=128, layout="cache", rows=None, scale=0.75, seed=0))
def test_random_cases_match_reference(device, case):
    for dtype in DTYPES[device]:
        q, k, v, mask = case_inputs(case, dtype, device)
        check_against_reference(q, k, v, mask, case["scale"])


# ---------------------------------------------------------------------------
# The Hopper kernel (csrc/cuda/attention_sm90.cu), forced on for every shape
# it takes: only on a compute capability 9.0 device with a build for it.
# ---------------------------------------------------------------------------


@pytest.fixture
def sm90(monkeypatch):
    if not llada.hopper_attention_available():
        pytest.skip("needs an sm_90 GPU and a build for it")
    monkeypatch.setenv("LLADA_ATTENTION_SM90", "always")


def _kernels_run(fn):
    """Names of the CUDA kernels `fn` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


SM90_SHAPES = [
    # b, lq, lk, hq, hkv (d = 128)
    (1, 1, 1, 1, 1),
    (2, 17, 17, 2, 2),
    (1, 255, 255, 2, 1),
    (1, 17, 1000, 2, 2),
    (2, 32, 300, 8, 2),
    (2, 256, 384, 4, 2),   # whole tiles only
    (4, 380, 700, 32, 8),  # many query tiles, partial last tiles
    (8, 32, 1000, 32, 8),  # few queries, more tiles than multiprocessors: the
                           # 64-row blocks loop, their key ring running on
]


@pytest.mark.parametrize("shape", SM90_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sm90_matches_reference(sm90, dtype, shape):
    check_against_reference(*make_qkv(*shape, 128, dtype, "cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lk", [1, 17, 255, 1000])
def test_sm90_key_padding(sm90, dtype, lk):
    q, k, v = make_qkv(3, 150, lk, 8, 2, 128, dtype, "cuda")
    check_against_reference(q, k, v, padding_mask(3, lk, "cuda"))


def test_sm90_strided_inputs_and_scale(sm90):
    b, lq, lk, h, d = 2, 130, 300, 4, 128
    qkv = torch.randn(b, lq, 3, h, d).to(device="cuda", dtype=torch.bfloat16)
    cache_k = torch.randn(b, 700, h, d).to(device="cuda", dtype=torch.bfloat16)
    cache_v = torch.randn(b, 700, h, d).to(device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[:, :, 0], cache_k[:, 100:100 + lk], cache_v[:, :lk]
    check_against_reference(q, k, v, padding_mask(b, lk, "cuda"))
    check_against_reference(q, k, v, scale=0.3)


# The pipelines of the Hopper kernel's 128-row blocks (LLADA_ATTENTION_SM90_PIPELINE),
# on shapes whose blocks take several items (their Q buffers reused, items
# chained), partial last tiles, padding, split keys, and whole tiles with a
# positive and a negative scale (the lean softmax folds only the first).
@pytest.mark.parametrize("pipeline", llada._C.sm90_pipelines())
def test_sm90_pipelines_match_reference(sm90, monkeypatch, pipeline):
    monkeypatch.setenv("LLADA_ATTENTION_SM90_PIPELINE", pipeline)
    check_against_reference(*make_qkv(4, 380, 700, 32, 8, 128, torch.bfloat16, "cuda"))
    check_against_reference(*make_qkv(3, 333, 1000, 48, 8, 128, torch.float16, "cuda", seed=3))
    q, k, v = make_qkv(3, 150, 1000, 8, 2, 128, torch.bfloat16, "cuda", seed=4)  # split keys
    check_against_reference(q, k, v, padding_mask(3, 1000, "cuda"))
    q, k, v = make_qkv(2, 256, 384, 4, 2, 128, torch.bfloat16, "cuda", seed=5)  # whole tiles only
    check_against_reference(q, k, v, scale=0.2)
    check_against_reference(q, k, v, scale=-0.2)


def test_sm90_pipelines_are_distinct_kernels(sm90, monkeypatch):
    # Each pipeline is its own kernel instance: were the switch ignored, the
    # test above would test the default pipeline twelve times.
    args = make_qkv(4, 380, 700, 32, 8, 128, torch.bfloat16, "cuda", seed=1)
    launched = {}
    for pipeline in llada._C.sm90_pipelines():
        monkeypatch.setenv("LLADA_ATTENTION_SM90_PIPELINE", pipeline)
        launched[pipeline] = frozenset(n for n in _kernels_run(lambda: llada.attention(*args)) if "sm90" in n)
    assert all(launched.values()), launched
    assert len(set(launched.values())) == len(launched), launched


@contextlib.contextmanager
def _env(name, value):
    """The environment variable `name` set to `value` inside the block."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name)
        else:
            os.environ[name] = before


@pytest.mark.skipif(not llada.hopper_attention_available(), reason="needs an sm_90 GPU and a build for it")
@settings(max_examples=30, deadline=None, derandomize=True)
@given(case=attention_cases(head_dims=(128,), max_kv_heads=8))
def test_sm90_random_cases_match_reference(case):
    """Up to 3 rows x 32 heads x 2 query tiles of 128, or split keys: more
    work items than multiprocessors, so the persistent loops and the key
    rings wrap."""
    with _env("LLADA_ATTENTION_SM90", "always"):
        for dtype in (torch.bfloat16, torch.float16):
            check_against_reference(*case_inputs(case, dtype, "cuda"), case["scale"])


def test_sm90_switch_picks_the_kernel(sm90, monkeypatch):
    """The switch really selects the Hopper kernel (so the tests above test
    it, with split keys where there are few query tiles); unset or "1" take
    it where it measured faster (many queries; few queries over many keys),
    not for the shapes in between; "0" never."""
    full = make_qkv(1, 512, 512, 32, 32, 128, torch.bfloat16, "cuda", seed=5)
    cached = make_qkv(1, 32, 4096, 32, 32, 128, torch.bfloat16, "cuda", seed=6)
    between = make_qkv(1, 200, 200, 32, 32, 128, torch.bfloat16, "cuda", seed=7)
    short_cache = make_qkv(1, 32, 1024, 32, 32, 128, torch.bfloat16, "cuda", seed=8)

    def kernels(args):
        return " ".join(_kernels_run(lambda: llada.attention(*args)))

    assert "attention_sm90" in kernels(full)
    assert "attention_sm90" in kernels(cached) and "attention_combine" in kernels(cached)
    assert "attention_sm90" in kernels(between) and "attention_sm90" in kernels(short_cache)
    for setting in (None, "1"):
        if setting is None:
            monkeypatch.delenv("LLADA_ATTENTION_SM90")
        else:
            monkeypatch.setenv("LLADA_ATTENTION_SM90", setting)
        assert "attention_sm90" in kernels(full) and "attention_sm90" in kernels(cached), setting
        assert "attention_sm90" not in kernels(between), setting
        assert "attention_sm90" not in kernels(short_cache), setting
    monkeypatch.setenv("LLADA_ATTENTION_SM90", "0")
    assert "attention_sm90" not in kernels(full) and "attention_sm90" not in kernels(cached)


def test_hopper_kernel_is_available_only_on_sm90():
    if not torch.cuda.is_available():
        assert not llada.hopper_attention_available()
    elif torch.cuda.get_device_capability() != (9, 0):
        assert not llada.hopper_attention_available()
    else:
        # Available exactly when the Hopper kernel runs (asked for always, on a shape it serves).
        args = make_qkv(1, 256, 256, 2, 2, 128, torch.bfloat16, "cuda", seed=2)
        with _env("LLADA_ATTENTION_SM90", "always"):
            ran = any("sm90" in n for n in _kernels_run(lambda: llada.attention(*args)))
        assert llada.hopper_attention_available() == ran


@needs_cuda  # without kernels for the GPU, torch's attention runs and reads no switch
@pytest.mark.parametrize("switch, value, message", [
    ("LLADA_ATTENTION_SM90", "yes", "LLADA_ATTENTION_SM90"),
    ("LLADA_ATTENTION_SM90_PIPELINE", "fastest", "LLADA_ATTENTION_SM90_PIPELINE.*two-q-chain"),
])
def test_bad_sm90_switch_is_named(monkeypatch, switch, value, message):
    q, k, v = make_qkv(1, 5, 9, 2, 1, 64, torch.bfloat16, "cuda")
    monkeypatch.setenv(switch, value)
    with pytest.raises(RuntimeError, match=message):
        llada.attention(q, k, v)
