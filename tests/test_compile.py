"""The public op functions (attrefine_fast.ops.*) under torch.compile(fullgraph=True): one graph
with every backend that runs here, the same results as eager calls, and the checks that read
tensor values turned into graph assertions that stop a bad call before anything is written.

A failing assertion is a RuntimeError on the CPU; on CUDA it is a device-side assertion, which
ends the process's CUDA context, so the bad-input tests run on the CPU only.
"""
import pytest
import torch
from torch._inductor.decomposition import decompositions as inductor_decompositions

from attrefine_fast import backends, ops
from conftest import needs_cuda
from op_cases import labels, lime_fit_cases, masked_pgd_step_cases, perturb_cases, segment_mean_cases

# (backend, device): every backend whose kernels Inductor can run on that device (the Triton
# interpreter runs eager calls only).
BACKENDS = [
    ("torch", "cpu"),
    ("cpp", "cpu"),
    pytest.param("torch", "cuda", marks=needs_cuda),
    pytest.param("cuda", "cuda", marks=needs_cuda),
    pytest.param("triton", "cuda", marks=needs_cuda),
]


# What older torch.compile does differently (checked with torch 2.4, 2.6 and 2.8 on the CPU; the
# results of every compiled call still match the eager calls there):
# - Inductor decomposes torch._assert_async to nothing (torch 2.13 lowers it to a check), so the
#   value checks vanish from the graph;
# - with fullgraph=True, the error raised for an exception met while tracing does not always carry
#   that exception's message (never on 2.4 and 2.8);
# - new segment counts and offsets recompile more often (4-5 graphs for 5 sizes on 2.4 and 2.6).
_TORCH = torch.torch_version.TorchVersion(torch.__version__)
_needs_graph_assertions = pytest.mark.skipif(
    torch.ops.aten._assert_async.msg in inductor_decompositions,
    reason=f"Inductor of torch {torch.__version__} drops torch._assert_async: compiled calls skip the value checks")
_needs_traced_error_messages = pytest.mark.skipif(
    _TORCH < (2, 9), reason=f"torch {torch.__version__}'s fullgraph error does not carry the traced exception's message")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _available(backend, device):
    ok, why = backends.status("segment_mean", backend, device)
    if not ok:
        pytest.skip(why)


def _case(cases, name):
    return dict(cases)[name]


# Two sets of op_cases' shapes: (segment_mean, perturb, lime_fit, masked_pgd_step) case names.
CASES = {
    "prime": ("prime", "bands_channels_last", "prime", "linf-prime"),
    "awkward": ("non_contiguous", "non_contiguous", "single_segment", "l2-channels_last"),
    "unweighted": ("prime", "bands_channels_last", "prime", "l2-non_contiguous"),  # L2 without a weight
}


def _every_op(backend, device, case):
    """The public functions' arguments for one CASES entry, and a function calling all of them."""
    sm, pt, fit, pgd = CASES[case]
    images, segments, m = _case(segment_mean_cases(device=device), sm)
    p_images, p_segments, masks, fudge, offset, count, mean, std, out_dtype, channels_last = _case(perturb_cases(device=device), pt)
    f_masks, targets, num_segments, weights, kernel_width, alpha = _case(lime_fit_cases(device=device), fit)
    x_adv, x, grad, weight, step_size, eps, lo, hi, norm = _case(masked_pgd_step_cases(device=device), pgd)
    args = (images, segments, p_images, p_segments, masks, fudge, f_masks, targets, num_segments, weights, x_adv, x, grad, weight)

    def run(images, segments, p_images, p_segments, masks, fudge, f_masks, targets, num_segments, weights, x_adv, x, grad, weight):
        means = ops.segment_mean(images, segments, m, backend=backend)
        chunk = ops.perturb(p_images, p_segments, masks, fudge, offset, count, mean=mean, std=std, out_dtype=out_dtype,
                            channels_last=channels_last, backend=backend)
        into = torch.empty_like(chunk)
        ops.perturb(p_images, p_segments, masks, fudge, offset, out=into, mean=mean, std=std, backend=backend)
        fit = ops.lime_fit(f_masks, targets, num_segments, weights, kernel_width=kernel_width, alpha=alpha, backend=backend)
        stepped = ops.masked_pgd_step(x_adv.clone(), x, grad, weight, step_size=step_size, eps=eps, lo=lo, hi=hi,
                                      norm=norm, backend=backend)
        return means, chunk, into, *fit, stepped

    return run, args


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_public_ops_trace_into_one_graph(backend, device, case, dynamic):
    _available(backend, device)
    run, args = _every_op(backend, device, case)
    eager = run(*args)
    # dynamic: symbolic sizes and Python floats, as after a recompilation for new sizes
    compiled = torch.compile(run, fullgraph=True, dynamic=dynamic)(*args)
    # the compiled reference is generated code, with its own order of float32 sums
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_backend_auto_is_resolved_while_tracing():
    images, segments, m = _case(segment_mean_cases(), "prime")
    compiled = torch.compile(lambda i, s: ops.segment_mean(i, s, m), fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(images, segments), ops.segment_mean_ref(images, segments, m))


