"""segment_mean: the per-segment, per-channel mean colour of each image (LIME's hide colour)."""
from __future__ import annotations

import torch

from .. import backends
from ..checks import check_images, check_int, check_segments


def segment_mean_ref(images: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Pure-PyTorch reference.

    Args:
        images: (B, C, H, W) float16 / bfloat16 / float32 / float64 or uint8.
        segments: (B, H, W) int64, labels in [0, num_segments).
        num_segments: M, the padded number of segments (the largest per-image count).

    Returns:
        (B, M, C) in the images' dtype (float64 for uint8 images). Sums are accumulated in
        float64, so integer images give the exact mean. A segment with no pixels has mean 0.
    """
    b, c, h, w = images.shape
    out_dtype = images.dtype if images.is_floating_point() else torch.float64
    flat_seg = segments.reshape(b, 1, h * w).long().expand(b, c, h * w)
    sums = torch.zeros(b, c, num_segments, dtype=torch.float64, device=images.device)
    sums.scatter_add_(2, flat_seg, images.reshape(b, c, h * w).to(torch.float64))
    counts = torch.zeros(b, num_segments, dtype=torch.float64, device=images.device)
    counts.scatter_add_(1, segments.reshape(b, h * w).long(), torch.ones(b, h * w, dtype=torch.float64, device=images.device))
    means = sums / counts.clamp_min(1).unsqueeze(1)
    return means.transpose(1, 2).contiguous().to(out_dtype)


@torch.no_grad()
def segment_mean(images: torch.Tensor, segments: torch.Tensor, num_segments: int | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Per-image, per-segment, per-channel mean: (B, C, H, W), (B, H, W) -> (B, M, C).

    See :func:`segment_mean_ref` for the exact contract. ``num_segments`` defaults to the largest
    count; under torch.compile it must be given (it sizes the output).
    """
    check_images("images", images)
    if num_segments is not None:
        num_segments = check_int("num_segments", num_segments)
    counts = check_segments(segments, images, num_segments)
    if not torch.compiler.is_compiling():  # traced, check_segments asserted the labels < num_segments
        m = int(counts.max())
        if num_segments is None:
            num_segments = m
        elif num_segments < m:
            raise ValueError(f"num_segments={num_segments} is smaller than the largest segment count {m}")
    impl = backends.resolve("segment_mean", backend, images.device)
    return impl(images, segments.long(), int(num_segments))
