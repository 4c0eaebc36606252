"""The training check's loss curves as data, a plot and a REPORT.md section.

tests/test_based_training.py::test_training_matches_reference_cuda trains a small Based model on MQAR three
times (the CUDA kernel; the PyTorch reference in float64; the same in bf16, the comparator) and, with
ATTN_KERNELS_TRAINING_JSON naming a file, writes the curves there (record()). Commit the file as
perf/results/based_training.json; `python -m perf.report` then draws perf/plots/based_training.png (plot())
and adds a section to REPORT.md (section()). Pure Python; matplotlib for the plot.

The file: {"source", "device", "torch", "date", "config": {TrainConfig's fields},
           "runs": {"attn_kernels" | "reference_fp64" | "reference_bf16":
                    {"loss": [per step], "eval_accuracy", "eval_queries"}},
           "measured": {"curve_ratio", "kernel_deviation", "lowp_spread", "accuracy_gap",
                        "accuracy_margin"}}
"""
from __future__ import annotations

import json
import os
from datetime import date as _date
from pathlib import Path

from perf.runs import PERF_DIR

DATA = PERF_DIR / "results" / "based_training.json"
PLOT = "based_training"  # plots/<PLOT>.png next to REPORT.md
ENV = "ATTN_KERNELS_TRAINING_JSON"
TEST = "tests/test_based_training.py::test_training_matches_reference_cuda"
SOURCE = f"{TEST} with {ENV}"
EPS_BF16 = 2.0**-7  # the curve rule's floor (tests/training_model.py)
RUNS = {  # run -> legend label, in drawing order
    "attn_kernels": "attn_kernels (CUDA forward + backward)",
    "reference_fp64": "PyTorch reference, float64",
    "reference_bf16": "PyTorch reference, bf16 (comparator)",
}
MEASURED = ("curve_ratio", "kernel_deviation", "lowp_spread", "accuracy_gap", "accuracy_margin")


def make_data(config: dict, runs: dict, measured: dict, *, device: str, torch_version: str,
              date: str | None = None) -> dict:
    data = {"source": SOURCE, "device": device, "torch": str(torch_version),
            "date": date or _date.today().isoformat(), "config": dict(config),
            "runs": {k: dict(runs[k]) for k in RUNS}, "measured": {k: float(measured[k]) for k in MEASURED}}
    validate(data)
    return data


def validate(data: dict) -> None:
    """ValueError unless every run and measurement is there and the curves have one loss per step."""
    missing = [k for k in ("source", "device", "config", "runs", "measured") if k not in data]
    missing += [f"runs/{k}" for k in RUNS if k not in data.get("runs", {})]
    missing += [f"measured/{k}" for k in MEASURED if k not in data.get("measured", {})]
    if missing:
        raise ValueError(f"training data lacks {', '.join(missing)} (run {TEST} with {ENV} set)")
    steps = data["config"].get("steps")
    bad = [k for k in RUNS if len(data["runs"][k]["loss"]) != steps]
    if bad:
        raise ValueError(f"training data: {', '.join(bad)} do not have one loss per step ({steps})")


def record(data: dict, path: str | Path | None = None) -> Path | None:
    """Write data to path (default: the file $ATTN_KERNELS_TRAINING_JSON names; neither: nothing, None)."""
    path = path or os.environ.get(ENV)
    if not path:
        return None
    validate(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load(path: str | Path = DATA) -> dict:
    data = json.loads(Path(path).read_text())
    validate(data)
    return data


def _tail_mean(xs: list[float], n: int = 10) -> float:
    return sum(xs[-n:]) / len(xs[-n:])


def section(data: dict, label: str, plot_link: str) -> list[str]:
    """REPORT.md's training section: what ran, the figure, one row per run."""
    cfg, m = data["config"], data["measured"]
    lines = [
        f"## Training check — based_prefill's backward (`{label}`)",
        "",
        f"{data['device']} · torch {data['torch']} · {data['date']} · `{TEST}`",
        "",
        f"A one-layer Based model (d_model {cfg['d_model']}, {cfg['heads']} heads of 16 / 64, short "
        f"convolution {cfg['conv']}) trained {cfg['steps']} AdamW steps on MQAR (vocabulary {cfg['vocab']}, "
        f"sequences of {cfg['seq_len']}, {cfg['kv_pairs']} key-value pairs, batch {cfg['batch']}), from "
        "equal weights on equal batches; only the attention differs. Rule: at every step "
        f"|L_kernel − L_fp64| ≤ 2 · max |L_bf16 − L_fp64| + 2⁻⁷ · L_fp64 (worst step: {m['curve_ratio']:.3g} "
        f"× the bound; largest |L_kernel − L_fp64| {m['kernel_deviation']:.2e}, the comparator's "
        f"{m['lowp_spread']:.2e}). "
        f"Held-out accuracy gap {m['accuracy_gap']:.4f} (margin {m['accuracy_margin']:.4f}).",
        "",
        f"![{PLOT}]({plot_link})",
        "",
        "| run | loss, first step | loss, mean of the last 10 steps | held-out accuracy |",
        "|---|--:|--:|--:|",
    ]
    for key, name in RUNS.items():
        run = data["runs"][key]
        lines.append(f"| {name} | {run['loss'][0]:.4f} | {_tail_mean(run['loss']):.4f} | "
                     f"{run['eval_accuracy']:.4f} ({run['eval_queries']:,} queries) |")
    return lines


def plot(data: dict, path: Path) -> Path:
    """Loss per step of the three runs (log scale), and each run's distance to the float64 reference with the
    rule's bound; deterministic bytes (no version stamp)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    ref = runs["reference_fp64"]["loss"]
    steps = list(range(1, len(ref) + 1))
    spread = max(abs(a - b) for a, b in zip(runs["reference_bf16"]["loss"], ref))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 7.0), sharex=True, layout="constrained",
                                      height_ratios=(3, 2))
    fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    colors = {"attn_kernels": "tab:blue", "reference_fp64": "black", "reference_bf16": "tab:orange"}
    styles = {"attn_kernels": "-", "reference_fp64": "--", "reference_bf16": ":"}
    for key, name in RUNS.items():
        top.plot(steps, runs[key]["loss"], styles[key], color=colors[key], lw=1.4,
                 label=f"{name}: accuracy {runs[key]['eval_accuracy']:.3f}")
    top.set_yscale("log")
    top.set_ylabel("training loss (log)")
    top.set_title("Based on MQAR: the CUDA kernel vs the PyTorch reference (same weights, same batches)",
                  fontsize=11)
    top.legend(fontsize=8, frameon=False)
    top.grid(True, which="both", alpha=0.3)
    for key in ("attn_kernels", "reference_bf16"):
        gaps = [abs(a - b) for a, b in zip(runs[key]["loss"], ref)]
        bottom.plot(steps, gaps, styles[key], color=colors[key], lw=1.2, label=f"|{key} − reference_fp64|")
    bottom.plot(steps, [2 * spread + EPS_BF16 * abs(b) for b in ref], color="black", lw=1.0,
                label="bound: 2 · max |reference_bf16 − reference_fp64| + 2⁻⁷ · loss")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("|Δ loss| (log)")
    bottom.legend(fontsize=8, frameon=False)
    bottom.grid(True, which="both", alpha=0.3)
    fig.text(0.01, 0.01, f"{data['device']} · torch {data['torch']} · {data['date']} · {TEST}", fontsize=7.5,
             color="0.3", ha="left", va="bottom")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
