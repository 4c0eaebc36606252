"""REPORT.md (and the plots, perf/figures.py) from stored perf runs (pytest-benchmark JSON); README.md's
generated blocks.

    python -m perf.report [RUN.json ...] [--out DIR] [--noise DIR] [--results DIR | --no-results] [--report-only]
                          [--no-readme]

Without RUN.json: the newest baseline (highest NNNN_*.json) of every perf/baselines/<gpu-slug>/ folder. After
each run, the ops it lacks that a stored run of the same GPU under perf/results/ measured (a part of the suite
timed before the next whole-suite baseline): their tables and plots (DIR/plots/<gpu-slug>/<file stem>/), marked
as not gated.
Writes DIR/plots/<gpu-slug>/*.png (matplotlib, Agg) and DIR/REPORT.md (DIR defaults to perf/); REPORT.md
ends with each GPU's regression-gate section (noise, thresholds, exclusions) from perf/noise/<gpu-slug>.json,
so no README has to type those numbers. Where perf/results/based_training.json exists (the training check,
perf/training.py), REPORT.md gets its section and DIR/plots/based_training.png its curves. It also rewrites
README.md's state-precision block from perf/results/decode_drift.json (perf/drift.py) unless --no-readme.
Output is deterministic: an unchanged run regenerates byte-identical files (sorted rows, fixed formats, no
timestamps in the PNGs).

Only JSON is read (perf/runs.py): no torch, no GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from perf import drift, gate, training
from perf.figures import plot_names, write_plots
from perf.runs import (BASELINES, FLOOR_TEXT, PERF_DIR, REPO_DIR, RESULTS, Bench, Run, beside_baseline,
                       generation_rows, load_run, newest_baselines, shape_label, stored_runs)

NOISE_DIR = PERF_DIR / "noise"

OP_ORDER = ("based_prefill", "based_prefill_varlen", "based_prefill_backward", "based_prefill_train",
            "based_decode", "sliding_window_decode", "sliding_window_prefill", "based_generation")
# Prefill (forward, backward, training step) is reported against its nominal FLOPs (the number published
# kernels quote); the decode-type ops move a state or a cache and do little arithmetic, so they are reported
# in bytes per second.
TFLOPS_OPS = ("based_prefill", "based_prefill_varlen", "based_prefill_backward", "based_prefill_train")


# --------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------
def fmt_us(us: float) -> str:
    return f"{us:,.0f}" if us >= 1000 else f"{us:.1f}" if us >= 100 else f"{us:.2f}"


def throughput(b: Bench) -> tuple[str, float]:
    """('TFLOP/s', value) for prefill, ('GB/s', value) for the decode-type ops."""
    if b.op in TFLOPS_OPS:
        return "TFLOP/s", b.flops / b.median_us * 1e-6
    return "GB/s", b.nbytes / b.median_us * 1e-3


def fmt_throughput(unit: str, x: float) -> str:
    return f"{x:.1f}" if unit == "TFLOP/s" else f"{x:,.0f}"



def _path_label(path: Path) -> str:
    """The run's path relative to the repository, or its file name when it lives elsewhere."""
    p = Path(path).resolve()
    return p.relative_to(REPO_DIR).as_posix() if p.is_relative_to(REPO_DIR) else p.name


def _impl_order(b: Bench) -> tuple:
    """Ours first, then the peers from fastest to slowest (name breaks ties)."""
    return (not b.ours, b.median_us if not b.ours else 0.0, b.impl)


def speedup_ref(b: Bench, group: list[Bench]) -> Bench | None:
    """Our implementation to compare peer b with: same op and shape, same variant (attn_kernels-norm for
    torch-norm, attn_kernels-state_fp32 for fla_fused_recurrent-state_fp32, based for softmax_*)."""
    if b.ours:
        return None
    same = [o for o in group if o.ours and o.variant == b.variant]
    return min(same, key=lambda o: o.impl) if same else None


