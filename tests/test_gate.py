"""CPU tests of the perf regression gate (perf/gate.py), the noise file (perf/noise_study.py) on hand-made
pytest-benchmark JSON in tests/fixtures/gate_*.json, the perf suite's slow-down switch (perf/slowdown.py) and
its conftest (perf/conftest.py: storage, skipped ids, rounds, the timer).

The run against the baseline: decode fp32 +12% (noise spread 5%: 15% wanted, capped at 10%), decode bf16
+1%, prefill +5% (spread 0.4%: threshold 3%), sliding-window attn_kernels 2x, sliding-window torch 30% faster
(one noise median only: default threshold), fla decode only in the baseline (the run records it as skipped:
fla not installed), flash_attn only in the run.
"""
import copy
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perf import clock, gate, noise_study, slowdown

ROOT = Path(__file__).resolve().parents[1]

NOISE_H200 = ROOT / "perf" / "noise" / "nvidia-h200.json"

FIX = Path(__file__).resolve().parent / "fixtures"
BASELINE, RUN, RUN_H100, NOISE = (FIX / f"gate_{n}.json" for n in ("baseline_h200", "run_h200", "run_h100",
                                                                   "noise_h200"))
DECODE = "perf/test_perf_based_decode.py::test_perf_based_decode[{}-B64-H16-bf16]"
SWA_ID = "perf/test_perf_sliding_window_decode.py::test_perf_sliding_window_decode[{}-B256-H16-W64-e64-bf16]"
DEC32, DEC16, FLA = (DECODE.format(i) for i in ("attn_kernels-state_fp32", "attn_kernels-state_bf16",
                                                "fla_fused_recurrent-state_fp32"))
PREFILL = "perf/test_perf_based_prefill.py::test_perf_based_prefill[attn_kernels-norm-B16-H16-N4096-bf16]"
SWA, SWA_TORCH, SWA_FA = (SWA_ID.format(i) for i in ("attn_kernels", "torch", "flash_attn"))


def load(path):
    return json.loads(path.read_text())


def by_name(result):
    return {c.name: c for c in result.compared}


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
    assert {n.split("::")[1] for n in over if gate.is_ours(n)} == {
        "test_perf_based_generation[based-B128-H16-ctx2048-bf16]",
        "test_perf_based_prefill[attn_kernels-norm-B16-H16-N1024-bf16]"}
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


def test_noise_study_merges_sessions_and_feeds_the_gate(tmp_path):
    out = tmp_path / "nvidia-h200.json"
    assert noise_study.main(["--from-json", str(BASELINE), str(RUN), "--out", str(out)]) == 0
    study = load(out)
    assert study["gpu_slug"] == "nvidia-h200" and [s["label"] for s in study["sessions"]] == ["session-1"]
    e = study["benchmarks"][DEC32]
    assert e["medians_s"] == {"session-1": pytest.approx([10e-6, 11.2e-6])} and e["n"] == 2
    assert e["spread"] == pytest.approx(0.12)
    assert study["benchmarks"][FLA]["n"] == 1 and study["benchmarks"][FLA]["spread"] is None
    with pytest.raises(SystemExit, match="--append"):
        noise_study.main(["--from-json", str(RUN), "--out", str(out)])
    assert noise_study.main(["--from-json", str(BASELINE), "--out", str(out), "--append"]) == 0
    study = load(out)
    assert [s["label"] for s in study["sessions"]] == ["session-1", "session-2"]
    e = study["benchmarks"][DEC32]
    assert e["n"] == 3 and e["spread"] == pytest.approx(0.12)
    assert e["spread_within_session"] == pytest.approx(0.12)
    # continuing a named session
    assert noise_study.main(["--from-json", str(RUN), "--out", str(out), "--append",
                             "--session", "session-2"]) == 0
    assert load(out)["benchmarks"][DEC32]["medians_s"]["session-2"] == pytest.approx([10e-6, 11.2e-6])
    with pytest.raises(SystemExit, match="cannot join"):
        noise_study.main(["--from-json", str(RUN_H100), "--out", str(out), "--append"])
    # the gate reads it: DEC32's 12% spread -> 36% wanted
    limits = gate.thresholds(load(out), [DEC32])
    assert limits[DEC32] == (gate.MAX_THRESHOLD, "capped", pytest.approx(0.36))  # 36% wanted, capped
    # --append keeps the reviewed exclusions of the file
    study = load(out)
    study["excluded"] = {SWA_TORCH: "host-bound"}
    out.write_text(json.dumps(study))
    assert noise_study.main(["--from-json", str(RUN), "--out", str(out), "--append"]) == 0
    assert load(out)["excluded"] == {SWA_TORCH: "host-bound"}


