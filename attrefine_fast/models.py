"""Classifiers defined in the package (torchvision is optional and absent on CPU-only torch),
the input normalization wrapper, and the checkpoint format.

Every model here takes images in [0, 1] pixel space when built with ``build_model(...,
normalization=...)`` or loaded with :func:`load_checkpoint`: normalization belongs to the model, so
attacks and ε-balls live in pixel space.

Checkpoint format (a ``torch.save``'d dict, loaded with ``weights_only=True``)::

    {
        "model": state_dict of the bare network (without the Normalize wrapper),
        "arch": "small_cnn" | "preact_resnet18" | "wrn_34_10", or None for a custom model
        "num_classes": int,
        "normalization": {"mean": [..C floats], "std": [..C floats]} or None,   # optional
        "model_kwargs": {...},   # optional extra arguments of the architecture, e.g. {"in_channels": 1}
    }
"""
from __future__ import annotations

import os
import pickle
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .atomic_files import write_atomically
from .checks import check_device, check_int


class SmallCNN(nn.Module):
    """A small CNN for any input size: three conv blocks, global average pooling, a linear head.

    Args:
        num_classes: outputs (logits).
        in_channels: input channels.
        width: channels of the first block (doubled in each later block).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        layers, c = [], in_channels
        for i in range(3):
            out = width * 2**i
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the first layer of a model that takes [0, 1] images.

    Args:
        mean, std: C floats each (std > 0).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise ValueError(f"mean and std must have one value per channel, got {mean_t.numel()} and {std_t.numel()}")
        if not bool(((std_t > 0) & torch.isfinite(std_t)).all()) or not bool(torch.isfinite(mean_t).all()):
            raise ValueError("std must be positive and finite, and mean finite")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"Normalize expects {self.mean.shape[1]} channels, got input of shape {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Sequential):
    """``model(normalize(x))``; ``.net`` is the bare network, ``.normalize`` the wrapper."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., "Identity Mappings in Deep Residual Networks"), with
    the optional dropout between its convolutions of Wide-ResNet's block (Zagoruyko & Komodakis)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + skip


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 inputs (the CIFAR variant: 3x3 stem, no stem pooling)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class WideResNet(nn.Module):
    """WideResNet-depth-widen for 32x32 inputs; WRN-34-10 is the usual adversarial-training model.

    Args:
        depth: 6n + 4 (34 gives 5 blocks per stage).
        widen: width multiplier of the stages (16, 32, 64 channels times widen).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 34, widen: int = 10, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, drop_rate) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        # The reference initialization (Zagoruyko & Komodakis' code, kept by Madry et al., TRADES and
        # RobustBench): convolutions N(0, 2 / (k² C_out)), the classifier's bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _wrn_34_10(num_classes: int, in_channels: int = 3, **kwargs) -> WideResNet:
    return WideResNet(num_classes, in_channels, depth=34, widen=10, **kwargs)


# name -> constructor(num_classes, in_channels=3, **kwargs)
MODELS = {
    "small_cnn": SmallCNN,
    "preact_resnet18": PreActResNet18,
    "wrn_34_10": _wrn_34_10,
}
# Other spellings accepted by build_model (and the command line); checkpoints store the canonical name.
ALIASES = {
    "smallcnn": "small_cnn", "small-cnn": "small_cnn",
    "preactresnet18": "preact_resnet18", "preact-resnet18": "preact_resnet18", "resnet18": "preact_resnet18",
    "wrn-34-10": "wrn_34_10", "wrn34-10": "wrn_34_10", "wideresnet34-10": "wrn_34_10",
}
# Channel statistics of the CIFAR training sets, for build_model(..., normalization="cifar10").
NORMALIZATIONS = {
    "cifar10": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]},
    "cifar100": {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]},
}


def _resolve_normalization(normalization) -> dict | None:
    if normalization is None:
        return None
    if isinstance(normalization, str):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; known: {tuple(NORMALIZATIONS)} or a dict with mean and std")
        return NORMALIZATIONS[normalization]
    if not isinstance(normalization, dict) or not {"mean", "std"} <= set(normalization):
        raise ValueError("normalization must be None, a name, or a dict with 'mean' and 'std'")
    return {"mean": [float(v) for v in normalization["mean"]], "std": [float(v) for v in normalization["std"]]}


def canonical_arch(name: str) -> str:
    """The :data:`MODELS` key of an architecture name or alias (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"the architecture name must be a string, got {type(name).__name__}")
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {tuple(MODELS)} (aliases: {tuple(ALIASES)})")
    return key


