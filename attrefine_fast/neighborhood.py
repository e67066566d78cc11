"""LIME's neighbourhood of an image: the replacement ("fudge") image, the binary samples and the
perturbed images in chunks, shared by the batched API and the lime drop-in."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from . import backends
from .checks import check_seed
from .input_buffers import lent_buffer
from .ops.perturb import perturb_output_dtype


def fudge_images(images: torch.Tensor, segments: torch.Tensor, num_segments: int, hide_color="mean", backend: str = "auto") -> torch.Tensor:
    """The image that replaces switched-off segments: (B, C, H, W) in the images' dtype.

    hide_color: "mean" (each segment's mean colour, lime's default; truncated for integer images
    as lime's assignment does), a number or one value per channel, or a (B, C, H, W) tensor.
    """
    b, c, h, w = images.shape
    if isinstance(hide_color, str):
        if hide_color != "mean":
            raise ValueError(f"hide_color must be 'mean', a number, per-channel values or a tensor, got {hide_color!r}")
        means = backends.resolve("segment_mean", backend, images.device)(images, segments, num_segments)  # (B, M, C)
        index = segments.reshape(b, 1, h * w).expand(b, c, h * w)
        fudge = torch.gather(means.transpose(1, 2), 2, index).reshape(b, c, h, w)
        return fudge.to(images.dtype)
    if isinstance(hide_color, torch.Tensor) and hide_color.dim() == 4:
        if hide_color.shape != images.shape:
            raise ValueError(f"a hide_color image must have the images' shape {tuple(images.shape)}, got {tuple(hide_color.shape)}")
        if not bool(torch.isfinite(hide_color.double()).all()):
            raise ValueError("hide_color contains NaN or infinite values")
        return hide_color.to(device=images.device, dtype=images.dtype)
    if isinstance(hide_color, torch.Tensor):  # any device, with or without autograd
        hide_color = hide_color.detach().cpu().double().numpy()
    value = torch.as_tensor(np.asarray(hide_color, dtype=np.float64)).flatten()
    if value.numel() not in (1, c) or not bool(torch.isfinite(value).all()):
        raise ValueError(f"hide_color must be \"mean\" (each segment's mean colour, lime's hide_color=None), one "
                         f"finite value, {c} (one per channel) or an image, got {hide_color!r}")
    return value.to(images.device).view(1, -1, 1, 1).expand(b, c, h, w).to(images.dtype).contiguous()


def draw_masks(num_segments: torch.Tensor, num_samples: int, seed: int | None = None, device=None) -> torch.Tensor:
    """Uniform binary samples (B, N, M) bool with M = max(num_segments); sample 0 is all ones
    (the original image) and padded columns are ones. Drawn on the CPU from ``seed`` so the
    same seed gives the same samples on every device."""
    b = num_segments.shape[0]
    m = int(num_segments.max())
    if seed is not None:
        seed = check_seed("seed", seed)
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    masks = torch.randint(0, 2, (b, num_samples, m), generator=gen, dtype=torch.uint8).bool()
    masks[:, 0] = True
    masks |= torch.arange(m) >= num_segments.cpu().view(b, 1, 1)
    return masks.to(device if device is not None else num_segments.device)


def lime_masks(random_state: np.random.RandomState, num_samples: int, num_segments: int) -> np.ndarray:
    """lime 0.2.0.1's samples, drawn exactly as it draws them from ``random_state``: (N, M) int."""
    data = random_state.randint(0, 2, num_samples * num_segments).reshape((num_samples, num_segments))
    data[0, :] = 1
    return data


def perturbed_chunks(
    images: torch.Tensor,
    segments: torch.Tensor,
    masks: torch.Tensor,
    fudge: torch.Tensor,
    samples_per_chunk: int,
    backend: str = "auto",
    reuse_buffer: bool = False,
    **perturb_options,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (offset, count, inputs) with inputs (B * count, C, H, W) for consecutive sample
    ranges, so peak memory is one chunk whatever the number of samples.

    reuse_buffer: write every chunk into one buffer (perturb_into) instead of a fresh tensor per
    chunk, which on the CPU saves the page faults of a fresh large allocation (2-4x the cost of
    writing the chunk); on the CPU that buffer is also kept for the thread's next call
    (attrefine_fast.input_buffers). Each yielded tensor is then overwritten by the next chunk: only
    for a consumer that is done with a chunk (and everything aliasing it) before asking for the next.
    """
    options = {"mean": None, "std": None, "out_dtype": None, "channels_last": False, **perturb_options}
    mean, std, channels_last = options["mean"], options["std"], options["channels_last"]
    b, c, h, w = images.shape
    n = masks.shape[1]
    if not reuse_buffer:
        impl = backends.resolve("perturb", backend, images.device)
        for offset in range(0, n, samples_per_chunk):
            count = min(samples_per_chunk, n - offset)
            yield offset, count, impl(images, segments, masks, fudge, offset, count, mean, std, options["out_dtype"], channels_last)
        return
    write = backends.resolve("perturb_into", backend, images.device)
    dtype = perturb_output_dtype(images.dtype, mean is not None, options["out_dtype"])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with lent_buffer(b * min(samples_per_chunk, n), (c, h, w), dtype, images.device, layout) as buffer:
        for offset in range(0, n, samples_per_chunk):
            count = min(samples_per_chunk, n - offset)
            rows = buffer[: b * count]  # the last chunk may be shorter
            write(images, segments, masks, fudge, offset, mean, std, rows)
            yield offset, count, rows
