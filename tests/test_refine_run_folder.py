"""A run's folder: one run at a time, nothing lost to a mistaken --resume, unreadable checkpoints
named, files replaced whole, and what evaluate needs to score the final model as trained."""
import json
import os

import pytest
import torch

from attrefine_fast.atomic_files import write_atomically
from attrefine_fast.refine import RefineConfig, Refiner
from attrefine_fast.refine.folder_lock import folder_lock
from attrefine_fast.refine.trainer import CHECKPOINT, FINAL, METRICS

from refine_helpers import digits_subset, one_thread  # noqa: F401

TINY = dict(mode="erm", cycles=1, epochs_per_cycle=2, device="cpu", batch_size=16, width=4, progress=False)


def _run(out, **kwargs):
    return Refiner(RefineConfig(out=str(out), **{**TINY, **kwargs}), train=digits_subset(32))


def test_a_second_run_in_a_folder_in_use_stops_at_once(tmp_path):
    os.makedirs(tmp_path, exist_ok=True)
    with folder_lock(str(tmp_path)):  # as a run in another process holds it
        with pytest.raises(ValueError, match="another run is training in"):
            _run(tmp_path).fit()
    assert not (tmp_path / METRICS).exists()  # it stopped before touching the folder
    _run(tmp_path).fit()  # the lock is free again
    assert (tmp_path / FINAL).exists()


def test_resume_without_a_checkpoint_keeps_another_runs_files(tmp_path):
    _run(tmp_path).fit()
    os.remove(tmp_path / CHECKPOINT)
    model, log = (tmp_path / FINAL).read_bytes(), (tmp_path / METRICS).read_text()
    with pytest.raises(ValueError, match=f"no {CHECKPOINT} but holds {FINAL} and {METRICS}"):
        _run(tmp_path).fit(resume=True)
    assert (tmp_path / FINAL).read_bytes() == model and (tmp_path / METRICS).read_text() == log
    fresh = _run(tmp_path / "new")
    fresh.fit(resume=True)  # a folder without another run's files: resume starts the run
    assert fresh.epoch == 2


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, reading the garbage
@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", "cut", "list", "a model"])
def test_an_unreadable_or_foreign_checkpoint_is_named(tmp_path, content):
    _run(tmp_path / "ok").fit()
    good = (tmp_path / "ok" / CHECKPOINT).read_bytes()
    os.makedirs(tmp_path / "bad")
    path = tmp_path / "bad" / CHECKPOINT
    if content == "cut":
        path.write_bytes(good[: len(good) // 3])
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "a model":
        path.write_bytes((tmp_path / "ok" / FINAL).read_bytes())
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        _run(tmp_path / "bad").fit(resume=True)


def test_resume_on_another_thread_count_says_so(tmp_path):
    _run(tmp_path).fit(stop_after=1)  # on one thread (one_thread)
    torch.set_num_threads(2)
    with pytest.warns(UserWarning, match="1 CPU threads and this one has 2"):
        _run(tmp_path).fit(resume=True)


def test_a_log_line_of_another_kind_is_named_on_resume(tmp_path):
    _run(tmp_path).fit(stop_after=1)
    with open(tmp_path / METRICS, "a") as f:
        f.write(json.dumps({"loss": 1.0}) + "\n" + json.dumps({"event": "epoch", "epoch": 1}) + "\n")
    with pytest.raises(ValueError, match="line 2 is not a record of this run's log"):
        _run(tmp_path).fit(resume=True)


def test_atomic_writes_use_their_own_temporary_file_and_leave_none_behind(tmp_path):
    target = str(tmp_path / "f.bin")
    names = []

    def write(tmp):
        names.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"x")

    write_atomically(target, write)
    write_atomically(target, write)
    assert names[0] != names[1] and all(n.startswith(target + ".") for n in names)

    def fail(tmp):
        open(tmp, "wb").close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, fail)
    assert sorted(os.listdir(tmp_path)) == ["f.bin"] and open(target, "rb").read() == b"x"


def test_evaluate_scores_the_final_model_at_the_size_it_was_trained_at(tmp_path, monkeypatch):
    # the model is size-agnostic (global pooling): evaluated at the default 32 px it scored near chance
    from attrefine_fast import data
    from attrefine_fast.cli import main
    from attrefine_fast.data import load_digits

    sizes = []
    monkeypatch.setattr(data, "load_digits", lambda split, **kw: sizes.append(kw.get("size")) or load_digits(split, **kw))
    Refiner(RefineConfig(out=str(tmp_path / "run"), **TINY), train=load_digits("train", size=16).subset(64)).fit()
    assert torch.load(tmp_path / "run" / FINAL, weights_only=True)["image_size"] == [16, 16]
    main(["evaluate", "--checkpoint", str(tmp_path / "run" / FINAL), "--out", str(tmp_path / "eval"), "--max-samples", "8",
          "--no-fgsm", "--pgd-steps", "--corruptions", "--no-progress", "--device", "cpu"])
    assert sizes == [16]
