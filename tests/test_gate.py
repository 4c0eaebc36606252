"""CPU tests of the perf regression gate (perf/gate.py) on hand-made pytest-benchmark JSON
(tests/gate_fixtures.py describes the run against the baseline): regressions, thresholds from the noise file
and their cap, excused / missing / new / excluded ids, refusals, and the command line's exit codes and folders.
"""
import copy
import json
import shutil
from pathlib import Path

import pytest
from gate_fixtures import (BASELINE, DEC16, DEC32, FLA, NOISE, PREFILL, RUN, RUN_H100, SWA, SWA_FA, SWA_TORCH,
                           by_name, load)

from perf import gate

ROOT = Path(__file__).resolve().parents[1]

NOISE_H200 = ROOT / "perf" / "noise" / "nvidia-h200.json"


def test_regression_detected_with_baseline_new_threshold_ratio():
    result = gate.compare(load(BASELINE), load(RUN), load(NOISE))
    assert {c.name for c in result.regressions} == {DEC32, PREFILL, SWA}
    swa = by_name(result)[SWA]
    assert (swa.baseline_s, swa.new_s, swa.threshold, swa.source) == (
        pytest.approx(8e-6), pytest.approx(16e-6), gate.MIN_THRESHOLD, "noise")
    assert swa.ratio == pytest.approx(2.0)
    assert not result.ok
    report = gate.format_report(result)
    line = next(ln for ln in report.splitlines() if ln.endswith(SWA))
    assert line.split()[:4] == ["8.000", "16.000", "3.0%", "2.000"]
    assert "FAIL (3 regressed): 3 regressed" in report


def test_improvement_not_flagged():
    c = by_name(gate.compare(load(BASELINE), load(RUN), load(NOISE)))[SWA_TORCH]
    assert c.ratio == pytest.approx(0.7) and not c.regressed


FLA_NOT_INSTALLED = ("fla (fla-core) not available: `import fla.ops.linear_attn` failed: "
                     "ModuleNotFoundError: No module named 'fla'")


def _unchanged_run():
    """The baseline itself as a run, with fla skipped as not installed (what a box without fla-core gives)."""
    run = load(BASELINE)
    run["benchmarks"] = [b for b in run["benchmarks"] if b["fullname"] != FLA]
    run["skipped"] = {FLA: FLA_NOT_INSTALLED}
    return run


def test_new_benchmarks_reported_missing_optional_peer_excused():
    result = gate.compare(load(BASELINE), load(RUN), load(NOISE))
    assert result.new == [SWA_FA] and result.missing == [] and result.excused == {FLA: FLA_NOT_INSTALLED}
    report = gate.format_report(result)
    assert f"new (not in the baseline, not gated): 1\n    {SWA_FA}" in report
    assert f"missing, excused (optional peer not installed): 1\n    {FLA}  -- {FLA_NOT_INSTALLED}" in report
    # the report lists what the run skipped, with the reasons
    assert f"skipped in this run: 1\n    {FLA}  -- {FLA_NOT_INSTALLED}" in report
    assert gate.compare(load(BASELINE), _unchanged_run(), load(NOISE)).ok


def test_drifted_rounds_reported_never_failing():
    """A run benchmark whose first third of timed rounds is > 3 % off its last third is listed (the stored
    H100 0003 rounds of one id: 1218 us for 19 rounds, then 1002), never a failure; steady or short ones are
    not."""
    assert gate.rounds_drift([2.0] * 6 + [1.0] * 6) == 2.0
    assert gate.rounds_drift([1.0, 5.0, 1.0] * 4) == 1.0
    assert gate.rounds_drift([1.0] * (gate.DRIFT_MIN_ROUNDS - 1)) is None and gate.rounds_drift(None) is None
    run = _unchanged_run()
    rounds = {DEC32: [1218e-6] * 19 + [1002e-6] * 11, DEC16: [1e-5, 1.02e-5] * 15, PREFILL: [9e-5, 5e-5] * 4}
    for b in run["benchmarks"]:
        if b["fullname"] in rounds:
            b["stats"]["data"] = rounds[b["fullname"]]
    result = gate.compare(load(BASELINE), run, load(NOISE))
    assert result.drifted == {DEC32: pytest.approx(1218 / 1002)} and result.ok
    report = gate.format_report(result)
    assert f"rounds drifted (first / last third of the timed rounds beyond 3%; the median may not be the " \
           f"steady speed): 1\n    1.216  {DEC32}" in report
    assert "drifted" not in gate.format_report(gate.compare(load(BASELINE), load(RUN), load(NOISE)))


