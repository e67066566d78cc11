"""The refinement run's settings: one dataclass, read from JSON or YAML and overridden by flags.

Every default of the method is one of our documented choices (docs/refinement.md): the paper's
body is not available, so none of these numbers come from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..checks import check_int, check_real, check_seed

MODES = ("erm", "pgd_at", "refine")
FILLS = ("mean", "zero", "blur", "noise")
ADV_REGIONS = ("full", "flagged")
INSTABILITIES = ("adversarial", "runs", "none")
EXPLAIN_LABELS = ("true", "predicted")


@dataclass
class RefineConfig:
    """Settings of one training run (``mode`` picks ERM, PGD-AT or attribution-aware refinement).

    Data: ``dataset`` ("digits" embedded, "cifar10"/"cifar100" from ``data_dir``; ``cifar_md5``: a
    JSON file of {file name: md5} for a copy other than the standard release), optionally
    with a spurious feature (``spurious_patch``: the correlation of
    :func:`~attrefine_fast.data.add_spurious_patch`'s class-coloured corner square with the label).
    Training: ``cycles`` x ``epochs_per_cycle`` epochs of SGD (momentum, weight decay) with a
    cosine schedule over all steps, gradients clipped to norm ``grad_clip`` (every mode alike). Attack budget (PGD-AT and refine alike): ``eps``,
    ``attack_steps``, ``attack_step_size`` (default 2.5 * eps / steps), L-inf or L2 ``norm``.
    Detection: LIME with ``lime_samples`` samples on ``segmentation`` superpixels of a
    ``refresh_fraction`` of the training set, at the start of every cycle from
    ``explain_from_cycle`` on (cycle 0 of a fresh model has nothing meaningful to explain); thresholds ``tau`` (relevance),
    ``eps_s`` (sensitivity) and ``delta`` (instability) on normalized scores.
    Loss: CE(f(mask(x, S)), y) + ``alpha`` * CE(f(x_adv), y) + ``lam`` * ||grad_x l * 1_S||^2,
    the last term estimated on at most ``penalty_samples`` flagged images per batch.
    """

    mode: str = "refine"
    # data and model
    dataset: str = "digits"
    data_dir: str | None = None
    cifar_md5: str | None = None
    image_size: int = 32
    train_subset: int | None = None
    spurious_patch: float | None = None
    arch: str = "small_cnn"
    width: int = 16
    normalization: str | None = None
    # optimization
    cycles: int = 2
    epochs_per_cycle: int = 2
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float | None = 5.0
    seed: int = 0
    amp: bool = False
    device: str = "auto"
    # attack budget, shared by pgd_at and refine
    eps: float = 0.1
    attack_steps: int = 3
    attack_step_size: float | None = None
    norm: str = "linf"
    # detection
    segmentation: str = "slic"
    segmentation_params: dict = field(default_factory=lambda: {"n_segments": 25, "compactness": 10.0})
    lime_samples: int = 64
    explain_label: str = "true"
    refresh_fraction: float = 0.1
    explain_from_cycle: int = 1
    detect_batch_size: int = 64
    tau: float = 0.02
    eps_s: float = 0.08
    delta: float = 0.15
    instability: str = "adversarial"
    instability_runs: int = 3
    max_flagged_fraction: float = 0.5
    # refinement loss
    fill: str = "mean"
    alpha: float = 1.0
    lam: float = 10.0
    adv_region: str = "full"
    penalty_samples: int = 16
    # outputs
    out: str = "outputs/refine"
    progress: bool = True

    @property
    def epochs(self) -> int:
        return self.cycles * self.epochs_per_cycle

    def step_size(self) -> float:
        return self.attack_step_size if self.attack_step_size is not None else 2.5 * self.eps / max(1, self.attack_steps)

    def validate(self) -> "RefineConfig":
        """Raise ValueError on any inconsistent setting (TypeError on a value of the wrong type,
        such as YAML's string for ``1e-1``); returns self, its numbers made plain Python ints and
        floats (a NumPy number would make the checkpoint unreadable to ``torch.load``'s safe mode)."""
        for name, value, choices in (
            ("mode", self.mode, MODES), ("fill", self.fill, FILLS), ("adv_region", self.adv_region, ADV_REGIONS),
            ("instability", self.instability, INSTABILITIES), ("explain_label", self.explain_label, EXPLAIN_LABELS),
            ("norm", self.norm, ("linf", "l2")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        minimums = {"cycles": 1, "epochs_per_cycle": 1, "batch_size": 1, "detect_batch_size": 1, "instability_runs": 1,
                    "width": 1, "penalty_samples": 1, "image_size": 1, "lime_samples": 2, "attack_steps": 0,
                    "explain_from_cycle": 0}
        for name, minimum in minimums.items():
            setattr(self, name, check_int(name, getattr(self, name), minimum))
        for name in ("lr", "eps", "alpha", "lam", "weight_decay", "momentum", "tau", "eps_s", "delta"):
            setattr(self, name, check_real(name, getattr(self, name), minimum=0.0))
        if not self.momentum < 1.0:  # SGD's velocity would never decay
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        self.seed = check_seed("seed", self.seed)
        for name in ("amp", "progress"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        if self.train_subset is not None:
            self.train_subset = check_int("train_subset", self.train_subset, 1)
        if self.spurious_patch is not None:
            self.spurious_patch = check_real("spurious_patch", self.spurious_patch)
            if not 0.0 <= self.spurious_patch <= 1.0:
                raise ValueError(f"spurious_patch must be a correlation in [0, 1], got {self.spurious_patch}")
        self.refresh_fraction = check_real("refresh_fraction", self.refresh_fraction)
        if not 0.0 < self.refresh_fraction <= 1.0:
            raise ValueError(f"refresh_fraction must be in (0, 1], got {self.refresh_fraction}")
        self.max_flagged_fraction = check_real("max_flagged_fraction", self.max_flagged_fraction)
        if not 0.0 <= self.max_flagged_fraction <= 1.0:
            raise ValueError(f"max_flagged_fraction must be in [0, 1], got {self.max_flagged_fraction}")
        if self.grad_clip is not None:
            self.grad_clip = check_real("grad_clip", self.grad_clip, positive=True)
        if self.attack_step_size is not None:
            self.attack_step_size = check_real("attack_step_size", self.attack_step_size, minimum=0.0)
        if self.instability == "runs" and self.instability_runs < 2:
            raise ValueError(f"instability='runs' measures the spread over instability_runs >= 2 explanations, got {self.instability_runs}")
        if self.dataset in ("cifar10", "cifar100") and self.image_size != 32:
            raise ValueError(f"{self.dataset} images are 32x32: image_size must be 32, got {self.image_size}")
        if self.cifar_md5 is not None:
            if not isinstance(self.cifar_md5, (str, os.PathLike)):
                raise TypeError(f"cifar_md5 must be a path to a JSON file of {{file name: md5}}, got {self.cifar_md5!r}")
            if self.dataset not in ("cifar10", "cifar100"):
                raise ValueError(f"cifar_md5 checks a CIFAR copy; the dataset is {self.dataset!r}")
            self.cifar_md5 = os.fspath(self.cifar_md5)
        if not isinstance(self.segmentation_params, dict):
            raise TypeError(f"segmentation_params must be a mapping, e.g. {{\"n_segments\": 25}}, got {self.segmentation_params!r}")
        return self

    # ------------------------------------------------------------------ (de)serialization

    def detect_kwargs(self) -> dict:
        """The keyword arguments of :func:`~attrefine_fast.refine.detect_spurious` this config sets."""
        return dict(
            num_samples=self.lime_samples, explain_label=self.explain_label, tau=self.tau, eps_s=self.eps_s, delta=self.delta,
            instability=self.instability, instability_runs=self.instability_runs, eps=self.eps, norm=self.norm,
            max_flagged_fraction=self.max_flagged_fraction,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RefineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values).validate()

    @classmethod
    def from_file(cls, path) -> "RefineConfig":
        """Read a JSON (.json) or YAML (.yaml/.yml) file holding a mapping of config keys."""
        return cls.from_dict(read_config_file(path))


def read_config_file(path) -> dict:
    """The mapping of config keys in a JSON (.json) or YAML (.yaml/.yml) file, not yet validated
    (command-line flags may still override its values)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    if path.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); a .yaml or .yml name reads YAML") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    return values


CHOICES = {"mode": MODES, "fill": FILLS, "adv_region": ADV_REGIONS, "instability": INSTABILITIES,
           "explain_label": EXPLAIN_LABELS, "norm": ("linf", "l2")}


def _json_mapping(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({e.msg}); write e.g. '{{\"n_segments\": 25}}'") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field (default None: the config file or the dataclass decides);
    the help of each shows the dataclass default (RefineConfig's docstring says what they do)."""
    parser.add_argument("--config", help="JSON or YAML file of config keys; flags override it")
    defaults = RefineConfig()
    for f in dataclasses.fields(RefineConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f"default: {getattr(defaults, f.name)!r}"
        if f.type in ("bool",):
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=default)
        elif f.name == "segmentation_params":
            parser.add_argument(flag, dest=f.name, default=None, type=_json_mapping,
                                help=f"JSON mapping, e.g. '{{\"n_segments\": 25}}' ({default})")
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, dest=f.name, default=None, type=kind, choices=CHOICES.get(f.name), help=default)


def config_from_args(args: argparse.Namespace) -> RefineConfig:
    """The config file (if any) with every flag given on the command line applied on top."""
    base = read_config_file(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(RefineConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = value
    return RefineConfig.from_dict(base)  # validated once, the flags applied (a flag mends a bad file value)