# --------------------------------------------------------------------------------------------------
# REPORT.md
# --------------------------------------------------------------------------------------------------
def _op_table(benches: list[Bench]) -> list[str]:
    unit, _ = throughput(benches[0])
    saved = any(b.saved_vs_qkvo is not None for b in benches)  # backward, training: what the forward keeps
    lines = [f"| shape | implementation | median µs | {unit} | % of floor | attn_kernels speed-up |"
             + (" forward keeps (× q, k, v, o bytes) |" if saved else ""),
             "|---|---|--:|--:|--:|--:|" + ("--:|" if saved else "")]
    for shape in sorted({b.shape for b in benches}):
        group = sorted((b for b in benches if b.shape == shape), key=_impl_order)
        for b in group:
            ref = speedup_ref(b, group)
            speed = f"{b.median_us / ref.median_us:.2f}× ({ref.impl})" if ref else "—"
            name = f"**{b.impl}**" if b.ours else b.impl
            kept = (f" {b.saved_vs_qkvo:.2f} |" if b.saved_vs_qkvo is not None else " — |") if saved else ""
            lines.append(f"| {shape_label(shape)} | {name} | {fmt_us(b.median_us)} | "
                         f"{fmt_throughput(unit, throughput(b)[1])} | {100 * b.floor_us / b.median_us:.1f} | "
                         f"{speed} |{kept}")
    return lines