def test_missing_baseline_benchmark_fails():
    run = _unchanged_run()
    run["benchmarks"] = [b for b in run["benchmarks"] if b["fullname"] != SWA_TORCH]
    result = gate.compare(load(BASELINE), run, load(NOISE))
    assert result.missing == [SWA_TORCH] and not result.regressions and not result.ok
    report = gate.format_report(result)
    assert f"MISSING from this run (in the baseline; not excused): 1\n    {SWA_TORCH}  -- not run" in report
    assert "FAIL (1 baseline benchmark(s) missing from the run)" in report
    # fla not recorded as skipped (e.g. a -k selection): missing, a failure
    run = _unchanged_run()
    del run["skipped"]
    assert gate.compare(load(BASELINE), run, load(NOISE)).missing == [FLA]


@pytest.mark.parametrize("name,reason,excused", [
    (FLA, FLA_NOT_INSTALLED, True),
    (SWA_FA, "flash_attn not installed (fa2_window is torch's FA2): `import flash_attn` failed: "
             "ModuleNotFoundError: No module named 'flash_attn'", True),
    # installed but broken, or a dependency of it missing: not "not installed"
    (FLA, "fla (fla-core) not available: `import fla.ops.linear_attn` failed: ImportError: cannot import "
          "name 'x' from 'triton'", False),
    (FLA, "fla (fla-core) not available: `import fla.ops.linear_attn` failed: ModuleNotFoundError: No "
          "module named 'einops'", False),
    (FLA, "fla_fused_recurrent: failed on this machine: RuntimeError: out of resources", False),
    # not an optional peer: never excused, whatever the reason says
    (SWA_TORCH, "torch: `import torch` failed: ModuleNotFoundError: No module named 'torch'", False),
    (DEC32, "attn_kernels not importable: `import attn_kernels` failed: ModuleNotFoundError: No module "
            "named 'attn_kernels'", False),
    (DEC32, "attn_kernels CUDA extension not built (None): run `nox -s build` first", False),
])
def test_only_a_not_installed_optional_peer_is_excused(name, reason, excused):
    assert gate.not_installed_excuse(name, reason) is excused
    assert gate.is_ours(DEC32) and gate.is_ours(
        "perf/test_perf_based_generation.py::test_perf_based_generation[based_state_bf16-B128-H16-ctx2048-bf16]")
    base = load(BASELINE)
    run = copy.deepcopy(base)
    run["benchmarks"] = [b for b in run["benchmarks"] if b["fullname"] != name]
    run["skipped"] = {name: reason}
    if name not in gate.medians(base):  # SWA_FA: put it in the baseline
        base["benchmarks"].append({"fullname": name, "stats": {"median": 1e-5}})
    result = gate.compare(base, run, load(NOISE))
    assert (result.missing == [], result.ok) == ((True, True) if excused else (False, False))


