"""Triton lime_fit: the whole weighted ridge fit of one image, all labels, in one program.

masks (B, N, M) bool, targets (B, N, L), num_segments (B,), optional weights (B, N)
-> coef (B, L, M), intercept (B, L), score (B, L), local_pred (B, L).
Matches attrefine_fast.ops.lime_fit.lime_fit_ref (see its docstring for the formulas).

Program b streams its samples in blocks of BLOCK_N rows, twice (at N = 1000, M = 64, L = 5
that is 84 kB per image, which stays in L2 between the passes):
  1. LIME's kernel weights from the row sums of the mask (or the given weights) and the
     weighted means x̄ (M) and ȳ (L);
  2. the centred weighted Gram matrix G = Zcᵀ W Zc (M x M), right-hand sides R = Zcᵀ W Yc (M x L)
     and total sums of squares Σ w yc² with tl.dot, plus the ridge diagonal (1 for padded
     segments, so they solve to 0).
After the solve, (G + αI) β = R gives the residual sum of squares without a third pass:
Σ w (yc - zc β)² = Σ w yc² - β·R - α |β|² per label (the alpha = 0 path below, whose β comes
from outside, does make a third pass).
The solve runs in the same program, by Gauss-Jordan elimination on the register tile: the
matrix is symmetric positive definite for alpha > 0, so no pivoting is needed, and fusing it
removes the round trip of B Gram matrices through memory and the batched-solver launches.
alpha = 0 can make the matrix singular; that case writes the normal equations out, solves
them with a pseudo-inverse (the minimum-norm solution, which the reference's fallback also
gives) and runs the remaining pass as a second launch. So does a fused solve that rounding
broke (a pivot below half of min(alpha, 1), or a non-finite result: a tiny alpha with collinear
columns, where the reference's Cholesky fails too): it sets a flag, and the launcher, reading it
with the argument checks' flag, solves the batch again that way (traced, where nothing can be
read, those images come out NaN).

tl.dot needs blocks of at least 16, so M and L are padded to powers of two >= 16 with zeros.
float64 reduces broadcast products instead of tl.dot (see _dot_acc); they hold BLOCK_N x M x M
values at once, so float64 has its own autotuner over 1 to 4 samples per block
(_lime_fit_kernel_f64, _F64_CONFIGS).
The M x L tiles take more shared memory than a block has at large M and L, so the labels go in
blocks of BLOCK_L, one program each on grid axis 1 (labels are independent; each program
recomputes the image's Gram matrix): see _TILE and blocks().
One program holds the whole M x M matrix in registers: without spills up to M = 128 in
float32 (64 in float64), correct but slower up to MAX_SEGMENTS.
"""
import torch
import triton
import triton.language as tl

from .contracts import check_lime_fit, check_lime_fit_values
from .device_checks import flag_pass, new_flag, raise_if_flagged
from .op_registration import TritonOp, autotune_configs, cdiv, int64_index, next_power_of_2, scalars, wrap_triton

MAX_SEGMENTS = 256
MAX_LABELS = 256  # per call (blocks of them per program: see _TILE)
# Shared memory per block on sm_90 (H100, H200); a launch that needs more fails (OutOfResources).
# The M x L tiles (R, β) go through shared memory, compiled for sm_90 (Triton 3.9): in float64
# BLOCK_M * BLOCK_L * 8 bytes (FUSED and FINISH: 262,144 at 256 x 128); in float32 FINISH's
# tl.dot with β takes 311,296 at 256 x 256 and FUSED's 262,144 at 128 x 256 with BLOCK_N = 64.
# So a program takes at most _TILE label-segment pairs (131,072 bytes in float64's tiles), the
# labels in blocks on grid axis 1: see blocks() (kernels/compile_check.py checks the sizes).
SHARED_MEMORY_LIMIT = 232448
_TILE = 16384
FUSED, NORMAL_EQUATIONS, FINISH = 0, 1, 2  # the PHASE of a launch
# the same, readable inside the kernels (Triton reads only constexpr globals)
_FUSED, _NORMAL_EQUATIONS, _FINISH = tl.constexpr(FUSED), tl.constexpr(NORMAL_EQUATIONS), tl.constexpr(FINISH)

