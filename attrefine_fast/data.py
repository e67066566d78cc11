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
    "CIFAR_C_CORRUPTIONS", "CIFAR_C_EXTRA", "CIFAR_MD5", "DATASETS", "ImageDataset", "available_cifar_c",
    "cifar_c_folder", "expected_layout", "load_cifar", "load_cifar10", "load_cifar100", "load_cifar_c",
    "load_dataset", "load_digits", "to_float",
]
