"""The CUDA kernels' logic, run on the CPU by the SIMT emulator (tests/simt).

The kernels in csrc/cuda compile with the host compiler against tests/simt/simt.h, which runs the
threads of a block as fibers with real barriers and warp shuffles. These tests call the launchers
the way the CUDA glue (csrc/cuda/ops_cuda.cpp) does and compare with the pure-PyTorch reference:
they catch index, barrier and shared-memory-size mistakes where no GPU exists. They say nothing
of data races, the memory model or speed, which only the GPU runs check (benchmarks/gpu_check.sh).
"""
import contextlib
import ctypes

import pytest
import torch

from attrefine_fast.ops.lime_fit import lime_fit_ref
from attrefine_fast.ops.masked_pgd_step import masked_pgd_step_ref
from attrefine_fast.ops.perturb import perturb_output_dtype, perturb_ref
from attrefine_fast.ops.segment_mean import segment_mean_ref
from op_cases import (
    clone_args, l2_step_overflow_case, labels, lime_fit_cases, masked_pgd_step_cases, perturb_cases, segment_mean_cases,
    step_inputs,
)
import simt_build

pytestmark = pytest.mark.skipif(simt_build.compiler() is None, reason="needs a C++ compiler")

ELEM = {torch.uint8: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}  # cuda::Elem
# fills the scratch area and the slack after it: a read of scratch the kernel did not write first
# turns the result NaN (no product with 0 hides it), a write past the area shows
CANARY = float("nan")


@pytest.fixture(scope="module")
def simt(tmp_path_factory):
    lib = simt_build.build(tmp_path_factory.mktemp("simt"))
    i64, dbl, ptr, cint = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    lib.simt_error.restype = ctypes.c_char_p
    lib.simt_set_optin_shared_bytes.argtypes = [i64]
    lib.simt_set_max_grid_y.argtypes = [i64]
    lib.simt_set_schedule.argtypes = [cint]
    lib.simt_lime_fit_scratch_doubles.restype = i64
    lib.simt_lime_fit_scratch_doubles.argtypes = [i64] * 4
    lib.simt_lime_fit.argtypes = [ptr] * 4 + [cint] + [i64] * 4 + [dbl] * 2 + [ptr] * 6
    lib.simt_segment_sums.argtypes = [ptr, cint, ptr] + [i64] * 4 + [ptr] * 2
    lib.simt_perturb_select.argtypes = [ptr, ptr, ptr, cint, ptr, ptr] + [i64] * 8 + [cint, ptr]
    lib.simt_masked_pgd_step.argtypes = [ptr] * 4 + [cint] + [i64] * 3 + [cint] + [dbl] * 4 + [cint, ptr, ptr]
    for kind in ("half", "bfloat16"):
        getattr(lib, f"simt_float_to_{kind}").restype = ctypes.c_uint16
        getattr(lib, f"simt_float_to_{kind}").argtypes = [ctypes.c_float]
        getattr(lib, f"simt_{kind}_to_float").restype = ctypes.c_float
        getattr(lib, f"simt_{kind}_to_float").argtypes = [ctypes.c_uint16]
    return lib


# Fibers in thread order, in reverse, and shuffled: a missing barrier makes results depend on it.
SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 17}


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def emulated_lime_fit(lib, masks, targets, num_segments, weights, kernel_width, alpha, schedule="shuffled"):
    """lime_fit through the emulated kernel, as the CUDA glue calls it; also returns the status."""
    b, n, m = masks.shape
    nl = targets.shape[2]
    msk, tgt, segs = masks.contiguous(), targets.contiguous(), num_segments.contiguous()
    wts = None if weights is None else weights.contiguous()
    outs = [torch.full(shape, float("nan"), dtype=targets.dtype) for shape in ((b, nl, m), (b, nl), (b, nl), (b, nl))]
    status = torch.full((b,), -1, dtype=torch.int32)
    size = lib.simt_lime_fit_scratch_doubles(b, n, m, nl)
    scratch = torch.full((size + 64,), CANARY, dtype=torch.float64)
    _run(lib, lib.simt_lime_fit, _ptr(msk), _ptr(tgt), _ptr(wts), _ptr(segs), ELEM[targets.dtype], b, n, m, nl,
         kernel_width, alpha, *(_ptr(o) for o in outs), _ptr(status), _ptr(scratch), schedule=schedule)
    assert torch.all(scratch[size:].isnan()), "the kernel wrote past its scratch area"
    return tuple(outs), status


