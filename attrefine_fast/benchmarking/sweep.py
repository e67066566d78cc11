"""Which cases each profile runs, and at which sizes.

Profiles:
    smoke  tiny sizes, one timed round: every setup function and provider runs once (the test
           suite's check that the benchmarks still work; its figures mean nothing).
    quick  a few representative sizes at reduced N and B, under a minute on a 2-core CPU (CI's
           smoke run: its figures are indicative only).
    full   the sweep: 32x32 and 224x224 images, N in {256, 1000}, M in {16, 64, 256}, B in
           {1, 128}. On a CUDA device, every combination. On the CPU, a subset chosen to finish
           in about ten minutes on 2 cores: the sizes that are left out, and why, are listed in
           ``CPU_FULL_OMITTED`` and written into every report.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

PROFILES = ("smoke", "quick", "full")

SIZES = (32, 224)
SAMPLES = (256, 1000)
SEGMENTS = (16, 64, 256)
BATCHES = (1, 128)


@dataclass(frozen=True)
class Spec:
    """One case to build: the setup function's name and its keyword arguments."""

    setup: str
    kwargs: tuple

    @staticmethod
    def of(setup: str, **kwargs) -> "Spec":
        return Spec(setup, tuple(sorted(kwargs.items())))

    def arguments(self) -> dict:
        return dict(self.kwargs)

    @property
    def label(self) -> str:
        """e.g. ``explain/batch=1/model=small_cnn/samples=256/size=32``, the keys sorted (what --only matches)."""
        return "/".join([self.setup] + [f"{k}={v}" for k, v in self.kwargs])


@dataclass(frozen=True)
class Rounds:
    """How long to time each case: timed rounds within [min_repeats, max_repeats] fitting
    budget_s, after ``warmup`` untimed rounds."""

    min_repeats: int
    max_repeats: int
    budget_s: float
    warmup: int = 1
    min_sample_s: float = 0.05


ROUNDS = {
    "smoke": Rounds(min_repeats=1, max_repeats=1, budget_s=0.0, warmup=0, min_sample_s=0.0),
    "quick": Rounds(min_repeats=2, max_repeats=7, budget_s=1.0, min_sample_s=0.02),
    "full": Rounds(min_repeats=3, max_repeats=15, budget_s=4.0),
}

CPU_FULL_OMITTED = [
    "ops: B=128 at 224x224 (the lime side alone takes minutes per call): B=128 runs at 32x32 "
    "only, and for perturb and lime_fit only with N=256 (and M=64 for perturb, M<=64 for "
    "lime_fit); at 224x224 perturb's M sweep runs at N=256, N=1000 at M=64 only",
    "explanations: B=1 only (B=128 is 128x the model time: minutes per call); PreActResNet18 at "
    "224x224 left out (this CIFAR-style network has no stem downsampling: about 0.35 s per image "
    "on 2 cores); SmallCNN at 224x224 with N=64 and PreActResNet18 at 32x32 with N=128 (the "
    "overhead is a ratio to the model's time, which is linear in N; N=1000 takes minutes per "
    "round); captum left out of those two (seconds more per round, nothing new)",
    "PGD: B=32 for SmallCNN and B=4 for PreActResNet18 instead of B=128 (about a minute per "
    "attack on 2 cores)",
]


def _smoke() -> list[Spec]:
    return [
        Spec.of("segment_mean", size=32, batch=2, segments=16),
        Spec.of("perturb", size=32, batch=2, samples=32, segments=16),
        Spec.of("lime_fit", batch=2, samples=32, segments=16),
        Spec.of("masked_pgd_step", size=32, batch=2),
        Spec.of("explain", model="tiny_cnn", size=32, batch=1, samples=32, labels=2),
        Spec.of("segmentation", size=64, batch=1),
        Spec.of("pgd", model="tiny_cnn", size=32, batch=2, steps=2),
    ]


