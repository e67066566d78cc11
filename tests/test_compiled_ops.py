"""The compiled C++/OpenMP CPU ops (csrc/cpu) against the pure-PyTorch references: parity over
(dtype, atol, rtol) with awkward shapes, torch.library.opcheck on the registrations, errors on bad
input straight from the op, and one end-to-end explanation with each backend."""
import functools
import math
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attrefine_fast as af
from attrefine_fast import _extension, backends
from attrefine_fast.models import SmallCNN
from attrefine_fast.ops import (
    lime_fit,
    lime_fit_ref,
    masked_pgd_step,
    masked_pgd_step_ref,
    perturb,
    perturb_into_ref,
    perturb_ref,
    segment_mean,
    segment_mean_ref,
)
from conftest import skip_unless_on_cpu
from op_cases import (
    BAD_CALLS,
    clone_args,
    l2_step_overflow_case,
    labels,
    lime_fit_cases,
    masked_pgd_step_cases,
    perturb_cases,
    perturb_into_cases,
    segment_mean_cases,
    step_inputs,
)

LOADED = _extension.loaded()
ops = torch.ops.attrefine_fast if LOADED else None


@pytest.fixture(autouse=True)
def needs_extension(request):
    """Every test here needs the compiled ops, except the one that checks that they were built."""
    if not LOADED and request.function is not test_extension_is_built_where_a_compiler_exists:
        pytest.skip(f"compiled extension not loaded: {_extension.load_error()}")


def _ids(cases):
    return [name for name, _ in cases]


