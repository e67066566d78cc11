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


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    flags = []
    for key, value in ARGS.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "attrefine_fast", "refine", *flags, "--device", "cpu", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
