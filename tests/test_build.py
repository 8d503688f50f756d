"""The compiled core: build information and op registration."""

import importlib.metadata
import subprocess
import sys

import torch

import llada


def test_cuda_availability_is_reported_separately_from_the_gpu():
    compiled = llada.cuda_kernels_available()
    assert isinstance(compiled, bool)
    assert bool(llada._C.cuda_architectures()) == compiled
    if compiled:
        assert all(a.strip().isdigit() for a in llada._C.cuda_architectures().split(","))


# Every op the extension defines (csrc/torch): the kernels, and the argument
# checks that run before a torch reference where no kernel does.
KERNEL_OPS = ("sample_tokens", "select_positions", "commit_tokens", "attention", "rms_norm", "add_rms_norm",
              "rope", "silu_mul", "store_kv")
CHECK_OPS = ("check_sample_tokens", "check_select_positions", "check_commit_tokens", "check_attention",
             "check_rms_norm", "check_rope", "check_store_kv", "check_silu_mul")


def test_ops_are_registered_for_cpu_and_cuda():
    # A kernel has a CUDA implementation only in a build with the CUDA
    # kernels; the checks read no data, so every build has them for CUDA too.
    for name in KERNEL_OPS + CHECK_OPS:
        op = getattr(torch.ops.llada, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
        assert has_cuda == (name in CHECK_OPS or llada.cuda_kernels_available()), name


def test_the_registration_test_covers_every_op():
    registered = {name.removeprefix("llada::") for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("llada::")}
    assert registered == set(KERNEL_OPS + CHECK_OPS)


def test_version():
    # The extension's version (CMake's project version) is the package's
    # (pyproject's): a bump of one alone shows here.
    assert llada.__version__.count(".") == 2
    assert llada.__version__ == importlib.metadata.version("llada")


def test_a_missing_extension_is_named():
    # Without the compiled module, `import llada` says what is missing and how
    # to build it (not a puzzling circular-import error).
    code = "import sys; sys.modules['llada._C'] = None; import llada"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.rstrip().splitlines()[-1].startswith(
        "ImportError: llada: the compiled extension llada._C did not load")
    assert "pip install --no-build-isolation ." in run.stderr


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
