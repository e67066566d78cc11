"""The benchmark suite: timing core and report arithmetic on made-up timings, the sweep
definitions, and smoke runs of `attrefine-fast bench` and of the pytest-benchmark files (they
check that every setup function and provider still runs, not how fast)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attrefine_fast.benchmarking.core import Case, Provider, Stopwatch, Timing, calls_for, run_case, skip
from attrefine_fast.benchmarking.inputs import grid_batch, model_forwards
from attrefine_fast.benchmarking.report import case_text, summarize
from attrefine_fast.benchmarking.sweep import PROFILES, specs_for
from attrefine_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _case(kind, providers, **params):
    return Case(id="c", kind=kind, title="t", params=params, device=CPU, providers=providers)


def test_provider_needs_a_call_or_a_reason():
    with pytest.raises(ValueError, match="give fn"):
        Provider("x", "ours")
    with pytest.raises(ValueError, match="give fn"):
        Provider("x", "ours", fn=lambda: None, skipped="why")
    with pytest.raises(ValueError, match="role"):
        Provider("x", "mine", fn=lambda: None)


def test_run_case_interleaves_and_rotates():
    order = []
    providers = [Provider(n, "ours", fn=lambda n=n: order.append(n)) for n in "abc"] + [skip("d", "peer", "absent")]
    timings = run_case(_case("op", providers), min_repeats=3, max_repeats=3, budget_s=0, warmup=1, min_sample_s=0)
    # the warm-up round calls each provider twice (the second call sizes its samples)
    assert order == list("aabbcc") + list("abc") + list("bca") + list("cab")
    assert set(timings) == {"a", "b", "c"}
    assert all(len(t.seconds) == 3 and t.calls_per_sample == 1 for t in timings.values())


def test_run_case_fits_rounds_to_the_budget():
    providers = [Provider("a", "ours", fn=lambda: None)]
    timings = run_case(_case("op", providers), min_repeats=2, max_repeats=9, budget_s=100.0, min_sample_s=0)
    assert len(timings["a"].seconds) == 9
    assert calls_for(0.001, 0.05, 200) == 50
    assert calls_for(1.0, 0.05, 200) == 1
    assert calls_for(0.0, 0.05, 200) == 200


def test_calls_per_sample_are_sized_from_a_warm_call():
    # A first call that pays a one-time cost must not shorten every timed sample.
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.05 if len(calls) == 1 else 0.002)

    timings = run_case(_case("op", [Provider("a", "ours", fn=fn)]), min_repeats=1, max_repeats=1, min_sample_s=0.02)
    assert timings["a"].calls_per_sample >= 5  # 20 ms of 2 ms calls at most (sleep may overshoot), not 1


def test_lime_kernel_for_captum_weighs_samples_as_lime():
    from sklearn.metrics import pairwise_distances

    from attrefine_fast.benchmarking.explain_cases import lime_kernel_on_samples

    z = np.random.RandomState(0).randint(0, 2, (30, 9))
    z[0], z[5] = 1, 0
    d = pairwise_distances(z, np.ones((1, 9)), metric="cosine").ravel()
    mine = [lime_kernel_on_samples(None, None, torch.from_numpy(row).view(1, -1)) for row in z]
    np.testing.assert_allclose(mine, np.sqrt(np.exp(-(d**2) / 0.25**2)), rtol=1e-12)


def test_stopwatch_counts_only_the_wrapped_calls():
    watch = Stopwatch(CPU)
    p = Provider("ours[torch]", "ours", fn=lambda: watch.time(sum, range(10)), stopwatch=watch)
    timings = run_case(_case("explain", [p], batch=1), min_repeats=2, max_repeats=2, budget_s=0, min_sample_s=0)
    t = timings["ours[torch]"]
    assert len(t.model_seconds) == 2
    assert all(0 < m <= s for m, s in zip(t.model_seconds, t.seconds))


def test_summary_ratios_and_overhead():
    providers = [
        Provider("model", "model", fn=lambda: None),
        Provider("ours[torch]", "ours", fn=lambda: None),
        Provider("lime", "peer", fn=lambda: None),
        skip("captum", "peer", "not installed"),
    ]
    timings = {
        "model": Timing([1.0, 1.0, 1.0], None, 1),
        "ours[torch]": Timing([1.2, 1.25, 1.3], [1.0, 1.0, 1.0], 1),
        "lime": Timing([3.0, 2.0, 4.0], [1.0, 1.0, 2.0], 1),
    }
    summary = summarize(_case("explain", providers, batch=2), timings)
    rows = {r["name"]: r for r in summary["providers"]}
    ours = rows["ours[torch]"]
    assert ours["median_s"] == pytest.approx(1.25)
    assert ours["overhead"] == pytest.approx(0.25)
    assert ours["overhead_vs_model"] == pytest.approx(0.25)
    assert ours["nonmodel_median_s"] == pytest.approx(0.25)
    assert ours["vs"] == {"lime": pytest.approx(3.0 / 1.25)}
    assert ours["nonmodel_vs"]["lime"] == pytest.approx(2.0 / 0.25)  # lime's non-model: 2, 1, 2
    assert ours["images_per_s"] == pytest.approx(2 / 1.25)
    # in-call ratios (2/1, 1/1, 2/2) -> median 1.0; against the model alone: 3.0 / 1.0 - 1
    assert rows["lime"]["overhead"] == pytest.approx(1.0)
    assert rows["lime"]["overhead_vs_model"] == pytest.approx(2.0)
    assert rows["captum"] == {"name": "captum", "role": "peer", "detail": "", "status": "skipped", "reason": "not installed"}
    text = case_text(summary)
    assert "overhead  +25.0%" in text and "2.4x vs lime (non-model 8.0x)" in text and "not installed" in text


def test_attack_summary_compares_with_the_models_passes():
    providers = [Provider("model", "model", fn=lambda: None), Provider("ours[cpp]", "ours", fn=lambda: None),
                 Provider("torchattacks", "peer", fn=lambda: None)]
    timings = {"model": Timing([2.0], None, 1), "ours[cpp]": Timing([2.1], None, 1), "torchattacks": Timing([4.2], None, 1)}
    rows = {r["name"]: r for r in summarize(_case("attack", providers), timings)["providers"]}
    assert rows["ours[cpp]"]["x_model"] == pytest.approx(1.05)
    assert rows["ours[cpp]"]["vs"] == {"torchattacks": pytest.approx(2.0)}


def test_sweeps():
    for profile in PROFILES:
        for device in ("cpu", "cuda"):
            labels = [s.label for s in specs_for(profile, device)]
            assert len(labels) == len(set(labels)), (profile, device)
    gpu = specs_for("full", "cuda")
    perturb = [spec.arguments() for spec in gpu if spec.setup == "perturb"]
    explain = [spec.arguments() for spec in gpu if spec.setup == "explain"]
    # the sizes, every combination, on a GPU
    assert {(a["size"], a["batch"], a["samples"], a["segments"]) for a in perturb} == {
        (s, b, n, m) for s in (32, 224) for b in (1, 128) for n in (256, 1000) for m in (16, 64, 256)
    }
    assert {(a["model"], a["size"]) for a in explain} >= {
        ("small_cnn", 32), ("small_cnn", 224), ("resnet18", 32), ("resnet18", 224)
    }
    cpu = [s.arguments() for s in specs_for("full", "cpu") if s.setup in ("perturb", "segment_mean")]
    assert not any(a["batch"] > 1 and a["size"] > 32 for a in cpu)
    with pytest.raises(ValueError, match="profile"):
        specs_for("huge", "cpu")


def test_grid_batch_and_model_forwards():
    seg, counts = grid_batch(3, 32, 64)
    assert seg.shape == (3, 32, 32) and counts.tolist() == [64] * 3
    assert sorted(seg[0].unique().tolist()) == list(range(64))
    with pytest.raises(ValueError, match="square"):
        grid_batch(1, 32, 50)
    seen = []
    run = model_forwards(lambda x: seen.append(x.shape[0]), torch.zeros(4, 3, 2, 2), rows=10)
    run()
    assert seen == [4, 4, 2]


def test_bench_command_smoke_run(tmp_path, capsys):
    path, tables = tmp_path / "bench.json", tmp_path / "tables.md"
    threads = torch.get_num_threads()
    try:  # one thread: the smoke run checks that things run, and one thread is fastest on a busy machine
        main(["bench", "--smoke", "--device", "cpu", "--threads", "1", "--json", str(path), "--markdown", str(tables)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["profile"] == "smoke" and report["environment"]["cpu_cores"] >= 1
    kinds = {c["kind"] for c in report["cases"]}
    assert kinds == {"op", "explain", "segmentation", "attack"}
    for case in report["cases"]:
        rows = {r["name"]: r for r in case["providers"]}
        assert all(r["status"] == "ran" and r["median_s"] > 0 or r["status"] == "skipped" and r["reason"] for r in rows.values())
        if case["kind"] in ("op", "explain", "attack"):
            assert rows["ours[torch]"]["status"] == "ran", case["id"]
            # Triton on the CPU is the interpreter: never timed as a performance figure
            assert rows["ours[triton]"]["status"] == "skipped"
        if case["kind"] == "explain":
            assert rows["lime"]["status"] == "ran" and rows["model"]["status"] == "ran"
            assert "lime" in rows["ours[torch]"]["vs"] and "overhead" in rows["ours[torch]"]
        if case["kind"] == "attack":
            assert "x_model" in rows["ours[torch]"]
    assert "vs lime" in out and "report written" in out
    md = tables.read_text()
    for section in ("### Explanations", "### Ops", "### Segmentation", "### PGD", "Providers not timed"):
        assert section in md
    assert md.count("| ours[torch] |") == sum(c["kind"] != "segmentation" for c in report["cases"])


def test_pytest_benchmark_files_run():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
           "--bench-profile", "smoke", "--bench-device", "cpu", "--benchmark-disable"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
    # a file named on the command line is collected once, not twice
    listed = subprocess.run(cmd[:3] + ["benchmarks/bench_attacks.py", "--collect-only"] + cmd[4:], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    items = [line for line in listed.stdout.splitlines() if "::test_pgd[" in line]
    assert len(items) == len(set(items)) == 6, listed.stdout[-3000:]


def test_default_test_run_does_not_collect_the_benchmarks():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")  # tomli: pytest's own, before 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
    assert not any(p.name.startswith("test_") for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_targets_script_imports_and_asks_for_a_gpu():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_targets.py"
    run = subprocess.run([sys.executable, str(script), "--only", "lime_fit"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "needs a CUDA device" in run.stderr


def _hide_lime(monkeypatch):
    """Make every `import lime...` fail, as on a machine without the package."""
    for name in {"lime", "lime.lime_image", *(n for n in sys.modules if n.startswith("lime."))}:
        monkeypatch.setitem(sys.modules, name, None)


def test_bench_without_lime_skips_its_providers(tmp_path, monkeypatch, capsys):
    _hide_lime(monkeypatch)
    path, tables = tmp_path / "bench.json", tmp_path / "tables.md"
    threads = torch.get_num_threads()
    try:
        main(["bench", "--smoke", "--device", "cpu", "--threads", "1", "--json", str(path), "--markdown", str(tables)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(path.read_text())
    assert {c["kind"] for c in report["cases"]} == {"op", "explain", "segmentation", "attack"}
    for case in report["cases"]:
        rows = {r["name"]: r for r in case["providers"]}
        assert any(r["status"] == "ran" and r["role"] == "ours" for r in rows.values()), case["id"]
        if case["params"].get("op") == "segment_mean":  # lime's inline hide-colour loop, copied: no package needed
            assert rows["lime"]["status"] == "ran"
        elif "lime" in rows:
            assert rows["lime"]["status"] == "skipped" and "lime is not importable" in rows["lime"]["reason"], case["id"]
    assert sum("lime" in {r["name"] for r in c["providers"]} for c in report["cases"]) == 5
    assert "lime is not importable" in capsys.readouterr().out and "lime is not importable" in tables.read_text()


@pytest.fixture
def no_suite_run(monkeypatch):
    """The bench command must refuse bad arguments before any case runs."""
    from attrefine_fast.benchmarking import suite

    def refuse(*args, **kwargs):
        raise AssertionError("the suite ran")

    monkeypatch.setattr(suite, "run_suite", refuse)


def test_bench_refuses_an_only_filter_that_matches_nothing(tmp_path, no_suite_run):
    from attrefine_fast.benchmarking.suite import select_specs

    with pytest.raises(SystemExit, match="matches none") as raised:
        main(["bench", "--smoke", "--device", "cpu", "--only", "no-such-case", "--json", str(tmp_path / "b.json")])
    assert "lime_fit/batch=2/samples=32/segments=16" in str(raised.value)  # the labels it could have matched
    assert not (tmp_path / "b.json").exists()
    with pytest.raises(ValueError, match="explain/"):
        select_specs("quick", "cpu", "no-such-case")
    assert [s.setup for s in select_specs("smoke", "cpu", "lime_fit")] == ["lime_fit"]


@pytest.mark.parametrize("option", ["--json", "--markdown"])
def test_bench_refuses_a_folder_as_report_path(tmp_path, no_suite_run, option):
    args = ["bench", "--smoke", "--device", "cpu", "--json", str(tmp_path / "b.json"), option, str(tmp_path)]
    with pytest.raises(SystemExit, match="is a folder"):
        main(args)


def _load(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pytest_benchmark_calls_wait_for_the_gpu(monkeypatch):
    conftest = _load(ROOT / "benchmarks" / "conftest.py", "benchmarks_conftest")
    events = []
    monkeypatch.setattr(conftest, "synchronize", lambda device: events.append(("synchronize", device.type)))
    watch = Stopwatch(CPU)
    provider = Provider("p", "ours", fn=lambda: watch.time(events.append, "fn"), stopwatch=watch)
    model_seconds = []
    conftest.timed_call(provider, torch.device("cuda"), model_seconds)()
    assert events == ["fn", ("synchronize", "cuda")] and len(model_seconds) == 1


def test_gpu_targets_refuses_an_unknown_group_and_keeps_rows_without_triton(monkeypatch):
    script = ROOT / "benchmarks" / "gpu_targets.py"
    run = subprocess.run([sys.executable, str(script), "--only", "no-such-op"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "segment_mean" in run.stderr and "masked_pgd_step" in run.stderr
    targets = _load(script, "gpu_targets")
    assert "segment_mean" in targets.CASE_GROUPS
    import attrefine_fast

    # Triton's kernels failing to load must not cost the JSON its measured rows
    monkeypatch.delattr(attrefine_fast, "kernels", raising=False)
    monkeypatch.setitem(sys.modules, "attrefine_fast.kernels", None)
    assert "attrefine_fast.kernels" in targets.tuned_configs()["error"]


# benchmarks/gpu_check.sh, run here with stub commands only (the real script would build and
# install the package): the python stub answers `-c` checks with the real interpreter, over fake
# torch / setuptools / lime modules, and the rest as told.
STUB_PYTHON = """#!/bin/bash
echo "python $*" >> "$STUB_LOG"
case "$*" in
  "-c "*) exec "$REAL_PYTHON" "$@" ;;
  *"pip install"*) exit "$STUB_BUILD_RC" ;;
  *attrefine_fast.info*) echo "$STUB_INFO"; exit 0 ;;
  *"-k bad_input"*) exit "$STUB_BAD_INPUT_RC" ;;