def test_empty_run_fails(tmp_path, capsys):
    run = load(RUN)
    run["benchmarks"] = []
    result = gate.compare(load(BASELINE), run, load(NOISE))
    assert result.empty and not result.ok
    assert "EMPTY RUN" in gate.format_report(result)
    (tmp_path / "empty-list.json").write_text(json.dumps(run))
    empty_list = str(tmp_path / "empty-list.json")
    assert gate.main(["--baseline", str(BASELINE), "--run", empty_list]) == gate.EXIT_FAIL
    # no GPU: the suite skipped, pytest-benchmark left the JSON file empty
    (tmp_path / "empty.json").write_text("")
    capsys.readouterr()
    assert gate.main(["--baseline", str(BASELINE), "--run", str(tmp_path / "empty.json")]) == gate.EXIT_FAIL
    assert "is empty: no benchmark ran" in capsys.readouterr().err
    # an empty run among good ones still fails
    (tmp_path / "same.json").write_text(json.dumps(_unchanged_run()))
    assert gate.main(["--baseline", str(BASELINE), "--noise", str(NOISE),
                      "--run", str(tmp_path / "same.json"), str(tmp_path / "empty.json")]) == gate.EXIT_FAIL


def test_thresholds_from_noise_file():
    limits = gate.thresholds(load(NOISE), [DEC32, DEC16, PREFILL, SWA_TORCH, SWA_FA])
    assert limits[DEC32] == (gate.MAX_THRESHOLD, "capped", pytest.approx(0.15))  # 3 x 5% spread > the cap
    assert limits[DEC16] == (gate.MIN_THRESHOLD, "noise", None)  # 3 x 0.8% < 3%
    assert limits[PREFILL] == (gate.MIN_THRESHOLD, "noise", None)
    assert limits[SWA_TORCH] == (gate.DEFAULT_THRESHOLD, "default", None)  # a single median has no spread
    assert limits[SWA_FA] == (gate.DEFAULT_THRESHOLD, "default", None)  # no entry
    # +12% fails under the 10% cap (its noise would have allowed 15%); +5% fails under the measured 3%
    c = by_name(gate.compare(load(BASELINE), load(RUN), load(NOISE)))
    assert c[DEC32].regressed and c[PREFILL].regressed
    report = gate.format_report(gate.compare(load(BASELINE), load(RUN), load(NOISE)))
    assert f"10.0%^   1.120  {DEC32}" in report
    capped = "gated at the 10% cap, their noise would need more (measure them more stably): 1"
    assert f"{capped}\n    15.0%  {DEC32}" in report


def test_thresholds_are_capped_at_ten_percent():
    assert gate.MAX_THRESHOLD == 0.10 and gate.DEFAULT_THRESHOLD <= gate.MAX_THRESHOLD
    noise = load(NOISE)
    noise["benchmarks"][DEC32]["spread"] = 1.0  # 300% wanted
    assert gate.thresholds(noise, [DEC32])[DEC32][:2] == (gate.MAX_THRESHOLD, "capped")
    # a uniform +11% fails every compared benchmark, whatever its noise
    run = _unchanged_run()
    for b in run["benchmarks"]:
        b["stats"]["median"] *= 1.11
    result = gate.compare(load(BASELINE), run, noise)
    assert len(result.regressions) == len(result.compared) == 5
    # a default above the cap is refused, in the API and on the command line
    with pytest.raises(gate.GateRefused, match="above the cap"):
        gate.compare(load(BASELINE), load(RUN), default_threshold=0.2)
    with pytest.raises(SystemExit):
        gate.main(["--baseline", str(BASELINE), "--run", str(RUN), "--default-threshold", "0.2"])


def test_excluded_peer_reported_not_gated():
    noise = load(NOISE)
    noise["excluded"] = {SWA_TORCH: "host-bound peer: spread 40% over 10 runs", FLA: "between-machine drift"}
    run = _unchanged_run()
    for b in run["benchmarks"]:
        if b["fullname"] == SWA_TORCH:
            b["stats"]["median"] *= 3  # would regress if it were gated
    result = gate.compare(load(BASELINE), run, noise)
    assert result.ok and SWA_TORCH not in by_name(result)
    assert result.excluded == noise["excluded"]  # FLA: missing from the run, excluded, not excused
    report = gate.format_report(result)
    assert (f"excluded (reviewed list in the noise file; reported, not gated): 2\n"
            f"    {FLA}  -- between-machine drift\n    {SWA_TORCH}  -- host-bound peer: spread 40%") in report


