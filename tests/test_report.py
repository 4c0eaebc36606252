"""perf/report.py (with perf/runs.py, perf/figures.py) on a small stored run (tests/fixtures/perf_small.json:
benchmarks trimmed from the H200 baseline, plus hand-made based_generation results), and README.md's
generated state-precision block (perf/drift.py). CPU only."""
import json
import statistics
from pathlib import Path

import pytest

from perf import drift, report, runs

ROOT = Path(__file__).resolve().parents[1]

FIXTURE = ROOT / "tests" / "fixtures" / "perf_small.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _benchmarks():
    return json.loads(FIXTURE.read_text())["benchmarks"]


def _median_us(param):
    return next(b["stats"]["median"] for b in _benchmarks() if b["param"] == param) * 1e6


def _table_rows(md: str, op: str) -> list[list[str]]:
    """The cells of every data row of the `### op` table."""
    section = md.split(f"\n### {op}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[1:]]  # rows[0] is the header


@pytest.fixture(scope="module")
def md():
    return report.render_markdown([runs.load_run(FIXTURE)])


def test_one_row_per_op_shape_impl(md):
    expected = {}
    for b in _benchmarks():
        info = b["extra_info"]
        shape = runs.shape_label(runs._shape(info["shape"]))
        expected.setdefault(info["op"], set()).add((shape, info["impl"]))
    assert set(expected) == {"based_prefill", "based_decode", "sliding_window_decode", "based_generation"}
    for op, want in expected.items():
        rows = _table_rows(md, op)
        got = [(r[0], r[1].strip("*")) for r in rows]
        assert len(got) == len(set(got)) == len(want), op
        assert set(got) == want, op


def test_speedup_and_throughput_of_a_known_pair(md):
    ours = _median_us("attn_kernels-B64-H16-W64-e64-bf16")
    peer = _median_us("sdpa_cudnn-B64-H16-W64-e64-bf16")
    rows = {tuple(r[:2]): r for r in _table_rows(md, "sliding_window_decode")}
    assert rows["B64 H16 W64 e64", "sdpa_cudnn"][5] == f"{peer / ours:.2f}× (attn_kernels)"
    ours_row = rows["B64 H16 W64 e64", "**attn_kernels**"]
    nbytes = next(b["extra_info"]["bytes"] for b in _benchmarks()
                  if b["param"] == "attn_kernels-B64-H16-W64-e64-bf16")
    assert ours_row[3] == f"{nbytes / ours * 1e-3:,.0f}"  # GB/s
    assert ours_row[5] == "—"


def test_speedup_matches_variant(md):
    # fp32-state peers are compared with attn_kernels-state_fp32, never with the bf16 state
    ours = _median_us("attn_kernels-state_fp32-B16-H16-bf16")
    peer = _median_us("torch_compile-state_fp32-B16-H16-bf16")
    rows = {tuple(r[:2]): r for r in _table_rows(md, "based_decode")}
    want = f"{peer / ours:.2f}× (attn_kernels-state_fp32)"
    assert rows["B16 H16 e64", "torch_compile-state_fp32"][5] == want
    # prefill is reported in TFLOP/s of the nominal FLOPs
    assert "| shape | implementation | median µs | TFLOP/s |" in md.split("### based_prefill", 1)[1]


def test_generation_ratio_uses_the_faster_softmax(md):
    rows = {r[0]: r for r in _table_rows(md, "Generation throughput (op `based_generation`)")}
    # ctx 2048: cuDNN is the faster softmax; ctx 8192: flash is
    r2k, r8k = rows["B128 H16 ctx2048 e64"], rows["B128 H16 ctx8192 e64"]
    assert r2k[-3] == "softmax_sdpa_cudnn" and r8k[-3] == "softmax_sdpa_flash"
    based = _median_us("based-B128-H16-ctx2048-bf16")
    assert r2k[-2] == f"{_median_us('softmax_sdpa_cudnn-B128-H16-ctx2048-bf16') / based:.2f}×"
    based = _median_us("based-B128-H16-ctx8192-bf16")
    assert r8k[-2] == f"{_median_us('softmax_sdpa_flash-B128-H16-ctx8192-bf16') / based:.2f}×"


def test_generation_ratio_per_based_state(md):
    # one ratio column per Based variant: fp32 state (`based`) and bf16 state, same faster softmax
    section = md.split("### Generation throughput", 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("| shape"))
    assert header.endswith("| faster softmax | based ÷ softmax | based_state_bf16 ÷ softmax |")
    rows = {r[0]: r for r in _table_rows(md, "Generation throughput (op `based_generation`)")}
    r2k = rows["B128 H16 ctx2048 e64"]
    cudnn = _median_us("softmax_sdpa_cudnn-B128-H16-ctx2048-bf16")
    assert r2k[-3] == "softmax_sdpa_cudnn"
    assert r2k[-2] == f"{cudnn / _median_us('based-B128-H16-ctx2048-bf16'):.2f}×"
    assert r2k[-1] == f"{cudnn / _median_us('based_state_bf16-B128-H16-ctx2048-bf16'):.2f}×"


def test_generate_writes_plots_and_is_reproducible(tmp_path):
    pytest.importorskip("matplotlib")
    no_training = tmp_path / "absent.json"  # the committed training data, if any, is another test's
    written = report.generate([FIXTURE], tmp_path, training_path=no_training)
    plots = sorted(p.name for p in (tmp_path / "plots" / "nvidia-h200").iterdir())
    assert plots == sorted(f"{n}.png" for n in ("prefill_vs_n", "prefill_vs_b", "decode_vs_b",
                                                  "sliding_window_vs_b", "generation_tokens_per_s"))
    for p in (tmp_path / "plots" / "nvidia-h200").iterdir():
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, p
    md = (tmp_path / "REPORT.md").read_text()
    assert md.startswith("<!-- GENERATED by `python -m perf.report`")
    for name in plots:  # every plot linked, relative to REPORT.md
        assert f"](plots/nvidia-h200/{name})" in md
    assert set(written) == {tmp_path / "REPORT.md", *(tmp_path / "plots" / "nvidia-h200" / n for n in plots)}
    first = {p: p.read_bytes() for p in written}
    report.generate([FIXTURE], tmp_path, training_path=no_training)
    assert {p: p.read_bytes() for p in written} == first


def _backward_run(tmp_path) -> Path:
    """A stored run with the backward and training benchmarks of one shape (hand-made medians)."""
    from perf import cost

    benchmarks = []
    medians = {"based_prefill_backward": {"attn_kernels-norm": 1.0e-3, "attn_kernels-num": 0.9e-3,
                                          "fla_parallel-norm": 4.0e-3},
               "based_prefill_train": {"attn_kernels-norm": 1.5e-3, "torch_compile-norm": 6.0e-3}}
    costs = {"based_prefill_backward": cost.prefill_backward_cost,
             "based_prefill_train": cost.prefill_train_cost}
    for op, impls in medians.items():
        nbytes, flops = costs[op](16, 16, 4096)
        for impl, median in impls.items():
            info = {"op": op, "impl": impl, "shape": {"B": 16, "H": 16, "N": 4096}, "bytes": nbytes,
                    "flops": flops, "floor_us": cost.floor_us(nbytes, flops), "pct_of_floor": None,
                    "saved_bytes": 0, "saved_vs_qkvo": 0.0 if impl.startswith("attn_kernels") else 0.406}
            benchmarks.append({"param": f"{impl}-B16-H16-N4096-bf16", "stats": {"median": median},
                               "extra_info": info})
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": benchmarks,
                                "machine_info": {"gpu_slug": "g", "gpu_name": "G"}}))
    return path


