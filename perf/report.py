"""Plots and a Markdown report from stored perf runs (pytest-benchmark JSON).

    python -m perf.report [RUN.json ...] [--out DIR] [--noise DIR] [--report-only]

Without RUN.json: the newest baseline (highest NNNN_*.json) of every perf/baselines/<gpu-slug>/ folder.
Writes DIR/plots/<gpu-slug>/*.png (matplotlib, Agg) and DIR/REPORT.md (DIR defaults to perf/); REPORT.md
ends with each GPU's regression-gate section (noise, thresholds, exclusions) from perf/noise/<gpu-slug>.json,
so no README has to type those numbers. Output is
deterministic: an unchanged run regenerates byte-identical files (sorted rows, fixed formats, no timestamps
in the PNGs).

Only the JSON is read (op, impl, shape, bytes, flops, floor_us in each benchmark's extra_info, the median
from its stats, versions from machine_info): no torch, no GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from perf import gate
from perf.cost import HBM_BYTES_PER_S, PEAK_FLOPS

PERF_DIR = Path(__file__).resolve().parent
REPO_DIR = PERF_DIR.parent
BASELINES = PERF_DIR / "baselines"
NOISE_DIR = PERF_DIR / "noise"

OURS = ("attn_kernels", "based")  # implementation names of this package's kernels (based: the Based mixer)
OP_ORDER = ("based_prefill", "based_decode", "sliding_window_decode", "based_generation")
# Prefill is reported against its nominal FLOPs (the number published kernels quote); the decode-type ops
# move a state or a cache and do little arithmetic, so they are reported in bytes per second.
TFLOPS_OPS = ("based_prefill",)
SHAPE_KEYS = (("B", "B"), ("H", "H"), ("N", "N"), ("ctx", "ctx"), ("window", "W"), ("e", "e"))
MACHINE_KEYS = (("torch_version", "torch"), ("cuda_version", "CUDA"), ("driver_version", "driver"),
                ("cudnn_version", "cuDNN"), ("triton_version", "Triton"), ("fla_version", "fla"))


# --------------------------------------------------------------------------------------------------
# reading runs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bench:
    op: str
    impl: str
    shape: tuple[tuple[str, int], ...]  # (key, value) in SHAPE_KEYS order
    median_us: float
    nbytes: int
    flops: int
    floor_us: float
    tokens_per_s: float | None

    def dim(self, key: str) -> int | None:
        return dict(self.shape).get(key)

    @property
    def base(self) -> str:
        """'fla_fused_recurrent' of 'fla_fused_recurrent-state_fp32'."""
        return self.impl.split("-", 1)[0]

    @property
    def variant(self) -> str:
        """'state_fp32' of 'fla_fused_recurrent-state_fp32' ('' when there is none)."""
        return self.impl.split("-", 1)[1] if "-" in self.impl else ""

    @property
    def ours(self) -> bool:
        return self.base in OURS


@dataclass(frozen=True)
class Run:
    path: Path
    machine: dict
    datetime: str
    benches: tuple[Bench, ...]

    @property
    def slug(self) -> str:
        return self.machine.get("gpu_slug") or "unknown-gpu"

    @property
    def gpu(self) -> str:
        return self.machine.get("gpu_name") or "unknown GPU"

    def caption(self) -> str:
        """'NVIDIA H200 · torch 2.11.0+cu130 · CUDA 13.0 · ...' (versions the run lacks are left out)."""
        versions = [f"{label} {self.machine[k]}" for k, label in MACHINE_KEYS if self.machine.get(k)]
        parts = [self.gpu, *versions]
        return " · ".join(parts)

    def select(self, op: str, **fixed: int) -> list[Bench]:
        return [b for b in self.benches if b.op == op and all(b.dim(k) == v for k, v in fixed.items())]


def _shape(d: dict) -> tuple[tuple[str, int], ...]:
    unknown = set(d) - {k for k, _ in SHAPE_KEYS}
    if unknown:
        raise ValueError(f"unknown shape keys {sorted(unknown)} (perf/report.py SHAPE_KEYS)")
    return tuple((k, int(d[k])) for k, _ in SHAPE_KEYS if k in d)


def load_run(path: Path) -> Run:
    """A pytest-benchmark JSON file -> Run (benchmarks without the suite's extra_info are ignored)."""
    data = json.loads(Path(path).read_text())
    benches = []
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if "op" not in info:
            continue
        benches.append(Bench(
            op=info["op"], impl=info["impl"], shape=_shape(info["shape"]),
            median_us=b["stats"]["median"] * 1e6, nbytes=int(info["bytes"]), flops=int(info["flops"]),
            floor_us=float(info["floor_us"]), tokens_per_s=info.get("tokens_per_s"),
        ))
    return Run(Path(path), data.get("machine_info") or {}, data.get("datetime") or "", tuple(benches))


def newest_baselines(root: Path = BASELINES) -> list[Path]:
    """The newest stored baseline (highest NNNN_ prefix) of every <gpu-slug>/ folder under root."""
    newest = []
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    for folder in folders:
        files = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.json"))
        if files:
            newest.append(files[-1])
    return newest


# --------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------
def shape_label(shape: tuple[tuple[str, int], ...]) -> str:
    """(('B', 64), ('H', 16), ('window', 64), ('e', 64)) -> 'B64 H16 W64 e64'."""
    labels = dict(SHAPE_KEYS)
    return " ".join(f"{labels[k]}{v}" for k, v in shape)


def fmt_us(us: float) -> str:
    return f"{us:,.0f}" if us >= 1000 else f"{us:.1f}" if us >= 100 else f"{us:.2f}"


def throughput(b: Bench) -> tuple[str, float]:
    """('TFLOP/s', value) for prefill, ('GB/s', value) for the decode-type ops."""
    if b.op in TFLOPS_OPS:
        return "TFLOP/s", b.flops / b.median_us * 1e-6
    return "GB/s", b.nbytes / b.median_us * 1e-3


def fmt_throughput(unit: str, x: float) -> str:
    return f"{x:.1f}" if unit == "TFLOP/s" else f"{x:,.0f}"


FLOOR_TEXT = f"max(bytes / {HBM_BYTES_PER_S / 1e12:.1f} TB/s, FLOPs / {PEAK_FLOPS / 1e12:.0f} TFLOP/s)"


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
# plots
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlotSpec:
    name: str  # file name stem
    title: str
    op: str
    fixed: tuple[tuple[str, int], ...]  # shape keys held constant
    x: str  # shape key on the x axis
    xlabel: str


PLOTS = (
    PlotSpec("prefill_vs_n", "based_prefill: time vs sequence length (B=16, H=16, bf16)", "based_prefill",
             (("B", 16), ("H", 16)), "N", "sequence length N"),
    PlotSpec("prefill_vs_b", "based_prefill: time vs batch (N=2048, H=16, bf16)", "based_prefill",
             (("N", 2048), ("H", 16)), "B", "batch B"),
    PlotSpec("decode_vs_b", "based_decode: time per step vs batch (H=16, bf16 inputs)", "based_decode",
             (("H", 16),), "B", "batch B"),
    PlotSpec("sliding_window_vs_b", "sliding_window_decode: time per call vs batch (W=64, e=64, H=16, bf16)",
             "sliding_window_decode", (("window", 64), ("e", 64), ("H", 16)), "B", "batch B"),
)
GENERATION_PLOT = "generation_tokens_per_s"


def plot_names(run: Run) -> list[str]:
    """The plots this run has data for, in PLOTS order (the generation plot last)."""
    names = [s.name for s in PLOTS if run.select(s.op, **dict(s.fixed))]
    if any(b.tokens_per_s for b in run.select("based_generation")):
        names.append(GENERATION_PLOT)
    return names


def _impls_sorted(benches: list[Bench]) -> list[str]:
    ours = sorted({b.impl for b in benches if b.ours})
    return ours + sorted({b.impl for b in benches if not b.ours})


def _floor_series(benches: list[Bench], x: str) -> list[tuple[str, list[tuple[int, float]]]]:
    """One (label, points) per distinct floor curve: the floor depends on the bytes an implementation must
    move (e.g. fp32 vs bf16 decode state), so implementations sharing a curve share one line."""
    by_impl: dict[str, tuple] = {}
    for impl in _impls_sorted(benches):
        by_impl[impl] = tuple(sorted((b.dim(x), b.floor_us) for b in benches if b.impl == impl))
    curves: dict[tuple, list[str]] = {}
    for impl, pts in by_impl.items():
        curves.setdefault(pts, []).append(impl)
    if len(curves) == 1:
        return [("floor", list(next(iter(curves))))]
    out = []
    for pts, impls in curves.items():
        variants = {i.split("-", 1)[1] if "-" in i else i for i in impls}
        who = variants.pop() if len(variants) == 1 else ", ".join(impls)
        out.append((f"floor ({who})", list(pts)))
    return sorted(out)


def _new_figure(run: Run, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.4), layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))  # keep the bottom strip for the caption
    ax.set_title(title, fontsize=11)
    fig.text(0.01, 0.01, f"{run.caption()}\nrun {run.path.name} · median of device time per call · "
             f"floor = {FLOOR_TEXT}", fontsize=7.5, color="0.3", ha="left", va="bottom")
    return fig, ax, plt


