"""The Triton kernels (kernels/) against the pure-PyTorch references, through the public ops.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter; conftest.py
sets TRITON_INTERPRET=1 before any test module (and so before attrefine_fast.kernels) is
imported. Where a GPU is present the same tests run on CUDA, plus torch.compile and opcheck
(opcheck's fake-tensor pass cannot work under the interpreter, which reads the data).
Sizes are tiny on purpose: the interpreter runs every block operation in numpy.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from attrefine_fast import backends, ops  # noqa: E402
from conftest import DEVICES, needs_cuda  # noqa: E402

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


def test_interpreter_is_on_where_there_is_no_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels are compiled, not interpreted")
    from triton.runtime.interpreter import InterpretedFunction

    from attrefine_fast import kernels

    assert os.environ.get("TRITON_INTERPRET") == "1"
    # Defined after the variable was set: the kernels are interpreted, not compiled.
    assert isinstance(kernels.perturb._perturb_kernel.fn, InterpretedFunction)
    assert isinstance(kernels.masked_pgd_step._masked_pgd_kernel, InterpretedFunction)
    for op in ("segment_mean", "perturb", "lime_fit", "masked_pgd_step"):
        assert backends.status(op, "triton", "cpu")[0]


@pytest.mark.parametrize("module,kernel", [("perturb", "_perturb_kernel"), ("lime_fit", "_lime_fit_kernel")])
def test_autotune_keys_and_configs_name_kernel_arguments(module, kernel):
    # Triton skips unknown key names silently; a typo would make one tuning serve every size.
    from attrefine_fast import kernels

    mod = getattr(kernels, module)
    tuner = getattr(mod, kernel)
    assert tuner.keys and set(tuner.keys) <= set(tuner.arg_names)
    for config in mod._CONFIGS:
        assert set(config.kwargs) <= set(tuner.arg_names)


@pytest.mark.parametrize("op", ["segment_mean", "perturb", "lime_fit", "masked_pgd_step"])
def test_triton_op_has_the_schema_of_the_op(op):
    # attrefine_fast::<op>_triton stands in for attrefine_fast::<op> (csrc/ops.cpp): same
    # arguments, types, mutation and results (an int may be symbolic in the Triton op).
    from attrefine_fast import _extension, kernels

    if not _extension.loaded():
        pytest.skip(_extension.load_error())
    assert kernels.get(op) is not None

    def signature(schema):
        args = [(a.name, str(a.type).replace("SymInt", "int"), bool(a.alias_info and a.alias_info.is_write))
                for a in schema.arguments]
        return args, [str(r.type) for r in schema.returns]

    ours = getattr(torch.ops.attrefine_fast, f"{op}_triton").default._schema
    assert signature(ours) == signature(getattr(torch.ops.attrefine_fast, op).default._schema)


def test_kernels_compile_for_a_gpu_target():
    # The interpreter does not apply the compiler's rules (constexpr globals, tl.dot shapes,
    # dtypes of the math functions...): compile each kernel branch to an sm_90 cubin instead.
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-m", "attrefine_fast.kernels.compile_check", "--quick", "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "10 kernel variants compile for sm_90" in run.stdout


@pytest.fixture
def each_config(monkeypatch):
    """Run a kernel under one given autotuning configuration (the interpreter only ever tries
    the first): every candidate a GPU may pick must be correct."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the autotuner itself runs every configuration")
    import triton

    from attrefine_fast import kernels

    def use(module, kernel, config):
        mod = getattr(kernels, module)
        tuner = getattr(mod, kernel)
        monkeypatch.setattr(mod, kernel, triton.autotune(configs=[config], key=tuner.keys)(tuner.fn))

    return use


# ---------------------------------------------------------------- segment_mean

