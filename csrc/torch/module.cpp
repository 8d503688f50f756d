// The Python module llada._C: build information. Loading it also registers
// the torch ops (TORCH_LIBRARY in ops.cpp), so it must be imported after torch.
#include <pybind11/pybind11.h>

#ifndef LLADA_VERSION
#define LLADA_VERSION "0.0.0"
#endif
#ifndef LLADA_CUDA_ARCHITECTURES
#define LLADA_CUDA_ARCHITECTURES ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "llada compiled core: decoding kernels registered as torch.ops.llada.*";
  m.attr("__version__") = LLADA_VERSION;
  m.def("cuda_compiled", [] {
#ifdef LLADA_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  m.def("cuda_architectures", [] { return std::string(LLADA_CUDA_ARCHITECTURES); },
        "The CUDA architectures the kernels were compiled for (empty without CUDA).");
}