@contextlib.contextmanager
def optin_shared(lib, kib):
    """The emulated device allows kib KiB of shared memory per block (sm_90's 227 otherwise)."""
    lib.simt_set_optin_shared_bytes(kib * 1024)
    try:
        yield
    finally:
        lib.simt_set_optin_shared_bytes(227 * 1024)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float64, 1e-9, 1e-7), (torch.float32, 1e-4, 1e-4)])
@pytest.mark.parametrize("name", [name for name, _ in lime_fit_cases()])
def test_emulated_lime_fit_matches_the_reference(simt, name, dtype, atol, rtol, schedule):
    args = dict(lime_fit_cases(dtype))[name]
    if args[0].shape[2] > 64:  # the global-memory path: fewer samples keep the emulation quick
        args = (args[0][:, :40], args[1][:, :40], *args[2:4], *args[4:])
    got, status = emulated_lime_fit(simt, *args, schedule=schedule)
    assert torch.all(status == 0)
    for g, w in zip(got, lime_fit_ref(*args)):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@contextlib.contextmanager
def max_grid_rows(lib, rows):
    """The emulated device allows rows blocks on the grid's y axis (65,535 otherwise)."""
    lib.simt_set_max_grid_y(rows)
    try:
        yield
    finally:
        lib.simt_set_max_grid_y(65535)


@pytest.mark.parametrize("optin_kib, schedule", [(48, "reverse"), (227, "shuffled")])
def test_emulated_lime_fit_at_the_explanation_size(simt, optin_kib, schedule):
    # N = 1000, M = 64, 5 labels on devices with and without more than 48 KiB of shared memory.
    gen = torch.Generator().manual_seed(9)
    masks = torch.rand(2, 1000, 64, generator=gen) > 0.5
    targets = torch.rand(2, 1000, 5, generator=gen, dtype=torch.float64)
    args = (masks, targets, torch.tensor([64, 34]), None, 0.25, 1.0)
    with optin_shared(simt, optin_kib):
        got, status = emulated_lime_fit(simt, *args, schedule=schedule)
    assert torch.all(status == 0)
    for g, w in zip(got, lime_fit_ref(*args)):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7)


def _system_doubles(m, nl):
    return m * (m + 1) + m * nl


def _samples_doubles(n, m):
    return n + (n * ((m + 31) // 32) + 1) // 2


# (N, M, L, opt-in limit in KiB, the system in scratch, the samples in scratch): each layout of
# lime_fit.cu's working set between shared memory and the scratch area.
LAYOUTS = [
    (300, 40, 3, 227, False, False),
    (1000, 64, 5, 48, True, False),
    (6000, 16, 2, 48, False, True),
    (3000, 100, 2, 48, True, True),
]


@pytest.mark.parametrize("n, m, nl, optin_kib, system_in_scratch, samples_in_scratch", LAYOUTS)
def test_emulated_lime_fit_in_every_layout(simt, n, m, nl, optin_kib, system_in_scratch, samples_in_scratch):
    gen = torch.Generator().manual_seed(10)
    masks = torch.rand(2, n, m, generator=gen) > 0.3
    targets = torch.rand(2, n, nl, generator=gen, dtype=torch.float64)
    weights = torch.rand(2, n, generator=gen, dtype=torch.float64)
    args = (masks, targets, torch.tensor([m, m - 3]), weights, 0.25, 1.0)
    want_scratch = system_in_scratch * _system_doubles(m, nl) + samples_in_scratch * _samples_doubles(n, m)
    with optin_shared(simt, optin_kib):
        assert simt.simt_lime_fit_scratch_doubles(2, n, m, nl) == 2 * want_scratch
        got, status = emulated_lime_fit(simt, *args)
    assert torch.all(status == 0)
    for g, w in zip(got, lime_fit_ref(*args)):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7)


def test_emulated_lime_fit_reads_unaligned_masks_byte_by_byte(simt):
    # M = 64 packs 16 bytes at a time from aligned masks; the same masks one byte into their
    # storage take the byte path. Both must give the same bits, so the same fit to the last bit.
    gen = torch.Generator().manual_seed(11)
    masks = torch.rand(2, 50, 64, generator=gen) > 0.5
    storage = torch.zeros(masks.numel() + 1, dtype=torch.bool)
    unaligned = storage[1:].view(masks.shape)
    unaligned.copy_(masks)
    targets = torch.rand(2, 50, 3, generator=gen, dtype=torch.float64)
    counts = torch.tensor([64, 40])
    aligned_fit, _ = emulated_lime_fit(simt, masks, targets, counts, None, 0.25, 1.0)
    unaligned_fit, _ = emulated_lime_fit(simt, unaligned, targets, counts, None, 0.25, 1.0)
    for a, u in zip(aligned_fit, unaligned_fit):
        torch.testing.assert_close(u, a, atol=0, rtol=0)
    for g, w in zip(aligned_fit, lime_fit_ref(masks, targets, counts, None, 0.25, 1.0)):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_emulated_lime_fit_on_random_shapes(simt, seed):
    # Sizes around the kernel's boundaries: 4-column blocks, 32-segment mask words, more labels
    # than warps (8) and than the R² pass carries at once (8), padded segment columns.
    gen = torch.Generator().manual_seed(100 + seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))
    b, n, m, nl = pick(1, 3), pick(1, 200), pick(1, 100), pick(1, 12)
    counts = torch.randint(1, m + 1, (b,), generator=gen)
    counts[0] = m
    masks = torch.rand(b, n, m, generator=gen) > torch.rand(1, generator=gen).item()
    targets = torch.randn(b, n, nl, generator=gen, dtype=torch.float64)
    weights = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.01 if seed % 2 else None
    args = (masks, targets, counts, weights, 0.25 + seed / 4, 0.5 + seed)
    got, status = emulated_lime_fit(simt, *args)
    assert torch.all(status == 0), (b, n, m, nl)
    for g, w in zip(got, lime_fit_ref(*args)):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7, msg=lambda text: f"{(b, n, m, nl)}: {text}")