def test_backward_and_training_tables(tmp_path):
    """Both new ops get a table in TFLOP/s of their nominal FLOPs, after the forward, peers against ours."""
    from perf import cost

    md = report.render_markdown([runs.load_run(_backward_run(tmp_path))])
    assert md.index("### based_prefill_backward") < md.index("### based_prefill_train")
    rows = {tuple(r[:2]): r for r in _table_rows(md, "based_prefill_backward")}
    flops = cost.prefill_backward_cost(16, 16, 4096)[1]
    assert rows["B16 H16 N4096", "**attn_kernels-norm**"][3] == f"{flops / 1e3 * 1e-6:.1f}"  # TFLOP/s at 1 ms
    assert rows["B16 H16 N4096", "fla_parallel-norm"][5:] == ["4.00× (attn_kernels-norm)", "0.41"]
    assert rows["B16 H16 N4096", "**attn_kernels-norm**"][6] == "0.00"  # the memory column
    train = {tuple(r[:2]): r for r in _table_rows(md, "based_prefill_train")}
    assert train["B16 H16 N4096", "torch_compile-norm"][5] == "4.00× (attn_kernels-norm)"


def _stored(tmp_path, name: str, slug: str, date: str, params: dict[str, float], commit: str = "abc1234") -> Path:
    """A stored run (perf/results-style) of the fixture's benchmarks `params` ({param: median s}), on GPU slug."""
    by_param = {b["param"]: b for b in _benchmarks()}
    benchmarks = [{**by_param[p], "stats": {**by_param[p]["stats"], "median": m}} for p, m in params.items()]
    path = tmp_path / name
    path.write_text(json.dumps({"benchmarks": benchmarks, "datetime": date, "commit_info": {"id": commit},
                                "machine_info": {"gpu_slug": slug, "gpu_name": "NVIDIA H200"}}))
    return path


