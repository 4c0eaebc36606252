"""CPU tests of the perf suite's plumbing: the slow-down switch (perf/slowdown.py) and perf/conftest.py (skipped
ids in the run JSON, the timer, the baseline folder, per-id rounds) through a real pytest-benchmark run."""
import copy
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from perf import clock, gate, slowdown

ROOT = Path(__file__).resolve().parents[1]


def test_slowdown_switch(monkeypatch):
    monkeypatch.delenv(slowdown.SLOWDOWN_ENV, raising=False)
    assert slowdown.slowed_ops() == []
    monkeypatch.setenv(slowdown.SLOWDOWN_ENV, "based_decode, sliding_window_decode")
    assert slowdown.slowed_ops() == ["based_decode", "sliding_window_decode"]
    calls = []

    class FakeAk:
        def based_decode(self, *args):
            calls.append(("based_decode", args))
            return len(calls)

        def based_prefill(self, *args):
            calls.append(("based_prefill", args))

    slowed = slowdown.Slowed(FakeAk(), ["based_decode"])
    assert slowed.based_decode(1) == 2 and calls == [("based_decode", (1,))] * 2  # twice per call
    slowed.based_prefill(2)
    assert calls[2:] == [("based_prefill", (2,))]  # the others untouched
    with pytest.raises(ValueError, match="no op 'based_decod'"):
        slowdown.Slowed(FakeAk(), ["based_decod"])


