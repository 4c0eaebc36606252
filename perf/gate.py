"""Per-benchmark regression gate: compare a run's pytest-benchmark JSON with a stored baseline.

    python -m perf.gate --baseline B.json --run R.json [R2.json ...] [--noise perf/noise/<slug>.json]
    python -m perf.gate --baseline perf/baselines --run R.json --noise perf/noise   # newest of the run's GPU

Benchmarks are matched by full test name and compared on the median. Each one has its own threshold,
from the run-to-run noise measured by perf/noise_study.py, capped:

    threshold = min(MAX_THRESHOLD, max(MIN_THRESHOLD, NOISE_FACTOR * spread))   spread = max/min - 1

A benchmark with no usable noise entry (or no noise file at all) gets DEFAULT_THRESHOLD (= the cap). It has
regressed when new median / baseline median > 1 + threshold; faster is never a failure.

The gate FAILS (exit 1) when any of these holds, and says which:

* a benchmark regressed;
* a benchmark of the baseline is missing from the run. The one excuse: an optional peer (OPTIONAL_PEERS:
  fla_*, flash_attn, thunderkittens) that the run recorded as skipped because its package is not installed
  (the perf suite's conftest writes ``skipped: {fullname: reason}`` into the run JSON). An attn_kernels id
  is never excused;
* the run is empty (no benchmark ran: the empty file pytest-benchmark leaves when every test skipped);
* there is no baseline for the run's GPU (record one with ``nox -s perf_save -- NAME``).

Also reported, never a failure: benchmarks of the run whose timed rounds drifted, i.e. the median of the
first third of the rounds (stored in order in the run JSON, ``stats.data``) and of the last third differ by
more than DRIFT_LIMIT: their median may not be the code's steady speed (perf/README.md, "Settled before
timing").

A noise file may list reviewed exclusions, ``"excluded": {fullname: reason}``: peers whose noise would need
more than the cap. They are reported, not gated. An attn_kernels id in that list makes the gate refuse the
noise file. Benchmarks only in the run are reported as new. A baseline or noise file from another GPU
model (machine_info gpu_slug) is refused, as is a baseline recorded with the perf suite's deliberate
slow-down switch on.

Exit status: 0 pass, 1 fail, 2 refused / usage error. Importable: ``compare`` and ``format_report``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

MIN_THRESHOLD = 0.03  # below this, run-to-run drift of clocks and placement is not worth a failure
NOISE_FACTOR = 3.0  # a benchmark's threshold in units of its measured spread
# No benchmark is gated looser than this: a slowdown of 10% must never pass. A benchmark noisier than
# that is measured more stably, or (peers only) excluded with its reason in the noise file.
MAX_THRESHOLD = 0.10
# Used where no noise was measured.
DEFAULT_THRESHOLD = MAX_THRESHOLD

# Implementations of this package: never excused when missing, never excluded (perf/test_perf_*.py ids:
# attn_kernels-*, and the Based mixer's step based-* / based_state_bf16-* in based_generation).
OURS = ("attn_kernels", "based", "based_state_bf16")
# Optional peers: implementation prefix -> the package whose absence excuses a missing id.
OPTIONAL_PEERS = {"fla_": "fla", "flash_attn": "flash_attn", "thunderkittens": "thunderkittens"}
# What perf.impls.import_optional skips with when the package is not installed, e.g.
# "fla (fla-core) not available: `import fla.ops.based` failed: ModuleNotFoundError: No module named 'fla'"
_NOT_INSTALLED = re.compile(r"`import (?P<module>[\w.]+)` failed: ModuleNotFoundError: "
                            r"No module named '(?P<missing>[\w.]+)'")

# Reported when the first and last third of a benchmark's timed rounds differ by more than this.
DRIFT_LIMIT = 0.03
DRIFT_MIN_ROUNDS = 9  # fewer rounds than this give thirds too short to compare

EXIT_OK, EXIT_FAIL, EXIT_REFUSED = 0, 1, 2
EXIT_REGRESSION = EXIT_FAIL  # the name the first version used


class GateRefused(Exception):
    """The inputs cannot be compared (other GPU, slowed baseline, missing or malformed file)."""


def impl_of(name: str) -> str:
    """'fla_fused_recurrent' of '...::test_perf_based_decode[fla_fused_recurrent-state_fp32-B64-H16-bf16]'."""
    param = name.rsplit("[", 1)[1].rstrip("]") if "[" in name else ""
    return param.split("-", 1)[0]


def is_ours(name: str) -> bool:
    return impl_of(name) in OURS


def optional_package(name: str) -> str | None:
    """The package of an optional peer's id, None for every other id."""
    impl = impl_of(name)
    return next((pkg for prefix, pkg in OPTIONAL_PEERS.items() if impl.startswith(prefix)), None)