def test_stored_runs_fill_in_what_the_baseline_lacks(tmp_path):
    """runs.beside_baseline: per op with an id the baseline lacks, that op from the newest stored run of the
    same GPU; ops the baseline has in full, other GPUs' runs and non-benchmark JSON are left out."""
    decode = sorted(b["param"] for b in _benchmarks() if b["extra_info"]["op"] == "based_decode")
    swd = sorted(b["param"] for b in _benchmarks() if b["extra_info"]["op"] == "sliding_window_decode")
    trimmed = tmp_path / "baseline.json"  # the baseline without one decode id
    doc = json.loads(FIXTURE.read_text())
    doc["benchmarks"] = [b for b in doc["benchmarks"] if b["param"] != decode[0]]
    trimmed.write_text(json.dumps(doc))
    base = runs.load_run(trimmed)
    results = tmp_path / "results"
    results.mkdir()
    _stored(results, "old.json", base.slug, "2026-01-01", {p: 1e-3 for p in decode}, "old0000")
    _stored(results, "new.json", base.slug, "2026-02-01", {p: 2e-3 for p in decode + swd}, "new0000")
    _stored(results, "other-gpu.json", "nvidia-x100", "2026-03-01", {p: 3e-3 for p in decode})
    (results / "training.json").write_text(json.dumps({"curves": {}}))
    stored = runs.stored_runs(results)
    assert sorted(r.path.name for r in stored) == ["new.json", "old.json", "other-gpu.json"]
    extra = runs.beside_baseline(base, stored)
    assert [r.path.name for r in extra] == ["new.json"]  # the newest; swd is in the baseline in full
    assert {b.op for b in extra[0].benches} == {"based_decode"} and len(extra[0].benches) == len(decode)
    assert {b.median_us for b in extra[0].benches} == {2000.0} and extra[0].commit == "new0000"
    assert runs.beside_baseline(runs.load_run(FIXTURE), stored) == []  # nothing lacking, nothing beside

    md = report.render_markdown([base], beside=report.beside_runs([base], results))
    head = f"### Not in this baseline yet — from `{(results / 'new.json').name}`"
    assert head in md and "commit new0000" in md
    section = md.split(head, 1)[1]
    rows = [line for line in section.split("\n#### based_decode\n", 1)[1].split("\n## ", 1)[0].splitlines()
            if line.startswith("| ")][1:]
    assert len(rows) == len(decode) and all("| 2,000 |" in r for r in rows)
    assert report.beside_runs([base], None) == {}


def test_generate_draws_the_stored_runs_plots_in_their_own_folder(tmp_path):
    pytest.importorskip("matplotlib")
    decode = [b["param"] for b in _benchmarks() if b["extra_info"]["op"] == "based_decode"]
    doc = json.loads(FIXTURE.read_text())
    doc["benchmarks"] = [b for b in doc["benchmarks"] if b["extra_info"]["op"] != "based_decode"]
    trimmed = tmp_path / "baseline.json"
    trimmed.write_text(json.dumps(doc))
    results = tmp_path / "results"
    results.mkdir()
    _stored(results, "decode-run.json", runs.load_run(FIXTURE).slug, "2026-02-01", {p: 2e-3 for p in decode})
    out = tmp_path / "out"
    written = report.generate([trimmed], out, training_path=tmp_path / "absent.json", results_dir=results)
    plot = out / "plots" / "nvidia-h200" / "decode-run" / "decode_vs_b.png"
    assert plot in written and plot.read_bytes()[:8] == PNG_MAGIC
    assert not (out / "plots" / "nvidia-h200" / "decode_vs_b.png").exists()  # the baseline has no decode
    assert "](plots/nvidia-h200/decode-run/decode_vs_b.png)" in (out / "REPORT.md").read_text()


