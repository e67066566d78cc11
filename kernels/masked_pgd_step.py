"""Triton masked_pgd_step: one PGD update with a per-pixel weight, in place on x_adv.

x_adv, x, grad (B, C, H, W) float; optional weight (B, H, W) broadcast over channels.
Matches attrefine_fast.ops.masked_pgd_step.masked_pgd_step_ref:
    L-inf: δ = clamp(x_adv + step·w·sign(grad) - x, -ε, ε)                     (one launch)
    L2:    g = w·grad, δ = x_adv + step·(g/(‖g‖+1e-10)) - x, δ ·= min(1, ε/‖δ‖)  (three launches:
           partial sums of ‖g‖², then of ‖δ‖², then the update; each launch adds up the
           row of partial sums of its sample itself, so the result is deterministic)
    then x_adv = clamp(x + δ, lo, hi).
Any strides; float64 computes in float64, the others in float32. The reference computes op by op in
the tensor's dtype, so for float16/bfloat16 every intermediate it materializes is rounded to that
dtype at the same point here; float32 and float64 need no rounding.
A finite gradient is checked on the device (kernels/device_checks.py): a pass over grad sets a
flag that every launch reads first, so a NaN or an infinity writes nothing, and the error is
raised after the launches instead of a host round trip before them. L2 also flags a non-finite
x_adv or x in its second stage (as the C++ kernels refuse a non-finite ‖x_adv - x‖), before the
update writes.
"""
import torch
import triton
import triton.language as tl

from attrefine_fast.checks import check_finite
from attrefine_fast.ops.masked_pgd_step import EPS_FOR_DIVISION, FLOAT16_EPS_FOR_DIVISION

from .contracts import check_masked_pgd_step
from .device_checks import flag_pass, new_flag, raise_if_flagged
from .op_registration import TritonOp, cdiv, grid_axis, int64_index, scalars, wrap_triton

# An elementwise pass: 1024 elements per program keeps 32x32x3 images at 3 programs per sample.
# Not measured (no GPU when written), so no autotuning; an in-place kernel would also need its
# input restored between autotuning runs.
BLOCK = 1024
_EPS_FOR_DIVISION = tl.constexpr(EPS_FOR_DIVISION)
_FLOAT16_EPS_FOR_DIVISION = tl.constexpr(FLOAT16_EPS_FOR_DIVISION)


