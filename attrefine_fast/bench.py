"""``attrefine-fast bench``: the benchmark suite in one process, providers interleaved; prints
medians and the ratios to lime / captum / torchattacks measured in the same run, and writes
the whole report as JSON."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few representative sizes (under a minute on a 2-core CPU)")
    # The test suite's run: every case and provider once at tiny sizes; its timings mean nothing.
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="where to write the JSON report (default: bench-<profile>-<device>.json)")
    parser.add_argument("--markdown", metavar="PATH", default=None, help="also write the figures as Markdown tables")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch and numpy's BLAS (default: theirs); 1 gives steadier figures on a busy machine")
    parser.add_argument("--only", metavar="TEXT", default=None,
                        help="run only the cases whose label contains TEXT, e.g. 'explain' or 'model=small_cnn'")


def check_outputs(paths) -> None:
    """Refuse, before the suite runs, a report path that cannot be written: a folder, or a file
    in a folder that does not exist (otherwise the error comes after the whole run)."""
    for out in paths:
        if out is None:
            continue
        if os.path.isdir(out):
            raise SystemExit(f"bench: {out} is a folder; give a file path")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise SystemExit(f"bench: the folder of {out} does not exist")


def run(args: argparse.Namespace) -> None:
    from .benchmarking.report import case_text
    from .benchmarking.suite import run_suite, select_specs

    if args.quick and args.smoke:
        raise SystemExit("choose --quick or --smoke, not both")
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    try:
        select_specs(profile, device.type, args.only)
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None
    path = args.json or f"bench-{profile}-{device.type}.json"
    check_outputs((path, args.markdown))
    limits = contextlib.nullcontext()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        try:  # numpy's BLAS too, which lime and scikit-learn use: the same limit for every provider
            from threadpoolctl import threadpool_limits

            # threadpoolctl limits the runtimes already loaded: load the peers' first (lime's
            # ridge runs on SciPy's OpenBLAS, scikit-learn brings its own OpenMP)
            for module in ("scipy.linalg", "sklearn.linear_model"):
                with contextlib.suppress(ImportError):
                    importlib.import_module(module)
            limits = threadpool_limits(limits=args.threads)
        except ImportError:
            pass

    def show(summary: dict) -> None:
        print(case_text(summary), flush=True)
        print(flush=True)

    with limits:
        report = run_suite(profile, device, only=args.only, on_case=show)
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    where = env["gpu"] or f"{env['cpu']}, {env['cpu_cores']} cores, {env['torch_threads']} torch threads"
    print(f"{profile} profile on {device}: {where}; {versions}")
    for line in report["omitted"]:
        print(f"  left out: {line}")
    print(f"{len(report['cases'])} cases in {report['elapsed_s']} s; load average {env['load_average_start']} -> {env['load_average_end']}")
    loads = [x[0] for x in (env["load_average_start"], env["load_average_end"]) if x]
    if loads and max(loads) > (env["cpu_cores"] or 1):
        print(f"warning: the machine was busy (1-minute load up to {max(loads)} on {env['cpu_cores']} cores): timings are noisy")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"report written to {path}")
    if args.markdown:
        from .benchmarking.markdown import report_markdown

        with open(args.markdown, "w") as f:
            f.write(report_markdown(report))
        print(f"tables written to {args.markdown}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="attrefine-fast bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
