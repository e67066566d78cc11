"""Sample inputs for the compiled ops, in schema order: one list per op feeds the parity tests,
the torch.library.opcheck registration checks and the CUDA parity tests alike.

Every list holds the awkward shapes: a prime size, a size-1 dimension, a non-power-of-two size,
a non-contiguous input and an image with a single segment.
"""
from __future__ import annotations

import torch


def labels(b: int, h: int, w: int, counts, gen: torch.Generator, coherent: bool = False) -> torch.Tensor:
    """(B, H, W) int64 segment ids with every label 0..counts[i]-1 present in image i.

    coherent=True gives horizontal bands (long runs of equal labels, like real superpixels);
    otherwise labels are scattered pixel by pixel.
    """
    out = torch.empty(b, h, w, dtype=torch.long)
    for i, m in enumerate(counts):
        if coherent:
            band = torch.arange(h * w) * m // (h * w)
            out[i] = band.view(h, w)
        else:
            flat = torch.cat([torch.arange(m), torch.randint(0, m, (h * w - m,), generator=gen)])
            out[i] = flat[torch.randperm(h * w, generator=gen)].view(h, w)
    return out


def _images(shape, dtype, gen):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)


def segment_mean_cases(dtype=torch.float32, device="cpu"):
    """(id, (images, segments, num_segments))"""
    gen = torch.Generator().manual_seed(1)
    cases = []
    for name, (b, c, h, w), counts, coherent in [
        ("prime", (2, 3, 7, 13), [5, 3], False),
        ("single_segment", (1, 1, 5, 4), [1], False),
        ("one_pixel", (3, 4, 1, 1), [1, 1, 1], False),
        ("bands", (2, 3, 16, 24), [6, 11], True),
    ]:
        seg = labels(b, h, w, counts, gen, coherent)
        cases.append((name, (_images((b, c, h, w), dtype, gen), seg, max(counts))))
    # channels-last storage: a non-contiguous NCHW view
    img = _images((2, 9, 11, 3), dtype, gen).permute(0, 3, 1, 2)
    cases.append(("non_contiguous", (img, labels(2, 11, 9, [4, 7], gen).transpose(1, 2), 7)))
    return [(n, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)) for n, args in cases]


def perturb_cases(dtype=torch.float32, device="cpu"):
    """(id, (images, segments, masks, fudge, offset, count, mean, std, out_dtype, channels_last))"""
    gen = torch.Generator().manual_seed(2)
    norm = (torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3]))
    cases = []
    for name, (b, c, h, w), counts, n, offset, count, normalize, out_dtype, cl, coherent in [
        ("prime", (2, 3, 7, 13), [5, 3], 11, 2, 7, False, None, False, False),
        ("single_segment", (1, 3, 5, 4), [1], 3, 0, 3, True, None, False, False),
        ("bands_channels_last", (2, 3, 17, 24), [6, 9], 5, 1, 4, True, torch.float32, True, True),
        ("bands_bf16_out", (1, 3, 16, 10), [4], 4, 3, 1, False, torch.bfloat16, False, True),
        ("one_pixel", (3, 1, 1, 1), [1, 1, 1], 2, 0, 2, False, None, True, False),
    ]:
        seg = labels(b, h, w, counts, gen, coherent)
        masks = torch.rand(b, n, max(counts), generator=gen) > 0.5
        mean, std = (norm[0][:c].to(torch.float64), norm[1][:c]) if normalize else (None, None)
        args = (_images((b, c, h, w), dtype, gen), seg, masks, _images((b, c, h, w), dtype, gen), offset, count, mean, std, out_dtype, cl)
        cases.append((name, args))
    img = _images((2, 6, 9, 3), dtype, gen).permute(0, 3, 1, 2)  # non-contiguous
    masks = (torch.rand(2, 9, 5, generator=gen) > 0.5).transpose(1, 2).contiguous().transpose(1, 2)
    mean, std = torch.tensor([0.4, 0.0, 0.5, 0.0, 0.6, 0.0])[::2], torch.tensor([0.25]).expand(3)  # strided, stride 0
    cases.append(("non_contiguous", (img, labels(2, 6, 9, [5, 2], gen), masks, torch.flip(img, [3]), 4, 5, mean, std, None, False)))
    return [(nm, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)) for nm, args in cases]


