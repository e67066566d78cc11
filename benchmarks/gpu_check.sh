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
# GPU_CHECK_DEADLINE_S (seconds after the start; unset: none) ends the run in time when the GPU is
# lent for a fixed time: each step runs under `timeout` with what is left, a step with under 20 s
# left is skipped, and the summary names what did not run. On a lent machine whose run limit is
# 10 minutes, e.g.:
#
#   GPU_CHECK_DEADLINE_S=500 TORCH_CUDA_ARCH_LIST=9.0 bash benchmarks/gpu_check.sh /tmp/gpu-check;
#   tar czf "$OUT/gpu-check.tgz" -C /tmp gpu-check
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() { echo "=== $1 $(date -u +%T)"; }
status=0
deadline=${GPU_CHECK_DEADLINE_S:-0}
not_run=()
run() {  # run NAME LOG COMMAND...: the command's output to LOG, its exit status and tail here
  local name=$1 log=$2 limit=()
  shift 2
  step "$name"
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
  echo "rc=$rc"
  if [ ${#limit[@]} -gt 0 ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; }; then
    echo "stopped at the deadline (${deadline} s)"
    not_run+=("$name (cut short)")
  fi
  tail -n 4 "$out/$log"
  [ $rc -eq 0 ] || status=1
}
# -v: the build's own messages (whether it builds the CUDA ops, and why not) go to the log
run build build.log python -m pip install -v --no-build-isolation --no-deps -e .
run info info.log python -m attrefine_fast.info
grep -q "CPU and CUDA kernels" "$out/info.log" || { echo "the extension has no CUDA kernels: see build.log"; status=1; }
run bad-input bad_input.log python -m pytest -q -rfE -p no:cacheprovider tests/test_compiled_ops.py -k bad_input
if [ $status -ne 0 ] && command -v cuda-gdb > /dev/null; then  # where a crashing CUDA case crashed
  run bad-input-backtrace bad_input_gdb.log cuda-gdb -batch -ex run -ex bt --args \
    python tests/bad_input_runner.py cuda
fi
run compiled-cuda cuda_tests.log python -m pytest -q -rfE -p no:cacheprovider tests/test_compiled_ops.py -k cuda
run targets targets.log python benchmarks/gpu_targets.py --json "$out/targets.json"
# pytest-xdist, where installed, spreads the Triton tests' compilations over the cores
workers=$(python -c "import xdist" 2> /dev/null && echo "-n 8")
run triton-cuda triton_tests.log python -m pytest -q -rfE -p no:cacheprovider $workers \
  tests/test_triton_ops.py tests/test_triton_fit_pgd.py tests/test_compile.py -k cuda
run memcheck memcheck.log compute-sanitizer --tool memcheck --error-exitcode 9 \
  python -m pytest -q -p no:cacheprovider tests/test_compiled_ops.py -k cuda
run lime-fit-phases lime_fit_phases.log bash -c "nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=native \
  benchmarks/lime_fit_phases.cu -o '$out/lime_fit_phases' && '$out/lime_fit_phases' 256 1000 64 5 && \
  '$out/lime_fit_phases' 1 1000 64 5 && '$out/lime_fit_phases' 256 1000 64 5 f32"
run triton-host triton_host.log bash -c "python benchmarks/triton_host_overhead.py && \
  python benchmarks/triton_host_overhead.py --launch"
# the kernels that share memory between threads: lime_fit, segment_mean's bins, the PGD reductions
shared="cuda and (lime_fit or segment_mean or masked_pgd_step)"
run racecheck racecheck.log compute-sanitizer --tool racecheck --error-exitcode 9 \
  python -m pytest -q -p no:cacheprovider tests/test_compiled_ops.py -k "$shared"
run synccheck synccheck.log compute-sanitizer --tool synccheck --error-exitcode 9 \
  python -m pytest -q -p no:cacheprovider tests/test_compiled_ops.py -k "$shared"
run bench bench.log python -m attrefine_fast bench --quick --device cuda --json "$out/bench-quick-cuda.json" \
  --markdown "$out/bench-quick-cuda.md"
run inductor inductor.log python benchmarks/inductor_reference.py --device cuda
step end
[ ${#not_run[@]} -eq 0 ] || { echo "not run or cut short: ${not_run[*]}"; status=1; }
exit $status
