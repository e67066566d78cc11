"""Would torch.compile make the hand-written kernels unnecessary? Each op's pure-PyTorch reference
eager, compiled by Inductor (``torch.compile(fullgraph=True, dynamic=False)``), and our compiled
backends that run on the device, on the same inputs.

    python benchmarks/inductor_reference.py [--device cpu|cuda] [--rounds R] [--threads T]

Prints the median milliseconds of each provider per case (the providers alternating call by
call) and the first compiled call's time (tracing and code generation). Input validation is
left out everywhere: each provider is the implementation ``backends.resolve`` hands out.
"""
from __future__ import annotations

import argparse
import time

import torch

from attrefine_fast import backends
from attrefine_fast.benchmarking.core import interleaved_median_ms, synchronize
from attrefine_fast.benchmarking.inputs import grid_batch, photo_batch
from attrefine_fast.neighborhood import draw_masks, fudge_images


def cases(device: torch.device):
    """(name, op, positional arguments of the op's schema)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for norm in ("linf", "l2"):
        for size, batch in ((32, 128), (224, 8)):
            x = photo_batch(size, batch)
            grad = torch.randn(x.shape, generator=gen)
            segments, _ = grid_batch(batch, size, 16)
            weight = (segments % 2).float()
            args = [t.to(device) for t in ((x + 0.01).clamp(0, 1), x, grad, weight)]
            out.append((f"masked_pgd_step {norm} {size}x{size} B={batch}", "masked_pgd_step", (*args, 2 / 255, 8 / 255, 0.0, 1.0, norm)))
    images = photo_batch(224, 1)
    segments, counts = grid_batch(1, 224, 36)
    masks = draw_masks(counts, 1000, seed=0)
    fudge = fudge_images(images, segments, 36, "mean", "torch")
    buffer = torch.empty(32, 3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    moved = [t.to(device) for t in (images, segments, masks, fudge, mean, std, buffer)]
    out.append(("perturb_into 224x224, 32 rows, normalized", "perturb_into", (*moved[:4], 0, *moved[4:])))
    images8 = photo_batch(224, 8)
    segments8, _ = grid_batch(8, 224, 64)
    out.append(("segment_mean 224x224 B=8 M=64", "segment_mean", (images8.to(device), segments8.to(device), 64)))
    fit_masks = draw_masks(torch.full((64,), 64), 1000, seed=0)
    targets = torch.rand(64, 1000, 5, generator=gen, dtype=torch.float64)
    out.append(("lime_fit B=64 N=1000 M=64 L=5 float64", "lime_fit",
                (fit_masks.to(device), targets.to(device), torch.full((64,), 64, device=device), None, 0.25, 1.0)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours = [b for b in ("cpp", "cuda", "triton") if backends.status("perturb", b, device.type)[0]]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{name}; torch {torch.__version__}; median ms over {args.rounds} interleaved rounds")
    print("| case | torch (eager) | inductor | first inductor call (s) | " + " | ".join(ours) + " |")
    print("|---|---|---|---|" + "---|" * len(ours))
    for title, op, op_args in cases(device):
        reference = backends.resolve(op, "torch", device)
        torch._dynamo.reset()
        compiled = torch.compile(reference, fullgraph=True, dynamic=False)
        start = time.perf_counter()
        compiled(*op_args)
        synchronize(device)
        first = time.perf_counter() - start
        providers = {"torch": reference, "inductor": compiled, **{b: backends.resolve(op, b, device) for b in ours}}
        ms = interleaved_median_ms({k: (lambda impl=impl: impl(*op_args)) for k, impl in providers.items()}, args.rounds, device)
        print(f"| {title} | {ms['torch']:.3f} | {ms['inductor']:.3f} | {first:.1f} | " + " | ".join(f"{ms[b]:.3f}" for b in ours) + " |")


if __name__ == "__main__":
    main()
