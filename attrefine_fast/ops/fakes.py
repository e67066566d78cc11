"""The ops' fake implementations: the shapes and dtypes of their outputs, computed without data,
which torch.compile and fake-tensor tracing call instead of a kernel.

Registered for the compiled extension's schemas (``attrefine_fast::<op>``, attrefine_fast/_extension.py)
and, on torch < 2.6, where the Triton ops are plain custom ops, for ``attrefine_fast::<op>_triton``
(kernels/op_registration.py); on torch >= 2.6 the Triton ops trace their launchers instead.
"""
import torch

from .perturb import perturb_output_dtype


def segment_mean(images, segments, num_segments):
    torch._check(images.dim() == 4 and segments.dim() == 3)
    dtype = images.dtype if images.is_floating_point() else torch.float64
    return images.new_empty((images.shape[0], num_segments, images.shape[1]), dtype=dtype)


def perturb(images, segments, masks, fudge, offset, count, mean, std, out_dtype, channels_last):
    torch._check(images.dim() == 4 and masks.dim() == 3)
    b, c, h, w = images.shape
    out = images.new_empty((b * count, c, h, w), dtype=perturb_output_dtype(images.dtype, mean is not None, out_dtype))
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def perturb_into(images, segments, masks, fudge, offset, mean, std, out):
    torch._check(images.dim() == 4 and out.dim() == 4)


def lime_fit(masks, targets, num_segments, weights, kernel_width, alpha):
    torch._check(masks.dim() == 3 and targets.dim() == 3)
    b, _, m = masks.shape
    l = targets.shape[2]
    return (targets.new_empty((b, l, m)), targets.new_empty((b, l)), targets.new_empty((b, l)), targets.new_empty((b, l)))


def masked_pgd_step(x_adv, x, grad, weight, step_size, eps, lo, hi, norm):
    torch._check(x_adv.shape == x.shape)


FAKES = {
    "segment_mean": segment_mean,
    "perturb": perturb,
    "perturb_into": perturb_into,
    "lime_fit": lime_fit,
    "masked_pgd_step": masked_pgd_step,
}
