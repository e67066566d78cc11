"""pytest-benchmark view of the benchmark suite: the same setup functions and providers as
``attrefine-fast bench``, one benchmark per (case, provider), grouped by case.

    python -m pytest benchmarks                           # the quick profile, on CUDA if present
    python -m pytest benchmarks --bench-profile full --bench-device cpu
    python -m pytest benchmarks --benchmark-disable       # run every provider once (a smoke check)

pytest-benchmark times one provider after another; ``attrefine-fast bench`` interleaves them,
which is fairer on a shared machine. The files are named bench_*.py so the default test run
(testpaths = tests) never collects them; this conftest collects them here.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from attrefine_fast.benchmarking.core import Provider, synchronize
from attrefine_fast.benchmarking.report import environment
from attrefine_fast.benchmarking.suite import SETUPS
from attrefine_fast.benchmarking.sweep import PROFILES, ROUNDS, specs_for


def pytest_addoption(parser):
    group = parser.getgroup("attrefine_fast benchmarks")
    group.addoption("--bench-profile", default="quick", choices=PROFILES, help="sizes to run (default: quick)")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    """Parametrize over (case spec, provider name), case-major, for the setups the module
    names in PROVIDERS (setup name -> the names of its providers)."""
    if "bench_spec" not in metafunc.fixturenames:
        return
    profile = metafunc.config.getoption("--bench-profile")
    device = _device(metafunc.config)
    providers = metafunc.module.PROVIDERS
    specs = [s for s in specs_for(profile, device.type) if s.setup in providers]
    pairs = [(spec, name) for spec in specs for name in providers[spec.setup]]
    metafunc.parametrize(("bench_spec", "provider_name"), pairs, ids=[f"{s.label}-{n}" for s, n in pairs])


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def bench_environment(bench_device) -> dict:
    return environment(bench_device)


_built: dict = {}


def timed_call(provider: Provider, device: torch.device, model_seconds: list):
    """The call pytest-benchmark times: the provider once, its queued GPU work included (without
    the synchronization a CUDA timing would cover the launches only), its model time appended to
    ``model_seconds`` when it has a stopwatch."""

    def call():
        if provider.stopwatch is not None:
            provider.stopwatch.reset()
        provider.fn()
        synchronize(device)
        if provider.stopwatch is not None:
            model_seconds.append(provider.stopwatch.seconds)

    return call


@pytest.fixture
def bench_case(bench_spec, bench_device):
    """The case of ``bench_spec``, built once and kept while its providers run (one case at a
    time, so memory holds one case's inputs)."""
    if bench_spec not in _built:
        _built.clear()
        _built[bench_spec] = SETUPS[bench_spec.setup](bench_device, **bench_spec.arguments())
    return _built[bench_spec]


@pytest.fixture
def measure(benchmark, bench_case, provider_name, bench_environment, pytestconfig):
    """Time one provider of the case with pytest-benchmark; a provider that cannot run here
    is skipped with its reason."""

    def run():
        names = [p.name for p in bench_case.providers]
        if provider_name not in names:
            pytest.skip(f"{bench_case.id} has no provider {provider_name}")
        provider = bench_case.provider(provider_name)
        if provider.fn is None:
            pytest.skip(provider.skipped)
        rounds = ROUNDS[pytestconfig.getoption("--bench-profile")]
        benchmark.group = bench_case.id
        benchmark.extra_info.update(
            params=bench_case.params, provider=provider.detail, device=bench_environment["gpu"] or bench_environment["cpu"],
            versions=bench_environment["versions"],
        )
        model_seconds = []  # per call, warm-up calls first
        call = timed_call(provider, bench_case.device, model_seconds)
        benchmark.pedantic(call, rounds=rounds.min_repeats, iterations=1, warmup_rounds=rounds.warmup)
        if model_seconds:
            # the median over the timed calls, as pytest-benchmark's own statistics (with
            # --benchmark-disable the one call made)
            benchmark.extra_info["model_seconds_per_call"] = statistics.median(model_seconds[rounds.warmup:] or model_seconds)

    return run