def perturb_into_cases(dtype=torch.float32, device="cpu"):
    """(id, (images, segments, masks, fudge, offset, mean, std, out)): perturb_cases with an
    uninitialized ``out`` in the output's dtype and layout, and one ``out`` that is the leading
    rows of a larger buffer (as for the last, shorter chunk of an explanation)."""
    from attrefine_fast.ops.perturb import perturb_output_dtype

    cases = []
    for name, (images, segments, masks, fudge, offset, count, mean, std, out_dtype, cl) in perturb_cases(dtype, device):
        b, c, h, w = images.shape
        spare = 2 if name == "bands_channels_last" else 0
        out = torch.empty(
            (b * (count + spare), c, h, w), dtype=perturb_output_dtype(images.dtype, mean is not None, out_dtype),
            device=images.device, memory_format=torch.channels_last if cl else torch.contiguous_format,
        )[: b * count]
        cases.append((name, (images, segments, masks, fudge, offset, mean, std, out)))
    return cases


def lime_fit_cases(dtype=torch.float64, device="cpu"):
    """(id, (masks, targets, num_segments, weights, kernel_width, alpha))"""
    gen = torch.Generator().manual_seed(3)
    cases = []
    for name, b, n, m, l, counts, with_weights, alpha in [
        ("prime", 3, 37, 5, 3, [5, 2, 4], False, 1.0),
        ("single_segment", 2, 5, 1, 1, [1, 1], False, 1.0),
        ("weights_small_alpha", 2, 23, 7, 2, [7, 6], True, 0.01),
        ("fast_path_limit", 2, 300, 256, 2, [256, 255], False, 1.0),
        ("above_fast_path", 1, 320, 257, 3, [257], False, 1.0),
    ]:
        masks = torch.rand(b, n, m, generator=gen) > 0.5
        masks[:, 0] = True
        targets = torch.rand(b, n, l, generator=gen, dtype=torch.float64).to(dtype)
        weights = torch.rand(b, n, generator=gen, dtype=torch.float64).to(dtype) if with_weights else None
        cases.append((name, (masks, targets, torch.tensor(counts), weights, 0.25, alpha)))
    masks = torch.rand(2, 8, 19, generator=gen) > 0.5
    targets = torch.rand(2, 4, 19, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)  # non-contiguous (2, 19, 4)
    cases.append(("non_contiguous", (masks.transpose(1, 2), targets, torch.tensor([8, 3]), None, 0.5, 1.0)))
    return [(nm, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)) for nm, args in cases]


def step_inputs(shape, gen: torch.Generator, weighted: bool = True):
    """float64 (x_adv, x, grad, weight) for a PGD step on images of ``shape`` (B, C, H, W): x in
    [0, 1], x_adv within about 0.05 of it, a normal gradient, a (B, H, W) weight in [0, 1] (None
    without ``weighted``)."""
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    b, _, h, w = shape
    weight = torch.rand(b, h, w, generator=gen, dtype=torch.float64) if weighted else None
    return x_adv, x, grad, weight


def masked_pgd_step_cases(dtype=torch.float32, device="cpu"):
    """(id, (x_adv, x, grad, weight, step_size, eps, lo, hi, norm)); x_adv is updated in place."""
    gen = torch.Generator().manual_seed(4)
    cases = []
    for norm in ("linf", "l2"):
        for name, (b, c, h, w), with_weight, layout in [
            ("prime", (3, 3, 7, 13), True, "contiguous"),
            ("one_pixel", (1, 1, 1, 1), False, "contiguous"),
            ("channels_last", (2, 3, 5, 6), True, "channels_last"),
            ("non_contiguous", (2, 4, 6, 5), False, "transposed"),
        ]:
            x_adv, x, grad, weight = step_inputs((b, c, h, w), gen, with_weight)
            grad[0, 0, 0, 0] = 0.0  # sign(0) = 0
            x, x_adv, grad = (t.to(dtype) for t in (x, x_adv, grad))
            if layout == "channels_last":
                x_adv = x_adv.contiguous(memory_format=torch.channels_last)
                grad = grad.contiguous(memory_format=torch.channels_last)
            elif layout == "transposed":
                x_adv = x_adv.transpose(2, 3).contiguous().transpose(2, 3)
            weight = None if weight is None else weight.to(dtype)
            step, eps = (0.02, 0.03) if norm == "linf" else (0.1, 0.2)
            cases.append((f"{norm}-{name}", (x_adv, x, grad, weight, step, eps, 0.0, 1.0, norm)))
    return [(nm, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)) for nm, args in cases]


