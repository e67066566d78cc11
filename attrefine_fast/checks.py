"""Input validation shared by the public API: clear errors at the boundary, nothing modified.

Under torch.compile the checks of shapes, dtypes, devices and Python arguments run while the
function is traced, and the checks that read tensor values (finiteness, segment labels, ranges)
become assertions in the graph (``torch._assert_async``), so that the public functions trace
into one graph without a host round trip: a failing assertion raises a RuntimeError on the CPU
(with the eager message, or for segment labels a shorter one that names no label or size: a
formatted value would fix it in the graph), and is a device-side assertion on CUDA.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IMAGE_DTYPES = FLOAT_DTYPES + (torch.uint8,)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite. A sum is several times cheaper than isfinite().all() and
    is finite only if every element is (a NaN or an infinity makes it NaN or infinite); a
    non-finite sum, from such an element or from overflow, is settled exactly."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def require(condition: torch.Tensor, message: str) -> None:
    """ValueError(message) unless the one-element bool tensor ``condition`` holds; an assertion
    in the graph under torch.compile (see the module docstring)."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def check_finite(name: str, t: torch.Tensor) -> None:
    message = f"{name} contains NaN or infinite values"
    if torch.compiler.is_compiling():
        if t.is_floating_point() and t.numel() > 0:
            require(torch.isfinite(t).all(), message)
    elif t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values")
    elif not all_finite(t):
        raise ValueError(message)


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def check_written_in_place(name: str, t: torch.Tensor) -> None:
    """``t`` will be written in place: no two of its elements may share memory (a stride 0)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} has overlapping elements (strides {t.stride()}): the step writes it in place; pass {name}.clone()")


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some order of the dimensions is a contiguous layout."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_no_partial_overlap(name: str, written: torch.Tensor, **inputs) -> None:
    """``written`` is updated in place while ``inputs`` are read: none may share some of its
    elements but not all (a kernel would read elements another thread already wrote). The same
    tensor, element for element, is fine: each element is read before it is written. As torch's
    in-place ops, this judges dense tensors exactly and lets interleaved layouts pass."""
    if torch.compiler.is_compiling() or written.numel() == 0 or written.device.type == "meta":
        return  # a traced tensor has no address to compare
    storage = written.untyped_storage().data_ptr()
    for other, t in inputs.items():
        if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != storage:
            continue
        if (t.storage_offset(), t.stride(), t.shape, t.dtype) == (written.storage_offset(), written.stride(), written.shape, written.dtype):
            continue
        spans = []
        for u in (written, t):
            first = u.storage_offset() * u.element_size()
            last = first + sum((n - 1) * st for n, st in zip(u.shape, u.stride())) * u.element_size() + u.element_size()
            spans.append((first, last))
        (a0, a1), (b0, b1) = spans
        if a0 < b1 and b0 < a1 and _dense(written) and _dense(t):
            raise ValueError(f"{name} shares some of its memory with {other}: it is written in place while {other} is read; pass {other}.clone()")


def check_images(name: str, images: torch.Tensor, *, channels: int | None = None) -> None:
    """images: (B, C, H, W) with a float or uint8 dtype and finite values."""
    check_tensor(name, images, ndim=4, dtypes=IMAGE_DTYPES)
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (B, C, H, W), got shape {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)}")
    check_finite(name, images)


def check_segments(segments: torch.Tensor, images: torch.Tensor, max_segments: int | None = None) -> torch.Tensor:
    """segments: (B, H, W) integer labels 0..M_b-1 per image. Returns the per-image counts M_b.

    Every label in 0..M_b-1 must be present: LIME's feature j is segment j, so a gap (for
    example scikit-image's slic numbering from 1) would silently describe a missing segment.
    Under torch.compile the caller gives ``max_segments``, the M its outputs are sized by (the
    graph cannot size a table by a label's value), and labels >= M fail an assertion; eager
    callers check the counts against their M themselves, with their own message.
    """
    check_tensor("segments", segments, ndim=3)
    if segments.dtype.is_floating_point or segments.dtype == torch.bool or segments.is_complex():
        raise TypeError(f"segments must have an integer dtype, got {segments.dtype}")
    b, _, h, w = images.shape
    if tuple(segments.shape) != (b, h, w):
        raise ValueError(f"segments must have shape (B, H, W) = {(b, h, w)} to match images, got {tuple(segments.shape)}")
    check_same_device(images=images, segments=segments)
    flat = segments.reshape(b, -1).long()
    if torch.compiler.is_compiling():
        return _traced_segment_counts(flat, max_segments)
    lo = flat.min(dim=1).values
    if bool((lo < 0).any()):
        raise ValueError("segments contains negative labels; labels must be 0..M-1 per image")
    num = flat.max(dim=1).values + 1
    m = int(num.max())
    if m > h * w:  # more labels than pixels: gaps for sure (and no table of m flags to allocate)
        raise ValueError(
            f"segments contains label {m - 1} but an image has only {h * w} pixels: labels must be 0..M-1 with every "
            "label present; relabel them, e.g. with attrefine_fast.segment(...) or skimage's start_label=0"
        )
    present = torch.zeros(b, m, dtype=torch.bool, device=segments.device)
    present.scatter_(1, flat, True)
    full = present.sum(dim=1) == num
    if not bool(full.all()):
        i = int((~full).nonzero()[0])
        missing = (~present[i, : int(num[i])]).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"segments of image {i} are not numbered 0..M-1 (labels {missing} are missing); "
            "relabel them, e.g. with attrefine_fast.segment(...) or skimage's start_label=0"
        )
    return num


def check_segment_counts(segments: torch.Tensor, counts: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`check_segments` (against ``images``' shape, or segments' own without images), and
    ``counts`` (B,) holding each image's number of segments; returns the counts found."""
    if images is None:  # a shape to check against, without memory behind it
        b, h, w = segments.shape if segments.dim() == 3 else (0, 0, 0)
        images = torch.empty((), device=segments.device).expand(b, 1, h, w)
    found = check_segments(segments, images)
    if not torch.equal(found.cpu(), counts.long().cpu()):
        raise ValueError(f"counts must hold each image's number of segments, {found.tolist()}, got {counts.tolist()}")
    return found


def _traced_segment_counts(flat: torch.Tensor, max_segments: int | None) -> torch.Tensor:
    """check_segments' value checks as graph assertions, with a table of max_segments flags."""
    if max_segments is None:
        raise ValueError("under torch.compile give num_segments: the output's size cannot depend on the labels' values")
    if max_segments < 1:
        raise ValueError("need at least one segment (M >= 1)")
    num = flat.amax(dim=1) + 1
    require((flat.amin(dim=1) >= 0).all(), "segments contains negative labels; labels must be 0..M-1 per image")
    # (no sizes in the messages: formatting one would fix it in the graph, a recompile per size)
    require((num <= max_segments).all(), "segments contains a label >= M, the number of segments given")
    present = torch.zeros(flat.shape[0], max_segments, dtype=torch.bool, device=flat.device)
    present.scatter_(1, flat.clamp(0, max_segments - 1), True)
    require((present.sum(dim=1) == num).all(), "segments are not numbered 0..M-1 (a label is missing in some image)")
    return num


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An integer (a Python or NumPy one; not a bool, not a float that happens to be whole) >=
    ``minimum``, returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_seed(name: str, value) -> int:
    """An integer seed in torch's range for seeds (torch.manual_seed, Generator.manual_seed),
    [-2**63, 2**64); a float would be truncated, a string parsed (numpy and lime refuse both)."""
    value = check_int(name, value)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"{name} must be in [-2**63, 2**64), got {value}")
    return value


def check_real(name: str, value, *, minimum: float | None = None, positive: bool = False, finite: bool = True) -> float:
    """A real number (not a bool), finite unless ``finite=False`` (NaN is always refused), >=
    ``minimum`` or > 0 with ``positive``; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if value != value or (finite and abs(value) == math.inf):  # (not math.isnan: traceable with symbolic floats)
        raise ValueError(f"{name} must be {'finite' if finite else 'a number'}, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value}")
    return value


def check_device(name: str, device) -> torch.device:
    """A device this machine has, as a torch.device; ValueError saying what is missing otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r} but no CUDA device is available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    return dev


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
