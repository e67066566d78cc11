"""Benchmark inputs: photos, segmentations, models, and the wrappers that time a model inside
an explanation; plus which of our backends can be timed here."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import backends
from ..segmentation import grid_segments
from .core import Stopwatch

# scikit-image's bundled RGB photos (no download needed).
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
NUM_CLASSES = 10
# lime_fit cases fit as many labels as lime explains by default (top_labels=5).
TOP_LABELS = 5


def photo(size: int, name: str = "chelsea") -> np.ndarray:
    """One bundled photo resized to size x size: (H, W, 3) float32 in [0, 1]."""
    import skimage.data
    from skimage.transform import resize

    return resize(getattr(skimage.data, name)(), (size, size), anti_aliasing=True).astype(np.float32)


def photo_batch(size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, size, size) float32 in [0, 1]: image 0 is the whole chelsea photo (so every B=1
    case uses the same image), the others random crops of the bundled photos, resized."""
    import skimage.data
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    sources = [getattr(skimage.data, n)() for n in PHOTOS]
    out = [photo(size)]
    for i in range(1, batch):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = src[top : top + side, left : left + side]
        out.append(resize(crop, (size, size), anti_aliasing=True).astype(np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def grid_batch(batch: int, size: int, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A square grid of exactly num_segments cells (a perfect square) for every image:
    segments (B, H, W) int64 and counts (B,)."""
    side = int(round(num_segments**0.5))
    if side * side != num_segments or side > size:
        raise ValueError(f"grid segmentations need a square segment count <= size^2, got {num_segments}")
    seg = torch.from_numpy(grid_segments(size, size, grid=(side, side)))
    return seg.expand(batch, size, size).contiguous(), torch.full((batch,), num_segments, dtype=torch.long)


def explanation_segments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The segmentation the explanation cases use: lime's default quickshift at 224x224 (34
    segments on the chelsea photo); an 8x8 grid at small sizes, where lime's default gives only
    about 2 segments."""
    from ..segmentation import segment

    size = images.shape[-1]
    if size >= 128:
        seg, counts = segment(images.cpu(), "quickshift")
        return seg, counts, "quickshift (lime's defaults)"
    seg, counts = grid_batch(images.shape[0], size, 64)
    return seg, counts, "8x8 grid"


# ---------------------------------------------------------------------------------------------
# Models

class TinyCNN(torch.nn.Module):
    """A tiny CNN (two strided convolutions, pooling, a linear head: about 13 MFLOP per 224x224
    image), the kind of model for which explanation overhead shows most: the explainer's own
    time is measured beside a model that costs little."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.head = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


# name -> (title, architecture name in attrefine_fast.models or None for TinyCNN)
MODELS = {
    "tiny_cnn": ("tiny CNN", None),
    "small_cnn": ("SmallCNN", "small_cnn"),
    "resnet18": ("PreActResNet18", "preact_resnet18"),
}


def build_model(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The model in eval mode on ``device``. Weights are random and seeded: timings do not
    depend on them."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; models are {tuple(MODELS)}")
    torch.manual_seed(seed)
    arch = MODELS[name][1]
    if arch is None:
        model = TinyCNN()
    else:
        from ..models import build_model as build_architecture

        model = build_architecture(arch, NUM_CLASSES)
    return model.to(device).eval()


def model_forwards(model: torch.nn.Module, chunk: torch.Tensor, rows: int):
    """A call running ``model`` over ``rows`` inputs in batches of len(chunk), as an explainer
    feeds it: the denominator of the explanation overhead. One chunk of real perturbed inputs
    is reused (a dense network's cost does not depend on the pixel values), so memory stays at
    one chunk."""
    batch = chunk.shape[0]

    def run():
        with torch.no_grad():
            for offset in range(0, rows, batch):
                model(chunk[: min(batch, rows - offset)])

    return run


class TimedModel(torch.nn.Module):
    """Wraps a model so that every forward pass is timed into a stopwatch (the model's share
    of an explanation, measured inside it)."""

    def __init__(self, model: torch.nn.Module, stopwatch: Stopwatch):
        super().__init__()
        self.model = model
        self.stopwatch = stopwatch

    def forward(self, x):
        return self.stopwatch.time(self.model, x)


def numpy_classifier(model: torch.nn.Module, device: torch.device, stopwatch: Stopwatch):
    """lime's classifier_fn for ``model``: (n, H, W, 3) numpy -> (n, classes) probabilities.

    The whole function is timed as model time, conversions included: lime's non-model time is
    its total minus the time inside classifier_fn, which can only favour lime."""

    def predict(x):
        with torch.no_grad():
            inputs = torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float()
            return model(inputs).softmax(dim=1).cpu().numpy()

    return lambda x: stopwatch.time(predict, x)


# ---------------------------------------------------------------------------------------------
# Our backends

OUR_BACKENDS = backends.BACKENDS


def backend_status(ops: tuple[str, ...], backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can be timed for all of ``ops`` on ``device``: (True, "") or
    (False, the reason)."""
    if backend == "triton" and device.type == "cpu":
        return False, "Triton runs on CPU only under its interpreter (a correctness tool): not timed"
    for op in ops:
        ok, why = backends.status(op, backend, device.type)
        if not ok:
            return False, why if len(ops) == 1 else f"{op}: {why}"
    return True, ""


def auto_choice(ops: tuple[str, ...], device: torch.device) -> dict[str, str]:
    """The backend ``backend="auto"`` picks for each op."""
    return {op: backends.selected(op, "auto", device) for op in ops}


def lime_missing() -> str:
    """Why the providers that call the lime package cannot run here, or "" when it imports.
    lime is an optional peer like captum and torchattacks: without it those providers are
    listed as skipped and everything else is timed."""
    try:
        import lime.lime_image  # noqa: F401
        import lime.wrappers.scikit_image  # noqa: F401
    except ImportError as e:
        return f"lime is not importable ({e}); install it with `pip install lime==0.2.0.1`"
    return ""


@contextlib.contextmanager
def quiet_lime():
    """lime 0.2.0.1 draws a tqdm progress bar over its samples and has no switch for it; replace
    its tqdm by a plain pass-through while lime runs (results are unchanged; lime is spared the
    bar's cost)."""
    import lime.lime_image as lime_image

    saved = lime_image.tqdm
    lime_image.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        lime_image.tqdm = saved


def peer_version(module: str) -> str | None:
    """The installed version of a peer package, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None