def _generation_section(run: Run) -> list[str]:
    rows = generation_rows(run)
    impls = sorted({i for _, tps, _, _ in rows for i in tps}, key=lambda i: (not i.startswith("based"), i))
    based = [i for i in impls if i.startswith("based")]
    lines = [
        "### Generation throughput (op `based_generation`)",
        "",
        "Tokens/s of one mixer layer = B / time per decode step. Based mixer: `based_decode` + "
        "`sliding_window_decode` (W=64); `based` keeps the decode state in fp32 (the default), "
        "`based_state_bf16` in bf16. Softmax mixer: SDPA over a full KV cache of `ctx` tokens. Each ratio "
        "is that Based variant over the faster softmax backend of the same run.",
        "",
        "| shape | " + " | ".join(f"{i} tok/s" for i in impls) + " | faster softmax | " +
        " | ".join(f"{i} ÷ softmax" for i in based) + " |",
        "|---|" + "--:|" * len(impls) + "---|" + "--:|" * len(based),
    ]
    for shape, tps, best, ratios in rows:
        cells = [f"{tps[i]:,.0f}" if i in tps else "—" for i in impls]
        ratio_cells = [f"{ratios[i]:.2f}×" if i in ratios else "—" for i in based]
        lines.append(f"| {shape_label(shape)} | " + " | ".join(cells) + f" | {best or '—'} | " +
                     " | ".join(ratio_cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------------
# noise and gate thresholds (perf/noise/<gpu-slug>.json, perf/gate.py)
# --------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def noise_summary(noise: dict, label: str) -> list[str]:
    """The "Regression gate" section of REPORT.md for one noise file: how many benchmarks are gated at
    which threshold (perf/gate.py's rule, cap included), the median spread, the worst of ours and every
    reviewed exclusion with its reason. Generated, so the README never types these numbers."""
    entries = noise.get("benchmarks", {})
    excluded = gate.excluded_of(noise)
    measured = {n: e for n, e in entries.items() if e.get("spread") is not None and e.get("n", 0) >= 2}
    limits = gate.thresholds(noise, sorted(measured))
    gated = {n: limits[n] for n in measured if n not in excluded}
    at_floor = sum(t == gate.MIN_THRESHOLD for t, src, _ in gated.values())
    capped = sorted(n for n, (_, src, _) in gated.items() if src == "capped")
    between = len(gated) - at_floor - len(capped)
    ours = {n: e for n, e in measured.items() if gate.is_ours(n)}
    runs = sum(len(s.get("repetitions", [])) for s in noise.get("sessions", []))
    rule = (f"min({gate.MAX_THRESHOLD:.0%}, max({gate.MIN_THRESHOLD:.0%}, {gate.NOISE_FACTOR:g} × spread))")
    lines = [
        f"## Regression gate — noise and thresholds, {noise.get('gpu_name') or noise.get('gpu_slug')} "
        f"(`{label}`)",
        "",
        f"{len(noise.get('sessions', []))} device sessions, {runs} whole-suite runs; spread = max/min − 1 of "
        f"a benchmark's medians over every run. Threshold = {rule} (`perf/gate.py`); "
        f"{gate.DEFAULT_THRESHOLD:.0%} where no noise was measured.",
        "",
        "| benchmarks | count | spread: median | worst |",
        "|---|--:|--:|--:|",
    ]
    for what, group in (("all measured", measured), ("attn_kernels' own", ours),
                        ("peers", {n: e for n, e in measured.items() if n not in ours})):
        spreads = [e["spread"] for e in group.values()]
        worst = max(group, key=lambda n: group[n]["spread"]) if group else None
        lines.append(f"| {what} | {len(group)} | {_pct(statistics.median(spreads)) if spreads else '—'} | "
                     + (f"{_pct(group[worst]['spread'])} (`{worst.split('::')[-1]}`)" if worst else "—")
                     + " |")
    lines += [
        "",
        "| gated at | benchmarks |",
        "|---|--:|",
        f"| the {gate.MIN_THRESHOLD:.0%} floor | {at_floor} |",
        f"| above the floor, up to the cap ({gate.MIN_THRESHOLD:.0%} – {gate.MAX_THRESHOLD:.0%}) | "
        f"{between} |",
        f"| the {gate.MAX_THRESHOLD:.0%} cap (their noise would need more: measure them more stably) | "
        f"{len(capped)} |",
        f"| not gated: excluded peers (below) | {len(excluded)} |",
        "",
    ]
    if capped:
        lines += ["Gated at the cap (their noise would need more):", ""]
        lines += [f"- `{n.split('::')[-1]}`: spread {_pct(entries[n]['spread'])}, n = {entries[n]['n']}, "
                  f"{gate.NOISE_FACTOR:g} × spread = {_pct(gate.NOISE_FACTOR * entries[n]['spread'])}"
                  for n in capped]
        lines.append("")
    if excluded:
        lines += ["Excluded (reviewed list, `excluded` in the noise file; reported by the gate, not gated):",
                  ""]
        lines += [f"- `{n.split('::')[-1]}`: {why}" for n, why in sorted(excluded.items())]
        lines.append("")
    return lines


def ops_in_order(run: Run) -> list[str]:
    """The run's ops in OP_ORDER; ops it does not name come last."""
    return sorted({b.op for b in run.benches}, key=lambda o: (OP_ORDER + (o,)).index(o))


def beside_plot_dir(extra: Run) -> str:
    """Where a stored run's plots go, relative to REPORT.md: beside its GPU's, in a folder of its own."""
    return f"plots/{extra.slug}/{extra.path.stem}"


def _beside_section(baseline: Run, extra: Run) -> list[str]:
    """A stored run's ops the baseline lacks (runs.beside_baseline): its tables and plots, marked as not
    gated (the gate compares against baselines only)."""
    commit = f"commit {extra.commit[:7]}, " if extra.commit else ""
    lines = [f"### Not in this baseline yet — from `{_path_label(extra.path)}`", "",
             f"Measured on {extra.caption()} ({commit}recorded {extra.datetime or 'unknown'}): a stored run, "
             f"not a baseline, so the gate does not compare against it; the next whole-suite baseline of "
             f"{baseline.gpu} replaces this section.", ""]
    names = plot_names(extra)
    if names:
        lines += [" ".join(f"![{n}]({beside_plot_dir(extra)}/{n}.png)" for n in names), ""]
    for op in ops_in_order(extra):
        lines += [f"#### {op}", "", *_op_table(extra.select(op)), ""]
    return lines[:-1]


def render_markdown(runs: list[Run], noises: list[tuple[dict, str]] = (),
                    training_data: tuple[dict, str] | None = None,
                    beside: dict[str, list[Run]] | None = None) -> str:
    """REPORT.md for the runs, linking each run's plots as plots/<slug>/<name>.png (next to REPORT.md), after
    each run the stored runs' ops it lacks (beside: {gpu slug: runs.beside_baseline(...)}), the training
    check's section (its data, label) when given, and a noise / gate section per (noise file, its label)."""
    beside = beside or {}
    out = [
        "<!-- GENERATED by `python -m perf.report` (`nox -s plots`): do not edit by hand, regenerate. -->",
        "# Benchmark report",
        "",
        "Generated from stored perf runs by `python -m perf.report`; edits are lost when it is regenerated.",
        "",
        "- **median µs**: median device time per call (decode-type ops: per step inside a CUDA graph); "
        "[README.md](README.md) has the method.",
        f"- **floor** = {FLOOR_TEXT}; **% of floor** = floor / median (above 100 % on GPUs faster than "
        "those ceilings).",
        "- **TFLOP/s** (prefill, nominal 273-wide FLOPs) and **GB/s** (decode-type ops): the op's nominal "
        "FLOPs or bytes over the median, whatever an implementation actually moves.",
        "- **attn_kernels speed-up** = peer median / median of the attn_kernels variant named (same op, "
        "shape and variant).",
    ]
    for run in runs:
        out += ["", f"## {run.gpu} — `{_path_label(run.path)}`", "", run.caption() + "  ",
                f"recorded {run.datetime}" if run.datetime else "recorded: unknown", ""]
        names = plot_names(run)
        if names:
            out += [" ".join(f"![{n}](plots/{run.slug}/{n}.png)" for n in names), ""]
        for op in ops_in_order(run):
            benches = run.select(op)
            out += [f"### {op}", "", *_op_table(benches), ""]
        if generation_rows(run):
            out += [*_generation_section(run), ""]
        for extra in beside.get(run.slug, ()):
            out += [*_beside_section(run, extra), ""]
    if training_data is not None:
        data, label = training_data
        out += ["", *training.section(data, label, f"plots/{training.PLOT}.png")]
    for noise, label in noises:
        out += ["", *noise_summary(noise, label)]
    return "\n".join(out).rstrip("\n") + "\n"


def training_file(path: Path = training.DATA) -> tuple[dict, str] | None:
    """(the training check's data, its path label), where the file exists (perf/training.py)."""
    return (training.load(path), _path_label(path)) if Path(path).is_file() else None


def noise_files(runs: list[Run], noise_dir: Path = NOISE_DIR) -> list[tuple[dict, str]]:
    """(noise file, its path label) of each run's GPU, where perf/noise/<gpu-slug>.json exists."""
    out = []
    for run in runs:
        path = Path(noise_dir) / f"{run.slug}.json"
        if path.is_file():
            out.append((json.loads(path.read_text()), _path_label(path)))
    return out


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def beside_runs(runs: list[Run], results_dir: Path | None) -> dict[str, list[Run]]:
    """{gpu slug: what results_dir's stored runs of that GPU add to its run} (nothing when results_dir is
    None)."""
    if results_dir is None:
        return {}
    stored = stored_runs(results_dir)
    return {r.slug: extra for r in runs if (extra := beside_baseline(r, stored))}


def generate(paths: list[Path], out: Path, noise_dir: Path = NOISE_DIR,
             training_path: Path = training.DATA, results_dir: Path | None = None,
             plots: bool = True) -> list[Path]:
    """Write out/plots/<slug>/*.png (unless plots is False) and out/REPORT.md (with the noise / gate section of
    each run's GPU from noise_dir/<gpu-slug>.json) for the runs, the ops that results_dir's stored runs add to
    them (tables and plots, runs.beside_baseline), and the training check's plot and section where
    training_path exists; returns the files written."""
    runs = sorted((load_run(p) for p in paths), key=lambda r: r.slug)
    slugs = [r.slug for r in runs]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if plots and dup:  # plots are stored per GPU model: two runs of one model would overwrite each other's
        raise SystemExit(f"perf.report: more than one run of GPU {', '.join(dup)}; "
                         "give one run per GPU model")
    written = []
    beside = beside_runs(runs, results_dir)
    trained = training_file(training_path)
    if plots:
        for run in runs:
            written += write_plots(run, Path(out) / "plots" / run.slug)
            for extra in beside.get(run.slug, ()):
                written += write_plots(extra, Path(out) / beside_plot_dir(extra))
        if trained is not None:
            written.append(training.plot(trained[0], Path(out) / "plots" / f"{training.PLOT}.png"))
    report = Path(out) / "REPORT.md"
    report.write_text(render_markdown(runs, noise_files(runs, noise_dir), trained, beside))
    return written + [report]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path,
                    help="pytest-benchmark JSON files (default: the newest baseline of each GPU folder)")
    ap.add_argument("--out", type=Path, default=PERF_DIR, help="output folder (default: perf/)")
    ap.add_argument("--noise", type=Path, default=NOISE_DIR,
                    help="noise folder, <gpu-slug>.json per GPU (default: perf/noise/)")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="stored runs that add ops a baseline lacks (default: perf/results/)")
    ap.add_argument("--no-results", action="store_true", help="the baselines alone, no stored runs beside them")
    ap.add_argument("--report-only", action="store_true", help="write REPORT.md only, no plots")
    ap.add_argument("--no-readme", action="store_true",
                    help="leave README.md's generated block (state precision, from perf/results/) alone")
    args = ap.parse_args(argv)
    paths = args.runs or newest_baselines()
    if not paths:
        raise SystemExit(f"perf.report: no runs given and no baselines under {BASELINES}")
    results = None if args.no_results else args.results
    if results is not None and not results.is_dir():
        raise SystemExit(f"perf.report: --results must be a folder of stored runs, got {str(results)!r} "
                         "(--no-results for the baselines alone)")
    written = generate(paths, args.out, args.noise, results_dir=results, plots=not args.report_only)
    if not args.no_readme and drift.update_readme():
        written.append(drift.README)
    for path in written:
        print(path)
    return 0

if __name__ == "__main__":
    sys.exit(main())