def _quick() -> list[Spec]:
    # captum takes tens of seconds per 224x224 explanation on 2 cores: quick times it at 32x32.
    return [
        Spec.of("segment_mean", size=224, batch=1, segments=64),
        Spec.of("segment_mean", size=32, batch=128, segments=64),
        Spec.of("perturb", size=224, batch=1, samples=256, segments=64),
        Spec.of("perturb", size=32, batch=16, samples=256, segments=64),
        Spec.of("lime_fit", batch=1, samples=1000, segments=64),
        Spec.of("lime_fit", batch=16, samples=256, segments=16),
        Spec.of("masked_pgd_step", size=224, batch=1),
        Spec.of("masked_pgd_step", size=32, batch=128),
        Spec.of("explain", model="tiny_cnn", size=224, batch=1, samples=128, captum=False),
        Spec.of("explain", model="small_cnn", size=32, batch=1, samples=128),
        Spec.of("segmentation", size=224, batch=1),
        Spec.of("pgd", model="small_cnn", size=32, batch=16, steps=10),
    ]


def _full_ops(device_type: str) -> list[Spec]:
    cpu = device_type == "cpu"
    specs = []
    for size, batch, m in itertools.product(SIZES, BATCHES, SEGMENTS):
        if not (cpu and batch > 1 and size > 32):
            specs.append(Spec.of("segment_mean", size=size, batch=batch, segments=m))
    for size, batch, n, m in itertools.product(SIZES, BATCHES, SAMPLES, SEGMENTS):
        if cpu and batch > 1 and (size > 32 or n != 256 or m != 64):
            continue
        if cpu and size > 32 and n == 1000 and m != 64:  # lime: 6-16 s per call
            continue
        specs.append(Spec.of("perturb", size=size, batch=batch, samples=n, segments=m))
    for batch, n, m in itertools.product(BATCHES, SAMPLES, SEGMENTS):
        if not (cpu and batch > 1 and (m == 256 or n == 1000)):
            specs.append(Spec.of("lime_fit", batch=batch, samples=n, segments=m))
    for size, batch in itertools.product(SIZES, BATCHES):
        specs.append(Spec.of("masked_pgd_step", size=size, batch=batch))
    return specs


def _explain_target_cases(device_type: str) -> list[Spec]:
    """The explanation the targets are stated for: one 224x224 image, N=1000, lime's quickshift
    (~34 segments), a model cheap enough that the explainer's own time shows; the top label and
    the top 5 labels (captum, one call per label, would add a minute per round on a CPU)."""
    return [
        Spec.of("explain", model="tiny_cnn", size=224, batch=1, samples=1000),
        Spec.of("explain", model="tiny_cnn", size=224, batch=1, samples=1000, labels=5, captum=device_type != "cpu"),
    ]


def _full_end_to_end(device_type: str) -> list[Spec]:
    specs = []
    if device_type == "cuda":
        for model, size, batch, n in itertools.product(("small_cnn", "resnet18"), SIZES, BATCHES, SAMPLES):
            specs.append(Spec.of("explain", model=model, size=size, batch=batch, samples=n))
        specs += _explain_target_cases(device_type)
        for model, batch in itertools.product(("small_cnn", "resnet18"), BATCHES):
            specs.append(Spec.of("pgd", model=model, size=32, batch=batch, steps=10))
    else:
        specs += _explain_target_cases(device_type) + [
            Spec.of("explain", model="tiny_cnn", size=32, batch=1, samples=1000),
            Spec.of("explain", model="small_cnn", size=32, batch=1, samples=1000),
            Spec.of("explain", model="small_cnn", size=224, batch=1, samples=64, captum=False),
            Spec.of("explain", model="resnet18", size=32, batch=1, samples=128, captum=False),
            Spec.of("pgd", model="small_cnn", size=32, batch=1, steps=10),
            Spec.of("pgd", model="small_cnn", size=32, batch=32, steps=10),
            Spec.of("pgd", model="resnet18", size=32, batch=4, steps=10),
        ]
    specs += [Spec.of("segmentation", size=224, batch=1), Spec.of("segmentation", size=224, batch=16)]
    return specs


def specs_for(profile: str, device_type: str) -> list[Spec]:
    """The cases of ``profile`` on a device of ``device_type``, in the order they run."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if profile == "smoke":
        return _smoke()
    if profile == "quick":
        return _quick()
    return _full_ops(device_type) + _full_end_to_end(device_type)


def omitted(profile: str, device_type: str) -> list[str]:
    """What the profile leaves out of the issue's sweep on this device, and why."""
    if profile == "full":
        return CPU_FULL_OMITTED if device_type == "cpu" else []
    return [f"the {profile} profile runs a few representative sizes, not the sweep"]