def test_extension_is_built_where_a_compiler_exists():
    """A broken build must not hide behind the skips: with a C++ compiler present (and the build
    not switched off) the extension has to load and carry a CPU kernel for every op."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if compiler is None or os.environ.get("ATTREFINE_NO_EXTENSION", "0") == "1":
        pytest.skip("no C++ compiler, or the build was switched off with ATTREFINE_NO_EXTENSION=1")
    assert _extension.loaded(), _extension.load_error()
    for op in backends.OPS:
        assert backends.status(op, "cpp", "cpu") == (True, "C++/OpenMP kernel"), op


# ---- segment_mean: float64 sums in pixel order, so every dtype matches exactly ----
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("case", segment_mean_cases(), ids=_ids(segment_mean_cases()))
def test_segment_mean_parity(case, dtype):
    name, _ = case
    images, segments, m = dict(segment_mean_cases(dtype))[name]
    expected = segment_mean_ref(images, segments, m)
    out = ops.segment_mean(images, segments, m)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(segment_mean(images, segments, m, backend="cpp"), expected, atol=0, rtol=0)


def test_segment_mean_int32_segments_and_padding():
    images, segments, m = segment_mean_cases(torch.float64)[0][1]
    out = ops.segment_mean(images, segments.int(), m + 3)  # padded segments have mean 0
    torch.testing.assert_close(out, segment_mean_ref(images, segments, m + 3), atol=0, rtol=0)
    assert torch.all(out[:, m:] == 0)


# ---- perturb: a pure select after the reference's own normalization and cast: exact ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.uint8])
@pytest.mark.parametrize("case", perturb_cases(), ids=_ids(perturb_cases()))
def test_perturb_parity(case, dtype):
    name, _ = case
    args = dict(perturb_cases(dtype))[name]
    expected = perturb_ref(*args)
    out = ops.perturb(*args)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last if args[-1] else torch.contiguous_format)
    torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
    images, segments, masks, fudge, offset, count, mean, std, out_dtype, cl = args
    public = perturb(images, segments, masks, fudge, offset, count, mean=mean, std=std, out_dtype=out_dtype,
                     channels_last=cl, backend="cpp")
    torch.testing.assert_close(public, expected, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.uint8])
def test_perturb_both_paths_on_coherent_and_scattered_labels(out_dtype):
    """Long runs of equal labels take the run-copy path, scattered labels the select path; a batch
    mixing both must match the reference image by image."""
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 31, 29, generator=gen)
    segments = torch.cat([labels(1, 31, 29, [7], gen, coherent=True), labels(1, 31, 29, [7], gen)])
    masks = torch.rand(2, 6, 7, generator=gen) > 0.5
    fudge = torch.rand(2, 3, 31, 29, generator=gen)
    if out_dtype == torch.uint8:  # a uint8 output holds uint8 images' own values
        images, fudge = (images * 255).to(torch.uint8), (fudge * 255).to(torch.uint8)
    for cl in (False, True):
        args = (images, segments, masks, fudge, 1, 5, None, None, out_dtype, cl)
        torch.testing.assert_close(ops.perturb(*args), perturb_ref(*args), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("case", perturb_into_cases(), ids=_ids(perturb_into_cases()))
def test_perturb_into_parity(case, dtype):
    """perturb_into writes exactly perturb's chunk into the caller's buffer, in its layout."""
    name, _ = case
    images, segments, masks, fudge, offset, mean, std, out = dict(perturb_into_cases(dtype))[name]
    b = images.shape[0]
    channels_last = not out.is_contiguous()
    expected = perturb_ref(images, segments, masks, fudge, offset, out.shape[0] // b, mean, std, out.dtype, channels_last)
    pointer, strides = out.data_ptr(), out.stride()
    assert ops.perturb_into(images, segments, masks, fudge, offset, mean, std, out) is None
    assert out.data_ptr() == pointer and out.stride() == strides
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    ref_out = torch.empty_like(out)
    perturb_into_ref(images, segments, masks, fudge, offset, mean, std, ref_out)
    torch.testing.assert_close(ref_out, expected, atol=0, rtol=0)
    public = perturb(images, segments, masks, fudge, offset, mean=mean, std=std, out=torch.empty_like(out), backend="cpp")
    torch.testing.assert_close(public, expected, atol=0, rtol=0)


def test_perturb_into_leaves_the_rest_of_the_buffer_alone_and_bumps_its_version():
    gen = torch.Generator().manual_seed(7)
    images, fudge = torch.rand(2, 3, 9, 8, generator=gen), torch.rand(2, 3, 9, 8, generator=gen)
    segments = labels(2, 9, 8, [4, 6], gen, coherent=True)
    masks = torch.rand(2, 5, 6, generator=gen) > 0.5
    buffer = torch.full((2 * 5, 3, 9, 8), -1.0).contiguous(memory_format=torch.channels_last)
    out = buffer[:6]
    before = out._version
    ops.perturb_into(images, segments, masks, fudge, 2, None, None, out)
    assert out._version > before
    torch.testing.assert_close(out, perturb_ref(images, segments, masks, fudge, 2, 3, None, None, None, True), atol=0, rtol=0)
    assert torch.all(buffer[6:] == -1.0)


# ---- lime_fit: float64 accumulation; float32 judged against the reference's own float32 error ----
def _as_float64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float64, 1e-9, 1e-7), (torch.float32, 2e-5, 0.0)])
@pytest.mark.parametrize("case", lime_fit_cases(), ids=_ids(lime_fit_cases()))
def test_lime_fit_parity(case, dtype, atol, rtol):
    name, _ = case
    args = dict(lime_fit_cases(dtype))[name]
    out = ops.lime_fit(*args)
    assert all(t.dtype == dtype for t in out)
    assert out[0].shape == (args[1].shape[0], args[1].shape[2], args[0].shape[2])
    if dtype == torch.float64:
        for got, want in zip(out, lime_fit_ref(*args)):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    else:
        exact = lime_fit_ref(*_as_float64(args))
        for got, ref32, want in zip(out, lime_fit_ref(*args), exact):
            ref_error = (ref32.double() - want).abs().max().item()
            assert (got.double() - want).abs().max().item() <= 2 * ref_error + atol
    # padded columns are exactly zero
    counts = args[2]
    for i, m_i in enumerate(counts.tolist()):
        assert torch.all(out[0][i, :, m_i:] == 0)
    masks, targets, num_segments, weights, kw, alpha = args
    public = lime_fit(masks, targets, num_segments, weights, kernel_width=kw, alpha=alpha, backend="cpp")
    for got, want in zip(public, out):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_lime_fit_singular_system_falls_back_to_least_squares():
    """alpha = 0 with a column that is always on: the Gram matrix is singular, so Cholesky fails
    and the op takes the minimum-norm least-squares solution. Only the split between that column's
    coefficient and the intercept is not identifiable; everything else must match the reference."""
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(2, 40, 4, generator=gen) > 0.5
    masks[:, :, 2] = True
    targets = torch.rand(2, 40, 2, generator=gen, dtype=torch.float64)
    args = (masks, targets, torch.tensor([4, 4]), None, 0.25, 0.0)
    coef, intercept, score, local_pred = ops.lime_fit(*args)
    ref = lime_fit_ref(*args)
    assert torch.all(coef[:, :, 2] == 0)  # minimum norm: nothing on the constant column
    keep = [0, 1, 3]
    torch.testing.assert_close(coef[:, :, keep], ref[0][:, :, keep], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(intercept, ref[1] + ref[0][:, :, 2], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(score, ref[2], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(local_pred, ref[3], atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_lime_fit_singular_system_with_sums_past_float64_is_nan(backend):
    # Weights near float64's limit times targets of 1e12 overflow the sums; with alpha = 0 and a
    # constant column the C++ solve reached LAPACK with infinities (an internal assertion).
    skip_unless_on_cpu("lime_fit", backend)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(1, 20, 3, generator=gen) > 0.5
    masks[:, :, 0] = True
    targets = torch.rand(1, 20, 2, dtype=torch.float64, generator=gen) * 1e12
    weights = torch.full((1, 20), 1e300, dtype=torch.float64)
    coef, intercept, _, local_pred = lime_fit(masks, targets, torch.tensor([3]), weights=weights, alpha=0.0, backend=backend)
    assert coef.isnan().all() and intercept.isnan().all() and local_pred.isnan().all()


def test_lime_fit_matches_the_paths_across_batch_sizes():
    """Many images (one per thread) and a single image (threads inside it) give the same fit."""
    gen = torch.Generator().manual_seed(7)
    masks = torch.rand(5, 50, 9, generator=gen) > 0.5
    targets = torch.rand(5, 50, 3, generator=gen, dtype=torch.float64)
    counts = torch.tensor([9, 4, 1, 7, 9])
    batched = ops.lime_fit(masks, targets, counts, None, 0.25, 1.0)
    for i in range(5):
        single = ops.lime_fit(masks[i : i + 1], targets[i : i + 1], counts[i : i + 1], None, 0.25, 1.0)
        for got, want in zip(single, batched):
            torch.testing.assert_close(got[0], want[i], atol=0, rtol=0)


# ---- masked_pgd_step: the reference's rounding order, so L-inf is exact; L2's norms differ in
# summation order (float64 accumulation here) ----
PGD_TOLERANCES = {
    ("linf", torch.float64): (0.0, 0.0),
    ("linf", torch.float32): (0.0, 0.0),
    ("linf", torch.bfloat16): (0.0, 0.0),
    ("linf", torch.float16): (0.0, 0.0),
    ("l2", torch.float64): (1e-12, 1e-12),
    ("l2", torch.float32): (1e-6, 1e-5),
    # the norms, summed in another order (float64 here), move a few roundings by up to 4 ulps below 1
    ("l2", torch.bfloat16): (2**-6, 0.0),
    ("l2", torch.float16): (2**-9, 0.0),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", masked_pgd_step_cases(), ids=_ids(masked_pgd_step_cases()))
def test_masked_pgd_step_parity(case, dtype):
    name, _ = case
    args = dict(masked_pgd_step_cases(dtype))[name]
    atol, rtol = PGD_TOLERANCES[(args[-1], dtype)]
    expected = masked_pgd_step_ref(*clone_args(args))
    mine = clone_args(args)
    x_before, grad_before = mine[1].clone(), mine[2].clone()
    assert ops.masked_pgd_step(*mine) is None
    torch.testing.assert_close(mine[0], expected, atol=atol, rtol=rtol)
    assert mine[0].stride() == args[0].stride()  # updated in place, layout kept
    assert torch.equal(mine[1], x_before) and torch.equal(mine[2], grad_before)
    x_adv, x, grad, weight, step, eps, lo, hi, norm = clone_args(args)
    out = masked_pgd_step(x_adv, x, grad, weight, step_size=step, eps=eps, lo=lo, hi=hi, norm=norm, backend="cpp")
    assert out is x_adv
    torch.testing.assert_close(x_adv, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-6, 3e-5, 1.0, 3e4])
def test_masked_pgd_step_half_precision_is_exact_across_magnitudes(dtype, scale):
    """L-inf in float16/bfloat16 rounds as the reference does from subnormals (float16 below
    6.1e-5) to near float16's largest value (csrc/cpu/half_float.h), with bounds that are not
    values of the dtype."""
    gen = torch.Generator().manual_seed(int(scale * 1e6) % 1000)
    x = ((torch.rand(2, 3, 9, 7, generator=gen) * 2 - 1) * scale).to(dtype)
    x_adv = (x.float() + 0.05 * scale * torch.randn(2, 3, 9, 7, generator=gen)).to(dtype)
    grad, weight = torch.randn(2, 3, 9, 7, generator=gen).to(dtype), torch.rand(2, 9, 7, generator=gen).to(dtype)
    for step, eps, lo, hi in ((0.1 * scale, 0.2 * scale, -scale, scale), (0.0123 * scale, 0.00071 * scale, -0.3 * scale, 0.77 * scale)):
        for w in (None, weight):
            mine, expected = x_adv.clone(), x_adv.clone()
            ops.masked_pgd_step(mine, x, grad, w, step, eps, lo, hi, "linf")
            masked_pgd_step_ref(expected, x, grad, w, step, eps, lo, hi, "linf")
            assert torch.equal(mine.view(torch.int16), expected.view(torch.int16))


def test_masked_pgd_step_stays_in_the_ball_and_the_range():
    x = torch.rand(2, 3, 8, 8)
    for norm, eps in (("linf", 0.05), ("l2", 0.3)):
        x_adv = x.clone()
        for _ in range(5):
            ops.masked_pgd_step(x_adv, x, torch.randn_like(x), None, 0.1, eps, 0.0, 1.0, norm)
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert torch.all(size <= eps * (1 + 1e-5)) and x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_pgd_step_weights_across_work_chunks(norm, channels_last, dtype):
    # 3 x 97 x 101 elements per sample span two of the kernel's 16 Ki-element chunks, the second
    # starting inside a pixel row (NCHW) or inside a pixel's channels (NHWC); in half precision
    # each chunk is 32 tiles of 512 elements, the last chunk's last tile a partial one.
    gen = torch.Generator().manual_seed(9)
    x_adv, x, grad, weight = step_inputs((2, 3, 97, 101), gen)
    x, x_adv, grad, weight = (t.to(dtype) for t in (x, x_adv, grad, weight))
    if channels_last:
        x_adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad))
    args = (x, grad, weight, 0.05, 0.1, 0.0, 1.0, norm)
    mine = x_adv.clone(memory_format=torch.preserve_format)
    ops.masked_pgd_step(mine, *args)
    atol, rtol = PGD_TOLERANCES[(norm, dtype)]
    torch.testing.assert_close(mine, masked_pgd_step_ref(x_adv.clone(), *args), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_pgd_step_l2_with_a_zero_ball_and_a_zero_step_is_the_clean_input(dtype):
    # eps = ‖δ‖ = 0 makes the projection 0 / 0: the step must give x, not NaN.
    x = torch.rand(2, 3, 4, 5).to(dtype)
    grad = torch.randn(2, 3, 4, 5).to(dtype)
    weight = torch.zeros(2, 4, 5, dtype=dtype)
    weight[1] = 1.0  # sample 1 moves and is projected back to x; sample 0 does not move
    for impl in (masked_pgd_step_ref, ops.masked_pgd_step):
        x_adv = x.clone()
        impl(x_adv, x, grad, weight, 0.1, 0.0, 0.0, 1.0, "l2")
        assert torch.equal(x_adv, x), impl


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_masked_pgd_step_l2_in_float16_normalizes_before_it_steps(backend):
    # A step longer than 1 times a large float16 gradient overflows (2 * 40000 > 65504) when the
    # product comes first: the reference wrote NaN there and the kernels 1 or 0. Normalized
    # first (|g| / ‖g‖ <= 1, as torchattacks' PGDL2 does) it is finite, close to float32's.
    skip_unless_on_cpu("masked_pgd_step", backend)
    expected = masked_pgd_step_ref(*l2_step_overflow_case())
    x_adv, x, grad, weight, step, eps, lo, hi, norm = l2_step_overflow_case(torch.float16)
    reference = masked_pgd_step_ref(x_adv.clone(), x, grad, weight, step, eps, lo, hi, norm)
    out = masked_pgd_step(x_adv, x, grad, weight, step_size=step, eps=eps, lo=lo, hi=hi, norm=norm, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(out, reference)


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # Triton's interpreter, rounding 1e39 to inf
def test_masked_pgd_step_takes_bounds_beyond_a_half_dtype_and_empty_batches_on_every_backend(backend):
    # A bound a float16/bfloat16 cannot hold is what the dtype rounds it to (its largest value or
    # infinity): the reference's clamp refused it, the kernels took it.
    skip_unless_on_cpu("masked_pgd_step", backend)
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.rand(2, 3, 4, 5, generator=gen).to(dtype)
        grad = torch.randn(2, 3, 4, 5, generator=gen).to(dtype)
        for norm in ("linf", "l2"):
            for step, eps, lo, hi in ((0.1, 1e5, 0.0, 1.0), (0.1, 0.2, -1e5, 1e5), (3e5, 1e39, -65510.0, 65510.0)):
                expected = masked_pgd_step_ref(x.clone(), x, grad, None, step, eps, lo, hi, norm)
                out = masked_pgd_step(x.clone(), x, grad, step_size=step, eps=eps, lo=lo, hi=hi, norm=norm, backend=backend)
                assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), (dtype, norm, step, eps, lo, hi)
    for dtype in (torch.float32, torch.float64):  # infinite bounds (float64's: the reference overflowed on 2**1024)
        x = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64).to(dtype)
        grad = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).to(dtype)
        moved = x + 0.1 * grad.sign()
        for eps, lo, hi, expected in ((0.1, -math.inf, math.inf, moved), (math.inf, 0.0, 1.0, moved.clamp(0, 1))):
            out = masked_pgd_step(x.clone(), x, grad, step_size=0.1, eps=eps, lo=lo, hi=hi, norm="linf", backend=backend)
            torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for norm in ("linf", "l2"):  # no samples: nothing to do, on every backend
        empty = torch.rand(0, 3, 4, 5)
        assert masked_pgd_step(empty.clone(), empty, empty, step_size=0.1, eps=0.2, norm=norm, backend=backend).shape == empty.shape


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_lime_fit_judges_weights_in_the_dtype_it_fits_in(backend):
    # float64 weights of 1e-50 are all 0 in float32 targets' dtype: refused, not fitted to NaN
    skip_unless_on_cpu("lime_fit", backend)
    masks = torch.ones(1, 5, 3, dtype=torch.bool)
    masks[0, 1:, 0], masks[0, 2:, 1] = False, False
    args = (masks, torch.rand(1, 5, 2), torch.tensor([3]))
    with pytest.raises(ValueError, match="positive sum"):
        lime_fit(*args, weights=torch.full((1, 5), 1e-50, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="NaN or infinite"):
        lime_fit(*args, weights=torch.full((1, 5), 1e300, dtype=torch.float64), backend=backend)


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_lime_fit_refuses_kernel_widths_that_leave_no_weight(backend):
    # A narrow kernel with no sample near the all-ones one weighs every sample 0 (scikit-learn
    # refuses such a fit; the backends raised LinAlgError, an internal assertion, or returned
    # NaN); kw² beyond the dtype's range made 0 / 0 weights or an OverflowError.
    skip_unless_on_cpu("lime_fit", backend)
    gen = torch.Generator().manual_seed(5)
    masks = torch.rand(2, 12, 4, generator=gen) > 0.5
    masks[:, :, 0] = False  # no row is all ones: every distance is >= 1 - sqrt(3/4)
    targets = torch.rand(2, 12, 3, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernel weight of 0"):
        lime_fit(masks, targets, kernel_width=1e-3, backend=backend)
    masks[1, 0] = True  # image 1 has the all-ones sample (weight 1); image 0 still has none
    with pytest.raises(ValueError, match="kernel weight of 0"):
        lime_fit(masks, targets, kernel_width=1e-3, backend=backend)
    masks[0, 3] = True
    got = lime_fit(masks, targets, kernel_width=1e-3, backend=backend)  # one sample weighs: β = 0
    for g, w in zip(got, lime_fit_ref(masks, targets, torch.tensor([4, 4]), None, 1e-3, 1.0)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    for kw, dtype in ((1e200, torch.float64), (1e-170, torch.float64), (1e-20, torch.float32), (1e20, torch.float32)):
        with pytest.raises(ValueError, match="kernel_width must lie in"):
            lime_fit(masks, targets.to(dtype), kernel_width=kw, backend=backend)


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_lime_fit_scores_float32_targets_of_any_magnitude(backend):
    # R² does not depend on the targets' scale; float32 squares of 1e-25 underflowed (score 1) and
    # of 1e25 overflowed (NaN, or 1 through a clamp)
    skip_unless_on_cpu("lime_fit", backend)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 40, 6, generator=gen) < 0.5
    masks[:, 0] = True
    base = masks.double() @ torch.randn(2, 6, 2, generator=gen, dtype=torch.float64)
    base += 0.3 * torch.randn(2, 40, 2, generator=gen, dtype=torch.float64)
    want = lime_fit(masks, base, backend=backend)
    assert 0.5 < want[2].min() < want[2].max() < 0.99
    for scale in (1e-25, 1e25):
        coef, intercept, score, local_pred = lime_fit(masks, (base * scale).float(), backend=backend)
        torch.testing.assert_close(score.double(), want[2], atol=1e-5, rtol=0)
        torch.testing.assert_close(coef.double() / scale, want[0], atol=1e-5, rtol=1e-4)


def test_masked_pgd_step_zero_weight_leaves_pixels_alone():
    x = torch.rand(1, 3, 6, 6)
    x_adv = x.clone()
    weight = torch.zeros(1, 6, 6)
    weight[0, :3] = 1.0
    ops.masked_pgd_step(x_adv, x, torch.randn_like(x), weight, 0.1, 0.1, 0.0, 1.0, "linf")
    assert torch.equal(x_adv[:, :, 3:], x[:, :, 3:]) and not torch.equal(x_adv[:, :, :3], x[:, :, :3])


def test_auto_takes_the_cpp_step_in_every_dtype():
    """The C++ step measured faster than PyTorch's in every dtype (float16/bfloat16 with its AVX2 +
    F16C loops; benchmarks/cpu_half_precision.py), and gives the reference's L-inf step exactly."""
    from attrefine_fast.ops.masked_pgd_step import resolve_step

    compiled = torch.ops.attrefine_fast.masked_pgd_step.default
    assert backends.selected("masked_pgd_step", "auto", "cpu") == "cpp"
    assert resolve_step("auto", "cpu") is compiled
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        x = torch.rand(2, 3, 5, 4).to(dtype)
        grad, x_adv = torch.randn_like(x), x.clone()
        af.ops.masked_pgd_step(x_adv, x, grad, step_size=0.1, eps=0.05)
        assert torch.equal(x_adv, masked_pgd_step_ref(x.clone(), x, grad, None, 0.1, 0.05, 0.0, 1.0, "linf"))


