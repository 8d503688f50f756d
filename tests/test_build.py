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


def test_cpu_ops_run_on_torch_intra_op_threads():
    # Without the OpenMP torch uses, at::parallel_for compiles to a serial
    # loop and every CPU op runs on one thread whatever torch is set to.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert llada._C.cpu_threads_used(64) == 2
        torch.set_num_threads(1)
        assert llada._C.cpu_threads_used(64) == 1
    finally:
        torch.set_num_threads(before)
