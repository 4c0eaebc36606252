"""pytest configuration of the perf suite (pytest-benchmark). See perf/README.md.

* Without CUDA every perf test is skipped (collection imports only torch and pytest).
* Baselines: unless --benchmark-storage is given, storage is perf/baselines/<gpu-slug>/ and files are
  written directly there as NNNN_<name>.json (no per-Python-platform sub-folder).
* machine_info gets the GPU's name, slug, SM count, L2 size, driver / CUDA / torch versions.
* --benchmark-compare against a baseline recorded on another GPU model is a usage error.
* --perf-allow-missing-baseline: if this GPU has no baseline yet, drop --benchmark-compare(-fail)
  and say so, instead of failing (what `nox -s perf` wants on a new machine).
* ATTN_KERNELS_PERF_SLOWDOWN=op[,op]: attn_kernels runs those ops twice per call (timing.py), recorded
  as machine_info["perf_slowdown"]; the gate's proof that it catches a slowed build.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

PERF_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(PERF_DIR))  # `import timing` from the test modules

import timing  # noqa: E402

BASELINES = PERF_DIR / "baselines"
_DEFAULT_STORAGE = "file://./.benchmarks"
_NOTES: list[str] = []
_RESULTS: list[tuple[str, str, dict]] = []


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_addoption(parser):
    g = parser.getgroup("attn_kernels perf")
    g.addoption("--perf-rounds", type=int, default=30, help="timed rounds per benchmark (default 30)")
    g.addoption("--perf-warmup", type=int, default=3, help="untimed warm-up rounds (default 3)")
    g.addoption(
        "--perf-allow-missing-baseline", action="store_true", default=False,
        help="when this GPU has no stored baseline, run without --benchmark-compare/-compare-fail "
             "(and say so) instead of failing",
    )


def _baseline_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.json")) if folder.is_dir() else []


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark's own (trylast) pytest_configure builds its session, so the
    # storage / compare options set here are the ones it uses.
    if timing.slowed_ops():
        _NOTES.append(f"perf: {timing.SLOWDOWN_ENV}={','.join(timing.slowed_ops())}: attn_kernels ran those "
                      f"ops twice per call (a deliberately slowed build, for the gate's proof)")
    if not hasattr(config.option, "benchmark_storage"):
        return
    slug = timing.gpu_slug() if _cuda() else None
    if slug and config.option.benchmark_storage == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{BASELINES / slug}"
    if config.getoption("perf_allow_missing_baseline") and config.option.benchmark_compare:
        storage = config.option.benchmark_storage
        folder = Path(storage[len("file://"):]) if storage.startswith("file://") else None
        if folder is not None and not _baseline_files(folder):
            _NOTES.append(
                f"perf: no baseline for {slug or 'this machine'} in {folder}: ran WITHOUT comparison. "
                f"Record one with `nox -s perf_save`."
            )
            config.option.benchmark_compare = False
            config.option.benchmark_compare_fail = None
    try:  # every torch.compile'd peer compiles once per shape: keep dynamo from giving up on it
        import torch._dynamo.config as dc

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dc, name):
                setattr(dc, name, max(64, getattr(dc, name)))
    except Exception:
        pass


def pytest_sessionstart(session):
    # pytest-benchmark's FileStorage saves into <storage>/<python-platform-id>/; the baselines live
    # directly in perf/baselines/<gpu-slug>/ (loading already searches both).
    bs = getattr(session.config, "_benchmarksession", None)
    storage = getattr(bs, "storage", None)
    if (storage is not None and hasattr(storage, "default_machine_id")
            and str(storage.path).startswith(str(BASELINES))):
        storage.default_machine_id = None


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="perf suite needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(PERF_DIR):
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(timing.gpu_info())
    if timing.slowed_ops():  # marks a deliberately slowed run: perf/gate.py refuses it as a baseline
        machine_info["perf_slowdown"] = timing.slowed_ops()


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    ours = machine_info.get("gpu_slug")
    theirs = (compared_benchmark.get("machine_info") or {}).get("gpu_slug")
    if ours != theirs:
        raise pytest.UsageError(
            f"--benchmark-compare: the baseline was recorded on GPU {theirs!r} "
            f"({(compared_benchmark.get('machine_info') or {}).get('gpu_name')!r}), this machine is {ours!r} "
            f"({machine_info.get('gpu_name')!r}). Timings of different GPU models are not comparable: "
            f"compare against perf/baselines/{ours}/ or record a baseline for this GPU (nox -s perf_save)."
        )


@pytest.fixture(autouse=True)
def _perf_cuda_cleanup():
    """Give cached GPU memory (input sets, CUDA-graph pools) back when it grows past a third of the
    device; a full gc + empty_cache after every test cost ~0.3 s each (35 s per suite)."""
    yield
    if _cuda():
        import torch

        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        total = torch.cuda.get_device_properties(0).total_memory
        if torch.cuda.memory_reserved() > total / 3:
            gc.collect()
            torch.cuda.empty_cache()


@pytest.fixture
def perf_rounds(request) -> tuple[int, int]:
    return request.config.getoption("perf_rounds"), request.config.getoption("perf_warmup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.when != "call" or not rep.passed:
        return
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is not None and getattr(bench, "extra_info", None) and bench.stats is not None:
        _RESULTS.append((item.name, str(bench.stats.stats.median * 1e6), dict(bench.extra_info)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    if _RESULTS:
        tr.section("attn_kernels perf: median vs floor")
        tr.write_line(f"{'benchmark':<72} {'median us':>11} {'floor us':>9} {'% floor':>8}")
        for name, med, info in _RESULTS:
            pct = info.get("pct_of_floor")
            tr.write_line(
                f"{name:<72} {float(med):>11.2f} {info['floor_us']:>9.2f} "
                f"{(f'{pct:.1f}' if pct is not None else '-'):>8}"
            )
    for note in _NOTES:
        tr.write_line(note, yellow=True, bold=True)

