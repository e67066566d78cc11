"""Build attrefine_fast and its compiled ops.

The C++ CPU extension (``attrefine_fast._C``) is built wherever torch and a C++ compiler are
present. CUDA sources are added when torch itself was built with CUDA, a toolkit is found whose
nvcc has torch's CUDA major version (torch's build refuses any other) and whose headers are
there, and there is something to build for: a visible GPU, or the architectures named in
``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``) on a build machine without one. ``ATTREFINE_FORCE_CUDA=1``
adds them whatever those checks say (without a GPU or an architecture list, for every
architecture this torch was built for). Architectures older than compute capability 6.0, which
the CUDA kernels' float64 atomics need, are left out with a message.
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
    if torch.version.cuda is None:  # forcing cannot help: torch's CUDA build needs a CUDA torch
        forced = " (ATTREFINE_FORCE_CUDA=1 needs a torch built with CUDA)" if _flag("ATTREFINE_FORCE_CUDA", environ) else ""
        return False, f"torch {torch.__version__} was built without CUDA{forced}"
    if _flag("ATTREFINE_FORCE_CUDA", environ):
        return True, "ATTREFINE_FORCE_CUDA=1"
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


# The CUDA kernels add float64 with atomicAdd, which needs compute capability 6.0 (Pascal) or newer.
MIN_ARCH = 6.0
# The names TORCH_CUDA_ARCH_LIST takes besides numbers, by their oldest architecture.
ARCH_NAMES = {"kepler+tesla": 3.7, "kepler": 3.5, "maxwell+tegra": 5.3, "maxwell": 5.0, "pascal": 6.0, "volta": 7.0,
              "turing": 7.5, "ampere+tegra": 8.7, "ampere": 8.0, "ada": 8.9, "hopper": 9.0}


def default_arch_list(torch):
    """The architectures this torch was built for, as TORCH_CUDA_ARCH_LIST spells them ("8.0;9.0+PTX"),
    for a forced CUDA build with no GPU to ask (torch's build then fails without a list)."""
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or ""
    archs = {f"{a[:-1]}.{a[-1]}" for a in re.findall(r"sm_(\d+)", flags)}
    archs = sorted((a for a in archs if float(a) >= MIN_ARCH), key=float)
    return ";".join(archs) + "+PTX" if archs else "8.0;9.0+PTX"


def cuda_arch_list(torch, environ):
    """The TORCH_CUDA_ARCH_LIST to build with ("" where no architecture is new enough; None to let
    torch build for the visible GPUs, as it does by default) and what to say about it."""
    arch_list, notes = environ.get("TORCH_CUDA_ARCH_LIST"), []
    if not arch_list and torch.cuda.device_count() == 0:
        arch_list = default_arch_list(torch)  # torch's build fails with no GPU and no list
        notes.append(f"no CUDA GPU to ask: building for TORCH_CUDA_ARCH_LIST={arch_list}")
    elif not arch_list:
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        if capabilities[0] >= divmod(round(MIN_ARCH * 10), 10):
            return None, notes
        arch_list = ";".join(f"{major}.{minor}" for major, minor in capabilities)
    kept, dropped = split_arch_list(arch_list)
    if dropped:
        notes.append(f"not building for {', '.join(dropped)}: the CUDA ops need compute capability {MIN_ARCH} or newer")
    return kept, notes


def split_arch_list(arch_list):
    """TORCH_CUDA_ARCH_LIST's entries that the kernels build for (joined by ";") and those older
    than MIN_ARCH, which would stop the build; an entry it cannot read is kept for torch to judge."""
    kept, dropped = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        number = re.fullmatch(r"(\d+\.\d+)a?(\+PTX)?", entry)
        oldest = float(number[1]) if number else ARCH_NAMES.get(entry.removesuffix("+PTX").lower())
        (dropped if oldest is not None and oldest < MIN_ARCH else kept).append(entry)
    return ";".join(kept), dropped


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
    if with_cuda:
        arch_list, notes = cuda_arch_list(torch, os.environ)
        for note in notes:
            say(note)
        if arch_list == "":
            with_cuda, why = False, f"no architecture of compute capability {MIN_ARCH} or newer to build for"
        elif arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
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
    return [ext], {"build_ext": with_build_advice(cpp_extension.BuildExtension.with_options(use_ninja=True))}


def with_build_advice(build_ext):
    """build_ext that, when the compiled ops fail to build, says what to do before the error ends
    the install (a package without them would hide the failure; one can be asked for by name)."""

    class BuildExtension(build_ext):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception:
                say("building the compiled ops (attrefine_fast._C) failed; the compiler's messages are above. Install a "
                    "C++ compiler with OpenMP (g++), or set ATTREFINE_NO_EXTENSION=1 to install the pure-PyTorch backend alone")
                raise

    return BuildExtension


def check_setuptools(version):
    """pyproject.toml's license is an SPDX expression, which setuptools reads from 77 on; a build
    without isolation uses the installed setuptools, whose own error would not say so."""
    major = re.match(r"\d+", version)
    if major is None or int(major[0]) < 77:
        say(f"setuptools {version} is too old to read pyproject.toml: pip install \"setuptools>=77\", then build again")
        sys.exit(1)


if __name__ == "__main__":  # as pip and setuptools run it; the tests import cuda_build
    import setuptools

    check_setuptools(setuptools.__version__)
    ext_modules, cmdclass = extensions()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
