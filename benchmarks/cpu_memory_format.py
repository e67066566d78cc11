"""The refinement's model passes on the CPU with NCHW weights against channels-last ones.

    python benchmarks/cpu_memory_format.py [--rounds R] [--threads T] [--archs small_cnn,preact_resnet18]

Per architecture (32x32x3 inputs, 10 classes, the same initial weights in both layouts), three
passes the refinement runs: a training step (forward and backward of CE, batch 64), the
input-gradient penalty (a double backward, 16 images) and an eval forward of 256 images (LIME,
attacks' evaluation). The two layouts alternate round by round; prints the median milliseconds
of each and their ratio. Inputs stay NCHW: channels-last weights make each convolution's output
channels-last by themselves, as in the trainer.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.nn import functional as F

from attrefine_fast.models import build_model

KWARGS = {"small_cnn": {"width": 16}}


def passes(model, x, y):
    """The three timed passes, each a zero-argument function."""

    def train_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def penalty():
        xg = x[:16].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y[:16]), xg, create_graph=True)
        grad.pow(2).sum().backward()

    big = torch.rand(256, *x.shape[1:], generator=torch.Generator().manual_seed(1))

    def eval_forward():
        with torch.no_grad():
            model(big)

    return {"train step (64)": train_step, "penalty (16)": penalty, "eval forward (256)": eval_forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--archs", default="small_cnn,preact_resnet18")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median ms over {args.rounds} interleaved rounds")
    print(f"{'arch':<16}{'pass':<20}{'NCHW':>9}{'channels-last':>15}{'speedup':>9}")
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        nchw = build_model(arch, 10, **KWARGS.get(arch, {}))
        layouts = {"nchw": nchw, "cl": copy.deepcopy(nchw).to(memory_format=torch.channels_last)}
        fns = {name: passes(model, x, y) for name, model in layouts.items()}
        times = {(name, p): [] for name in layouts for p in fns["nchw"]}
        for r in range(args.rounds + 2):  # two warm-up rounds
            for name in layouts:
                for p, fn in fns[name].items():
                    start = time.perf_counter()
                    fn()
                    if r >= 2:
                        times[(name, p)].append(time.perf_counter() - start)
        for p in fns["nchw"]:
            a, b = (1e3 * statistics.median(times[(name, p)]) for name in ("nchw", "cl"))
            print(f"{arch:<16}{p:<20}{a:>9.1f}{b:>15.1f}{a / b:>8.2f}x")


if __name__ == "__main__":
    main()