def test_emulated_lime_fit_flags_counts_out_of_range_and_fits_the_others(simt):
    # No host round trip before the launch: the kernel checks the counts (status bit 2) and the
    # glue raises from the status it reads after it.
    gen = torch.Generator().manual_seed(13)
    masks = torch.rand(3, 30, 6, generator=gen) > 0.5
    targets = torch.rand(3, 30, 2, generator=gen, dtype=torch.float64)
    got, status = emulated_lime_fit(simt, masks, targets, torch.tensor([0, 6, 7]), None, 0.25, 1.0)
    assert status.tolist() == [4, 0, 4]
    assert torch.all(torch.isnan(got[0][0])) and torch.all(torch.isnan(got[0][2]))
    ref = lime_fit_ref(masks[1:2], targets[1:2], torch.tensor([6]), None, 0.25, 1.0)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g[1:2], w, atol=1e-9, rtol=1e-7)


def test_emulated_lime_fit_flags_singular_systems_and_bad_targets(simt):
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(3, 40, 4, generator=gen) > 0.5
    masks[0, :, 2] = True  # a constant column: singular with alpha = 0
    targets = torch.rand(3, 40, 2, generator=gen, dtype=torch.float64)
    targets[2, 5, 1] = float("inf")
    got, status = emulated_lime_fit(simt, masks, targets, torch.tensor([4, 4, 4]), None, 0.25, 0.0)
    assert status[0].item() & 1 and status[1].item() == 0 and status[2].item() & 2
    assert torch.all(torch.isnan(got[0][0]))
    ref = lime_fit_ref(masks[1:2], targets[1:2], torch.tensor([4]), None, 0.25, 0.0)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g[1:2], w, atol=1e-9, rtol=1e-7)


# ---- segment_mean, perturb and masked_pgd_step, through the glue's steps in ops_cuda.cpp ----
def _run(lib, fn, *args, schedule="shuffled"):
    lib.simt_set_schedule(SCHEDULES[schedule])
    assert fn(*args) == 0, lib.simt_error().decode()


def emulated_segment_mean(lib, images, segments, num_segments, schedule="shuffled"):
    b, c, h, w = images.shape
    img, seg = images.contiguous(), segments.to(torch.int32).contiguous()
    sums = torch.zeros(b, c, num_segments, dtype=torch.float64)
    counts = torch.zeros(b, num_segments, dtype=torch.float64)
    _run(lib, lib.simt_segment_sums, _ptr(img), ELEM[img.dtype], _ptr(seg), b, c, h * w, num_segments, _ptr(sums),
         _ptr(counts), schedule=schedule)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    return means.transpose(1, 2).contiguous().to(images.dtype if images.is_floating_point() else torch.float64)