def _save(fig, plt, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: reproducible bytes
    plt.close(fig)


def _line_plot(run: Run, spec: PlotSpec, path: Path) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    benches = run.select(spec.op, **dict(spec.fixed))
    fig, ax, plt = _new_figure(run, spec.title)
    cmap = plt.get_cmap("tab10")
    xs = sorted({b.dim(spec.x) for b in benches})
    for i, impl in enumerate(_impls_sorted(benches)):
        pts = sorted((b.dim(spec.x), b.median_us) for b in benches if b.impl == impl)
        ours = impl.split("-", 1)[0] in OURS  # drawn thicker and on top
        ax.plot(*zip(*pts), marker="o", ms=5 if ours else 4, lw=2.4 if ours else 1.3, color=cmap(i % 10),
                label=impl, zorder=3 if ours else 2)
    for j, (label, pts) in enumerate(_floor_series(benches, spec.x)):
        ax.plot(*zip(*pts), color="black", lw=1.2, ls=("--", ":", "-.")[j % 3], label=label, zorder=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(xs))  # label exactly the measured sizes
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(x) for x in xs])
    if len(xs) == 1:
        ax.set_xlim(xs[0] / 2, xs[0] * 2)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel("median time per call (µs, log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    _save(fig, plt, path)


def _generation_plot(run: Run, path: Path) -> None:
    benches = [b for b in run.select("based_generation") if b.tokens_per_s]
    shapes = sorted({b.shape for b in benches})
    impls = _impls_sorted(benches)
    fig, ax, plt = _new_figure(run, "Generation: tokens/s of one mixer layer (Based vs softmax with a full "
                                    "KV cache)")
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        tps = {b.shape: b.tokens_per_s for b in benches if b.impl == impl}
        xs = [k + (i - (len(impls) - 1) / 2) * width for k, s in enumerate(shapes) if s in tps]
        ax.bar(xs, [tps[s] for s in shapes if s in tps], width=width, color=cmap(i % 10), label=impl)
    for k, (_, _, best, ratios) in enumerate(generation_rows(run)):
        if ratios:
            text = "\n".join(f"{i} = {r:.1f}× {best}" for i, r in sorted(ratios.items()))
            ax.annotate(text, (k, 0), xytext=(0, -28), textcoords="offset points", ha="center", va="top",
                        fontsize=8, xycoords=("data", "axes fraction"))
    ax.set_xticks(range(len(shapes)), [shape_label(s) for s in shapes])
    ax.set_ylabel("tokens/s (B / time per step)")  # linear: bar heights compare directly
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    _save(fig, plt, path)


def write_plots(run: Run, plot_dir: Path) -> list[Path]:
    """Every plot the run has data for, as plot_dir/<name>.png."""
    written = []
    for name in plot_names(run):
        path = Path(plot_dir) / f"{name}.png"
        if name == GENERATION_PLOT:
            _generation_plot(run, path)
        else:
            _line_plot(run, next(s for s in PLOTS if s.name == name), path)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------
# REPORT.md
# --------------------------------------------------------------------------------------------------
def _op_table(benches: list[Bench]) -> list[str]:
    unit, _ = throughput(benches[0])
    lines = [f"| shape | implementation | median µs | {unit} | % of floor | attn_kernels speed-up |",
             "|---|---|--:|--:|--:|--:|"]
    for shape in sorted({b.shape for b in benches}):
        group = sorted((b for b in benches if b.shape == shape), key=_impl_order)
        for b in group:
            ref = speedup_ref(b, group)
            speed = f"{b.median_us / ref.median_us:.2f}× ({ref.impl})" if ref else "—"
            name = f"**{b.impl}**" if b.ours else b.impl
            lines.append(f"| {shape_label(shape)} | {name} | {fmt_us(b.median_us)} | "
                         f"{fmt_throughput(unit, throughput(b)[1])} | {100 * b.floor_us / b.median_us:.1f} | "
                         f"{speed} |")
    return lines


def generation_rows(run: Run) -> list[tuple[tuple, dict[str, float], str | None, dict[str, float]]]:
    """Per based_generation shape: (shape, {impl: tokens/s}, faster softmax impl, {Based impl: its tokens/s
    over that softmax's})."""
    benches = [b for b in run.select("based_generation") if b.tokens_per_s]
    rows = []
    for shape in sorted({b.shape for b in benches}):
        tps = {b.impl: b.tokens_per_s for b in benches if b.shape == shape}
        softmax = {i: t for i, t in tps.items() if i.startswith("softmax")}
        best = min(softmax, key=lambda i: (-softmax[i], i)) if softmax else None
        ratios = {i: t / softmax[best] for i, t in tps.items() if best and i.startswith("based")}
        rows.append((shape, tps, best, ratios))
    return rows


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


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


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
        lines.append(f"| {what} | {len(group)} | {_pct(_median(spreads)) if spreads else '—'} | "
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


def render_markdown(runs: list[Run], noises: list[tuple[dict, str]] = ()) -> str:
    """REPORT.md for the runs, linking each run's plots as plots/<slug>/<name>.png (next to REPORT.md), and
    a noise / gate section per (noise file, its label)."""
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
        for op in sorted({b.op for b in run.benches}, key=lambda o: (OP_ORDER + (o,)).index(o)):
            benches = run.select(op)
            out += [f"### {op}", "", *_op_table(benches), ""]
        if generation_rows(run):
            out += [*_generation_section(run), ""]
    for noise, label in noises:
        out += ["", *noise_summary(noise, label)]
    return "\n".join(out).rstrip("\n") + "\n"


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
def generate(paths: list[Path], out: Path, noise_dir: Path = NOISE_DIR) -> list[Path]:
    """Write out/plots/<slug>/*.png and out/REPORT.md (with the noise / gate section of each run's GPU from
    noise_dir/<gpu-slug>.json) for the runs; returns the files written."""
    runs = [load_run(p) for p in paths]
    slugs = [r.slug for r in runs]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:  # plots are stored per GPU model: two runs of one model would overwrite each other's
        raise SystemExit(f"perf.report: more than one run of GPU {', '.join(dup)}; "
                         "give one run per GPU model")
    written = []
    for run in sorted(runs, key=lambda r: r.slug):
        written += write_plots(run, Path(out) / "plots" / run.slug)
    report = Path(out) / "REPORT.md"
    runs = sorted(runs, key=lambda r: r.slug)
    report.write_text(render_markdown(runs, noise_files(runs, noise_dir)))
    return written + [report]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path,
                    help="pytest-benchmark JSON files (default: the newest baseline of each GPU folder)")
    ap.add_argument("--out", type=Path, default=PERF_DIR, help="output folder (default: perf/)")
    ap.add_argument("--noise", type=Path, default=NOISE_DIR,
                    help="noise folder, <gpu-slug>.json per GPU (default: perf/noise/)")
    ap.add_argument("--report-only", action="store_true", help="write REPORT.md only, no plots")
    args = ap.parse_args(argv)
    paths = args.runs or newest_baselines()
    if not paths:
        raise SystemExit(f"perf.report: no runs given and no baselines under {BASELINES}")
    if args.report_only:
        runs = sorted((load_run(p) for p in paths), key=lambda r: r.slug)
        report = Path(args.out) / "REPORT.md"
        report.write_text(render_markdown(runs, noise_files(runs, args.noise)))
        print(report)
        return 0
    for path in generate(paths, args.out, args.noise):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
