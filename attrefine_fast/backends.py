"""Which implementation of each op runs: availability, the reason when one is missing, and
``backend="auto"``.

Backends:
    torch   pure PyTorch (attrefine_fast/ops/*_ref), any device: the reference and the fallback.
    cpp     C++ with OpenMP (csrc/cpu), CPU tensors, from the compiled extension.
    cuda    CUDA C++ (csrc/cuda), CUDA tensors, from the compiled extension built with CUDA.
    triton  Triton (kernels/), CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

import torch

from . import _extension

OPS = ("segment_mean", "perturb", "perturb_into", "lime_fit", "masked_pgd_step")
BACKENDS = ("torch", "cpp", "cuda", "triton")
# backend="auto" takes the first available backend in the order for the op and device type.
# On the CPU the C++ kernels measured fastest for every op, size and dtype (benchmarks/RESULTS.md;
# the float16 / bfloat16 masked_pgd_step since its AVX2 + F16C loops, "Half precision on the CPU").
# On CUDA the orders come from the GPU measurements in benchmarks/RESULTS.md (NVIDIA H100,
# benchmarks/gpu_targets.py, whole-call medians): the CUDA C++ kernel was the fastest for every op
# and size in run 2 (the kernels as committed; Triton's float32 lime_fit was 2% faster in run 3).
# Behind it the pure-PyTorch backend came before Triton for most sizes: the Triton kernels
# themselves are fast (perturb's writes at 2.1 TB/s), but their Python launch and argument checks
# cost more than they save at these sizes, and Triton's float64 lime_fit (the fits explain() runs)
# was ten times slower than PyTorch's. segment_mean was last timed on an H200,
# where PyTorch and Triton were within 5% of each other.
AUTO_ORDER = {
    "cpu": {op: ("cpp", "torch") for op in OPS},
    "cuda": {op: ("cuda", "torch", "triton") for op in OPS},
}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and the fix."""


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")


def _check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")


def _module(name: str):
    # sys.modules first: torch.compile traces a dictionary lookup, not importlib (the module is
    # imported by then: the public function's own, or the Triton package by status()).
    return sys.modules.get(name) or importlib.import_module(name)


def _reference(op: str) -> Callable:
    return getattr(_module(f"attrefine_fast.ops.{op.removesuffix('_into')}"), f"{op}_ref")


def has_compiled(op: str, dispatch_key: str) -> bool:
    return _extension.loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"attrefine_fast::{op}", dispatch_key)


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_load_error = ""  # why attrefine_fast.kernels failed to import with the Triton installed


def _triton(op: str) -> tuple[Callable | None, str]:
    global _triton_load_error
    if _triton_load_error:
        return None, _triton_load_error
    try:
        kernels = _module("attrefine_fast.kernels")
    except ModuleNotFoundError as e:  # (another ImportError, e.g. a name a triton release lacks: below)
        if e.name == "triton" or (e.name or "").startswith("triton."):
            return None, f"triton is not importable ({e}); install it with `pip install triton`"
        if e.name == "attrefine_fast.kernels":  # a checkout run without installing the package
            return None, ("the Triton kernels are not installed (attrefine_fast.kernels); install the package with "
                          "`pip install --no-build-isolation -e .`")
        _triton_load_error = f"the Triton kernels failed to load: {type(e).__name__}: {e}"
        return None, _triton_load_error
    except Exception as e:  # the other backends stay usable; backend="triton" raises this reason
        version = getattr(sys.modules.get("triton"), "__version__", "(version unknown)")
        _triton_load_error = f"the Triton kernels failed to load with triton {version}: {type(e).__name__}: {e}"
        return None, _triton_load_error
    impl = kernels.get(op) if hasattr(kernels, "get") else None
    if impl is None:
        return None, f"no Triton kernel for {op} yet"
    return impl, ""


def status(op: str, backend: str, device_type: str) -> tuple[bool, str]:
    """(available, reason) for running ``op`` with ``backend`` on tensors of ``device_type``."""
    _check_op(op)
    _check_backend(backend)
    if backend == "torch":
        return True, "pure PyTorch reference"
    if backend == "cpp":
        if device_type != "cpu":
            return False, "the cpp backend runs on CPU tensors"
        if not _extension.loaded():
            return False, _extension.load_error()
        if not has_compiled(op, "CPU"):
            return False, f"the compiled extension has no CPU kernel for {op}"
        return True, "C++/OpenMP kernel"
    if backend == "cuda":
        if device_type != "cuda":
            return False, "the cuda backend runs on CUDA tensors"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        if not _extension.loaded():
            return False, _extension.load_error()
        if not has_compiled(op, "CUDA"):
            return False, (
                f"the compiled extension has no CUDA kernel for {op}: rebuild with a CUDA-enabled torch "
                "and a CUDA toolkit of its CUDA major version (`pip install -v --no-build-isolation -e .` shows why "
                "the build skipped CUDA)"
            )
        return True, "CUDA C++ kernel"
    if backend == "triton":
        if device_type == "cpu" and not _triton_interpreter():
            return False, "Triton runs on CUDA tensors; on CPU only under TRITON_INTERPRET=1 (for tests)"
        if device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device is available"
        impl, why = _triton(op)
        if impl is None:
            return False, why
        return True, "Triton kernel" + (" (interpreter)" if device_type == "cpu" else "")
    raise ValueError("status() of backend 'auto': ask for the backend selected() names")


def resolve(op: str, backend: str, device: torch.device | str) -> Callable:
    """The implementation of ``op`` for ``backend`` on ``device``, with the schema's signature.

    Under torch.compile the choice is made once, while tracing, and the graph calls what it names.
    A refusal is raised here, outside the constant-folded lookups, so that a compiled caller gets
    the same BackendUnavailable or ValueError as an eager one (an exception raised inside them
    reaches the caller wrapped in torch._dynamo's InternalTorchDynamoError).
    """
    _check_op(op)
    _check_backend(backend)
    device_type = torch.device(device).type
    refusal = _refusal(op, backend, device_type)
    if refusal:
        raise BackendUnavailable(refusal)
    return _implementation(op, _choice(op, backend, device_type))


@torch.compiler.assume_constant_result  # traced as the text it returns (its lookups are not traceable)
def _refusal(op: str, backend: str, device_type: str) -> str:
    """Why ``backend`` cannot run ``op`` on ``device_type``; empty when it can (or for "auto")."""
    if backend == "auto":
        return ""
    ok, why = status(op, backend, device_type)
    return "" if ok else f"backend {backend!r} cannot run {op} on {device_type}: {why}"


@torch.compiler.assume_constant_result  # traced as the name it returns
def _choice(op: str, backend: str, device_type: str) -> str:
    return selected(op, backend, device_type)


def _implementation(op: str, backend: str) -> Callable:
    """The implementation of an available backend."""
    if backend == "torch":
        return _reference(op)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.attrefine_fast, op).default
    return _triton(op)[0]


def selected(op: str, backend: str, device: torch.device | str) -> str:
    """The name of the backend ``resolve`` would pick (for logs and reports)."""
    device_type = torch.device(device).type
    if backend != "auto":
        return backend
    for candidate in AUTO_ORDER.get(device_type, {}).get(op, ("torch",)):
        if status(op, candidate, device_type)[0]:
            return candidate
    return "torch"