# (B, C, H, W, segment counts, padded M)
SEGMENT_SHAPES = [
    pytest.param(2, 3, 7, 13, [5, 2], 5, id="prime"),
    pytest.param(1, 1, 1, 1, [1], 1, id="size1-single-segment"),
    pytest.param(3, 4, 6, 10, [6, 1, 4], 9, id="non-pow2-padded-M"),
    pytest.param(1, 3, 17, 31, [40], 40, id="several-blocks-and-segment-tiles"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", PERTURB_TOLS + [pytest.param(torch.uint8, 1e-12, 1e-12, id="uint8")])
@pytest.mark.parametrize("b,c,h,w,counts,m", SEGMENT_SHAPES)
def test_segment_mean_matches_reference(device, dtype, atol, rtol, b, c, h, w, counts, m):
    gen = torch.Generator().manual_seed(h * w)
    images = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64)
    images = (images * 255).to(dtype) if dtype == torch.uint8 else images.to(dtype)
    images, segments = images.to(device), make_segments(b, h, w, counts, gen, device)
    before = images.clone()
    got = ops.segment_mean(images, segments, m, backend="triton")
    want = ops.segment_mean_ref(images, segments, m)
    assert got.dtype == want.dtype and got.shape == (b, m, c)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert torch.equal(images, before)


@pytest.mark.parametrize("device", DEVICES)
def test_segment_mean_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(13)
    images = torch.rand(2, 9, 5, 3, generator=gen, dtype=torch.float64).permute(0, 3, 1, 2).to(device)
    segments = make_segments(2, 5, 9, [4, 7], gen, device).transpose(1, 2)  # (2, 9, 5)
    assert not images.is_contiguous() and not segments.is_contiguous()
    torch.testing.assert_close(ops.segment_mean(images, segments, backend="triton"),
                               ops.segment_mean_ref(images, segments, 7), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- perturb

# (B, C, H, W, N, segment counts, offset, count)
PERTURB_SHAPES = [
    pytest.param(2, 3, 7, 13, 5, [5, 2], 1, 3, id="prime"),
    pytest.param(1, 1, 1, 1, 2, [1], 1, 1, id="size1-single-segment"),
    pytest.param(3, 4, 6, 10, 7, [6, 1, 4], 1, 6, id="non-pow2"),
]
PERTURB_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"normalize": True}, id="normalized"),
    pytest.param({"out_dtype": torch.bfloat16, "channels_last": True}, id="bf16-channels-last"),
    pytest.param({"normalize": True, "out_dtype": torch.float16, "channels_last": True}, id="normalized-fp16"),
]


def perturb_inputs(b, c, h, w, n, counts, dtype, device, gen):
    images = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype).to(device)
    fudge = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype).to(device)
    segments = make_segments(b, h, w, counts, gen, device)
    masks = (torch.rand(b, n, max(counts), generator=gen) > 0.5).to(device)
    return images, segments, masks, fudge