# float32 (tl.dot, BLOCK_N >= 16): candidates for M = 64 / 128 segments at N = 1000 samples.
_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4),
    triton.Config({"BLOCK_N": 64}, num_warps=4),
    triton.Config({"BLOCK_N": 32}, num_warps=8),
    triton.Config({"BLOCK_N": 64}, num_warps=8),
    triton.Config({"BLOCK_N": 16}, num_warps=4),
    triton.Config({"BLOCK_N": 32}, num_warps=16),
    triton.Config({"BLOCK_N": 16}, num_warps=8),
    triton.Config({"BLOCK_N": 16}, num_warps=16),
]
# float64 (broadcast products): the fewest spills. ptxas (Triton 3.6, sm_90, M = 64, the fused
# kernel) spills per thread, with 8 warps: 4.5 kB at BLOCK_N = 16 (the only block tried before,
# 17.9 ms at B = 256 on an H100), 1.0 kB at 8, 104 B at 4, 436 B at 2, 36 B at 1; none at M = 16;
# at M = 128 every choice spills kilobytes. Not timed yet: the autotuner picks on the GPU.
_F64_CONFIGS = [
    triton.Config({"BLOCK_N": 4}, num_warps=8),
    triton.Config({"BLOCK_N": 1}, num_warps=8),
    triton.Config({"BLOCK_N": 2}, num_warps=8),
    triton.Config({"BLOCK_N": 4}, num_warps=16),
]


def _fits_in_registers(configs, named_args, **kwargs):
    """Drop the float32 configurations whose M x M tile cannot stay in registers.

    From ptxas's resource usage for sm_90 (cubins built as in kernels/compile_check.py, no GPU
    needed): the fused kernel spills at most a few bytes per thread while the Gram tile takes
    at most 64 32-bit registers per thread with BLOCK_N = 32 (32 with BLOCK_N = 64), and
    spills hundreds of bytes to kilobytes beyond that; e.g. float32 M = 128 spills 1.3 kB per
    thread with 4 warps and nothing with 8.
    """
    words = kwargs["BLOCK_M"] ** 2

    def per_thread(c):
        return words / (32 * c.num_warps)

    kept = [c for c in configs if per_thread(c) <= (32 if c.kwargs["BLOCK_N"] >= 64 else 64)]
    return kept or [max(configs, key=lambda c: c.num_warps)]


def blocks(m: int, l: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_L) for M segments and L labels; the launch takes cdiv(L, BLOCK_L)
    programs per image (see _TILE)."""
    block_m = max(16, next_power_of_2(m))
    return block_m, min(max(16, next_power_of_2(l)), _TILE // block_m)


@triton.jit
def _load_block(
    masks_ptr, targets_ptr, weights_ptr, b, n0, l0, N, L, mb, kw2,
    sm_b, sm_n, sm_m, st_b, st_n, st_l, sw_b, sw_n,
    HAS_WEIGHTS: tl.constexpr, F64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Samples n0 .. n0+BLOCK_N: z (BLOCK_N, BLOCK_M) 0/1 with zeros outside the image's
    segments, y (BLOCK_N, BLOCK_L) of labels l0 .. l0+BLOCK_L and w (BLOCK_N,), zero for rows
    past N."""
    dtype = tl.float64 if F64 else tl.float32
    rows = n0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    labels = l0 + tl.arange(0, BLOCK_L)
    row_ok = rows < N
    z = tl.load(
        masks_ptr + b * sm_b + rows[:, None] * sm_n + cols[None, :] * sm_m,
        mask=row_ok[:, None] & (cols < mb)[None, :], other=0,
    )
    z = (z != 0).to(dtype)
    y = tl.load(
        targets_ptr + b * st_b + rows[:, None] * st_n + labels[None, :] * st_l,
        mask=row_ok[:, None] & (labels < L)[None, :], other=0,
    ).to(dtype)
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + b * sw_b + rows * sw_n, mask=row_ok, other=0).to(dtype)
    else:
        # cosine distance to the all-ones sample, then LIME's exponential kernel
        if F64:
            d = 1 - tl.sqrt(tl.sum(z, axis=1) / mb.to(dtype))
            w = tl.sqrt(tl.exp(-(d * d) / kw2))
        else:
            d = 1 - tl.sqrt_rn(tl.sum(z, axis=1) / mb.to(dtype))
            w = tl.sqrt_rn(tl.exp(-(d * d) / kw2))
        w = tl.where(row_ok, w, 0)
    return z, y, w


