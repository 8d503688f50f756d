"""The compiled core: build information and op registration."""

import torch

import llada


def test_cuda_availability_is_reported_separately_from_the_gpu():
    compiled = llada.cuda_kernels_available()
    assert isinstance(compiled, bool)
    assert bool(llada._C.cuda_architectures()) == compiled
    if compiled:
        assert all(a.strip().isdigit() for a in llada._C.cuda_architectures().split(","))


def test_ops_are_registered_for_cpu_and_cuda():
    for name in ("sample_tokens", "select_positions", "commit_tokens"):
        op = getattr(torch.ops.llada, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
        assert has_cuda == llada.cuda_kernels_available()


def test_version():
    assert llada.__version__.count(".") == 2