esac
exit 0
"""
STUB_TOOL = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
[ "$(basename "$0")" != nvidia-smi ] || { [ -n "$STUB_GPU" ] && echo "GPU 0: $STUB_GPU"; }
"""
CUDA_INFO = "compiled extension: loaded, CPU and CUDA kernels\nCUDA available: NVIDIA H100 80GB HBM3"


def _gpu_check(tmp_path, setuptools="80.9.0", lime=True, **env):
    stubs, fake = tmp_path / "bin", tmp_path / "site"
    for folder in (stubs, fake / "torch", fake / "setuptools"):
        folder.mkdir(parents=True)
    (stubs / "python").write_text(STUB_PYTHON)
    for tool in ("nvidia-smi", "cuda-gdb", "compute-sanitizer", "nvcc"):
        (stubs / tool).write_text(STUB_TOOL)
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (fake / "torch" / "__init__.py").write_text("")
    (fake / "setuptools" / "__init__.py").write_text(f"__version__ = {setuptools!r}\n")
    (fake / "lime.py").write_text("" if lime else "raise ImportError('no lime here')\n")
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHONPATH": str(fake), "REAL_PYTHON": sys.executable,
           "STUB_LOG": str(log), "STUB_BUILD_RC": "0", "STUB_BAD_INPUT_RC": "0", "STUB_INFO": CUDA_INFO,
           "STUB_GPU": "NVIDIA H100 80GB HBM3", "GPU_CHECK_DEADLINE_S": "300", **env}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    return run, log.read_text()