def test_unavailable_backend_raises_the_eager_error_while_tracing():
    # The same exception types as eager calls (not torch._dynamo's InternalTorchDynamoError), so
    # that code catching BackendUnavailable to fall back works compiled too.
    images, segments, m = _case(segment_mean_cases(), "prime")
    compiled = torch.compile(lambda i, s: ops.segment_mean(i, s, m, backend="cuda"))
    with pytest.raises(backends.BackendUnavailable, match="backend 'cuda' cannot run segment_mean on cpu"):
        compiled(images, segments)
    unknown = torch.compile(lambda i, s: ops.segment_mean(i, s, m, backend="opencl"))
    with pytest.raises(ValueError, match="unknown backend 'opencl'"):
        unknown(images, segments)


@_needs_traced_error_messages
def test_unavailable_backend_names_itself_in_a_full_graph():
    # fullgraph=True cannot fall back to running the call eagerly: torch._dynamo reports the
    # exception it observed (its type varies across torch versions), with our message in it.
    images, segments, m = _case(segment_mean_cases(), "prime")
    compiled = torch.compile(lambda i, s: ops.segment_mean(i, s, m, backend="cuda"), fullgraph=True)
    with pytest.raises(Exception, match="backend 'cuda' cannot run segment_mean on cpu"):
        compiled(images, segments)


@_needs_traced_error_messages
def test_segment_mean_needs_num_segments_while_tracing():
    images, segments, _ = _case(segment_mean_cases(), "prime")
    compiled = torch.compile(lambda i, s: ops.segment_mean(i, s), fullgraph=True)
    with pytest.raises(Exception, match="give num_segments"):
        compiled(images, segments)


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


@_needs_graph_assertions
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_value_checks_become_assertions_and_nothing_is_written(backend):
    _available(backend, "cpu")
    x_adv, x, grad, weight, step_size, eps, lo, hi, norm = _case(masked_pgd_step_cases(), "l2-prime")
    x_adv = x_adv.clone()
    before = x_adv.clone()

    @torch.compile(fullgraph=True, dynamic=False)
    def step(x_adv, x, grad, weight):
        return ops.masked_pgd_step(x_adv, x, grad, weight, step_size=step_size, eps=eps, lo=lo, hi=hi, norm=norm, backend=backend)

    step(x_adv.clone(), x, grad, weight)  # compiled once on good input: the bad calls below reuse the graph
    for bad, message in [
        ((x_adv, _with(x, (0, 0, 1, 1), float("nan")), grad, weight), "x contains NaN"),
        ((_with(x_adv, (1, 2, 0, 0), float("inf")), x, grad, weight), "x_adv contains NaN"),
        ((x_adv, x, _with(grad, (0, 1, 2, 3), float("nan")), weight), "grad contains NaN"),
        ((x_adv, x, grad, _with(weight, (0, 1, 1), 1.5)), r"weight must lie in \[0, 1\]"),
    ]:
        target = bad[0]
        kept = target.clone()
        with pytest.raises((RuntimeError, ValueError), match=message):
            step(*bad)
        assert torch.equal(target.nan_to_num(), kept.nan_to_num()), message
    assert torch.equal(x_adv, before)


