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
# what it measured (the benchmarks print each result as they measure it, and
# the summary keeps those lines). The steps run in order of what matters
# most: the Hopper kernel's tests, the attention and decoding benchmarks, the
# attention binary (every kernel and pipeline variant validated against the
# CPU twin, then timed), the CUDA tests (the CPU-only ones run in CI), then
# everything else. The kernel binaries build in the background meanwhile.
# The summary goes to build/gpu_check/summary.txt; the script ends by
# printing only its last part, the key results and the status, which fits
# a terminal's (or a tool's) last 12,000 characters.
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
    tail -n 25 "$LOGS/$name.log" | awk '{ print "   | " $0 }'  # a line to itself even if the log ends mid-line
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

summary() {  # everything: the long tables first, then key_results (a reader of the tail sees them)
  echo "================ summary ================"
  # Timed and failed kernel cases; the cases only validated are counted.
  grep -h -A2 '^RESULT' "$LOGS"/bin_bench_*.log 2>/dev/null | grep -E ' us=| FAIL$|^  bad by' | sed 's/^RESULT /  /'
  echo "  validated only (not timed): $(grep -h '^RESULT.*validated ok$' "$LOGS"/bin_bench_*.log 2>/dev/null | wc -l) ok"
  # The tables' rows, the titles of bench_attention's two tables (eager
  # calls, then CUDA graph replays), whose headers are the same, and the
  # other llada columns' results of bench_attention (in its tables too, when
  # it got that far).
  for f in "$LOGS"/bench_attention.log "$LOGS"/bench_decoding.log "$LOGS"/bench_gemm.log \
           "$LOGS"/bench_ops.log "$LOGS"/bench_generate.log; do
    [ -f "$f" ] && { echo "-- $(basename "$f" .log)"
                     sed -n -e '/^RESULT attention_variant /p' -e '/^attention, .*: TFLOP\/s/p' -e '/^|/p' "$f"; }
  done
  key_results
}

key_results() {  # the part of the summary the script ends by printing: short, the status last
  echo "================ key results ================"
  local f end
  for f in "$LOGS"/bin_bench_*.log; do
    [ -f "$f" ] || continue
    end=""
    tail -n 1 "$f" | grep -qE '^(ALL OK|SOME CASES FAILED)$' || end=" (did not finish)"
    echo "$(basename "$f" .log): $(grep -c '^RESULT.* ok$' "$f") cases ok, $(grep -c '^RESULT.* FAIL$' "$f") FAIL$end"
    grep '^RESULT.* FAIL$' "$f" | head -n 5 | sed 's/^RESULT /  /'
  done
  # Printed by the benchmarks as each is measured: what a step cut short
  # by its timeout got through. llada's own attention (the op's default
  # plan) against the best SDPA backend, then the decoding policies' and
  # batches' tokens/s, then exact generation's.
  for f in "$LOGS"/bench_attention.log "$LOGS"/bench_decoding.log "$LOGS"/bench_generate.log; do
    [ -f "$f" ] && grep -E '^RESULT (attention|decoding|decoding_batch|generate) ' "$f"
  done
  echo "---------------- status ----------------"
  cat "$LOGS/device.txt"
  echo "steps: $(paste -sd ',' "$LOGS/steps.txt" 2>/dev/null | sed 's/,/, /g')"
  local t
  for t in tests_sm90 tests_sm90_pipelines tests; do
    [ -f "$LOGS/$t.log" ] && test_status "$t"
  done
}

# pytest's closing line ("=== 3 passed, 1 skipped in 9.1s ===", without the
# "=" under -q).
PYTEST_CLOSING='^=* *([0-9]+ [a-z]+|no tests ran)(, [0-9]+ [a-z]+)* in [0-9.]+s'
# A test's outcome as -v prints it when the test ends: "[gw3] [ 40%] PASSED
# <test id>" under pytest-xdist, "<test id> PASSED   [ 40%]" without it.
progress() {  # progress OUTCOME LOG: the test ids with that outcome so far
  sed -nE -e "s/^\[gw[0-9]+\] \[ *[0-9]+%\] $1 (.*[^ ]) *\$/\1/p" -e 't' \
          -e "s/^(.*[^ ]) $1 +\[ *[0-9]+%\]\$/\1/p" "$2"
}

# Without pytest-xdist, -v names a test as it starts ("<test id> ", its
# outcome then ends that line), so the test a stop cut short is the last one
# named without an outcome: pytest-timeout's "+++ Timeout +++" banner (which
# starts on a line of its own) follows it, or a fault or the step's timeout
# left the log without a closing line. (Under pytest-xdist -v names tests
# only as they end: a stopped worker's test is its "crashed" line.)
stopped() {  # stopped LOG: "TIMEOUT <test id>" or "STOPPED <test id>" for the test a stop cut short
  awk -v closing="$PYTEST_CLOSING" '
    /^[^ ]+\.py::[^ ]+/ { started = $1; ended = ($0 ~ /\[ *[0-9]+%\]$/) }
    /\++ Timeout \++$/ && started != "" && !ended && !(started in timed) { timed[started] = 1; print "TIMEOUT " started }
    $0 ~ closing { closed = 1 }
    END { if (!closed && started != "" && !ended && !(started in timed)) print "STOPPED " started }' "$1"
}