def not_installed_excuse(name: str, reason: str | None) -> bool:
    """True when `name` is an optional peer and `reason` (its skip reason in the run) says that the peer's
    own package is not installed. Any other reason (an error, a broken install, a -k selection) is none."""
    pkg = optional_package(name)
    if pkg is None or not reason or is_ours(name):
        return False
    m = _NOT_INSTALLED.search(reason)
    return bool(m) and m["module"].split(".")[0] == pkg and m["missing"].split(".")[0] == pkg


@dataclass
class Comparison:
    name: str
    baseline_s: float
    new_s: float
    threshold: float
    source: str  # "noise", "capped" (noise would need more than MAX_THRESHOLD) or "default"
    wanted: float | None = None  # the uncapped noise threshold, where it was capped

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
    missing: list[str] = field(default_factory=list)  # in the baseline, not in the run: a failure
    excused: dict[str, str] = field(default_factory=dict)  # missing optional peers not installed -> reason
    excluded: dict[str, str] = field(default_factory=dict)  # reviewed exclusions met in baseline/run
    skipped: dict[str, str] = field(default_factory=dict)  # what the run recorded as skipped, with reasons
    run_slowdown: list[str] = field(default_factory=list)  # ops the run slowed on purpose (the proof)
    drifted: dict[str, float] = field(default_factory=dict)  # run benchmarks whose rounds drifted -> ratio
    empty: bool = False  # the run holds no benchmark

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.compared if c.regressed]

    @property
    def failures(self) -> list[str]:
        """Why the gate fails, one line each; empty when it passes."""
        why = []
        if self.empty:
            why.append("the run holds no benchmark: nothing was gated")
        elif not self.compared:
            why.append("no benchmark of the run is in the baseline: nothing was gated")
        if self.regressions:
            why.append(f"{len(self.regressions)} regressed")
        if self.missing:
            why.append(f"{len(self.missing)} baseline benchmark(s) missing from the run")
        return why

    @property
    def ok(self) -> bool:
        return not self.failures


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


def rounds_drift(rounds: list[float] | None) -> float | None:
    """Median of the first third of the timed rounds / median of the last third (None: too few rounds)."""
    if not rounds or len(rounds) < DRIFT_MIN_ROUNDS:
        return None
    k = len(rounds) // 3
    return statistics.median(rounds[:k]) / statistics.median(rounds[-k:])


def drifted(doc: dict, limit: float = DRIFT_LIMIT) -> dict[str, float]:
    """Full test name -> drift ratio, for the benchmarks whose rounds drifted by more than limit."""
    out = {}
    for b in doc.get("benchmarks", []):
        r = rounds_drift((b.get("stats") or {}).get("data"))
        if r is not None and abs(r - 1.0) > limit:
            out[b["fullname"]] = r
    return out


def excluded_of(noise: dict | None) -> dict[str, str]:
    """The noise file's reviewed exclusions {fullname: reason}; refuses an attn_kernels id or no reason."""
    excluded = (noise or {}).get("excluded") or {}
    if not isinstance(excluded, dict):
        raise GateRefused('the noise file\'s "excluded" must map full test names to reasons')
    ours = sorted(n for n in excluded if is_ours(n))
    if ours:
        raise GateRefused(f"the noise file excludes attn_kernels benchmark(s) {ours}: our own ids are always "
                          f"gated (at most at {MAX_THRESHOLD:.0%}); measure them more stably instead.")
    blank = sorted(n for n, why in excluded.items() if not isinstance(why, str) or not why.strip())
    if blank:
        raise GateRefused(f"the noise file excludes {blank} without a reason")
    return dict(excluded)


def thresholds(noise: dict | None, names, default: float = DEFAULT_THRESHOLD
               ) -> dict[str, tuple[float, str, float | None]]:
    """name -> (threshold, source, uncapped noise threshold or None). A noise entry needs >= 2 medians to give
    a spread. Every threshold is at most MAX_THRESHOLD."""
    if default > MAX_THRESHOLD:
        raise GateRefused(f"default threshold {default:.1%} is above the cap MAX_THRESHOLD "
                          f"({MAX_THRESHOLD:.0%})")
    entries = (noise or {}).get("benchmarks", {})
    out = {}
    for name in names:
        e = entries.get(name)
        if e is not None and e.get("n", 0) >= 2 and e.get("spread") is not None:
            want = max(MIN_THRESHOLD, NOISE_FACTOR * e["spread"])
            out[name] = (want, "noise", None) if want <= MAX_THRESHOLD else (MAX_THRESHOLD, "capped", want)
        else:
            out[name] = (default, "default", None)
    return out