def test_a_results_folder_that_is_not_there_is_refused(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SystemExit, match="--results must be a folder of stored runs, got .*no-such-folder"):
        report.main([str(FIXTURE), "--out", str(tmp_path), "--report-only", "--no-readme",
                     "--results", str(missing)])
    assert not (tmp_path / "REPORT.md").exists()
    report.main([str(FIXTURE), "--out", str(tmp_path), "--report-only", "--no-readme", "--no-results"])
    assert (tmp_path / "REPORT.md").is_file()


def _training_data():
    from perf import training

    config = {"vocab": 256, "seq_len": 128, "kv_pairs": 8, "batch": 64, "d_model": 128, "heads": 4,
              "conv": 3, "steps": 4}
    curves = {"attn_kernels": [5.5, 4.0, 2.0, 1.01], "reference_fp64": [5.5, 4.0, 2.0, 1.0],
              "reference_bf16": [5.5, 4.01, 2.0, 1.0]}
    runs_ = {k: {"loss": c, "eval_accuracy": 0.95, "eval_queries": 28672} for k, c in curves.items()}
    measured = {"curve_ratio": 0.3, "kernel_deviation": 0.01, "lowp_spread": 0.01, "accuracy_gap": 0.0,
                "accuracy_margin": 0.0084}
    return training.make_data(config, runs_, measured, device="NVIDIA X100", torch_version="2.x",
                              date="2030-01-02")


def test_training_section_and_plot(tmp_path, monkeypatch):
    """The training check's data (perf/training.py): REPORT.md's section and the plot, reproducibly."""
    pytest.importorskip("matplotlib")
    from perf import training

    data_path = training.record(_training_data(), tmp_path / "based_training.json")
    written = report.generate([FIXTURE], tmp_path, training_path=data_path)
    png = tmp_path / "plots" / f"{training.PLOT}.png"
    assert png in written and png.read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "REPORT.md").read_text()
    section = md.split("\n## Training check", 1)[1].split("\n## ", 1)[0]
    assert f"![{training.PLOT}](plots/{training.PLOT}.png)" in section
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # [0]: the header
    assert rows[0] == "| attn_kernels (CUDA forward + backward) | 5.5000 | 3.1275 | 0.9500 (28,672 queries) |"
    assert len(rows) == 3
    first = png.read_bytes()
    report.generate([FIXTURE], tmp_path, training_path=data_path)
    assert png.read_bytes() == first
    bad = _training_data()
    del bad["runs"]["reference_bf16"]
    with pytest.raises(ValueError, match="lacks runs/reference_bf16"):
        training.validate(bad)
    monkeypatch.delenv(training.ENV, raising=False)
    assert training.record(_training_data()) is None  # no path, no variable: nothing written
    monkeypatch.setenv(training.ENV, str(tmp_path / "env.json"))
    assert training.load(training.record(_training_data())) == _training_data()


def test_newest_baseline_per_gpu(tmp_path):
    for rel in ("gpu-a/0001_x.json", "gpu-a/0002_y.json", "gpu-b/0001_z.json", "gpu-b/notes.json"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("{}")
    (tmp_path / "empty").mkdir()
    newest = runs.newest_baselines(tmp_path)
    assert newest == [tmp_path / "gpu-a" / "0002_y.json", tmp_path / "gpu-b" / "0001_z.json"]


def test_two_runs_of_one_gpu_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="more than one run of GPU nvidia-h200"):
        report.generate([FIXTURE, FIXTURE], tmp_path)


# --------------------------------------------------------------------------------------------------
# the regression-gate section (noise, thresholds, exclusions): generated from perf/noise/<gpu-slug>.json
# --------------------------------------------------------------------------------------------------
NOISE_H200 = ROOT / "perf" / "noise" / "nvidia-h200.json"


def _gate_section(md: str) -> str:
    return "## Regression gate" + md.split("\n## Regression gate", 1)[1].split("\n## ", 1)[0]