def test_cpu_kernels_name_their_instruction_sets():
    from attrefine_fast.info import report

    text = ops.cpu_kernels()
    assert text.startswith("lime_fit: ") and "masked_pgd_step in float16/bfloat16: " in text
    assert f"CPU kernels: {text}" in report()


def test_info_says_whether_the_extension_has_cuda_kernels():
    from attrefine_fast.info import report

    with_cuda = backends.has_compiled("lime_fit", "CUDA")
    line = next(line for line in report().splitlines() if line.startswith("compiled extension: "))
    assert line == f"compiled extension: loaded, {'CPU and CUDA kernels' if with_cuda else 'CPU kernels (built without CUDA)'}"


def test_ops_declare_that_they_are_not_differentiable():
    masks = torch.rand(1, 6, 3) > 0.5
    targets = torch.rand(1, 6, 2, requires_grad=True)
    images = torch.rand(1, 3, 4, 4, requires_grad=True)
    segments = labels(1, 4, 4, [3], torch.Generator().manual_seed(0))
    outputs = list(ops.lime_fit(masks, targets, torch.tensor([3]), None, 0.25, 1.0))
    outputs.append(ops.segment_mean(images, segments, 3))
    outputs.append(ops.perturb(images, segments, masks, images.detach(), 0, 2, None, None, None, False))
    assert not any(t.requires_grad for t in outputs)
    out = torch.empty(2, 3, 4, 4)
    ops.perturb_into(images, segments, masks, images.detach(), 0, None, None, out)
    assert not out.requires_grad


