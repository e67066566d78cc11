"""The GPU performance targets of the compiled and Triton kernels, measured at the sizes they are
stated for, with the time split into GPU kernel time and the rest (launches, argument checks,
host synchronizations):

- perturbation at >= 70% of the device's memory bandwidth for the bytes written;
- lime_fit for B=256 images, N=1000, M=64, 5 labels >= 5x the pure-PyTorch backend;
- masked_pgd_step >= 3x the eager PyTorch sequence it replaces (the pure-PyTorch backend).

It also times segment_mean on each backend (no target: the measurement behind backend="auto"'s
order for it on CUDA, attrefine_fast/backends.py).

    python benchmarks/gpu_targets.py [--json PATH] [--reps N] [--only GROUP]

Each op is called through the implementation ``backend=`` resolves to (the raw op, as the
explanation engine and the attacks call it). Times are medians of CUDA-event timings of single
calls after warm-up; "kernels" is the summed duration of the GPU kernels of one call, read from
torch.profiler. The bandwidth reference is the spec sheet's peak where the device is known, and
the write bandwidth that ``Tensor.fill_`` reaches on the same buffer.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics

import torch

from attrefine_fast import backends
from attrefine_fast.benchmarking.inputs import grid_batch, photo_batch
from attrefine_fast.neighborhood import draw_masks, fudge_images

# Peak memory bandwidth from the vendor's spec sheets, bytes/s.
SPEC_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}
GPU_BACKENDS = ("torch", "cuda", "triton")


def median_seconds(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def kernel_seconds(fn, calls: int = 5) -> tuple[float, float]:
    """(summed GPU kernel time per call, kernels per call) from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    return total_us / calls / 1e6, len(kernels) / calls


def spec_bandwidth() -> float | None:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in SPEC_BANDWIDTH.items() if key in name), None)


def measure(rows: list, case: str, make, reps: int, bytes_written: int | None = None) -> None:
    for backend in GPU_BACKENDS:
        ok, why = backends.status(case.split()[0], backend, "cuda")
        row = {"case": case, "backend": backend}
        if not ok:
            row["skipped"] = why
        else:
            try:
                fn = make(backend)
                row["seconds"] = median_seconds(fn, reps)
                row["kernel_seconds"], row["kernels_per_call"] = kernel_seconds(fn)
                if bytes_written:
                    row["write_bandwidth"] = bytes_written / row["seconds"]
                    row["kernel_write_bandwidth"] = bytes_written / max(row["kernel_seconds"], 1e-12)
            except Exception as e:  # one failing backend must not hide the others' figures
                row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(row_text(row), flush=True)


def row_text(row: dict) -> str:
    if "seconds" not in row:
        return f"{row['case']:<44} {row['backend']:<7} {row.get('skipped') or row.get('error')}"
    text = (f"{row['case']:<44} {row['backend']:<7} {row['seconds'] * 1e6:10.1f} us   kernels "
            f"{row['kernel_seconds'] * 1e6:9.1f} us in {row['kernels_per_call']:.0f}")
    if "write_bandwidth" in row:
        text += f"   {row['write_bandwidth'] / 1e9:7.0f} GB/s ({row['kernel_write_bandwidth'] / 1e9:.0f} in kernels)"
    return text


def perturb_cases(rows: list, reps: int) -> None:
    for size, batch, count, channels_last in ((224, 1, 256, False), (224, 1, 256, True), (224, 4, 64, False),
                                              (32, 128, 64, False)):
        images = photo_batch(size, batch).cuda()
        seg, counts = grid_batch(batch, size, 64)
        seg, counts = seg.cuda(), counts.cuda()
        masks = draw_masks(counts, 1000, seed=0, device="cuda")
        fudge = fudge_images(images, seg, 64, "mean", "torch")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(batch * count, 3, size, size, device="cuda").contiguous(memory_format=fmt)
        nbytes = out.numel() * out.element_size()
        fill_s = median_seconds(lambda: out.fill_(0.5), reps)
        layout = "NHWC" if channels_last else "NCHW"
        case = f"perturb_into {size}x{size} B={batch} rows={batch * count} {layout}"
        rows.append({"case": case, "backend": "fill_", "seconds": fill_s, "write_bandwidth": nbytes / fill_s})
        print(f"{case:<44} fill_   {fill_s * 1e6:10.1f} us   {nbytes / fill_s / 1e9:7.0f} GB/s", flush=True)

        def make(backend):
            impl = backends.resolve("perturb_into", backend, "cuda")
            return lambda: impl(images, seg, masks, fudge, 128, None, None, out)

        measure(rows, case, make, reps, nbytes)


