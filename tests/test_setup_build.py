"""setup.py's choice of whether to build the CUDA ops, on stand-ins for torch and a CUDA toolkit,
and what the source distribution carries.

A wrong choice costs a user the whole install (torch's build raises on a toolkit of another major
version, on a machine with no GPU and no architecture list, on a toolkit without headers), so
each refusal must leave the CPU build standing and say what to set.
"""
import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("attrefine_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds nothing: setup() runs only as __main__
    return module


def fake_torch(cuda="13.0", gpus=0, arch_flags="sm_75 sm_80 sm_86 sm_90 sm_100 sm_120", capabilities=((9, 0),)):
    version = "2.12.1" + (f"+cu{cuda.replace('.', '')}" if cuda else "+cpu")
    c = SimpleNamespace(_cuda_getArchFlags=lambda: arch_flags) if arch_flags is not None else SimpleNamespace()
    device = SimpleNamespace(device_count=lambda: gpus, get_device_capability=lambda i: capabilities[i % len(capabilities)])
    return SimpleNamespace(__version__=version, version=SimpleNamespace(cuda=cuda), cuda=device, _C=c)


def fake_toolkit(root: Path, release="13.0", headers=True) -> str:
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.48"\n')
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return str(root)


def test_a_gpu_and_a_matching_toolkit_build_cuda(setup_py, tmp_path):
    build, why = setup_py.cuda_build(fake_torch(gpus=1), fake_toolkit(tmp_path), {})
    assert build and "toolkit 13.0" in why


def test_without_a_gpu_an_architecture_list_builds_cuda(setup_py, tmp_path):
    home = fake_toolkit(tmp_path)
    build, why = setup_py.cuda_build(fake_torch(gpus=0), home, {})
    assert not build and "TORCH_CUDA_ARCH_LIST" in why
    assert setup_py.cuda_build(fake_torch(gpus=0), home, {"TORCH_CUDA_ARCH_LIST": "9.0"})[0]


@pytest.mark.parametrize("torch_cuda, toolkit, headers, expected", [
    (None, "13.0", True, "built without CUDA"),
    ("12.8", "13.0", True, "point CUDA_HOME at a 12.x toolkit"),
    ("13.0", "13.0", False, "no CUDA headers in"),
])
def test_what_cannot_build_cuda_builds_the_cpu_ops_and_says_why(setup_py, tmp_path, torch_cuda, toolkit, headers, expected):
    home = fake_toolkit(tmp_path, toolkit, headers)
    build, why = setup_py.cuda_build(fake_torch(cuda=torch_cuda, gpus=1), home, {})
    assert not build and expected in why


def test_headers_under_the_toolkits_targets_count(setup_py, tmp_path):
    home = fake_toolkit(tmp_path, headers=False)  # as conda installs them
    (tmp_path / "targets" / "x86_64-linux" / "include").mkdir(parents=True)
    (tmp_path / "targets" / "x86_64-linux" / "include" / "cuda_runtime.h").write_text("")
    assert setup_py.cuda_build(fake_torch(gpus=1), home, {})[0]


def test_a_missing_or_silent_toolkit_is_named(setup_py, tmp_path):
    assert "set CUDA_HOME" in setup_py.cuda_build(fake_torch(gpus=1), None, {})[1]
    silent = tmp_path / "bin" / "nvcc"
    silent.parent.mkdir(parents=True)
    silent.write_text("#!/bin/sh\nexit 1\n")
    silent.chmod(0o755)
    assert "no working nvcc" in setup_py.cuda_build(fake_torch(gpus=1), str(tmp_path), {})[1]


def test_forcing_and_sanitizing_override_the_checks(setup_py):
    assert setup_py.cuda_build(fake_torch(gpus=0), None, {"ATTREFINE_FORCE_CUDA": "1"}) == (True, "ATTREFINE_FORCE_CUDA=1")
    # a CPU torch cannot build CUDA code, forced or not (its build would fail with a misleading CUDA_HOME error)
    build, why = setup_py.cuda_build(fake_torch(cuda=None), None, {"ATTREFINE_FORCE_CUDA": "1"})
    assert not build and "needs a torch built with CUDA" in why
    assert not setup_py.cuda_build(fake_torch(gpus=1), None, {"ATTREFINE_SANITIZE": "1", "ATTREFINE_FORCE_CUDA": "1"})[0]


def test_a_forced_build_without_a_gpu_targets_torchs_own_architectures(setup_py):
    assert setup_py.default_arch_list(fake_torch()) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert setup_py.default_arch_list(fake_torch(arch_flags="sm_90 sm_80 sm_90a")) == "8.0;9.0+PTX"
    assert setup_py.default_arch_list(fake_torch(arch_flags=None)) == "8.0;9.0+PTX"  # a CPU torch: no list of its own


def test_a_setuptools_too_old_for_the_license_field_is_named(setup_py, capsys):
    setup_py.check_setuptools("77.0.3")
    with pytest.raises(SystemExit):
        setup_py.check_setuptools("65.5.0")
    assert 'pip install "setuptools>=77"' in capsys.readouterr().err


def test_a_failed_build_of_the_compiled_ops_says_what_to_do(setup_py, capsys):
    class Failing:
        def build_extensions(self):
            raise RuntimeError("Error compiling objects for extension")

    with pytest.raises(RuntimeError, match="Error compiling"):
        setup_py.with_build_advice(Failing)().build_extensions()
    assert "ATTREFINE_NO_EXTENSION=1" in capsys.readouterr().err


def test_architectures_older_than_the_kernels_need_are_left_out(setup_py):
    # float64 atomicAdd needs compute capability 6.0: an older one stops the whole build
    assert setup_py.default_arch_list(fake_torch(arch_flags="sm_50 sm_60 sm_70 sm_80")) == "6.0;7.0;8.0+PTX"
    assert setup_py.split_arch_list("5.0;5.2 6.1;9.0a;Maxwell+PTX;Ampere;10.0+PTX") == ("6.1;9.0a;Ampere;10.0+PTX", ["5.0", "5.2", "Maxwell+PTX"])
    arch_list, notes = setup_py.cuda_arch_list(fake_torch(), {"TORCH_CUDA_ARCH_LIST": "5.2;8.0"})
    assert arch_list == "8.0" and "not building for 5.2" in notes[0]
    assert setup_py.cuda_arch_list(fake_torch(), {"TORCH_CUDA_ARCH_LIST": "Kepler+Tesla;5.2"})[0] == ""
    # visible GPUs: torch's own choice unless one of them is too old
    assert setup_py.cuda_arch_list(fake_torch(gpus=2, capabilities=((8, 0), (9, 0))), {}) == (None, [])
    assert setup_py.cuda_arch_list(fake_torch(gpus=2, capabilities=((5, 2), (8, 6))), {})[0] == "8.6"
    assert setup_py.cuda_arch_list(fake_torch(gpus=0), {})[0] == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_the_sdist_carries_every_file_a_clone_builds_and_tests_with(tmp_path):
    # setuptools alone would leave out the headers (the sdist then fails to build), the CUDA
    # sources and the tests' helpers: MANIFEST.in names them. Built from a copy of the checkout's
    # files, so that nothing is written into the checkout.
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])",
                    str(tmp_path / "dist")], cwd=src, check=True, capture_output=True, env={"ATTREFINE_NO_EXTENSION": "1"})
    with tarfile.open(next((tmp_path / "dist").glob("*.tar.gz"))) as sdist:
        carried = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = [name for name in files if name not in carried and name != ".gitignore"]
    assert not missing, f"not in the sdist: {missing}"
