"""The robustness report: each metric against a direct computation, the report's layout, the
table, the plots, AutoAttack through torchattacks, CIFAR-C files, and the command line."""
import json
import sys

import numpy as np
import pytest
import torch

from attrefine_fast import cli
from attrefine_fast.attacks import masked_pgd, predict
from attrefine_fast.corruptions import corrupt
from attrefine_fast.data import ImageDataset
from attrefine_fast.evaluate import (
    DEFAULT_CORRUPTIONS, accuracy, attack_accuracy, autoattack_accuracy, build_autoattack, cifar_c_accuracy,
    corruption_accuracy, evaluate, format_table, plot_report,
)
from attrefine_fast.models import SmallCNN, save_checkpoint
from cifar_files import write_cifar, write_cifar_c
from robustness_helpers import digits, one_thread, train, trained_cnn  # noqa: F401


@pytest.fixture(scope="module")
def small_test_set():
    return digits("test").subset(64)


def test_accuracy_matches_predict(small_test_set):
    model = trained_cnn()
    x, y = small_test_set.tensors()
    expected = float((predict(model, x) == y).float().mean())
    assert accuracy(model, small_test_set, batch_size=10) == pytest.approx(expected)
    assert accuracy(model, (x, y)) == pytest.approx(expected)
    assert expected > 0.8
    with pytest.raises(TypeError, match="ImageDataset"):
        accuracy(model, x)
    with pytest.raises(ValueError, match="batch_size"):
        accuracy(model, small_test_set, batch_size=0)


def test_attack_accuracy_matches_a_direct_loop(small_test_set):
    model = trained_cnn()
    x, y = small_test_set.tensors()
    got = attack_accuracy(model, small_test_set, attack="pgd", eps=4 / 255, steps=5, batch_size=40, seed=3)
    gen = torch.Generator().manual_seed(3)
    correct = 0
    for i in range(0, 64, 40):
        adv = masked_pgd(model, x[i:i + 40], y[i:i + 40], eps=4 / 255, steps=5, seed=gen)
        correct += int((predict(model, adv) == y[i:i + 40]).sum())
    assert got == correct / 64
    clean = accuracy(model, small_test_set)
    assert attack_accuracy(model, small_test_set, attack="fgsm", eps=0.0) == clean
    assert attack_accuracy(model, small_test_set, attack="pgd", eps=8 / 255, steps=5) < clean
    with pytest.raises(ValueError, match="attack"):
        attack_accuracy(model, small_test_set, attack="cw")


def test_corruption_accuracy_cells_and_mean(small_test_set):
    model = trained_cnn()
    out = corruption_accuracy(model, small_test_set, corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
                              batch_size=25, seed=1)
    assert set(out["per_corruption"]) == {"gaussian_noise", "contrast"} and out["severities"] == [1, 5]
    cells = [a for accs in out["per_corruption"].values() for a in accs]
    assert len(cells) == 4 and out["mean"] == pytest.approx(np.mean(cells))
    # One cell by hand: a cell's seed does not depend on which other cells are evaluated.
    alone = corruption_accuracy(model, small_test_set, corruptions=("contrast",), severities=(5,), batch_size=25, seed=1)
    assert alone["per_corruption"]["contrast"] == [out["per_corruption"]["contrast"][1]]
    x, y = small_test_set.tensors()
    direct = float((predict(model, corrupt(x, "contrast", 5)) == y).float().mean())
    assert alone["mean"] == pytest.approx(direct)
    with pytest.raises(ValueError, match="corruption"):
        corruption_accuracy(model, small_test_set, corruptions=("frost",))
    with pytest.raises(ValueError, match="severities"):
        corruption_accuracy(model, small_test_set, severities=(0,))
    assert "zoom_blur" in DEFAULT_CORRUPTIONS


