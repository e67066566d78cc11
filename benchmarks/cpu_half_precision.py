"""masked_pgd_step on the CPU in float16 and bfloat16: the C++ kernel against the pure-PyTorch
backend (float32 beside them for scale), which decides what backend="auto" runs.

    python benchmarks/cpu_half_precision.py [--rounds R] [--threads 1,2]
    ATTREFINE_FAST_CPU_KERNELS=baseline python benchmarks/cpu_half_precision.py   # the SSE2 loops

The C++ kernel's float16/bfloat16 loops run compiled for AVX2 + F16C where the CPU has them,
otherwise (or with the variable above) for x86-64's baseline; the header names which.

Per size (a weight on every other superpixel of a 4x4 grid, photo pixels, a Gaussian gradient)
and norm: the median milliseconds of one in-place step on each backend, the backends alternating
call by call, and the C++ kernel's time as a multiple of PyTorch's.
"""
from __future__ import annotations

import argparse

import torch

from attrefine_fast import backends
from attrefine_fast.benchmarking.core import interleaved_median_ms
from attrefine_fast.benchmarking.inputs import grid_batch, photo_batch

SIZES = ((32, 1), (32, 128), (224, 1), (224, 8))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("torch", "cpp")


def step_inputs(size: int, batch: int, dtype: torch.dtype):
    x = photo_batch(size, batch).to(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    segments, _ = grid_batch(batch, size, 16)
    weight = (segments % 2).to(dtype)
    return (x + 0.01).clamp(0, 1), x, grad, weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    ok, why = backends.status("masked_pgd_step", "cpp", "cpu")
    if not ok:
        raise SystemExit(f"the C++ kernels are needed: {why}")
    impls = {b: backends.resolve("masked_pgd_step", b, "cpu") for b in BACKENDS}
    print(f"torch {torch.__version__}, median ms over {args.rounds} interleaved rounds; "
          f"C++ kernels: {torch.ops.attrefine_fast.cpu_kernels()}")
    print("| threads | size | dtype | norm | torch | cpp | cpp / torch |")
    print("|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for size, batch in SIZES:
            for dtype in DTYPES:
                x_adv, x, grad, weight = step_inputs(size, batch, dtype)
                for norm in ("linf", "l2"):
                    calls = {
                        b: (lambda impl=impl: impl(x_adv, x, grad, weight, 2 / 255, 8 / 255, 0.0, 1.0, norm))
                        for b, impl in impls.items()
                    }
                    ms = interleaved_median_ms(calls, args.rounds, torch.device("cpu"), warmup=2)
                    print(f"| {threads} | {size}x{size}, B={batch} | {str(dtype).removeprefix('torch.')} | {norm} | "
                          f"{ms['torch']:.3f} | {ms['cpp']:.3f} | {ms['cpp'] / ms['torch']:.2f}x |")


if __name__ == "__main__":
    main()
