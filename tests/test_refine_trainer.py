"""The shared training loop: exact resume, configuration files and flags, the command line."""
import json
import os

import numpy as np
import pytest
import torch

from attrefine_fast.refine import RefineConfig, Refiner
from attrefine_fast.refine.trainer import CHECKPOINT, FINAL, METRICS

from conftest import DEVICES
from refine_helpers import digits_subset, one_thread  # noqa: F401

TINY = dict(device="cpu", batch_size=16, lime_samples=12, detect_batch_size=16, refresh_fraction=0.5, width=4, progress=False,
            attack_steps=1, penalty_samples=4)


@pytest.fixture
def deterministic_cuda(request):
    """Bit-exact comparisons on a GPU need deterministic kernels (cuDNN's default convolution
    backward and atomic scatter-adds are not): on for CUDA runs, restored afterwards."""
    if request.node.callspec.params.get("device") != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, device, deterministic_cuda):
    train = digits_subset(48)
    # refine mode exercises everything saved: a refresh at epoch 1 (cycle 1), masks, the attack RNG.
    cfg = dict(mode="refine", cycles=2, epochs_per_cycle=1, explain_from_cycle=1, **{**TINY, "device": device})
    full = Refiner(RefineConfig(out=str(tmp_path / "full"), **cfg), train=train)
    full.fit()
    part = Refiner(RefineConfig(out=str(tmp_path / "part"), **cfg), train=train)
    part.fit(stop_after=1)
    assert part.epoch == 1 and not (tmp_path / "part" / FINAL).exists()
    with open(tmp_path / "part" / METRICS, "a") as f:  # as if interrupted after the next refresh
        f.write(json.dumps({"event": "refresh", "epoch": 1, "cycle": 1}) + "\n")
    resumed = Refiner(RefineConfig(out=str(tmp_path / "part"), **cfg), train=train)
    resumed.fit(resume=True)
    assert resumed.epoch == 2
    for (name, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(full.store.flags, resumed.store.flags)
    assert full.store.flags.any()
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]) for k in opt_a)
    lines = [json.loads(line) for line in open(tmp_path / "part" / METRICS)]
    assert [(r["event"], r["epoch"]) for r in lines] == [("epoch", 1), ("refresh", 1), ("epoch", 2)]
    assert (tmp_path / "part" / CHECKPOINT).exists() and (tmp_path / "part" / FINAL).exists()


def test_resume_refuses_a_different_config_and_a_fresh_run_starts_a_fresh_log(tmp_path):
    train = digits_subset(32)
    cfg = dict(mode="erm", cycles=1, epochs_per_cycle=2, **TINY)
    Refiner(RefineConfig(out=str(tmp_path), **cfg), train=train).fit(stop_after=1)
    with pytest.raises(ValueError, match="different config.*lr"):
        Refiner(RefineConfig(out=str(tmp_path), **{**cfg, "lr": 0.01}), train=train).fit(resume=True)
    Refiner(RefineConfig(out=str(tmp_path), **cfg), train=train).fit()  # not resumed: starts over
    lines = [json.loads(line) for line in open(tmp_path / METRICS)]
    assert [r["epoch"] for r in lines] == [1, 2]


def _epochs_logged(folder) -> list:
    return [json.loads(line)["epoch"] for line in open(folder / METRICS)]


def test_interruptions_between_the_log_and_the_checkpoint_lose_nothing(tmp_path, monkeypatch):
    """Killed after an epoch's log line but before its checkpoint, or with the last log line cut
    short, a resumed run writes the same log as an uninterrupted one."""
    train = digits_subset(32)
    cfg = dict(mode="erm", cycles=1, epochs_per_cycle=3, **TINY)
    Refiner(RefineConfig(out=str(tmp_path / "full"), **cfg), train=train).fit()

    save = Refiner.save

    def save_then_die_at_epoch_2(self):
        if self.epoch == 2:
            raise KeyboardInterrupt  # the log line of epoch 2 is written, its checkpoint is not
        save(self)

    monkeypatch.setattr(Refiner, "save", save_then_die_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        Refiner(RefineConfig(out=str(tmp_path / "cut"), **cfg), train=train).fit()
    monkeypatch.setattr(Refiner, "save", save)
    assert _epochs_logged(tmp_path / "cut") == [1, 2]
    with open(tmp_path / "cut" / METRICS, "a") as f:
        f.write('{"event": "epo')  # and a line cut short after it
    Refiner(RefineConfig(out=str(tmp_path / "cut"), **cfg), train=train).fit(resume=True)
    assert _epochs_logged(tmp_path / "cut") == _epochs_logged(tmp_path / "full") == [1, 2, 3]
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "cut").iterdir())


