"""Triton perturb: LIME's perturbed images for a chunk of samples, in one pass over the output.

    out[b * count + i, c, y, x] = norm(where(masks[b, offset + i, segments[b, y, x]],
                                             images[b, c, y, x], fudge[b, c, y, x]))

images, fudge (B, C, H, W); segments (B, H, W) int64; masks (B, N, M) bool; optional mean/std (C,)
-> (B * count, C, H, W) in perturb_output_dtype(...), contiguous or channels-last. Every input
may be non-contiguous (strides are passed). Matches attrefine_fast.ops.perturb.perturb_ref.

The kernel is bound by the bytes it writes, so it works like the CUDA one (csrc/cuda/perturb.cu):
a program owns BLOCK consecutive elements of a sample *in the output's layout* (NCHW or NHWC),
prepares both sources for them once (load, normalize, cast) and then writes them for SAMPLES
samples, each a contiguous store of BLOCK elements and one cached mask-byte gather per element.
Sources are read once per SAMPLES outputs, and a channels-last output is written as densely
as an NCHW one. The segment ids are checked on the device, by a pass whose flag the kernel reads
first (kernels/device_checks.py).
"""
import torch
import triton
import triton.language as tl

from attrefine_fast.ops.perturb import perturb_output_dtype

from .contracts import check_perturb, check_perturb_into, check_segment_ids
from .device_checks import flag_pass, new_flag, raise_if_flagged
from .op_registration import TritonOp, autotune_configs, cdiv, grid_axis, int64_index, wrap_triton

# Not measured: no GPU was available when these were written. BLOCK counts elements of a sample
# (C * H * W: 3,072 at 32x32, 150,528 at 224x224, RGB); 8 elements per thread give two 16-byte
# float32 stores per sample. The key lists only what changes the best choice.
_CONFIGS = [
    triton.Config({"BLOCK": 1024, "SAMPLES": 4}, num_warps=4),
    triton.Config({"BLOCK": 256, "SAMPLES": 8}, num_warps=2),
    triton.Config({"BLOCK": 512, "SAMPLES": 4}, num_warps=2),
    triton.Config({"BLOCK": 1024, "SAMPLES": 8}, num_warps=4),
    triton.Config({"BLOCK": 2048, "SAMPLES": 4}, num_warps=8),
    triton.Config({"BLOCK": 4096, "SAMPLES": 2}, num_warps=8),
]


