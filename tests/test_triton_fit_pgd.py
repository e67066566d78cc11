"""The Triton lime_fit and masked_pgd_step kernels (kernels/) against the pure-PyTorch
references, through the public ops.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py
switches it on); where a GPU is present the same tests run on CUDA. The registration checks,
segment_mean, perturb and the GPU-only checks of every Triton op are in test_triton_ops.py;
inputs and tolerances shared by both in triton_cases.py.
"""
import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from attrefine_fast import ops  # noqa: E402
from conftest import DEVICES  # noqa: E402
from triton_cases import (  # noqa: E402
    FIT_TOLS, PGD_TOLS, autotune_key, fit_inputs, import_kernels_or_skip, pgd_inputs, pgd_settings, record_launches,
    use_only_config,
)

import_kernels_or_skip()
from attrefine_fast.kernels import lime_fit as lime_fit_module  # noqa: E402


# ---------------------------------------------------------------- lime_fit

# (B, N, M, L, segment counts)
FIT_SHAPES = [
    pytest.param(3, 17, 7, 3, [7, 5, 1], id="prime-and-single-segment"),
    pytest.param(2, 2, 1, 1, [1, 1], id="size1-N2"),
    pytest.param(2, 40, 20, 5, [20, 11], id="non-pow2"),
    pytest.param(1, 33, 17, 17, [17], id="M-and-L-past-16"),
]


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
@pytest.mark.parametrize("dtype,alpha", [(torch.float32, 1e-7), (torch.float32, 1e-9), (torch.float64, 1e-16)])
def test_lime_fit_a_solve_that_rounding_breaks_takes_the_least_squares_path(monkeypatch, device, dtype, alpha):
    # Two superpixels always hidden together and an alpha below the Gram diagonal's ulp: the
    # fused elimination met a zero pivot and wrote NaN coefficients with a score of 1.
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(2, 30, 5, generator=gen) < 0.5
    masks[:, 0] = True
    masks[:, :, 2] = masks[:, :, 0]
    targets = torch.rand(2, 30, 2, generator=gen, dtype=torch.float64).to(dtype)
    masks, targets = masks.to(device), targets.to(device)
    launches = record_launches(monkeypatch, "lime_fit")
    got = ops.lime_fit(masks, targets, backend="triton", alpha=alpha)
    want = ops.lime_fit(masks, targets, backend="torch", alpha=alpha)
    fused, normal_equations, finish = lime_fit_module.FUSED, lime_fit_module.NORMAL_EQUATIONS, lime_fit_module.FINISH
    assert [k["PHASE"] for _, k in launches] == [fused, normal_equations, finish]
    assert all(torch.isfinite(t).all() for t in got)
    for g, w in zip(got[1:], want[1:]):  # the duplicated columns share their weight in any split
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    split = got[0][:, :, 0] + got[0][:, :, 2], want[0][:, :, 0] + want[0][:, :, 2]
    torch.testing.assert_close(*split, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("alpha", [1.0, 0.01, 1e-3])
def test_lime_fit_well_posed_fits_take_the_fused_solve(monkeypatch, device, dtype, alpha):
    # The pivot threshold (half of min(alpha, 1)) must not send ordinary fits, small alphas
    # included, to the slower least-squares path.
    launches = record_launches(monkeypatch, "lime_fit")
    gen = torch.Generator().manual_seed(13)
    masks, targets, counts = fit_inputs(3, 40, 20, 3, [20, 11, 1], dtype, device, gen)
    check_fit(masks, targets, counts, None, alpha, *((1e-10, 1e-9) if dtype == torch.float64 else (2e-5, 1e-4)))
    assert [k["PHASE"] for _, k in launches] == [lime_fit_module.FUSED]


@triton.jit
def _ridge_solve_kernel(gram_ptr, rhs_ptr, beta_ptr, solved_ptr, mb, min_pivot, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tile = i[:, None] * BLOCK + i[None, :]
    beta, solved = lime_fit_module._ridge_solve(tl.load(gram_ptr + tile), tl.load(rhs_ptr + tile), mb, min_pivot, BLOCK)
    tl.store(beta_ptr + tile, beta)
    tl.store(solved_ptr, solved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_lime_fit_solve_refuses_a_pivot_below_the_threshold(device, dtype):
    # [[1, 1], [1, 1 + 2^-12]]: a second pivot of 2^-12, positive but below the half of
    # alpha = 1e-3 that every pivot of G + alpha*I exceeds in exact arithmetic. Such a pivot is
    # rounding's (on a GPU, of an approximate division), and the solve built on it is refused.
    gram = torch.eye(16, dtype=dtype)
    gram[:2, :2] = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 2**-12]], dtype=dtype)
    rhs = torch.rand(16, 16, generator=torch.Generator().manual_seed(14), dtype=dtype)
    gram, rhs = gram.to(device), rhs.to(device)
    for min_pivot, held in ((0.5e-3, 0), (2**-13, 1)):
        beta = torch.empty_like(rhs)
        solved = torch.full((1,), -1, dtype=torch.int32, device=device)
        _ridge_solve_kernel[(1,)](gram, rhs, beta, solved, 2, min_pivot, BLOCK=16)
        assert solved.item() == held
        if held:
            torch.testing.assert_close(beta, torch.linalg.solve(gram.double(), rhs.double()).to(dtype), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol", FIT_TOLS)
@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_lime_fit_splits_the_labels_over_programs(monkeypatch, device, dtype, atol, rtol, alpha):
    # At large M and L a program's M x L tiles outgrow a block's shared memory: the labels go in
    # blocks of BLOCK_L, one program each (here with a 16 x 16 tile: 40 labels in 3 programs),
    # also through the least-squares path (alpha = 0), where only the first writes the Gram matrix.
    monkeypatch.setattr(lime_fit_module, "_TILE", 256)
    launches = record_launches(monkeypatch, "lime_fit")
    gen = torch.Generator().manual_seed(15)
    masks, targets, counts = fit_inputs(2, 60, 9, 40, [9, 4], dtype, device, gen)
    check_fit(masks, targets, counts, None, alpha, atol * (10 if alpha == 0 else 1), rtol * (10 if alpha == 0 else 1))
    assert launches and all(grid == (2, 3) and k["BLOCK_L"] == 16 for grid, k in launches)


def test_lime_fit_tiles_fit_shared_memory_at_every_size():
    # compile_check measures the shared memory of the largest tiles blocks() picks
    for m in range(1, lime_fit_module.MAX_SEGMENTS + 1):
        for l in range(1, lime_fit_module.MAX_LABELS + 1, 7):
            block_m, block_l = lime_fit_module.blocks(m, l)
            assert block_m >= m and block_l >= 16 and block_m * block_l <= lime_fit_module._TILE
            assert block_l >= l or block_m * block_l * 2 > lime_fit_module._TILE  # split only as far as needed


def test_lime_fit_autotunes_each_phase_and_weighting_apart():
    # One phase's best configuration says nothing of another's (FUSED solves, the others do not).
    for kernel in (lime_fit_module._lime_fit_kernel, lime_fit_module._lime_fit_kernel_f64):
        assert {"PHASE", "HAS_WEIGHTS", "BLOCK_M", "BLOCK_L"} <= set(autotune_key(kernel))


@pytest.mark.parametrize("device", DEVICES)
def test_lime_fit_alpha_beyond_float32(device):
    # alpha = 1e39 is inf in float32: its residual term inf * 0 made the score a NaN, reported as 1
    gen = torch.Generator().manual_seed(8)
    masks, targets, counts = fit_inputs(2, 24, 5, 2, [5, 3], torch.float32, device, gen)
    coef, intercept, score, local_pred = ops.lime_fit(masks, targets, counts, backend="triton", alpha=1e39)
    want = ops.lime_fit(masks.cpu(), targets.double().cpu(), counts.cpu(), backend="torch", alpha=1e39)
    assert coef.abs().max() < 1e-30  # about R / alpha
    for g, w in zip((intercept, score, local_pred), want[1:]):
        torch.testing.assert_close(g.cpu().double(), w, atol=1e-6, rtol=1e-5)


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


def test_lime_fit_autotune_keeps_configs_that_fit_in_registers():
    from attrefine_fast.kernels import lime_fit as module

    targets = torch.empty(1, 1, 1, dtype=torch.float32)
    for block_m in (16, 32, 64, 128, 256):
        kept = module._fits_in_registers(module._CONFIGS, {"targets_ptr": targets}, BLOCK_M=block_m)
        assert kept and all(c in module._CONFIGS for c in kept)
        if block_m == 16:
            assert kept == module._CONFIGS
    kept = module._fits_in_registers(module._CONFIGS, {"targets_ptr": targets}, BLOCK_M=128)
    assert min(c.num_warps for c in kept) >= 8


def test_lime_fit_autotunes_float32_and_float64_apart():
    # tl.dot (float32) needs 16 samples per block at least; float64's broadcast products hold
    # BLOCK_N x M x M values, so it tries 1 to 4 samples per block only.
    from attrefine_fast.kernels import lime_fit as module

    assert all(c.kwargs["BLOCK_N"] >= 16 for c in module._CONFIGS)
    assert all(c.kwargs["BLOCK_N"] <= 4 for c in module._F64_CONFIGS)


def test_lime_fit_too_many_segments_or_labels_is_a_clear_error():
    masks = torch.ones(1, 4, 257, dtype=torch.bool)
    with pytest.raises(ValueError, match="at most 256 segments"):
        ops.lime_fit(masks, torch.rand(1, 4, 1), backend="triton")
    # and labels: the tiles of 512 labels need more shared memory than an H100 has
    with pytest.raises(ValueError, match="at most 256 labels"):
        ops.lime_fit(torch.ones(1, 4, 3, dtype=torch.bool), torch.rand(1, 4, 257), backend="triton")


LIME_FIT_TUNED = [("_lime_fit_kernel", "_CONFIGS", torch.float32, i) for i in range(8)] + [
    ("_lime_fit_kernel_f64", "_F64_CONFIGS", torch.float64, i) for i in range(4)
]


@pytest.mark.parametrize("kernel,configs,dtype,index", LIME_FIT_TUNED, ids=[f"{c[2]}-{c[3]}" for c in LIME_FIT_TUNED])
def test_lime_fit_every_autotune_config(monkeypatch, kernel, configs, dtype, index):
    from attrefine_fast.kernels import lime_fit as module

    use_only_config(monkeypatch, "lime_fit", kernel, getattr(module, configs)[index])
    gen = torch.Generator().manual_seed(12)
    masks, targets, counts = fit_inputs(2, 71, 9, 2, [9, 5], dtype, "cpu", gen)  # 71: partial blocks
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    check_fit(masks, targets, counts, None, 1.0, tolerance, 100 * tolerance)


def test_lime_fit_config_lists_are_what_the_tests_cover():
    from attrefine_fast.kernels import lime_fit as module

    # test_lime_fit_every_autotune_config runs each by index
    assert (len(module._CONFIGS), len(module._F64_CONFIGS)) == (8, 4)


# ---------------------------------------------------------------- masked_pgd_step

PGD_SHAPES = [
    pytest.param((2, 3, 7, 5), id="prime"),
    pytest.param((1, 1, 1, 1), id="size1"),
    pytest.param((3, 3, 6, 10), id="non-pow2"),
    pytest.param((2, 3, 19, 23), id="several-blocks-per-sample"),
]


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


def half_tolerance(device, dtype, norm):
    """(atol, rtol) of the Triton step against the reference in float16/bfloat16.

    The kernel rounds every intermediate to the dtype where the reference's ops do, so L-inf (no
    reduction) is exact on any device. L2's norms are float32 sums in another order than torch's,
    and one that lands on the other side of a rounding boundary moves its sample by one ulp: on a
    GPU one ulp at 1.0 is allowed (the compiled ops' bfloat16 tolerances, 2^-7 and 2^-6, are
    looser). In the interpreter the norms come out as the reference's on these inputs, so there
    L2 must be exact too.
    """
    if norm == "linf" or device == "cpu":
        return 0.0, 0.0
    return torch.finfo(dtype).eps, 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", PGD_SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("with_weight", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("projected", [False, True], ids=["inside-the-ball", "projected"])
def test_masked_pgd_step_half_precision_rounds_like_the_reference(device, dtype, shape, norm, with_weight, projected):
    gen = torch.Generator().manual_seed(sum(shape))
    x_adv, x, grad, weight = pgd_inputs(shape, dtype, device, gen, with_weight)
    step_size = pgd_settings(norm)["step_size"]
    free = ops.masked_pgd_step_ref(x_adv.clone(), x, grad, weight, step_size, 1e4, 0.0, 1.0, norm)
    eps = 1e4
    if projected:  # half the unprojected move: the ball cuts every sample's step
        moved = (free - x).double().flatten(1)
        eps = 0.5 * (moved.abs().amax() if norm == "linf" else moved.norm(dim=1).min()).item()
    want = ops.masked_pgd_step_ref(x_adv.clone(), x, grad, weight, step_size, eps, 0.0, 1.0, norm)
    assert torch.equal(want, free) != projected
    got = x_adv.clone()
    ops.masked_pgd_step(got, x, grad, weight, step_size=step_size, eps=eps, norm=norm, backend="triton")
    atol, rtol = half_tolerance(device, dtype, norm)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_masked_pgd_step_non_contiguous_in_place(device, dtype, norm):
    gen = torch.Generator().manual_seed(8)
    x_adv, x, grad, weight = pgd_inputs((2, 3, 5, 7), dtype, device, gen, True)
    x_adv = x_adv.contiguous(memory_format=torch.channels_last)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)
    weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
    want = ops.masked_pgd_step_ref(x_adv.clone(), x, grad, weight, lo=0.0, hi=1.0, norm=norm, **pgd_settings(norm))
    ops.masked_pgd_step(x_adv, x, grad, weight, norm=norm, backend="triton", **pgd_settings(norm))
    assert x_adv.is_contiguous(memory_format=torch.channels_last)
    atol, rtol = (1e-12, 1e-12) if dtype == torch.float64 else half_tolerance(device, dtype, norm)
    torch.testing.assert_close(x_adv, want, atol=atol, rtol=rtol)


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
    # one ulp of the format as a floor, for a norm that a GPU's sum rounds the other way
    ulp = torch.finfo(dtype).eps
    assert (got.double() - exact).abs().max() <= 2 * (ref_low.double() - exact).abs().max() + ulp


