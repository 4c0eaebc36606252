"""pytest configuration of the perf suite (pytest-benchmark). See perf/README.md.

* Without CUDA every perf test is skipped (collection imports only torch and pytest).
* Baselines: unless --benchmark-storage is given, storage is perf/baselines/<gpu-slug>/ and files are
  written directly there as NNNN_<name>.json (no per-Python-platform sub-folder).
* machine_info gets the GPU's name, slug, SM count, L2 size, driver / CUDA / torch versions.
* --benchmark-compare against a baseline recorded on another GPU model is a usage error.
* --benchmark-compare with no baseline stored for this GPU is a usage error at once (naming
  `nox -s perf_save -- NAME`), not a warning and a run that compares nothing.
* The run JSON (--benchmark-json / --benchmark-save) records every skipped perf test with its reason,
  ``"skipped": {fullname: reason}``: perf/gate.py excuses a baseline benchmark missing from the run only
  when it is an optional peer skipped because its package is not installed.
* A few benchmarks whose noise needs more than the gate's 10% cap get more warm-up and timed rounds
  (STABLE_ROUNDS, through the perf_rounds fixture).
* The timer: pytest-benchmark's ``--benchmark-timer`` is set to perf.clock.cuda_event_device_clock, a clock
  that advances only by the CUDA-event time measured inside each round (perf/clock.py). Another
  --benchmark-timer given on the command line is a usage error: the suite times device work, not host time.
* ATTN_KERNELS_PERF_SLOWDOWN=op[,op]: attn_kernels runs those ops twice per call (perf/slowdown.py),
  recorded as machine_info["perf_slowdown"]; the gate's proof that it catches a slowed build.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest

from perf import clock, machine, slowdown

PERF_DIR = Path(__file__).resolve().parent
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


def _baseline_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.json")) if folder.is_dir() else []


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before pytest-benchmark's own (trylast) pytest_configure builds its session, so the
    # storage / compare options set here are the ones it uses.
    if slowdown.slowed_ops():
        _NOTES.append(f"perf: {slowdown.SLOWDOWN_ENV}={','.join(slowdown.slowed_ops())}: attn_kernels ran "
                      f"those ops twice per call (a deliberately slowed build, for the gate's proof)")
    if not hasattr(config.option, "benchmark_storage"):
        return
    _use_device_clock(config)
    slug = machine.gpu_slug() if _cuda() else None
    if slug and config.option.benchmark_storage == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{BASELINES / slug}"
    if slug and config.option.benchmark_compare:
        # pytest-benchmark would only warn ("Can't compare") and run the whole suite comparing nothing
        storage = config.option.benchmark_storage
        folder = Path(storage[len("file://"):]) if storage.startswith("file://") else None
        if folder is not None and not _baseline_files(folder):
            raise pytest.UsageError(
                f"--benchmark-compare: no baseline for GPU {slug!r} in {folder}. Record one on this GPU "
                f"model with `nox -s perf_save -- NAME` and commit it (or review a run's --benchmark-json "
                f"and commit it there as 0001_NAME.json)."
            )
    try:  # every torch.compile'd peer compiles once per shape: keep dynamo from giving up on it
        import torch._dynamo.config as dc

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dc, name):
                setattr(dc, name, max(64, getattr(dc, name)))
    except Exception:
        pass


def _use_device_clock(config) -> None:
    """Make perf.clock's device clock pytest-benchmark's timer (its public --benchmark-timer option, read
    when its own pytest_configure builds the session, after this one). A timer given on the command line
    is refused: every number the suite stores must be device time."""
    from pytest_benchmark.timers import default_timer
    from pytest_benchmark.utils import NameWrapper

    given = config.option.benchmark_timer
    args = getattr(getattr(config, "invocation_params", None), "args", ())
    explicit = any(str(a).startswith("--benchmark-timer") for a in args)
    if given != clock.TIMER and (explicit or given != str(NameWrapper(default_timer))):
        raise pytest.UsageError(
            f"--benchmark-timer={given}: the perf suite times device work with CUDA events and sets the "
            f"timer itself ({clock.TIMER}; perf/README.md, \"What is timed, and how\"): leave it out."
        )
    config.option.benchmark_timer = clock.TIMER


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
    machine_info.update(machine.gpu_info())
    if slowdown.slowed_ops():  # marks a deliberately slowed run: perf/gate.py refuses it as a baseline
        machine_info["perf_slowdown"] = slowdown.slowed_ops()


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


# Benchmarks whose measured noise needs more than the gate's 10% cap (perf/README.md, "Measured noise"):
# substring of the test id -> (timed rounds, warm-up rounds), the larger of these and the command line's.
# - based_generation's Based step: bimodal at ctx 2048 (56.3 or 60.2 us, one mode per run), the first test
#   of its module; the same kernels on same-sized inputs are stable at ctx 8192 and in the next test (bf16
#   state). A round is one 4-step graph replay (~0.23 ms) and the default 3 warm-up rounds are < 1 ms of
#   device time after the module's set-up, so the timed rounds can start before the GPU has settled (clocks
#   after the idle gap, first use of freshly allocated sets). 400 warm-up rounds (~90 ms busy) and 200 timed
#   rounds cost ~0.2 s per id.
# - the shortest prefill (N = 1024, ~60 us per call, 5 calls per round): 3 runs spread 4.3%; more rounds
#   average over more calls and placements.
# Needs a device run to confirm (noise re-measured with python -m perf.noise_study --retire).
STABLE_ROUNDS = {
    "test_perf_based_generation[based-": (200, 400),
    "test_perf_based_generation[based_state_bf16-": (200, 400),
    "test_perf_based_prefill[attn_kernels-norm-B16-H16-N1024-": (200, 300),
    "test_perf_based_prefill[attn_kernels-num-B16-H16-N1024-": (200, 300),
}


def rounds_for(nodeid: str, rounds: int, warmup: int) -> tuple[int, int]:
    """(timed rounds, warm-up rounds) of one benchmark: STABLE_ROUNDS raises them for the ids it names."""
    for key, (r, w) in STABLE_ROUNDS.items():
        if key in nodeid:
            return max(rounds, r), max(warmup, w)
    return rounds, warmup


@pytest.fixture
def perf_rounds(request) -> tuple[int, int]:
    return rounds_for(request.node.nodeid, request.config.getoption("perf_rounds"),
                      request.config.getoption("perf_warmup"))


_SKIPPED: dict[str, str] = {}  # nodeid (= pytest-benchmark's fullname) -> skip reason


def skip_reason(report) -> str:
    """The reason of a skipped test report ("Skipped: " prefix dropped)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED[report.nodeid] = skip_reason(report)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Record what was skipped and why; perf/gate.py excuses a missing optional peer only from this."""
    ran = {b.get("fullname") for b in output_json.get("benchmarks", [])}
    output_json["skipped"] = {name: why for name, why in sorted(_SKIPPED.items()) if name not in ran}


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