def check_perturb(images, segments, masks, fudge, offset, count, options, atol, rtol):
    kwargs = {k: v for k, v in options.items() if k != "normalize"}
    if options.get("normalize"):
        c = images.shape[1]
        kwargs["mean"] = torch.linspace(0.2, 0.6, c, dtype=torch.float64, device=images.device)
        kwargs["std"] = torch.linspace(0.5, 1.5, c, dtype=torch.float64, device=images.device)
    before = [t.clone() for t in (images, segments, masks, fudge)]
    got = ops.perturb(images, segments, masks, fudge, offset, count, backend="triton", **kwargs)
    want = ops.perturb_ref(images, segments, masks, fudge, offset, count, kwargs.get("mean"), kwargs.get("std"),
                           kwargs.get("out_dtype"), kwargs.get("channels_last", False))
    assert got.dtype == want.dtype and got.shape == want.shape
    layout = torch.channels_last if kwargs.get("channels_last") else torch.contiguous_format
    assert got.is_contiguous(memory_format=layout)
    if got.dtype in (torch.float16, torch.bfloat16):  # judge by the output format's own precision
        atol, rtol = max(atol, 1e-3 if got.dtype == torch.float16 else 1e-2), max(rtol, 1.6e-2)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for t, b in zip((images, segments, masks, fudge), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", PERTURB_TOLS)
@pytest.mark.parametrize("b,c,h,w,n,counts,offset,count", PERTURB_SHAPES)
@pytest.mark.parametrize("options", PERTURB_OPTIONS)
def test_perturb_matches_reference(device, dtype, atol, rtol, b, c, h, w, n, counts, offset, count, options):
    gen = torch.Generator().manual_seed(b * 100 + n)
    images, segments, masks, fudge = perturb_inputs(b, c, h, w, n, counts, dtype, device, gen)
    check_perturb(images, segments, masks, fudge, offset, count, options, atol, rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", PERTURB_OPTIONS)
def test_perturb_non_contiguous_inputs(device, options):
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 7, 5, 3, generator=gen).permute(0, 3, 1, 2).to(device)  # (2, 3, 7, 5) NHWC
    fudge = torch.rand(2, 3, 5, 7, generator=gen).transpose(2, 3).to(device)
    segments = make_segments(2, 5, 7, [4, 3], gen, device).transpose(1, 2)  # (2, 7, 5)
    masks = (torch.rand(2, 9, 8, generator=gen) > 0.5).to(device)[:, ::2, ::2]  # (2, 5, 4) strided
    assert not any(t.is_contiguous() for t in (images, fudge, segments, masks))
    check_perturb(images, segments, masks, fudge, 1, 4, options, 1e-6, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
def test_perturb_uint8_images(device, normalize):
    gen = torch.Generator().manual_seed(4)
    images, segments, masks, fudge = perturb_inputs(2, 3, 5, 11, 4, [3, 5], torch.float64, device, gen)
    images, fudge = (images * 255).to(torch.uint8), (fudge * 255).to(torch.uint8)
    check_perturb(images, segments, masks, fudge, 0, 4, {"normalize": normalize}, 1e-6, 1e-6)


@pytest.mark.parametrize("config", range(6))
def test_perturb_every_autotune_config(each_config, config):
    from attrefine_fast.kernels import perturb as module

    each_config("perturb", "_perturb_kernel", module._CONFIGS[config])
    gen = torch.Generator().manual_seed(11)
    # 17 x 31 = 527 pixels: several blocks for BLOCK <= 512; 9 samples: a partial group
    images, segments, masks, fudge = perturb_inputs(2, 3, 17, 31, 11, [7, 3], torch.float32, "cpu", gen)
    check_perturb(images, segments, masks, fudge, 2, 9, {"normalize": True}, 1e-6, 1e-6)


# ---------------------------------------------------------------- lime_fit

# (B, N, M, L, segment counts)
FIT_SHAPES = [
    pytest.param(3, 17, 7, 3, [7, 5, 1], id="prime-and-single-segment"),
    pytest.param(2, 2, 1, 1, [1, 1], id="size1-N2"),
    pytest.param(2, 40, 20, 5, [20, 11], id="non-pow2"),
    pytest.param(1, 33, 17, 17, [17], id="M-and-L-past-16"),
]


def fit_inputs(b, n, m, l, counts, dtype, device, gen):
    masks = torch.rand(b, n, m, generator=gen) > 0.5
    masks[:, 0] = True  # LIME's first sample is the original image
    targets = torch.rand(b, n, l, generator=gen, dtype=torch.float64).to(dtype)
    return masks.to(device), targets.to(device), torch.tensor(counts, device=device)


def check_fit(masks, targets, counts, weights, alpha, atol, rtol):
    got = ops.lime_fit(masks, targets, counts, weights, alpha=alpha, backend="triton")
    want = ops.lime_fit_ref(masks, targets, counts, weights, 0.25, alpha)
    for name, g, r in zip(("coef", "intercept", "score", "local_pred"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", FIT_TOLS)
@pytest.mark.parametrize("b,n,m,l,counts", FIT_SHAPES)
@pytest.mark.parametrize("alpha,given_weights", [(1.0, False), (0.01, True)])
def test_lime_fit_matches_reference(device, dtype, atol, rtol, b, n, m, l, counts, alpha, given_weights):
    gen = torch.Generator().manual_seed(n * 10 + m)
    masks, targets, counts = fit_inputs(b, n, m, l, counts, dtype, device, gen)
    weights = (torch.rand(b, n, generator=gen, dtype=torch.float64).to(dtype) + 0.1).to(device) if given_weights else None
    coef = check_fit(masks, targets, counts, weights, alpha, atol, rtol)[0]
    for i, mb in enumerate(counts.tolist()):
        assert torch.all(coef[i, :, mb:] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", FIT_TOLS)
def test_lime_fit_without_penalty(device, dtype, atol, rtol):
    # alpha = 0 takes the normal-equations + lstsq path; well-posed data (N >> M) so that the
    # unpenalized solution is unique and both sides must agree on it.
    gen = torch.Generator().manual_seed(5)
    masks, targets, counts = fit_inputs(2, 48, 6, 2, [6, 4], dtype, device, gen)
    check_fit(masks, targets, counts, None, 0.0, atol * 10, rtol * 10)


@pytest.mark.parametrize("device", DEVICES)
def test_lime_fit_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(6)
    masks = (torch.rand(2, 9, 22, generator=gen) > 0.5).transpose(1, 2)[:, ::2].to(device)  # (2, 11, 9)
    masks[:, 0] = True
    targets = torch.rand(2, 3, 11, generator=gen, dtype=torch.float64).transpose(1, 2).to(device)  # (2, 11, 3)
    weights = (torch.rand(11, 2, generator=gen, dtype=torch.float64) + 0.1).t().to(device)
    counts = torch.tensor([9, 9, 4, 4], device=device)[::2]
    assert not any(t.is_contiguous() for t in (masks, targets, weights, counts))
    check_fit(masks, targets, counts, None, 1.0, 1e-10, 1e-9)
    check_fit(masks, targets, counts, weights, 1.0, 1e-10, 1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_lime_fit_constant_target_scores_one(device):
    masks = torch.tensor([[[1, 1], [0, 1], [1, 0], [0, 0]]], dtype=torch.bool, device=device)
    targets = torch.full((1, 4, 2), 0.5, dtype=torch.float64, device=device)
    targets[..., 1] = torch.tensor([0.1, 0.7, 0.3, 0.2], dtype=torch.float64)
    coef, intercept, score, _ = check_fit(masks, targets, torch.tensor([2], device=device), None, 1.0, 1e-12, 1e-12)
    assert score[0, 0].item() == 1.0 and torch.all(coef[0, 0] == 0) and intercept[0, 0].item() == pytest.approx(0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_lime_fit_float32_error_within_twice_the_reference(device):
    # float32 judged against float64: the kernel may be at most ~2x as far off as the
    # reference run in float32 (plus a floor for results the reference gets exactly).
    gen = torch.Generator().manual_seed(7)
    masks, targets, counts = fit_inputs(2, 64, 12, 3, [12, 7], torch.float64, device, gen)
    exact = ops.lime_fit_ref(masks, targets, counts, None, 0.25, 1.0)
    ref32 = ops.lime_fit_ref(masks, targets.float(), counts, None, 0.25, 1.0)
    got32 = ops.lime_fit(masks, targets.float(), counts, backend="triton")
    for e, r, g in zip(exact, ref32, got32):
        ref_err = (r.double() - e).abs().max().item()
        got_err = (g.double() - e).abs().max().item()
        assert got_err <= 2 * ref_err + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lime_fit_autotune_keeps_configs_that_fit_in_registers(dtype):
    from attrefine_fast.kernels import lime_fit as module

    targets = torch.empty(1, 1, 1, dtype=dtype)
    for block_m in (16, 32, 64, 128, 256):
        kept = module._fits_in_registers(module._CONFIGS, {"targets_ptr": targets}, BLOCK_M=block_m)
        assert kept and all(c in module._CONFIGS for c in kept)
        if block_m == 16:
            assert len(kept) == len(module._CONFIGS)
    kept = module._fits_in_registers(module._CONFIGS, {"targets_ptr": targets}, BLOCK_M=128)
    assert min(c.num_warps for c in kept) >= (16 if dtype == torch.float64 else 8)


def test_lime_fit_too_many_segments_is_a_clear_error():
    masks = torch.ones(1, 4, 257, dtype=torch.bool)
    with pytest.raises(ValueError, match="at most 256 segments"):
        ops.lime_fit(masks, torch.rand(1, 4, 1), backend="triton")


@pytest.mark.parametrize("config", range(6))
def test_lime_fit_every_autotune_config(each_config, config):
    from attrefine_fast.kernels import lime_fit as module

    each_config("lime_fit", "_lime_fit_kernel", module._CONFIGS[config])
    gen = torch.Generator().manual_seed(12)
    masks, targets, counts = fit_inputs(2, 71, 9, 2, [9, 5], torch.float64, "cpu", gen)  # 71: partial blocks
    check_fit(masks, targets, counts, None, 1.0, 1e-10, 1e-9)


# ---------------------------------------------------------------- masked_pgd_step

PGD_SHAPES = [
    pytest.param((2, 3, 7, 5), id="prime"),
    pytest.param((1, 1, 1, 1), id="size1"),
    pytest.param((3, 3, 6, 10), id="non-pow2"),
    pytest.param((2, 3, 19, 23), id="several-blocks-per-sample"),
]


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", PGD_TOLS)
@pytest.mark.parametrize("shape", PGD_SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_masked_pgd_step_matches_reference(device, dtype, atol, rtol, shape, norm, with_weight):
    gen = torch.Generator().manual_seed(sum(shape))
    x_adv, x, grad, weight = pgd_inputs(shape, dtype, device, gen, with_weight)
    inputs = [t.clone() for t in (x, grad) + ((weight,) if with_weight else ())]
    want = ops.masked_pgd_step_ref(x_adv.clone(), x, grad, weight, lo=0.0, hi=1.0, norm=norm, **pgd_settings(norm))
    got = x_adv.clone()
    out = ops.masked_pgd_step(got, x, grad, weight, norm=norm, backend="triton", **pgd_settings(norm))
    assert out is got  # in place
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for t, b in zip((x, grad) + ((weight,) if with_weight else ()), inputs):
        assert torch.equal(t, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_masked_pgd_step_non_contiguous_in_place(device, norm):
    gen = torch.Generator().manual_seed(8)
    x_adv, x, grad, weight = pgd_inputs((2, 3, 5, 7), torch.float64, device, gen, True)
    x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)
    weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
    want = ops.masked_pgd_step_ref(x_adv.clone(), x, grad, weight, lo=0.0, hi=1.0, norm=norm, **pgd_settings(norm))
    ops.masked_pgd_step(x_adv, x, grad, weight, norm=norm, backend="triton", **pgd_settings(norm))
    assert x_adv.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x_adv, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_masked_pgd_step_half_precision_error_within_twice_the_reference(device, dtype, norm):
    gen = torch.Generator().manual_seed(9)
    x_adv, x, grad, weight = pgd_inputs((2, 3, 7, 5), torch.float64, device, gen, True)
    settings = pgd_settings(norm)
    exact = ops.masked_pgd_step_ref(x_adv.clone(), x, grad, weight, lo=0.0, hi=1.0, norm=norm, **settings)
    low = [t.to(dtype) for t in (x_adv, x, grad, weight)]
    ref_low = ops.masked_pgd_step_ref(low[0].clone(), *low[1:], lo=0.0, hi=1.0, norm=norm, **settings)
    got = low[0].clone()
    ops.masked_pgd_step(got, *low[1:], norm=norm, backend="triton", **settings)
    # one ulp of the format as a floor: the kernel rounds once, the reference at every step
    ulp = torch.finfo(dtype).eps
    assert (got.double() - exact).abs().max() <= 2 * (ref_low.double() - exact).abs().max() + ulp


# ---------------------------------------------------------------- GPU only


def sample_calls(device):
    """One call of each Triton op, positionally, as the backend registry makes it."""
    gen = torch.Generator().manual_seed(10)
    images, segments, masks, fudge = perturb_inputs(2, 3, 8, 8, 6, [5, 3], torch.float32, device, gen)
    mean = torch.tensor([0.4, 0.5, 0.6], device=device)
    std = torch.tensor([0.2, 0.3, 0.25], device=device)
    fit_masks, targets, counts = fit_inputs(2, 24, 5, 3, [5, 3], torch.float32, device, gen)
    x_adv, x, grad, weight = pgd_inputs((2, 3, 8, 8), torch.float32, device, gen, True)
    lib = torch.ops.attrefine_fast
    return [
        (lib.perturb_triton.default, (images, segments, masks, fudge, 1, 4, mean, std, torch.float16, True)),
        (lib.perturb_triton.default, (images, segments, masks, fudge, 0, 6, None, None, None, False)),
        (lib.lime_fit_triton.default, (fit_masks, targets, counts, None, 0.25, 1.0)),
        (lib.lime_fit_triton.default, (fit_masks, targets, counts, None, 0.25, 0.0)),
        (lib.masked_pgd_step_triton.default, (x_adv, x, grad, weight, 0.01, 0.03, 0.0, 1.0, "linf")),
        (lib.masked_pgd_step_triton.default, (x_adv, x, grad, None, 0.2, 0.3, 0.0, 1.0, "l2")),
    ]


class _NoLaunch:
    """Stands in for wrap_triton(kernel): launching does nothing, as the traceable wrapper does
    on fake tensors on a GPU (the interpreter would read their data instead)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("tracing", ["fake", "symbolic"])
def test_launchers_trace_with_fake_tensors(monkeypatch, index, tracing):
    # torch.compile and opcheck run each op's launcher on fake tensors (its registered fake
    # implementation) and trace it with symbolic sizes: everything around the kernels must
    # allow that (no data-dependent shapes, no reads of tensor data).
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from attrefine_fast import kernels

    for module in (kernels.perturb, kernels.lime_fit, kernels.masked_pgd_step, kernels.segment_mean):
        monkeypatch.setattr(module, "wrap_triton", lambda kernel: _NoLaunch())
    op, args = sample_calls("cpu")[index]
    eager = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    if tracing == "fake":
        mode = FakeTensorMode()
        with mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            out = op(*fake_args)
    else:
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def call(*ts):
            full = list(args)
            for i, t in zip(tensors, ts):
                full[i] = t
            return op(*full)

        graph = make_fx(call, tracing_mode="symbolic")(*[args[i] for i in tensors])
        assert any(n.op == "call_function" for n in graph.graph.nodes)
        return
    eager = eager if isinstance(eager, (tuple, list)) else (eager,)
    out = out if isinstance(out, (tuple, list)) else (out,)
    for e, f in zip(eager, out):
        if e is None:
            assert f is None
            continue
        assert f.shape == e.shape and f.dtype == e.dtype and f.stride() == e.stride()


@needs_cuda
@pytest.mark.parametrize("index", range(6))
def test_opcheck_cuda(index):
    op, args = sample_calls("cuda")[index]
    torch.library.opcheck(op, args)


@needs_cuda
def test_torch_compile_fullgraph_cuda():
    calls = sample_calls("cuda")

    def run_all(calls):
        outs = []
        for op, args in calls:
            if op is torch.ops.attrefine_fast.masked_pgd_step_triton.default:
                x_adv = args[0].clone()
                op(x_adv, *args[1:])
                outs.append(x_adv)
            else:
                outs.append(op(*args))
        return outs

    eager = run_all(calls)
    compiled = torch.compile(run_all, fullgraph=True)(calls)
    torch.testing.assert_close(compiled, eager)
