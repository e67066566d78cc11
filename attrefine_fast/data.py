"""Datasets as tensors: the embedded digits default, and by name the CIFAR sets of :mod:`attrefine_fast.cifar`.

Nothing is ever downloaded. Every loader returns an :class:`ImageDataset`: images (N, C, H, W)
(uint8 0..255 or float in [0, 1]) and labels (N,) int64; indexing and :meth:`ImageDataset.batches`
yield float images in [0, 1], the input every model and attack of the package takes. The CIFAR
readers (local python archives, MD5-checked; CIFAR-10-C / 100-C ``.npy`` files) live in
:mod:`attrefine_fast.cifar`, :class:`ImageDataset` in :mod:`attrefine_fast.image_dataset`; both are
re-exported here.
"""
from __future__ import annotations

import numpy as np
import torch

from .cifar import (
    CIFAR_C_CORRUPTIONS, CIFAR_C_EXTRA, CIFAR_MD5, available_cifar_c, cifar_c_folder, expected_layout, load_cifar,
    load_cifar10, load_cifar100, load_cifar_c,
)
from .checks import check_int, check_real
from .image_dataset import ImageDataset, to_float

DATASETS = ("digits", "cifar10", "cifar100")


# ----------------------------------------------------------------------------- digits (embedded)


def load_digits(split: str = "test", *, size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes) as RGB images.

    Pixels 0..16 are scaled to [0, 1], upsampled bilinearly to ``size`` x ``size`` and repeated
    over 3 channels. The split is stratified and fixed by ``seed``.

    Args:
        split: "train", "test" or "all".
        size: output height and width.
        test_fraction: share of each class in the test split (0.25: 450 test images).
        seed: the split's seed.

    Returns:
        ImageDataset with float32 images (N, 3, size, size) in [0, 1].
    """
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    bunch = _sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(bunch.target.astype(np.int64))
    classes = [str(c) for c in bunch.target_names]
    if split == "all":
        return ImageDataset(x, y, classes, "digits/all")
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    idx = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
    return ImageDataset(x[idx], y[idx], classes, f"digits/{split}")


# ----------------------------------------------------------------------------- a spurious feature


def patch_colours(num_classes: int) -> torch.Tensor:
    """(K, 3) float32 in [0, 1]: K hues evenly spaced around the colour wheel, at full saturation
    and value (red, then towards yellow, green, cyan, blue, magenta)."""
    hue = torch.arange(num_classes, dtype=torch.float32) * 6 / num_classes
    rgb = torch.stack([(hue - 3).abs() - 1, 2 - (hue - 2).abs(), 2 - (hue - 4).abs()], dim=1)
    return rgb.clamp_(0.0, 1.0)


SPURIOUS_PATCH_SIZE = 6


def add_spurious_patch(dataset: ImageDataset, correlation: float, *, size: int = SPURIOUS_PATCH_SIZE, seed: int = 0) -> ImageDataset:
    """A copy of ``dataset`` with a spurious feature: a ``size`` x ``size`` square in the top-left
    corner, in the colour of the image's class (:func:`patch_colours`) with probability
    ``correlation``, otherwise in the colour of a class drawn uniformly (which may be its own).

    Trained at a high correlation, a model can read the class off the patch instead of the
    digit; the same images with ``correlation=0`` (the colour says nothing about the class)
    measure how much it does. The draws depend on ``seed`` only; the caller's tensors are not
    modified.
    """
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    correlation = check_real("correlation", correlation, minimum=0.0)
    if correlation > 1:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}")
    n, c, h, w = dataset.images.shape
    size = check_int("size", size, 1)
    if size > min(h, w) or c != 3:
        raise ValueError(f"the patch needs RGB images of at least {size}x{size} pixels, got {c} channels of {h}x{w}")
    gen = torch.Generator().manual_seed(check_int("seed", seed))
    agree = torch.rand(n, generator=gen) < correlation
    other = torch.randint(0, dataset.num_classes, (n,), generator=gen)
    colours = patch_colours(dataset.num_classes)[torch.where(agree, dataset.labels, other)]  # (N, 3)
    if dataset.images.dtype == torch.uint8:
        colours = (colours * 255).round().to(torch.uint8)
    images = dataset.images.clone()
    images[:, :, :size, :size] = colours.to(images.dtype).view(n, 3, 1, 1)
    return ImageDataset(images, dataset.labels, dataset.classes, f"{dataset.name}+patch@{correlation:g}")


# ----------------------------------------------------------------------------- by name


def load_dataset(name: str, split: str = "test", data_dir=None, **kwargs) -> ImageDataset:
    """``load_digits(split)`` for "digits" (no files needed); ``load_cifar(name, data_dir, split)``
    for "cifar10" / "cifar100"."""
    if name == "digits":
        return load_digits(split, **kwargs)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise ValueError(f"{name} needs data_dir: {expected_layout(name, '<data_dir>')}")
        return load_cifar(name, data_dir, split, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")


__all__ = [
    "CIFAR_C_CORRUPTIONS", "CIFAR_C_EXTRA", "CIFAR_MD5", "DATASETS", "ImageDataset", "SPURIOUS_PATCH_SIZE", "add_spurious_patch",
    "available_cifar_c",
    "cifar_c_folder", "expected_layout", "load_cifar", "load_cifar10", "load_cifar100", "load_cifar_c",
    "load_dataset", "load_digits", "patch_colours", "to_float",
]