@pytest.mark.parametrize("deadline", ["abc", "500.5", "-1"])
def test_gpu_check_refuses_a_deadline_that_is_not_whole_seconds(tmp_path, deadline):
    run, calls = _gpu_check(tmp_path, GPU_CHECK_DEADLINE_S=deadline)
    assert run.returncode == 2 and "whole number of seconds" in run.stderr
    assert calls == "" and not (tmp_path / "out").exists()


def test_gpu_check_reports_whats_missing_and_stops_without_a_cuda_device(tmp_path):
    info = "compiled extension: loaded, CPU kernels (built without CUDA)\nCUDA not available"
    run, calls = _gpu_check(tmp_path, setuptools="68.2.0", lime=False, STUB_GPU="", STUB_INFO=info)
    assert run.returncode == 1, run.stdout + run.stderr
    for missing in ("a GPU listed by nvidia-smi", "setuptools >= 77", "lime: the bench's lime providers will be skipped"):
        assert f"missing: {missing}" in run.stdout
    assert "pytest" not in (tmp_path / "out" / "preflight.log").read_text()
    # built and asked what it built, then nothing that needs CUDA
    assert "pip install" in calls and "attrefine_fast.info" in calls
    assert "-m pytest" not in calls and "gpu_targets" not in calls and "compute-sanitizer" not in calls
    assert "stopped early: torch sees no CUDA device" in run.stdout
    assert "not run or cut short: bad-input compiled-cuda targets" in run.stdout


