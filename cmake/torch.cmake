# Imported target llada_torch: torch's headers and libraries, located through
# the Python interpreter of the build (whatever torch it has is the one the
# module will run against: torch extensions have no stable ABI).
execute_process(
  COMMAND ${Python_EXECUTABLE} -c
    "import torch, os; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(int(torch._C.has_openmp))"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _torch_result)
if(NOT _torch_result EQUAL 0)
  message(FATAL_ERROR "llada: cannot import torch with ${Python_EXECUTABLE}; install torch first "
                      "and build with --no-build-isolation")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_ROOT)
list(GET _torch_info 1 TORCH_CXX11_ABI)
list(GET _torch_info 2 TORCH_HAS_OPENMP)
message(STATUS "llada: torch at ${TORCH_ROOT}")

add_library(llada_torch INTERFACE)
target_include_directories(llada_torch INTERFACE ${TORCH_ROOT}/include
                                                 ${TORCH_ROOT}/include/torch/csrc/api/include)
target_compile_definitions(llada_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})

set(_torch_libs c10 torch_cpu)
if(LLADA_WITH_CUDA)
  list(APPEND _torch_libs c10_cuda)
endif()
foreach(_lib ${_torch_libs})
  find_library(_path_${_lib} NAMES ${_lib} PATHS ${TORCH_ROOT}/lib NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(llada_torch INTERFACE ${_path_${_lib}})
endforeach()
if(LLADA_WITH_CUDA)
  target_link_libraries(llada_torch INTERFACE CUDA::cudart)
  target_include_directories(llada_torch INTERFACE ${CUDAToolkit_INCLUDE_DIRS})
endif()

# at::parallel_for is a header template. Compiled without the OpenMP that
# torch was built with, it silently becomes a serial loop and every CPU op
# runs on one thread. Link torch's own libgomp where it ships one, so the
# process has a single OpenMP runtime and one thread pool.
if(TORCH_HAS_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
endif()
if(TORCH_HAS_OPENMP AND OpenMP_CXX_FOUND)
  target_compile_options(llada_torch INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${OpenMP_CXX_FLAGS}>)
  if(EXISTS ${TORCH_ROOT}/lib/libgomp.so.1)
    target_link_libraries(llada_torch INTERFACE ${TORCH_ROOT}/lib/libgomp.so.1)
  else()
    target_link_libraries(llada_torch INTERFACE OpenMP::OpenMP_CXX)
  endif()
  message(STATUS "llada: CPU ops run on torch's OpenMP threads")
elseif(TORCH_HAS_OPENMP)
  message(WARNING "llada: torch uses OpenMP but this compiler has none; the CPU ops will run "
                  "on one thread")
endif()