test_status() {  # test_status STEP: its pytest closing line (or the counts so far), then what failed
  local log="$LOGS/$1.log" closing failed n outcome
  closing=$(grep -E "$PYTEST_CLOSING" "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  if [ -z "$closing" ]; then  # cut short: what -v printed so far
    closing="cut short after"
    for outcome in PASSED FAILED ERROR SKIPPED; do
      closing="$closing $(progress "$outcome" "$log" | wc -l) ${outcome,,},"
    done
    closing="${closing%,}"
  fi
  echo "$1: $closing"
  # Each test that failed or errored, once, whether -v named it as it ended
  # or the closing summary did (which a run cut short never prints); a test
  # that a timeout or a fault stopped (the whole pytest run with it, without
  # pytest-xdist) or whose xdist worker crashed.
  failed=$({ for outcome in FAILED ERROR; do progress "$outcome" "$log" | sed "s/^/$outcome /"; done
             sed -nE -e 's/^(FAILED|ERROR) ([^ ]+) - .*$/\1 \2/p' -e 't' -e 's/^(FAILED|ERROR) ([^ ]+)$/\1 \2/p' \
                     -e "s/^worker '[^']*' crashed while running '(.*)'\$/CRASHED \1/p" "$log"
             stopped "$log"
           } | awk '!seen[$0]++')
  n=$(printf '%s' "$failed" | grep -c .)
  printf '%s\n' "$failed" | head -n 15 | grep . | sed 's/^/  /'
  [ "$n" -le 15 ] || echo "  ... and $((n - 15)) more: $log"
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
wait_for_bench_build() {  # wait_for_bench_build SECONDS: until the background build is done, at most SECONDS
  local until=$((SECONDS + $1))
  while kill -0 "$bench_build_pid" 2>/dev/null && [ "$SECONDS" -lt "$until" ]; do sleep 1; done
  if kill -0 "$bench_build_pid" 2>/dev/null; then
    echo "   the kernel binaries are still building: the benchmarks below share the CPUs with the compilers"
    echo "the Python benchmarks ran beside the kernel binaries' build" >>"$LOGS/device.txt"
  fi
}

step build "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v . \
  -C cmake.define.LLADA_CUDA_ARCHITECTURES="$ARCHS" -C build-dir=build/gpu
# A failed build leaves no llada, or (on a machine that ran this before) the
# previous run's: no test or Python benchmark runs on it. The kernel binaries
# do not import llada: they still run if their own build works.
build_ok=$(grep -q '^build ok' "$LOGS/steps.txt" && echo 1 || true)
if [ -z "$build_ok" ]; then
  echo "   the build failed: no test or Python benchmark runs (llada would be missing or stale); the kernel binaries do"
  echo "llada's build failed: no test or Python benchmark ran, only the kernel binaries" >>"$LOGS/device.txt"
else
  # Without kernels for this GPU every CUDA test would skip and the ops run torch's
  # compositions: say so here rather than pass quietly.
  step kernels_run_on_gpu "$PYTHON" -c "import torch, llada.devices as d; import sys; \
sys.exit(0 if d.kernels_run_on(torch.device('cuda', 0)) else 'the built kernels do not run on this GPU')"
fi
kernels_ok=$(grep -q '^kernels_run_on_gpu ok' "$LOGS/steps.txt" && echo 1 || true)
# With pytest-xdist the tests run in 8 workers of 2 threads each (16 cores);
# a worker that crashes or is stopped is replaced, its test reported FAILED,
# and the run goes on. With pytest-timeout a test past its limit is stopped
# by the "thread" method: a timer thread dumps the stacks and ends the
# process. (The default "signal" method raises from a signal handler, which
# never runs while the test waits inside libcuda on a hung kernel.) That ends
# the test's xdist worker, or without xdist the whole pytest run, whose log
# then has no closing line.
xdist=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
has_timeout=$("$PYTHON" -c "import pytest_timeout" 2>/dev/null && echo 1 || true)
per_test() {  # per_test SECONDS: the options that limit each test to SECONDS, if pytest-timeout is there
  [ -z "$has_timeout" ] || echo "--timeout $1 --timeout-method=thread"
}
PYTEST=(env OMP_NUM_THREADS=2 "$PYTHON" -m pytest)
# The Hopper attention kernel's tests go first, alone and under a timeout. If
# they hang or fault the device, every step below runs with that kernel
# turned off (a fault would take them down too). If its results are only
# wrong, the steps keep it: the tests then fail where the op's plan takes it,
# bench_attention shows "wrong" where it disagrees with the float64
# reference (not timed) and fails, and the decoding and generation
# benchmarks time it without checking its results. Each of these tests takes
# seconds: one still running after 60 is taken for hung.
[ -z "$build_ok" ] || step tests_sm90 timeout --kill-after=10 150 "${PYTEST[@]}" -v -rfEs -p no:cacheprovider \
  $xdist $(per_test 60) tests/test_attention.py -k "sm90 and not pipelines"
sm90_log="$LOGS/tests_sm90.log"
# pytest's closing line ("3 passed, 1 skipped in 9.1s"), if it got that far.
sm90_summary=$(grep -E "$PYTEST_CLOSING" "$sm90_log" 2>/dev/null | tail -n 1)
# A fault's CUDA error, or a test stopped by pytest-timeout: its "+++ Timeout
# +++" banner (without xdist, the run then ends: no closing line), its xdist
# worker "node down" and "crashed" (with xdist; a worker killed by a fault
# reads the same).
sm90_fault='illegal (memory|instruction)|launch failure|misaligned address|device-side|CUDA error'
sm90_fault="$sm90_fault|\+ Timeout \+|node down|crashed"
if [ -z "$build_ok" ]; then
  :  # not tested (said above): the attention binary validates every Hopper variant against the CPU twin itself
elif grep -q '^tests_sm90 SKIPPED' "$LOGS/steps.txt"; then
  echo "   the Hopper attention kernel's tests did not run (budget): the steps below run without it"
  export LLADA_ATTENTION_SM90=0
elif grep -qiE "$sm90_fault" "$sm90_log" || [ -z "$sm90_summary" ]; then
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
if [ -n "$build_ok" ] && [ "${LLADA_ATTENTION_SM90:-}" != 0 ]; then
  # -v prints each test's outcome as it ends, so a run cut short by the
  # timeout (one pipeline hanging) still names those that passed.
  step tests_sm90_pipelines timeout --kill-after=10 150 "${PYTEST[@]}" -v -rA -p no:cacheprovider $xdist \
    $(per_test 60) tests/test_attention.py -k sm90_pipelines
  # "PASSED <test id>" (xdist, summary) or "<test id> PASSED" (no xdist).
  passed_id='PASSED [^ ]*test_sm90_pipelines_match_reference\[[a-z0-9-]+\]'
  passed_id="$passed_id|test_sm90_pipelines_match_reference\[[a-z0-9-]+\] PASSED"
  LLADA_BENCH_SM90_PIPELINES=$(grep -oE "$passed_id" "$LOGS/tests_sm90_pipelines.log" |
    sed -E 's/.*\[([a-z0-9-]+)\].*/\1/' | sort -u | paste -sd ' ')
  export LLADA_BENCH_SM90_PIPELINES
  echo "   pipelines to benchmark: ${LLADA_BENCH_SM90_PIPELINES:-none}"
  echo "pipelines that passed: ${LLADA_BENCH_SM90_PIPELINES:-none}" >>"$LOGS/device.txt"
fi
# Without our kernels on this GPU the Python steps would time torch's
# compositions and skip every CUDA test: only the kernel binaries run.
if [ -n "$kernels_ok" ]; then
  # The Python benchmarks go before the attention binary, which could hang
  # and take their time. Timed beside the compilers, the Python work of
  # each call would be slower: the build has had the tests' time to finish,
  # and gets a minute more.
  wait_for_bench_build 60
  step bench_attention timeout 150 "$PYTHON" bench/bench_attention.py --device cuda
  step bench_decoding timeout 200 "$PYTHON" bench/bench_decoding.py --device cuda --shape 8b --repeats 1
fi
step bench_build collect_bench_build
step bin_bench_attention timeout 150 build/bench-gpu/bench_attention
if [ -n "$kernels_ok" ]; then
  # Only the tests that need a GPU (the CPU-only ones run in CI): those whose
  # id says "cuda" (the device parameter, test_cuda_graph.py, or the name),
  # which takes in every test that skips for want of a GPU, but the Hopper
  # kernel's, tested above.
  step tests timeout --kill-after=10 240 "${PYTEST[@]}" -v -rfEs -p no:cacheprovider $xdist $(per_test 120) \
    tests -k "cuda and not (sm90 and test_attention.py)"
  step bench_gemm timeout 90 "$PYTHON" bench/bench_gemm.py
fi
for bin in build/bench-gpu/bench_*; do
  [ -x "$bin" ] && [ "$(basename "$bin")" != bench_attention ] && step "bin_$(basename "$bin")" timeout 60 "$bin"
done
if [ -n "$kernels_ok" ]; then
  step bench_ops timeout 120 "$PYTHON" bench/bench_ops.py --device cuda
  step bench_generate timeout 150 "$PYTHON" bench/bench_generate.py --device cuda --shape 8b
fi

summary >"$LOGS/summary.txt"
save
echo
echo "(the whole summary, with every table: $LOGS/summary.txt${OUT:+ and $OUT/summary.txt})"
key_results
exit $status
