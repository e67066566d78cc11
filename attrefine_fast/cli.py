"""``attrefine-fast``: the command line. Each subcommand lives in its own module with
``add_arguments(parser)`` and ``run(args)``; register it in COMMANDS."""
from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
COMMANDS = {
    "explain-demo": ("attrefine_fast.demo_explain", "explain scikit-image's photos with our engine and with lime"),
    "info": ("attrefine_fast.info", "list the available backends of each op"),
    "refine": ("attrefine_fast.refine.command", "train a model with ERM, PGD-AT or attribution-aware refinement"),
    "demo": ("attrefine_fast.demo_refine", "the main job: ERM vs PGD-AT vs refinement on the embedded digits, with a report"),
    "bench": ("attrefine_fast.bench", "benchmark suite: medians and ratios to lime, captum and torchattacks, JSON report"),
    "evaluate": ("attrefine_fast.evaluate", "robustness report: clean, FGSM, PGD, AutoAttack and corruption accuracy"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="attrefine-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    args = parser.parse_args(argv)
    mod = importlib.import_module(COMMANDS[args.command][0])
    mod.run(args) if hasattr(mod, "run") else mod.main()


if __name__ == "__main__":
    main()