def test_evaluate_report_table_and_plots(small_test_set, tmp_path, capsys):
    model = trained_cnn()
    model.train()  # evaluation must not depend on, nor change, the mode the model is in
    report = evaluate(model, small_test_set, eps=(2 / 255, 8 / 255), pgd_steps=(3, 6), corruptions=("pixelate",),
                      severities=(1, 3, 5), max_samples=48, batch_size=32, progress=True)
    assert model.training
    model.eval()
    report = json.loads(json.dumps(report))  # JSON-serializable
    assert report["num_samples"] == 48 and report["eps"] == pytest.approx([2 / 255, 8 / 255])
    sub = small_test_set.subset(48)
    assert report["clean_accuracy"] == accuracy(model, sub)
    assert report["fgsm"] == [attack_accuracy(model, sub, attack="fgsm", eps=e) for e in report["eps"]]
    assert set(report["pgd"]) == {"PGD-3", "PGD-6"}
    assert report["pgd"]["PGD-6"][1] == attack_accuracy(model, sub, eps=8 / 255, steps=6, batch_size=32)
    for accs in report["pgd"].values():
        assert accs[1] <= accs[0] <= report["clean_accuracy"]
    assert report["corruptions"]["source"] == "generated" and len(report["corruptions"]["per_corruption"]["pixelate"]) == 3
    assert report["autoattack"] is None and set(report["seconds"]) >= {"clean", "fgsm", "PGD-3", "corruptions"}

    table = format_table(report)
    for text in ("clean accuracy", "2/255", "8/255", "FGSM", "PGD-6", "pixelate", "mean (all cells)"):
        assert text in table
    assert f"{100 * report['clean_accuracy']:.2f}" in table
    paths = plot_report(report, tmp_path / "plots")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["accuracy_vs_eps.png", "corruption_accuracy.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    skip = evaluate(model, small_test_set, eps=(4 / 255,), pgd_steps=(), fgsm=False, corruptions=(), max_samples=8,
                    progress=False)
    assert skip["pgd"] == {} and skip["fgsm"] is None and skip["corruptions"] is None
    assert plot_report(skip, tmp_path / "none") == []
    with pytest.raises(ValueError, match="max_samples"):
        evaluate(model, small_test_set, max_samples=0)


def test_evaluate_reads_cifar_c_files(tmp_path):
    write_cifar_c(tmp_path / "CIFAR-10-C", corruptions=("fog", "contrast"), n=6)
    model = SmallCNN(10, width=4)
    x = torch.rand(6, 3, 32, 32)
    report = evaluate(model, (x, torch.arange(6)), eps=(), pgd_steps=(), fgsm=False, severities=(2, 4),
                      cifar_c=("cifar10", tmp_path), max_samples=4, progress=False)
    cor = report["corruptions"]
    assert cor["source"] == "files" and list(cor["per_corruption"]) == ["fog", "contrast"]  # benchmark order
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in cor["per_corruption"].values())


def test_evaluate_checks_its_settings_before_running_and_skips_what_cannot_run(tmp_path, small_test_set):
    model = SmallCNN(10, width=4)
    # Any sequence of ε (an array, a range, a tensor) and a single PGD step count.
    report = evaluate(model, small_test_set, eps=np.array([0.0, 2 / 255]), pgd_steps=1, fgsm=False, corruptions=(),
                      max_samples=4, progress=False)
    assert report["eps"] == pytest.approx([0.0, 2 / 255]) and list(report["pgd"]) == ["PGD-1"]
    assert evaluate(model, small_test_set, eps=torch.tensor([1 / 255]), pgd_steps=(), corruptions=(), max_samples=2,
                    progress=False)["eps"] == pytest.approx([1 / 255])
    # Wrong settings fail at once, before any metric runs (a typo is not found after the attacks).
    calls = []
    counting = torch.nn.Sequential(model)
    counting.register_forward_hook(lambda *args: calls.append(1))
    for kwargs, error, match in [
        ({"pgd_steps": (2.7,)}, TypeError, "pgd_steps"),
        ({"pgd_steps": (-1,)}, ValueError, "pgd_steps"),
        ({"eps": "8/255"}, TypeError, "eps"),
        ({"corruptions": ("contrats",)}, ValueError, "contrats"),
        ({"corruptions": ("fog", "fog")}, ValueError, "repeat"),
        ({"severities": (1, 1)}, ValueError, "repeat"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ]:
        with pytest.raises(error, match=match):
            evaluate(counting, small_test_set, **kwargs, max_samples=4, progress=False)
    assert calls == []
    # No corruption named: nothing scored, also with CIFAR-C files (no NaN mean in the JSON).
    write_cifar_c(tmp_path / "CIFAR-10-C", corruptions=("fog",), n=2)
    skip = evaluate(model, small_test_set, eps=(), pgd_steps=(), fgsm=False, corruptions=(), cifar_c=("cifar10", tmp_path),
                    max_samples=2, progress=False)
    assert skip["corruptions"] is None
    with pytest.raises(ValueError, match="at least one"):
        corruption_accuracy(model, small_test_set, corruptions=[])
    with pytest.raises(TypeError, match="sequence of names"):
        cifar_c_accuracy(model, "cifar10", tmp_path, corruptions="fog")
    with pytest.raises(ValueError, match="max_samples"):
        cifar_c_accuracy(model, "cifar10", tmp_path, max_samples=-1)


def test_autoattack_is_recorded_as_skipped_below_four_classes(small_test_set):
    # torchattacks' targeted APGD ranks four logits: with fewer classes it fails mid-run.
    ds = ImageDataset(small_test_set.images[:4], torch.tensor([0, 1, 2, 0]), name="three classes")
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3))
    report = evaluate(model, ds, eps=(), pgd_steps=(), fgsm=False, corruptions=(), autoattack=True, progress=False)
    assert "at least 4 classes" in report["autoattack"]["skipped"] and "has 3" in report["autoattack"]["skipped"]
    pytest.importorskip("torchattacks")
    with pytest.raises(ValueError, match="at least 4 classes"):
        autoattack_accuracy(model, ds)


