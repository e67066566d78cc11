"""Robustness evaluation: clean, FGSM, PGD and AutoAttack accuracy, and corruption accuracy.

    report = evaluate(model, load_digits("test"))          # a JSON-serializable dict
    print(format_table(report)); plot_report(report, "out/")

Protocol (the defaults): L-inf ε in {2, 4, 8, 16}/255 on [0, 1] images; FGSM; PGD-10 and PGD-50
with step ε/4, one random start, the worst iterate kept per sample; AutoAttack (torchattacks'
"standard" ensemble) at ε = 8/255 when asked for and torchattacks imports; corruption accuracy
as in :mod:`attrefine_fast.evaluate_corruptions`.

This module holds the attack metrics and :func:`evaluate`, which runs every metric into one
report. The rest of the family, all re-exported here: clean accuracy and the shared batch loop in
:mod:`attrefine_fast.evaluate_accuracy`, corruption and CIFAR-C accuracy in
:mod:`attrefine_fast.evaluate_corruptions`, the table and the plots in
:mod:`attrefine_fast.evaluate_report`, the command line (``attrefine-fast evaluate``) in
:mod:`attrefine_fast.evaluate_cli`.
"""
from __future__ import annotations

import numbers
import time

import numpy as np
import torch
from torch import nn

from .attacks import fgsm as fgsm_attack
from .attacks import frozen, masked_pgd, predict
from .checks import check_choice, check_int
from .corruptions import CORRUPTIONS
from .evaluate_accuracy import _as_dataset, _bar, _check_batch_size, _device, _num_batches, _num_classes, accuracy
from .evaluate_cli import add_arguments, run
from .evaluate_corruptions import DEFAULT_CORRUPTIONS, _check_names, _check_severities, cifar_c_accuracy, corruption_accuracy
from .evaluate_report import eps_label, format_table, plot_report

__all__ = [
    "DEFAULT_CORRUPTIONS", "accuracy", "attack_accuracy", "autoattack_accuracy", "build_autoattack", "cifar_c_accuracy",
    "corruption_accuracy", "evaluate", "format_table", "plot_report", "add_arguments", "run",
]

ATTACKS = ("fgsm", "pgd")
# The standard ensemble's targeted APGD ranks each sample's logits down to the fourth largest
# (its targeted DLR loss): with fewer classes torchattacks fails with an IndexError mid-run.
AUTOATTACK_MIN_CLASSES = 4


def autoattack_classes_reason(n_classes: int) -> str:
    return (f"AutoAttack's standard ensemble needs at least {AUTOATTACK_MIN_CLASSES} classes (its targeted DLR "
            f"loss ranks the four largest logits); the model has {n_classes}")


def attack_accuracy(
    model: nn.Module,
    dataset,
    *,
    attack: str = "pgd",
    eps: float = 8 / 255,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    batch_size: int = 256,
    seed: int = 0,
    device=None,
    restarts: int = 1,
    progress: bool = False,
) -> float:
    """Robust accuracy: the share of samples still classified correctly after the attack.

    Args:
        attack: "fgsm" (one step of size ε) or "pgd" (``steps`` steps of ``step_size``, default
            ε/4, from a random start, ``restarts`` runs, worst case kept per sample).
        eps, norm: the threat model (L-inf or L2 ball in [0, 1] pixel units).
        seed: seeds one generator for the whole dataset: the result depends only on the seed and
            ``batch_size``.
    """
    check_choice("attack", attack, ATTACKS)
    ds = _as_dataset(dataset)
    _check_batch_size(batch_size)
    dev = _device(model, device)
    gen = torch.Generator().manual_seed(int(seed))
    correct = 0
    desc = ("FGSM" if attack == "fgsm" else f"PGD-{steps}") + f" eps={eps_label(eps, norm)}"
    for x, y in _bar(ds.batches(batch_size, dev), desc=desc, total=_num_batches(len(ds), batch_size), progress=progress):
        if attack == "fgsm":
            adv = fgsm_attack(model, x, y, eps=eps, norm=norm)
        else:
            adv = masked_pgd(model, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size, restarts=restarts, seed=gen)
        correct += int((predict(model, adv, batch_size=batch_size) == y).sum())
    return correct / max(len(ds), 1)


