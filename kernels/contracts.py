"""The argument contract of each op (csrc/op_args.h) for the Triton ops.

A direct ``torch.ops.attrefine_fast.<op>_triton`` call with bad input raises the ValueError /
TypeError the compiled ops raise (a segment id >= M would otherwise read or write out of bounds
in the kernel). The public functions in attrefine_fast.ops check their wider inputs before
calling any backend; these checks hold the backends' own, narrower contract.

The checks run on real tensors only: under torch.compile, opcheck or make_fx the launchers see
fake tensors, which hold no data to check (the fake implementations check nothing either).
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from attrefine_fast.checks import (
    FLOAT_DTYPES, IMAGE_DTYPES, check_finite, check_no_partial_overlap, check_real, check_same_device, check_tensor,
    check_written_in_place,
)
from attrefine_fast.ops.perturb import check_chunk, check_output_dtype, check_perturb_out


def concrete(*tensors) -> bool:
    """True when every tensor holds data (not traced by torch.compile, opcheck or make_fx)."""
    if torch.compiler.is_compiling():
        return False
    return not any(isinstance(t, torch.Tensor) and is_fake(t) for t in tensors)


def check_segments_layout(images, segments, num_segments: int) -> None:
    """images (B, C, H, W); segments (B, H, W) integer ids; all but the ids' range, which the
    launchers check on the device (kernels/device_checks.py), check_segment_ids on the host."""
    check_tensor("images", images, ndim=4, dtypes=IMAGE_DTYPES)
    check_tensor("segments", segments, ndim=3, dtypes=(torch.int64, torch.int32))
    b, _, h, w = images.shape
    if tuple(segments.shape) != (b, h, w):
        raise ValueError(f"segments must have shape (B, H, W) = {(b, h, w)} to match images, got {tuple(segments.shape)}")
    check_same_device(images=images, segments=segments)
    if num_segments < 1:
        raise ValueError(f"num_segments must be at least 1, got {num_segments}")


def check_segment_ids(segments, num_segments: int) -> None:
    if segments.numel():
        lo, hi = torch.stack(torch.aminmax(segments)).tolist()  # one device-to-host copy
        if lo < 0 or hi >= num_segments:
            raise ValueError(f"segment ids must lie in [0, {num_segments}), got ids in [{lo}, {hi}]")


def check_perturb(images, segments, masks, fudge, offset: int, count: int, mean, std, out_dtype,
                  channels_last: bool = False) -> None:
    # channels_last: the op's last argument, which any layout satisfies (TritonOp passes them all)
    check_tensor("masks", masks, ndim=3, dtypes=(torch.bool,))
    check_tensor("images", images, ndim=4, dtypes=IMAGE_DTYPES)
    b, c = images.shape[:2]
    if masks.shape[0] != b or masks.shape[2] < 1:
        raise ValueError(f"masks must have shape (B, N, M) with B={b}, got {tuple(masks.shape)}")
    # the same contract for images and ids; the launcher checks the ids on the device
    check_segments_layout(images, segments, masks.shape[2])
    check_tensor("fudge", fudge, ndim=4)
    if fudge.shape != images.shape or fudge.dtype != images.dtype:
        raise ValueError(f"fudge must match images in shape and dtype: {tuple(images.shape)} {images.dtype}, got {tuple(fudge.shape)} {fudge.dtype}")
    check_same_device(images=images, masks=masks, fudge=fudge, mean=mean, std=std)
    check_chunk(offset, count, masks.shape[1])
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    for name, t in (("mean", mean), ("std", std)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES)
            if t.shape[0] != c:
                raise ValueError(f"{name} must have one value per channel ({c}), got shape {tuple(t.shape)}")
    check_output_dtype(images.dtype, mean is not None, out_dtype)


def check_perturb_into(images, segments, masks, fudge, offset: int, mean, std, out) -> int:
    """perturb_into's contract; returns the number of samples per image out holds."""
    check_tensor("images", images, ndim=4, dtypes=IMAGE_DTYPES)
    count = check_perturb_out(out, images, segments, masks, fudge, mean, std)
    check_perturb(images, segments, masks, fudge, offset, count, mean, std, out.dtype)
    return count