def _prepared(src, mean, std, dtype):
    """The CUDA glue's perturb_source: normalized and cast once per image, NCHW whatever the
    output's layout."""
    v = src
    if mean is not None:
        compute = torch.float64 if src.dtype == torch.float64 else torch.float32
        c = src.shape[1]
        v = (v.to(compute) - mean.to(compute).view(1, c, 1, 1)) / std.to(compute).view(1, c, 1, 1)
    return v.to(dtype).contiguous()


def emulated_perturb(lib, images, segments, masks, fudge, offset, count, mean, std, out_dtype, channels_last,
                     schedule="shuffled", int32_ids=False, out=None):
    """perturb through the emulated kernels, into out where given; also returns the flag they set
    (1: a segment id is out of range, and nothing was written)."""
    b, c, h, w = images.shape
    dtype = perturb_output_dtype(images.dtype, mean is not None, out_dtype)
    if out is None:
        out = torch.empty((b * count, c, h, w), dtype=dtype,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    kept, replaced = (_prepared(t, mean, std, dtype) for t in (images, fudge))
    seg = (segments.int() if int32_ids else segments).contiguous()
    msk = masks.contiguous()
    flag = torch.zeros(1, dtype=torch.int32)
    _run(lib, lib.simt_perturb_select, _ptr(kept), _ptr(replaced), _ptr(seg), int(seg.dtype == torch.int64), _ptr(msk),
         _ptr(out), out.element_size(), b, masks.shape[1], masks.shape[2], c, h * w, offset, count, int(channels_last),
         _ptr(flag), schedule=schedule)
    return out, flag.item()


def emulated_masked_pgd_step(lib, x_adv, x, grad, weight, step_size, eps, lo, hi, norm, schedule="shuffled"):
    """Updates x_adv in place; returns the flag the kernels set (non-zero: nothing was written)."""
    b, c, h, w = x_adv.shape
    channels_last = not x_adv.is_contiguous() and x_adv.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    work = x_adv if x_adv.is_contiguous(memory_format=fmt) else x_adv.contiguous(memory_format=fmt)
    xc, gc = x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)
    wt = None if weight is None else weight.contiguous()
    flag = torch.zeros(1, dtype=torch.int32)
    sums = torch.zeros(3 * b, dtype=torch.float64)
    _run(lib, lib.simt_masked_pgd_step, _ptr(work), _ptr(xc), _ptr(gc), _ptr(wt), ELEM[x_adv.dtype], b, c, h * w,
         int(channels_last), step_size, eps, lo, hi, int(norm == "linf"), _ptr(sums), _ptr(flag), schedule=schedule)
    if work is not x_adv:
        x_adv.copy_(work)
    return flag.item()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.uint8, 1e-12), (torch.float32, 1e-6),
                                        (torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
@pytest.mark.parametrize("name", [name for name, _ in segment_mean_cases()])
def test_emulated_segment_mean_matches_the_reference(simt, name, dtype, tol):
    args = dict(segment_mean_cases(dtype))[name]
    got = emulated_segment_mean(simt, *args)
    torch.testing.assert_close(got, segment_mean_ref(*args), atol=tol, rtol=tol)


@pytest.mark.parametrize("m", [10, 2000])  # (C + 1) M bins in shared memory, and too many for it
def test_emulated_segment_mean_over_several_blocks(simt, m):
    gen = torch.Generator().manual_seed(12)
    images = torch.rand(2, 3, 50, 41, generator=gen, dtype=torch.float64)  # 2050 pixels: 3 blocks
    segments = labels(2, 50, 41, [m, m // 2], gen)
    got = emulated_segment_mean(simt, images, segments, m)
    torch.testing.assert_close(got, segment_mean_ref(images, segments, m), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("int32_ids", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", [name for name, _ in perturb_cases()])
def test_emulated_perturb_matches_the_reference(simt, name, dtype, int32_ids):
    args = dict(perturb_cases(dtype))[name]
    got, flag = emulated_perturb(simt, *args, int32_ids=int32_ids)
    assert flag == 0
    torch.testing.assert_close(got, perturb_ref(*args), atol=0, rtol=0)


@pytest.mark.parametrize("bad_id", [-1, 5])
@pytest.mark.parametrize("int32_ids", [False, True])
def test_emulated_perturb_writes_nothing_for_a_segment_id_out_of_range(simt, bad_id, int32_ids):
    gen = torch.Generator().manual_seed(16)
    images, fudge = torch.rand(2, 3, 9, 7, generator=gen), torch.rand(2, 3, 9, 7, generator=gen)
    segments = labels(2, 9, 7, [5, 4], gen)
    segments[1, 8, 6] = bad_id
    masks = torch.rand(2, 4, 5, generator=gen) > 0.5
    out = torch.full((2 * 3, 3, 9, 7), -3.0)
    _, flag = emulated_perturb(simt, images, segments, masks, fudge, 1, 3, None, None, None, False, int32_ids=int32_ids,
                               out=out)
    assert flag == 1
    assert torch.all(out == -3.0)


def test_emulated_perturb_in_runs_of_16_bytes_and_unaligned(simt):
    # 16x16x3 images: whole 16-byte runs; the same one element into their storage: the element path.
    gen = torch.Generator().manual_seed(8)
    b, n, m = 3, 20, 7
    seg = labels(b, 16, 16, [m, 4, 6], gen)
    masks = torch.rand(b, n, m, generator=gen) > 0.5
    storage = torch.randint(0, 256, (b * 768 * 2 + 1,), generator=gen).to(torch.float32)
    for start in (0, 1):
        images = storage[start : start + b * 768].view(b, 3, 16, 16)
        fudge = storage[start + b * 768 : start + 2 * b * 768].view(b, 3, 16, 16)
        for channels_last in (False, True):
            args = (images, seg, masks, fudge, 3, 13, None, None, None, channels_last)
            torch.testing.assert_close(emulated_perturb(simt, *args)[0], perturb_ref(*args), atol=0, rtol=0)


# L-inf rounds every intermediate as the reference does, so it is exact in every dtype here (the
# compiled-op tests allow bfloat16 an ulp); L2's norms are summed in another order: as test_compiled_ops.py
# for float64, float32 and bfloat16, and one float16 ulp at 1.0.
PGD_TOLERANCES = {
    ("linf", torch.float64): (0.0, 0.0), ("linf", torch.float32): (0.0, 0.0),
    ("linf", torch.bfloat16): (0.0, 0.0), ("linf", torch.float16): (0.0, 0.0),
    ("l2", torch.float64): (1e-12, 1e-12), ("l2", torch.float32): (1e-6, 1e-5),
    ("l2", torch.bfloat16): (2**-6, 0.0), ("l2", torch.float16): (2**-9, 0.0),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [name for name, _ in masked_pgd_step_cases()])
def test_emulated_masked_pgd_step_matches_the_reference(simt, name, dtype):
    args = dict(masked_pgd_step_cases(dtype))[name]
    atol, rtol = PGD_TOLERANCES[(args[-1], dtype)]
    expected = masked_pgd_step_ref(*clone_args(args))
    mine = clone_args(args)
    assert emulated_masked_pgd_step(simt, *mine) == 0
    torch.testing.assert_close(mine[0], expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_emulated_masked_pgd_step_l2_on_large_samples(simt, dtype, channels_last):
    # 3 x 110 x 110 = 36300 elements a sample: the sums kernel takes 16 per thread (9 blocks, the
    # last one partial) rather than 4
    gen = torch.Generator().manual_seed(15)
    x_adv, x, grad, weight = (t.to(dtype) for t in step_inputs((2, 3, 110, 110), gen))
    if channels_last:
        x_adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad))
    args = (x_adv, x, grad, weight, 0.5, 0.4, 0.0, 1.0, "l2")
    expected = masked_pgd_step_ref(*clone_args(args))
    mine = clone_args(args)
    assert emulated_masked_pgd_step(simt, *mine) == 0
    torch.testing.assert_close(mine[0], expected, atol=PGD_TOLERANCES[("l2", dtype)][0], rtol=PGD_TOLERANCES[("l2", dtype)][1])


def test_emulated_masked_pgd_step_l2_in_float16_normalizes_before_it_steps(simt):
    # 2 * 40000 overflows float16: the gradient is normalized first (test_compiled_ops has the
    # same case on the other backends).
    args = l2_step_overflow_case(torch.float16)
    expected = masked_pgd_step_ref(*clone_args(args))
    mine = clone_args(args)
    assert emulated_masked_pgd_step(simt, *mine) == 0
    assert torch.isfinite(mine[0]).all()
    torch.testing.assert_close(mine[0], expected, atol=PGD_TOLERANCES[("l2", torch.float16)][0], rtol=PGD_TOLERANCES[("l2", torch.float16)][1])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_emulated_masked_pgd_step_writes_nothing_for_a_non_finite_gradient(simt, norm):
    args = clone_args(dict(masked_pgd_step_cases(torch.float32))[f"{norm}-prime"])
    args[2][1, 2, 3, 4] = float("nan")
    before = args[0].clone()
    assert emulated_masked_pgd_step(simt, *args) != 0
    assert torch.equal(args[0], before)


# Images (or perturb's tasks) on the grid's y axis beyond its limit: a device limit of 2 rows runs
# the kernels' loops over them with 5 images, as 65,536 images would on a GPU.
@pytest.mark.parametrize("m", [10, 2000])
def test_emulated_segment_mean_loops_over_more_images_than_grid_rows(simt, m):
    gen = torch.Generator().manual_seed(21)
    images = torch.rand(5, 3, 50, 41, generator=gen, dtype=torch.float64)  # 2050 pixels: 3 blocks
    segments = labels(5, 50, 41, [m, 1, m // 2, 7, m], gen)
    with max_grid_rows(simt, 2):
        got = emulated_segment_mean(simt, images, segments, m)
    torch.testing.assert_close(got, segment_mean_ref(images, segments, m), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_emulated_perturb_loops_over_more_tasks_than_grid_rows(simt, channels_last):
    gen = torch.Generator().manual_seed(22)
    images, fudge = torch.rand(5, 3, 7, 5, generator=gen), torch.rand(5, 3, 7, 5, generator=gen)
    segments = labels(5, 7, 5, [4, 1, 3, 4, 2], gen)
    masks = torch.rand(5, 11, 4, generator=gen) > 0.5
    args = (images, segments, masks, fudge, 2, 9, None, None, None, channels_last)
    with max_grid_rows(simt, 2):
        got, flag = emulated_perturb(simt, *args)
    assert flag == 0
    torch.testing.assert_close(got, perturb_ref(*args), atol=0, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("weighted", [False, True])
def test_emulated_masked_pgd_step_loops_over_more_images_than_grid_rows(simt, norm, weighted):
    gen = torch.Generator().manual_seed(23)
    x_adv, x, grad, weight = step_inputs((5, 3, 6, 7), gen, weighted)
    args = (x_adv, x, grad, weight, 0.1, 0.3, 0.0, 1.0, norm)
    expected = masked_pgd_step_ref(*clone_args(args))
    mine = clone_args(args)
    with max_grid_rows(simt, 2):
        assert emulated_masked_pgd_step(simt, *mine) == 0
    torch.testing.assert_close(mine[0], expected, atol=1e-12, rtol=1e-12)


# ---- the emulator's own float16 / bfloat16 conversions, against torch's ----
def _floats_to_round(dtype):
    """Every value of dtype, the midpoints between neighbours (ties), values just off them, and
    floats spread over every exponent, both signs (float32, as the kernels convert)."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    finite = every[torch.isfinite(every)].unique()
    mids = (finite[:-1].double() + finite[1:].double()) / 2
    mids = mids[mids.float().double() == mids].float()  # the ties float32 can hold
    near = torch.cat([torch.nextafter(mids, torch.tensor(float("inf"))), torch.nextafter(mids, torch.tensor(float("-inf")))])
    gen = torch.Generator().manual_seed(14)
    spread = torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-30, 20, (20000,), generator=gen).float())
    return torch.cat([finite, mids, near, spread, torch.tensor([65504.0, 65519.99, 65520.0, 1e6, float("inf"), float("-inf")])])


@pytest.mark.parametrize("dtype, kind", [(torch.float16, "half"), (torch.bfloat16, "bfloat16")])
def test_emulated_half_precision_conversions_match_torch(simt, dtype, kind):
    # torch.compile on torch 2.4 (not 2.6) loads kernels built with -ffast-math, which turns on flush-to-zero
    # for the whole process: the float32 subnormals below need the IEEE default back.
    torch.set_flush_denormal(False)
    to_float, to_half = getattr(simt, f"simt_{kind}_to_float"), getattr(simt, f"simt_float_to_{kind}")
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    want = patterns.view(dtype).float()
    got = torch.tensor([to_float(int(p) & 0xFFFF) for p in patterns.tolist()])
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])
    values = _floats_to_round(dtype)
    got = torch.tensor([to_half(v) for v in values.tolist()], dtype=torch.int32)
    want = values.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(got, want), values[got != want][:5]
    assert to_half(float("nan")) & 0x7FFF > (0x7C00 if kind == "half" else 0x7F80)  # NaN stays NaN