def build_autoattack(model: nn.Module, *, eps: float, norm: str, version: str, n_classes: int, seed: int):
    """torchattacks' ``AutoAttack`` with the number of classes set (its default, 10, would make the
    targeted attacks wrong for any other count); ImportError naming the install command if absent."""
    try:
        import torchattacks
    except ImportError as e:
        raise ImportError("AutoAttack needs torchattacks: pip install --no-deps 'torchattacks>=3.5'") from e
    check_choice("norm", norm, ("linf", "l2"))
    check_choice("version", version, ("standard", "plus", "rand"))
    check_int("n_classes", n_classes, 2)
    if n_classes < AUTOATTACK_MIN_CLASSES:
        raise ValueError(autoattack_classes_reason(n_classes))
    return torchattacks.AutoAttack(
        model, norm="Linf" if norm == "linf" else "L2", eps=float(eps), version=version, n_classes=n_classes, seed=int(seed)
    )


def autoattack_accuracy(
    model: nn.Module,
    dataset,
    *,
    eps: float = 8 / 255,
    norm: str = "linf",
    version: str = "standard",
    batch_size: int = 256,
    seed: int = 0,
    device=None,
    progress: bool = False,
) -> float:
    """Robust accuracy under torchattacks' ``AutoAttack`` (needs ``pip install --no-deps torchattacks``).

    The number of classes is read from the model's output (torchattacks defaults to 10, which
    would make its targeted attacks wrong for any other count).
    """
    ds = _as_dataset(dataset)
    _check_batch_size(batch_size)
    dev = _device(model, device)
    n_classes = _num_classes(model, ds, dev)
    correct = 0
    with frozen(model):
        aa = build_autoattack(model, eps=eps, norm=norm, version=version, n_classes=n_classes, seed=seed)
        batches = _bar(ds.batches(batch_size, dev), desc=f"AutoAttack eps={eps_label(eps, norm)}", total=_num_batches(len(ds), batch_size), progress=progress)
        for x, y in batches:
            adv = aa(x, y)
            correct += int((predict(model, adv, batch_size=batch_size) == y).sum())
    return correct / max(len(ds), 1)


