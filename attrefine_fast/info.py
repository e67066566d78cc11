"""``python -m attrefine_fast.info``: what is installed and which backend runs each op."""
from __future__ import annotations

import platform

import torch

from . import __version__, _extension, backends


def report() -> str:
    lines = [
        f"attrefine_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    if _extension.loaded():
        with_cuda = all(backends.has_compiled(op, "CUDA") for op in backends.OPS)
        lines.append(f"compiled extension: loaded, {'CPU and CUDA kernels' if with_cuda else 'CPU kernels (built without CUDA)'}")
        lines.append(f"CPU kernels: {torch.ops.attrefine_fast.cpu_kernels()}")
    else:
        lines.append(f"compiled extension: {_extension.load_error()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append("")
        lines.append(f"[{device}]")
        for op in backends.OPS:
            choice = backends.selected(op, "auto", device)
            lines.append(f"  {op}: auto -> {choice}")
            for backend in backends.BACKENDS:
                ok, why = backends.status(op, backend, device)
                lines.append(f"    {backend:7s} {'yes' if ok else 'no '}  {why}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