@pytest.mark.parametrize("ours", [DEC32, SWA, PREFILL, "perf/test_perf_based_generation.py::"
                                  "test_perf_based_generation[based-B128-H16-ctx2048-bf16]"])
def test_an_attn_kernels_id_can_never_be_excluded(ours, tmp_path, capsys):
    noise = load(NOISE)
    noise["excluded"] = {ours: "too noisy"}
    with pytest.raises(gate.GateRefused, match="our own ids are always gated"):
        gate.compare(load(BASELINE), load(RUN), noise)
    (tmp_path / "nvidia-h200.json").write_text(json.dumps(noise))
    assert gate.main(["--baseline", str(BASELINE), "--noise", str(tmp_path / "nvidia-h200.json"),
                      "--run", str(RUN)]) == gate.EXIT_REFUSED
    assert "attn_kernels" in capsys.readouterr().err


def test_an_exclusion_needs_a_reason():
    noise = load(NOISE)
    noise["excluded"] = {SWA_TORCH: " "}
    with pytest.raises(gate.GateRefused, match="without a reason"):
        gate.compare(load(BASELINE), load(RUN), noise)


def test_committed_noise_file_excludes_exactly_the_peers_over_the_cap():
    """Every benchmark of the committed H200 noise file whose 3 x spread exceeds the cap is an excluded peer
    (with its reason) or one of ours (gated at the cap, never excluded); nothing else is excluded."""
    noise = load(NOISE_H200)
    over = {n for n, e in noise["benchmarks"].items()
            if e.get("spread") is not None and gate.NOISE_FACTOR * e["spread"] > gate.MAX_THRESHOLD}
    excluded = gate.excluded_of(noise)  # refuses ours / blank reasons
    assert set(excluded) == {n for n in over if not gate.is_ours(n)}
    # perf/README.md, "Session h200-2026-12-07-a", says why these five of ours are over the cap
    assert {n.split("::")[1] for n in over if gate.is_ours(n)} == {
        "test_perf_based_prefill[attn_kernels-norm-B16-H16-N4096-bf16]",
        "test_perf_based_prefill[attn_kernels-norm-B16-H16-N16384-bf16]",
        "test_perf_sliding_window_decode[attn_kernels-B1-H16-W64-e64-bf16]",
        "test_perf_sliding_window_prefill[attn_kernels-B4-H16-N32768-W256-e64-bf16]",
        "test_perf_sliding_window_prefill[attn_kernels-B64-H16-N2048-W64-e64-bf16]"}
    for name, why in excluded.items():  # each reason states the measured spread
        assert f"measured spread {noise['benchmarks'][name]['spread']:.1%}" in why, name


def test_default_threshold_without_noise_file():
    result = gate.compare(load(BASELINE), load(RUN))
    assert all((c.threshold, c.source) == (gate.DEFAULT_THRESHOLD, "default") for c in result.compared)
    # now +12% exceeds the 10% default and +5% is within it
    assert {c.name for c in result.regressions} == {DEC32, SWA}
    tight = gate.compare(load(BASELINE), load(RUN), default_threshold=0.04)
    assert {c.name for c in tight.regressions} == {DEC32, PREFILL, SWA}


def test_different_gpu_refused(capsys):
    with pytest.raises(gate.GateRefused, match="'nvidia-h200'.*'nvidia-h100-80gb-hbm3'"):
        gate.compare(load(BASELINE), load(RUN_H100))
    assert gate.main(["--baseline", str(BASELINE), "--run", str(RUN_H100)]) == gate.EXIT_REFUSED
    assert "not comparable" in capsys.readouterr().err


def test_noise_file_of_other_gpu_refused():
    noise = load(NOISE)
    noise["gpu_slug"] = "nvidia-h100-80gb-hbm3"
    with pytest.raises(gate.GateRefused, match="noise file"):
        gate.compare(load(BASELINE), load(RUN), noise)