def evaluate(
    model: nn.Module,
    dataset,
    *,
    eps=(2 / 255, 4 / 255, 8 / 255, 16 / 255),
    pgd_steps=(10, 50),
    fgsm: bool = True,
    autoattack: bool = False,
    corruptions=None,
    severities=(1, 2, 3, 4, 5),
    max_samples: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    device=None,
    norm: str = "linf",
    autoattack_eps: float = 8 / 255,
    cifar_c: tuple | None = None,
) -> dict:
    """The full robustness report of ``model`` on ``dataset``.

    Args:
        eps: the ε sweep for FGSM and PGD (step ε/4): a number or a sequence of numbers.
        pgd_steps: PGD iteration counts (an int or a sequence), one curve each; () skips PGD.
        fgsm: include FGSM.
        autoattack: include AutoAttack at ``autoattack_eps`` (recorded as skipped, with the
            reason, when torchattacks does not import or the model has fewer than 4 classes).
        corruptions: None: :data:`DEFAULT_CORRUPTIONS`; () skips the corruption benchmark.
        severities: corruption severities.
        max_samples: evaluate on the first n samples only.
        cifar_c: ``(name, root)`` reads the corrupted images from the CIFAR-10-C / CIFAR-100-C
            files instead of generating them (``corruptions=None``: all present in the folder).

    Returns:
        A JSON-serializable dict: ``dataset``, ``num_samples``, ``clean_accuracy``, ``eps`` (list),
        ``fgsm`` (accuracy per ε or None), ``pgd`` ({"PGD-<steps>": accuracy per ε}),
        ``autoattack`` (None or {"eps", "version", "accuracy"} or {"eps", "skipped"}),
        ``corruptions`` (see :func:`corruption_accuracy`, or None), ``settings`` and ``seconds``.
    """
    ds = _as_dataset(dataset)
    if max_samples is not None:
        check_int("max_samples", max_samples, 1)
        ds = ds.subset(max_samples)
    try:
        eps = [float(e) for e in np.asarray(eps, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError) as e:
        raise TypeError(f"eps must be a number or a sequence of numbers, got {eps!r}") from e
    if any(not (0 <= e < float("inf")) for e in eps):
        raise ValueError(f"eps values must be finite and >= 0, got {eps}")
    if isinstance(pgd_steps, numbers.Integral):
        pgd_steps = (pgd_steps,)
    steps_list = [check_int("pgd_steps", s, 0) for s in pgd_steps]
    check_choice("norm", norm, ("linf", "l2"))
    _check_batch_size(batch_size)
    if cifar_c is not None and (not isinstance(cifar_c, (tuple, list)) or len(cifar_c) != 2):
        raise ValueError("cifar_c must be None or a (name, root) pair, e.g. ('cifar10', 'data/')")
    # The corruption settings are checked now, not after the attacks have run.
    if corruptions is not None and not isinstance(corruptions, str):
        corruptions = tuple(corruptions)
    score_corruptions = corruptions != ()
    if score_corruptions:
        names = _check_names(corruptions, DEFAULT_CORRUPTIONS)
        if cifar_c is None:
            for name in names:
                check_choice("corruption", name, CORRUPTIONS)
        _check_severities(severities)
    dev = _device(model, device)
    common = dict(batch_size=batch_size, device=dev, progress=progress)
    seconds: dict[str, float] = {}

    def timed(key, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        return out

    report: dict = {
        "dataset": ds.name,
        "num_samples": len(ds),
        "num_classes": ds.num_classes,
        "norm": norm,
        "clean_accuracy": timed("clean", accuracy, model, ds, **common),
        "eps": eps,
        "fgsm": None,
        "pgd": {},
        "autoattack": None,
        "corruptions": None,
    }
    if fgsm:
        report["fgsm"] = [timed("fgsm", attack_accuracy, model, ds, attack="fgsm", eps=e, norm=norm, **common) for e in eps]
    for steps in steps_list:
        report["pgd"][f"PGD-{steps}"] = [
            timed(f"PGD-{steps}", attack_accuracy, model, ds, attack="pgd", eps=e, steps=steps, norm=norm, seed=seed, **common)
            for e in eps
        ]
    if autoattack and (n_classes := _num_classes(model, ds, dev)) < AUTOATTACK_MIN_CLASSES:
        report["autoattack"] = {"eps": float(autoattack_eps), "skipped": autoattack_classes_reason(n_classes)}
    elif autoattack:
        try:
            acc = timed("autoattack", autoattack_accuracy, model, ds, eps=autoattack_eps, norm=norm, seed=seed, **common)
            report["autoattack"] = {"eps": float(autoattack_eps), "version": "standard", "accuracy": acc}
        except ImportError as e:
            report["autoattack"] = {"eps": float(autoattack_eps), "skipped": str(e)}
    if score_corruptions and cifar_c is not None:
        report["corruptions"] = timed(
            "corruptions", cifar_c_accuracy, model, cifar_c[0], cifar_c[1], corruptions=corruptions,
            severities=severities, max_samples=max_samples, **common,
        )
    elif score_corruptions:
        report["corruptions"] = timed(
            "corruptions", corruption_accuracy, model, ds, corruptions=corruptions, severities=severities, seed=seed, **common
        )
    report["settings"] = {
        "pgd_steps": steps_list, "pgd_step_size": "eps/4", "pgd_random_start": True, "pgd_restarts": 1,
        "batch_size": batch_size, "seed": seed, "max_samples": max_samples, "device": str(dev),
    }
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return report
