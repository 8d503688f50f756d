// The Python module llada._C: build information. Loading it also registers
// the torch ops (TORCH_LIBRARY in ops.cpp), so it must be imported after torch.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <string>
#include <vector>

#include "llada/attention.h"

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
  m.def("sm90_pipelines", [] {
    std::vector<std::string> names;
    for (const llada::Sm90PipelineName& named : llada::kSm90Pipelines) names.emplace_back(named.name);
    return names;
  }, "The names LLADA_ATTENTION_SM90_PIPELINE takes: the Hopper attention kernel's pipelines, the plan's first.");
  // The CPU ops split their work with at::parallel_for; this reports how many
  // threads it really uses here, which is 1 if the build lost its OpenMP.
  m.def("cpu_threads_used", [](int64_t tasks) {
    std::atomic<int> most{0};
    at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
      const int id = at::get_thread_num() + 1;
      for (int seen = most.load(); seen < id && !most.compare_exchange_weak(seen, id);) {}
    });
    return most.load();
  }, "Threads at::parallel_for uses for `tasks` one-element tasks in this build.");
}
