"""A bench report (the JSON of ``attrefine-fast bench``) as Markdown tables, for
benchmarks/RESULTS.md:

    python -m attrefine_fast.benchmarking.markdown bench-full-cpu.json > tables.md
"""
from __future__ import annotations

import json
import sys

from .report import seconds_text

# kind -> (section title, extra columns: (header, function of a provider row -> text))
SECTIONS = {
    "explain": ("Explanations (segmentation excluded, timed below)", [
        ("non-model", lambda r: seconds_text(r.get("nonmodel_median_s"))),
        ("overhead", lambda r: f"{r['overhead'] * 100:+.0f}%" if r.get("overhead") is not None else ""),
        ("vs model alone", lambda r: f"{r['overhead_vs_model'] * 100:+.0f}%" if "overhead_vs_model" in r else ""),
        ("vs lime (non-model)", lambda r: _ratio(r, "lime", nonmodel=True)),
        ("vs captum (non-model)", lambda r: _ratio(r, "captum", nonmodel=True)),
        ("images/s", lambda r: f"{r['images_per_s']:.3g}" if "images_per_s" in r else ""),
    ]),
    "op": ("Ops", [("vs lime", lambda r: _ratio(r, "lime"))]),
    "segmentation": ("Segmentation", [("vs lime", lambda r: _ratio(r, "lime"))]),
    "attack": ("PGD", [
        ("x model passes", lambda r: f"{r['x_model']:.2f}" if "x_model" in r else ""),
        ("vs torchattacks", lambda r: _ratio(r, "torchattacks")),
    ]),
}


def _ratio(row: dict, peer: str, nonmodel: bool = False) -> str:
    total = row.get("vs", {}).get(peer)
    if total is None:
        return ""
    text = f"{total:.1f}x"
    inner = row.get("nonmodel_vs", {}).get(peer)
    if nonmodel and inner is not None:
        text += f" ({inner:.1f}x)"
    return text


def report_markdown(report: dict) -> str:
    """One table per kind of case (a row per provider that ran), then the skip reasons."""
    out = []
    skipped: dict[str, set[str]] = {}
    for kind, (title, columns) in SECTIONS.items():
        cases = [c for c in report["cases"] if c["kind"] == kind]
        if not cases:
            continue
        headers = ["case", "provider", "median"] + [h for h, _ in columns]
        out += [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for case in cases:
            first = True
            for row in case["providers"]:
                if row["status"] != "ran":
                    skipped.setdefault(row["reason"], set()).add(row["name"])
                    continue
                cells = [case["title"] if first else "", row["name"], seconds_text(row["median_s"])]
                cells += [fn(row) for _, fn in columns]
                out.append("| " + " | ".join(cells) + " |")
                first = False
        out.append("")
    if skipped:
        out += ["Providers not timed, and why:", ""]
        out += [f"- {', '.join(sorted(names))}: {reason}" for reason, names in skipped.items()]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m attrefine_fast.benchmarking.markdown REPORT.json")
    with open(args[0]) as f:
        print(report_markdown(json.load(f)))


if __name__ == "__main__":
    main()
