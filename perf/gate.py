"""Per-benchmark regression gate: compare a run's pytest-benchmark JSON with a stored baseline.

    python perf/gate.py --baseline B.json --run R.json [R2.json ...] [--noise perf/noise/<slug>.json]
    python perf/gate.py --baseline perf/baselines --run R.json --noise perf/noise   # newest of the run's GPU

Benchmarks are matched by full test name and compared on the median. Each one has its own threshold,
from the run-to-run noise measured by perf/noise_study.py:

    threshold = max(MIN_THRESHOLD, NOISE_FACTOR * spread)      spread = max/min - 1 of its medians

A benchmark with no usable noise entry (or no noise file at all) gets DEFAULT_THRESHOLD. It has regressed
when new median / baseline median > 1 + threshold; faster is never a failure. Benchmarks only in the run
are reported as new, benchmarks only in the baseline as missing; neither fails the gate. A baseline or
noise file from another GPU model (machine_info gpu_slug) is refused, as is a baseline recorded with the
perf suite's deliberate slow-down switch on.

Exit status: 0 pass, 1 regression, 2 refused / usage error. Importable: ``compare`` and ``format_report``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

MIN_THRESHOLD = 0.03  # below this, run-to-run drift of clocks and placement is not worth a failure
NOISE_FACTOR = 3.0  # a benchmark's threshold in units of its measured spread
# Used where no noise was measured: the global threshold `nox -s perf` used before the noise study.
DEFAULT_THRESHOLD = 0.10

EXIT_OK, EXIT_REGRESSION, EXIT_REFUSED = 0, 1, 2


class GateRefused(Exception):
    """The inputs cannot be compared (other GPU, slowed baseline, missing or malformed file)."""


@dataclass
class Comparison:
    name: str
    baseline_s: float
    new_s: float
    threshold: float
    source: str  # "noise" or "default"

    @property
    def ratio(self) -> float:
        return self.new_s / self.baseline_s

    @property
    def regressed(self) -> bool:
        return self.ratio > 1.0 + self.threshold


@dataclass
class GateResult:
    baseline_slug: str
    compared: list[Comparison] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the run, not in the baseline
    missing: list[str] = field(default_factory=list)  # in the baseline, not in the run
    run_slowdown: list[str] = field(default_factory=list)  # ops the run slowed on purpose (the proof)

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.compared if c.regressed]

    @property
    def ok(self) -> bool:
        return not self.regressions


def load_json(path: str | Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise GateRefused(f"cannot read {path}: {exc}") from exc


def slug_of(doc: dict) -> str | None:
    """The GPU slug a pytest-benchmark JSON (machine_info) or a noise file (top level) was recorded on."""
    return doc.get("gpu_slug") or (doc.get("machine_info") or {}).get("gpu_slug")


def medians(doc: dict) -> dict[str, float]:
    """Full test name -> median seconds, from a pytest-benchmark JSON."""
    return {b["fullname"]: b["stats"]["median"] for b in doc.get("benchmarks", [])
            if (b.get("stats") or {}).get("median")}


def thresholds(noise: dict | None, names, default: float = DEFAULT_THRESHOLD) -> dict[str, tuple[float, str]]:
    """name -> (threshold, source). A noise entry needs >= 2 medians to give a spread."""
    entries = (noise or {}).get("benchmarks", {})
    out = {}
    for name in names:
        e = entries.get(name)
        if e is not None and e.get("n", 0) >= 2 and e.get("spread") is not None:
            out[name] = (max(MIN_THRESHOLD, NOISE_FACTOR * e["spread"]), "noise")
        else:
            out[name] = (default, "default")
    return out


def compare(baseline: dict, run: dict, noise: dict | None = None,
            default_threshold: float = DEFAULT_THRESHOLD) -> GateResult:
    """Compare run with baseline (both pytest-benchmark JSON dicts); raise GateRefused if not comparable."""
    base_slug, run_slug = slug_of(baseline), slug_of(run)
    if base_slug != run_slug:
        raise GateRefused(
            f"the baseline was recorded on GPU {base_slug!r}, this run on {run_slug!r}: timings of different "
            f"GPU models are not comparable. Use perf/baselines/{run_slug}/ or record a baseline for this "
            f"GPU (nox -s perf_save)."
        )
    slowed = (baseline.get("machine_info") or {}).get("perf_slowdown")
    if slowed:
        raise GateRefused(f"the baseline was recorded with ATTN_KERNELS_PERF_SLOWDOWN={','.join(slowed)} "
                          f"(a deliberately slowed build): not a baseline.")
    if noise is not None and slug_of(noise) != run_slug:
        raise GateRefused(f"the noise file was measured on GPU {slug_of(noise)!r}, this run on {run_slug!r}.")
    base, new = medians(baseline), medians(run)
    limits = thresholds(noise, new, default_threshold)
    result = GateResult(baseline_slug=base_slug,
                        run_slowdown=(run.get("machine_info") or {}).get("perf_slowdown") or [])
    for name, median in new.items():
        if name in base:
            result.compared.append(Comparison(name, base[name], median, *limits[name]))
        else:
            result.new.append(name)
    result.missing = [name for name in base if name not in new]
    return result


def format_report(result: GateResult, *, run_label: str = "run", baseline_label: str = "baseline",
                  noise_label: str | None = None, default_threshold: float = DEFAULT_THRESHOLD) -> str:
    """Human-readable report; regressions first, each with baseline, new median, threshold and ratio."""
    n_noise = sum(c.source == "noise" for c in result.compared)
    rule = f"max({MIN_THRESHOLD:.0%}, {NOISE_FACTOR:g} x spread)"
    lines = [
        f"perf gate ({result.baseline_slug}): {run_label} vs {baseline_label}",
        (f"  thresholds: {rule} from {noise_label} for {n_noise}, "
         f"default {default_threshold:.1%} for {len(result.compared) - n_noise}" if noise_label else
         f"  thresholds: default {default_threshold:.1%} for all (no noise file for this GPU)"),
    ]
    if result.run_slowdown:
        lines.append("  this run was slowed on purpose: ATTN_KERNELS_PERF_SLOWDOWN="
                     + ",".join(result.run_slowdown))
    regs = sorted(result.regressions, key=lambda c: c.ratio, reverse=True)
    if regs:
        lines.append(f"  REGRESSED: {len(regs)} of {len(result.compared)} compared benchmarks "
                     f"(new median / baseline median > 1 + threshold)")
        lines.append(f"    {'baseline us':>12} {'new us':>12} {'threshold':>10} {'ratio':>7}  benchmark")
        for c in regs:
            lines.append(f"    {c.baseline_s * 1e6:>12.3f} {c.new_s * 1e6:>12.3f} "
                         f"{c.threshold:>9.1%}{'*' if c.source == 'default' else ' '} "
                         f"{c.ratio:>7.3f}  {c.name}")
        if any(c.source == "default" for c in regs):
            lines.append("    * default threshold (no noise measured for this benchmark)")
    faster = sum(c.ratio < 1.0 - c.threshold for c in result.compared)
    if faster:
        lines.append(f"  faster beyond threshold: {faster} (not a failure; refresh the baseline with "
                     f"`nox -s perf_save` to keep them)")
    for label, names in (("new (not in the baseline, not gated)", result.new),
                         ("missing from this run (in the baseline)", result.missing)):
        if names:
            lines.append(f"  {label}: {len(names)}")
            lines.extend(f"    {n}" for n in names)
    lines.append(f"  {'FAIL' if regs else 'PASS'}: {len(regs)} regressed, {len(result.compared)} compared, "
                 f"{len(result.new)} new, {len(result.missing)} missing")
    return "\n".join(lines)


def newest_baseline(folder: Path) -> Path | None:
    """The highest-numbered NNNN_<name>.json in folder (pytest-benchmark's numbering)."""
    files = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.json")) if folder.is_dir() else []
    return files[-1] if files else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True,
                   help="baseline (*.json), or a folder (perf/baselines): the newest file of its <gpu-slug>/")
    p.add_argument("--run", required=True, nargs="+", help="pytest-benchmark JSON of the run(s) to gate")
    p.add_argument("--noise",
                   help="noise file (*.json), or a folder (perf/noise): its <gpu-slug>.json if any")
    p.add_argument("--default-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"threshold where no noise was measured (default {DEFAULT_THRESHOLD})")
    p.add_argument("--allow-missing-baseline", action="store_true",
                   help="with a baseline folder: pass (and say so) when it has no baseline for this GPU")
    args = p.parse_args(argv)

    status = EXIT_OK
    for run_path in args.run:
        if Path(run_path).is_file() and Path(run_path).stat().st_size == 0:
            # what pytest-benchmark leaves when no benchmark ran (no GPU: the suite skips)
            print(f"perf gate: {run_path} is empty: no benchmark ran, nothing to gate")
            continue
        try:
            run = load_json(run_path)
            slug = slug_of(run)
            base_path = Path(args.baseline)
            if base_path.suffix != ".json":
                base_path = newest_baseline(base_path / str(slug))
                if base_path is None:
                    msg = f"no baseline for GPU {slug!r} in {args.baseline}/{slug}/"
                    if args.allow_missing_baseline:
                        print(f"perf gate: {msg}: not gated. Record one with `nox -s perf_save`.")
                        continue
                    raise GateRefused(msg)
            noise_path = Path(args.noise) if args.noise else None
            if noise_path is not None and noise_path.suffix != ".json":  # a folder, perhaps not made yet
                noise_path = noise_path / f"{slug}.json"
                noise_path = noise_path if noise_path.is_file() else None
            noise = load_json(noise_path) if noise_path else None
            result = compare(load_json(base_path), run, noise, args.default_threshold)
        except GateRefused as exc:
            print(f"perf gate: REFUSED ({run_path}): {exc}", file=sys.stderr)
            return EXIT_REFUSED
        print(format_report(result, run_label=run_path, baseline_label=str(base_path),
                            noise_label=str(noise_path) if noise_path else None,
                            default_threshold=args.default_threshold))
        if not result.ok:
            status = EXIT_REGRESSION
    return status


if __name__ == "__main__":
    sys.exit(main())
