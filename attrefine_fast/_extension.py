"""Loading the compiled ops (attrefine_fast._C) and their Python-side registrations.

Importing the extension runs its static TORCH_LIBRARY registrations (csrc/ops.cpp); the fake
(meta) implementations registered here (ops/fakes.py) let torch.compile trace the ops. Everything
here is guarded: the package works on its pure-PyTorch backend when the extension is missing.
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
    from .ops.fakes import FAKES

    for op, fake in FAKES.items():
        torch.library.register_fake(f"attrefine_fast::{op}")(fake)