@triton.autotune(configs=autotune_configs(_CONFIGS), key=["PER_SAMPLE", "CHANNELS_LAST"])
@triton.jit
def _perturb_kernel(
    # pointers
    images_ptr, fudge_ptr, segments_ptr, masks_ptr, mean_ptr, std_ptr, out_ptr, flag_ptr,
    # sizes (PER_SAMPLE = C * H * W, the elements of one output sample)
    C, W, HW, PER_SAMPLE, offset, count,
    # strides (elements); the output is dense in its layout
    si_b, si_c, si_h, si_w,
    sf_b, sf_c, sf_h, sf_w,
    ss_b, ss_h, ss_w,
    sm_b, sm_n, sm_m,
    # compile-time
    CHANNELS_LAST: tl.constexpr, NORMALIZE: tl.constexpr, COMPUTE_F64: tl.constexpr, HALF_OUT: tl.constexpr,
    INT64_INDEX: tl.constexpr, BLOCK: tl.constexpr, SAMPLES: tl.constexpr,
):
    groups = tl.cdiv(count, SAMPLES)  # sample groups per image
    b = (tl.program_id(0) // groups).to(tl.int64)
    first = (tl.program_id(0) % groups) * SAMPLES
    # offsets within a sample in 64 bits where they can pass int32 (op_registration.int64_index):
    # the element index e and the strides it and the samples' index multiply
    index_t = tl.int64 if INT64_INDEX else tl.int32
    si_c, si_h, si_w = tl.cast(si_c, index_t), tl.cast(si_h, index_t), tl.cast(si_w, index_t)
    sf_c, sf_h, sf_w = tl.cast(sf_c, index_t), tl.cast(sf_h, index_t), tl.cast(sf_w, index_t)
    ss_h, ss_w = tl.cast(ss_h, index_t), tl.cast(ss_w, index_t)
    sm_n, sm_m = tl.cast(sm_n, index_t), tl.cast(sm_m, index_t)
    # a segment id out of range (flag set by the pass before): nothing is read or written
    limit = tl.where(tl.load(flag_ptr) == 0, PER_SAMPLE, 0)
    # a stride over the element blocks: CUDA allows at most 65,535 programs on grid axis 1
    for blk in tl.range(tl.program_id(1), tl.cdiv(PER_SAMPLE, BLOCK), tl.num_programs(1)):
        e = tl.cast(blk, index_t) * BLOCK + tl.arange(0, BLOCK)  # element of a sample, in the output's order
        inside = e < limit
        if CHANNELS_LAST:
            pix = e // C
            ch = e % C
        else:
            pix = e % HW
            ch = e // HW
        y = pix // W
        x = pix % W
        seg = tl.load(segments_ptr + b * ss_b + y * ss_h + x * ss_w, mask=inside, other=0)
        kept = tl.load(images_ptr + b * si_b + ch * si_c + y * si_h + x * si_w, mask=inside, other=0)
        replaced = tl.load(fudge_ptr + b * sf_b + ch * sf_c + y * sf_h + x * sf_w, mask=inside, other=0)
        if NORMALIZE:
            mean = tl.load(mean_ptr + ch, mask=inside, other=0)
            std = tl.load(std_ptr + ch, mask=inside, other=1)
            if COMPUTE_F64:
                kept = (kept.to(tl.float64) - mean) / std
                replaced = (replaced.to(tl.float64) - mean) / std
            else:
                kept = (kept.to(tl.float32) - mean) / std
                replaced = (replaced.to(tl.float32) - mean) / std
        if HALF_OUT:  # float64 -> 16 bits goes through float32, as torch's conversion does
            kept = kept.to(tl.float32)
            replaced = replaced.to(tl.float32)
        kept = kept.to(out_ptr.dtype.element_ty)
        replaced = replaced.to(out_ptr.dtype.element_ty)
        mask_row = masks_ptr + b * sm_b + offset * sm_n + seg * sm_m

        for s in range(0, SAMPLES):
            i = first + s
            live = e < tl.where(i < count, limit, 0)  # no element of a sample past count
            keep = tl.load(mask_row + i * sm_n, mask=live, other=0) != 0
            tl.store(out_ptr + (b * count + i) * PER_SAMPLE + e, tl.where(keep, kept, replaced), mask=live)


def _write_samples(images, segments, masks, fudge, offset, count, mean, std, out) -> None:
    """Launch the kernels for samples [offset, offset + count) into ``out`` (contiguous or
    channels-last; where both describe it, as for C = 1, the NCHW order): the segment ids'
    check on the device, then the writing kernel, which writes nothing if an id is out of range;
    the error is raised after both launches."""
    b, c, h, w = images.shape
    m = masks.shape[2]
    flag = new_flag(images.device)
    flag_pass(segments, flag, within=(0, m))
    normalized = mean is not None
    compute_f64 = images.dtype == torch.float64
    if normalized:
        compute = torch.float64 if compute_f64 else torch.float32
        mean, std = mean.to(compute).contiguous(), std.to(compute).contiguous()  # read at mean_ptr + channel
    else:  # never read: NORMALIZE is off
        mean = std = images
    grid = lambda meta: (b * cdiv(count, meta["SAMPLES"]), grid_axis(cdiv(c * h * w, meta["BLOCK"])))  # noqa: E731
    wrap_triton(_perturb_kernel)[grid](
        images, fudge, segments, masks, mean, std, out, flag,
        c, w, h * w, c * h * w, offset, count,
        *images.stride(), *fudge.stride(), *segments.stride(), *masks.stride(),
        CHANNELS_LAST=not out.is_contiguous(), NORMALIZE=normalized, COMPUTE_F64=compute_f64,
        HALF_OUT=out.dtype in (torch.float16, torch.bfloat16), INT64_INDEX=int64_index(images, fudge, segments, masks, out),
    )
    raise_if_flagged(flag, lambda: _segment_ids_error(segments, m), "perturb")


def _segment_ids_error(segments, m) -> None:
    # The launches wrote nothing: a configuration the autotuner timed on them (a first call for
    # these sizes) was chosen on no work, so it is dropped and the next call tunes again.
    _perturb_kernel.cache.clear()
    check_segment_ids(segments, m)  # the contract's error, with the ids' range


def _perturb_launcher(
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
    b, c, h, w = images.shape
    out = torch.empty(
        (b * count, c, h, w),
        dtype=perturb_output_dtype(images.dtype, mean is not None, out_dtype),
        device=images.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    _write_samples(images, segments, masks, fudge, offset, count, mean, std, out)
    return out


def _perturb_into_launcher(
    images: torch.Tensor,
    segments: torch.Tensor,
    masks: torch.Tensor,
    fudge: torch.Tensor,
    offset: int,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    _write_samples(images, segments, masks, fudge, offset, out.shape[0] // images.shape[0], mean, std, out)


perturb_triton = TritonOp("perturb_triton", _perturb_launcher, check_perturb)
perturb_into_triton = TritonOp("perturb_into_triton", _perturb_into_launcher, check_perturb_into, mutates_args=("out",))
