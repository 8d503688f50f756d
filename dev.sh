#!/usr/bin/env bash
# One entry point for working on llada from a fresh clone.
#
#   ./dev.sh test [pytest args]   set up (if needed), build, run the test suite
#   ./dev.sh generate [args]      set up (if needed), build, run `llada generate`
#   ./dev.sh build                (re)build and install the extension
#   ./dev.sh bench-build          build the CUDA microbenchmarks (needs nvcc)
#
# Set-up makes .venv with the pinned torch and the tools; the build is
# incremental (build/), so later calls only recompile what changed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
TORCH_VERSION=${LLADA_TORCH_VERSION:-2.14.1}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if [ ! -f "$VENV/.llada-deps" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    # Build tools first: the extension builds against the torch in this venv
    # (no build isolation), so torch is installed before llada.
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy pybind11 "scikit-build-core>=0.10" \
      ninja "cmake>=3.26" pytest hypothesis expecttest safetensors tokenizers transformers tqdm rich
    touch "$VENV/.llada-deps"
  fi
}

build() {
  setup
  # LLADA_CMAKE_ARGS="-DNAME=VALUE ...": one define each, so a value may hold
  # a list ("-DLLADA_CUDA_ARCHITECTURES=80;90").
  local words defines=() word name
  read -ra words -d '' <<< "${LLADA_CMAKE_ARGS:-}" || true  # every line's words
  for word in ${words[@]+"${words[@]}"}; do
    case "$word" in
      -D?*=*) name=${word%%=*}; name=${name#-D}; name=${name%%:*}  # -DNAME:TYPE=VALUE: no type
              defines+=("--config-settings=cmake.define.$name=${word#*=}") ;;
      *) echo "./dev.sh: LLADA_CMAKE_ARGS: expected -DNAME=VALUE words, got '$word'" >&2; exit 2 ;;
    esac
  done
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . ${defines[@]+"${defines[@]}"}
}

bench_build() {
  setup
  # Where bench/cuda/CMakeLists.txt looks for nvcc.
  if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    echo "./dev.sh bench-build: needs nvcc (the CUDA toolkit): none on PATH or at /usr/local/cuda/bin/nvcc" >&2
    exit 1
  fi
  # The venv's ninja: a fresh machine may have no other on PATH.
  "$VENV/bin/cmake" -S bench/cuda -B build/bench -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/$VENV/bin/ninja" \
    -DCMAKE_BUILD_TYPE=Release \
    ${LLADA_CUDA_ARCHITECTURES:+-DLLADA_CUDA_ARCHITECTURES="$LLADA_CUDA_ARCHITECTURES"}
  "$VENV/bin/cmake" --build build/bench
}

cmd=${1:-test}
shift || true
case "$cmd" in
  test) build; exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
  generate) build; exec "$VENV/bin/llada" generate "$@" ;;
  build) build ;;
  bench-build) bench_build ;;
  *) echo "usage: ./dev.sh {test|generate|build|bench-build} [args]" >&2; exit 2 ;;
esac
