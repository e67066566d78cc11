"""``attrefine-fast``: the command line. Each subcommand lives in its own module with
``add_arguments(parser)`` and ``run(args)``; register it in COMMANDS.

A user's mistake (a bad value, a missing file, an unwritable folder) ends the command with one
line naming it and exit status 2, as argparse's own errors do; ``ATTREFINE_FAST_TRACEBACK=1``
shows the traceback instead. Ctrl-C ends it with status 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

DESCRIPTION = "fast LIME explanations, attacks and attribution-aware refinement of image classifiers"
# What a user's mistake raises: the argument checks (ValueError, TypeError for a value of the
# wrong type), the file system (OSError: missing or unwritable paths), torch on values it
# cannot take (RuntimeError, also BackendUnavailable's base) and a training run whose settings
# make the loss diverge (FloatingPointError, saying which setting to change).
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, FloatingPointError)

# name -> (module, one-line help)
COMMANDS = {
    "explain-demo": ("attrefine_fast.demo_explain", "explain scikit-image's photos with our engine and with lime"),
    "info": ("attrefine_fast.info", "list the available backends of each op"),
    "refine": ("attrefine_fast.refine.command", "train a model with ERM, PGD-AT or attribution-aware refinement"),
    "demo": ("attrefine_fast.demo_refine", "the main job: ERM vs PGD-AT vs refinement on the embedded digits, with a report"),
    "bench": ("attrefine_fast.bench", "benchmark suite: medians and ratios to lime, captum and torchattacks, JSON report"),
    "evaluate": ("attrefine_fast.evaluate", "robustness report: clean, FGSM, PGD, AutoAttack and corruption accuracy"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrefine-fast", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser


def main(argv=None) -> None:
    try:  # the commands' imports (torch...) take a moment, in which Ctrl-C ends it as later
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:
        print("\nattrefine-fast: interrupted", file=sys.stderr)
        sys.exit(130)
    mod = importlib.import_module(COMMANDS[args.command][0])
    try:
        mod.run(args) if hasattr(mod, "run") else mod.main()
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except KeyboardInterrupt:
        hint = " (continue it with the same command and --resume)" if args.command == "refine" else ""
        print(f"\nattrefine-fast {args.command}: interrupted{hint}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader of the output left (`... | head`): no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's flush at exit would raise again)
        sys.exit(1)
    except USER_ERRORS as e:
        if os.environ.get("ATTREFINE_FAST_TRACEBACK") == "1":
            raise
        print(f"attrefine-fast {args.command}: error: {e} ({type(e).__name__}; ATTREFINE_FAST_TRACEBACK=1 shows where)",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