def test_a_fresh_run_in_a_used_folder_leaves_no_checkpoint_of_the_previous_run(tmp_path, monkeypatch):
    train = digits_subset(32)
    cfg = dict(mode="erm", cycles=1, epochs_per_cycle=2, out=str(tmp_path), **TINY)
    Refiner(RefineConfig(**cfg), train=train).fit()
    assert (tmp_path / CHECKPOINT).exists() and (tmp_path / FINAL).exists()

    def die(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Refiner, "train_epoch", die)
    with pytest.raises(KeyboardInterrupt):
        Refiner(RefineConfig(**cfg), train=train).fit()  # a fresh run, interrupted in its first epoch
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / FINAL).exists()
    assert open(tmp_path / METRICS).read() == ""
    monkeypatch.undo()
    resumed = Refiner(RefineConfig(**cfg), train=train)
    resumed.fit(resume=True)  # nothing to resume: starts over, with a consistent log
    assert resumed.epoch == 2 and _epochs_logged(tmp_path) == [1, 2]


@pytest.mark.parametrize("argv,match", [
    (["refine", "--train-subset", "-5"], "train_subset must be an integer >= 1"),
    (["refine", "--stop-after", "0"], "--stop-after must be >= 1"),
    (["refine", "--segmentation-params", "[1, 2]"], "segmentation_params must be a mapping"),
    (["evaluate", "--arch", "small_cnn", "--device", "foo"], "--device must be a device"),
    (["demo", "--epochs", "3", "--cycles", "2"], "must be a multiple of --cycles"),
    (["demo", "--quick", "--eval-samples", "0"], "--eval-samples must be >= 1"),
    (["refine", "--spurious-patch", "1.5"], "spurious_patch must be a correlation in [0, 1]"),
    (["demo", "--quick", "--spurious-patch", "nan"], "--spurious-patch must be a correlation in [0, 1]"),
    (["refine", "--mode", "erm", "--train-subset", "16", "--lr", "1e30", "--grad-clip", "1e30", "--width", "4", "--no-progress"],
     "the loss became"),
])
def test_the_command_line_names_a_bad_value_in_one_line(argv, match, capsys, tmp_path):
    from attrefine_fast.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and match in err and "Traceback" not in err
    assert err.startswith(f"attrefine-fast {argv[0]}: error: ")


def test_demo_splits_its_epochs_into_equal_cycles():
    import argparse

    from attrefine_fast.demo_refine import _settings

    def settings(**given):
        return _settings(argparse.Namespace(**{"quick": False, "epochs": None, "cycles": None, "eval_samples": None,
                                               "bound_samples": None, **given}))

    assert (settings()["epochs"], settings()["cycles"]) == (10, 5)
    assert (settings(epochs=12)["cycles"], settings(epochs=7, cycles=7)["cycles"], settings(epochs=6, cycles=3)["cycles"]) == (4, 7, 3)
    # One cycle would never explain (the refinement explains from its second cycle on): refused.
    for given, match in (({"epochs": 7}, "does not split into 2 to 5 equal cycles"), ({"epochs": 1}, "does not split"),
                         ({"epochs": 4, "cycles": 1}, "--cycles must be >= 2"),
                         ({"quick": True, "epochs": 3}, "does not split into 2 to 2")):
        with pytest.raises(ValueError, match=match):
            settings(**given)


@pytest.mark.parametrize("mode", ["erm", "pgd_at"])
def test_baselines_train_and_log(tmp_path, mode):
    train = digits_subset(32)
    refiner = Refiner(RefineConfig(mode=mode, cycles=1, epochs_per_cycle=1, out=str(tmp_path), **TINY), train=train)
    refiner.fit()
    record = json.loads(open(tmp_path / METRICS).readline())
    assert record["mode"] == mode and record["epoch"] == 1 and 0 <= record["train_acc"] <= 1
    assert refiner.store is None
    from attrefine_fast.models import load_checkpoint

    model, ckpt = load_checkpoint(tmp_path / FINAL)
    assert ckpt["mode"] == mode and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_a_non_finite_loss_stops_the_run_before_it_reaches_the_weights(tmp_path, monkeypatch):
    from attrefine_fast.refine import trainer

    calls = []

    def nan_on_the_second_step(*args, **kwargs):
        loss, parts = batch_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) == 2 else (loss, parts)

    batch_loss = trainer.batch_loss
    monkeypatch.setattr(trainer, "batch_loss", nan_on_the_second_step)
    refiner = Refiner(RefineConfig(mode="pgd_at", cycles=1, epochs_per_cycle=1, out=str(tmp_path), **TINY), train=digits_subset(48))
    with pytest.raises(FloatingPointError, match="pgd_at: the loss became nan at epoch 1, step 2; lower lr"):
        refiner.fit()
    assert all(torch.isfinite(p).all() for p in refiner.module.parameters())


