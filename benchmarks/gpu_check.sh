#!/bin/bash
# The checks that need a CUDA GPU, in one run, most wanted first (a run cut short keeps the logs it
# wrote): build the extension with CUDA, the compiled ops' bad-input cases (a backtrace if they
# crash), their CUDA parity and opcheck tests, the performance targets (benchmarks/gpu_targets.py),
# the Triton ops' CUDA tests, compute-sanitizer memcheck on the compiled ops' CUDA tests, the CUDA
# lime_fit's time per phase (benchmarks/lime_fit_phases.cu), the Triton ops' host time per call
# (benchmarks/triton_host_overhead.py), racecheck and synccheck on the kernels that share memory
# between threads (what the CPU emulator in tests/simt cannot see), and the quick benchmark
# profile.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (logs and the benchmark report go to OUT_DIR)
#
# TORCH_CUDA_ARCH_LIST (e.g. 9.0 for H100/H200) limits the build to the GPU at hand.
# GPU_CHECK_DEADLINE_S (whole seconds after the start; unset: none) ends the run in time when the
# GPU is lent for a fixed time: each step runs under `timeout` with what is left, a step with under
# 20 s left is skipped, and the summary names what did not run. On a lent machine whose run limit
# is 10 minutes, e.g.:
#
#   GPU_CHECK_DEADLINE_S=500 TORCH_CUDA_ARCH_LIST=9.0 bash benchmarks/gpu_check.sh /tmp/gpu-check;
#   tar czf "$OUT/gpu-check.tgz" -C /tmp gpu-check
#
# A preflight first reports what is missing (a GPU, setuptools >= 77, pytest, lime); if torch sees
# no CUDA device the steps are skipped, and if the build gives no CUDA kernels the steps that test
# them are, each named in the summary instead of running into its timeout.
set -u
out=${1:-gpu-check}
deadline=${GPU_CHECK_DEADLINE_S:-0}
# Whole seconds only: `[ 500.5 -gt 0 ]` is an error, which would silently disable the deadline.
case $deadline in
  '' | *[!0-9]*)
    echo "GPU_CHECK_DEADLINE_S must be a whole number of seconds (e.g. 500), got '$deadline'" >&2
    exit 2
    ;;
