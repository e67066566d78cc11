"""Inputs, tolerances and sample calls shared by the Triton tests (test_triton_ops.py,
test_triton_fit_pgd.py).

Sizes are tiny on purpose: without a GPU the kernels run in Triton's interpreter, which runs every
block operation in numpy.
"""
from __future__ import annotations

import pytest
import torch


def import_kernels_or_skip():
    """Import attrefine_fast.kernels (registering the Triton ops), skipping the calling test module
    only where a GPU-less machine's Triton predates 3.3 and cannot load them in its interpreter
    (3.1 and 3.2 look for a GPU driver when an autotuner is defined; 3.0 loads them). Anywhere else
    a failure is an error."""
    import triton

    try:
        import attrefine_fast.kernels  # noqa: F401
    except Exception as e:
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
        if torch.cuda.is_available() or version >= (3, 3):
            raise
        pytest.skip(f"triton {triton.__version__} cannot load the kernels in its interpreter ({type(e).__name__}: {e}); "
                    "the CPU tests of the Triton kernels need Triton 3.0 or >= 3.3", allow_module_level=True)


# The interpreter computes float32 exactly like the reference here; a GPU may differ in the
# last bit (fused multiply-add, a different summation order in tl.dot), hence a few ulps.
# float16/bfloat16: one ulp of the output format, and the interpreter truncates float32 ->
# bfloat16 where the reference (and a GPU) round to nearest.
PERTURB_TOLS = [
    pytest.param(torch.float64, 1e-12, 1e-12, id="float64"),
    pytest.param(torch.float32, 1e-6, 1e-6, id="float32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="float16"),
    pytest.param(torch.bfloat16, 1e-2, 1.6e-2, id="bfloat16"),
]
# The fit sums in a different order (blocks of samples, tl.dot) and solves by Gauss-Jordan
# elimination where the reference uses a Cholesky factorization.
FIT_TOLS = [
    pytest.param(torch.float64, 1e-10, 1e-9, id="float64"),
    pytest.param(torch.float32, 2e-5, 1e-4, id="float32"),
]
PGD_TOLS = [
    pytest.param(torch.float64, 1e-12, 1e-12, id="float64"),
    pytest.param(torch.float32, 1e-6, 1e-6, id="float32"),
]


def make_segments(b, h, w, counts, gen, device):
    """(B, H, W) labels with every label 0..counts[i]-1 present in image i."""
    segments = torch.zeros(b, h, w, dtype=torch.long)
    for i, m in enumerate(counts):
        flat = torch.cat([torch.arange(m), torch.randint(0, m, (h * w - m,), generator=gen)])
        segments[i] = flat[torch.randperm(h * w, generator=gen)].view(h, w)
    return segments.to(device)


def perturb_inputs(b, c, h, w, n, counts, dtype, device, gen):
    images = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype).to(device)
    fudge = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype).to(device)
    segments = make_segments(b, h, w, counts, gen, device)
    masks = (torch.rand(b, n, max(counts), generator=gen) > 0.5).to(device)
    return images, segments, masks, fudge


def fit_inputs(b, n, m, l, counts, dtype, device, gen):
    masks = torch.rand(b, n, m, generator=gen) > 0.5
    masks[:, 0] = True  # LIME's first sample is the original image
    targets = torch.rand(b, n, l, generator=gen, dtype=torch.float64).to(dtype)
    return masks.to(device), targets.to(device), torch.tensor(counts, device=device)


def pgd_inputs(shape, dtype, device, gen, with_weight):
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    grad.view(-1)[::7] = 0  # sign(0) = 0
    weight = torch.rand(shape[0], *shape[2:], generator=gen, dtype=torch.float64) if with_weight else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(x_adv), cast(x), cast(grad), cast(weight)


def pgd_settings(norm):
    return {"step_size": 0.01, "eps": 0.03} if norm == "linf" else {"step_size": 0.2, "eps": 0.3}


def autotune_key(tuner) -> list[str]:
    """The argument names an autotuner keys on (Triton 3.0 keeps only their indices)."""
    if hasattr(tuner, "keys"):
        return list(tuner.keys)
    return [tuner.arg_names[i] for i in tuner.key_idx]


def use_only_config(monkeypatch, module, kernel, config):
    """Run a kernel under one given autotuning configuration (the interpreter only ever tries
    the first): every candidate a GPU may pick must be correct."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the autotuner itself runs every configuration")
    import triton

    from attrefine_fast import kernels

    mod = getattr(kernels, module)
    tuner = getattr(mod, kernel)
    monkeypatch.setattr(mod, kernel, triton.autotune(configs=[config], key=autotune_key(tuner))(tuner.fn))


def record_launches(monkeypatch, module) -> list[tuple[tuple, dict]]:
    """Record each launch of the kernels of attrefine_fast.kernels.<module> (its grid and keyword
    arguments) as they run."""
    from attrefine_fast import kernels

    mod = getattr(kernels, module)
    launches = []
    wrap = mod.wrap_triton

    class Recording:
        def __init__(self, kernel):
            self.kernel = wrap(kernel)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid if callable(grid) else tuple(grid), kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(mod, "wrap_triton", Recording)
    return launches


def sample_calls(device):
    """One call of each Triton op (two where options change the launch), positionally, as the
    backend registry makes it."""
    gen = torch.Generator().manual_seed(10)
    images, segments, masks, fudge = perturb_inputs(2, 3, 8, 8, 6, [5, 3], torch.float32, device, gen)
    mean = torch.tensor([0.4, 0.5, 0.6], device=device)
    std = torch.tensor([0.2, 0.3, 0.25], device=device)
    fit_masks, targets, counts = fit_inputs(2, 24, 5, 3, [5, 3], torch.float32, device, gen)
    x_adv, x, grad, weight = pgd_inputs((2, 3, 8, 8), torch.float32, device, gen, True)
    # perturb_into's out starts as NaN, so that an element it leaves unwritten fails a comparison;
    # the second is the leading rows of a larger buffer, as for the last, shorter chunk.
    out_cl = torch.empty(2 * 4, 3, 8, 8, dtype=torch.float16, device=device, memory_format=torch.channels_last)
    out_head = torch.empty(2 * 6, 3, 8, 8, device=device)[: 2 * 3]
    for out in (out_cl, out_head):
        out.fill_(float("nan"))
    lib = torch.ops.attrefine_fast
    return [
        (lib.perturb_triton.default, (images, segments, masks, fudge, 1, 4, mean, std, torch.float16, True)),
        (lib.perturb_triton.default, (images, segments, masks, fudge, 0, 6, None, None, None, False)),
        (lib.perturb_into_triton.default, (images, segments, masks, fudge, 2, mean, std, out_cl)),
        (lib.perturb_into_triton.default, (images, segments, masks, fudge, 0, None, None, out_head)),
        (lib.lime_fit_triton.default, (fit_masks, targets, counts, None, 0.25, 1.0)),
        (lib.lime_fit_triton.default, (fit_masks, targets, counts, None, 0.25, 0.0)),
        (lib.masked_pgd_step_triton.default, (x_adv, x, grad, weight, 0.01, 0.03, 0.0, 1.0, "linf")),
        (lib.masked_pgd_step_triton.default, (x_adv, x, grad, None, 0.2, 0.3, 0.0, 1.0, "l2")),
    ]


def mutated_arg(op):
    """The position of the argument ``op`` writes in place (``Tensor(a!)`` in its schema), or None."""
    written = [i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    assert len(written) <= 1, f"{op} writes several arguments"
    return written[0] if written else None
