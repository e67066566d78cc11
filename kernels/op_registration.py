"""How the Triton kernels become torch ops that torch.compile can see through.

``torch.library.triton_op`` + ``wrap_triton`` (torch >= 2.6) let Inductor trace into the
launcher and schedule the Triton kernels itself. The ops get their own names in our namespace
(``attrefine_fast::<op>_triton``) with the same signature as the C++ schema ``attrefine_fast::<op>``:
the CPU and CUDA dispatch keys of the C++ schema belong to the compiled extension (the ``cpp`` and
``cuda`` backends), a kernel registered there would be opaque to Inductor, and the Triton ops must
work whether or not the extension was built. On torch 2.4/2.5 they fall back to an opaque
``torch.library.custom_op`` calling the kernels directly: eager calls work there, torch.compile
of the Triton ops needs torch >= 2.6.
"""
from __future__ import annotations

import os

import torch

NAMESPACE = "attrefine_fast"
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_op(name: str, mutates_args=()):
    """Register a Python launcher as ``attrefine_fast::<name>``."""
    qualname = f"{NAMESPACE}::{name}"
    if _HAS_TRITON_OP:
        return torch.library.triton_op(qualname, mutates_args=mutates_args)
    return torch.library.custom_op(qualname, mutates_args=mutates_args)


def wrap_triton(kernel):
    """The kernel as launched from inside a triton_op (a plain launch on older torch)."""
    return torch.library.wrap_triton(kernel) if _HAS_TRITON_OP else kernel


def autotune_configs(configs):
    """All configurations on a GPU; the first only under the interpreter, where timing means
    nothing and every extra configuration is a slow extra run."""
    return configs[:1] if interpreting() else configs
