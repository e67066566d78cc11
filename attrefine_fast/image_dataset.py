"""ImageDataset: images and labels held as tensors, the type every loader of the package returns."""
from __future__ import annotations

import numbers
from typing import Iterator, Sequence

import torch


class ImageDataset(torch.utils.data.Dataset):
    """Images and labels held as tensors.

    Args:
        images: (N, C, H, W) uint8 (0..255) or float in [0, 1].
        labels: (N,) integer.
        classes: class names (default: "0".."K-1").
        name: a label for reports, e.g. "digits/test" or "cifar10-c/fog/3".
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None, name: str = ""):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or float, got {images.dtype}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (N,) with N = {images.shape[0]}, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if len(labels) and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        if classes is not None and len(labels) and int(labels.max()) >= len(classes):
            raise ValueError(f"labels must be < the {len(classes)} classes named, got {int(labels.max())}")
        self.images = images
        self.labels = labels.long()
        k = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(k)]
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return to_float(self.images[i]), self.labels[i]

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float in [0, 1] and all labels, on ``device``."""
        return to_float(self.images).to(device), self.labels.to(device)

    def batches(self, batch_size: int, device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches of (float images in [0, 1], labels), in order."""
        for i in range(0, len(self), batch_size):
            yield to_float(self.images[i : i + batch_size]).to(device), self.labels[i : i + batch_size].to(device)

    def subset(self, indices) -> "ImageDataset":
        """A new dataset of the given rows: integer indices, a boolean mask of length N, or an int n
        for the first n."""
        if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):  # a NumPy int too
            if indices < 0:
                raise ValueError(f"subset takes the first n rows with n >= 0, got {indices}")
            indices = torch.arange(min(int(indices), len(self)))
        index = torch.as_tensor(indices)
        if index.numel() == 0 and index.dim() == 1:  # [] is float32 to torch: no rows
            index = index.long()
        if index.dtype == torch.bool:
            if tuple(index.shape) != (len(self),):
                raise ValueError(f"a boolean mask must have shape ({len(self)},), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        elif index.is_floating_point() or index.is_complex() or index.dim() > 1:
            raise TypeError(f"subset takes integer indices (N,), a boolean mask or an int, got {index.dtype} of shape {tuple(index.shape)}")
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, dtype={self.images.dtype}, classes={self.num_classes})"


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1]; float images pass through unchanged."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images
