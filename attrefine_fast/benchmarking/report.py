"""What a benchmark run reports: the environment, each case's medians and ratios, as JSON-ready
dicts and as text.

Ratios to a peer are ``peer median / provider median`` (how many times faster than the peer),
from the same run. Explanation cases add, per explainer:
    nonmodel_median_s   total minus the time inside the model, median over rounds;
    overhead            explanation time / time of the model's forward passes - 1, both from
                        the same call (median over rounds of non-model / model time): the
                        figure the project's targets refer to, steady on a shared machine;
    overhead_vs_model   median / median of the separately timed "model" provider - 1 (the
                        same passes timed alone; noisier, as the two come from different calls).
Attack cases add ``x_model`` = median / median of the model's k forward+backward passes.
"""
from __future__ import annotations

import os
import platform
import statistics
from datetime import datetime, timezone

import torch

from .. import backends
from .core import Case, Timing, median
from .inputs import peer_version

PEERS = ("lime", "captum", "torchattacks")
PACKAGES = ("torch", "triton", "lime", "captum", "torchattacks", "scikit-image", "scikit-learn", "numpy", "attrefine_fast")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict:
    """Where and with what the figures were measured."""
    env = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "versions": {name: peer_version(name) for name in PACKAGES},
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "load_average_start": load_average(),
        "backends": {op: {b: _backend_text(op, b, device.type) for b in backends.BACKENDS} for op in backends.OPS},
    }
    return env


def _backend_text(op: str, backend: str, device_type: str) -> str:
    ok, why = backends.status(op, backend, device_type)
    return why if ok else f"unavailable: {why}"


def _nonmodel(t: Timing) -> float | None:
    if t.model_seconds is None:
        return None
    return statistics.median(s - m for s, m in zip(t.seconds, t.model_seconds))


def _overhead_in_call(t: Timing) -> float | None:
    if t.model_seconds is None or not all(m > 0 for m in t.model_seconds):
        return None
    return statistics.median((s - m) / m for s, m in zip(t.seconds, t.model_seconds))


def summarize(case: Case, timings: dict[str, Timing]) -> dict:
    """The case's parameters and, for every provider, its figures or why it was skipped."""
    med = {name: median(t.seconds) for name, t in timings.items()}
    nonmodel = {name: _nonmodel(t) for name, t in timings.items()}
    model = med.get("model")
    rows = []
    for p in case.providers:
        row = {"name": p.name, "role": p.role, "detail": p.detail}
        if p.name not in timings:
            row.update(status="skipped", reason=p.skipped)
            rows.append(row)
            continue
        t = timings[p.name]
        row.update(
            status="ran", median_s=med[p.name], min_s=min(t.seconds), rounds=len(t.seconds),
            calls_per_round=t.calls_per_sample, seconds=t.seconds,
        )
        if t.model_seconds is not None:
            row.update(model_median_s=median(t.model_seconds), nonmodel_median_s=nonmodel[p.name])
        if case.kind == "explain" and p.role != "model":
            row["overhead"] = _overhead_in_call(t)
            if model:
                row["overhead_vs_model"] = med[p.name] / model - 1
            row["images_per_s"] = case.params["batch"] / med[p.name]
        if case.kind == "attack" and model and p.role != "model":
            row["x_model"] = med[p.name] / model
        if p.role == "ours":
            row["vs"] = {peer: med[peer] / med[p.name] for peer in PEERS if peer in med}
            if nonmodel[p.name]:
                row["nonmodel_vs"] = {
                    peer: nonmodel[peer] / nonmodel[p.name] for peer in PEERS if nonmodel.get(peer) is not None
                }
        rows.append(row)
    return {
        "id": case.id, "kind": case.kind, "title": case.title, "params": case.params,
        "device": str(case.device), "notes": case.notes, "providers": rows,
    }


def seconds_text(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def case_text(summary: dict) -> str:
    """A few lines per case: one per provider, then the skipped ones with their reasons."""
    kind = summary["kind"]
    lines = [summary["title"]]
    extra = {k: v for k, v in summary["params"].items() if k in ("segmentation", "segments_mean", "forward_batch")}
    if extra:
        lines[0] += "  (" + ", ".join(f"{k} {v}" for k, v in extra.items()) + ")"
    skipped = []
    for row in summary["providers"]:
        if row["status"] == "skipped":
            skipped.append(f"    skipped {row['name']}: {row['reason']}")
            continue
        cols = [f"  {row['name']:<17}", f"{seconds_text(row['median_s']):>10}"]
        if kind == "explain":
            cols.append(f"non-model {seconds_text(row.get('nonmodel_median_s')):>9}")
            if row.get("overhead") is not None:
                cols.append(f"overhead {row['overhead'] * 100:+6.1f}%")
            if "overhead_vs_model" in row:
                cols.append(f"(vs model alone {row['overhead_vs_model'] * 100:+.0f}%)")
        if kind == "attack" and "x_model" in row:
            cols.append(f"{row['x_model']:.2f}x the model's passes")
        for peer, ratio in row.get("vs", {}).items():
            text = f"{ratio:.1f}x vs {peer}"
            if peer in row.get("nonmodel_vs", {}):
                text += f" (non-model {row['nonmodel_vs'][peer]:.1f}x)"
            cols.append(text)
        lines.append("  ".join(cols))
    for note in summary["notes"]:
        lines.append(f"    note: {note}")
    return "\n".join(lines + skipped)