@triton.jit
def _element(ptr, b, offs, HW, W, s_b, s_c, s_h, s_w, FLAT: tl.constexpr):
    if FLAT:  # contiguous NCHW: no index arithmetic
        return ptr + b * s_b + offs
    c = offs // HW
    p = offs % HW
    return ptr + b * s_b + c * s_c + (p // W) * s_h + (p % W) * s_w


@triton.jit
def _load_step(
    x_adv_ptr, x_ptr, grad_ptr, weight_ptr, b, offs, inside, C, HW, W,
    sa_b, sa_c, sa_h, sa_w, sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, sw_b, sw_h, sw_w,
    HAS_WEIGHT: tl.constexpr, F64: tl.constexpr, FLAT: tl.constexpr,
):
    """x_adv, x and the weighted gradient at flat positions offs of sample b."""
    dtype = tl.float64 if F64 else tl.float32
    a = tl.load(_element(x_adv_ptr, b, offs, HW, W, sa_b, sa_c, sa_h, sa_w, FLAT), mask=inside, other=0).to(dtype)
    x = tl.load(_element(x_ptr, b, offs, HW, W, sx_b, sx_c, sx_h, sx_w, FLAT), mask=inside, other=0).to(dtype)
    g = tl.load(_element(grad_ptr, b, offs, HW, W, sg_b, sg_c, sg_h, sg_w, FLAT), mask=inside, other=0).to(dtype)
    wt = tl.full(g.shape, 1, dtype)
    if HAS_WEIGHT:
        p = offs % HW
        wt = tl.load(weight_ptr + b * sw_b + (p // W) * sw_h + (p % W) * sw_w, mask=inside, other=0).to(dtype)
    return a, x, g, wt


@triton.jit
def _rnd(v, T: tl.constexpr):
    """float32 v rounded to T (float16, bfloat16) and back; v itself for float32 and float64."""
    if T == tl.float16:
        v = v.to(tl.float16).to(tl.float32)
    elif T == tl.bfloat16:
        # to nearest even by hand: the interpreter truncates a float32 -> bfloat16 cast
        bits = v.to(tl.uint32, bitcast=True)
        v = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _div(a, b, T: tl.constexpr):
    """a / b, correctly rounded where the quotient is then rounded to float16/bfloat16 (the GPU's
    default float32 division is approximate, enough to move that rounding)."""
    if T == tl.float16 or T == tl.bfloat16:
        return tl.div_rn(a, b)
    return a / b


@triton.jit
def _row_total(partial_ptr, b, num_blocks, BLOCK_P: tl.constexpr, F64: tl.constexpr):
    dtype = tl.float64 if F64 else tl.float32
    acc = tl.zeros((BLOCK_P,), dtype)
    for i in range(0, num_blocks, BLOCK_P):
        j = i + tl.arange(0, BLOCK_P)
        acc += tl.load(partial_ptr + b * num_blocks + j, mask=j < num_blocks, other=0)
    return tl.sum(acc, axis=0)


@triton.jit
def _masked_pgd_kernel(
    # pointers
    x_adv_ptr, x_ptr, grad_ptr, weight_ptr, params_ptr, g_partial_ptr, d_partial_ptr, flag_ptr,
    # sizes
    C, HW, W, num_blocks,
    # strides (elements)
    sa_b, sa_c, sa_h, sa_w, sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, sw_b, sw_h, sw_w,
    # compile-time
    STAGE: tl.constexpr, L2: tl.constexpr, HAS_WEIGHT: tl.constexpr, F64: tl.constexpr,
    FLAT: tl.constexpr, INT64_INDEX: tl.constexpr, BLOCK: tl.constexpr,
):
    """STAGE 0: L2 partial sums of g²; STAGE 1: L2 partial sums of δ²; STAGE 2: the update."""
    b = tl.program_id(0).to(tl.int64)
    # offsets within a sample in 64 bits where they can pass int32 (op_registration.int64_index):
    # every offset derives from offs, which then holds them
    index_t = tl.int64 if INT64_INDEX else tl.int32
    C, HW, W = tl.cast(C, index_t), tl.cast(HW, index_t), tl.cast(W, index_t)
    # a non-finite grad (flag set by the pass before): nothing is read or written
    limit = tl.where(tl.load(flag_ptr) == 0, C * HW, 0)
    step_size = tl.load(params_ptr)
    eps = tl.load(params_ptr + 1)
    lo = tl.load(params_ptr + 2)
    hi = tl.load(params_ptr + 3)
    T = x_adv_ptr.dtype.element_ty
    # L2: the sample's norms, from the row of partial sums the stages before wrote, once per
    # program (not per block: a row of num_blocks sums)
    if L2 and STAGE >= 1:
        if F64:
            g_norm = tl.sqrt(_row_total(g_partial_ptr, b, num_blocks, 128, F64)) + _EPS_FOR_DIVISION
        else:
            # torch's norm is rounded to the dtype, then its sum with the guard
            guard = _FLOAT16_EPS_FOR_DIVISION if T == tl.float16 else _EPS_FOR_DIVISION
            g_norm = _rnd(_rnd(tl.sqrt_rn(_row_total(g_partial_ptr, b, num_blocks, 128, F64)), T) + guard, T)
    if L2 and STAGE == 2:
        if F64:
            d_norm = tl.sqrt(_row_total(d_partial_ptr, b, num_blocks, 128, F64))
        else:
            d_norm = _rnd(tl.sqrt_rn(_row_total(d_partial_ptr, b, num_blocks, 128, F64)), T)
    # a stride over the element blocks: CUDA allows at most 65,535 programs on grid axis 1
    for blk in tl.range(tl.program_id(1), num_blocks, tl.num_programs(1)):
        offs = tl.cast(blk, index_t) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < limit
        a, x, g, wt = _load_step(
            x_adv_ptr, x_ptr, grad_ptr, weight_ptr, b, offs, inside, C, HW, W,
            sa_b, sa_c, sa_h, sa_w, sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, sw_b, sw_h, sw_w,
            HAS_WEIGHT, F64, FLAT,
        )
        if L2:
            g = _rnd(g * wt, T)
            if STAGE == 0:
                tl.store(g_partial_ptr + b * num_blocks + blk, tl.sum(g * g, axis=0))
            else:
                # ((a + step·(g / ‖g‖)) - x), each result rounded as the reference's ops round it
                delta = _rnd(_rnd(a + _rnd(step_size * _rnd(_div(g, g_norm, T), T), T), T) - x, T)
                delta = tl.where(inside, delta, 0)
                if STAGE == 1:
                    tl.store(d_partial_ptr + b * num_blocks + blk, tl.sum(delta * delta, axis=0))
                    # a NaN or an infinity in x_adv or x (0 for every finite value): the update
                    # stage, launched after this one, then writes nothing
                    if tl.sum(tl.where(inside, (a - a) + (x - x), 0), axis=0) != 0:
                        tl.store(flag_ptr, 1)
                else:
                    # d_norm = 0 (then delta = 0): a factor of 1, with no 0 / 0 computed on the way
                    moved = d_norm > 0
                    if T == tl.float16 or T == tl.bfloat16:
                        # the reference's eps / ‖δ‖ is Tensor.__rdiv__: reciprocal, then a product
                        ratio = _rnd(eps * _rnd(tl.div_rn(1.0, tl.where(moved, d_norm, 1.0)), T), T)
                    else:
                        ratio = eps / tl.where(moved, d_norm, 1.0)
                    # min(ratio, 1), a NaN ratio (eps / inf as inf * 0) taken as 1 as the reference's
                    # nan_to_num does: spelled out, since Triton 3.0's interpreter's tl.minimum
                    # propagates a NaN that the GPU's and later interpreters' drop
                    delta = _rnd(delta * tl.where(moved & (ratio < 1.0), ratio, 1.0), T)
        else:
            sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(g.dtype)
            delta = _rnd(_rnd(a + _rnd(step_size * (sign * wt), T), T) - x, T)
            delta = _rnd(tl.minimum(tl.maximum(delta, -eps), eps), T)
        if STAGE == 2:
            out = _rnd(tl.minimum(tl.maximum(_rnd(x + delta, T), lo), hi), T)
            target = _element(x_adv_ptr, b, offs, HW, W, sa_b, sa_c, sa_h, sa_w, FLAT)
            tl.store(target, out.to(T), mask=inside)


def _masked_pgd_step_launcher(
    x_adv: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor | None,
    step_size: float,
    eps: float,
    lo: float,
    hi: float,
    norm: str,
) -> None:
    b, c, h, w = x_adv.shape
    f64 = x_adv.dtype == torch.float64
    compute = torch.float64 if f64 else torch.float32
    # Scalars travel as a tensor: Triton passes Python floats as float32.
    params = scalars((step_size, eps, lo, hi), compute, x_adv.device)
    num_blocks = cdiv(c * h * w, BLOCK)
    has_weight = weight is not None
    wt = weight if has_weight else x_adv  # never read when HAS_WEIGHT is off
    weight_strides = wt.stride() if has_weight else (0, 0, 0)
    l2 = norm == "l2"
    g_partial = torch.empty((b, num_blocks) if l2 else (1,), dtype=compute, device=x_adv.device)
    d_partial = torch.empty_like(g_partial)
    stages = (0, 1, 2) if l2 else (2,)
    flat = all(t.is_contiguous() for t in (x_adv, x, grad))
    wide = int64_index(x_adv, x, grad, weight)
    flag = new_flag(x_adv.device)
    flag_pass(grad, flag)
    for stage in stages:
        wrap_triton(_masked_pgd_kernel)[(b, grid_axis(num_blocks))](
            x_adv, x, grad, wt, params, g_partial, d_partial, flag,
            c, h * w, w, num_blocks,
            *x_adv.stride(), *x.stride(), *grad.stride(), *weight_strides,
            STAGE=stage, L2=l2, HAS_WEIGHT=has_weight, F64=f64, FLAT=flat, INT64_INDEX=wide, BLOCK=BLOCK,
        )
    raise_if_flagged(flag, lambda: _check_values(x_adv, x, grad), "masked_pgd_step")  # nothing was written


def _check_values(x_adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> None:
    """The error for what the device flagged: a non-finite grad, or (L2) x_adv or x."""
    for name, t in (("grad", grad), ("x_adv", x_adv), ("x", x)):
        check_finite(name, t)


masked_pgd_step_triton = TritonOp(
    "masked_pgd_step_triton", _masked_pgd_step_launcher, check_masked_pgd_step, mutates_args=("x_adv",)
)
