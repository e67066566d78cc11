"""masked_pgd_step: one PGD update restricted to / weighted by a per-pixel mask, in place.

    L-inf:  x_adv += step_size * weight * sign(grad)
    L2:     g = weight * grad;  x_adv += step_size * (g / (‖g‖₂ + 1e-10))    (per sample;
            2^-24 instead of 1e-10 in float16, where 1e-10 rounds to 0)
    then    δ = x_adv - x projected to the ε-ball (clamp to [-ε, ε] for L-inf, scaled by
            min(1, ε / ‖δ‖₂) for L2, 1 where ‖δ‖₂ = 0), and x_adv = clamp(x + δ, lo, hi).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import backends
from ..checks import (
    FLOAT_DTYPES, check_choice, check_finite, check_no_partial_overlap, check_real, check_same_device, check_tensor, check_written_in_place, require,
)

NORMS = ("linf", "l2")
# The same guard torchattacks uses against a zero gradient or a zero perturbation.
EPS_FOR_DIVISION = 1e-10
# float16 cannot hold 1e-10 (it rounds to 0, and a zero gradient gave 0 / 0): its smallest
# subnormal instead, which leaves every non-zero norm as it was.
FLOAT16_EPS_FOR_DIVISION = 2.0**-24


def division_guard(dtype: torch.dtype) -> float:
    """What is added to ‖g‖ before dividing by it, in tensors of ``dtype``."""
    return FLOAT16_EPS_FOR_DIVISION if dtype == torch.float16 else EPS_FOR_DIVISION


def bound_in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` as a bound for tensors of ``dtype``: beyond the largest finite value it is that
    value, or ±inf where it rounds to infinity (as the kernels round their bounds); clamp would
    refuse a Python float the dtype cannot hold."""
    info = torch.finfo(dtype)
    if abs(value) <= info.max:
        return value
    # half an ulp at the largest value; its exponent from frexp (log2 of float64's max rounds to 1024)
    half_ulp = 2.0 ** (math.frexp(info.max)[1] - 1) * info.eps / 2
    return math.copysign(math.inf if abs(value) >= info.max + half_ulp else info.max, value)


def masked_pgd_step_ref(
    x_adv: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor | None,
    step_size: float,
    eps: float,
    lo: float,
    hi: float,
    norm: str,
) -> torch.Tensor:
    """Pure-PyTorch reference; updates ``x_adv`` in place and returns it.

    Args:
        x_adv: (B, C, H, W) float, the adversarial batch (updated in place).
        x: (B, C, H, W), the clean batch, same dtype.
        grad: (B, C, H, W), the loss gradient at x_adv, same dtype.
        weight: optional (B, H, W) per-pixel weight in [0, 1], broadcast over channels.
        step_size, eps: the step and the radius of the ε-ball around x.
        lo, hi: the valid range.
        norm: "linf" or "l2".
    """
    b = x.shape[0]
    w = None if weight is None else weight.unsqueeze(1).to(x_adv.dtype)
    if norm == "linf":
        step = grad.sign()
        if w is not None:
            step = step * w
        bound = bound_in_dtype(eps, x_adv.dtype)
        delta = (x_adv + step_size * step - x).clamp(-bound, bound)
    else:
        g = grad if w is None else grad * w
        g_norm = g.flatten(1).norm(dim=1).view(b, 1, 1, 1) + division_guard(g.dtype)
        # Normalized first, then stepped (as torchattacks' PGDL2): |g| / ‖g‖ <= 1, so no step
        # overflows float16 where step_size * g would.
        delta = x_adv + step_size * (g / g_norm) - x
        d_norm = delta.flatten(1).norm(dim=1).view(b, 1, 1, 1)
        # ε = ‖δ‖ = 0 gives 0 / 0: δ is zero then, and stays zero with a factor of 1.
        delta = delta * torch.clamp(eps / d_norm, max=1.0).nan_to_num(nan=1.0)
    x_adv.copy_((x + delta).clamp(bound_in_dtype(lo, x_adv.dtype), bound_in_dtype(hi, x_adv.dtype)))
    return x_adv


@torch.no_grad()
def masked_pgd_step(
    x_adv: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    step_size: float,
    eps: float,
    lo: float = 0.0,
    hi: float = 1.0,
    norm: str = "linf",
    backend: str = "auto",
) -> torch.Tensor:
    """One masked PGD step, in place on ``x_adv`` (returned): see :func:`masked_pgd_step_ref`.

    ``x_adv``, ``x`` and ``grad`` must be finite and ``weight`` in [0, 1]; nothing is written when
    they are not. A loop that steps many times can validate once and call :func:`resolve_step`'s
    implementation instead (as the attacks do)."""
    check_tensor("x_adv", x_adv, ndim=4, dtypes=FLOAT_DTYPES)
    for name, t in (("x", x), ("grad", grad)):
        check_tensor(name, t, ndim=4, dtypes=(x_adv.dtype,))
        if t.shape != x_adv.shape:
            raise ValueError(f"{name} must have the shape of x_adv {tuple(x_adv.shape)}, got {tuple(t.shape)}")
    check_choice("norm", norm, NORMS)
    check_same_device(x_adv=x_adv, x=x, grad=grad, weight=weight)
    if x_adv.requires_grad:
        raise ValueError("x_adv requires grad: the step writes it in place and is not differentiable; pass x_adv.detach()")
    check_written_in_place("x_adv", x_adv)
    check_no_partial_overlap("x_adv", x_adv, x=x, grad=grad, weight=weight)
    check_finite("x_adv", x_adv)
    check_finite("x", x)
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES + (torch.bool,))
        b, _, h, w = x_adv.shape
        if weight.dim() == 4 and weight.shape[1] == 1:
            weight = weight[:, 0]
        if tuple(weight.shape) != (b, h, w):
            raise ValueError(f"weight must have shape (B, H, W) or (B, 1, H, W) = {(b, h, w)}, got {tuple(weight.shape)}")
        weight = weight.to(x_adv.dtype).contiguous()
        require(((weight >= 0) & (weight <= 1)).all(), "weight must lie in [0, 1] (and not be NaN)")  # NaN fails both
    step_size = check_real("step_size", step_size, minimum=0.0)
    eps = check_real("eps", eps, minimum=0.0, finite=False)  # an infinite ball: projection does nothing
    lo, hi = check_real("lo", lo, finite=False), check_real("hi", hi, finite=False)
    if not lo <= hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    step = resolve_step(backend, x_adv.device)
    step(x_adv, x, grad, weight, float(step_size), float(eps), float(lo), float(hi), norm)
    return x_adv


def resolve_step(backend: str, device: torch.device | str) -> Callable:
    """The implementation :func:`masked_pgd_step` runs, with the schema's positional arguments,
    for loops that validate their other arguments once and step many times (the attacks).

    It refuses a non-finite ``grad`` before anything is written (a NaN would poison x_adv): the
    compiled backends check it themselves, the CUDA and Triton ones on the device without a host
    round trip before their launch; the reference is given the same check here.
    """
    impl = backends.resolve("masked_pgd_step", backend, device)
    if impl is not masked_pgd_step_ref:
        return impl

    def checked_reference(x_adv, x, grad, *args):
        check_finite("grad", grad)
        return masked_pgd_step_ref(x_adv, x, grad, *args)

    return checked_reference
