"""Host time of one Triton op call, apart from its kernels: through the registered op
(``torch.ops.attrefine_fast.<op>_triton``, the dispatcher's autograd / ADInplaceOrView layers)
and through the direct eager call that ``backend="triton"`` resolves to (kernels/op_registration.py).

    python benchmarks/triton_host_overhead.py [--device cpu|cuda] [--calls N] [--blocks K] [--launch]

By default the kernel launches are stubbed out, so the figures are the Python around them
(argument contract, allocations, dispatch) and can be taken on a machine without a GPU. With
``--launch`` (CUDA only) the kernels run too: the time is then the host's per call, launches
included, with the GPU queue left to drain between timed blocks. Times are the best of K blocks
of N calls (the least disturbed by other work on the machine), in microseconds per call. Inputs
are small: the host's share does not depend on the sizes (the checks that read data run on the
device, kernels/device_checks.py).
"""
from __future__ import annotations

import argparse
import os
import time


def stub_launches(modules) -> None:
    class NoLaunch:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in modules:
        module.wrap_triton = NoLaunch


def best_microseconds(fn, calls: int, blocks: int, sync) -> float:
    for _ in range(min(calls, 100)):
        fn()
    sync()
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def cases(device: str):
    import torch

    from attrefine_fast import kernels

    gen = torch.Generator().manual_seed(0)
    b, c, h, w, n, m = 4, 3, 32, 32, 64, 16
    images = torch.rand(b, c, h, w, generator=gen).to(device)
    fudge = torch.rand(b, c, h, w, generator=gen).to(device)
    segments = torch.randint(0, m, (b, h, w), generator=gen).to(device)
    masks = (torch.rand(b, n, m, generator=gen) > 0.5).to(device)
    mean, std = torch.rand(c).to(device), (torch.rand(c) + 1).to(device)
    out = torch.empty(b * 16, c, h, w, device=device)
    targets = torch.rand(b, n, 5, generator=gen, dtype=torch.float64).to(device)
    counts = torch.full((b,), m, device=device)
    x = images.clone()
    x_adv, grad = x.clone(), torch.randn(b, c, h, w, generator=gen).to(device)
    return {
        "segment_mean": (kernels.get("segment_mean"), (images, segments, m)),
        "perturb": (kernels.get("perturb"), (images, segments, masks, fudge, 0, 16, None, None, None, False)),
        "perturb_into": (kernels.get("perturb_into"), (images, segments, masks, fudge, 0, mean, std, out)),
        "lime_fit": (kernels.get("lime_fit"), (masks, targets, counts, None, 0.25, 1.0)),
        "masked_pgd_step linf": (kernels.get("masked_pgd_step"), (x_adv, x, grad, None, 0.01, 0.03, 0.0, 1.0, "linf")),
        "masked_pgd_step l2": (kernels.get("masked_pgd_step"), (x_adv, x, grad, None, 0.01, 0.03, 0.0, 1.0, "l2")),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--launch", action="store_true", help="run the kernels too (CUDA only)")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        if args.launch:
            parser.error("--launch needs a CUDA device")
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels are never run; they must still define
    from attrefine_fast import kernels

    if not args.launch:
        stub_launches([kernels.segment_mean, kernels.perturb, kernels.lime_fit, kernels.masked_pgd_step,
                       kernels.device_checks])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# {where}, torch {torch.__version__}, launches {'included' if args.launch else 'stubbed'}; "
          f"us per call, best of {args.blocks} x {args.calls}")
    print(f"{'op':24s} {'torch.ops':>10s} {'direct':>10s} {'contract':>10s}")
    for name, (impl, call_args) in cases(device).items():
        timed = [best_microseconds(fn, args.calls, args.blocks, sync)
                 for fn in (lambda: impl.op(*call_args), lambda: impl(*call_args), lambda: impl.check(*call_args))]
        print(f"{name:24s} " + " ".join(f"{t:10.1f}" for t in timed))


if __name__ == "__main__":
    main()
