"""The Triton kernels (kernels/): their registration as torch ops, segment_mean and perturb
(and perturb_into) against the pure-PyTorch references through the public ops, and the checks
that every Triton op traces for torch.compile and opcheck.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter; conftest.py
sets TRITON_INTERPRET=1 before any test module (and so before attrefine_fast.kernels) is
imported. Where a GPU is present the same tests run on CUDA, plus torch.compile and opcheck
(opcheck's fake-tensor pass cannot work under the interpreter, which reads the data).
lime_fit and masked_pgd_step are in test_triton_fit_pgd.py; inputs and tolerances shared by both
in triton_cases.py.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from attrefine_fast import backends, ops  # noqa: E402
from conftest import DEVICES, needs_cuda  # noqa: E402
from op_cases import BAD_CALLS  # noqa: E402
from triton_cases import (  # noqa: E402
    PERTURB_TOLS, autotune_key, import_kernels_or_skip, make_segments, mutated_arg, perturb_inputs, record_launches,
    sample_calls, use_only_config,
)

import_kernels_or_skip()  # registers the *_triton ops that sample_calls names at collection


def test_interpreter_is_on_where_there_is_no_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels are compiled, not interpreted")
    from triton.runtime.interpreter import InterpretedFunction

    from attrefine_fast import kernels

    assert os.environ.get("TRITON_INTERPRET") == "1"
    # Defined after the variable was set: the kernels are interpreted, not compiled.
    assert isinstance(kernels.perturb._perturb_kernel.fn, InterpretedFunction)
    assert isinstance(kernels.masked_pgd_step._masked_pgd_kernel, InterpretedFunction)
    for op in ("segment_mean", "perturb", "perturb_into", "lime_fit", "masked_pgd_step"):
        assert backends.status(op, "triton", "cpu")[0]


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_stride_over_more_blocks_than_grid_axis_1_holds(device, monkeypatch):
    # CUDA allows 65,535 programs on grid axis 1: a 4096x4096 image has more pixel blocks than
    # that. With the limit lowered to 2, every kernel strides over 5 to 7 blocks per program row.
    from attrefine_fast.kernels import op_registration

    monkeypatch.setattr(op_registration, "GRID_AXIS_LIMIT", 2)
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 40, 40, generator=gen).to(device)
    segments, m = make_segments(2, 40, 40, [7, 3], gen, device), 7
    means = ops.segment_mean(images, segments, m, backend="triton")
    torch.testing.assert_close(means, ops.segment_mean(images, segments, m, backend="torch"))
    masks = (torch.rand(2, 5, m, generator=gen) > 0.5).to(device)
    fudge = torch.rand(2, 3, 40, 40, generator=gen).to(device)
    for channels_last in (False, True):
        args = (images, segments, masks, fudge, 1, 3)
        got = ops.perturb(*args, channels_last=channels_last, backend="triton")
        assert torch.equal(got, ops.perturb(*args, channels_last=channels_last, backend="torch"))
    x = torch.rand(2, 3, 40, 40, generator=gen).to(device)
    grad = torch.randn(2, 3, 40, 40, generator=gen).to(device)
    for norm in ("linf", "l2"):
        got = ops.masked_pgd_step(x.clone(), x, grad, step_size=0.05, eps=0.1, norm=norm, backend="triton")
        want = ops.masked_pgd_step(x.clone(), x, grad, step_size=0.05, eps=0.1, norm=norm, backend="torch")
        torch.testing.assert_close(got, want)


def test_int64_index_is_for_samples_that_span_2_to_the_31_elements():
    # Meta tensors: the layouts without the memory.
    from attrefine_fast.kernels.op_registration import INT32_SPAN_LIMIT, int64_index, sample_span

    big = torch.empty(3, 16384, 256, 256, device="meta").transpose(0, 1)  # (16384, 3, 256, 256)
    assert sample_span(big) == 2 * 2**30 + 255 * 256 + 255 and int64_index(big)
    assert not int64_index(big.contiguous(), None)  # 3 x 256 x 256 per sample
    masks = torch.empty(1100, 8192, 256, dtype=torch.bool, device="meta").transpose(0, 1)  # (B, N, M), N outermost
    assert int64_index(torch.empty(2, 3, device="meta"), masks) and not int64_index(masks[:, :1000])
    # a dimension of size 1 is never stepped along, whatever its stride
    assert not int64_index(torch.empty(2, 1, 4, device="meta").as_strided((2, 1, 4), (4, 2**40, 1)))
    assert sample_span(torch.empty(2, 0, 5, device="meta")) == 4
    assert INT32_SPAN_LIMIT <= 2**31 - 4096  # room for perturb's largest block past a sample's end


def test_launchers_pick_int64_offsets_for_a_sample_past_2_to_the_31(monkeypatch):
    # Fake tensors, and launches recorded instead of run: the tensors need no memory.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attrefine_fast import kernels

    names = ("segment_mean", "perturb", "lime_fit", "masked_pgd_step")
    for name in names + ("device_checks",):
        monkeypatch.setattr(getattr(kernels, name), "wrap_triton", lambda kernel: _NoLaunch())
    launches = {name: record_launches(monkeypatch, name) for name in names}
    with FakeTensorMode():
        for size in (16384, 2):
            images = torch.empty(3, size, 256, 256).transpose(0, 1)
            segments = torch.zeros(size, 256, 256, dtype=torch.long)
            masks = torch.empty(1100, size // 2, 256, dtype=torch.bool).transpose(0, 1)
            kernels.segment_mean.segment_mean_triton.launch(images, segments, 4)
            kernels.perturb.perturb_triton.launch(images[:2], segments[:2], masks[:2, :3], images[:2], 0, 1, None, None, None, False)
            kernels.lime_fit.lime_fit_triton.launch(masks, torch.empty(size // 2, 1100, 2), torch.ones(size // 2, dtype=torch.long),
                                                    None, 0.25, 1.0)
            kernels.masked_pgd_step.masked_pgd_step_triton.launch(images, images.contiguous(), images, None, 0.1, 0.1, 0.0, 1.0, "l2")
    for name, recorded in launches.items():
        picked = [k["INT64_INDEX"] for _, k in recorded]
        assert picked and picked == [True] * (len(picked) // 2) + [False] * (len(picked) // 2), name


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_with_int64_offsets_match_the_reference(device, monkeypatch):
    # Every layout takes the int64 path when the limit is 0: the same results, in the
    # interpreter here and compiled on a GPU.
    from attrefine_fast.kernels import op_registration

    monkeypatch.setattr(op_registration, "INT32_SPAN_LIMIT", 0)
    launches = {name: record_launches(monkeypatch, name) for name in ("segment_mean", "perturb", "lime_fit", "masked_pgd_step")}
    gen = torch.Generator().manual_seed(17)
    images = torch.rand(3, 2, 9, 7, generator=gen).transpose(0, 1).to(device)  # (2, 3, 9, 7), non-contiguous
    segments = make_segments(2, 9, 7, [5, 3], gen, device).transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(ops.segment_mean(images, segments, 5, backend="triton"), ops.segment_mean(images, segments, 5, backend="torch"))
    masks = (torch.rand(2, 5, 6, generator=gen) > 0.5).transpose(1, 2).to(device)  # (2, 6, 5)
    for channels_last in (False, True):
        args = (images, segments, masks, images.flip(1), 1, 4)
        got = ops.perturb(*args, channels_last=channels_last, backend="triton")
        assert torch.equal(got, ops.perturb(*args, channels_last=channels_last, backend="torch"))
    fit_masks = (torch.rand(2, 5, 30, generator=gen) > 0.5).transpose(1, 2).to(device)
    fit_masks[:, 0] = True
    targets = torch.rand(2, 3, 30, generator=gen, dtype=torch.float64).transpose(1, 2).to(device)
    for alpha in (1.0, 0.0):
        got = ops.lime_fit(fit_masks, targets, alpha=alpha, backend="triton")
        for g, w in zip(got, ops.lime_fit(fit_masks, targets, alpha=alpha, backend="torch")):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)
    x = torch.rand(2, 3, 9, 7, generator=gen).to(device)
    grad = torch.randn(2, 3, 9, 7, generator=gen).to(device)
    for x_adv in (x.clone(), x.clone(memory_format=torch.channels_last)):  # flat and strided offsets
        for norm in ("linf", "l2"):
            got = ops.masked_pgd_step(x_adv.clone(), x, grad, step_size=0.05, eps=0.1, norm=norm, backend="triton")
            want = ops.masked_pgd_step(x_adv.clone(), x, grad, step_size=0.05, eps=0.1, norm=norm, backend="torch")
            torch.testing.assert_close(got, want)
    for name, recorded in launches.items():
        assert recorded and all(k["INT64_INDEX"] for _, k in recorded), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_launch_on_their_tensors_device_not_the_current_one():
    # Triton launches on the current device: the ops make their tensors' device current.
    assert torch.cuda.current_device() == 0
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 16, 16, generator=gen)
    segments = make_segments(2, 16, 16, [5, 4], gen, "cpu")
    masks = torch.rand(2, 4, 5, generator=gen) > 0.5
    x, grad = torch.rand(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    on1 = [t.to("cuda:1") for t in (images, segments, masks, x, grad)]
    torch.testing.assert_close(ops.segment_mean(*on1[:2], 5, backend="triton").cpu(), ops.segment_mean(images, segments, 5))
    torch.testing.assert_close(ops.perturb(on1[0], on1[1], on1[2], on1[0], 0, 4, backend="triton").cpu(),
                               ops.perturb(images, segments, masks, images, 0, 4))
    got = ops.masked_pgd_step(on1[3].clone(), on1[3], on1[4], step_size=0.05, eps=0.1, norm="l2", backend="triton")
    torch.testing.assert_close(got.cpu(), ops.masked_pgd_step(x.clone(), x, grad, step_size=0.05, eps=0.1, norm="l2"))
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("module,kernel,configs", [
    ("perturb", "_perturb_kernel", "_CONFIGS"),
    ("lime_fit", "_lime_fit_kernel", "_CONFIGS"),
    ("lime_fit", "_lime_fit_kernel_f64", "_F64_CONFIGS"),
])
def test_autotune_keys_and_configs_name_kernel_arguments(module, kernel, configs):
    # Triton skips unknown key names silently; a typo would make one tuning serve every size.
    from attrefine_fast import kernels

    mod = getattr(kernels, module)
    tuner = getattr(mod, kernel)
    key = autotune_key(tuner)
    assert key and set(key) <= set(tuner.arg_names)
    for config in getattr(mod, configs):
        assert set(config.kwargs) <= set(tuner.arg_names)


@pytest.mark.parametrize("module", ["device_checks", "segment_mean", "perturb", "lime_fit", "masked_pgd_step"])
def test_kernel_modules_keep_annotations_evaluated(module):
    # Triton 3.0's interpreter takes a parameter annotated with the string "tl.constexpr" for a
    # runtime value (tl.arange then refuses it), and torch 2.4 infers no schema from strings.
    import importlib
    import inspect

    import triton

    mod = importlib.import_module(f"attrefine_fast.kernels.{module}")
    functions = [f for f in vars(mod).values() if inspect.isfunction(f) and f.__module__ == mod.__name__]
    functions += [k.fn for k in vars(mod).values() if isinstance(k, triton.runtime.KernelInterface)]
    while any(hasattr(f, "fn") for f in functions):  # an autotuner wraps the JIT function
        functions = [getattr(f, "fn", f) for f in functions]
    assert any(f.__annotations__ for f in functions)
    for f in functions:
        for name, annotation in f.__annotations__.items():
            assert not isinstance(annotation, str), f"{module}.{f.__name__}: {name} annotated {annotation!r}"


@pytest.mark.parametrize("op", ["segment_mean", "perturb", "perturb_into", "lime_fit", "masked_pgd_step"])
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


@pytest.mark.parametrize("route", ["torch.ops", "direct"])
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_the_compiled_ops_errors(name, route):
    # The compiled ops' argument contract, held by the Triton ops too (kernels/contracts.py): a
    # torch.ops call or a direct eager call with bad input must not reach a kernel.
    from attrefine_fast import kernels

    op, make_args, error, match = BAD_CALLS[name]
    call = getattr(torch.ops.attrefine_fast, f"{op}_triton") if route == "torch.ops" else kernels.get(op)
    with pytest.raises(error, match=match):
        call(*make_args())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("route", ["torch.ops", "direct"])
@pytest.mark.parametrize("bad_id", [-1, 4])
def test_perturb_into_writes_nothing_for_a_segment_id_out_of_range(device, route, bad_id):
    # The ids are checked on the device (kernels/device_checks.py) while the host goes on to the
    # launch: the writing kernel must see the flag and leave the caller's buffer as it was.
    from attrefine_fast import kernels

    gen = torch.Generator().manual_seed(3)
    images, segments, masks, fudge = perturb_inputs(2, 3, 6, 5, 4, [4, 2], torch.float32, device, gen)
    segments[1, 5, 4] = bad_id  # the last pixel of the last image
    out = torch.full((2 * 4, 3, 6, 5), 7.0, device=device).contiguous(memory_format=torch.channels_last)
    call = torch.ops.attrefine_fast.perturb_into_triton if route == "torch.ops" else kernels.get("perturb_into")
    tuner = kernels.perturb._perturb_kernel
    tuner.cache[("some sizes",)] = tuner.configs[0]
    with pytest.raises(ValueError, match=rf"segment ids must lie in \[0, 4\), got ids in \[{min(bad_id, 0)}, {max(bad_id, 3)}\]"):
        call(images, segments, masks, fudge, 0, None, None, out)
    assert torch.all(out == 7.0)
    assert not tuner.cache  # a choice timed on launches that wrote nothing is not kept


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_flag_pass_finds_one_bad_element_anywhere(device, dtype):
    from attrefine_fast.kernels.device_checks import BLOCK, flag_pass, flag_values, new_flag

    def flagged(data, **kwargs):
        flag = new_flag(device)
        flag_pass(data, flag, **kwargs)
        return flag_values(flag)[0] == 1

    # a non-contiguous (B, C, H, W) view spanning several programs
    base = torch.rand(3, 5, 41, 37, dtype=torch.float64).to(dtype).to(device)
    grad = base[:, 1:4].transpose(2, 3)
    assert grad.numel() > 2 * BLOCK and not grad.is_contiguous()
    assert not flagged(grad)
    for value in (float("nan"), float("inf"), float("-inf")):
        for at in ((0, 0, 0, 0), (1, 2, 20, 17), (2, 2, 36, 40)):
            bad = grad.clone()
            bad[at] = value
            assert flagged(bad), (value, at)
    huge = torch.finfo(dtype).max
    assert not flagged(torch.full((1, 1, 3, 3), huge, dtype=dtype, device=device))  # finite, if near overflow

    ids = torch.randint(0, 6, (2, 33, 71), device=device)
    for id_dtype in (torch.int64, torch.int32):
        assert not flagged(ids.to(id_dtype), within=(0, 6))
        for value, at in ((-1, (0, 0, 0)), (6, (1, 32, 70)), (2**31 - 1, (1, 5, 9))):
            bad = ids.to(id_dtype).clone()
            bad[at] = value
            assert flagged(bad, within=(0, 6)) and flagged(bad[:, ::2], within=(0, 6)) == (at[1] % 2 == 0)
    counts = torch.tensor([1, 6, 3], device=device)  # lime_fit's counts, in 1..M: [1, M + 1)
    assert not flagged(counts, within=(1, 7))
    assert flagged(counts - 1, within=(1, 7)) and flagged(counts + 1, within=(1, 7))
    targets = torch.rand(2, 9, 5, dtype=torch.float64).to(dtype).to(device)  # (B, N, L)
    assert not flagged(targets)
    targets[1, 8, 4] = float("nan")
    assert flagged(targets)


def _refuse(*args, **kwargs):
    raise AssertionError("went through the registered op")


@pytest.mark.parametrize("device", DEVICES)
def test_eager_calls_skip_the_dispatcher_and_bump_versions(device, monkeypatch):
    # Plain tensors, nothing traced, no grad: the TritonOp checks and launches itself, and tells
    # autograd about what it wrote, as the registered op's in-place machinery does.
    from attrefine_fast import kernels

    gen = torch.Generator().manual_seed(0)
    images, segments, masks, fudge = perturb_inputs(2, 3, 5, 7, 4, [3, 1], torch.float32, device, gen)
    into, pgd = kernels.get("perturb_into"), kernels.get("masked_pgd_step")
    monkeypatch.setattr(into, "op", _refuse)
    monkeypatch.setattr(pgd, "op", _refuse)
    out = torch.zeros(2 * 3, 3, 5, 7, device=device)
    version = out._version
    into(images, segments, masks, fudge, 1, None, None, out)
    assert out._version > version
    torch.testing.assert_close(out, ops.perturb_ref(images, segments, masks, fudge, 1, 3), atol=0, rtol=0)
    x = images.clone()
    x_adv = x + 0.01
    version = x_adv._version
    pgd(x_adv, x, fudge - 0.5, None, 0.1, 0.03, 0.0, 1.0, "linf")
    assert x_adv._version > version
    with pytest.raises(ValueError, match="segment ids"):  # the checks run on this route too
        into(images, segments + 5, masks, fudge, 0, None, None, out)


def test_scalar_arguments_are_cached_for_direct_calls_only(monkeypatch):
    # A direct call reuses the tensor that carries its float arguments (no host-to-device copy,
    # which waits for the stream, per launch); a traced call must make its own.
    from attrefine_fast.kernels import op_registration as reg

    fresh = reg.scalars((0.5, 1.0), torch.float64, torch.device("cpu"))
    assert fresh is not reg.scalars((0.5, 1.0), torch.float64, torch.device("cpu"))
    monkeypatch.setattr(reg._launching, "direct", True, raising=False)
    cached = reg.scalars((0.5, 1.0), torch.float64, torch.device("cpu"))
    assert cached is reg.scalars((0.5, 1.0), torch.float64, torch.device("cpu"))
    assert torch.equal(cached, fresh) and cached.dtype == torch.float64
    assert reg.scalars((0.5, 1.0), torch.float32, torch.device("cpu")).dtype == torch.float32
    negative_zero = reg.scalars((-0.0, 1.0), torch.float64, torch.device("cpu"))
    assert torch.signbit(negative_zero[0]) and not torch.signbit(reg.scalars((0.0, 1.0), torch.float64, "cpu")[0])


@pytest.mark.parametrize("device", DEVICES)
def test_calls_that_need_the_dispatcher_go_through_the_op(device, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attrefine_fast import kernels

    gen = torch.Generator().manual_seed(0)
    images, segments, masks, fudge = perturb_inputs(1, 3, 4, 4, 3, [2], torch.float32, device, gen)
    impl = kernels.get("perturb")
    args = (images.requires_grad_(), segments, masks, fudge, 0, 2, None, None, None, False)
    # autograd: the op's "not differentiable" error, not a silently detached result
    out = impl(*args)
    assert out.grad_fn is not None
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()
    with torch.no_grad():  # nothing for autograd to record: the direct route again
        monkeypatch.setattr(impl, "op", _refuse)
        assert impl(*args).grad_fn is None
    routed = []
    monkeypatch.setattr(impl, "op", lambda *a, **k: routed.append(k) or "op")
    with FakeTensorMode():  # tracing modes, like fake tensors, see the registered op
        assert impl(*args) == "op"
    assert impl(*args[:-1], channels_last=False) == "op"  # keyword arguments: the op binds them
    assert routed == [{}, {"channels_last": False}]
    vmapped = []  # functorch's wrapped tensors look like plain ones to a type check
    monkeypatch.setattr(impl, "op", lambda *a, **k: vmapped.append(1) or a[0].sum())
    with torch.no_grad():
        torch.vmap(lambda image: impl(image, *args[1:]))(images.detach()[None])
    assert vmapped == [1]


def test_kernels_compile_for_a_gpu_target():
    # The interpreter does not apply the compiler's rules (constexpr globals, tl.dot shapes,
    # dtypes of the math functions...): compile each kernel branch to an sm_90 cubin instead.
    pytest.importorskip("triton.backends.nvidia")
    from attrefine_fast.kernels.compile_check import triton_compiles_offline

    if not triton_compiles_offline():
        pytest.skip("compiling without a GPU needs Triton >= 3.3")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-m", "attrefine_fast.kernels.compile_check", "--quick", "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "14 kernel variants compile for sm_90" in run.stdout


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
    pytest.param(2, 1, 5, 9, 4, [3, 4], 0, 4, id="one-channel"),  # NCHW and NHWC are one order
]
PERTURB_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"normalize": True}, id="normalized"),
    pytest.param({"out_dtype": torch.bfloat16, "channels_last": True}, id="bf16-channels-last"),
    pytest.param({"normalize": True, "out_dtype": torch.float16, "channels_last": True}, id="normalized-fp16"),
]


def check_perturb(images, segments, masks, fudge, offset, count, options, atol, rtol, into=False, spare=0):
    """The Triton perturb against perturb_ref. With ``into``, perturb_into: ops.perturb(out=...)
    with an ``out`` of the reference's dtype and layout, the leading rows of a buffer with
    ``spare`` rows more, which must stay untouched."""
    kwargs = {k: v for k, v in options.items() if k != "normalize"}
    if options.get("normalize"):
        c = images.shape[1]
        kwargs["mean"] = torch.linspace(0.2, 0.6, c, dtype=torch.float64, device=images.device)
        kwargs["std"] = torch.linspace(0.5, 1.5, c, dtype=torch.float64, device=images.device)
    if options.get("normalize") == "strided":  # views in the compute dtype: the kernel gets them as they are
        compute = torch.float64 if images.dtype == torch.float64 else torch.float32
        kwargs["mean"] = torch.linspace(0.2, 0.6, 2 * c, dtype=compute, device=images.device)[::2]
        kwargs["std"] = torch.tensor([0.7], dtype=compute, device=images.device).expand(c)
        assert not kwargs["mean"].is_contiguous() and not kwargs["std"].is_contiguous()
    before = [t.clone() for t in (images, segments, masks, fudge)]
    want = ops.perturb_ref(images, segments, masks, fudge, offset, count, kwargs.get("mean"), kwargs.get("std"),
                           kwargs.get("out_dtype"), kwargs.get("channels_last", False))
    layout = torch.channels_last if kwargs.get("channels_last") else torch.contiguous_format
    if into:
        rows = want.shape[0]
        buffer = torch.empty(rows + spare, *want.shape[1:], dtype=want.dtype, device=want.device, memory_format=layout)
        buffer.fill_(float("nan") if want.dtype.is_floating_point else 77)  # an unwritten element shows
        spare_before = buffer[rows:].clone()
        out = buffer[:rows]
        got = ops.perturb(images, segments, masks, fudge, offset, count, mean=kwargs.get("mean"), std=kwargs.get("std"),
                          out=out, backend="triton")
        assert got is out
        torch.testing.assert_close(buffer[rows:], spare_before, atol=0, rtol=0, equal_nan=True)
    else:
        got = ops.perturb(images, segments, masks, fudge, offset, count, backend="triton", **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
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


# perturb_into shares perturb's kernel: a few cases check what differs (the caller's out, its
# dtype and layout, a leading slice of a larger buffer), not every dtype again.
PERTURB_INTO_CASES = [
    pytest.param(torch.float32, 1e-6, 1e-6, {}, 3, id="float32-slice"),
    pytest.param(torch.float64, 1e-12, 1e-12, {"normalize": True, "out_dtype": torch.float16, "channels_last": True}, 2,
                 id="float64-normalized-fp16-channels-last-slice"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,atol,rtol,options,spare", PERTURB_INTO_CASES)
@pytest.mark.parametrize("b,c,h,w,n,counts,offset,count", PERTURB_SHAPES)
def test_perturb_into_matches_reference(device, dtype, atol, rtol, options, spare,
                                        b, c, h, w, n, counts, offset, count):
    gen = torch.Generator().manual_seed(b * 100 + n)
    images, segments, masks, fudge = perturb_inputs(b, c, h, w, n, counts, dtype, device, gen)
    check_perturb(images, segments, masks, fudge, offset, count, options, atol, rtol, into=True, spare=spare)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", PERTURB_OPTIONS + [pytest.param({"normalize": "strided"}, id="strided-mean-std")])
@pytest.mark.parametrize("into", [False, True], ids=["perturb", "perturb_into"])
def test_perturb_non_contiguous_inputs(device, options, into):
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 7, 5, 3, generator=gen).permute(0, 3, 1, 2).to(device)  # (2, 3, 7, 5) NHWC
    fudge = torch.rand(2, 3, 5, 7, generator=gen).transpose(2, 3).to(device)
    segments = make_segments(2, 5, 7, [4, 3], gen, device).transpose(1, 2)  # (2, 7, 5)
    masks = (torch.rand(2, 9, 8, generator=gen) > 0.5).to(device)[:, ::2, ::2]  # (2, 5, 4) strided
    assert not any(t.is_contiguous() for t in (images, fudge, segments, masks))
    check_perturb(images, segments, masks, fudge, 1, 4, options, 1e-6, 1e-6, into=into)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize,into", [(False, False), (True, False), (False, True)],
                         ids=["perturb", "perturb-normalized", "perturb_into-uint8-out"])
def test_perturb_uint8_images(device, normalize, into):
    gen = torch.Generator().manual_seed(4)
    images, segments, masks, fudge = perturb_inputs(2, 3, 5, 11, 4, [3, 5], torch.float64, device, gen)
    images, fudge = (images * 255).to(torch.uint8), (fudge * 255).to(torch.uint8)
    check_perturb(images, segments, masks, fudge, 0, 4, {"normalize": normalize}, 1e-6, 1e-6, into=into, spare=1)


@pytest.mark.parametrize("config", range(6))
def test_perturb_every_autotune_config(monkeypatch, config):
    from attrefine_fast.kernels import perturb as module

    use_only_config(monkeypatch, "perturb", "_perturb_kernel", module._CONFIGS[config])
    gen = torch.Generator().manual_seed(11)
    # 3 x 17 x 31 = 1581 elements: several blocks for BLOCK <= 1024; 9 samples: a partial group
    images, segments, masks, fudge = perturb_inputs(2, 3, 17, 31, 11, [7, 3], torch.float32, "cpu", gen)
    options = {"normalize": True, "channels_last": config % 2 == 1}
    check_perturb(images, segments, masks, fudge, 2, 9, options, 1e-6, 1e-6)


# ---------------------------------------------------------------- GPU only


class _NoLaunch:
    """Stands in for wrap_triton(kernel): launching does nothing, as the traceable wrapper does
    on fake tensors on a GPU (the interpreter would read their data instead)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("index", range(len(sample_calls("cpu"))))