# ---- registrations: one list of samples for opcheck (schema, fake tensors, AOT dispatch) ----
OPCHECK_SAMPLES = (
    [("segment_mean", args) for _, args in segment_mean_cases()[:2]]
    + [("segment_mean", segment_mean_cases(torch.uint8)[-1][1])]
    + [("perturb", args) for _, args in perturb_cases()[2:4]]
    + [("perturb_into", args) for _, args in perturb_into_cases()[1:3]]
    + [("lime_fit", args) for _, args in lime_fit_cases()[:3]]
    + [("masked_pgd_step", args) for _, args in masked_pgd_step_cases()[::4]]
)


@pytest.mark.parametrize("op, args", OPCHECK_SAMPLES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(OPCHECK_SAMPLES)])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.attrefine_fast, op).default, clone_args(args))


# ---- bad input: a clear ValueError / TypeError from the op itself, never a crash ----
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_a_clear_error(name):
    op, make_args, error, match = BAD_CALLS[name]
    with pytest.raises(error, match=match):
        getattr(ops, op)(*make_args())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_masked_pgd_step_refuses_a_non_finite_gradient_before_writing(norm):
    x = torch.rand(1, 3, 4, 4)
    x_adv = x.clone() + 0.01
    before = x_adv.clone()
    grad = torch.randn(1, 3, 4, 4)
    grad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.masked_pgd_step(x_adv, x, grad, None, 0.1, 0.1, 0.0, 1.0, norm)
    assert torch.equal(x_adv, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_check_accepts_large_finite_values_whose_sum_overflows(dtype):
    # The finiteness check sums first (cheap) and settles a non-finite sum exactly.
    x = torch.rand(1, 3, 4, 4).to(dtype)
    grad = torch.full((1, 3, 4, 4), torch.finfo(dtype).max, dtype=dtype)
    grad[0, 1] *= -1
    grad[0, 2, 0, 0] = -grad[0, 2, 0, 0]
    assert not torch.isfinite(grad.sum())  # the sum overflows: the exact check decides
    x_adv = x.clone()
    ops.masked_pgd_step(x_adv, x, grad, None, 0.01, 0.03, 0.0, 1.0, "linf")
    torch.testing.assert_close(x_adv, masked_pgd_step_ref(x.clone(), x, grad, None, 0.01, 0.03, 0.0, 1.0, "linf"))
    grad[0, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.masked_pgd_step(x_adv, x, grad, None, 0.01, 0.03, 0.0, 1.0, "linf")


@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_pgd_step_tells_autograd_that_x_adv_changed(channels_last):
    # The kernel writes through a raw pointer; without a version bump autograd would not notice
    # that a tensor saved for backward had changed.
    x = torch.rand(2, 3, 5, 5)
    x_adv = x.clone() + 0.01
    if channels_last:
        x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    before = x_adv._version
    ops.masked_pgd_step(x_adv, x, torch.randn(2, 3, 5, 5), None, 0.1, 0.2, 0.0, 1.0, "linf")
    assert x_adv._version > before


def test_perturb_of_empty_images_is_empty_not_a_crash():
    images = torch.rand(1, 0, 4, 4)
    segments = torch.zeros(1, 4, 4, dtype=torch.long)
    masks = torch.ones(1, 3, 1, dtype=torch.bool)
    out = ops.perturb(images, segments, masks, images.clone(), 0, 3, None, None, None, False)
    assert out.shape == (3, 0, 4, 4)


# ---- CUDA kernels (csrc/cuda) against the reference, on machines with a GPU ----
needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and LOADED and backends.status("perturb", "cuda", "cuda")[0]),
    reason="needs a CUDA GPU and the extension built with CUDA",
)


