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