def test_a_refinement_that_never_explains_says_so(tmp_path):
    # one cycle with the default explain_from_cycle = 1 would train the no-flags ablation under the refined name
    with pytest.warns(UserWarning, match="nothing is ever flagged"):
        Refiner(RefineConfig(mode="refine", cycles=1, epochs_per_cycle=1, out=str(tmp_path), **TINY), train=digits_subset(16))


def test_a_float64_dataset_trains_in_the_models_dtype_and_a_callers_model_takes_no_normalization(tmp_path):
    from attrefine_fast.data import ImageDataset

    digits = digits_subset(32)
    as_float64 = ImageDataset(digits.images.double() / 255 if digits.images.dtype == torch.uint8 else digits.images.double(),
                              digits.labels)
    Refiner(RefineConfig(mode="erm", cycles=1, epochs_per_cycle=1, out=str(tmp_path / "f64"), **TINY), train=as_float64).fit()
    from refine_helpers import SmoothNet

    with pytest.raises(ValueError, match="normalization='cifar10' is for the model the run builds"):
        Refiner(RefineConfig(mode="erm", normalization="cifar10", out=str(tmp_path / "own"), **TINY), train=digits,
                model=SmoothNet(channels=3, size=32, classes=10))


def test_the_run_reads_a_cifar_copy_with_the_checksums_it_is_given(tmp_path):
    from cifar_files import write_cifar

    _, md5 = write_cifar(tmp_path, "cifar10", archive=True)
    (tmp_path / "md5.json").write_text(json.dumps(md5))
    cfg = dict(mode="erm", dataset="cifar10", data_dir=str(tmp_path), out=str(tmp_path / "run"), **TINY)
    with pytest.raises(ValueError, match="failed its MD5 check"):
        Refiner(RefineConfig(**cfg))
    assert len(Refiner(RefineConfig(cifar_md5=str(tmp_path / "md5.json"), **cfg)).train) > 0


def test_the_run_loads_its_digits_with_the_spurious_patch_it_is_told(tmp_path):
    from attrefine_fast.data import patch_colours

    refiner = Refiner(RefineConfig(mode="erm", train_subset=16, spurious_patch=1.0, out=str(tmp_path), **TINY))
    expected = patch_colours(10)[refiner.labels].view(-1, 3, 1, 1).expand(-1, -1, 6, 6)
    assert torch.equal(refiner.images[:, :, :6, :6], expected)
    plain = Refiner(RefineConfig(mode="erm", train_subset=16, out=str(tmp_path), **TINY))
    assert torch.equal(plain.images[:, :, 6:], refiner.images[:, :, 6:]) and not torch.equal(plain.images, refiner.images)


def test_on_the_cpu_only_the_measured_architecture_trains_channels_last(tmp_path):
    small = Refiner(RefineConfig(mode="erm", train_subset=8, out=str(tmp_path / "a"), **TINY))
    conv = small.module.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    resnet = Refiner(RefineConfig(mode="erm", arch="preact_resnet18", train_subset=8, out=str(tmp_path / "b"), **TINY))
    assert all(p.is_contiguous() for p in resnet.module.parameters())


def test_final_model_reloads_by_name_with_its_channels_and_a_custom_model_says_it_cannot(tmp_path):
    from attrefine_fast.data import ImageDataset
    from attrefine_fast.models import load_checkpoint

    from refine_helpers import SmoothNet

    digits = digits_subset(32)
    gray = ImageDataset(digits.images.float().mean(1, keepdim=True) / 255 if digits.images.dtype == torch.uint8
                        else digits.images.mean(1, keepdim=True), digits.labels)
    Refiner(RefineConfig(mode="erm", cycles=1, epochs_per_cycle=1, out=str(tmp_path / "gray"), **TINY), train=gray).fit()
    model, ckpt = load_checkpoint(tmp_path / "gray" / FINAL)
    assert ckpt["model_kwargs"]["in_channels"] == 1 and model(torch.rand(2, 1, 32, 32)).shape == (2, 10)

    custom = SmoothNet(channels=3, size=32, classes=10)
    Refiner(RefineConfig(mode="erm", cycles=1, epochs_per_cycle=1, out=str(tmp_path / "custom"), **TINY), train=digits, model=custom).fit()
    with pytest.raises(ValueError, match="custom model"):
        load_checkpoint(tmp_path / "custom" / FINAL)
    saved = torch.load(tmp_path / "custom" / FINAL, weights_only=True)
    fresh = SmoothNet(channels=3, size=32, classes=10)
    fresh.load_state_dict(saved["model"])
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), custom(x))