def test_noise_study_retire_drops_a_changed_kernels_old_noise(tmp_path):
    out = tmp_path / "nvidia-h200.json"
    assert noise_study.main(["--from-json", str(BASELINE), str(RUN), "--out", str(out)]) == 0
    with pytest.raises(SystemExit):  # editing needs --append
        noise_study.main(["--from-json", str(BASELINE), "--out", str(out), "--retire", "state_fp32"])
    assert noise_study.main(["--from-json", str(BASELINE), "--out", str(out), "--append",
                             "--retire", "attn_kernels-state_fp32"]) == 0
    study = load(out)
    # the retired benchmark keeps only the new session's median; the others keep every session's
    assert study["benchmarks"][DEC32]["medians_s"] == {"session-2": [pytest.approx(10e-6)]}
    assert study["benchmarks"][DEC32]["n"] == 1 and study["benchmarks"][DEC32]["spread"] is None
    assert set(study["benchmarks"][DEC16]["medians_s"]) == {"session-1", "session-2"}
    assert study["sessions"][1]["retired"] == ["attn_kernels-state_fp32"]
    # so the gate falls back to its default for it until the new code's noise is measured
    assert gate.thresholds(study, [DEC32])[DEC32][1] != "noise"


def test_held_out_check_gates_each_repetition_with_the_others_noise(tmp_path, capsys):
    # one session: the baseline's own run, a rerun 1% slower everywhere, and RUN (DEC32 +12%, SWA 2x, ...)
    near = load(BASELINE)
    for b in near["benchmarks"]:
        b["stats"]["median"] *= 1.01
    (tmp_path / "near.json").write_text(json.dumps(near))
    out = tmp_path / "noise.json"
    assert noise_study.main(["--from-json", str(BASELINE), str(tmp_path / "near.json"), str(RUN),
                             "--out", str(out)]) == 0
    results = noise_study.held_out(load(out), load(BASELINE))
    # the baseline's own run is not gated against itself
    assert [(label, k) for label, k, _ in results] == [("session-1", 2), ("session-1", 3)]
    near_result, run_result = results[0][2], results[1][2]
    # the 1% rerun: RUN's noise widens every threshold it shares -> passes
    assert not near_result.regressions  # (held-out checks regressions; FLA, not in every run, is left out)
    # RUN against the noise of the two others (1% apart: 3% floor): its +12% and 2x are regressions
    regressed = {c.name for c in run_result.regressions}
    assert {DEC32, SWA} <= regressed and DEC16 not in regressed
    assert by_name(run_result)[DEC32].threshold == pytest.approx(gate.MIN_THRESHOLD)
    assert noise_study.main(["--held-out", str(BASELINE), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "session-1 repetition 3: FAIL" in text and "session-1 repetition 2: PASS" in text


def test_noise_study_refuses_slowed_runs(tmp_path):
    run = load(RUN)
    run["machine_info"]["perf_slowdown"] = ["based_decode"]
    (tmp_path / "slow.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit, match="slowed"):
        noise_study.main(["--from-json", str(tmp_path / "slow.json"), "--out", str(tmp_path / "n.json")])


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