def clone_args(args):
    """A copy whose tensors share nothing with ``args`` (for in-place ops)."""
    return tuple(a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) else a for a in args)


def l2_step_overflow_case(dtype=torch.float32):
    """(x_adv, x, grad, weight, step, eps, lo, hi, norm) of an L2 step longer than 1 times a large
    gradient (2 * 40000 overflows float16 where the product comes before the normalization)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 5, 6, generator=gen)
    grad = torch.randn(2, 3, 5, 6, generator=gen)
    grad[0, 1, 2, 3] = 40000.0
    x[0, 1, 2, 3] = 0.1  # (moved by about eps = 0.5: inside the range, no clamp hides the step)
    return x.clone().to(dtype), x.to(dtype), grad.to(dtype), None, 2.0, 0.5, 0.0, 1.0, "l2"


# ---- bad input ----
def _img(b=2, c=3, h=5, w=4, dtype=torch.float32):
    return torch.rand(b, c, h, w, dtype=dtype)


def _seg(b=2, h=5, w=4, m=3):
    return labels(b, h, w, [m] * b, torch.Generator().manual_seed(0))


def _overlapping_out():
    x = torch.rand(4, 3, 5, 4)
    return x[:2], _seg(), torch.ones(2, 1, 3, dtype=torch.bool), x[:2].clone(), 0, None, None, x[1:3]


def _mean_in_out():
    # mean and std inside the output buffer: a kernel would read them while it writes there
    out = torch.empty(4, 3, 5, 4)
    mean, std = out.view(-1)[:3], out.view(-1)[3:6]
    mean.zero_(), std.fill_(1.0)
    return _img(), _seg(), torch.ones(2, 2, 3, dtype=torch.bool), _img(), 0, mean, std, out


def _pgd_sharing_with(name):
    # x_adv and x (or grad) one image apart in one buffer: the step would read what it wrote
    buffer = torch.rand(3, 3, 5, 4)
    args = {"x": _img(), "grad": _img(), name: buffer[1:]}
    return buffer[:2], args["x"], args["grad"], None, 0.1, 0.1, 0.0, 1.0, "linf"


# name -> (op, positional arguments, error, message): every backend's op raises these, never
# crashing or answering on bad input.
BAD_CALLS = {
    "segment_mean id >= M": ("segment_mean", lambda: (_img(), _seg(m=3), 2), ValueError, "segment ids"),
    "segment_mean negative id": ("segment_mean", lambda: (_img(), _seg() - 1, 3), ValueError, "segment ids"),
    "segment_mean float segments": ("segment_mean", lambda: (_img(), _seg().float(), 3), TypeError, "segments"),
    "segment_mean shape": ("segment_mean", lambda: (_img(), _seg(h=6), 3), ValueError, "segments must have shape"),
    "segment_mean 3d images": ("segment_mean", lambda: (_img()[0], _seg(), 3), ValueError, "images must"),
    "segment_mean int images": ("segment_mean", lambda: (_img().int(), _seg(), 3), TypeError, "images"),
    "perturb id >= M": ("perturb", lambda: (_img(), _seg(m=4), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, 3, None, None, None, False), ValueError, "segment ids"),
    "perturb masks dtype": ("perturb", lambda: (_img(), _seg(), torch.ones(2, 3, 3), _img(), 0, 3, None, None, None, False), TypeError, "masks"),
    "perturb fudge dtype": ("perturb", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img().double(), 0, 3, None, None, None, False), ValueError, "fudge"),
    "perturb chunk": ("perturb", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 2, 2, None, None, None, False), ValueError, "count >= 1 and offset"),
    # an offset whose sum with count wraps around int64 must not pass the range check
    "perturb offset overflow": ("perturb", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 2**63 - 1, 1, None, None, None, False), ValueError, "count >= 1 and offset"),
    "perturb empty chunk": ("perturb", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 1, 0, None, None, None, False), ValueError, "got offset=1, count=0"),
    "perturb mean only": ("perturb", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, 3, torch.zeros(3), None, None, False), ValueError, "mean and std"),
    "perturb mean size": ("perturb", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, 3, torch.zeros(2), torch.ones(2), None, False), ValueError, "per channel"),
    "perturb out_dtype": ("perturb", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, 3, None, None, torch.int32, False), TypeError, "out_dtype"),
    "perturb batch": ("perturb", lambda: (_img(), _seg(), torch.ones(3, 3, 3, dtype=torch.bool), _img(), 0, 3, None, None, None, False), ValueError, "masks must have shape"),
    "perturb_into out rows": ("perturb_into", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, None, None, torch.empty(3, 3, 5, 4)), ValueError, "out must have shape"),
    "perturb_into out size": ("perturb_into", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, None, None, torch.empty(4, 3, 4, 5)), ValueError, "out must have shape"),
    "perturb_into out layout": ("perturb_into", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, None, None, torch.empty(4, 3, 4, 5).transpose(2, 3)), ValueError, "contiguous or channels-last"),
    "perturb_into out dtype": ("perturb_into", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, None, None, torch.empty(4, 3, 5, 4, dtype=torch.int32)), TypeError, "out_dtype"),
    "perturb_into out chunk": ("perturb_into", lambda: (_img(), _seg(), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 1, None, None, torch.empty(6, 3, 5, 4)), ValueError, "count >= 1 and offset"),
    "perturb_into out overlaps": ("perturb_into", lambda: _overlapping_out(), ValueError, "shares memory with images"),
    "perturb_into mean in out": ("perturb_into", lambda: _mean_in_out(), ValueError, "shares memory with mean"),
    "perturb_into no images": ("perturb_into", lambda: (_img(b=0), _seg(b=0), torch.ones(0, 3, 3, dtype=torch.bool), _img(b=0), 0, None, None, torch.empty(0, 3, 5, 4)), ValueError, "out must have shape"),
    "perturb_into id >= M": ("perturb_into", lambda: (_img(), _seg(m=4), torch.ones(2, 3, 3, dtype=torch.bool), _img(), 0, None, None, torch.empty(4, 3, 5, 4)), ValueError, "segment ids"),
    "lime_fit counts": ("lime_fit", lambda: (torch.ones(2, 4, 3, dtype=torch.bool), torch.rand(2, 4, 1), torch.tensor([3, 4]), None, 0.25, 1.0), ValueError, "num_segments"),
    "lime_fit zero count": ("lime_fit", lambda: (torch.ones(2, 4, 3, dtype=torch.bool), torch.rand(2, 4, 1), torch.tensor([0, 3]), None, 0.25, 1.0), ValueError, "num_segments"),
    "lime_fit targets shape": ("lime_fit", lambda: (torch.ones(2, 4, 3, dtype=torch.bool), torch.rand(2, 5, 1), torch.tensor([3, 3]), None, 0.25, 1.0), ValueError, "targets must have shape"),
    "lime_fit targets nan": ("lime_fit", lambda: (torch.ones(1, 4, 3, dtype=torch.bool), torch.tensor([[[0.1], [float("nan")], [0.2], [0.3]]]), torch.tensor([3]), None, 0.25, 1.0), ValueError, "NaN"),
    "lime_fit int targets": ("lime_fit", lambda: (torch.ones(1, 4, 3, dtype=torch.bool), torch.ones(1, 4, 1, dtype=torch.long), torch.tensor([3]), None, 0.25, 1.0), TypeError, "targets"),
    "lime_fit float masks": ("lime_fit", lambda: (torch.ones(1, 4, 3), torch.rand(1, 4, 1), torch.tensor([3]), None, 0.25, 1.0), TypeError, "masks"),
    "lime_fit negative weights": ("lime_fit", lambda: (torch.ones(1, 4, 3, dtype=torch.bool), torch.rand(1, 4, 1), torch.tensor([3]), -torch.ones(1, 4), 0.25, 1.0), ValueError, "non-negative"),
    "lime_fit weights dtype": ("lime_fit", lambda: (torch.ones(1, 4, 3, dtype=torch.bool), torch.rand(1, 4, 1), torch.tensor([3]), torch.ones(1, 4, dtype=torch.float64), 0.25, 1.0), TypeError, "weights"),
    "lime_fit kernel width": ("lime_fit", lambda: (torch.ones(1, 4, 3, dtype=torch.bool), torch.rand(1, 4, 1), torch.tensor([3]), None, 0.0, 1.0), ValueError, "kernel_width"),
    "lime_fit alpha": ("lime_fit", lambda: (torch.ones(1, 4, 3, dtype=torch.bool), torch.rand(1, 4, 1), torch.tensor([3]), None, 0.25, -1.0), ValueError, "alpha"),
    "lime_fit alpha inf": ("lime_fit", lambda: (torch.ones(1, 4, 3, dtype=torch.bool), torch.rand(1, 4, 1), torch.tensor([3]), None, 0.25, float("inf")), ValueError, "alpha"),
    "lime_fit kernel width nan": ("lime_fit", lambda: (torch.ones(1, 4, 3, dtype=torch.bool), torch.rand(1, 4, 1), torch.tensor([3]), None, float("nan"), 1.0), ValueError, "kernel_width"),
    "pgd expanded x_adv": ("masked_pgd_step", lambda: (_img(b=1).expand(2, 3, 5, 4), _img(), _img(), None, 0.1, 0.1, 0.0, 1.0, "linf"), ValueError, "overlapping elements"),
    "pgd norm": ("masked_pgd_step", lambda: (_img(), _img(), _img(), None, 0.1, 0.1, 0.0, 1.0, "l3"), ValueError, "norm"),
    "pgd shape": ("masked_pgd_step", lambda: (_img(), _img(h=6), _img(), None, 0.1, 0.1, 0.0, 1.0, "linf"), ValueError, "shape of x_adv"),
    "pgd dtype": ("masked_pgd_step", lambda: (_img(), _img(dtype=torch.float64), _img(), None, 0.1, 0.1, 0.0, 1.0, "linf"), TypeError, "dtype"),
    "pgd weight shape": ("masked_pgd_step", lambda: (_img(), _img(), _img(), torch.rand(2, 4, 5), 0.1, 0.1, 0.0, 1.0, "linf"), ValueError, "weight"),
    "pgd range": ("masked_pgd_step", lambda: (_img(), _img(), _img(), None, 0.1, 0.1, 1.0, 0.0, "linf"), ValueError, "lo <= hi"),
    "pgd int": ("masked_pgd_step", lambda: (_img().int(), _img().int(), _img().int(), None, 0.1, 0.1, 0.0, 1.0, "linf"), TypeError, "x_adv"),
    "pgd grad nan": ("masked_pgd_step", lambda: (_img(), _img(), _img().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"))), None, 0.1, 0.1, 0.0, 1.0, "linf"), ValueError, "grad contains NaN"),
    "pgd x_adv overlaps x": ("masked_pgd_step", lambda: _pgd_sharing_with("x"), ValueError, "x_adv shares some of its memory with x"),
    "pgd x_adv overlaps grad": ("masked_pgd_step", lambda: _pgd_sharing_with("grad"), ValueError, "x_adv shares some of its memory with grad"),
    "pgd l2 grad inf": ("masked_pgd_step", lambda: (_img(), _img(), _img().index_put_((torch.tensor(0),), torch.tensor(float("-inf"))), None, 0.1, 0.1, 0.0, 1.0, "l2"), ValueError, "grad contains NaN"),
}
