"""Runs the compiled ops' bad-input cases (op_cases.BAD_CALLS) on one device, in this process.

    python -X faulthandler tests/bad_input_runner.py cuda

Prints a JSON line when a case starts and one with what it raised (the exception's type and
message). The tests run it as a subprocess, so that a crash ends this process only: the case
that started without an outcome is the one that crashed, and faulthandler's traceback says where.
"""
import json
import sys

import torch

from attrefine_fast import _extension
from op_cases import BAD_CALLS


def main(device: str) -> None:
    if not _extension.loaded():
        raise SystemExit(f"the compiled ops are not loaded: {_extension.load_error()}")
    for name, (op, make_args, _, _) in BAD_CALLS.items():
        if device != "cpu" and "overlaps" in name:  # built from one CPU storage
            continue
        print(json.dumps({"start": name}), flush=True)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in make_args())
        try:
            getattr(torch.ops.attrefine_fast, op)(*args)
            outcome = {"case": name, "raised": None}
        except Exception as e:  # noqa: BLE001 - every outcome is reported, the test judges it
            outcome = {"case": name, "raised": type(e).__name__, "message": str(e)}
        print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