def build_model(name: str, num_classes: int, *, in_channels: int = 3, normalization=None, **kwargs) -> nn.Module:
    """Build an architecture from :data:`MODELS` by name, randomly initialized.

    Args:
        name: "small_cnn", "preact_resnet18" or "wrn_34_10" (or an alias in :data:`ALIASES`).
        num_classes: number of outputs.
        in_channels: input channels.
        normalization: None (the model sees its input as is), a name in :data:`NORMALIZATIONS`, or
            ``{"mean": [...], "std": [...]}``: the model is then wrapped in :class:`NormalizedModel`
            and takes [0, 1] images.
        kwargs: extra architecture arguments (e.g. ``width`` for small_cnn).
    """
    name = canonical_arch(name)
    check_int("num_classes", num_classes, 2)
    check_int("in_channels", in_channels, 1)
    norm = _resolve_normalization(normalization)
    if norm is not None and len(norm["mean"]) != in_channels:
        raise ValueError(f"the normalization has {len(norm['mean'])} channels but in_channels={in_channels}")
    net = MODELS[name](num_classes, in_channels=in_channels, **kwargs)
    return net if norm is None else NormalizedModel(net, norm["mean"], norm["std"])


# Architectures run with channels-last weights on the CPU, where every convolution's output is then
# channels-last. benchmarks/cpu_memory_format.py, one thread, 2026-12-05: SmallCNN (width 16, 32x32)
# trains 1.40x and evaluates 2.08x faster so, its penalty's double backward runs 0.80x, and
# `make demo` took 88 s instead of 116 s; PreAct ResNet-18 gains 4-9% on the plain passes and loses
# 37% on the double backward, so it stays NCHW (WRN-34-10 was not measured).
CPU_CHANNELS_LAST = ("small_cnn",)


def move_to_device(model: nn.Module, arch: str, device) -> nn.Module:
    """``model`` (built by :func:`build_model` as ``arch``) on ``device``, with channels-last
    weights where that was measured faster (:data:`CPU_CHANNELS_LAST` on the CPU)."""
    model = model.to(device)
    if torch.device(device).type == "cpu" and canonical_arch(arch) in CPU_CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    return model


def save_checkpoint(path, model: nn.Module, arch: str, num_classes: int, *, normalization=None, model_kwargs: dict | None = None, **extra) -> None:
    """Save ``model`` in the checkpoint format of this module (see the module docstring).

    A :class:`NormalizedModel` stores its bare network and its normalization; ``extra`` entries
    (epoch, metrics...) are saved beside them and must be plain data (tensors, numbers, strings).
    ``arch=None`` saves the weights of a model that is not one of :data:`MODELS`:
    :func:`load_checkpoint` cannot rebuild it, the caller loads ``checkpoint["model"]`` into their own.
    """
    arch = None if arch is None else canonical_arch(arch)
    net = model = _unwrapped(model)
    if isinstance(model, NormalizedModel):
        buffers = {"mean": model.normalize.mean.detach().flatten().cpu(), "std": model.normalize.std.detach().flatten().cpu()}
        if normalization is None:
            normalization = {k: v.tolist() for k, v in buffers.items()}
        else:  # the same values, as the model's buffers hold them (float32, or rounded with the model)
            given = _resolve_normalization(normalization)
            if not all(torch.equal(torch.tensor(given[k]).to(v.dtype), v) for k, v in buffers.items()):
                raise ValueError(f"normalization={normalization!r} differs from the model's own "
                                 f"({ {k: v.tolist() for k, v in buffers.items()} }): pass None to save the model's")
        net = model.net
    _check_plain_data(extra, "extra")
    if arch is not None:  # a file load_checkpoint can rebuild: the same names and shapes as build_model's
        _check_loadable(net, arch, int(num_classes), dict(model_kwargs or {}))
    ckpt = {
        "model": net.state_dict(),
        "arch": arch,
        "num_classes": int(num_classes),
        "normalization": _resolve_normalization(normalization),
        "model_kwargs": dict(model_kwargs or {}),
        **extra,
    }
    write_atomically(os.fspath(path), lambda tmp: torch.save(ckpt, tmp))


