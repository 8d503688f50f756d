#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and torch, nvcc, cmake, ninja,
# scikit-build-core and pybind11 preinstalled (no network), build llada in
# place against that torch, run the tests (CUDA ones included), run every
# kernel microbenchmark and the Python benchmarks (bench_batching, bench_cpu_matmul and quality
# aside: they add no kernel figure and would not fit), and print a summary table.
#
#   bash bench/gpu_check.sh            # everything, within GPU_CHECK_BUDGET_S
#                                      # (default 540 s: steps past it are skipped)
#   bash bench/gpu_check.sh attention  # only the attention binary: every kernel
#                                      # variant against the CPU twin, then timed
#                                      # (about a minute; for work on the kernels)
#   LLADA_CUDA_ARCHITECTURES=90 ...    # the architectures to build (default: 90)
#
# Logs go to build/gpu_check/; when $OUT is set, the summary and a tarball of
# the logs are copied there after every step, so a run cut short still leaves
# what it measured. The steps run in order of what matters most: the Hopper
# kernel's tests, the attention binary (every kernel and pipeline variant
# validated against the CPU twin, then timed), the attention and decoding
# benchmarks, the other tests, then everything else. The kernel binaries
# build in the background meanwhile.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
ARCHS=${LLADA_CUDA_ARCHITECTURES:-90}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
# CMake finds nvcc on PATH only: without it the extension builds CPU-only.
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
LOGS=build/gpu_check
rm -rf "$LOGS"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run, log, remember failures, save what there is
  local name=$1; shift
  local start=$SECONDS left=$((BUDGET - SECONDS))
  echo "== $name"
  if [ "$left" -lt 15 ]; then  # the summary must still print inside the budget
    echo "   SKIPPED (budget)"
    echo "$name SKIPPED (budget)" >>"$LOGS/steps.txt"
    status=1
    return
  fi
  # Every command but a shell function (which timeout cannot run) ends by the budget.
  local limit=()
  declare -F "$1" >/dev/null || limit=(timeout --kill-after=5 "$left")
  if "${limit[@]}" "$@" >"$LOGS/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
    echo "$name ok ($((SECONDS - start)) s)" >>"$LOGS/steps.txt"
  else
    echo "   FAILED ($((SECONDS - start)) s); last lines:"
    tail -n 25 "$LOGS/$name.log" | sed 's/^/   | /'
    echo "$name FAILED ($((SECONDS - start)) s)" >>"$LOGS/steps.txt"
    status=1
  fi
  save
}

save() {  # the summary and the logs so far, to $OUT when set
  [ -n "${OUT:-}" ] || return 0
  summary >"$OUT/summary.txt" 2>/dev/null
  tar czf "$OUT/gpu_check_logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null  # a log may still grow
}

