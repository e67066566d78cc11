"""The refine command under torchrun with 2 CPU processes (DDP over gloo): it trains, and the LIME
refresh, sharded over the ranks, gathers every rank's flags."""
import os
import subprocess
import sys

import torch

from attrefine_fast.refine import RefineConfig, Refiner
from attrefine_fast.refine.trainer import CHECKPOINT, FINAL

from refine_helpers import digits_subset, one_thread  # noqa: F401

ARGS = dict(mode="refine", train_subset=32, cycles=1, epochs_per_cycle=1, explain_from_cycle=0, refresh_fraction=1.0,
            detect_batch_size=8, lime_samples=12, batch_size=8, width=4, attack_steps=1, penalty_samples=4)


def torchrun_refine(out, *extra, **settings):
    """``attrefine-fast refine`` under torchrun with 2 CPU processes."""
    flags = []
    for key, value in {**ARGS, **settings}.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "attrefine_fast", "refine", *flags, "--device", "cpu", "--no-progress", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    torchrun_refine(out)
    assert (out / FINAL).exists()
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["world_size"] == 2 and state["epoch"] == 1
    store = state["flags"]
    assert (store["refreshed"] == 0).all()  # all 32 images, i.e. the chunks of both ranks

    # The same refresh in one process (same seed: same initial model, same chunks and LIME seeds)
    # gives the same flags: rank 1's chunks were gathered, not lost or duplicated.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Refiner(RefineConfig(device="cpu", progress=False, out=str(tmp_path / "single"), **ARGS), train=digits_subset(64))
        single.refresh(0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single.store.flags, store["flags"])
    assert store["flags"].any()
    chunks_rank1 = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    assert store["flags"][chunks_rank1].any()


def test_a_resumed_torchrun_continues_exactly(tmp_path):
    # Each rank updates its batch-norm statistics from its own shard: the ranks share rank 0's at
    # each epoch's end, or the refresh explains with two models and the checkpoint (rank 0's)
    # resumes rank 1 from other statistics.
    torchrun_refine(tmp_path / "whole", cycles=2)
    torchrun_refine(tmp_path / "resumed", "--stop-after", "1", cycles=2)
    torchrun_refine(tmp_path / "resumed", "--resume", cycles=2)
    whole = torch.load(tmp_path / "whole" / FINAL, weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / FINAL, weights_only=True)["model"]
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    flags = [torch.load(tmp_path / run / CHECKPOINT, weights_only=True)["flags"]["flags"] for run in ("whole", "resumed")]
    assert torch.equal(*flags)