def compare(baseline: dict, run: dict, noise: dict | None = None,
            default_threshold: float = DEFAULT_THRESHOLD) -> GateResult:
    """Compare run with baseline (both pytest-benchmark JSON dicts); raise GateRefused if not comparable."""
    base_slug, run_slug = slug_of(baseline), slug_of(run)
    if base_slug != run_slug:
        raise GateRefused(
            f"the baseline was recorded on GPU {base_slug!r}, this run on {run_slug!r}: timings of different "
            f"GPU models are not comparable. Use perf/baselines/{run_slug}/ or record a baseline for this "
            f"GPU (nox -s perf_save -- NAME)."
        )
    slowed = (baseline.get("machine_info") or {}).get("perf_slowdown")
    if slowed:
        raise GateRefused(f"the baseline was recorded with ATTN_KERNELS_PERF_SLOWDOWN={','.join(slowed)} "
                          f"(a deliberately slowed build): not a baseline.")
    if noise is not None and slug_of(noise) != run_slug:
        raise GateRefused(f"the noise file was measured on GPU {slug_of(noise)!r}, this run on {run_slug!r}.")
    excluded = excluded_of(noise)
    base, new = medians(baseline), medians(run)
    skipped = dict(sorted((run.get("skipped") or {}).items()))
    limits = thresholds(noise, new, default_threshold)
    result = GateResult(baseline_slug=base_slug, skipped=skipped, empty=not new,
                        run_slowdown=(run.get("machine_info") or {}).get("perf_slowdown") or [],
                        drifted=drifted(run))
    for name, median in new.items():
        if name in excluded:
            result.excluded[name] = excluded[name]
        elif name in base:
            result.compared.append(Comparison(name, base[name], median, *limits[name]))
        else:
            result.new.append(name)
    for name in base:
        if name in new:
            continue
        if name in excluded:
            result.excluded[name] = excluded[name]
        elif not_installed_excuse(name, skipped.get(name)):
            result.excused[name] = skipped[name]
        else:
            result.missing.append(name)
    return result


def format_report(result: GateResult, *, run_label: str = "run", baseline_label: str = "baseline",
                  noise_label: str | None = None, default_threshold: float = DEFAULT_THRESHOLD) -> str:
    """Human-readable report; regressions first, each with baseline, new median, threshold and ratio."""
    n = {s: sum(c.source == s for c in result.compared) for s in ("noise", "capped", "default")}
    rule = f"min({MAX_THRESHOLD:.0%}, max({MIN_THRESHOLD:.0%}, {NOISE_FACTOR:g} x spread))"
    lines = [
        f"perf gate ({result.baseline_slug}): {run_label} vs {baseline_label}",
        (f"  thresholds: {rule} from {noise_label} for {n['noise'] + n['capped']} "
         f"({n['capped']} capped at {MAX_THRESHOLD:.0%}), default {default_threshold:.1%} for {n['default']}"
         if noise_label else
         f"  thresholds: default {default_threshold:.1%} for all (no noise file for this GPU)"),
    ]
    if result.run_slowdown:
        lines.append("  this run was slowed on purpose: ATTN_KERNELS_PERF_SLOWDOWN="
                     + ",".join(result.run_slowdown))
    if result.empty:
        lines.append("  EMPTY RUN: no benchmark ran (every test skipped: no CUDA GPU, or attn_kernels not "
                     "built?); an empty run proves nothing and fails the gate")
    regs = sorted(result.regressions, key=lambda c: c.ratio, reverse=True)
    if regs:
        lines.append(f"  REGRESSED: {len(regs)} of {len(result.compared)} compared benchmarks "
                     f"(new median / baseline median > 1 + threshold)")
        lines.append(f"    {'baseline us':>12} {'new us':>12} {'threshold':>10} {'ratio':>7}  benchmark")
        marks = {"default": "*", "capped": "^", "noise": " "}
        for c in regs:
            lines.append(f"    {c.baseline_s * 1e6:>12.3f} {c.new_s * 1e6:>12.3f} "
                         f"{c.threshold:>9.1%}{marks[c.source]} {c.ratio:>7.3f}  {c.name}")
        if any(c.source == "default" for c in regs):
            lines.append("    * default threshold (no noise measured for this benchmark)")
        if any(c.source == "capped" for c in regs):
            lines.append(f"    ^ capped at {MAX_THRESHOLD:.0%} (its measured noise would need more)")
    if result.missing:
        lines.append(f"  MISSING from this run (in the baseline; not excused): {len(result.missing)}")
        for name in result.missing:
            why = result.skipped.get(name)
            lines.append(f"    {name}" + (f"  -- skipped: {why}" if why else "  -- not run (deselected?)"))
    faster = sum(c.ratio < 1.0 - c.threshold for c in result.compared)
    if faster:
        lines.append(f"  faster beyond threshold: {faster} (not a failure; refresh the baseline with "
                     f"`nox -s perf_save -- NAME` to keep them)")
    capped = sorted((c for c in result.compared if c.source == "capped"), key=lambda c: c.name)
    if capped:
        lines.append(f"  gated at the {MAX_THRESHOLD:.0%} cap, their noise would need more "
                     f"(measure them more stably): {len(capped)}")
        lines.extend(f"    {c.wanted:.1%}  {c.name}" for c in capped)
    if result.drifted:
        lines.append(f"  rounds drifted (first / last third of the timed rounds beyond {DRIFT_LIMIT:.0%}; "
                     f"the median may not be the steady speed): {len(result.drifted)}")
        lines.extend(f"    {r:.3f}  {name}" for name, r in sorted(result.drifted.items()))
    if result.excused:
        lines.append(f"  missing, excused (optional peer not installed): {len(result.excused)}")
        lines.extend(f"    {name}  -- {why}" for name, why in result.excused.items())
    if result.excluded:
        lines.append(f"  excluded (reviewed list in the noise file; reported, not gated): "
                     f"{len(result.excluded)}")
        lines.extend(f"    {name}  -- {why}" for name, why in sorted(result.excluded.items()))
    if result.new:
        lines.append(f"  new (not in the baseline, not gated): {len(result.new)}")
        lines.extend(f"    {name}" for name in result.new)
    if result.skipped:
        lines.append(f"  skipped in this run: {len(result.skipped)}")
        lines.extend(f"    {name}  -- {why}" for name, why in result.skipped.items())
    verdict = "PASS" if result.ok else "FAIL (" + "; ".join(result.failures) + ")"
    lines.append(f"  {verdict}: {len(regs)} regressed, {len(result.compared)} compared, "
                 f"{len(result.new)} new, {len(result.missing)} missing, {len(result.excused)} excused, "
                 f"{len(result.excluded)} excluded")
    return "\n".join(lines)


