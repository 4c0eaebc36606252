"""Run-to-run noise of the perf suite: the thresholds of perf/gate.py come from here.

    python -m perf.noise_study [-n 5] [--append [--retire SUBSTRING]] [--session LABEL] [--keep-json DIR]
                               [-- PYTEST_ARGS]
    python -m perf.noise_study --from-json r1.json r2.json ... [--append] [--session LABEL]
    python -m perf.noise_study --held-out BASELINE.json [--out NOISE.json]

Runs ``python -m pytest perf --benchmark-json=...`` n times (default 5) on unchanged code, one subprocess
per repetition (a fresh CUDA context, compilation caches as a user's rerun would find them), or takes
existing pytest-benchmark JSON files (--from-json), and writes perf/noise/<gpu-slug>.json:

* ``sessions``: one per device session (label, date, machine_info, the repetitions' dates / exit codes /
  pytest args);
* ``excluded`` (written by hand, reviewed, kept by --append): {full test name: reason} of peers whose noise
  would need a threshold above the gate's cap (gate.MAX_THRESHOLD); the gate reports them and does not gate
  them. attn_kernels ids are never excluded (the gate refuses such a file);
* ``benchmarks``: per full test name, the median of every repetition grouped by session (``medians_s``),
  their count ``n``, ``spread`` = max/min - 1 over all of them (what the gate uses: the baseline comes
  from another session, so between-session drift counts) and ``spread_within_session`` (the largest
  spread inside one session).

--retire SUBSTRING (with --append, repeatable) first drops the earlier medians of every benchmark whose name
contains SUBSTRING: the code it times has changed (a new kernel version), so the old code's noise no longer
applies; the session records what it retired.

--append merges into an existing file (refused if it was measured on another GPU); repetitions go to a
new session unless --session names an existing one (to continue a session whose runs did not fit in one
command). The file is rewritten after every repetition, so a killed study keeps what it finished.

--held-out checks the thresholds out of sample: every repetition in the noise file is gated against the
baseline with thresholds from all the *other* repetitions (so a run never widens its own threshold).
Exit 1 if any repetition of unchanged code would have failed the gate.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from perf import gate

PERF_DIR = Path(__file__).resolve().parent
NOISE_DIR = PERF_DIR / "noise"
ROOT = PERF_DIR.parent
FORMAT = 1

# The targets for the spread of the median, by the benchmark's time.
TARGET_SHORT, TARGET_LONG, LONG_S = 0.05, 0.03, 20e-6


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _slim_machine_info(info: dict) -> dict:
    """machine_info without the CPU flag list (hundreds of entries, no bearing on GPU timings)."""
    out = {k: v for k, v in info.items() if k != "cpu"}
    cpu = info.get("cpu") or {}
    out["cpu"] = {k: cpu.get(k) for k in ("brand_raw", "count") if k in cpu}
    return out


def new_study(slug: str, gpu_name: str | None) -> dict:
    return {"format": FORMAT, "gpu_slug": slug, "gpu_name": gpu_name, "excluded": {}, "sessions": [],
            "benchmarks": {}}


def start_session(study: dict, label: str | None, machine_info: dict) -> str:
    """Return the label repetitions go to: an existing session's, or a new one's."""
    if label is not None and any(s["label"] == label for s in study["sessions"]):
        return label
    label = label or f"session-{len(study['sessions']) + 1}"
    study["sessions"].append({"label": label, "date": _now(),
                              "machine_info": _slim_machine_info(machine_info), "repetitions": []})
    return label


def retire(study: dict, substrings: list[str], label: str) -> list[str]:
    """Drop the medians of the benchmarks whose name contains one of `substrings` (their code changed) and
    note it in session `label`. Returns the names dropped."""
    gone = sorted(n for n in study["benchmarks"] if any(s in n for s in substrings))
    for name in gone:
        del study["benchmarks"][name]
    session = next(s for s in study["sessions"] if s["label"] == label)
    session.setdefault("retired", []).extend(substrings)
    return gone


def add_repetition(study: dict, label: str, run: dict, *, rc: int | None = None,
                   pytest_args: list[str] | None = None) -> None:
    """Add one pytest-benchmark JSON (one run of the suite) to session `label` and refresh the spreads."""
    slug = (run.get("machine_info") or {}).get("gpu_slug")
    if slug != study["gpu_slug"]:
        raise SystemExit(f"noise study: a run on GPU {slug!r} cannot join the study of {study['gpu_slug']!r}")
    session = next(s for s in study["sessions"] if s["label"] == label)
    rep = {"date": run.get("datetime") or _now(), "n_benchmarks": len(run.get("benchmarks", []))}
    if rc is not None:
        rep["pytest_rc"] = rc
    if pytest_args is not None:
        rep["pytest_args"] = pytest_args
    session["repetitions"].append(rep)
    for b in run.get("benchmarks", []):
        median = (b.get("stats") or {}).get("median")
        if median:
            entry = study["benchmarks"].setdefault(b["fullname"], {"medians_s": {}})
            entry["medians_s"].setdefault(label, []).append(median)
    for entry in study["benchmarks"].values():
        _summarise(entry)


def _spread(values: list[float]) -> float | None:
    return max(values) / min(values) - 1.0 if len(values) >= 2 else None


def _summarise(entry: dict) -> None:
    every = [m for ms in entry["medians_s"].values() for m in ms]
    within = [s for s in (_spread(ms) for ms in entry["medians_s"].values()) if s is not None]
    entry.update(n=len(every), median_s=sorted(every)[len(every) // 2], spread=_spread(every),
                 spread_within_session=max(within) if within else None)


def held_out(study: dict, baseline: dict) -> list[tuple[str, int, gate.GateResult]]:
    """(session label, repetition number, gate result) for every repetition of the study, gated against
    `baseline` with thresholds from the noise of every other repetition. The baseline's own run (the
    same medians) is skipped; so is a benchmark whose medians do not line up with its session's
    repetitions (a repetition that did not run it)."""
    base = gate.medians(baseline)
    results = []
    for session in study["sessions"]:
        label, reps = session["label"], session["repetitions"]
        for k in range(len(reps)):
            run_medians = {}
            rest = {"gpu_slug": study["gpu_slug"], "excluded": study.get("excluded", {}), "benchmarks": {}}
            for name, entry in study["benchmarks"].items():
                medians = entry["medians_s"]
                if len(medians.get(label, [])) != len(reps):
                    continue
                run_medians[name] = medians[label][k]
                others = {s: ms[:k] + ms[k + 1:] if s == label else ms for s, ms in medians.items()}
                if any(others.values()):
                    rest["benchmarks"][name] = {"medians_s": others}
                    _summarise(rest["benchmarks"][name])
            if all(base.get(n) == m for n, m in run_medians.items()):
                continue
            run = {"machine_info": {"gpu_slug": study["gpu_slug"]},
                   "benchmarks": [{"fullname": n, "stats": {"median": m}} for n, m in run_medians.items()]}
            results.append((label, k + 1, gate.compare(baseline, run, rest)))
    return results


def _held_out_main(baseline_path: Path, noise_path: Path | None) -> int:
    baseline = gate.load_json(baseline_path)
    noise_path = noise_path or NOISE_DIR / f"{gate.slug_of(baseline)}.json"
    failed = 0
    for label, k, result in held_out(gate.load_json(noise_path), baseline):
        regressed = result.regressions
        failed += bool(regressed)
        print(f"{label} repetition {k}: {'FAIL' if regressed else 'PASS'}: {len(regressed)} of "
              f"{len(result.compared)} over their held-out threshold")
        for c in sorted(regressed, key=lambda c: -c.ratio):
            print(f"    {c.ratio:.3f} > 1 + {c.threshold:.1%}  {c.name}")
    print(f"held-out check of {noise_path} against {baseline_path}: "
          f"{'FAIL' if failed else 'PASS'} ({failed} repetition(s) failing)")
    return 1 if failed else 0


def write(study: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(study, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)  # atomic: a study killed mid-write keeps the previous file


def summary(study: dict) -> str:
    """Worst spreads first, and the benchmarks over the issue's target (5% under 20 us, 3% above)."""
    rows = [(e["spread"], name, e) for name, e in study["benchmarks"].items() if e.get("spread") is not None]
    rows.sort(key=lambda r: r[0], reverse=True)
    over = [(s, n, e) for s, n, e in rows if s > (TARGET_LONG if e["median_s"] > LONG_S else TARGET_SHORT)]
    lines = [(f"noise study {study['gpu_slug']}: {len(rows)} benchmarks with >= 2 medians, "
              f"{len(study['sessions'])} session(s); {len(over)} over target (5% under 20 us, 3% above)")]
    lines.append(f"  {'spread':>7} {'within':>7} {'n':>3} {'median us':>11}  benchmark (10 worst)")
    for s, name, e in rows[:10]:
        within = e["spread_within_session"]
        lines.append(f"  {s:>7.2%} {(f'{within:.2%}' if within is not None else '-'):>7} {e['n']:>3} "
                     f"{e['median_s'] * 1e6:>11.3f}  {name}")
    if rows:
        spreads = sorted(r[0] for r in rows)
        lines.append(f"  spread: median {spreads[len(spreads) // 2]:.2%}, max {spreads[-1]:.2%}")
    return "\n".join(lines)