def test_slowed_baseline_refused_slowed_run_named():
    base = load(BASELINE)
    base["machine_info"]["perf_slowdown"] = ["based_decode"]
    with pytest.raises(gate.GateRefused, match="ATTN_KERNELS_PERF_SLOWDOWN=based_decode"):
        gate.compare(base, load(RUN))
    # a slowed run is compared, and the report says it was slowed
    run = load(RUN)
    run["machine_info"]["perf_slowdown"] = ["based_decode"]
    report = gate.format_report(gate.compare(load(BASELINE), run))
    assert "slowed on purpose: ATTN_KERNELS_PERF_SLOWDOWN=based_decode" in report


def test_cli_exit_codes_and_folders(tmp_path, capsys):
    args = ["--baseline", str(BASELINE), "--noise", str(NOISE)]
    assert gate.main(args + ["--run", str(RUN)]) == gate.EXIT_REGRESSION
    (tmp_path / "same.json").write_text(json.dumps(_unchanged_run()))
    assert gate.main(args + ["--run", str(tmp_path / "same.json")]) == gate.EXIT_OK
    # several runs: fails if any regressed
    assert gate.main(args + ["--run", str(tmp_path / "same.json"), str(RUN)]) == gate.EXIT_REGRESSION
    # folders: perf/baselines/<slug>/ newest file, perf/noise/<slug>.json when present
    bdir, ndir = tmp_path / "baselines", tmp_path / "noise"  # the noise folder does not exist yet
    (bdir / "nvidia-h200").mkdir(parents=True)
    (bdir / "nvidia-h200" / "0001_old.json").write_text(json.dumps(load(RUN)))  # older: would pass
    shutil.copy(BASELINE, bdir / "nvidia-h200" / "0002_new.json")
    capsys.readouterr()
    folders = ["--baseline", str(bdir), "--noise", str(ndir), "--run"]
    assert gate.main(folders + [str(RUN)]) == gate.EXIT_REGRESSION
    out = capsys.readouterr().out
    assert "0002_new.json" in out and "no noise file" in out  # default thresholds: DEC32 regressed
    assert DEC32 in out.split("REGRESSED")[1].split("faster")[0]
    assert gate.main(folders + [str(tmp_path / "same.json")]) == gate.EXIT_OK
    ndir.mkdir()
    shutil.copy(NOISE, ndir / "nvidia-h200.json")
    assert gate.main(folders + [str(RUN)]) == gate.EXIT_REGRESSION
    assert f"from {ndir / 'nvidia-h200.json'}" in capsys.readouterr().out
    # an explicit noise file that is not there is an error, not a silent fall-back to the default
    assert gate.main(["--baseline", str(BASELINE), "--noise", str(tmp_path / "typo.json"),
                      "--run", str(RUN)]) == gate.EXIT_REFUSED


def test_no_baseline_for_this_gpu_fails_naming_perf_save(tmp_path, capsys):
    bdir = tmp_path / "baselines"
    (bdir / "nvidia-h200").mkdir(parents=True)
    shutil.copy(BASELINE, bdir / "nvidia-h200" / "0001_h200.json")
    capsys.readouterr()
    assert gate.main(["--baseline", str(bdir), "--run", str(RUN_H100)]) == gate.EXIT_FAIL
    err = capsys.readouterr().err
    assert "no baseline for GPU 'nvidia-h100-80gb-hbm3'" in err and "NOT gated" in err
    assert "nox -s perf_save -- NAME" in err and "candidate baseline" in err and str(RUN_H100) in err
    # the pass that used to exist is gone
    with pytest.raises(SystemExit):
        gate.main(["--baseline", str(bdir), "--run", str(RUN_H100), "--allow-missing-baseline"])
    (bdir / "nvidia-h100-80gb-hbm3").mkdir()  # a folder without a NNNN_*.json baseline is no baseline
    assert gate.main(["--baseline", str(bdir), "--run", str(RUN_H100)]) == gate.EXIT_FAIL
