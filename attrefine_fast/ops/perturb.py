"""perturb: LIME's perturbed images, one chunk of samples at a time.

``out[b, n] = where(masks[b, n, segments[b]], images[b], fudge[b])`` for the samples
``offset <= n < offset + count`` of every image, so the model can consume chunks as they are
produced and peak memory does not grow with the number of samples. ``perturb_into`` writes a
chunk into a caller's buffer instead, so one buffer serves every chunk: on the CPU a fresh
chunk of more than a few MB comes straight from the operating system and costs more in page
faults than the perturbation itself.
"""
from __future__ import annotations

import torch

from .. import backends
from ..checks import FLOAT_DTYPES, check_finite, check_images, check_int, check_same_device, check_segments, check_tensor, require


def perturb_output_dtype(images_dtype: torch.dtype, normalized: bool, out_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype perturb returns: out_dtype if given; else the images' dtype, or float32 when an
    integer image is normalized."""
    if out_dtype is not None:
        return out_dtype
    if normalized and not images_dtype.is_floating_point:
        return torch.float32
    return images_dtype


def check_output_dtype(images_dtype: torch.dtype, normalized: bool, out_dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype (:func:`perturb_output_dtype`), which must be a float dtype or uint8. A
    uint8 output holds the images' own values, so it needs uint8 images and no normalization: a
    float or normalized value outside 0..255 would wrap around in the cast."""
    dtype = perturb_output_dtype(images_dtype, normalized, out_dtype)
    if dtype not in FLOAT_DTYPES + (torch.uint8,):
        raise TypeError(f"out_dtype must be a float dtype or uint8, got {dtype}")
    if dtype == torch.uint8 and (normalized or images_dtype != torch.uint8):
        got = f"{images_dtype} images" + (" with mean/std" if normalized else "")
        raise TypeError(f"a uint8 output needs uint8 images and no mean/std (values outside 0..255 would wrap), got {got}")
    return dtype


def perturb_ref(
    images: torch.Tensor,
    segments: torch.Tensor,
    masks: torch.Tensor,
    fudge: torch.Tensor,
    offset: int,
    count: int,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch reference.

    Args:
        images: (B, C, H, W) float16 / bfloat16 / float32 / float64 or uint8.
        segments: (B, H, W) int64, labels in [0, M).
        masks: (B, N, M) bool; True keeps a segment, False replaces it with ``fudge``.
        fudge: (B, C, H, W), same dtype as images: the replacement image (segment means, a
            constant colour, a blurred copy...).
        offset, count: the samples ``offset <= n < offset + count`` to produce.
        mean, std: optional (C,) float tensors; when given the output is ``(x - mean) / std``,
            computed in float32 (float64 for float64 images).
        out_dtype: the output dtype (see :func:`perturb_output_dtype`); uint8 only for uint8
            images without normalization (:func:`check_output_dtype`).
        channels_last: return the result in channels-last memory format.

    Returns:
        (B * count, C, H, W), image-major: row ``b * count + i`` is sample ``offset + i`` of image b.
    """
    b, c, h, w = images.shape
    out = torch.where(_keep(segments, masks, offset, count), images.unsqueeze(1), fudge.unsqueeze(1))
    dtype = perturb_output_dtype(images.dtype, mean is not None, out_dtype)
    out = _normalize_cast(out, images.dtype, mean, std, dtype).reshape(b * count, c, h, w)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _keep(segments, masks, offset, count):
    """(B, count, 1, H, W) bool: whether each pixel of each sample keeps the image."""
    b, h, w = segments.shape
    chunk = masks[:, offset : offset + count]
    return torch.gather(chunk, 2, segments.reshape(b, 1, h * w).long().expand(b, count, h * w)).view(b, count, 1, h, w)


def _normalize_cast(x, images_dtype, mean, std, dtype):
    """``(x - mean) / std`` over dim -3 (computed in float32, float64 for float64 images) when
    normalizing, then the cast to the output dtype."""
    if mean is not None:
        compute = torch.float64 if images_dtype == torch.float64 else torch.float32
        shape = (-1, 1, 1)
        x = (x.to(compute) - mean.to(compute).view(shape)) / std.to(compute).view(shape)
    return x.to(dtype)


def perturb_into_ref(
    images: torch.Tensor,
    segments: torch.Tensor,
    masks: torch.Tensor,
    fudge: torch.Tensor,
    offset: int,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Pure-PyTorch reference of perturb_into: :func:`perturb_ref`'s chunk written into ``out``,
    a (B * count, C, H, W) tensor, contiguous or channels-last, whose shape gives the number of
    samples and whose dtype and layout are the output's."""
    b, c, h, w = images.shape
    count = out.shape[0] // b
    # Normalization and cast act on each pixel alone, so they commute with the choice: applied
    # to the two sources once, then one select writes the chunk in place.
    kept, replaced = (_normalize_cast(x, images.dtype, mean, std, out.dtype).unsqueeze(1) for x in (images, fudge))
    keep, target = _keep(segments, masks, offset, count), out.view(b, count, c, h, w)
    if torch.compiler.is_compiling():  # Dynamo takes out= of contiguous tensors only; Inductor fuses the copy
        target.copy_(torch.where(keep, kept, replaced))
    else:
        torch.where(keep, kept, replaced, out=target)


def check_chunk(offset: int, count: int, samples: int) -> None:
    """A chunk is samples [offset, offset + count) of the N drawn per image, and holds at least one."""
    check_int("offset", offset)
    check_int("count", count)
    if not (0 <= offset and count >= 1 and offset + count <= samples):
        raise ValueError(f"need offset >= 0, count >= 1 and offset + count <= N={samples}, got offset={offset}, count={count}")


def check_perturb_args(images, segments, masks, fudge, offset, count, mean, std, out_dtype):
    """Validation shared by every backend's entry point."""
    check_images("images", images)
    check_tensor("masks", masks, ndim=3, dtypes=(torch.bool,))
    seg_counts = check_segments(segments, images, masks.shape[2])
    check_tensor("fudge", fudge, ndim=4)
    for name, t in (("mean", mean), ("std", std)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES)
    check_same_device(images=images, segments=segments, masks=masks, fudge=fudge, mean=mean, std=std)
    b, c = images.shape[:2]
    if masks.shape[0] != b:
        raise ValueError(f"masks must have shape (B, N, M) with B={b}, got {tuple(masks.shape)}")
    # (traced, check_segments asserted the labels < M instead)
    if not torch.compiler.is_compiling() and masks.shape[2] < int(seg_counts.max()):
        raise ValueError(f"masks must have shape (B, N, M) with B={b} and M >= {int(seg_counts.max())} segments, got {tuple(masks.shape)}")
    if fudge.shape != images.shape or fudge.dtype != images.dtype:
        raise ValueError(f"fudge must match images in shape and dtype: {tuple(images.shape)} {images.dtype}, got {tuple(fudge.shape)} {fudge.dtype}")
    check_finite("fudge", fudge)
    check_chunk(offset, count, masks.shape[1])
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        for name, t in (("mean", mean), ("std", std)):
            if t.shape[0] != c:
                raise ValueError(f"{name} must have one value per channel ({c}), got shape {tuple(t.shape)}")
            check_finite(name, t)
        require((std != 0).all(), "std contains zeros")
    check_output_dtype(images.dtype, mean is not None, out_dtype)


def check_perturb_out(out, images, segments, masks, fudge, mean=None, std=None) -> int:
    """Validation of perturb_into's ``out``; returns the number of samples it holds per image."""
    check_tensor("out", out, ndim=4)
    check_same_device(images=images, out=out)
    b, c, h, w = images.shape
    if b == 0 or out.shape[0] == 0 or out.shape[0] % b or tuple(out.shape[1:]) != (c, h, w):
        raise ValueError(f"out must have shape (B * count, C, H, W) with B={b}, (C, H, W)={(c, h, w)} and count >= 1, got {tuple(out.shape)}")
    if not (out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"out must be contiguous or channels-last, got strides {out.stride()}")
    if out.requires_grad:
        raise ValueError("out must not require grad: perturb is not differentiable")
    if torch.compiler.is_compiling():  # a traced tensor has no address to compare
        return out.shape[0] // b
    # (mean and std as well: a kernel reads them while it writes out)
    inputs = (("images", images), ("segments", segments), ("masks", masks), ("fudge", fudge), ("mean", mean), ("std", std))
    for name, t in inputs:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            raise ValueError(f"out shares memory with {name}")
    return out.shape[0] // b


@torch.no_grad()
def perturb(
    images: torch.Tensor,
    segments: torch.Tensor,
    masks: torch.Tensor,
    fudge: torch.Tensor,
    offset: int = 0,
    count: int | None = None,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Perturbed images for samples [offset, offset+count): see :func:`perturb_ref`.

    With ``out`` (a (B * count, C, H, W) tensor, contiguous or channels-last) the chunk is written
    there and ``out`` is returned: its shape gives count, its dtype and layout the output's, so
    ``out_dtype`` and ``channels_last`` may be left out (given, they must agree with it).
    """
    if out is not None:
        check_images("images", images)
        out_count = check_perturb_out(out, images, segments, masks, fudge, mean, std)
        if count is not None and count != out_count:
            raise ValueError(f"count={count} but out holds {out_count} samples per image")
        if out_dtype is not None and out_dtype != out.dtype:
            raise TypeError(f"out_dtype={out_dtype} but out has dtype {out.dtype}")
        if channels_last and not out.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("channels_last=True but out is not channels-last")
        check_perturb_args(images, segments, masks, fudge, offset, out_count, mean, std, out.dtype)
        impl = backends.resolve("perturb_into", backend, images.device)
        impl(images, segments.long(), masks, fudge, int(offset), mean, std, out)
        return out
    if count is None:
        count = masks.shape[1] - offset if isinstance(masks, torch.Tensor) and masks.dim() == 3 else 0
    check_perturb_args(images, segments, masks, fudge, offset, count, mean, std, out_dtype)
    impl = backends.resolve("perturb", backend, images.device)
    return impl(images, segments.long(), masks, fudge, int(offset), int(count), mean, std, out_dtype, bool(channels_last))