def check_lime_fit(masks, targets, num_segments, weights, kernel_width: float, alpha: float) -> None:
    check_tensor("masks", masks, ndim=3, dtypes=(torch.bool,))
    check_tensor("targets", targets, ndim=3, dtypes=(torch.float32, torch.float64))
    check_tensor("num_segments", num_segments, ndim=1, dtypes=(torch.int64,))
    check_same_device(masks=masks, targets=targets, num_segments=num_segments, weights=weights)
    b, n, m = masks.shape
    if min(b, n, m, targets.shape[2]) < 1:
        raise ValueError(f"masks (B, N, M) and targets (B, N, L) must be non-empty, got {tuple(masks.shape)} and {tuple(targets.shape)}")
    if targets.shape[:2] != (b, n):
        raise ValueError(f"targets must have shape (B, N, L) = ({b}, {n}, L) to match masks, got {tuple(targets.shape)}")
    if num_segments.shape[0] != b:
        raise ValueError(f"num_segments must hold B={b} counts in 1..{m}")
    check_real("kernel_width", kernel_width, positive=True)
    check_real("alpha", alpha, minimum=0.0)
    # the counts and the targets' values: checked on the device by the launcher (check_lime_fit_values)
    if weights is not None:
        check_tensor("weights", weights, ndim=2, dtypes=(targets.dtype,))
        if tuple(weights.shape) != (b, n):
            raise ValueError(f"weights must have shape (B, N) = ({b}, {n}), got {tuple(weights.shape)}")
        check_finite("weights", weights)
        if bool((weights < 0).any()) or bool((weights.sum(dim=1) <= 0).any()):
            raise ValueError("weights must be non-negative with a positive sum per image")


def check_lime_fit_values(targets, num_segments, m: int) -> None:
    """The counts in 1..M and finite targets (one device-to-host copy; a non-finite sum is
    settled element-wise by check_finite)."""
    counts_bad, sum_finite = torch.stack(
        [((num_segments < 1) | (num_segments > m)).any(), torch.isfinite(targets.sum())]
    ).tolist()
    if counts_bad:
        raise ValueError(f"num_segments must hold B={num_segments.shape[0]} counts in 1..{m}")
    if not sum_finite:
        check_finite("targets", targets)


def check_masked_pgd_step(x_adv, x, grad, weight, step_size: float, eps: float, lo: float, hi: float, norm: str) -> None:
    check_tensor("x_adv", x_adv, ndim=4, dtypes=FLOAT_DTYPES)
    for name, t in (("x", x), ("grad", grad)):
        check_tensor(name, t, dtypes=(x_adv.dtype,))
        if t.shape != x_adv.shape:
            raise ValueError(f"{name} must have the shape of x_adv {tuple(x_adv.shape)}, got {tuple(t.shape)}")
    check_same_device(x_adv=x_adv, x=x, grad=grad, weight=weight)
    check_written_in_place("x_adv", x_adv)
    check_no_partial_overlap("x_adv", x_adv, x=x, grad=grad, weight=weight)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if not (step_size >= 0 and eps >= 0 and lo <= hi):
        raise ValueError(f"need step_size >= 0, eps >= 0 and lo <= hi, got {step_size}, {eps}, {lo}, {hi}")
    if weight is not None:
        b, _, h, w = x_adv.shape
        check_tensor("weight", weight, ndim=3, dtypes=(x_adv.dtype,))
        if tuple(weight.shape) != (b, h, w):
            raise ValueError(f"weight must have shape (B, H, W) = {(b, h, w)}, got {tuple(weight.shape)}")
    # grad's values are checked on the device by the launcher (kernels/device_checks.py)
