"""Build attrefine_fast and its compiled ops.

The C++ CPU extension (``attrefine_fast._C``) is built wherever torch and a C++ compiler are
present. CUDA sources are added when torch itself was built with CUDA, a toolkit is found whose
nvcc has torch's CUDA major version (torch's build refuses any other) and whose headers are
there, and there is something to build for: a visible GPU, or the architectures named in
``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``) on a build machine without one. ``ATTREFINE_FORCE_CUDA=1``
adds them whatever those checks say (without a GPU or an architecture list, for every
architecture this torch was built for).
``ATTREFINE_NO_EXTENSION=1`` skips compiled code entirely; the package then runs on its
pure-PyTorch backend.
``ATTREFINE_SANITIZE=1`` builds the CPU extension alone with AddressSanitizer and
UndefinedBehaviorSanitizer, for `make test-sanitized` (it loads only where their runtimes are
preloaded).

Install with ``pip install --no-build-isolation -e .`` after torch is installed.
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["attrefine_fast", "attrefine_fast.ops", "attrefine_fast.kernels", "attrefine_fast.benchmarking", "attrefine_fast.refine"]
# The Triton kernels live in the top-level kernels/ folder but install inside our namespace:
# a top-level package called `kernels` would collide with other projects.
PACKAGE_DIR = {"attrefine_fast.kernels": "kernels"}


def say(msg):
    print(f"[attrefine_fast setup] {msg}", file=sys.stderr)


def _flag(name, environ=os.environ):
    return environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def toolkit_version(cuda_home):
    """The CUDA toolkit's "major.minor" as its nvcc reports it, or None where nvcc does not answer."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found[1]}.{found[2]}" if found else None


def cuda_headers_found(cuda_home):
    """Whether CUDA_HOME holds the toolkit's headers: in include/ (torch's include path) or in
    targets/<platform>/include/ (conda's toolkits, whose compilers look there). An nvcc found on
    PATH may be a wrapper script outside the toolkit, and torch takes CUDA_HOME from it: its
    build would then find neither the headers nor libcudart."""
    folders = [os.path.join(cuda_home, "include"), *glob.glob(os.path.join(cuda_home, "targets", "*", "include"))]
    return any(os.path.isfile(os.path.join(f, "cuda_runtime.h")) for f in folders)


def cuda_build(torch, cuda_home, environ):
    """Whether to build the CUDA ops, and why: (True or False, the reason in words)."""
    if _flag("ATTREFINE_SANITIZE", environ):
        return False, "ATTREFINE_SANITIZE=1"
    if _flag("ATTREFINE_FORCE_CUDA", environ):
        return True, "ATTREFINE_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    toolkit = toolkit_version(cuda_home)
    if toolkit is None:
        return False, f"no working nvcc in the CUDA toolkit at {cuda_home} (set CUDA_HOME)"
    torch_major = torch.version.cuda.split(".")[0]
    if torch_major != toolkit.split(".")[0]:
        # torch's BuildExtension stops the whole build on a major-version mismatch: build the CPU ops.
        return False, (f"the CUDA toolkit at {cuda_home} is {toolkit}, torch {torch.__version__} was built with "
                       f"CUDA {torch.version.cuda}; point CUDA_HOME at a {torch_major}.x toolkit")
    if not environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        return False, ("no CUDA GPU to build for; on a build machine without one, name the GPUs' architectures in "
                       "TORCH_CUDA_ARCH_LIST (e.g. 9.0 for H100 / H200)")
    if not cuda_headers_found(cuda_home):
        return False, (f"no CUDA headers in {os.path.join(cuda_home, 'include')}; set CUDA_HOME to the toolkit's folder "
                       "(ATTREFINE_FORCE_CUDA=1 builds anyway)")
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, toolkit {toolkit} at {cuda_home}"


def default_arch_list(torch):
    """The architectures this torch was built for, as TORCH_CUDA_ARCH_LIST spells them ("8.0;9.0+PTX"),
    for a forced CUDA build with no GPU to ask (torch's build then fails without a list)."""
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or ""
    archs = sorted({f"{a[:-1]}.{a[-1]}" for a in re.findall(r"sm_(\d+)", flags)}, key=lambda a: float(a))
    return ";".join(archs) + "+PTX" if archs else "8.0;9.0+PTX"


def extensions():
    if _flag("ATTREFINE_NO_EXTENSION"):
        say("ATTREFINE_NO_EXTENSION=1: building no compiled ops (pure-PyTorch backend only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        say("torch is not installed: install torch first, then build with --no-build-isolation")
        raise

    cpu_sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))]
    cpu_sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    cuda_sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
    cuda_sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]

    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    link_flags = ["-fopenmp"]
    if _flag("ATTREFINE_SANITIZE"):
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        cxx_flags, link_flags = [*cxx_flags, "-O1", *sanitize], [*link_flags, *sanitize]  # the last -O counts
        say("ATTREFINE_SANITIZE=1: the CPU extension with AddressSanitizer and UBSan (no CUDA)")
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]

    with_cuda, why = cuda_build(torch, cpp_extension.CUDA_HOME, os.environ)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(torch)
        say(f"no CUDA GPU to ask: building for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    say("C++/OpenMP CPU sources: " + ", ".join(cpu_sources))
    if with_cuda and cuda_sources:
        say(f"building the CPU (C++/OpenMP) and CUDA ops: {why}")
        say("CUDA sources: " + ", ".join(cuda_sources))
        ext = cpp_extension.CUDAExtension(
            "attrefine_fast._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        say(f"building the CPU (C++/OpenMP) ops only; CUDA ops skipped: {why}")
        ext = cpp_extension.CppExtension(
            "attrefine_fast._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # as pip and setuptools run it; the tests import cuda_build
    ext_modules, cmdclass = extensions()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