# --------------------------------------------------------------------------------------------------
# perf/conftest.py: skipped ids in the run JSON, the baseline folder, per-id rounds, the timer
# --------------------------------------------------------------------------------------------------
def _perf_conftest():
    spec = importlib.util.spec_from_file_location("perf_conftest_under_test", ROOT / "perf" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAKE_SUITE = '''
import pytest

from perf import clock

ROUND_S = [3e-6, 1e-6, 2e-6, 5e-6, 4e-6]  # "device time" of each round: the first one is the warm-up


@pytest.mark.parametrize("impl", ["attn_kernels-B1", "fla_decoding-B1", "flash_attn-B1"])
def test_perf_fake(benchmark, impl):
    if impl.startswith("fla_"):
        pytest.skip("fla (fla-core) not available: `import fla.ops.attn.decoding` failed: "
                    "ModuleNotFoundError: No module named 'fla'")
    times = iter(ROUND_S)
    with clock.running() as device_clock:
        benchmark.pedantic(lambda: device_clock.advance(next(times)), rounds=4, warmup_rounds=1)
    clock.verify(benchmark, device_clock, 4, 1)  # as perf.measure does after every benchmark


def test_calibrating_benchmark_fails(benchmark):
    with pytest.raises(RuntimeError, match="outside a perf measurement"):
        benchmark(lambda: None)

@pytest.mark.skip(reason="flash_attn not installed: `import flash_attn` failed: "
                         "ModuleNotFoundError: No module named 'flash_attn'")
def test_perf_marked():
    pass
'''


def test_run_json_records_skipped_ids_in_fullname_format(tmp_path):
    """A real pytest-benchmark run with perf/conftest.py as a plugin: the JSON's `skipped` names tests exactly
    as pytest-benchmark names benchmarks (`fullname`, the node id relative to the rootdir), with reasons."""
    (tmp_path / "perf").mkdir()
    (tmp_path / "perf" / "test_perf_fake.py").write_text(FAKE_SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # rootdir = tmp_path
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "perf.conftest", "perf",
         f"--benchmark-json={out}", "--benchmark-disable-gc", "--benchmark-max-time=0.001"],
        cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(out.read_text())
    fullnames = {b["fullname"] for b in run["benchmarks"]}
    assert fullnames == {"perf/test_perf_fake.py::test_perf_fake[attn_kernels-B1]",
                         "perf/test_perf_fake.py::test_perf_fake[flash_attn-B1]"}
    # the timer is perf.clock's device clock (set by the conftest through --benchmark-timer): the stored
    # rounds are exactly the times the rounds advanced it by, the warm-up round left out
    for b in run["benchmarks"]:
        assert b["options"]["timer"] == "cuda_event_device_clock"
        assert b["stats"]["data"] == pytest.approx([1e-6, 2e-6, 5e-6, 4e-6], rel=1e-9, abs=0)
        assert b["stats"]["median"] == pytest.approx(3e-6)
    assert run["skipped"] == {
        "perf/test_perf_fake.py::test_perf_fake[fla_decoding-B1]":
            "fla (fla-core) not available: `import fla.ops.attn.decoding` failed: ModuleNotFoundError: "
            "No module named 'fla'",
        "perf/test_perf_fake.py::test_perf_marked":
            "flash_attn not installed: `import flash_attn` failed: ModuleNotFoundError: "
            "No module named 'flash_attn'",
    }
    # the gate excuses the skipped optional peer, and fails a baseline id that simply was not run
    base = copy.deepcopy(run)
    base["benchmarks"].append({"fullname": "perf/test_perf_fake.py::test_perf_fake[fla_decoding-B1]",
                               "stats": {"median": 1.0}})
    result = gate.compare(base, run)
    assert result.ok and list(result.excused) == ["perf/test_perf_fake.py::test_perf_fake[fla_decoding-B1]"]
    base["benchmarks"].append({"fullname": "perf/test_perf_fake.py::test_perf_fake[torch-B1]",
                               "stats": {"median": 1.0}})
    assert gate.compare(base, run).missing == ["perf/test_perf_fake.py::test_perf_fake[torch-B1]"]


class _Opt:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Config:
    def __init__(self, args=(), **options):
        self.option = _Opt(**options)
        self.invocation_params = _Opt(args=tuple(args))

    def getoption(self, name):
        return getattr(self.option, name)


def _configure(conftest, monkeypatch, baselines, args=(), **options):
    monkeypatch.setattr(conftest, "_cuda", lambda: True)
    monkeypatch.setattr(conftest.machine, "gpu_slug", lambda: "fake-gpu")
    monkeypatch.setattr(conftest.slowdown, "slowed_ops", lambda: [])
    monkeypatch.setattr(conftest, "BASELINES", baselines)
    options.setdefault("benchmark_timer", "time.perf_counter")  # what pytest-benchmark's default parses to
    config = _Config(args, benchmark_storage="file://./.benchmarks", **options)
    conftest.pytest_configure(config)
    return config


def test_the_suite_sets_the_timer_and_refuses_another(tmp_path, monkeypatch):
    """pytest-benchmark's public --benchmark-timer is pointed at perf.clock's device clock; a timer given on
    the command line (even pytest-benchmark's default, named explicitly) is a usage error."""
    conftest = _perf_conftest()
    config = _configure(conftest, monkeypatch, tmp_path, benchmark_compare=False, benchmark_compare_fail=None)
    assert config.option.benchmark_timer == clock.TIMER == "perf.clock.cuda_event_device_clock"
    config = _configure(conftest, monkeypatch, tmp_path, args=["perf", f"--benchmark-timer={clock.TIMER}"],
                        benchmark_timer=clock.TIMER, benchmark_compare=False, benchmark_compare_fail=None)
    assert config.option.benchmark_timer == clock.TIMER
    for args, given in ((["--benchmark-timer=time.perf_counter"], "time.perf_counter"),
                        (["--benchmark-timer", "time.process_time"], "time.process_time"),
                        ((), "time.process_time")):  # e.g. from PYTEST_ADDOPTS
        with pytest.raises(pytest.UsageError, match=r"--benchmark-timer=time\.\w+: the perf suite times"):
            conftest.pytest_configure(_Config(args, benchmark_storage="file://./.benchmarks",
                                              benchmark_timer=given, benchmark_compare=False))


def test_compare_finds_this_gpus_newest_baseline_in_its_folder(tmp_path, monkeypatch):
    """`pytest perf --benchmark-compare --benchmark-compare-fail=median:5%` with no other flag: conftest
    points the storage at perf/baselines/<gpu-slug>/ and pytest-benchmark's FileStorage, as it loads the
    comparison (during configure, with its per-platform machine id still set), finds the newest NNNN_*.json
    stored directly in that folder."""
    from pytest_benchmark.storage.file import FileStorage
    from pytest_benchmark.utils import get_machine_id

    conftest = _perf_conftest()
    baselines = tmp_path / "baselines"
    folder = baselines / "fake-gpu"
    folder.mkdir(parents=True)
    for name in ("0001_old.json", "0002_new.json", "notes.json"):
        (folder / name).write_text(json.dumps({"benchmarks": [], "machine_info": {"gpu_slug": "fake-gpu"},
                                               "name": name}))
    (baselines / "other-gpu").mkdir()
    (baselines / "other-gpu" / "0009_other.json").write_text(json.dumps({"benchmarks": []}))
    config = _configure(conftest, monkeypatch, baselines, benchmark_compare=True,
                        benchmark_compare_fail=["median:5%"])
    assert config.option.benchmark_storage == f"file://{folder}"
    storage = FileStorage(config.option.benchmark_storage[len("file://"):], logging.getLogger("t"),
                          default_machine_id=get_machine_id())
    newest = list(storage.load())[-1:]  # what BenchmarkSession.handle_loading does for --benchmark-compare
    assert [(str(path), data["name"]) for path, data in newest] == [("0002_new.json", "0002_new.json")]
    assert [str(p) for p, _ in storage.load("0001")] == ["0001_old.json"]  # --benchmark-compare=0001
    # saving goes directly into the folder too (conftest clears the machine id at session start)
    storage.default_machine_id = None
    assert storage._next_num == "0003" and storage.get("0003_x.json") == folder / "0003_x.json"


def test_compare_without_a_baseline_for_this_gpu_is_a_usage_error(tmp_path, monkeypatch):
    conftest = _perf_conftest()
    (tmp_path / "baselines" / "fake-gpu").mkdir(parents=True)
    with pytest.raises(pytest.UsageError, match=r"no baseline for GPU 'fake-gpu'.*nox -s perf_save -- NA"):
        _configure(conftest, monkeypatch, tmp_path / "baselines", benchmark_compare=True,
                   benchmark_compare_fail=["median:5%"])
    # without --benchmark-compare: runs (a first baseline is recorded this way)
    config = _configure(conftest, monkeypatch, tmp_path / "baselines", benchmark_compare=False,
                        benchmark_compare_fail=None)
    assert config.option.benchmark_storage == f"file://{tmp_path / 'baselines' / 'fake-gpu'}"


def test_noisy_benchmarks_get_more_rounds():
    conftest = _perf_conftest()
    gen = "perf/test_perf_based_generation.py::test_perf_based_generation[based-B128-H16-ctx2048-bf16]"
    pre = "perf/test_perf_based_prefill.py::test_perf_based_prefill[attn_kernels-norm-B16-H16-N1024-bf16]"
    other = "perf/test_perf_based_prefill.py::test_perf_based_prefill[attn_kernels-norm-B16-H16-N4096-bf16]"
    assert conftest.rounds_for(gen, 30, 3) == (200, 400)
    assert conftest.rounds_for(pre, 30, 3) == (200, 300)
    assert conftest.rounds_for(other, 30, 3) == (30, 3)
    assert conftest.rounds_for(gen, 500, 3) == (500, 400)  # never fewer than asked for
