"""Argument checks on the device for the Triton ops, as csrc/cuda/flag_pass.cuh does for the
CUDA ones.

A check that needs the data (segment ids in range, a finite gradient) would otherwise bring a
reduction to the host before the launch, leaving the GPU idle while the host waits and then
launches. Instead one pass over the array sets a flag, the writing kernel reads the flag first
and writes nothing if it is set (a caller's buffer stays as it was), and the launcher reads the
flag once, after its launches, to raise the op's error.

    flag = new_flag(device)                       # int32 zero
    flag_pass(segments, flag, within=(0, M))      # or flag_pass(grad, flag)  (non-finite)
    ... launch the kernels, each reading flag_ptr ...
    raise_if_flagged(flag, host_check, "perturb")   # host_check raises the contract's error
"""
import torch
import triton
import triton.language as tl

from .contracts import concrete
from .op_registration import cdiv, wrap_triton

# Not measured (no GPU when written): an elementwise read, 2048 elements per program.
BLOCK = 2048


@triton.jit
def _flag_pass_kernel(
    data_ptr, flag_ptr,
    numel, C, H, W, lo, hi,
    s_b, s_c, s_h, s_w,
    RANGE: tl.constexpr, BLOCK: tl.constexpr,
):
    """flag = 1 where an element of data, a (B, C, H, W) array of any strides, is an integer
    outside [lo, hi) (RANGE) or a NaN or an infinity (not RANGE)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    x = offs % W
    rest = offs // W
    y = rest % H
    rest = rest // H
    v = tl.load(data_ptr + (rest // C) * s_b + (rest % C) * s_c + y * s_h + x * s_w, mask=inside, other=0)
    if RANGE:
        bad = (v < lo) | (v >= hi)
    else:
        v = v.to(tl.float64) if v.dtype == tl.float64 else v.to(tl.float32)
        bad = (v - v) != 0  # NaN for a NaN or an infinity, 0 for every finite value
    count = tl.sum((bad & inside).to(tl.int32), axis=0)
    # every program that stores, stores 1; not a masked store: Triton < 3.3's interpreter ignores a scalar mask
    if count > 0:
        tl.store(flag_ptr, 1)


def new_flag(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def flag_pass(data: torch.Tensor, flag: torch.Tensor, within: tuple[int, int] | None = None) -> None:
    """Set flag where data (1 to 4 dimensions) holds an integer outside [lo, hi) = within, or,
    without within, a non-finite value."""
    if data.numel() == 0:
        return
    view = data
    while view.dim() < 4:  # leading dimensions of 1: a view, any strides kept
        view = view.unsqueeze(0)
    b, c, h, w = view.shape
    lo, hi = within if within is not None else (0, 0)
    wrap_triton(_flag_pass_kernel)[(cdiv(view.numel(), BLOCK),)](
        view, flag,
        view.numel(), c, h, w, lo, hi,
        *view.stride(),
        RANGE=within is not None, BLOCK=BLOCK,
    )


def flag_values(*flags: torch.Tensor) -> list[int]:
    """The flags' values, in one device-to-host copy; zeros while traced, where there is no data
    to read (the checks are skipped there, as the op's other checks are)."""
    if not concrete(*flags):
        return [0] * len(flags)
    return (torch.cat(flags) if len(flags) > 1 else flags[0]).tolist()


def raise_if_flagged(flag: torch.Tensor, host_check, op: str, *others: torch.Tensor) -> list[int]:
    """After the launches: where a pass set the flag, ``host_check()`` raises the contract's error
    (it names what is wrong, which the flag does not); should it find nothing, the two checks
    disagree, which is a bug and raised as one. ``others``: one-element flags of the launcher's
    own, read in the same copy; returns every flag's value."""
    values = flag_values(flag, *others)
    if values[0]:
        host_check()
        raise RuntimeError(f"{op}: the check on the device flagged input that the host's check accepts")
    return values
