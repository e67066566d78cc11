"""The main job's smoke run: three models trained, evaluated and reported."""
import json

import pytest

from attrefine_fast.cli import main

from refine_helpers import one_thread  # noqa: F401


@pytest.mark.parametrize("patch", [None, 0.9])
def test_demo_quick(tmp_path, capsys, patch):
    options = ["--spurious-patch", str(patch), "--fill", "zero", "--lam", "3", "--tau", "0.05", "--eps-s", "0.1", "--delta", "0.2"]
    main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)] + ([] if patch is None else options))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spurious_patch"] == patch
    for result in report["models"].values():  # the patched run also scores the patch in random colours
        assert (patch is None) == ("shuffled_patch_accuracy" not in result)
        assert patch is None or 0 <= result["shuffled_patch_accuracy"] <= 1
        assert patch is None or set(result["patch_detection"]) == {"flagged", "relevance_share"}
        assert patch is None or all(0 <= v <= 1 for v in result["patch_detection"].values())
        assert (patch is None) == (result["config"]["spurious_patch"] is None)
        settings = tuple(result["config"][k] for k in ("fill", "lam", "tau", "eps_s", "delta"))
        assert settings == (("mean", 10.0, 0.02, 0.08, 0.15) if patch is None else ("zero", 3.0, 0.05, 0.1, 0.2))
    assert set(report["models"]) == {"erm", "pgd_at", "refine"}
    for result in report["models"].values():
        ev = result["evaluation"]
        assert 0 <= ev["clean_accuracy"] <= 1 and len(ev["fgsm"]) == len(report["settings"]["eval_eps"])
        assert len(ev["pgd"]["PGD-10"]) == len(ev["fgsm"]) and ev["corruptions"]["mean"] is not None
        assert {"mean_estimate", "mean_empirical_eps", "spearman", "mean_rho"} <= set(result["bound"])
    refine_events = [m["event"] for m in report["models"]["refine"]["metrics"]]
    assert "refresh" in refine_events
    assert (tmp_path / "accuracy_vs_eps.png").stat().st_size > 0
    assert (tmp_path / "explanations_before_after.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "PGD-AT" in out and "Refined" in out and "ERM" in out
