"""Clean accuracy, and the batch loop that every metric of the robustness report shares.

    acc = accuracy(model, load_digits("test"))             # share classified correctly

The helpers here take a dataset (an :class:`~attrefine_fast.data.ImageDataset` or an
``(images, labels)`` tuple), pick the device, check the batch size and wrap the batches in an
optional progress bar; the attack metrics (:mod:`attrefine_fast.evaluate`) and the corruption
metrics (:mod:`attrefine_fast.evaluate_corruptions`) build on them.
"""
from __future__ import annotations

import torch
from torch import nn

from .attacks import frozen, predict
from .checks import check_int
from .data import ImageDataset

__all__ = ["accuracy"]


def _as_dataset(dataset) -> ImageDataset:
    if isinstance(dataset, ImageDataset):
        return dataset
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        images, labels = dataset
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        return ImageDataset(images.detach(), torch.as_tensor(labels), name="tensors")
    raise TypeError(f"dataset must be an ImageDataset or an (images, labels) tuple, got {type(dataset).__name__}")


def _device(model: nn.Module, device) -> torch.device:
    """The device to evaluate on: ``device`` (the model is moved there) or the model's own."""
    if device is not None:
        model.to(device)
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _num_classes(model: nn.Module, ds: ImageDataset, dev: torch.device) -> int:
    x, _ = next(ds.batches(1, dev))
    with frozen(model), torch.no_grad():
        return int(model(x).shape[1])


def _check_labels(model: nn.Module, ds: ImageDataset, dev: torch.device) -> None:
    """The labels must name one of the model's outputs (a label beyond them counts as an error
    for every image, silently)."""
    if len(ds) and int(ds.labels.max()) >= (k := _num_classes(model, ds, dev)):
        raise ValueError(f"labels must be < the model's {k} outputs, got {int(ds.labels.max())}")


def _check_batch_size(batch_size) -> None:
    check_int("batch_size", batch_size, 1)


def _bar(iterable, *, desc: str, total: int | None, progress: bool):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def accuracy(model: nn.Module, dataset, *, batch_size: int = 256, device=None, progress: bool = False) -> float:
    """Share of ``dataset`` (an ImageDataset or an (images, labels) tuple, images in [0, 1] or uint8)
    that ``model`` classifies correctly; the model runs frozen (eval mode, restored afterwards)."""
    ds = _as_dataset(dataset)
    _check_batch_size(batch_size)
    dev = _device(model, device)
    _check_labels(model, ds, dev)
    correct = 0
    batches = _bar(ds.batches(batch_size, dev), desc="clean", total=_num_batches(len(ds), batch_size), progress=progress)
    for x, y in batches:
        correct += int((predict(model, x, batch_size=batch_size) == y).sum())
    return correct / max(len(ds), 1)