def test_gate_section_counts_match_the_noise_data():
    """Counted here from the raw medians, independently of perf/report.py and perf/gate.py's helpers."""
    noise = json.loads(NOISE_H200.read_text())
    spreads = {}
    for name, e in noise["benchmarks"].items():
        medians = [m for ms in e["medians_s"].values() for m in ms]
        if len(medians) >= 2:
            spreads[name] = max(medians) / min(medians) - 1
    excluded = set(noise["excluded"])
    ours = {n for n in spreads
            if n.split("[")[1].split("-")[0] in ("attn_kernels", "based", "based_state_bf16")}
    gated = {n: min(0.10, max(0.03, 3 * s)) for n, s in spreads.items() if n not in excluded}
    floor = sum(abs(t - 0.03) < 1e-12 for t in gated.values())
    cap = sum(3 * spreads[n] > 0.10 for n in gated)
    md = report.render_markdown([runs.load_run(FIXTURE)], [(noise, "perf/noise/nvidia-h200.json")])
    section = _gate_section(md)
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")]
                              for line in section.splitlines() if line.startswith("| "))}
    assert rows["the 3% floor"][1] == str(floor)
    assert rows["the 10% cap (their noise would need more: measure them more stably)"][1] == str(cap) == "5"
    assert rows["above the floor, up to the cap (3% – 10%)"][1] == str(len(gated) - floor - cap)
    assert rows["not gated: excluded peers (below)"][1] == str(len(excluded)) == "17"
    assert rows["all measured"][1:3] == [str(len(spreads)), f"{100 * statistics.median(spreads.values()):.2f} %"]
    assert rows["attn_kernels' own"][1:3] == [str(len(ours)),
                                              f"{100 * statistics.median([spreads[n] for n in ours]):.2f} %"]
    for name in excluded:  # every exclusion listed with its reason
        assert f"- `{name.split('::')[1]}`: {noise['excluded'][name]}" in section


def test_committed_report_has_the_current_gate_section():
    """perf/REPORT.md's gate sections (one per committed noise file) are what `python -m perf.report` makes
    from those files: regenerate (`nox -s plots`, or `python -m perf.report --report-only`) whenever a noise
    file changes."""
    committed = (ROOT / "perf" / "REPORT.md").read_text()
    sections = ["## Regression gate" + part.split("\n## ", 1)[0]
                for part in committed.split("\n## Regression gate")[1:]]
    files = sorted((ROOT / "perf" / "noise").glob("*.json"))
    assert len(sections) == len(files) >= 1
    for path in files:
        label = f"perf/noise/{path.name}"
        want = "\n".join(report.noise_summary(json.loads(path.read_text()), label)).rstrip()
        assert any(s.rstrip() == want for s in sections), f"REPORT.md: the gate section of {label} is stale"


# --------------------------------------------------------------------------------------------------
# README.md's state-precision block: generated from perf/results/decode_drift.json (perf/drift.py)
# --------------------------------------------------------------------------------------------------
README = ROOT / "README.md"


def test_committed_readme_drift_block_is_the_rendering_of_the_committed_data():
    """Edit perf/results/decode_drift.json (a device run of the drift test with ATTN_KERNELS_DRIFT_JSON
    writes it), then `python -m perf.report --report-only`; never the README table by hand."""
    data = json.loads(drift.DATA.read_text())
    assert drift.readme_block(README.read_text()) == drift.render(data)


def test_drift_numbers_to_two_significant_digits():
    assert drift.fmt_errors([1.94e-7, 4.75e-7, 1.8e-6]) == "1.9e-7 / 4.8e-7 / 1.8e-6"
    assert drift.fmt_errors([0.153, 0.998, 8.44]) == "0.15 / 1.0 / 8.4"  # all >= 0.1: fixed
    assert drift.fmt_errors([0.02, 0.049, 0.2]) == "2.0e-2 / 4.9e-2 / 2.0e-1"  # one below 0.1: scientific
    assert drift.fmt_errors([12.3, 9.96, 0.1]) == "12 / 10 / 0.10"


MEASURED = {  # what the drift test hands the writer per state dtype: {steps: (output_rel, state_rel)}
    "fp32": {100: (2.21e-3, 1.94e-7), 1_000: (2.2e-3, 4.8e-7), 10_000: (2.6e-3, 1.8e-6)},
    "bf16": {100: (0.153, 2.04e-2), 1_000: (1.01, 4.9e-2), 10_000: (8.44, 0.2)},
}