summary() {  # the long tables first, the steps and tests last (a reader of the tail sees them)
  echo "================ summary ================"
  # Timed and failed kernel cases; the cases only validated are counted.
  grep -h -A2 '^RESULT' "$LOGS"/bin_bench_*.log 2>/dev/null | grep -E ' us=| FAIL$|^  bad by' | sed 's/^RESULT /  /'
  echo "  validated only (not timed): $(grep -h '^RESULT.*validated ok$' "$LOGS"/bin_bench_*.log 2>/dev/null | wc -l) ok"
  # The tables' rows, and the titles of bench_attention's two tables (eager
  # calls, then CUDA graph replays), whose headers are the same.
  for f in "$LOGS"/bench_attention.log "$LOGS"/bench_decoding.log "$LOGS"/bench_gemm.log \
           "$LOGS"/bench_ops.log "$LOGS"/bench_generate.log; do
    [ -f "$f" ] && { echo "-- $(basename "$f" .log)"; sed -n -e '/^attention, .*: TFLOP\/s/p' -e '/^|/p' "$f"; }
  done
  echo "---------------- status ----------------"
  cat "$LOGS/device.txt"
  echo "steps: $(paste -sd ',' "$LOGS/steps.txt" 2>/dev/null | sed 's/,/, /g')"
  for t in tests_sm90 tests_sm90_pipelines tests; do
    [ -f "$LOGS/$t.log" ] || continue
    echo "$t: $(grep -E '(passed|failed|error)' "$LOGS/$t.log" | tail -n 1)"
    grep -E '^(FAILED|ERROR) ' "$LOGS/$t.log" | sed 's/^/  /'
  done
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$LOGS/device.txt"

bench_build() {  # bench_build [TARGET]: configure and build the kernel binaries
  cmake -S bench/cuda -B build/bench-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLADA_CUDA_ARCHITECTURES="$ARCHS" && cmake --build build/bench-gpu ${1:+--target "$1"}
}

if [ "${1:-}" = attention ]; then
  step bench_build bench_build bench_attention
  step bin_bench_attention timeout 120 build/bench-gpu/bench_attention
  grep -E '^RESULT|^  (bad|MISMATCH)' "$LOGS/bin_bench_attention.log" | tee "$LOGS/summary.txt"
  [ -n "${OUT:-}" ] && cp "$LOGS/summary.txt" "$OUT/"
  exit $status
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOGS/device.txt"
cmake --version | head -n 1 | tee -a "$LOGS/device.txt"  # 3.26 or newer builds the CUDA sources

# The kernel binaries build in the background from here on, beside the
# extension and the first tests: both builds wait mostly on one long nvcc
# job (the Hopper attention kernels), and the device time is short.
# (In a process group of its own, so that stopping it stops its compilers too.)
set -m
bench_build >"$LOGS/bench_build.background.log" 2>&1 &
bench_build_pid=$!
set +m
collect_bench_build() {  # the background build's log and status, once it is done (or the budget is)
  while kill -0 "$bench_build_pid" 2>/dev/null && [ $((BUDGET - SECONDS)) -gt 20 ]; do sleep 1; done
  if kill -0 "$bench_build_pid" 2>/dev/null; then
    kill -TERM -- -"$bench_build_pid" 2>/dev/null
    wait "$bench_build_pid" 2>/dev/null
    cat "$LOGS/bench_build.background.log"
    echo "the build was still running when the budget ran out: stopped"
    return 1
  fi
  wait "$bench_build_pid"
  local rc=$?
  cat "$LOGS/bench_build.background.log"
  return $rc
}

step build "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v . \
  -C cmake.define.LLADA_CUDA_ARCHITECTURES="$ARCHS" -C build-dir=build/gpu
# Without kernels for this GPU every CUDA test would skip and the ops run torch's
# compositions: say so here rather than pass quietly.
step kernels_run_on_gpu "$PYTHON" -c "import torch, llada.devices as d; import sys; \
sys.exit(0 if d.kernels_run_on(torch.device('cuda', 0)) else 'the built kernels do not run on this GPU')"
kernels_ok=$(grep -q '^kernels_run_on_gpu ok' "$LOGS/steps.txt" && echo 1 || true)
# With pytest-xdist the tests run in parallel and a crashing test cannot end
# the run; 2 threads per worker, 8 workers on 16 cores. With pytest-timeout a
# hung test costs its own time only.
parallel=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
parallel="$parallel $("$PYTHON" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120" || true)"
PYTEST=(env OMP_NUM_THREADS=2 "$PYTHON" -m pytest)
# The Hopper attention kernel's tests go first, alone and under a timeout. If
# they hang or fault the device, every step below runs with that kernel
# turned off (a fault would take them down too). If its results are only
# wrong, the steps keep it: the tests then fail where the op's plan takes it,
# bench_attention shows "wrong" where it disagrees with the float64
# reference (not timed) and fails, and the decoding and generation
# benchmarks time it without checking its results.
step tests_sm90 timeout --kill-after=10 150 "${PYTEST[@]}" -q -rfEs -p no:cacheprovider $parallel \
  tests/test_attention.py -k "sm90 and not pipelines"
sm90_log="$LOGS/tests_sm90.log"
# pytest's summary line ("3 passed, 1 skipped in 9.1s"), if it got that far.
sm90_summary=$(grep -E '^=*[ ]*[0-9]+ (passed|failed|skipped|deselected|error).* in [0-9.]+s' "$sm90_log" \
  2>/dev/null | tail -n 1)