esac
deadline=$((10#$deadline))  # a leading zero would otherwise read as octal
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() { echo "=== $1 $(date -u +%T)"; }
status=0
not_run=()
stop=""        # set when no step left can do anything useful (no CUDA device): why
no_kernels=""  # set when the build gave no CUDA kernels: why (the Triton steps still run)
last_rc=0      # the exit status of the last step run (0 when it was skipped)
run() {  # run NAME LOG COMMAND...: the command's output to LOG, its exit status and tail here
  local name=$1 log=$2 limit=()
  shift 2
  step "$name"
  last_rc=0
  if [ -n "$stop" ]; then
    echo "skipped: $stop"
    not_run+=("$name")
    return
  fi
  if [ "$deadline" -gt 0 ]; then
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then
      echo "skipped: ${left} s left before the deadline (${deadline} s)"
      not_run+=("$name")
      return
    fi
    limit=(timeout -k 10 "$left")
  fi
  ${limit[@]+"${limit[@]}"} "$@" > "$out/$log" 2>&1
  local rc=$?
  last_rc=$rc
  echo "rc=$rc"
  if [ ${#limit[@]} -gt 0 ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; }; then
    echo "stopped at the deadline (${deadline} s)"
    not_run+=("$name (cut short)")
  fi
  tail -n 4 "$out/$log"
  [ $rc -eq 0 ] || status=1
}
kernels_run() {  # run, for a step that needs the compiled CUDA kernels
  if [ -n "$no_kernels" ]; then
    step "$1"
    echo "skipped: $no_kernels"
    not_run+=("$1")
    last_rc=0
    return
  fi
  run "$@"
}
preflight() {  # what the steps below need, reported as missing; fails only when nothing can run
  if ! python -c "import torch" > /dev/null 2>&1; then
    echo "fatal: \`python -c 'import torch'\` fails (python: $(command -v python || echo none)): no step can run"
    return 1
  fi
  local missing=()
  if ! timeout 30 nvidia-smi -L 2> /dev/null | grep -q "^GPU"; then
    missing+=("a GPU listed by nvidia-smi -L (the CUDA steps will fail or be skipped)")
  fi
  if ! python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" > /dev/null 2>&1; then
    missing+=("setuptools >= 77, which pyproject.toml's SPDX license string needs: the build will fail (pip install 'setuptools>=77')")
  fi
  python -c "import pytest" > /dev/null 2>&1 || missing+=("pytest: the test steps will fail")
  python -c "import lime" > /dev/null 2>&1 || missing+=("lime: the bench's lime providers will be skipped (install its sdist)")
  local m
  for m in ${missing[@]+"${missing[@]}"}; do echo "missing: $m"; done
  [ ${#missing[@]} -gt 0 ] || echo "nothing missing"
}
step preflight
preflight 2>&1 | tee "$out/preflight.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  step end
  exit 1
fi
# -v: the build's own messages (whether it builds the CUDA ops, and why not) go to the log
run build build.log python -m pip install -v --no-build-isolation --no-deps -e .
run info info.log python -m attrefine_fast.info
# Without a CUDA device every step below would fail or run into its timeout; without the CUDA
# kernels those that test them would (the Triton steps, the targets and benchmarks still run):
# they are skipped and named in the summary.
if grep -q "CUDA not available" "$out/info.log" 2> /dev/null; then
  stop="torch sees no CUDA device (see info.log)"
  echo "stopping: $stop"
  status=1
elif ! grep -q "CPU and CUDA kernels" "$out/info.log" 2> /dev/null; then
  no_kernels="the extension has no CUDA kernels (see build.log)"
  echo "skipping the compiled CUDA kernels' steps: $no_kernels"
  status=1
fi
kernels_run bad-input bad_input.log python -m pytest -q -rfE -p no:cacheprovider tests/test_compiled_ops.py -k bad_input
# where a crashing CUDA case crashed: on this step's own failure (earlier steps also set $status)
if [ $last_rc -ne 0 ] && command -v cuda-gdb > /dev/null; then
  kernels_run bad-input-backtrace bad_input_gdb.log cuda-gdb -batch -ex run -ex bt --args \
    python tests/bad_input_runner.py cuda
fi
kernels_run compiled-cuda cuda_tests.log python -m pytest -q -rfE -p no:cacheprovider tests/test_compiled_ops.py -k cuda
run targets targets.log python benchmarks/gpu_targets.py --json "$out/targets.json"
# pytest-xdist, where installed, spreads the Triton tests' compilations over the cores
workers=$(python -c "import xdist" 2> /dev/null && echo "-n 8")
run triton-cuda triton_tests.log python -m pytest -q -rfE -p no:cacheprovider $workers \
  tests/test_triton_ops.py tests/test_triton_fit_pgd.py tests/test_compile.py -k cuda
kernels_run memcheck memcheck.log compute-sanitizer --tool memcheck --error-exitcode 9 \
  python -m pytest -q -p no:cacheprovider tests/test_compiled_ops.py -k cuda
run lime-fit-phases lime_fit_phases.log bash -c "nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=native \
  benchmarks/lime_fit_phases.cu -o '$out/lime_fit_phases' && '$out/lime_fit_phases' 256 1000 64 5 && \
  '$out/lime_fit_phases' 1 1000 64 5 && '$out/lime_fit_phases' 256 1000 64 5 f32"
run triton-host triton_host.log bash -c "python benchmarks/triton_host_overhead.py && \
  python benchmarks/triton_host_overhead.py --launch"
# the kernels that share memory between threads: lime_fit, segment_mean's bins, the PGD reductions
shared="cuda and (lime_fit or segment_mean or masked_pgd_step)"
kernels_run racecheck racecheck.log compute-sanitizer --tool racecheck --error-exitcode 9 \
  python -m pytest -q -p no:cacheprovider tests/test_compiled_ops.py -k "$shared"
kernels_run synccheck synccheck.log compute-sanitizer --tool synccheck --error-exitcode 9 \
  python -m pytest -q -p no:cacheprovider tests/test_compiled_ops.py -k "$shared"
run bench bench.log python -m attrefine_fast bench --quick --device cuda --json "$out/bench-quick-cuda.json" \
  --markdown "$out/bench-quick-cuda.md"
run inductor inductor.log python benchmarks/inductor_reference.py --device cuda
step end
[ -z "$stop" ] || echo "stopped early: $stop"
[ -z "$no_kernels" ] || echo "the compiled CUDA kernels' steps were skipped: $no_kernels"
[ ${#not_run[@]} -eq 0 ] || { echo "not run or cut short: ${not_run[*]}"; status=1; }
exit $status