def test_masked_pgd_step_l2_reads_each_norm_once_per_program(monkeypatch):
    # Every program adds up its sample's row of partial sums once per norm, not once per block
    # (with one program per sample here, that was once per block of the 5 per sample).
    from attrefine_fast.kernels import masked_pgd_step as module
    from attrefine_fast.kernels import op_registration

    if torch.cuda.is_available():
        pytest.skip("counts the interpreter's calls")
    monkeypatch.setattr(op_registration, "GRID_AXIS_LIMIT", 1)
    calls = []
    row_total = module._row_total
    monkeypatch.setattr(module, "_row_total", lambda *args: calls.append(1) or row_total(*args))
    gen = torch.Generator().manual_seed(16)
    x = torch.rand(2, 3, 40, 40, generator=gen)
    grad = torch.randn(2, 3, 40, 40, generator=gen)
    got = ops.masked_pgd_step(x.clone(), x, grad, step_size=0.5, eps=0.2, norm="l2", backend="triton")
    want = ops.masked_pgd_step(x.clone(), x, grad, step_size=0.5, eps=0.2, norm="l2", backend="torch")
    torch.testing.assert_close(got, want)
    assert len(calls) == 2 * (1 + 2)  # two samples: ‖g‖ in stage 1, ‖g‖ and ‖δ‖ in stage 2


