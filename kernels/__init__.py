"""Triton kernels of the attrefine_fast ops, installed as ``attrefine_fast.kernels``.

``get(op)`` returns the Triton implementation of an op (with the op schema's signature), or
None where there is none yet. Each is a TritonOp: the torch op ``attrefine_fast::<op>_triton``
(its ``.op``; see op_registration.py for why it has its own name) with a direct eager call. On CPU tensors the kernels run only under
``TRITON_INTERPRET=1``, which must be set before this package is imported.

The modules that define kernels and launchers keep their annotations evaluated (no ``from
__future__ import annotations``): Triton 3.0's interpreter recognizes a ``tl.constexpr``
parameter only by the object, and torch 2.4 infers an op's schema only from evaluated types.
"""
import triton  # noqa: F401  (ImportError here tells backends that Triton is unavailable)

from .lime_fit import lime_fit_triton
from .masked_pgd_step import masked_pgd_step_triton
from .perturb import perturb_into_triton, perturb_triton
from .segment_mean import segment_mean_triton

_IMPLEMENTATIONS = {
    "segment_mean": segment_mean_triton,
    "perturb": perturb_triton,
    "perturb_into": perturb_into_triton,
    "lime_fit": lime_fit_triton,
    "masked_pgd_step": masked_pgd_step_triton,
}


def get(op):
    return _IMPLEMENTATIONS.get(op)