def newest_baseline(folder: Path) -> Path | None:
    """The highest-numbered NNNN_<name>.json in folder (pytest-benchmark's numbering)."""
    files = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.json")) if folder.is_dir() else []
    return files[-1] if files else None


def no_baseline_message(slug: str | None, folder: str | Path, run_path: str | Path) -> str:
    return (f"no baseline for GPU {slug!r} in {folder}: nothing to compare with, the run is NOT gated. "
            f"Record one on this GPU model with `nox -s perf_save -- NAME` and commit "
            f"{folder}/NNNN_NAME.json; or review this run and commit it as the candidate baseline "
            f"(cp {run_path} {folder}/0001_NAME.json).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.gate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True,
                   help="baseline (*.json), or a folder (perf/baselines): the newest file of its <gpu-slug>/")
    p.add_argument("--run", required=True, nargs="+", help="pytest-benchmark JSON of the run(s) to gate")
    p.add_argument("--noise",
                   help="noise file (*.json), or a folder (perf/noise): its <gpu-slug>.json if any")
    p.add_argument("--default-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"threshold where no noise was measured (default and at most {MAX_THRESHOLD})")
    args = p.parse_args(argv)
    if not 0 < args.default_threshold <= MAX_THRESHOLD:
        p.error(f"--default-threshold must be in (0, {MAX_THRESHOLD}]")

    status = EXIT_OK
    for run_path in args.run:
        if Path(run_path).is_file() and Path(run_path).stat().st_size == 0:
            # what pytest-benchmark leaves when no benchmark ran (no GPU, everything skipped)
            print(f"perf gate: FAIL: {run_path} is empty: no benchmark ran (every perf test skipped: no CUDA "
                  f"GPU, or attn_kernels not built). An empty run gates nothing.", file=sys.stderr)
            status = EXIT_FAIL
            continue
        try:
            run = load_json(run_path)
            slug = slug_of(run)
            base_path = Path(args.baseline)
            if base_path.suffix != ".json":
                folder = base_path / str(slug)
                base_path = newest_baseline(folder)
                if base_path is None:
                    print(f"perf gate: FAIL ({run_path}): {no_baseline_message(slug, folder, run_path)}",
                          file=sys.stderr)
                    status = EXIT_FAIL
                    continue
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
            status = EXIT_FAIL
    return status


if __name__ == "__main__":
    sys.exit(main())