def _run_suite(json_path: Path, pytest_args: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "perf", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path}", *pytest_args]
    print("noise study: " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m perf.noise_study", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to pytest, e.g. -- -k attn_kernels")
    p.add_argument("-n", "--repetitions", type=int, default=5, help="suite runs (default 5)")
    p.add_argument("--from-json", nargs="+", metavar="JSON", help="use these runs, do not run the suite")
    p.add_argument("--out", type=Path, help="noise file (default perf/noise/<gpu-slug>.json)")
    p.add_argument("--append", action="store_true", help="merge into an existing noise file")
    p.add_argument("--session", help="session label (default: a new session-<k>)")
    p.add_argument("--retire", action="append", default=[], metavar="SUBSTRING",
                   help="with --append: drop the earlier medians of benchmarks whose name contains it")
    p.add_argument("--keep-json", type=Path, help="keep each repetition's JSON in this folder")
    p.add_argument("--held-out", type=Path, metavar="BASELINE",
                   help="gate each repetition of the noise file against BASELINE with thresholds from the "
                        "other repetitions; runs nothing")
    args = p.parse_args(argv)
    if args.retire and not args.append:
        p.error("--retire needs --append (it edits an existing noise file)")
    if args.held_out:
        return _held_out_main(args.held_out, args.out)

    study: dict | None = None
    out: Path | None = args.out
    label: str | None = None
    failed = 0

    def add(run: dict, rc: int | None, used_args: list[str] | None) -> None:
        nonlocal study, out, label
        info = run.get("machine_info") or {}
        slug = info.get("gpu_slug")
        if not slug or slug == "no-cuda":
            raise SystemExit("noise study: the run has no GPU (machine_info gpu_slug): nothing to measure")
        if info.get("perf_slowdown"):
            raise SystemExit("noise study: the run was slowed on purpose (ATTN_KERNELS_PERF_SLOWDOWN)")
        if study is None:
            out = out or NOISE_DIR / f"{slug}.json"
            if out.exists() and not args.append:
                raise SystemExit(f"noise study: {out} exists: pass --append to add to it (or remove it)")
            study = json.loads(out.read_text()) if out.exists() else new_study(slug, info.get("gpu_name"))
            label = start_session(study, args.session, info)
            if args.retire:
                gone = retire(study, args.retire, label)
                print(f"noise study: retired the earlier medians of {len(gone)} benchmark(s) "
                      f"matching {args.retire}")
        add_repetition(study, label, run, rc=rc, pytest_args=used_args)
        write(study, out)

    if args.from_json:
        for path in args.from_json:
            add(json.loads(Path(path).read_text()), None, None)
    else:
        keep = args.keep_json
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repetitions):
                stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                # absolute: pytest runs in ROOT
                json_path = (keep or Path(tmp)).resolve() / f"noise-{stamp}-rep{i + 1}.json"
                json_path.parent.mkdir(parents=True, exist_ok=True)
                rc = _run_suite(json_path, pytest_args)
                failed += rc != 0
                # pytest-benchmark leaves the file empty when no benchmark ran
                if not json_path.is_file() or json_path.stat().st_size == 0:
                    print(f"noise study: repetition {i + 1} recorded no benchmark (pytest exit {rc})")
                    continue
                add(json.loads(json_path.read_text()), rc, pytest_args)
    if study is None:
        print("noise study: no run recorded", file=sys.stderr)
        return 1
    print(summary(study))
    print(f"noise study: wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
