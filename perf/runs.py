"""Stored perf runs (pytest-benchmark JSON) as data: Run and Bench, the newest baseline of each GPU, the
labels and derived rows both the report (perf/report.py) and its plots (perf/figures.py) show.

Only the JSON is read (op, impl, shape, bytes, flops, floor_us, and tokens_per_s / saved_vs_qkvo where
present, in each benchmark's extra_info; the median from its stats, versions from machine_info): no torch,
no GPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from perf.cost import HBM_BYTES_PER_S, PEAK_FLOPS

PERF_DIR = Path(__file__).resolve().parent
REPO_DIR = PERF_DIR.parent
BASELINES = PERF_DIR / "baselines"
RESULTS = PERF_DIR / "results"

OURS = ("attn_kernels", "based")  # implementation names of this package's kernels (based: the Based mixer)
SHAPE_KEYS = (("B", "B"), ("n", "n"), ("H", "H"), ("N", "N"), ("T", "T"), ("longest", "longest"), ("ctx", "ctx"),
              ("window", "W"), ("e", "e"))
MACHINE_KEYS = (("torch_version", "torch"), ("cuda_version", "CUDA"), ("driver_version", "driver"),
                ("cudnn_version", "cuDNN"), ("triton_version", "Triton"), ("fla_version", "fla"))
FLOOR_TEXT = f"max(bytes / {HBM_BYTES_PER_S / 1e12:.1f} TB/s, FLOPs / {PEAK_FLOPS / 1e12:.0f} TFLOP/s)"


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
    saved_vs_qkvo: float | None = None  # backward, training: memory the forward keeps / q, k, v, o bytes

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
    commit: str = ""  # commit_info id, where recorded

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
        raise ValueError(f"unknown shape keys {sorted(unknown)} (perf/runs.py SHAPE_KEYS)")
    return tuple((k, int(d[k])) for k, _ in SHAPE_KEYS if k in d)


def load_run(path: Path) -> Run:
    """A pytest-benchmark JSON file -> Run (benchmarks without the suite's extra_info are ignored)."""
    return _run_of(Path(path), json.loads(Path(path).read_text()))


def _run_of(path: Path, data: dict) -> Run:
    """Run of a parsed pytest-benchmark JSON document read from path."""
    benches = []
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if "op" not in info:
            continue
        benches.append(Bench(
            op=info["op"], impl=info["impl"], shape=_shape(info["shape"]),
            median_us=b["stats"]["median"] * 1e6, nbytes=int(info["bytes"]), flops=int(info["flops"]),
            floor_us=float(info["floor_us"]), tokens_per_s=info.get("tokens_per_s"),
            saved_vs_qkvo=info.get("saved_vs_qkvo"),
        ))
    return Run(path, data.get("machine_info") or {}, data.get("datetime") or "", tuple(benches),
               str((data.get("commit_info") or {}).get("id") or ""))


def newest_baselines(root: Path = BASELINES) -> list[Path]:
    """The newest stored baseline (highest NNNN_ prefix) of every <gpu-slug>/ folder under root."""
    newest = []
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    for folder in folders:
        files = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.json"))
        if files:
            newest.append(files[-1])
    return newest


def stored_runs(root: Path = RESULTS) -> list[Run]:
    """The pytest-benchmark runs stored under root (perf/results/: runs that are not a baseline, e.g. a part of
    the suite measured before the next whole-suite baseline), in path order; other JSON there (the training
    check's data, the decode drift) is left out. Each file is parsed once."""
    files = sorted(Path(root).glob("*.json")) if Path(root).is_dir() else []
    docs = ((p, json.loads(p.read_text())) for p in files)
    return [_run_of(p, d) for p, d in docs if isinstance(d.get("benchmarks"), list)]


def beside_baseline(baseline: Run, stored: list[Run]) -> list[Run]:
    """What the stored runs of the baseline's GPU measured that the baseline lacks: per op with at least one
    benchmark (impl, shape) missing from the baseline, that op's benchmarks from the newest such run (by its
    recorded date). One Run per source file, restricted to the ops it supplies, ordered by path."""
    have = {(b.op, b.impl, b.shape) for b in baseline.benches}
    same_gpu = sorted((r for r in stored if r.slug == baseline.slug), key=lambda r: (r.datetime, str(r.path)),
                      reverse=True)
    chosen: dict[Path, list[Bench]] = {}
    for op in sorted({b.op for r in same_gpu for b in r.benches}):
        for r in same_gpu:
            benches = r.select(op)
            if any((b.op, b.impl, b.shape) not in have for b in benches):
                chosen.setdefault(r.path, []).extend(benches)
                break
    by_path = {r.path: r for r in same_gpu}
    return [Run(p, by_path[p].machine, by_path[p].datetime, tuple(bs), by_path[p].commit)
            for p, bs in sorted(chosen.items())]


def shape_label(shape: tuple[tuple[str, int], ...]) -> str:
    """(('B', 64), ('H', 16), ('window', 64), ('e', 64)) -> 'B64 H16 W64 e64'."""
    labels = dict(SHAPE_KEYS)
    return " ".join(f"{labels[k]}{v}" for k, v in shape)


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
