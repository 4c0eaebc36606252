"""CPU tests of the perf regression gate (perf/gate.py), the noise file (perf/noise_study.py) on hand-made
pytest-benchmark JSON in tests/fixtures/gate_*.json, and the perf suite's slow-down switch (perf/timing.py).

The run against the baseline: decode fp32 +12% (noise spread 5%: threshold 15%), decode bf16 +1%,
prefill +5% (spread 0.4%: threshold 3%), sliding-window attn_kernels 2x, sliding-window torch 30% faster
(one noise median only: default threshold), fla decode only in the baseline, flash_attn only in the run.
"""
import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import gate  # noqa: E402
import noise_study  # noqa: E402
import timing  # noqa: E402

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
    assert {c.name for c in result.regressions} == {PREFILL, SWA}
    swa = by_name(result)[SWA]
    assert (swa.baseline_s, swa.new_s, swa.threshold, swa.source) == (
        pytest.approx(8e-6), pytest.approx(16e-6), gate.MIN_THRESHOLD, "noise")
    assert swa.ratio == pytest.approx(2.0)
    assert not result.ok
    report = gate.format_report(result)
    line = next(ln for ln in report.splitlines() if ln.endswith(SWA))
    assert line.split()[:4] == ["8.000", "16.000", "3.0%", "2.000"]
    assert "FAIL: 2 regressed" in report


def test_improvement_not_flagged():
    c = by_name(gate.compare(load(BASELINE), load(RUN), load(NOISE)))[SWA_TORCH]
    assert c.ratio == pytest.approx(0.7) and not c.regressed


def test_new_and_missing_benchmarks_reported_not_failed():
    base, run = load(BASELINE), load(RUN)
    result = gate.compare(base, run, load(NOISE))
    assert result.new == [SWA_FA] and result.missing == [FLA]
    report = gate.format_report(result)
    assert f"new (not in the baseline, not gated): 1\n    {SWA_FA}" in report
    assert f"missing from this run (in the baseline): 1\n    {FLA}" in report
    # only new / missing benchmarks: the gate passes
    run["benchmarks"] = [b for b in run["benchmarks"] if b["fullname"] in (DEC16, SWA_FA)]
    assert gate.compare(base, run, load(NOISE)).ok


def test_thresholds_from_noise_file():
    limits = gate.thresholds(load(NOISE), [DEC32, DEC16, PREFILL, SWA_TORCH, SWA_FA])
    assert limits[DEC32] == (pytest.approx(0.15), "noise")  # 3 x 5% spread
    assert limits[DEC16] == (gate.MIN_THRESHOLD, "noise")  # 3 x 0.8% < 3%
    assert limits[PREFILL] == (gate.MIN_THRESHOLD, "noise")
    assert limits[SWA_TORCH] == (gate.DEFAULT_THRESHOLD, "default")  # a single median has no spread
    assert limits[SWA_FA] == (gate.DEFAULT_THRESHOLD, "default")  # no entry
    # +12% passes under its measured 15%; +5% fails under the measured 3%
    c = by_name(gate.compare(load(BASELINE), load(RUN), load(NOISE)))
    assert not c[DEC32].regressed and c[PREFILL].regressed


def test_default_threshold_without_noise_file():
    result = gate.compare(load(BASELINE), load(RUN))
    assert all((c.threshold, c.source) == (gate.DEFAULT_THRESHOLD, "default") for c in result.compared)
    # now +12% exceeds the 10% default and +5% is within it
    assert {c.name for c in result.regressions} == {DEC32, SWA}
    loose = gate.compare(load(BASELINE), load(RUN), default_threshold=0.2)
    assert {c.name for c in loose.regressions} == {SWA}


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
    same = copy.deepcopy(load(BASELINE))
    (tmp_path / "same.json").write_text(json.dumps(same))
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
    ndir.mkdir()
    shutil.copy(NOISE, ndir / "nvidia-h200.json")
    assert gate.main(folders + [str(RUN)]) == gate.EXIT_REGRESSION
    assert f"from {ndir / 'nvidia-h200.json'}" in capsys.readouterr().out
    # no baseline for this GPU in the folder
    assert gate.main(["--baseline", str(bdir), "--run", str(RUN_H100)]) == gate.EXIT_REFUSED
    # an explicit noise file that is not there is an error, not a silent fall-back to the default
    assert gate.main(["--baseline", str(BASELINE), "--noise", str(tmp_path / "typo.json"),
                      "--run", str(RUN)]) == gate.EXIT_REFUSED
    allow = ["--baseline", str(bdir), "--run", str(RUN_H100), "--allow-missing-baseline"]
    assert gate.main(allow) == gate.EXIT_OK
    # no GPU: the suite skipped, pytest-benchmark left the JSON empty
    (tmp_path / "empty.json").write_text("")
    assert gate.main(["--baseline", str(bdir), "--run", str(tmp_path / "empty.json")]) == gate.EXIT_OK


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
    # the gate reads it: DEC32's 12% spread -> 36% threshold
    limits = gate.thresholds(load(out), [DEC32])
    assert limits[DEC32] == (pytest.approx(0.36), "noise")


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
    assert near_result.ok
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
    monkeypatch.delenv(timing.SLOWDOWN_ENV, raising=False)
    assert timing.slowed_ops() == []
    monkeypatch.setenv(timing.SLOWDOWN_ENV, "based_decode, sliding_window_decode")
    assert timing.slowed_ops() == ["based_decode", "sliding_window_decode"]
    calls = []

    class FakeAk:
        def based_decode(self, *args):
            calls.append(("based_decode", args))
            return len(calls)

        def based_prefill(self, *args):
            calls.append(("based_prefill", args))

    slowed = timing._Slowed(FakeAk(), ["based_decode"])
    assert slowed.based_decode(1) == 2 and calls == [("based_decode", (1,))] * 2  # twice per call
    slowed.based_prefill(2)
    assert calls[2:] == [("based_prefill", (2,))]  # the others untouched
    with pytest.raises(ValueError, match="no op 'based_decod'"):
        timing._Slowed(FakeAk(), ["based_decod"])