def test_drift_writer_writes_what_the_renderer_reads(tmp_path, monkeypatch):
    path = tmp_path / "out" / "drift.json"
    monkeypatch.delenv(drift.ENV, raising=False)
    assert drift.record("fp32", MEASURED["fp32"], gpu_name="G", torch_version="2.x") is None  # no variable
    assert not path.parent.exists()
    monkeypatch.setenv(drift.ENV, str(path))
    kw = dict(gpu_name="NVIDIA X100", torch_version="2.11.0", date="2030-01-02")
    drift.record("bf16", MEASURED["bf16"], **kw)  # the test's parametrizations, in either order, merge
    drift.record("fp32", MEASURED["fp32"], **kw)
    data = json.loads(path.read_text())
    assert data["source"] == drift.SOURCE
    assert (data["gpu_name"], data["torch"], data["date"]) == ("NVIDIA X100", "2.11.0", "2030-01-02")
    assert list(data["state_dtypes"]) == ["fp32", "bf16"]
    for dtype, measured in MEASURED.items():
        assert data["state_dtypes"][dtype] == {str(n): {"output_rel": o, "state_rel": s}
                                               for n, (o, s) in measured.items()}
    block = drift.render(data)
    assert "`tests/test_based_decode.py::test_ten_thousand_steps_drift`, NVIDIA X100, torch 2.11.0, " \
           "2030-01-02" in " ".join(block.split())
    assert "| float32 (default) | 1.9e-7 / 4.8e-7 / 1.8e-6 | 2.2e-3 / 2.2e-3 / 2.6e-3 (the bf16" in block
    assert "| bfloat16 | 2.0e-2 / 4.9e-2 / 2.0e-1 | 0.15 / 1.0 / 8.4 |" in block


def test_drift_writer_never_merges_with_another_run(tmp_path):
    """The typed placeholder, or a file from another GPU, is replaced, not merged: a lone dtype's run leaves a
    file the renderer refuses rather than a table mixing two runs."""
    path = tmp_path / "drift.json"
    path.write_text(drift.DATA.read_text())
    drift.record("fp32", MEASURED["fp32"], gpu_name="NVIDIA H200", torch_version="2.11.0", path=path)
    data = json.loads(path.read_text())
    assert list(data["state_dtypes"]) == ["fp32"] and data["source"] == drift.SOURCE
    with pytest.raises(ValueError, match="lacks bf16/100, bf16/1000, bf16/10000"):
        drift.render(data)
    drift.record("bf16", MEASURED["bf16"], gpu_name="NVIDIA H100", torch_version="2.11.0", path=path)
    assert list(json.loads(path.read_text())["state_dtypes"]) == ["bf16"]


def test_update_readme_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    text = README.read_text()
    readme.write_text(text.replace("| bfloat16 | ", "| bfloat16 | 9", 1))  # a typed edit in the block
    assert drift.update_readme(readme, drift.DATA)
    assert readme.read_text() == text
    assert not drift.update_readme(readme, drift.DATA)  # unchanged: not written again


def test_sliding_window_prefill_bars(tmp_path):
    """sliding_window_prefill's shapes vary B, N, window and e together: one bar plot of every shape."""
    pytest.importorskip("matplotlib")
    from perf import cost, figures

    benchmarks = []
    for shape in ({"B": 16, "H": 16, "N": 2048, "window": 64, "e": 64},
                  {"B": 4, "H": 16, "N": 32768, "window": 256, "e": 128}):
        nbytes = 4 * shape["B"] * shape["H"] * shape["N"] * shape["e"] * 2
        for impl, median in (("attn_kernels", 1e-4), ("flex", 2e-4)):
            info = {"op": "sliding_window_prefill", "impl": impl, "shape": shape, "bytes": nbytes, "flops": 0,
                    "floor_us": cost.floor_us(nbytes, 0), "pct_of_floor": None}
            benchmarks.append({"param": impl, "stats": {"median": median}, "extra_info": info})
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": benchmarks, "machine_info": {"gpu_slug": "g", "gpu_name": "G"}}))
    run = runs.load_run(path)
    assert figures.plot_names(run) == [figures.SWP_PLOT]
    written = figures.write_plots(run, tmp_path / "plots")
    assert [p.name for p in written] == [f"{figures.SWP_PLOT}.png"]
    assert written[0].read_bytes()[:8] == PNG_MAGIC