def lime_fit_cases(rows: list, reps: int) -> None:
    for batch, dtype in ((256, torch.float64), (256, torch.float32), (1, torch.float64)):
        gen = torch.Generator().manual_seed(0)
        counts = torch.full((batch,), 64, dtype=torch.long)
        masks = draw_masks(counts, 1000, seed=0).cuda()
        targets = torch.rand(batch, 1000, 5, generator=gen, dtype=dtype).cuda()
        counts = counts.cuda()

        def make(backend):
            impl = backends.resolve("lime_fit", backend, "cuda")
            return lambda: impl(masks, targets, counts, None, 0.25, 1.0)

        measure(rows, f"lime_fit B={batch} N=1000 M=64 L=5 {str(dtype)[6:]}", make, reps)


def pgd_cases(rows: list, reps: int) -> None:
    for size, batch in ((224, 1), (224, 128), (32, 128)):
        gen = torch.Generator().manual_seed(0)
        x = photo_batch(size, 1).expand(batch, -1, -1, -1).contiguous().cuda()
        grad = torch.randn(x.shape, generator=gen).cuda()
        weight = (grid_batch(batch, size, 64)[0] % 2).to(device="cuda", dtype=x.dtype)
        for norm in ("linf", "l2"):
            x_adv = (x + 0.01 * torch.randn(x.shape, generator=gen).cuda()).clamp(0, 1)

            def make(backend):
                impl = backends.resolve("masked_pgd_step", backend, "cuda")
                return lambda: impl(x_adv, x, grad, weight, 2 / 255, 8 / 255, 0.0, 1.0, norm)

            measure(rows, f"masked_pgd_step {size}x{size} B={batch} {norm} weighted", make, reps)


def segment_mean_cases(rows: list, reps: int) -> None:
    """The hide-colour means explain() computes once per batch, 64 segments: many small images
    and a few large ones."""
    for size, batch in ((32, 256), (224, 32)):
        images = photo_batch(size, 8).repeat(batch // 8, 1, 1, 1).cuda()  # the content does not change the time
        seg = grid_batch(batch, size, 64)[0].cuda()

        def make(backend):
            impl = backends.resolve("segment_mean", backend, "cuda")
            return lambda: impl(images, seg, 64)

        measure(rows, f"segment_mean {size}x{size} B={batch} M=64", make, reps)


# --only's groups, in the order they run.
CASE_GROUPS = {"perturb": perturb_cases, "lime_fit": lime_fit_cases, "masked_pgd_step": pgd_cases,
               "segment_mean": segment_mean_cases}


def tuned_configs() -> dict:
    """The configuration each Triton autotuner chose, per tuning key, in this process; or
    {"error": why} when the Triton kernels do not load, so that the rows measured still reach the
    JSON."""
    try:
        kernels = importlib.import_module("attrefine_fast.kernels")
        tuners = {"perturb": kernels.perturb._perturb_kernel, "lime_fit float32": kernels.lime_fit._lime_fit_kernel,
                  "lime_fit float64": kernels.lime_fit._lime_fit_kernel_f64}
        return {name: {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
                for name, tuner in tuners.items()}
    except Exception as e:  # Triton's import fails in many ways on a new machine, not only ImportError
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--only", default="", help=f"one of {', '.join(CASE_GROUPS)} (default: all)")
    args = parser.parse_args(argv)
    if args.only and args.only not in CASE_GROUPS:
        parser.error(f"--only {args.only!r} matches no case group; the groups are {', '.join(CASE_GROUPS)}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_targets.py needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    env = {"device": torch.cuda.get_device_name(), "sms": props.multi_processor_count, "torch": torch.__version__,
           "cuda": torch.version.cuda, "spec_bandwidth": spec_bandwidth(),
           "auto": {op: backends.selected(op, "auto", "cuda")
                    for op in ("perturb_into", "lime_fit", "masked_pgd_step", "segment_mean")}}
    print(env, flush=True)
    rows: list = []
    for name, cases in CASE_GROUPS.items():
        if args.only in ("", name):
            cases(rows, args.reps)
    tuned = tuned_configs()
    print("Triton autotuning:", tuned, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "triton_configs": tuned}, f, indent=1)


if __name__ == "__main__":
    main()
