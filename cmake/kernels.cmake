# The kernels: torch-free C++ CPU twins and, with CUDA, the CUDA kernels.
# Needs LLADA_WITH_CUDA and the CUDA language enabled beforehand when ON.
set(LLADA_ROOT ${CMAKE_CURRENT_LIST_DIR}/..)

add_library(llada_kernels STATIC
  ${LLADA_ROOT}/csrc/cpu/sample_tokens.cpp
  ${LLADA_ROOT}/csrc/cpu/select_positions.cpp
  ${LLADA_ROOT}/csrc/cpu/commit_tokens.cpp
  ${LLADA_ROOT}/csrc/cpu/attention.cpp
  ${LLADA_ROOT}/csrc/cpu/rms_norm.cpp
  ${LLADA_ROOT}/csrc/cpu/rope.cpp
  ${LLADA_ROOT}/csrc/cpu/silu_mul.cpp)
target_include_directories(llada_kernels PUBLIC ${LLADA_ROOT}/csrc/include)
set_target_properties(llada_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)
# -ffp-contract=off: the Gumbel noise must round exactly as on the GPU.
# -fno-trapping-math: lets the row loops turn selects into vector blends (no
# operation rounds differently).
target_compile_options(llada_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CXX>:-O3 -fopenmp-simd -ffp-contract=off -fno-trapping-math>)
# Attention has no bit-exactness contract with the GPU: its products want FMAs
# (this option comes after the target's and wins).
set_source_files_properties(${LLADA_ROOT}/csrc/cpu/attention.cpp PROPERTIES
  COMPILE_OPTIONS -ffp-contract=fast)

if(LLADA_WITH_CUDA)
  target_sources(llada_kernels PRIVATE
    ${LLADA_ROOT}/csrc/cuda/sample_tokens.cu
    ${LLADA_ROOT}/csrc/cuda/select_positions.cu
    ${LLADA_ROOT}/csrc/cuda/commit_tokens.cu
    ${LLADA_ROOT}/csrc/cuda/attention.cu
    ${LLADA_ROOT}/csrc/cuda/rms_norm.cu
    ${LLADA_ROOT}/csrc/cuda/rope.cu
    ${LLADA_ROOT}/csrc/cuda/silu_mul.cu)
  target_compile_options(llada_kernels PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr>)
  target_link_libraries(llada_kernels PUBLIC CUDA::cudart)

  # The Hopper attention kernel uses sm_90a-only instructions (wgmma, TMA), so
  # it is compiled for that one target, and only when Hopper is asked for.
  if(LLADA_CUDA_ARCHITECTURES MATCHES "(^|;)90a?(-real|-virtual)?($|;)")
    add_library(llada_kernels_sm90 OBJECT ${LLADA_ROOT}/csrc/cuda/attention_sm90.cu)
    target_include_directories(llada_kernels_sm90 PRIVATE ${LLADA_ROOT}/csrc/include)
    set_target_properties(llada_kernels_sm90 PROPERTIES CUDA_ARCHITECTURES OFF POSITION_INDEPENDENT_CODE ON)
    target_compile_options(llada_kernels_sm90 PRIVATE
      -O3 --expt-relaxed-constexpr "SHELL:-gencode arch=compute_90a,code=sm_90a")
    target_sources(llada_kernels PRIVATE $<TARGET_OBJECTS:llada_kernels_sm90>)
    target_compile_definitions(llada_kernels PRIVATE LLADA_WITH_SM90)
  endif()
endif()