@triton.jit
def _centred_block(
    masks_ptr, targets_ptr, weights_ptr, b, n0, l0, N, L, mb, kw2, xbar, ybar, seg_ok,
    sm_b, sm_n, sm_m, st_b, st_n, st_l, sw_b, sw_n,
    HAS_WEIGHTS: tl.constexpr, F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """_load_block's samples centred: zc (BLOCK_N, BLOCK_M), zero outside the image's segments,
    yc (BLOCK_N, BLOCK_L) and the weights w (BLOCK_N,)."""
    z, y, w = _load_block(masks_ptr, targets_ptr, weights_ptr, b, n0, l0, N, L, mb, kw2,
                          sm_b, sm_n, sm_m, st_b, st_n, st_l, sw_b, sw_n,
                          HAS_WEIGHTS, F64, BLOCK_N, BLOCK_M, BLOCK_L)
    return tl.where(seg_ok[None, :], z - xbar[None, :], 0), y - ybar[None, :], w


@triton.jit
def _dot_acc(a, b, acc, F64: tl.constexpr):
    """acc + a @ b. float64 avoids tl.dot: Triton 3.6's fp64 MMA lowering asserts ("fp64 don't
    support largeK MMA", sm_90, also at K = 16), so it reduces a broadcast product instead."""
    if F64:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _weighted_squares(w, v):
    """Σ w v² per column, in float64: float32 squares of targets below about 1e-19 (a class of
    tiny probability) underflow, above 1e19 overflow; R² is defined there as anywhere."""
    v = v.to(tl.float64)
    return tl.sum(w.to(tl.float64)[:, None] * v * v, axis=0)


@triton.jit
def _ridge_solve(gram, rhs, mb, min_pivot, BLOCK_M: tl.constexpr):
    """Solve gram @ beta = rhs by Gauss-Jordan elimination on the tile (gram is SPD), and say
    whether it held: 1 when every pivot was at least min_pivot and beta is finite, 0 where
    rounding made the matrix look (nearly) singular (a tiny alpha with collinear columns), as a
    failed Cholesky would.

    The factors divide with tl.div_rn: the GPU's default float32 division (an approximate
    reciprocal times the dividend) can leave a pivot that correctly rounded arithmetic cancels to
    0 at a few ulps above it, which a test of pivot > 0 accepted, with wrong coefficients."""
    idx = tl.arange(0, BLOCK_M)
    rows = idx[:, None]
    cols = idx[None, :]
    solved = tl.full((), 1, tl.int32)
    for k in range(0, mb):
        pivot_row = tl.sum(tl.where(rows == k, gram, 0), axis=0)
        pivot_col = tl.sum(tl.where(cols == k, gram, 0), axis=1)
        pivot = tl.sum(tl.where(idx == k, pivot_row, 0), axis=0)
        solved = tl.where(pivot >= min_pivot, solved, 0)  # (a NaN pivot compares false too)
        rhs_row = tl.sum(tl.where(rows == k, rhs, 0), axis=0)
        if gram.dtype == tl.float64:  # (always correctly rounded; tl.div_rn takes float32 only)
            factor = tl.where(idx == k, 0, pivot_col / pivot)
        else:
            factor = tl.where(idx == k, 0, tl.div_rn(pivot_col, pivot))
        gram = gram - factor[:, None] * pivot_row[None, :]
        rhs = rhs - factor[:, None] * rhs_row[None, :]
    diag = tl.sum(tl.where(rows == cols, gram, 0), axis=1)
    beta = rhs / diag[:, None]
    finite = tl.sum(tl.sum(((beta - beta) != 0).to(tl.int32), axis=1), axis=0) == 0
    return beta, tl.where(finite, solved, 0)


@triton.jit
def _lime_fit(
    # pointers
    masks_ptr, targets_ptr, weights_ptr, num_segments_ptr, params_ptr,
    gram_ptr, rhs_ptr, beta_ptr,  # normal equations / solution of the least-squares path
    unsolved_ptr,  # set to 1 where the fused solve did not hold
    coef_ptr, intercept_ptr, score_ptr, local_pred_ptr,
    # sizes
    N, M, L,
    # strides (elements); the outputs are contiguous
    sm_b, sm_n, sm_m, st_b, st_n, st_l, sw_b, sw_n, sk_b,
    # compile-time
    PHASE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, F64: tl.constexpr, INT64_INDEX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
):
    dtype = tl.float64 if F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    l0 = tl.program_id(1) * BLOCK_L  # this program's labels: l0 .. l0 + BLOCK_L (see blocks())
    # offsets within an image in 64 bits where they can pass int32 (op_registration.int64_index)
    index_t = tl.int64 if INT64_INDEX else tl.int32
    sm_n, sm_m, sw_n = tl.cast(sm_n, index_t), tl.cast(sm_m, index_t), tl.cast(sw_n, index_t)
    st_n, st_l = tl.cast(st_n, index_t), tl.cast(st_l, index_t)
    # Counts outside 1..M are flagged by a pass on the device and the call then raises; clamped
    # here so that such a count reads nothing out of bounds on the way.
    mb = tl.minimum(tl.maximum(tl.load(num_segments_ptr + b * sk_b), 1), M)
    kw2 = tl.load(params_ptr)
    alpha = tl.load(params_ptr + 1)
    idx_m = tl.arange(0, BLOCK_M)
    idx_l = l0 + tl.arange(0, BLOCK_L)
    seg_ok = idx_m < mb

    # 1. weights and weighted means
    acc_w = tl.zeros((BLOCK_N,), dtype)
    acc_z = tl.zeros((BLOCK_M,), dtype)
    acc_y = tl.zeros((BLOCK_L,), dtype)
    for n0 in range(0, N, BLOCK_N):
        z, y, w = _load_block(masks_ptr, targets_ptr, weights_ptr, b, n0, l0, N, L, mb, kw2,
                              sm_b, sm_n, sm_m, st_b, st_n, st_l, sw_b, sw_n,
                              HAS_WEIGHTS, F64, BLOCK_N, BLOCK_M, BLOCK_L)
        acc_w += w
        acc_z += tl.sum(w[:, None] * z, axis=0)
        acc_y += tl.sum(w[:, None] * y, axis=0)
    sw = tl.sum(acc_w, axis=0)
    xbar = tl.where(seg_ok, acc_z / sw, 0)
    ybar = acc_y / sw

    # 2. centred normal equations, then the solve
    tss = tl.zeros((BLOCK_L,), tl.float64)  # R²'s sums in float64 (_weighted_squares)
    if PHASE != _FINISH:
        gram = tl.zeros((BLOCK_M, BLOCK_M), dtype)
        rhs = tl.zeros((BLOCK_M, BLOCK_L), dtype)
        for n0 in range(0, N, BLOCK_N):
            zc, yc, w = _centred_block(masks_ptr, targets_ptr, weights_ptr, b, n0, l0, N, L, mb, kw2, xbar, ybar, seg_ok,
                                       sm_b, sm_n, sm_m, st_b, st_n, st_l, sw_b, sw_n,
                                       HAS_WEIGHTS, F64, BLOCK_N, BLOCK_M, BLOCK_L)
            wzc_t = tl.trans(w[:, None] * zc)
            gram = _dot_acc(wzc_t, zc, gram, F64)
            rhs = _dot_acc(wzc_t, yc, rhs, F64)
            tss += _weighted_squares(w, yc)
        ridge = tl.where(seg_ok, alpha, 1.0).to(dtype)
        gram += tl.where(idx_m[:, None] == idx_m[None, :], ridge[:, None], 0)
    if PHASE == _NORMAL_EQUATIONS:
        rc = idx_m[:, None] < M
        if l0 == 0:  # every program of the image computed the same matrix: the first writes it
            tl.store(gram_ptr + b * M * M + idx_m[:, None] * M + idx_m[None, :], gram, mask=rc & (idx_m < M)[None, :])
        tl.store(rhs_ptr + b * M * L + idx_m[:, None] * L + idx_l[None, :], rhs, mask=rc & (idx_l < L)[None, :])
    else:
        if PHASE == _FUSED:
            # In exact arithmetic every pivot is at least alpha (Schur complements of the SPD
            # G + αI, at least its smallest eigenvalue): one below half of it (of 1 for a large
            # alpha) is rounding's, and the least-squares path, correct for any matrix, takes over.
            beta, solved = _ridge_solve(gram, rhs, mb, 0.5 * tl.minimum(alpha, 1.0), BLOCK_M)
            # 3. from (G + αI) β = R: Σ w (yc - zc β)² = Σ w yc² - β·R - α |β|² (padded rows: β = 0)
            beta64, rhs64 = beta.to(tl.float64), rhs.to(tl.float64)
            rss = tl.maximum(tss - tl.sum(beta64 * rhs64, axis=0) - alpha.to(tl.float64) * tl.sum(beta64 * beta64, axis=0), 0)
            if solved == 0:  # NaN outputs, which the launcher replaces by the least-squares path's
                tl.store(unsolved_ptr, 1)
                beta = beta + float("nan")
                rss = rss + float("nan")
        else:
            beta = tl.load(beta_ptr + b * M * L + idx_m[:, None] * L + idx_l[None, :],
                           mask=seg_ok[:, None] & (idx_l < L)[None, :], other=0).to(dtype)
            # 3. residual and total sums of squares, a third pass (β came from outside)
            rss = tl.zeros((BLOCK_L,), tl.float64)
            for n0 in range(0, N, BLOCK_N):
                zc, yc, w = _centred_block(masks_ptr, targets_ptr, weights_ptr, b, n0, l0, N, L, mb, kw2, xbar, ybar,
                                           seg_ok, sm_b, sm_n, sm_m, st_b, st_n, st_l, sw_b, sw_n,
                                           HAS_WEIGHTS, F64, BLOCK_N, BLOCK_M, BLOCK_L)
                resid = yc - _dot_acc(zc, beta, tl.zeros((BLOCK_N, BLOCK_L), dtype), F64)
                rss += _weighted_squares(w, resid)
                tss += _weighted_squares(w, yc)

        intercept = ybar - tl.sum(xbar[:, None] * beta, axis=0)
        local_pred = intercept + tl.sum(beta, axis=0)
        # scikit-learn's r2_score with force_finite (see r2_from_sums)
        score = 1 - rss / tl.where(tss == 0, 1, tss)
        score = tl.where(tss == 0, tl.where(rss == 0, 1, 0).to(tl.float64), score).to(dtype)
        label_ok = idx_l < L
        tl.store(coef_ptr + b * L * M + idx_l[None, :] * M + idx_m[:, None], beta,
                 mask=(idx_m < M)[:, None] & label_ok[None, :])
        tl.store(intercept_ptr + b * L + idx_l, intercept, mask=label_ok)
        tl.store(score_ptr + b * L + idx_l, score, mask=label_ok)
        tl.store(local_pred_ptr + b * L + idx_l, local_pred, mask=label_ok)


_KEY = ["N", "BLOCK_M", "BLOCK_L", "PHASE", "HAS_WEIGHTS"]
_lime_fit_kernel = triton.autotune(
    configs=autotune_configs(_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _fits_in_registers}
)(_lime_fit)
_lime_fit_kernel_f64 = triton.autotune(configs=autotune_configs(_F64_CONFIGS), key=_KEY)(_lime_fit)


def _lime_fit_launcher(
    masks: torch.Tensor,
    targets: torch.Tensor,
    num_segments: torch.Tensor,
    weights: torch.Tensor | None,
    kernel_width: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype, device = targets.dtype, targets.device
    b, n, m = masks.shape
    l = targets.shape[2]
    if m > MAX_SEGMENTS:
        raise ValueError(
            f"the Triton lime_fit keeps the M x M system of an image in registers and takes at most "
            f"{MAX_SEGMENTS} segments, got M={m}; use backend='cuda', 'cpp' or 'torch' for more"
        )
    if l > MAX_LABELS:
        raise ValueError(
            f"the Triton lime_fit fits at most {MAX_LABELS} labels per call, got L={l}; "
            "split the labels or use backend='cuda', 'cpp' or 'torch'"
        )
    # int(): the block sizes are compile-time constants, so a symbolic size is specialized here
    f64 = dtype == torch.float64
    block_m, block_l = blocks(int(m), int(l))
    coef = torch.empty((b, l, m), dtype=dtype, device=device)
    intercept, score, local_pred = (torch.empty((b, l), dtype=dtype, device=device) for _ in range(3))
    # Scalars travel as a tensor of targets' dtype: Triton passes Python floats as float32. An
    # alpha beyond the dtype's range acts as its largest value (β rounds to 0 either way; inf
    # would make the residual's α |β|² a NaN).
    params = scalars((kernel_width**2, min(alpha, torch.finfo(dtype).max)), dtype, device)
    has_weights = weights is not None
    w = weights if has_weights else targets  # never read when HAS_WEIGHTS is off
    # The counts and the targets' values are checked on the device (the outputs are the call's
    # own, so raising after the launch loses nothing, and the launch waits for no copy).
    flag = new_flag(device)
    unsolved = new_flag(device)  # set by a fused solve that did not hold
    flag_pass(num_segments, flag, within=(1, m + 1))
    flag_pass(targets, flag)
    host_check = lambda: check_lime_fit_values(targets, num_segments, m)  # noqa: E731
    sw_b, sw_n = w.stride()[:2]
    wide = int64_index(masks, targets, weights)

    def launch(phase, gram, rhs, beta):
        kernel = _lime_fit_kernel_f64 if f64 else _lime_fit_kernel
        wrap_triton(kernel)[(b, cdiv(l, block_l))](
            masks, targets, w, num_segments, params,
            gram, rhs, beta, unsolved, coef, intercept, score, local_pred,
            n, m, l,
            *masks.stride(), *targets.stride(), sw_b, sw_n, num_segments.stride(0),
            PHASE=phase, HAS_WEIGHTS=has_weights, F64=f64, INT64_INDEX=wide,
            BLOCK_M=block_m, BLOCK_L=block_l,
        )

    if alpha > 0:
        launch(FUSED, coef, coef, coef)  # the scratch pointers are unused
        _, failed = raise_if_flagged(flag, host_check, "lime_fit", unsolved)
        if not failed:  # (traced, where no flag can be read: NaN for the images whose solve failed)
            return coef, intercept, score, local_pred
    # zeros, not empty: the launch writes every entry, but a solve of uninitialized memory (where a
    # launch is skipped, as when the launcher is traced with stubbed kernels) can fail to converge.
    gram = torch.zeros((b, m, m), dtype=dtype, device=device)
    rhs = torch.zeros((b, m, l), dtype=dtype, device=device)
    launch(NORMAL_EQUATIONS, gram, rhs, rhs)
    raise_if_flagged(flag, host_check, "lime_fit")  # before the solve, which may fail to converge on non-finite sums
    # The minimum-norm solution, as the reference's pinv fallback gives; lstsq itself has no fake
    # implementation (its outputs' shapes depend on the data), which torch.compile needs.
    beta = (torch.linalg.pinv(gram, hermitian=True) @ rhs).contiguous()
    launch(FINISH, gram, rhs, beta)
    return coef, intercept, score, local_pred


lime_fit_triton = TritonOp("lime_fit_triton", _lime_fit_launcher, check_lime_fit)
