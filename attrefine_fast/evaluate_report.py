"""The robustness report of :func:`attrefine_fast.evaluate.evaluate` as a text table and PNG plots."""
from __future__ import annotations

import math
import os


def _pct(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:6.2f}"


def eps_label(eps: float, norm: str = "linf") -> str:
    """'8/255' for an L-inf radius that is a whole number of grey levels, else the plain number."""
    # L-inf radii are conventionally quoted in 1/255 units; L2 radii are plain numbers.
    if norm == "linf":
        k = eps * 255
        return f"{k:.0f}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"
    return f"{eps:.4g}"


def format_table(report: dict) -> str:
    """The report as aligned text: attack accuracy per ε, AutoAttack, corruption accuracy."""
    norm = report.get("norm", "linf")
    eps = report.get("eps") or []
    lines = [
        f"dataset {report.get('dataset', '?')}: {report.get('num_samples', '?')} samples, "
        f"{report.get('num_classes', '?')} classes",
        f"clean accuracy          {_pct(report.get('clean_accuracy'))} %",
    ]
    rows = []
    if report.get("fgsm") is not None:
        rows.append(("FGSM", report["fgsm"]))
    rows += list((report.get("pgd") or {}).items())
    if rows and eps:
        width = max(9, *(len(eps_label(e, norm)) + 2 for e in eps))
        header = f"{'accuracy % (' + norm + ')':<24}" + "".join(f"{eps_label(e, norm):>{width}}" for e in eps)
        lines += ["", header]
        for name, accs in rows:
            lines.append(f"{name:<24}" + "".join(f"{_pct(a):>{width}}" for a in accs))
    aa = report.get("autoattack")
    if aa:
        label = f"AutoAttack ({eps_label(aa['eps'], norm)})"
        value = f"{_pct(aa['accuracy'])} %" if "accuracy" in aa else f"skipped: {aa.get('skipped', '')}"
        lines += ["", f"{label:<24}{value}"]
    cor = report.get("corruptions")
    if cor and cor.get("per_corruption"):
        sev = cor.get("severities", [1, 2, 3, 4, 5])
        lines += ["", f"{'corruption accuracy %':<24}" + "".join(f"{'s' + str(s):>9}" for s in sev) + f"{'mean':>9}"]
        for name, accs in cor["per_corruption"].items():
            mean = sum(accs) / len(accs) if accs else None
            lines.append(f"{name:<24}" + "".join(f"{_pct(a):>9}" for a in accs) + f"{_pct(mean):>9}")
        lines.append(f"{'mean (all cells)':<24}{_pct(cor.get('mean')):>{9 * (len(sev) + 1)}}")
    return "\n".join(lines)


def plot_report(report: dict, out_dir) -> list[str]:
    """PNG plots of the report in ``out_dir`` (created): accuracy vs ε (``accuracy_vs_eps.png``)
    and corruption accuracy by severity (``corruption_accuracy.png``), each when the report has
    the data. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    norm = report.get("norm", "linf")
    eps = report.get("eps") or []
    curves = ([("FGSM", report["fgsm"])] if report.get("fgsm") is not None else []) + list((report.get("pgd") or {}).items())
    if eps and curves:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = [0.0] + [e * 255 if norm == "linf" else e for e in eps]
        clean = report.get("clean_accuracy")
        for name, accs in curves:
            ax.plot(xs, [100 * clean] + [100 * a for a in accs], marker="o", label=name)
        aa = report.get("autoattack") or {}
        if "accuracy" in aa:
            x_aa = aa["eps"] * 255 if norm == "linf" else aa["eps"]
            ax.scatter([x_aa], [100 * aa["accuracy"]], marker="*", s=120, color="black", zorder=3, label="AutoAttack")
        ax.set_xlabel("ε (×1/255)" if norm == "linf" else "ε (L2)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{report.get('dataset', '')}: accuracy vs ε ({norm})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "accuracy_vs_eps.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    cor = report.get("corruptions")
    if cor and cor.get("per_corruption"):
        sev = cor.get("severities", [1, 2, 3, 4, 5])
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, accs in cor["per_corruption"].items():
            ax.plot(sev, [100 * a for a in accs], marker="o", label=name)
        if report.get("clean_accuracy") is not None:
            ax.axhline(100 * report["clean_accuracy"], color="black", linestyle="--", linewidth=1, label="clean")
        ax.set_xticks(sev)
        ax.set_xlabel("severity")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{report.get('dataset', '')}: corruption accuracy (mean {100 * cor['mean']:.1f}%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, "corruption_accuracy.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
