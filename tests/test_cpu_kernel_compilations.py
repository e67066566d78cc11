"""The C++ CPU kernels compiled twice, for x86-64's baseline and for AVX2 (csrc/cpu/cpu_features.h),
agree: masked_pgd_step's float16/bfloat16 loops bit for bit, lime_fit's to rounding (FMA adds
products unrounded). The default run takes the AVX2 compilations where the CPU has them; a
subprocess with ATTREFINE_FAST_CPU_KERNELS=baseline computes the same cases with the baseline
ones (the parity tests against the reference run in the default process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attrefine_fast import _extension

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="needs the compiled extension")


def step_cases():
    """(x_adv, x, grad, weight, step_size, eps, lo, hi, norm) in float16 and bfloat16: chunks of one
    sample ending inside a group of eight (the baseline loop finishes them), a chunk boundary
    (16 Ki elements), channels-last, weights or none, magnitudes from float16's subnormals up,
    signed zeros and ties at the bounds."""
    gen = torch.Generator().manual_seed(11)
    cases = []
    for shape, channels_last in [((1, 1, 1, 1), False), ((2, 3, 5, 7), True), ((3, 1, 13, 11), False),
                                 ((2, 3, 32, 32), True), ((1, 3, 129, 67), False)]:
        for dtype in (torch.float16, torch.bfloat16):
            for scale in (1e-4, 1.0, 3e3):
                for norm in ("linf", "l2"):
                    for weighted in (False, True):
                        x = (torch.rand(shape, generator=gen) * scale).to(dtype)
                        x_adv = (x.float() + 0.05 * scale * torch.randn(shape, generator=gen)).to(dtype)
                        grad = torch.randn(shape, generator=gen).to(dtype)
                        grad[..., 0] = 0  # sign(0) = 0
                        if channels_last:
                            x, x_adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, x_adv, grad))
                        weight = torch.rand(shape[0], *shape[2:], generator=gen).to(dtype) if weighted else None
                        lo, hi = (0.0, scale) if weighted else (-float("inf"), float("inf"))
                        cases.append((x_adv, x, grad, weight, 0.01 * scale, 0.03 * scale, lo, hi, norm))
    # Ties the clamps must break as the baseline's std::min / std::max do: signed zeros in the
    # inputs and the bounds, a zero and an infinite ball, a zero step, weights of exactly 0 and 1.
    for dtype in (torch.float16, torch.bfloat16):
        for norm in ("linf", "l2"):
            for step_size, eps, lo, hi in [(0.01, 0.0, 0.0, 1.0), (0.01, float("inf"), -0.0, 0.0), (0.0, 0.02, -1.0, -0.0),
                                           (0.3, 0.02, 0.0, 0.0)]:
                shape = (2, 3, 9, 7)
                pick = torch.randint(0, 4, shape, generator=gen)
                values = torch.tensor([0.0, -0.0, 1e-3, -1e-3])
                x, x_adv = values[pick].to(dtype), values[torch.randint(0, 4, shape, generator=gen)].to(dtype)
                grad = torch.tensor([0.0, -0.0, 1.0, -2.0])[torch.randint(0, 4, shape, generator=gen)].to(dtype)
                weight = torch.tensor([0.0, 1.0, 0.5])[torch.randint(0, 3, (2, 9, 7), generator=gen)].to(dtype)
                cases.append((x_adv, x, grad, weight, step_size, eps, lo, hi, norm))
    return cases


def fit_cases():
    """(masks, targets, num_segments) for lime_fit: one segment, a few, and more than the fast
    path's 256, float32 and float64."""
    gen = torch.Generator().manual_seed(12)
    cases = []
    for m in (1, 37, 300):
        for dtype in (torch.float32, torch.float64):
            masks = torch.rand(3, 400, m, generator=gen) > 0.5
            masks[:, 0] = True
            targets = torch.rand(3, 400, 3, generator=gen, dtype=torch.float64).to(dtype)
            cases.append((masks, targets, torch.tensor([m, max(1, m - 5), max(1, m // 2)])))
    return cases


def outputs() -> dict:
    ops = torch.ops.attrefine_fast
    steps = []
    for x_adv, x, grad, weight, step_size, eps, lo, hi, norm in step_cases():
        x_adv = x_adv.clone(memory_format=torch.preserve_format)
        ops.masked_pgd_step(x_adv, x, grad, weight, step_size, eps, lo, hi, norm)
        steps.append(x_adv)
    fits = [ops.lime_fit(masks, targets, counts, None, 0.25, 1.0) for masks, targets, counts in fit_cases()]
    return {"cpu_kernels": ops.cpu_kernels(), "steps": steps, "fits": fits}


def test_baseline_and_avx2_compilations_agree(tmp_path):
    if os.environ.get("ATTREFINE_FAST_CPU_KERNELS") == "baseline":
        pytest.skip("this run keeps every kernel on its baseline compilation")
    ours = outputs()
    if "AVX2+F16C" not in ours["cpu_kernels"] or "AVX2+FMA" not in ours["cpu_kernels"]:
        pytest.skip(f"the AVX2 compilations do not run on this CPU ({ours['cpu_kernels']})")
    path = tmp_path / "baseline.pt"
    script = f"import sys; sys.path.insert(0, {str(HERE)!r}); import torch, test_cpu_kernel_compilations as t; torch.save(t.outputs(), {str(path)!r})"
    env = {**os.environ, "ATTREFINE_FAST_CPU_KERNELS": "baseline"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    base = torch.load(path)
    assert base["cpu_kernels"].count("x86-64 baseline") == 2, base["cpu_kernels"]
    assert len(base["steps"]) == len(ours["steps"]) == 136
    for i, (b, o) in enumerate(zip(base["steps"], ours["steps"])):
        assert b.stride() == o.stride() and torch.equal(b.view(torch.int16), o.view(torch.int16)), f"step case {i}"
    for (masks, _, _), b, o in zip(fit_cases(), base["fits"], ours["fits"]):
        tol = {"rtol": 1e-9, "atol": 1e-11} if b[0].dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
        for name, tb, to in zip(("coef", "intercept", "score", "local_pred"), b, o):
            torch.testing.assert_close(tb, to, **tol, msg=lambda m: f"lime_fit {name}, M={masks.shape[2]}: {m}")
