"""Triton segment_mean: the per-image, per-segment, per-channel mean colour (LIME's hide colour).

images (B, C, H, W) float or uint8, segments (B, H, W) int64 in [0, M) -> (B, M, C) in the
images' dtype (float64 for uint8). Matches attrefine_fast.ops.segment_mean.segment_mean_ref:
sums and pixel counts are accumulated in float64 (exact for uint8 images), a segment with no
pixels has mean 0.

Program (b, block) reduces BLOCK pixels of image b against BLOCK_M segments at a time with a
one-hot comparison, then adds its partial sums to a (B, M, C) float64 buffer with atomics, so
that even one large image spreads over many programs. The division runs in one torch call.
An id outside [0, M) matches no segment, so it cannot write out of bounds: it is flagged by a pass
on the device (kernels/device_checks.py) and the error raised after the launches.
"""
import torch
import triton
import triton.language as tl

from .contracts import check_segment_ids, check_segments_layout
from .device_checks import flag_pass, new_flag, raise_if_flagged
from .op_registration import TritonOp, cdiv, grid_axis, int64_index, wrap_triton

# Not measured (no GPU when written). BLOCK x BLOCK_M is the one-hot tile; with 8 warps ptxas
# gives the kernel 130 registers per thread for sm_90 (202 with 4 warps), without spills.
BLOCK = 256
BLOCK_M = 32
NUM_WARPS = 8


@triton.jit
def _segment_sums_kernel(
    # pointers
    images_ptr, segments_ptr, sums_ptr, counts_ptr,
    # sizes
    C, W, HW, M,
    # strides (elements); sums (B, M, C) and counts (B, M) are contiguous
    si_b, si_c, si_h, si_w, ss_b, ss_h, ss_w,
    # compile-time
    INT64_INDEX: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    # offsets within an image in 64 bits where they can pass int32 (op_registration.int64_index)
    index_t = tl.int64 if INT64_INDEX else tl.int32
    si_c, si_h, si_w = tl.cast(si_c, index_t), tl.cast(si_h, index_t), tl.cast(si_w, index_t)
    ss_h, ss_w = tl.cast(ss_h, index_t), tl.cast(ss_w, index_t)
    # a stride over the pixel blocks: CUDA allows at most 65,535 programs on grid axis 1
    for blk in tl.range(tl.program_id(1), tl.cdiv(HW, BLOCK), tl.num_programs(1)):
        pix = tl.cast(blk, index_t) * BLOCK + tl.arange(0, BLOCK)
        inside = pix < HW
        y = pix // W
        x = pix % W
        seg = tl.load(segments_ptr + b * ss_b + y * ss_h + x * ss_w, mask=inside, other=-1)
        image_at = images_ptr + b * si_b + y * si_h + x * si_w
        for m0 in range(0, M, BLOCK_M):
            labels = m0 + tl.arange(0, BLOCK_M)
            hit = seg[:, None] == labels[None, :]  # (BLOCK, BLOCK_M) one-hot
            count = tl.sum(hit.to(tl.float64), axis=0)
            # skip the atomics of segments with no pixel in this block; labels >= M (past the last
            # block of M) are written by no valid id, and an invalid one is flagged, not written
            present = (count > 0) & (labels < M)
            tl.atomic_add(counts_ptr + b * M + labels, count, mask=present)
            for ch in range(0, C):
                v = tl.load(image_at + ch * si_c, mask=inside, other=0).to(tl.float64)
                total = tl.sum(tl.where(hit, v[:, None], 0.0), axis=0)
                tl.atomic_add(sums_ptr + (b * M + labels) * C + ch, total, mask=present)


def _segment_mean_launcher(images: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    b, c, h, w = images.shape
    out_dtype = images.dtype if images.is_floating_point() else torch.float64
    sums = torch.zeros((b, num_segments, c), dtype=torch.float64, device=images.device)
    counts = torch.zeros((b, num_segments), dtype=torch.float64, device=images.device)
    flag = new_flag(images.device)
    flag_pass(segments, flag, within=(0, num_segments))
    wrap_triton(_segment_sums_kernel)[(b, grid_axis(cdiv(h * w, BLOCK)))](
        images, segments, sums, counts,
        c, w, h * w, num_segments,
        *images.stride(), *segments.stride(),
        INT64_INDEX=int64_index(images, segments), BLOCK=BLOCK, BLOCK_M=BLOCK_M, num_warps=NUM_WARPS,
    )
    raise_if_flagged(flag, lambda: check_segment_ids(segments, num_segments), "segment_mean")
    return (sums / counts.clamp_min(1).unsqueeze(2)).to(out_dtype)


segment_mean_triton = TritonOp("segment_mean_triton", _segment_mean_launcher, check_segments_layout)