def test_autoattack_gets_the_class_count():
    pytest.importorskip("torchattacks")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    aa = build_autoattack(model, eps=8 / 255, norm="linf", version="standard", n_classes=4, seed=0)
    targeted = [a for a in aa._autoattack.attacks if hasattr(a, "n_target_classes")]
    assert len(targeted) == 2 and all(a.n_target_classes == 3 for a in targeted)


def test_autoattack_accuracy_runs_and_is_no_weaker_than_clean():
    pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    # 5 classes (not torchattacks' default 10, with which the targeted members would index past
    # the logits) and a linear model on 8x8 digits, cheap enough for all four members to run on
    # the samples that survive APGD-CE.
    ds = digits("train", 8)
    keep = (ds.labels < 5).nonzero().flatten()
    ds = ImageDataset(ds.images[keep], ds.labels[keep], name="digits 0-4")
    model = train(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 5)), 60, dataset=ds)
    small = ds.subset(16)
    assert accuracy(model, small) > 0.8
    model.train()
    mode = model.training
    acc = autoattack_accuracy(model, small, eps=16 / 255, batch_size=16, seed=0)
    assert model.training == mode
    clean = accuracy(model, small)
    assert 0 < acc < clean, "some samples must survive APGD-CE for the later members to run"
    assert acc <= attack_accuracy(model, small, eps=16 / 255, steps=10) + 1 / 16
    assert autoattack_accuracy(model, small, eps=64 / 255, batch_size=16, seed=0) == 0.0


def test_autoattack_is_recorded_as_skipped_without_torchattacks(small_test_set, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    report = evaluate(trained_cnn(), small_test_set, eps=(), pgd_steps=(), fgsm=False, corruptions=(), autoattack=True,
                      max_samples=4, progress=False)
    assert "pip install" in report["autoattack"]["skipped"]
    assert "skipped" in format_table(report)


def test_command_line(tmp_path, capsys):
    model = trained_cnn()
    ckpt = tmp_path / "cnn.pt"
    save_checkpoint(ckpt, model, "small_cnn", 10, model_kwargs={"width": 8})
    out = tmp_path / "eval"
    cli.main(["evaluate", "--checkpoint", str(ckpt), "--max-samples", "24", "--eps", "4/255", "0.0314",
              "--pgd-steps", "3", "--corruptions", "contrast", "--severities", "1", "5", "--out", str(out),
              "--no-progress"])
    printed = capsys.readouterr().out
    assert "clean accuracy" in printed and "PGD-3" in printed and "report.json" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 24 and report["model"] == str(ckpt) and report["dataset"] == "digits/test"
    assert report["eps"] == pytest.approx([4 / 255, 0.0314])
    assert (out / "accuracy_vs_eps.png").is_file() and (out / "corruption_accuracy.png").is_file()
    # An ε of 0 on the command line is an ε of 0, not "the default".
    cli.main(["evaluate", "--checkpoint", str(ckpt), "--max-samples", "4", "--eps", "0", "--pgd-steps", "--no-fgsm",
              "--corruptions", "--autoattack", "--autoattack-eps", "0", "--out", str(tmp_path / "zero"), "--no-progress"])
    report = json.loads((tmp_path / "zero" / "report.json").read_text())
    assert report["eps"] == [0.0] and report["autoattack"]["eps"] == 0.0
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--checkpoint", str(ckpt), "--arch", "smallcnn", "--out", str(out)])
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--arch", "smallcnn", "--eps", "eight", "--out", str(out)])


def test_command_line_on_cifar_files(tmp_path, capsys):
    _, md5 = write_cifar(tmp_path, "cifar10", archive=True)
    (tmp_path / "md5.json").write_text(json.dumps(md5))
    write_cifar_c(tmp_path / "CIFAR-10-C", corruptions=("contrast",), n=4)
    ckpt = tmp_path / "wrn.pt"
    torch.manual_seed(0)
    save_checkpoint(ckpt, SmallCNN(10, width=4), "small_cnn", 10, normalization="cifar10", model_kwargs={"width": 4})
    out = tmp_path / "eval"
    cli.main(["evaluate", "--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", str(tmp_path),
              "--cifar-md5", str(tmp_path / "md5.json"), "--cifar-c-dir", str(tmp_path), "--eps", "8/255",
              "--pgd-steps", "2", "--out", str(out), "--no-progress"])
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "cifar10/test" and report["num_samples"] == 4
    assert report["corruptions"]["source"] == "files" and list(report["corruptions"]["per_corruption"]) == ["contrast"]
    # Without the override the tiny archive fails the published checksum, and says so (one line,
    # exit status 2, as for every user mistake on the command line).
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir", str(tmp_path),
                  "--out", str(out)])
    assert stop.value.code == 2 and "failed its MD5 check" in capsys.readouterr().err
