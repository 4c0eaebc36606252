"""The plots of a stored perf run (matplotlib, Agg): time vs size per op against the floor, sliding-window
prefill time per shape, and generation tokens/s. Written by `python -m perf.report` (perf/report.py) as
plots/<gpu-slug>/<name>.png; deterministic bytes (no version stamp, no timestamp), so an unchanged run
regenerates identical PNGs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from perf.runs import FLOOR_TEXT, OURS, Bench, Run, generation_rows, shape_label


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
    PlotSpec("prefill_backward_vs_n", "based_prefill_backward: time vs sequence length (B=16, H=16, bf16)",
             "based_prefill_backward", (("B", 16), ("H", 16)), "N", "sequence length N"),
    PlotSpec("prefill_train_vs_n", "based_prefill_train: forward + backward vs length (B=16, H=16, bf16)",
             "based_prefill_train", (("B", 16), ("H", 16)), "N", "sequence length N"),
    PlotSpec("decode_vs_b", "based_decode: time per step vs batch (H=16, bf16 inputs)", "based_decode",
             (("H", 16),), "B", "batch B"),
    PlotSpec("sliding_window_vs_b", "sliding_window_decode: time per call vs batch (W=64, e=64, H=16, bf16)",
             "sliding_window_decode", (("window", 64), ("e", 64), ("H", 16)), "B", "batch B"),
)
GENERATION_PLOT = "generation_tokens_per_s"
# sliding_window_prefill's shapes vary several keys at once (B, N, window, e), so no axis fits them: bars per shape.
SWP_PLOT = "sliding_window_prefill_by_shape"


def plot_names(run: Run) -> list[str]:
    """The plots this run has data for, in PLOTS order (then the sliding-window prefill bars, the generation
    plot last)."""
    names = [s.name for s in PLOTS if run.select(s.op, **dict(s.fixed))]
    if run.select("sliding_window_prefill"):
        names.append(SWP_PLOT)
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


def _grouped_bars(ax, plt, shapes: list, values: dict[str, dict]) -> None:
    """One group of bars per shape (x = its index), one bar per implementation ({impl: {shape: value}}, in
    order: ours first)."""
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(values)
    for i, (impl, by_shape) in enumerate(values.items()):
        xs = [k + (i - (len(values) - 1) / 2) * width for k, s in enumerate(shapes) if s in by_shape]
        ax.bar(xs, [by_shape[s] for s in shapes if s in by_shape], width=width, color=cmap(i % 10), label=impl)


def _generation_plot(run: Run, path: Path) -> None:
    benches = [b for b in run.select("based_generation") if b.tokens_per_s]
    shapes = sorted({b.shape for b in benches})
    impls = _impls_sorted(benches)
    fig, ax, plt = _new_figure(run, "Generation: tokens/s of one mixer layer (Based vs softmax with a full "
                                    "KV cache)")
    _grouped_bars(ax, plt, shapes, {i: {b.shape: b.tokens_per_s for b in benches if b.impl == i} for i in impls})
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


def _swp_plot(run: Run, path: Path) -> None:
    benches = run.select("sliding_window_prefill")
    shapes = sorted({b.shape for b in benches}, key=lambda s: (dict(s)["e"], dict(s)["window"], s))
    impls = _impls_sorted(benches)
    fig, ax, plt = _new_figure(run, "sliding_window_prefill: time per shape (bf16; ours includes the ring-buffer "
                                    "fill)")
    _grouped_bars(ax, plt, shapes, {i: {b.shape: b.median_us for b in benches if b.impl == i} for i in impls})
    for k, shape in enumerate(shapes):
        floor = next(b.floor_us for b in benches if b.shape == shape)
        ax.hlines(floor, k - 0.45, k + 0.45, color="black", lw=1.2, label="floor" if k == 0 else None, zorder=3)
    labels = [shape_label(s).replace(" N", "\nN").replace(" W", "\nW") for s in shapes]
    ax.set_xticks(range(len(shapes)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (µs, log)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    _save(fig, plt, path)


def write_plots(run: Run, plot_dir: Path) -> list[Path]:
    """Every plot the run has data for, as plot_dir/<name>.png."""
    written = []
    for name in plot_names(run):
        path = Path(plot_dir) / f"{name}.png"
        if name == GENERATION_PLOT:
            _generation_plot(run, path)
        elif name == SWP_PLOT:
            _swp_plot(run, path)
        else:
            _line_plot(run, next(s for s in PLOTS if s.name == name), path)
        written.append(path)
    return written
