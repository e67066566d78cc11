"""The CUDA kernels' logic, run on the CPU by the SIMT emulator (tests/simt).

The kernels in csrc/cuda compile with the host compiler against tests/simt/simt.h, which runs the
threads of a block as fibers with real barriers and warp shuffles. These tests call the launchers
the way the CUDA glue (csrc/cuda/ops_cuda.cpp) does and compare with the pure-PyTorch reference:
they catch index, barrier and shared-memory-size mistakes where no GPU exists. They say nothing
of data races, the memory model or speed, which only the GPU runs check (benchmarks/gpu_check.sh).
"""
import ctypes

import pytest
import torch

from attrefine_fast.ops.lime_fit import lime_fit_ref
from op_cases import lime_fit_cases
import simt_build

pytestmark = pytest.mark.skipif(simt_build.compiler() is None, reason="needs a C++ compiler")

ELEM = {torch.float32: 3, torch.float64: 4}  # cuda::Elem
CANARY = -7.25  # fills the slack after the scratch area


@pytest.fixture(scope="module")
def simt(tmp_path_factory):
    lib = simt_build.build(tmp_path_factory.mktemp("simt"))
    lib.simt_error.restype = ctypes.c_char_p
    lib.simt_lime_fit_scratch_doubles.restype = ctypes.c_int64
    lib.simt_lime_fit_scratch_doubles.argtypes = [ctypes.c_int64] * 4
    lib.simt_lime_fit.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_double] * 2 + [ctypes.c_void_p] * 6
    lib.simt_set_optin_shared_bytes.argtypes = [ctypes.c_int64]
    lib.simt_set_schedule.argtypes = [ctypes.c_int]
    return lib


# Fibers in thread order, in reverse, and shuffled: a missing barrier makes results depend on it.
SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 17}


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def emulated_lime_fit(lib, masks, targets, num_segments, weights, kernel_width, alpha, schedule="shuffled"):
    """lime_fit through the emulated kernel, as the CUDA glue calls it; also returns the status."""
    lib.simt_set_schedule(SCHEDULES[schedule])
    b, n, m = masks.shape
    nl = targets.shape[2]
    msk, tgt, segs = masks.contiguous(), targets.contiguous(), num_segments.contiguous()
    wts = None if weights is None else weights.contiguous()
    outs = [torch.full(shape, float("nan"), dtype=targets.dtype) for shape in ((b, nl, m), (b, nl), (b, nl), (b, nl))]
    status = torch.full((b,), -1, dtype=torch.int32)
    size = lib.simt_lime_fit_scratch_doubles(b, n, m, nl)
    scratch = torch.full((size + 64,), CANARY, dtype=torch.float64)
    rc = lib.simt_lime_fit(_ptr(msk), _ptr(tgt), _ptr(wts), _ptr(segs), ELEM[targets.dtype], b, n, m, nl, kernel_width,
                           alpha, *(_ptr(o) for o in outs), _ptr(status), _ptr(scratch))
    assert rc == 0, lib.simt_error().decode()
    assert torch.all(scratch[size:] == CANARY), "the kernel wrote past its scratch area"
    return tuple(outs), status


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


@pytest.mark.parametrize("optin_kib, schedule", [(48, "reverse"), (227, "shuffled")])
def test_emulated_lime_fit_at_the_explanation_size(simt, optin_kib, schedule):
    # N = 1000, M = 64, 5 labels on devices with and without more than 48 KiB of shared memory.
    simt.simt_set_optin_shared_bytes(optin_kib * 1024)
    try:
        gen = torch.Generator().manual_seed(9)
        masks = torch.rand(2, 1000, 64, generator=gen) > 0.5
        targets = torch.rand(2, 1000, 5, generator=gen, dtype=torch.float64)
        args = (masks, targets, torch.tensor([64, 34]), None, 0.25, 1.0)
        got, status = emulated_lime_fit(simt, *args, schedule=schedule)
    finally:
        simt.simt_set_optin_shared_bytes(227 * 1024)
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
    simt.simt_set_optin_shared_bytes(optin_kib * 1024)
    try:
        want_scratch = system_in_scratch * _system_doubles(m, nl) + samples_in_scratch * _samples_doubles(n, m)
        assert simt.simt_lime_fit_scratch_doubles(2, n, m, nl) == 2 * want_scratch
        gen = torch.Generator().manual_seed(10)
        masks = torch.rand(2, n, m, generator=gen) > 0.3
        targets = torch.rand(2, n, nl, generator=gen, dtype=torch.float64)
        weights = torch.rand(2, n, generator=gen, dtype=torch.float64)
        args = (masks, targets, torch.tensor([m, m - 3]), weights, 0.25, 1.0)
        got, status = emulated_lime_fit(simt, *args)
    finally:
        simt.simt_set_optin_shared_bytes(227 * 1024)
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