def test_gpu_check_without_cuda_kernels_still_runs_the_triton_steps(tmp_path):
    # a CUDA device but a build without the CUDA kernels (its compile failed, say): the Triton
    # tests, the targets and the benchmarks still measure something
    info = "compiled extension: loaded, CPU kernels (built without CUDA)"
    run, calls = _gpu_check(tmp_path, STUB_INFO=info)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "tests/test_triton_ops.py" in calls and "gpu_targets.py --json" in calls and "attrefine_fast bench" in calls
    assert "compute-sanitizer" not in calls and "-k bad_input" not in calls
    assert "the compiled CUDA kernels' steps were skipped" in run.stdout
    assert "not run or cut short: bad-input compiled-cuda memcheck racecheck synccheck" in run.stdout


@pytest.mark.parametrize("bad_input_rc", [0, 1])
def test_gpu_check_backtraces_only_a_failing_bad_input_step(tmp_path, bad_input_rc):
    # a failed build sets the run's status: the backtrace must follow the bad-input step's own
    run, calls = _gpu_check(tmp_path, STUB_BUILD_RC="1", STUB_BAD_INPUT_RC=str(bad_input_rc))
    assert "nothing missing" in run.stdout and "stopped early" not in run.stdout
    assert ("cuda-gdb" in calls) == (bad_input_rc != 0), run.stdout
    assert "gpu_targets.py --json" in calls and "compute-sanitizer --tool synccheck" in calls
    assert run.returncode == 1  # the build failed
