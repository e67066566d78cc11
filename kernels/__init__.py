"""Triton kernels of the attrefine_fast ops, installed as ``attrefine_fast.kernels``.

``get(op)`` returns the Triton implementation of an op (with the op schema's signature), or
None where there is none yet.
"""
import triton  # noqa: F401  (ImportError here tells backends that Triton is unavailable)

_IMPLEMENTATIONS = {}


def get(op):
    return _IMPLEMENTATIONS.get(op)
