"""How the Triton kernels become torch ops that torch.compile can see through, and how eager
calls skip the dispatcher.

``torch.library.triton_op`` + ``wrap_triton`` (torch >= 2.6) let Inductor trace into the
launcher and schedule the Triton kernels itself. The ops get their own names in our namespace
(``attrefine_fast::<op>_triton``) with the same signature as the C++ schema ``attrefine_fast::<op>``:
the CPU and CUDA dispatch keys of the C++ schema belong to the compiled extension (the ``cpp`` and
``cuda`` backends), a kernel registered there would be opaque to Inductor, and the Triton ops must
work whether or not the extension was built. On torch 2.4/2.5 they fall back to an opaque
``torch.library.custom_op`` calling the kernels directly, with the fake implementation of the op
it stands in for (attrefine_fast/ops/fakes.py): torch.compile runs it as one opaque call.

A :class:`TritonOp` is that registered op plus a direct eager call. Through the dispatcher a
call pays for the autograd, ADInplaceOrView and dynamo-disable layers of a Python custom op
(about 55 us of a 110 us call, measured with the launches stubbed out on a 2-core CPU) before
it reaches a launch of a few microseconds, a large share of a GPU call whose kernel runs for
tens of microseconds. Calling a TritonOp runs the same checks and launcher itself when nothing
needs those layers: plain tensors, no tracing or compiling, no input that requires grad.
Anything else goes through the op, so torch.compile, fake tensors and autograd's "not
differentiable" error behave exactly as for ``torch.ops.attrefine_fast.<op>_triton``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from attrefine_fast.ops.fakes import FAKES

from .contracts import concrete

NAMESPACE = "attrefine_fast"
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
_launching = threading.local()  # .direct: a TritonOp's eager call is launching on this thread


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def wrap_triton(kernel):
    """The kernel as a launcher calls it: traceable inside a triton_op, the plain kernel in a
    direct eager call, under the interpreter (eager calls only; torch 2.8's wrap_triton refuses
    interpreted kernels) and on torch without wrap_triton."""
    if not _HAS_TRITON_OP or interpreting() or getattr(_launching, "direct", False):
        return kernel
    return torch.library.wrap_triton(kernel)


class TritonOp:
    """``launch`` registered as ``attrefine_fast::<name>`` (its annotations give the schema),
    with ``check`` (the op's argument contract, same arguments) run first on real tensors.

    ``.op`` is the registered op; calling the TritonOp itself runs check and launch directly
    when the call needs nothing of the dispatcher (see the module docstring), else ``.op``.
    """

    def __init__(self, name: str, launch, check, mutates_args=()):
        self.launch, self.check = launch, check
        names = list(launch.__code__.co_varnames[: launch.__code__.co_argcount])
        self._mutated = tuple(names.index(arg) for arg in mutates_args)

        @functools.wraps(launch)
        def checked(*args):
            if not concrete(*args):  # traced: the compiled graph sets the device itself
                return launch(*args)
            check(*args)
            with device_of(args):
                return launch(*args)

        qualname = f"{NAMESPACE}::{name}"
        if _HAS_TRITON_OP:
            self.op = torch.library.triton_op(qualname, mutates_args=mutates_args)(checked)
        else:  # an opaque op: torch.compile needs its fake implementation, that of the schema it stands in for
            self.op = torch.library.custom_op(qualname, mutates_args=mutates_args)(checked)
            self.op.register_fake(FAKES[name.removesuffix("_triton")])

    def __call__(self, *args, **kwargs):
        if kwargs or not _direct_call_allowed(args):
            return self.op(*args, **kwargs)
        self.check(*args)
        outer = getattr(_launching, "direct", False)
        _launching.direct = True
        try:
            with device_of(args):
                result = self.launch(*args)
        finally:
            _launching.direct = outer
        for i in self._mutated:  # written through pointers: tell autograd, as an in-place op does
            torch.autograd.graph.increment_version(args[i])
        return result


def device_of(args):
    """The tensors' CUDA device made current for the launches: Triton launches on the current
    device and its stream, not on its arguments' device (a cuda:1 tensor would be read by a
    kernel running on cuda:0)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return torch.cuda.device(a.device)
    return contextlib.nullcontext()


# vmap / grad of torch.func wrap tensors in ways a type check does not see
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _direct_call_allowed(args) -> bool:
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or _functorch_active():
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(type(t) is not torch.Tensor for t in tensors):  # fake, functional or other subclasses
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def scalars(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Python floats as a 1-D tensor a kernel reads (Triton passes float arguments as float32).

    On a CUDA device ``torch.tensor`` copies from pageable host memory and waits for the stream
    to drain, which would put a host round trip in front of every launch; a direct eager call
    takes the tensor from a small cache instead (kernels only read it). A traced call makes its
    own, so that the graph holds no real tensor."""
    if getattr(_launching, "direct", False):
        # float.hex keeps -0.0 apart from 0.0 (a clamp bound of either sign means what it says)
        return _cached_scalars(tuple(float(v).hex() for v in values), dtype, device)
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _cached_scalars(hex_values: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([float.fromhex(v) for v in hex_values], dtype=dtype, device=device)


def cdiv(a, b):
    """ceil(a / b) for sizes on the host (triton.cdiv is a constexpr function, several times
    slower to call from Python; this one also takes symbolic sizes)."""
    return (a + b - 1) // b


# CUDA allows at most 65,535 programs on grid axes 1 and 2; a kernel with more blocks than that
# on axis 1 strides over them.
GRID_AXIS_LIMIT = 65535


def grid_axis(n: int):
    """The programs to launch on grid axis 1 for ``n`` blocks (the kernel strides over the rest);
    ``n`` may be a symbolic size."""
    return torch.sym_min(n, GRID_AXIS_LIMIT)


# Triton passes sizes and strides below 2^31 as int32, so the kernels' offsets within a sample
# (index times stride; only the sample index is int64) are int32 products, which wrap for a
# tensor whose sample spans 2^31 elements or more: a transposed batch of large images, say. The
# kernels compute them in int64 where their INT64_INDEX says so. The limit leaves room for the
# masked lanes of an element block past a sample's end (blocks of at most 65,536).
INT32_SPAN_LIMIT = 2**31 - 2**16


def sample_span(t: torch.Tensor) -> int:
    """The largest offset, in elements, of an element of t's first sample from its first
    element: the sum over the other dimensions of (size - 1) * |stride|."""
    return sum(max(n - 1, 0) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]))


def int64_index(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel indexing these (B, ...) tensors needs int64 offsets within a sample."""
    return any(t is not None and sample_span(t) >= INT32_SPAN_LIMIT for t in tensors)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), as triton.next_power_of_2, at a Python call's cost."""
    return 1 << (n - 1).bit_length()


def autotune_configs(configs):
    """All configurations on a GPU; the first only under the interpreter, where timing means
    nothing and every extra configuration is a slow extra run."""
    return configs[:1] if interpreting() else configs