@pytest.mark.parametrize("tracing", ["fake", "symbolic"])
def test_launchers_trace_with_fake_tensors(monkeypatch, index, tracing):
    # torch.compile and opcheck run each op's launcher on fake tensors (its registered fake
    # implementation) and trace it with symbolic sizes: everything around the kernels must
    # allow that (no data-dependent shapes, no reads of tensor data). On torch < 2.6, where the
    # Triton ops are opaque custom ops, this checks the fake implementations registered for them.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from attrefine_fast import kernels

    modules = (kernels.perturb, kernels.lime_fit, kernels.masked_pgd_step, kernels.segment_mean, kernels.device_checks)
    for module in modules:
        monkeypatch.setattr(module, "wrap_triton", lambda kernel: _NoLaunch())
    op, args = sample_calls("cpu")[index]
    eager_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    eager = op(*eager_args)
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
    written = mutated_arg(op)
    if written is not None:  # in place: no result, and the argument keeps its shape, dtype and layout
        assert eager is None and out is None
        for t in (eager_args[written], fake_args[written]):
            assert t.shape == args[written].shape and t.dtype == args[written].dtype
            assert t.stride() == args[written].stride()
        return
    eager = eager if isinstance(eager, (tuple, list)) else (eager,)
    out = out if isinstance(out, (tuple, list)) else (out,)
    assert len(out) == len(eager)
    for e, f in zip(eager, out):
        assert f.shape == e.shape and f.dtype == e.dtype and f.stride() == e.stride()


