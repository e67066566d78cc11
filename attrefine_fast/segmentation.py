"""Superpixel segmentation of a batch of images, labels 0..M-1 per image.

scikit-image does the work (quickshift with lime's defaults, slic, felzenszwalb), one image per
thread; a regular grid is computed directly. Labels are renumbered to 0..M-1 in increasing
order, so LIME feature j is segment j (slic starts at 1 unless told otherwise, a silent
off-by-one in many LIME wrappers; renumbering keeps quickshift's own 0..M-1 labels unchanged).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .checks import check_int

METHODS = ("quickshift", "slic", "felzenszwalb", "grid")
# lime 0.2.0.1's default segmentation. Current scikit-image's quickshift ignores lime's random_seed
# (its argument is now `rng`, default 42), so these alone reproduce lime's segments; the drop-in
# (lime.py) passes the seed where quickshift still takes `random_seed`, as lime does.
LIME_QUICKSHIFT = {"kernel_size": 4, "max_dist": 200, "ratio": 0.2}


def _to_numpy_hwc(images) -> tuple[np.ndarray, torch.device | None]:
    """(B, H, W, C) numpy from a (B, C, H, W) / (C, H, W) tensor or a (B, H, W, C) / (H, W, C) /
    (H, W) array."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"image tensors must be (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
        hwc = images.detach().permute(0, 2, 3, 1).cpu()
        if hwc.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16; scikit-image wants float32/64
            hwc = hwc.float()
        return hwc.numpy(), images.device
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"image arrays must be (B, H, W, C), (H, W, C) or (H, W), got shape {arr.shape}")
    return arr, None


def relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber integer labels to 0..M-1 keeping their order; returns (labels, M)."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64), len(uniq)


def grid_segments(height: int, width: int, n_segments: int = 64, grid: tuple[int, int] | None = None) -> np.ndarray:
    """A regular grid of about n_segments cells (or exactly grid=(rows, cols)), labels 0..M-1."""
    if grid is None:
        n_segments = check_int("n_segments", n_segments, 1)
        rows = max(1, int(round(np.sqrt(n_segments * height / width))))
        cols = max(1, int(round(n_segments / rows)))
    else:
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise ValueError(f"grid must be (rows, cols), got {grid!r}")
        rows, cols = (check_int(f"grid[{i}]", v, 1) for i, v in enumerate(grid))
    rows, cols = min(rows, height), min(cols, width)
    r = (np.arange(height) * rows) // height
    c = (np.arange(width) * cols) // width
    return (r[:, None] * cols + c[None, :]).astype(np.int64)


def _segment_one(image: np.ndarray, method: str, params: dict) -> np.ndarray:
    from skimage import segmentation

    gray = image.shape[2] == 1
    if method == "quickshift":
        if gray and params.get("convert2lab", True):  # the Lab conversion needs RGB: lime's gray2rgb
            image = np.repeat(image, 3, axis=2)
        labels = segmentation.quickshift(image, **{**LIME_QUICKSHIFT, **params})
    elif method == "slic":
        kwargs = {"n_segments": 50, "compactness": 10.0, **params, "start_label": 0}
        labels = segmentation.slic(image[..., 0] if gray else image, channel_axis=None if gray else -1, **kwargs)
    elif method == "felzenszwalb":
        labels = segmentation.felzenszwalb(image[..., 0] if gray else image, channel_axis=None if gray else -1, **params)
    else:
        labels = grid_segments(image.shape[0], image.shape[1], **params)
    return relabel(labels)[0]


def segment(images, method: str = "quickshift", *, n_jobs: int | None = None, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment a batch of images into superpixels.

    Args:
        images: (B, C, H, W) or (C, H, W) tensor, or (B, H, W, C) / (H, W, C) / (H, W) array.
        method: "quickshift" (lime's defaults: kernel_size=4, max_dist=200, ratio=0.2),
            "slic" (default n_segments=50, compactness=10), "felzenszwalb" (scikit-image's
            defaults) or "grid" (n_segments=64, or grid=(rows, cols)).
        n_jobs: threads (default, or -1: the number of CPUs).
        **params: passed to the scikit-image function (or to the grid).

    Returns:
        segments (B, H, W) int64 with labels 0..M_b-1, and counts (B,) int64 holding M_b; on the
        input tensor's device (CPU for arrays).

    On 32x32 images lime's quickshift defaults give only about 2 segments: use quickshift with
    kernel_size=1, slic with n_segments around 50, or a grid.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("slic", "grid") and "n_segments" in params:
        check_int("n_segments", params["n_segments"], 1)
    fixed = sorted(set(params) & {"channel_axis", "start_label", "return_tree"})
    if fixed:
        raise ValueError(f"segment() sets {fixed} itself (channels last, labels 0..M-1, the labels alone): remove them")
    if n_jobs is not None and n_jobs != -1:
        check_int("n_jobs", n_jobs, 1)
    arr, device = _to_numpy_hwc(images)
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"cannot segment an empty batch or image, got (B, H, W, C) = {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("images contain NaN or infinite values")
    if method == "quickshift" and params.get("convert2lab", True):
        if arr.shape[3] not in (1, 3):
            raise ValueError(f"quickshift converts RGB images to Lab colour: for {arr.shape[3]} channels pass "
                             "convert2lab=False, or use 'slic', 'felzenszwalb' or 'grid'")
        if np.issubdtype(arr.dtype, np.floating) and arr.max() > 1:
            warnings.warn(f"quickshift converts float images to Lab colour as values in [0, 1] (scikit-image scales "
                          f"uint8 ones); these reach {float(arr.max()):g}, which gives far finer segments than the "
                          "same images in [0, 1] or as uint8 (lime's on a photo): scale them to [0, 1] for "
                          "segmenting, or pass segments", stacklevel=2)
    workers = min(len(arr), (os.cpu_count() or 1) if n_jobs in (None, -1) else n_jobs)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            labels = list(pool.map(lambda im: _segment_one(im, method, params), arr))
    else:
        labels = [_segment_one(im, method, params) for im in arr]
    segments = torch.from_numpy(np.stack(labels))
    counts = segments.reshape(len(labels), -1).max(dim=1).values + 1
    if device is not None:
        segments, counts = segments.to(device), counts.to(device)
    return segments, counts