def read_torch_file(path: str, device):
    """``torch.load(path, weights_only=True)``, with a ValueError naming the file where it is not
    a readable torch.save file (torch raises RuntimeError, EOFError, UnpicklingError or OSError
    depending on where a file is cut short or what it holds)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as e:
        raise ValueError(f"{path} cannot be read as a checkpoint: not a torch.save file, cut short, or holding more "
                         f"than tensors and plain data ({type(e).__name__}: {e})") from e


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and (Distributed)DataParallel's wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _check_plain_data(value, where: str) -> None:
    """What torch.load(weights_only=True) reads back: tensors, numbers, strings, None, and lists,
    tuples and dicts of them."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain_data(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain_data(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float, str))):
        raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}: load_checkpoint reads tensors, numbers, "
                        "strings and lists or dicts of them only (e.g. save an optimizer's state_dict())")


def _check_loadable(net: nn.Module, arch: str, num_classes: int, model_kwargs: dict) -> None:
    expected = {k: tuple(v.shape) for k, v in MODELS[arch](num_classes, **model_kwargs).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ValueError(
            f"the model is not {arch}(num_classes={num_classes}, **{model_kwargs}) as build_model makes it (differs at "
            f"{wrong[:3]}): pass its arch, num_classes and model_kwargs, or arch=None for a model of your own"
        )


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint saved by :func:`save_checkpoint` (or written by hand in its format).

    Returns ``(model, checkpoint)``: the model in eval mode on ``device``, wrapped in
    :class:`NormalizedModel` when the checkpoint has a normalization, and the checkpoint dict.
    Loads with ``weights_only=True``: a checkpoint cannot run code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    device = check_device("device", device)
    ckpt = read_torch_file(path, device)
    if isinstance(ckpt, dict) and {"model", "optimizer", "scheduler", "epoch"} <= set(ckpt) and "arch" not in ckpt:
        raise ValueError(
            f"{path} is a training checkpoint of refine (for --resume), not a model: load the run's model.pt, "
            "written beside it when the run finishes"
        )
    if not isinstance(ckpt, dict) or not {"model", "arch", "num_classes"} <= set(ckpt):
        raise ValueError(
            f"{path} is not an attrefine_fast checkpoint: expected a dict with keys 'model' (state_dict), "
            "'arch', 'num_classes' and optionally 'normalization' and 'model_kwargs'"
        )
    if ckpt["arch"] is None:
        raise ValueError(
            f"{path} holds the weights of a custom model (arch None), which cannot be rebuilt by name: "
            "build that model and load checkpoint['model'] into it with load_state_dict"
        )
    model = build_model(
        ckpt["arch"], int(ckpt["num_classes"]), normalization=ckpt.get("normalization"), **(ckpt.get("model_kwargs") or {})
    )
    net = model.net if isinstance(model, NormalizedModel) else model
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit {ckpt['arch']}(num_classes={ckpt['num_classes']}, "
                         f"**{ckpt.get('model_kwargs') or {}}): {str(e).splitlines()[0]}") from e
    return move_to_device(model, ckpt["arch"], device).eval(), ckpt