def _cpu(args):
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_all_close(got, want, atol, rtol):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, atol=atol, rtol=rtol, equal_nan=True)


# float64 atomics make segment sums order-dependent in the last bits; perturb and L-inf stay exact.
CUDA_CASES = (
    [("segment_mean", dt, name, args, 1e-12, 1e-12) for dt in (torch.float64, torch.uint8) for name, args in segment_mean_cases(dt, "cuda")]
    + [("segment_mean", torch.float32, name, args, 1e-6, 1e-6) for name, args in segment_mean_cases(torch.float32, "cuda")]
    + [("perturb", dt, name, args, 0.0, 0.0) for dt in (torch.float32, torch.uint8) for name, args in perturb_cases(dt, "cuda")]
    + [("perturb_into", dt, name, args, 0.0, 0.0) for dt in (torch.float32, torch.uint8) for name, args in perturb_into_cases(dt, "cuda")]
    + [("lime_fit", torch.float64, name, args, 1e-9, 1e-7) for name, args in lime_fit_cases(torch.float64, "cuda")]
    + [("lime_fit", torch.float32, name, args, 1e-4, 1e-4) for name, args in lime_fit_cases(torch.float32, "cuda")]
    + [("masked_pgd_step", dt, name, args, *PGD_TOLERANCES[(args[-1], dt)]) for dt in (torch.float32, torch.float64) for name, args in masked_pgd_step_cases(dt, "cuda")]
) if torch.cuda.is_available() else []