if grep -q '^tests_sm90 SKIPPED' "$LOGS/steps.txt"; then
  echo "   the Hopper attention kernel's tests did not run (budget): the steps below run without it"
  export LLADA_ATTENTION_SM90=0
elif grep -qiE 'illegal (memory|instruction)|launch failure|misaligned address|device-side|CUDA error' \
       "$sm90_log" || [ -z "$sm90_summary" ]; then
  echo "   the Hopper attention kernel hung or faulted: the steps below run without it"
  export LLADA_ATTENTION_SM90=0
elif ! echo "$sm90_summary" | grep -qE '[0-9]+ (passed|failed)'; then
  echo "   no Hopper attention kernel test ran (all skipped: no sm_90 GPU or build): the steps below run without it"
  export LLADA_ATTENTION_SM90=0
elif grep -q FAILED "$sm90_log"; then
  echo "   the Hopper attention kernel gave wrong results: the steps below keep it; bench_attention marks it" \
    "wrong where it disagrees (not timed, the step fails); bench_decoding and bench_generate time it unchecked"
fi
# Then the pipeline variants of its 128-query blocks, each tested on its own:
# the benchmarks time only those that passed (LLADA_BENCH_SM90_PIPELINES), so
# that one that hangs or faults cannot take a benchmark down.
if [ "${LLADA_ATTENTION_SM90:-}" != 0 ]; then
  # -v prints each test's outcome as it ends, so a run cut short by the
  # timeout (one pipeline hanging) still names those that passed.
  step tests_sm90_pipelines timeout --kill-after=10 150 "${PYTEST[@]}" -v -rA -p no:cacheprovider $parallel \
    tests/test_attention.py -k sm90_pipelines
  # "PASSED <test id>" (xdist, summary) or "<test id> PASSED" (no xdist).
  passed_id='PASSED [^ ]*test_sm90_pipelines_match_reference\[[a-z0-9-]+\]'
  passed_id="$passed_id|test_sm90_pipelines_match_reference\[[a-z0-9-]+\] PASSED"
  LLADA_BENCH_SM90_PIPELINES=$(grep -oE "$passed_id" "$LOGS/tests_sm90_pipelines.log" |
    sed -E 's/.*\[([a-z0-9-]+)\].*/\1/' | sort -u | paste -sd ' ')
  export LLADA_BENCH_SM90_PIPELINES
  echo "   pipelines to benchmark: ${LLADA_BENCH_SM90_PIPELINES:-none}"
  echo "pipelines that passed: ${LLADA_BENCH_SM90_PIPELINES:-none}" >>"$LOGS/device.txt"
fi
step bench_build collect_bench_build
step bin_bench_attention timeout 150 build/bench-gpu/bench_attention
# Without our kernels on this GPU the Python steps would time torch's
# compositions and skip every CUDA test: only the kernel binaries run.
if [ -n "$kernels_ok" ]; then
  step bench_attention timeout 150 "$PYTHON" bench/bench_attention.py --device cuda
  step bench_decoding timeout 200 "$PYTHON" bench/bench_decoding.py --device cuda --shape 8b --repeats 1
  # The CPU-only tests run in CI; here they run beside the CUDA ones anyway.
  step tests timeout --kill-after=10 240 "${PYTEST[@]}" -q -rfEs -p no:cacheprovider $parallel tests \
    -k "not (sm90 and test_attention.py)"
  step bench_gemm timeout 90 "$PYTHON" bench/bench_gemm.py
fi
for bin in build/bench-gpu/bench_*; do
  [ -x "$bin" ] && [ "$(basename "$bin")" != bench_attention ] && step "bin_$(basename "$bin")" timeout 60 "$bin"
done
if [ -n "$kernels_ok" ]; then
  step bench_ops timeout 120 "$PYTHON" bench/bench_ops.py --device cuda
  step bench_generate timeout 150 "$PYTHON" bench/bench_generate.py --device cuda --shape 8b
fi

echo
summary | tee "$LOGS/summary.txt"
save
exit $status
