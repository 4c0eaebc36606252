"""CPU tests of the noise file (perf/noise_study.py) on the gate's hand-made pytest-benchmark JSON
(tests/gate_fixtures.py): merging sessions, retiring a changed kernel's noise, the held-out check, and what
the gate reads from it."""
import json

import pytest
from gate_fixtures import BASELINE, DEC16, DEC32, FLA, RUN, RUN_H100, SWA, SWA_TORCH, by_name, load

from perf import gate, noise_study


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