@_needs_graph_assertions
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_segment_label_checks_become_assertions(backend):
    _available(backend, "cpu")
    images, segments, masks, fudge, offset, count, mean, std, _, _ = _case(perturb_cases(), "bands_channels_last")
    m = masks.shape[2]
    out = torch.zeros(images.shape[0] * count, *images.shape[1:])

    @torch.compile(fullgraph=True, dynamic=False)
    def both(images, segments, masks, fudge, mean, std, out):
        ops.perturb(images, segments, masks, fudge, offset, out=out, mean=mean, std=std, backend=backend)
        return ops.segment_mean(images, segments, m, backend=backend)

    both(images, segments, masks, fudge, mean, std, out.clone())
    gap = torch.where(segments == 1, 2, segments)  # image 0 keeps labels 0, 2, 3, 4: 1 is missing
    for bad_segments, bad_std, message in [
        (gap, std, "not numbered 0..M-1"),
        (_with(segments, (1, 0, 0), -1), std, "negative labels"),
        (_with(segments, (0, 0, 0), m), std, "label >= M"),
        (segments, _with(std, 1, 0.0), "std contains zeros"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            both(images, bad_segments, masks, fudge, mean, bad_std, out)
        assert not out.any(), message


def test_lime_fit_reference_takes_the_least_squares_branch_in_the_graph():
    """alpha = 0 with a column never on: the centered column is exactly zero, so the Gram matrix is
    singular in any summation order and Cholesky fails; the reference then solves by pinv, a
    branch the graph takes itself (torch.cond) instead of reading Cholesky's status on the host.
    (A column always on would leave the centered column at rounding level, which Cholesky may
    or may not let through, depending on the order Inductor sums in.)"""
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(2, 40, 4, generator=gen) > 0.5
    targets = torch.rand(2, 40, 2, generator=gen, dtype=torch.float64)
    fit = torch.compile(lambda m, t: ops.lime_fit(m, t, alpha=0.0, backend="torch"), fullgraph=True, dynamic=False)
    torch.testing.assert_close(fit(masks, targets), ops.lime_fit(masks, targets, alpha=0.0, backend="torch"))
    masks[:, :, 2] = False  # the same graph, the other branch
    coef, intercept, score, local_pred = fit(masks, targets)
    assert coef[:, :, 2].abs().max() < 1e-12  # minimum norm: nothing on a column that never varies
    torch.testing.assert_close((coef, intercept, score, local_pred), ops.lime_fit(masks, targets, alpha=0.0, backend="torch"),
                               atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("segments, labels", [(4, 1), (1, 2)], ids=["one_label", "one_segment"])
def test_lime_fit_reference_with_a_size_one_dimension(segments, labels):
    """One label (the common top-label fit) or one segment: torch.cond's two solves must agree on
    the strides of that size-1 dimension too."""
    gen = torch.Generator().manual_seed(7)
    masks = torch.rand(3, 12, segments, generator=gen) > 0.5
    targets = torch.rand(3, 12, labels, generator=gen, dtype=torch.float64)
    fit = torch.compile(lambda m, t: ops.lime_fit(m, t, backend="torch"), fullgraph=True, dynamic=False)
    torch.testing.assert_close(fit(masks, targets), ops.lime_fit(masks, targets, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_new_sizes_and_offsets_do_not_recompile_each_time(backend):
    """After one recompilation with symbolic sizes, new segment counts and chunk offsets reuse the
    graph: no size is fixed by an error message, and the C++ schemas take SymInts."""
    _available(backend, "cpu")
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(8)

    @torch.compile(fullgraph=True)
    def explain_like(images, segments, masks, targets, m, offset):
        fudge = ops.segment_mean(images, segments, m, backend=backend).mean() * torch.ones_like(images)
        chunk = ops.perturb(images, segments, masks, fudge, offset, 2, backend=backend)
        return chunk, ops.lime_fit(masks, targets, backend=backend)

    counters.clear()
    for step, m in enumerate(range(3, 8)):
        images = torch.rand(2, 3, 6, 5, generator=gen)
        segments = labels(2, 6, 5, [m, m], gen)
        masks = torch.rand(2, 8, m, generator=gen) > 0.5
        targets = torch.rand(2, 8, 2, generator=gen, dtype=torch.float64)
        got = explain_like(images, segments, masks, targets, m, step)
        torch.testing.assert_close(got, explain_like.__wrapped__(images, segments, masks, targets, m, step))
    if _TORCH >= (2, 8):
        assert counters["stats"]["unique_graphs"] <= 2