@pytest.mark.parametrize("device", DEVICES)
def test_masked_pgd_step_l2_with_a_zero_ball_and_a_zero_step_is_the_clean_input(device):
    # eps = ‖δ‖ = 0 makes the projection 0 / 0: the step must give x, as the reference now does.
    gen = torch.Generator().manual_seed(12)
    x = torch.rand(2, 3, 4, 5, generator=gen).to(device)
    grad = torch.randn(2, 3, 4, 5, generator=gen).to(device)
    weight = torch.zeros(2, 4, 5, device=device)
    weight[1] = 1.0  # sample 1 moves and is projected back; sample 0 has a zero step
    x_adv = x.clone()
    ops.masked_pgd_step(x_adv, x, grad, weight, step_size=0.1, eps=0.0, norm="l2", backend="triton")
    assert torch.equal(x_adv, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_masked_pgd_step_non_finite_grad_writes_nothing(device, norm, bad):
    # grad is checked on the device while the host goes on to the launches: the writing stage
    # must see the flag and leave x_adv as it was.
    from attrefine_fast import kernels

    gen = torch.Generator().manual_seed(4)
    x_adv, x, grad, weight = pgd_inputs((3, 2, 7, 9), torch.float32, device, gen, True)
    grad[2, 1, 6, 8] = bad  # the last element
    before = x_adv.clone()
    with pytest.raises(ValueError, match="grad contains NaN or infinite values"):
        kernels.get("masked_pgd_step")(x_adv, x, grad, weight, 0.1, 0.3, 0.0, 1.0, norm)
    assert torch.equal(x_adv, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["x_adv", "x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_masked_pgd_step_l2_non_finite_x_adv_or_x_writes_nothing(device, where, bad):
    # The op itself (as the C++ kernels) refuses what makes ‖x_adv - x‖ non-finite, which the
    # public function's checks catch before it; the update stage must see the flag.
    from attrefine_fast import kernels

    gen = torch.Generator().manual_seed(5)
    x_adv, x, grad, weight = pgd_inputs((3, 2, 7, 9), torch.float32, device, gen, True)
    (x_adv if where == "x_adv" else x)[1, 0, 3, 4] = bad
    before = x_adv.clone()
    with pytest.raises(ValueError, match=f"{where} contains NaN or infinite values"):
        kernels.get("masked_pgd_step")(x_adv, x, grad, weight, 0.1, 0.3, 0.0, 1.0, "l2")
    torch.testing.assert_close(x_adv, before, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.0, 0.0])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's sums of inf
def test_lime_fit_bad_counts_and_targets_raise_the_contract_errors(device, alpha):
    # Checked on the device while the host launches; alpha = 0 must raise before its solve,
    # which non-finite sums could make fail with an error of its own.
    from attrefine_fast import kernels

    gen = torch.Generator().manual_seed(6)
    masks, targets, counts = fit_inputs(2, 12, 5, 3, [5, 4], torch.float64, device, gen)
    fit = kernels.get("lime_fit")
    bad_targets = targets.clone()
    bad_targets[1, 11, 2] = float("inf")
    with pytest.raises(ValueError, match="targets contains NaN or infinite values"):
        fit(masks, bad_targets, counts, None, 0.25, alpha)
    for bad_counts in ([6, 4], [5, 0]):
        with pytest.raises(ValueError, match=r"num_segments must hold B=2 counts in 1\.\.5"):
            fit(masks, targets, torch.tensor(bad_counts, device=device), None, 0.25, alpha)
