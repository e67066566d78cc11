"""The CPU buffer that explanations write their perturbed images into, kept between calls.

A chunk of perturbed images is large (256 samples of a 224x224 RGB image: 154 MB), and a fresh
CPU allocation of that size comes straight from the operating system: the page faults of its
first touch cost about as much as writing it. Each thread therefore keeps the memory of its last
buffer and lends it to one consumer at a time (a second consumer while it is lent gets a fresh
tensor), the way PyTorch's caching allocator keeps freed blocks on CUDA, where nothing is cached
here. The memory is lent as whatever shape, dtype and layout the consumer asks for, when it is
large enough: our explainer's channels-last batches and the lime drop-in's NCHW ones, on the same
thread, take turns in it rather than each replacing the other's.
:func:`release_buffers` frees the calling thread's buffer.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator

import torch

_local = threading.local()


def _view(storage: torch.UntypedStorage, size: tuple, dtype: torch.dtype, memory_format) -> torch.Tensor:
    """A tensor of ``size``, dense in ``memory_format``, on the first bytes of ``storage``."""
    stride = torch.empty(size, dtype=dtype, device="meta", memory_format=memory_format).stride()
    return torch.empty(0, dtype=dtype).set_(storage, 0, size, stride)


@contextlib.contextmanager
def lent_buffer(rows: int, shape: tuple, dtype: torch.dtype, device: torch.device,
                memory_format=torch.contiguous_format) -> Iterator[torch.Tensor]:
    """A (rows, *shape) tensor, uninitialized, for the duration of the ``with`` block: on the CPU
    the thread's kept buffer (or its leading rows) when it fits and is not lent already, else a new
    one that is kept in its place."""
    def new():
        buffer = torch.empty((rows, *shape), dtype=dtype, device=device, memory_format=memory_format)
        if buffer.device.type == "cpu":
            # Map its pages now: the compiled perturb streams large outputs past the caches, and
            # streaming stores into pages not yet mapped cost more than mapping them first
            # (256 samples at 224x224, 2 threads: 87 ms unmapped, 65 ms with this zero_()).
            buffer.zero_()
        return buffer

    # This thread's state, held by the block: a generator that lends the buffer may be closed
    # on another thread (handed over, or collected there), and must give back this thread's.
    state = vars(_local)
    if torch.device(device).type != "cpu" or state.get("lent", False):
        yield new()
        return
    size = (rows, *shape)
    needed = rows * math.prod(shape) * dtype.itemsize
    kept = state.get("storage")
    if kept is None or kept.nbytes() < needed:
        state["storage"] = None  # free the old one before allocating its successor
        kept = state["storage"] = new().untyped_storage()
    state["lent"] = True
    try:
        yield _view(kept, size, dtype, memory_format)
    finally:
        state["lent"] = False


def release_buffers() -> None:
    """Free the calling thread's kept buffer (the next explanation allocates a new one)."""
    _local.storage = None