@needs_cuda_kernels
@pytest.mark.parametrize("op, dtype, name, args, atol, rtol", CUDA_CASES, ids=[f"{c[0]}-{c[2]}-{str(c[1])[6:]}" for c in CUDA_CASES])
def test_cuda_parity(op, dtype, name, args, atol, rtol):
    reference = {"segment_mean": segment_mean_ref, "perturb": perturb_ref, "perturb_into": perturb_into_ref,
                 "lime_fit": lime_fit_ref, "masked_pgd_step": masked_pgd_step_ref}[op]
    mutated = {"masked_pgd_step": 0, "perturb_into": -1}.get(op)  # the in-place ops' output argument
    theirs = clone_args(_cpu(args))
    expected = reference(*theirs)
    mine = clone_args(args)
    out = getattr(ops, op)(*mine)
    if mutated is not None:
        out, expected = mine[mutated], theirs[mutated]
    _assert_all_close(out, expected, atol, rtol)


@needs_cuda_kernels
def test_cuda_lime_fit_singular_system_and_opcheck():
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(2, 40, 4, generator=gen) > 0.5
    masks[:, :, 2] = True
    targets = torch.rand(2, 40, 2, generator=gen, dtype=torch.float64)
    args = (masks, targets, torch.tensor([4, 4]), None, 0.25, 0.0)
    on_gpu = ops.lime_fit(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    _assert_all_close(on_gpu, ops.lime_fit(*args), 1e-9, 1e-7)  # re-solved by the CPU's least squares
    for op, sample in OPCHECK_SAMPLES:
        cuda_sample = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in clone_args(sample))
        torch.library.opcheck(getattr(torch.ops.attrefine_fast, op).default, cuda_sample)


