"""Triton perturb: LIME's perturbed images for a chunk of samples, in one pass over the output.

    out[b * count + i, c, y, x] = norm(where(masks[b, offset + i, segments[b, y, x]],
                                             images[b, c, y, x], fudge[b, c, y, x]))

images, fudge (B, C, H, W); segments (B, H, W) int64; masks (B, N, M) bool; optional mean/std (C,)
-> (B * count, C, H, W) in perturb_output_dtype(...), contiguous or channels-last. Every input
may be non-contiguous (strides are passed), and the output layout is just another set of
strides, so channels-last costs nothing extra. Matches attrefine_fast.ops.perturb.perturb_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attrefine_fast.ops.perturb import perturb_output_dtype

from .contracts import check_perturb, check_perturb_into, concrete
from .op_registration import autotune_configs, triton_op, wrap_triton

# Not measured: no GPU was available when these were written. The candidates cover 32x32
# (1,024 pixels: one block of 1024 or four of 256) and 224x224 (50,176 pixels) images; the
# key lists only the sizes that change the best choice. SAMPLES samples share one program so
# that the segment ids of a pixel block are read once per SAMPLES outputs, not once per output.
_CONFIGS = [
    triton.Config({"BLOCK": 1024, "SAMPLES": 4}, num_warps=4),
    triton.Config({"BLOCK": 256, "SAMPLES": 8}, num_warps=2),
    triton.Config({"BLOCK": 512, "SAMPLES": 4}, num_warps=4),
    triton.Config({"BLOCK": 1024, "SAMPLES": 1}, num_warps=4),
    triton.Config({"BLOCK": 1024, "SAMPLES": 8}, num_warps=4),
    triton.Config({"BLOCK": 2048, "SAMPLES": 2}, num_warps=8),
]


@triton.autotune(configs=autotune_configs(_CONFIGS), key=["HW", "C"])
@triton.jit
def _perturb_kernel(
    # pointers
    images_ptr, fudge_ptr, segments_ptr, masks_ptr, mean_ptr, std_ptr, out_ptr,
    # sizes
    C, W, HW, offset, count,
    # strides (elements)
    si_b, si_c, si_h, si_w,
    sf_b, sf_c, sf_h, sf_w,
    ss_b, ss_h, ss_w,
    sm_b, sm_n, sm_m,
    so_n, so_c, so_h, so_w,
    # compile-time
    NORMALIZE: tl.constexpr, COMPUTE_F64: tl.constexpr, HALF_OUT: tl.constexpr,
    BLOCK: tl.constexpr, SAMPLES: tl.constexpr,
):
    groups = tl.cdiv(count, SAMPLES)  # sample groups per image
    b = (tl.program_id(0) // groups).to(tl.int64)
    first = (tl.program_id(0) % groups) * SAMPLES
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < HW
    y = pix // W
    x = pix % W
    seg = tl.load(segments_ptr + b * ss_b + y * ss_h + x * ss_w, mask=inside, other=0)
    image_at = images_ptr + b * si_b + y * si_h + x * si_w
    fudge_at = fudge_ptr + b * sf_b + y * sf_h + x * sf_w

    for s in range(0, SAMPLES):
        i = first + s
        live = pix < tl.where(i < count, HW, 0)  # no pixel of a sample past count
        keep = tl.load(masks_ptr + b * sm_b + (offset + i) * sm_n + seg * sm_m, mask=live, other=0) != 0
        out_at = out_ptr + (b * count + i) * so_n + y * so_h + x * so_w
        # Only the kept source is read at each pixel: the other load is masked off.
        for ch in range(0, C):
            v = tl.load(image_at + ch * si_c, mask=live & keep, other=0)
            v = tl.where(keep, v, tl.load(fudge_at + ch * sf_c, mask=live & ~keep, other=0))
            if NORMALIZE:
                if COMPUTE_F64:
                    v = (v.to(tl.float64) - tl.load(mean_ptr + ch)) / tl.load(std_ptr + ch)
                else:
                    v = (v.to(tl.float32) - tl.load(mean_ptr + ch)) / tl.load(std_ptr + ch)
            if HALF_OUT:  # float64 -> 16 bits goes through float32, as torch's conversion does
                v = v.to(tl.float32)
            tl.store(out_at + ch * so_c, v.to(out_ptr.dtype.element_ty), mask=live)


def _write_samples(images, segments, masks, fudge, offset, count, mean, std, out) -> None:
    """Launch the kernel for samples [offset, offset + count) into ``out`` (any strides)."""
    b, c, h, w = images.shape
    normalized = mean is not None
    compute_f64 = images.dtype == torch.float64
    if normalized:
        compute = torch.float64 if compute_f64 else torch.float32
        mean, std = mean.to(compute), std.to(compute)
    else:  # never read: NORMALIZE is off
        mean = std = images
    grid = lambda meta: (b * triton.cdiv(count, meta["SAMPLES"]), triton.cdiv(h * w, meta["BLOCK"]))  # noqa: E731
    wrap_triton(_perturb_kernel)[grid](
        images, fudge, segments, masks, mean, std, out,
        c, w, h * w, offset, count,
        *images.stride(), *fudge.stride(), *segments.stride(), *masks.stride(), *out.stride(),
        NORMALIZE=normalized, COMPUTE_F64=compute_f64, HALF_OUT=out.dtype in (torch.float16, torch.bfloat16),
    )


@triton_op("perturb_triton", mutates_args=())
def perturb_triton(
    images: torch.Tensor,
    segments: torch.Tensor,
    masks: torch.Tensor,
    fudge: torch.Tensor,
    offset: int,
    count: int,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    channels_last: bool,
) -> torch.Tensor:
    if concrete(images, segments, masks, fudge, mean, std):
        check_perturb(images, segments, masks, fudge, offset, count, mean, std, out_dtype)
    b, c, h, w = images.shape
    out = torch.empty(
        (b * count, c, h, w),
        dtype=perturb_output_dtype(images.dtype, mean is not None, out_dtype),
        device=images.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    _write_samples(images, segments, masks, fudge, offset, count, mean, std, out)
    return out


@triton_op("perturb_into_triton", mutates_args={"out"})
def perturb_into_triton(
    images: torch.Tensor,
    segments: torch.Tensor,
    masks: torch.Tensor,
    fudge: torch.Tensor,
    offset: int,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    if concrete(images, segments, masks, fudge, mean, std, out):
        check_perturb_into(images, segments, masks, fudge, offset, mean, std, out)
    _write_samples(images, segments, masks, fudge, offset, out.shape[0] // images.shape[0], mean, std, out)