def test_config_validation_keeps_plain_numbers_and_refuses_what_would_fail_later(tmp_path):
    # NumPy numbers (from a sweep over np.logspace, say) become plain ones: the checkpoint must
    # load in torch.load's safe mode, and a NumPy int subset size is a size, not a row index.
    cfg = RefineConfig(lr=np.float64(0.05), train_subset=np.int64(24), cycles=np.int64(1), epochs_per_cycle=1,
                       amp=np.bool_(False), out=str(tmp_path), **TINY).validate()
    assert type(cfg.lr) is float and type(cfg.train_subset) is int and type(cfg.amp) is bool
    Refiner(cfg, train=digits_subset(48)).fit(stop_after=1)
    resumed = Refiner(RefineConfig(**{**cfg.to_dict(), "lr": np.float64(0.05)}), train=digits_subset(48))
    resumed.fit(resume=True)
    assert resumed.epoch == 1
    for kwargs, error, match in [
        ({"progress": "false"}, TypeError, "progress must be true or false"),
        ({"amp": "no"}, TypeError, "amp must be true or false"),
        ({"instability": "runs", "instability_runs": 1}, ValueError, "instability_runs >= 2"),
        ({"dataset": "cifar10", "image_size": 64}, ValueError, "image_size must be 32"),
        ({"momentum": 5.0}, ValueError, r"momentum must be in \[0, 1\)"),
        ({"seed": 2**70}, ValueError, "seed must be in"),
        ({"cifar_md5": "md5.json"}, ValueError, "cifar_md5 checks a CIFAR copy"),
        ({"dataset": "cifar10", "cifar_md5": 3}, TypeError, "cifar_md5 must be a path"),
    ]:
        with pytest.raises(error, match=match):
            RefineConfig(**kwargs).validate()


def test_config_files_and_flags(tmp_path):
    import yaml

    from attrefine_fast.cli import main
    from attrefine_fast.refine.config import add_config_arguments, config_from_args

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"mode": "pgd_at", "eps": 0.2, "segmentation_params": {"n_segments": 9}}))
    (tmp_path / "c.json").write_text(json.dumps({"mode": "erm", "lam": 3.0}))
    assert RefineConfig.from_file(tmp_path / "c.yaml").eps == 0.2
    assert RefineConfig.from_file(tmp_path / "c.json").lam == 3.0
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--eps", "0.3", "--no-progress"]))
    assert (cfg.mode, cfg.eps, cfg.progress, cfg.segmentation_params) == ("pgd_at", 0.3, False, {"n_segments": 9})
    # a flag overrides a file's value before the one validation, also a value the file has wrong
    (tmp_path / "bad_lr.json").write_text(json.dumps({"mode": "erm", "lr": -1}))
    assert config_from_args(parser.parse_args(["--config", str(tmp_path / "bad_lr.json"), "--lr", "0.05"])).lr == 0.05
    with pytest.raises(ValueError, match="lr must be >= 0"):
        config_from_args(parser.parse_args(["--config", str(tmp_path / "bad_lr.json")]))
    (tmp_path / "bad.json").write_text(json.dumps({"mode": "refine", "lamda": 1.0}))
    with pytest.raises(ValueError, match="unknown config keys"):
        RefineConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="mode"):
        RefineConfig(mode="trades").validate()
    with pytest.raises(ValueError, match="refresh_fraction"):
        RefineConfig(refresh_fraction=0.0).validate()
    with pytest.raises(FileNotFoundError):
        RefineConfig.from_file(tmp_path / "missing.yaml")
    # A file that does not parse names itself; the extension's case does not matter.
    (tmp_path / "broken.yaml").write_text("mode: [erm\n")
    (tmp_path / "broken.json").write_text("{mode: erm}")
    (tmp_path / "upper.YML").write_text("lam: 2.0\n")
    for name, kind in (("broken.yaml", "YAML"), ("broken.json", "JSON")):
        with pytest.raises(ValueError, match=f"broken.{kind.lower()} is not valid {kind}"):
            RefineConfig.from_file(tmp_path / name)
    assert RefineConfig.from_file(tmp_path / "upper.YML").lam == 2.0
    # the command line end to end, stopped after one epoch and resumed
    argv = ["refine", "--mode", "erm", "--train-subset", "32", "--cycles", "1", "--epochs-per-cycle", "2", "--batch-size", "16",
            "--width", "4", "--no-progress", "--out", str(tmp_path / "run")]
    main(argv + ["--stop-after", "1"])
    main(argv + ["--resume"])
    lines = [json.loads(line) for line in open(tmp_path / "run" / METRICS)]
    assert [r["epoch"] for r in lines] == [1, 2]
