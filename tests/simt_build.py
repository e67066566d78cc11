"""Builds the CUDA kernels (csrc/cuda/*.cu) for the SIMT emulator (tests/simt/simt.h).

The .cu sources compile with the host C++ compiler after two mechanical rewrites, the only syntax
that is not C++: a launch ``k<<<grid, block, bytes, stream>>>(args)`` becomes
``simt::launch(k, grid, block, bytes, stream)(args)``, and ``extern __shared__ T name[];``
becomes a pointer to the block's dynamic shared memory. The library is built once per test
session into a folder keyed by the sources' hash, and loaded with ctypes.

With ATTREFINE_SIMT_SANITIZE=1 it is built with AddressSanitizer and UndefinedBehaviorSanitizer,
which then check every global and shared memory access of the kernels (as compute-sanitizer's
memcheck does on a GPU); the Python process must load the sanitizer runtimes first
(`make test-emulated-sanitized` does).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
SIMT_DIR = Path(__file__).resolve().parent / "simt"
KERNELS = ("segment_mean.cu", "perturb.cu", "lime_fit.cu", "masked_pgd_step.cu")

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]\s*;")


def translate(source: str) -> str:
    """The .cu source as C++ for the emulator."""
    source = DYNAMIC_SHARED.sub(r"\1* \2 = ::simt::dynamic_shared<\1>();", source)
    return LAUNCH.sub(r"::simt::launch(\1, \2)(", source)


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def sanitized() -> bool:
    return os.environ.get("ATTREFINE_SIMT_SANITIZE", "0") not in ("", "0")


def build(cache: Path) -> ctypes.CDLL:
    """Compiles (or reuses) the emulated kernels and returns the loaded library."""
    sources = [CUDA_DIR / k for k in KERNELS]
    inputs = sources + sorted(CUDA_DIR.glob("*.h")) + sorted(CUDA_DIR.glob("*.cuh")) + sorted(SIMT_DIR.iterdir())
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if sanitized() else []
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in inputs) + " ".join(flags).encode()).hexdigest()[:16]
    out = cache / f"simt-{digest}"
    lib = out / "libsimt_kernels.so"
    if not lib.exists():
        out.mkdir(parents=True, exist_ok=True)
        translated = []
        for src in sources:
            dst = out / (src.name + ".cpp")
            dst.write_text(translate(src.read_text()))
            translated.append(str(dst))
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            partial = Path(tmp) / lib.name
            cmd = [compiler(), "-std=c++17", "-O1", "-g", "-shared", "-fPIC", "-w", *flags,
                   "-include", str(SIMT_DIR / "simt.h"), "-I", str(SIMT_DIR), "-I", str(CUDA_DIR),
                   *translated, str(SIMT_DIR / "emulated_ops.cpp"), "-o", str(partial)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError("building the emulated CUDA kernels failed:\n" + done.stderr[-6000:])
            partial.replace(lib)
    return ctypes.CDLL(str(lib))