@functools.lru_cache(maxsize=None)
def bad_input_outcomes(device: str) -> dict:
    """What each bad-input case raised on device, from tests/bad_input_runner.py in a subprocess:
    a case that crashes the process gets {"crashed": the end of its output}, and the others still
    run in the tests that follow it."""
    runner = Path(__file__).with_name("bad_input_runner.py")  # its folder (op_cases) is on its path
    done = subprocess.run([sys.executable, "-X", "faulthandler", str(runner), device], capture_output=True, text=True,
                          timeout=600)
    outcomes, started = {}, None
    for line in done.stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            outcomes[record["case"]] = record
            started = None
    if done.returncode != 0:
        outcomes[started or "(before any case)"] = {"crashed": f"exit status {done.returncode}\n{done.stderr[-3000:]}"}
    return outcomes


def _check_bad_input_outcome(device, name):
    _, _, error, match = BAD_CALLS[name]
    outcomes = bad_input_outcomes(device)
    crashed = [case for case, outcome in outcomes.items() if "crashed" in outcome]
    outcome = outcomes.get(name) or {"crashed": f"never ran: the process ended at {crashed}"}
    assert "crashed" not in outcome, outcome["crashed"]
    assert outcome["raised"] == error.__name__, outcome
    assert re.search(match, outcome["message"]), outcome


@pytest.mark.parametrize("name", ["segment_mean id >= M", "lime_fit counts"])
def test_bad_input_cases_run_in_a_separate_process(name):
    # the runner behind the CUDA cases below, on the CPU
    _check_bad_input_outcome("cpu", name)