@needs_cuda
@pytest.mark.parametrize("index", range(len(sample_calls("cpu"))))
def test_opcheck_cuda(index):
    op, args = sample_calls("cuda")[index]
    torch.library.opcheck(op, args)


@needs_cuda
def test_torch_compile_fullgraph_cuda():
    calls = sample_calls("cuda")
    written = [mutated_arg(op) for op, _ in calls]  # read outside the compiled function

    def run_all(calls):
        outs = []
        for (op, args), i in zip(calls, written):
            if i is None:
                outs.append(op(*args))
            else:  # in place: on a copy, so that the eager and compiled runs start alike
                args = list(args)
                args[i] = args[i].clone()
                op(*args)
                outs.append(args[i])
        return outs

    eager = run_all(calls)
    compiled = torch.compile(run_all, fullgraph=True)(calls)
    torch.testing.assert_close(compiled, eager)


@needs_cuda
def test_torch_compile_fullgraph_of_the_backend_callables_cuda():
    # What backends.resolve hands out (a TritonOp, whose eager calls skip the dispatcher) must
    # trace to the registered op under torch.compile.
    gen = torch.Generator().manual_seed(5)
    images, segments, masks, fudge = perturb_inputs(2, 3, 9, 7, 5, [4, 2], torch.float32, "cuda", gen)
    impl = backends.resolve("perturb", "triton", "cuda")

    def run(images, segments, masks, fudge):
        return impl(images, segments, masks, fudge, 1, 3, None, None, None, True) * 2

    eager = run(images, segments, masks, fudge)
    torch.testing.assert_close(torch.compile(run, fullgraph=True)(images, segments, masks, fudge), eager)
