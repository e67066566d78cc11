"""The CUDA sources keep compiling on machines without a GPU.

Every csrc/cuda/*.cu file is compiled with ``nvcc -c`` (one architecture, all files at once,
warnings as errors), the phase-timing driver benchmarks/lime_fit_phases.cu is compiled and linked,
and the torch glue (csrc/cuda/ops_cuda.cpp) gets a syntax-only pass with the host compiler. The
kernels must stay free of torch headers: a CPU-only torch ships none usable for CUDA, which is why
the glue is the only file that includes them.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
KERNEL_FILES = CU_FILES + sorted(CUDA_DIR.glob("*.h")) + sorted(CUDA_DIR.glob("*.cuh"))
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2)/', re.MULTILINE)
# sm_80 (A100) and later (H100, H200) run code built for it; one target keeps the check quick.
ARCH = "sm_80"
NVCC = shutil.which("nvcc")
# The flags setup.py gives nvcc, and any warning as an error (an unused variable, a missing return...).
NVCC_FLAGS = ["-std=c++17", f"-arch={ARCH}", "-O3", "--expt-relaxed-constexpr", "-Werror", "all-warnings"]


def test_there_are_cuda_kernels_for_every_op():
    names = {p.stem for p in CU_FILES}
    assert {"segment_mean", "perturb", "lime_fit", "masked_pgd_step"} <= names


@pytest.mark.parametrize("path", KERNEL_FILES, ids=[p.name for p in KERNEL_FILES])
def test_kernel_files_include_no_torch_headers(path):
    found = TORCH_INCLUDE.findall(path.read_text())
    assert not found, f"{path.name} includes torch headers ({found}); keep torch in ops_cuda.cpp"


def _cuda_include_candidates():
    """Where the CUDA toolkit's headers may be: beside nvcc, under CUDA_HOME / CUDA_PATH, or in the
    usual install folders (nvcc itself may be a link or a wrapper elsewhere)."""
    yield Path(NVCC).resolve().parent.parent / "include"
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield Path(os.environ[var]) / "include"
    yield from sorted(Path("/usr/local").glob("cuda*/include"), reverse=True)


def _glue_syntax_check(tmp_path):
    """g++ -fsyntax-only on the glue, or None where torch's CUDA headers cannot be reached."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    cuda_include = next((d for d in _cuda_include_candidates() if (d / "cuda_runtime.h").exists()), None)
    if compiler is None or cuda_include is None:
        return None
    # A CPU-only torch lacks this one generated header; its only content is the shared-library flag.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{tmp_path}", f"-I{cuda_include}",
                                                                    f"-I{sysconfig.get_paths()['include']}"]
    cmd = [compiler, "-std=c++17", "-fsyntax-only", *includes, str(CUDA_DIR / "ops_cuda.cpp")]
    return "ops_cuda.cpp", cmd


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_sources_compile(tmp_path):
    jobs = {}
    for cu in CU_FILES:
        cmd = [NVCC, "-c", *NVCC_FLAGS, "-Xptxas", "-v", str(cu),  # -v: each kernel's resources, checked below
               "-o", str(tmp_path / f"{cu.stem}.o")]
        jobs[cu.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the phase-timing driver (benchmarks/lime_fit_phases.cu): lime_fit.cu with its clocks, linked
    phases = ROOT / "benchmarks" / "lime_fit_phases.cu"
    jobs[phases.name] = subprocess.Popen(
        [NVCC, *NVCC_FLAGS, str(phases), "-o", str(tmp_path / "phases")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    glue = _glue_syntax_check(tmp_path)
    if glue is not None:
        jobs[glue[0]] = subprocess.Popen(glue[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures, logs = {}, {}
    for name, proc in jobs.items():
        logs[name], _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures[name] = logs[name][-3000:]
    assert not failures, "\n\n".join(f"{name}:\n{log}" for name, log in failures.items())
    for cu in CU_FILES:
        assert (tmp_path / f"{cu.stem}.o").stat().st_size > 0
    _check_static_shared_memory(logs)
    if glue is None:
        print("ops_cuda.cpp not checked: no host compiler, torch or CUDA headers", file=sys.stderr)


def _static_shared_bytes(ptxas_log: str) -> dict[str, int]:
    """Each kernel's static shared memory, from ``ptxas -v`` (no "smem" entry: none)."""
    found, kernel = {}, None
    for line in ptxas_log.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            kernel = entry[1]
            found[kernel] = 0
        used = re.search(r"(\d+) bytes smem", line)
        if used and kernel is not None:
            found[kernel] = int(used[1])
    return found


def _check_static_shared_memory(logs: dict[str, str]) -> None:
    """A GPU counts static shared memory against the same per-block limit as the dynamic part,
    which the kernels size to the limit (the SIMT emulator checks the dynamic part alone):
    lime_fit reserves kStaticSharedBytes for its static variables, segment_mean's 48 KiB of
    histogram bins leave no room for any."""
    reserve = int(re.search(r"kStaticSharedBytes = (\d+);", (CUDA_DIR / "lime_fit.cu").read_text())[1])
    lime = _static_shared_bytes(logs["lime_fit.cu"])
    assert lime and all(0 < used <= reserve for used in lime.values()), lime
    sums = {k: v for k, v in _static_shared_bytes(logs["segment_mean.cu"]).items() if "segment_sums" in k}
    assert sums and all(used == 0 for used in sums.values()), sums