@needs_cuda_kernels
@pytest.mark.parametrize("name", [n for n in BAD_CALLS if "overlaps" not in n])  # overlap needs one storage
def test_cuda_bad_input_raises_the_cpu_error(name):
    _check_bad_input_outcome("cuda", name)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_perturb_runs_of_16_bytes_and_single_elements(dtype, channels_last):
    # 16x16x3 images: every sample is a whole number of 16-byte runs (the vectorized path); the
    # same images one element into their storage are not 16-byte aligned (the element path).
    # 13 samples from offset 3 span two groups of samples per thread, the second one partial.
    gen = torch.Generator().manual_seed(8)
    b, n, m = 3, 20, 7
    seg = labels(b, 16, 16, [m, 4, 6], gen)
    masks = torch.rand(b, n, m, generator=gen) > 0.5
    storage = torch.randint(0, 256, (b * 3 * 16 * 16 * 2 + 1,), generator=gen).to(dtype)
    for start in (0, 1):
        images = storage[start : start + b * 768].view(b, 3, 16, 16)
        fudge = storage[start + b * 768 : start + 2 * b * 768].view(b, 3, 16, 16)
        for segments in (seg, seg.int()):
            args = (images, segments, masks, fudge, 3, 13, None, None, None, channels_last)
            want = perturb_ref(*args)
            got = ops.perturb(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
            assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            torch.testing.assert_close(got.cpu(), want, atol=0, rtol=0)


@needs_cuda_kernels
def test_cuda_lime_fit_at_the_explanation_size():
    # N = 1000, M = 64, 5 labels: the shared-memory path at its usual size, several images.
    gen = torch.Generator().manual_seed(9)
    masks = torch.rand(3, 1000, 64, generator=gen) > 0.5
    targets = torch.rand(3, 1000, 5, generator=gen, dtype=torch.float64)
    counts = torch.tensor([64, 63, 34])
    args = (masks, targets, counts, None, 0.25, 1.0)
    got = ops.lime_fit(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    _assert_all_close(got, lime_fit_ref(*args), 1e-9, 1e-7)


@needs_cuda_kernels
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("where", ["grad", "grad_under_zero_weight", "x"])
def test_cuda_masked_pgd_step_refuses_non_finite_input_before_writing(norm, where):
    gen = torch.Generator().manual_seed(10)
    x = torch.rand(3, 3, 8, 8, generator=gen).cuda()
    x_adv = (x + 0.01).clamp(0, 1)
    grad = torch.randn(3, 3, 8, 8, generator=gen).cuda()
    weight = torch.ones(3, 8, 8, device="cuda")
    if where == "x":
        if norm == "linf":
            pytest.skip("L-inf has no norm of x_adv - x to check (as on the CPU)")
        x[2, 1, 3, 3] = float("inf")
    else:
        grad[1, 2, 4, 5] = float("nan")
        if where == "grad_under_zero_weight":
            weight[1, 4, 5] = 0.0
    before = x_adv.clone()
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.masked_pgd_step(x_adv, x, grad, weight, 0.1, 0.1, 0.0, 1.0, norm)
    assert torch.equal(x_adv, before)
    if where != "x":  # the same call on the CPU is refused alike
        with pytest.raises(ValueError, match="NaN or infinite"):
            ops.masked_pgd_step(x_adv.cpu(), x.cpu(), grad.cpu(), weight.cpu(), 0.1, 0.1, 0.0, 1.0, norm)


@needs_cuda_kernels
def test_cuda_masked_pgd_step_accepts_large_finite_gradients():
    x = torch.rand(2, 3, 4, 4, device="cuda")
    grad = torch.full((2, 3, 4, 4), torch.finfo(torch.float32).max, device="cuda")
    grad[:, 1] *= -1
    x_adv = x.clone()
    ops.masked_pgd_step(x_adv, x, grad, None, 0.01, 0.03, 0.0, 1.0, "linf")
    want = masked_pgd_step_ref(x.cpu(), x.cpu(), grad.cpu(), None, 0.01, 0.03, 0.0, 1.0, "linf")
    torch.testing.assert_close(x_adv.cpu(), want, atol=0, rtol=0)


# ---- end to end: the explanation does not depend on the backend ----
def test_explain_cpp_equals_torch():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=5, width=8)
    gen = torch.Generator().manual_seed(8)
    images = torch.rand(2, 3, 24, 24, generator=gen)
    segments, _ = af.segment(images, "grid", n_segments=9)
    segments[1] = torch.div(segments[1], 2, rounding_mode="floor")
    kwargs = dict(segments=segments, num_samples=96, top_labels=3, seed=3, batch_size=40,
                  mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.25])
    cpp = af.explain(model, images, backend="cpp", **kwargs)
    ref = af.explain(model, images, backend="torch", **kwargs)
    assert torch.equal(cpp.labels, ref.labels)
    for field in ("coef", "intercept", "score", "local_pred"):
        torch.testing.assert_close(getattr(cpp, field), getattr(ref, field), atol=1e-10, rtol=1e-8)
