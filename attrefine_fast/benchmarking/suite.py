"""Runs a profile's cases in one process: build a case, time its providers interleaved,
summarize, free it, go on to the next."""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from .attack_cases import setup_pgd
from .core import run_case
from .explain_cases import setup_explain, setup_segmentation
from .op_cases import OP_SETUPS
from .report import environment, load_average, summarize
from .sweep import ROUNDS, Spec, omitted, specs_for

SETUPS = {**OP_SETUPS, "explain": setup_explain, "segmentation": setup_segmentation, "pgd": setup_pgd}


def select_specs(profile: str, device_type: str, only: str | None = None) -> list[Spec]:
    """The cases of ``profile`` whose label contains ``only`` (all of them without it). A filter
    that matches nothing is an error naming the labels, not an empty report."""
    specs = specs_for(profile, device_type)
    chosen = [s for s in specs if not only or only in s.label]
    if not chosen:
        labels = "\n  ".join(s.label for s in specs)
        raise ValueError(f"--only {only!r} matches none of the {profile} profile's cases on {device_type}:\n  {labels}")
    return chosen


def run_suite(
    profile: str,
    device: torch.device,
    only: str | None = None,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    """Run every case of ``profile`` (those whose spec label contains ``only``, when given) and return
    the report: environment, what the profile leaves out, and one summary per case.
    ``on_case`` is called with each summary as soon as it is measured."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    specs = select_specs(profile, device.type, only)
    rounds = ROUNDS[profile]
    report = {"profile": profile, "environment": environment(device), "omitted": omitted(profile, device.type), "cases": []}
    start = time.perf_counter()
    for spec in specs:
        case = SETUPS[spec.setup](device, **spec.arguments())
        timings = run_case(
            case, rounds.min_repeats, rounds.max_repeats, rounds.budget_s, rounds.warmup, rounds.min_sample_s,
        )
        summary = summarize(case, timings)
        report["cases"].append(summary)
        if on_case is not None:
            on_case(summary)
        del case, timings
        gc.collect()
    report["environment"]["load_average_end"] = load_average()
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    return report
