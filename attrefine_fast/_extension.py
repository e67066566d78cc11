"""Loading the compiled ops (attrefine_fast._C) and their Python-side registrations.

Importing the extension runs its static TORCH_LIBRARY registrations (csrc/ops.cpp); the fake
(meta) implementations below let torch.compile trace the ops. Everything here is guarded: the
package works on its pure-PyTorch backend when the extension is missing.
"""
from __future__ import annotations

import functools

import torch

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (needs torch and a C++ compiler)"
_error = ""


@functools.lru_cache(maxsize=None)
def loaded() -> bool:
    global _error
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        _error = f"the compiled extension attrefine_fast._C is not available ({e}); {_BUILD_HINT}"
        return False
    _register_fakes()
    _declare_not_differentiable()
    return True


def load_error() -> str:
    loaded()
    return _error


_NOT_DIFFERENTIABLE = ("segment_mean", "perturb", "perturb_into", "lime_fit", "masked_pgd_step")
_autograd_library = None


def _declare_not_differentiable() -> None:
    """None of the ops has a gradient: a fallthrough on the Autograd key says so, so that inputs
    requiring grad give outputs that do not (instead of a graph that silently backpropagates
    nothing, which torch warns about)."""
    global _autograd_library
    if _autograd_library is not None:
        return
    _autograd_library = torch.library.Library("attrefine_fast", "IMPL")
    for op in _NOT_DIFFERENTIABLE:
        _autograd_library.impl(op, torch.library.fallthrough_kernel, "Autograd")


def _register_fakes() -> None:
    from .ops.perturb import perturb_output_dtype

    @torch.library.register_fake("attrefine_fast::segment_mean")
    def _(images, segments, num_segments):
        torch._check(images.dim() == 4 and segments.dim() == 3)
        dtype = images.dtype if images.is_floating_point() else torch.float64
        return images.new_empty((images.shape[0], num_segments, images.shape[1]), dtype=dtype)

    @torch.library.register_fake("attrefine_fast::perturb")
    def _(images, segments, masks, fudge, offset, count, mean, std, out_dtype, channels_last):
        torch._check(images.dim() == 4 and masks.dim() == 3)
        b, c, h, w = images.shape
        out = images.new_empty((b * count, c, h, w), dtype=perturb_output_dtype(images.dtype, mean is not None, out_dtype))
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out

    @torch.library.register_fake("attrefine_fast::perturb_into")
    def _(images, segments, masks, fudge, offset, mean, std, out):
        torch._check(images.dim() == 4 and out.dim() == 4)
        return None

    @torch.library.register_fake("attrefine_fast::lime_fit")
    def _(masks, targets, num_segments, weights, kernel_width, alpha):
        torch._check(masks.dim() == 3 and targets.dim() == 3)
        b, _, m = masks.shape
        l = targets.shape[2]
        return (targets.new_empty((b, l, m)), targets.new_empty((b, l)), targets.new_empty((b, l)), targets.new_empty((b, l)))

    @torch.library.register_fake("attrefine_fast::masked_pgd_step")
    def _(x_adv, x, grad, weight, step_size, eps, lo, hi, norm):
        torch._check(x_adv.shape == x.shape)
        return None
