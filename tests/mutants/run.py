"""Mutation testing of the kernels: build each mutant of csrc/common/mutants.h and run the GPU tests on it.

    python tests/mutants/run.py [NAME ...] [--jobs J] [--report tests/mutants/REPORT.md]

(`nox -s mutants` on a GPU box.) Each mutant is compiled with ATTN_KERNELS_MUTANT=<name> into its own
folder build/mutants/<name>/ (J builds at a time), next to a copy of the Python package, so the repository's
own build stays untouched. Only the sources whose includes use the mutant are compiled; the other objects come
from the in-place build's temp folder (ATTN_KERNELS_MUTANT_OBJECTS, see setup.py), which must be the build of
these sources (`nox -s mutants` makes it first; --all-sources compiles everything). Then, per mutant:
  1. pytest tests/ -x, the mutated op's test module first, from that folder (so `import attn_kernels` is the
     mutant); the first failing test killed it;
  2. only if every test passed: the sanitize subset (tests/test_sanitize.py) under compute-sanitizer's
     racecheck and synccheck, for bugs that only a race detector sees.
A mutant that passes both SURVIVED: a test is missing. The exit status is 1 if any survived (or the unmutated
build fails its tests, which makes every verdict meaningless), else 0. The report is Markdown, generated.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "csrc" / "common" / "mutants.h"
BUILD = ROOT / "build" / "mutants"
# The mutated op's test modules, run first (a kill then comes before the rest of the suite has run).
OP_TESTS = {"prefill": ["test_based_prefill.py", "test_based_prefill_serving.py"],
            "decode": ["test_based_decode.py"],
            "swd": ["test_sliding_window_decode.py", "test_sliding_window_decode_pooled.py"],
            "swp": ["test_sliding_window_prefill.py"],
            "bwd": ["test_based_prefill_backward_cuda.py", "test_based_prefill_backward.py"],
            "binding": ["test_op_registration.py"]}
TEST_TIMEOUT_S = 900


@dataclass
class Mutant:
    name: str
    ident: int
    what: str


@dataclass
class Verdict:
    mutant: Mutant
    killed_by: str | None  # None: survived
    stage: str  # "tests", "sanitize", "build", "-"
    seconds: float
    detail: str = ""


def catalog(path: Path = CATALOG) -> list[Mutant]:
    """The mutants, in catalog order: `#define AK_MUTANT_<name> <id>  // <what>` lines."""
    pattern = re.compile(r"^#define AK_MUTANT_(\w+) (\d+)\s*// (.*)$", re.M)
    return [Mutant(n, int(i), w.strip()) for n, i, w in pattern.findall(path.read_text())]


def _env(**extra: str) -> dict[str, str]:
    """The environment of builds and test runs: the repository on PYTHONPATH for `perf` (after the current
    folder, which holds the mutant's attn_kernels when the tests run from it)."""
    env = dict(os.environ)
    env.pop("ATTN_KERNELS_MUTANT", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def unmutated_objects() -> Path | None:
    """The in-place build's temp folder (build/temp.<platform>-<python>/ with every source's object), or None."""
    import sysconfig

    tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    temp = ROOT / "build" / f"temp.{tag}"
    return temp if (temp / "csrc" / "binding.o").is_file() else None


def build(m: Mutant, jobs_per_build: int, objects: Path | None) -> tuple[Path, str | None]:
    """Compile the mutant into build/mutants/<name>/lib with the package's Python files beside it."""
    out = BUILD / m.name
    lib = out / "lib"
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(out / "tmp")]
    extra = {"ATTN_KERNELS_MUTANT_OBJECTS": str(objects)} if objects else {}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env=_env(ATTN_KERNELS_MUTANT=m.name, MAX_JOBS=str(jobs_per_build), **extra))
    if res.returncode != 0:
        return lib, (res.stdout + res.stderr)[-3000:]
    for py in (ROOT / "attn_kernels").glob("*.py"):
        shutil.copy2(py, lib / "attn_kernels" / py.name)
    return lib, None


def first_failure(output: str) -> str | None:
    """The test id of pytest's first FAILED / ERROR summary line (-rfE)."""
    for line in output.splitlines():
        hit = re.match(r"^(FAILED|ERROR) (\S+)", line)
        if hit:
            return hit.group(2)
    return None


def repo_test_id(test: str, cwd: Path) -> str:
    """A test id as pytest printed it from `cwd` (e.g. ../../../../tests/x.py::t[a]) -> tests/x.py::t[a]."""
    path, sep, rest = test.partition("::")
    return os.path.relpath(os.path.normpath(cwd / path), ROOT) + sep + rest


def test_files(m: Mutant) -> list[str]:
    first = OP_TESTS.get(m.name.split("_", 1)[0], [])
    rest = sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if p.name not in first)
    return [str(ROOT / "tests" / f) for f in first + rest]


def run_tests(m: Mutant | None, lib: Path) -> tuple[int, str]:
    """pytest -x over the test suite with `lib`'s attn_kernels (the mutant's build) first on the path."""
    files = test_files(m) if m else [str(ROOT / "tests")]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *files]
    check = [sys.executable, "-c", "import attn_kernels, sys; sys.stdout.write(attn_kernels.__file__)"]
    where = subprocess.run(check, cwd=lib, capture_output=True, text=True, env=_env())
    if not where.stdout.startswith(str(lib)):
        return 2, f"the mutant's package was not the one imported: {where.stdout or where.stderr[-500:]}"
    try:
        res = subprocess.run(cmd, cwd=lib, capture_output=True, text=True, env=_env(), timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {TEST_TIMEOUT_S} s: {str(exc.stdout)[-1000:]}"
    return res.returncode, res.stdout + res.stderr


def run_sanitize(lib: Path) -> tuple[str | None, str]:
    for tool in ("racecheck", "synccheck"):
        cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", "--target-processes=all",
               sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_sanitize.py")]
        res = subprocess.run(cmd, cwd=lib, capture_output=True, text=True, env=_env())
        if res.returncode != 0:
            return f"compute-sanitizer --tool={tool} (tests/test_sanitize.py)", (res.stdout + res.stderr)[-2000:]
    return None, ""


def judge(m: Mutant, lib: Path, build_error: str | None) -> Verdict:
    t0 = time.time()
    if build_error is not None:
        return Verdict(m, None, "build", 0.0, f"build failed: {build_error}")
    rc, out = run_tests(m, lib)
    if rc == 2 and "was not the one imported" in out:
        return Verdict(m, None, "-", time.time() - t0, out)
    if rc != 0:
        test = first_failure(out)
        test = test and repo_test_id(test, lib)
        how = test or (f"the test process died (exit {rc})" if rc != 124 else "timed out")
        return Verdict(m, how, "tests", time.time() - t0, "" if test else out[-1500:])
    by, detail = run_sanitize(lib)
    return Verdict(m, by, "sanitize" if by else "-", time.time() - t0, detail)


def write_report(path: Path, verdicts: list[Verdict], clean: str, seconds: float) -> None:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    in_checkout = top.returncode == 0 and Path(top.stdout.strip()).resolve() == ROOT
    commit = (subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip() if in_checkout
              else os.environ.get("ATTN_KERNELS_COMMIT", "unknown (not a git checkout)"))
    killed = sum(v.killed_by is not None for v in verdicts)
    lines = [
        "# Mutation testing report",
        "",
        "Generated by `nox -s mutants` (tests/mutants/run.py); do not edit. Each mutant is one named bug of",
        "csrc/common/mutants.h compiled in with `ATTN_KERNELS_MUTANT=<name>`; it is KILLED when a test fails on",
        "it (pytest -x over tests/, the mutated op's module first; then, only if all passed, the sanitize subset",
        "under racecheck and synccheck).",
        "",
        f"- {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}, torch {torch.__version__}, "
        f"commit {commit}, {seconds:.0f} s",
        f"- unmutated build: {clean}",
        f"- **{killed} of {len(verdicts)} killed**"
        + ("" if killed == len(verdicts) else f", SURVIVED: {', '.join(v.mutant.name for v in verdicts if v.killed_by is None)}"),
        "",
        "| mutant | the bug | verdict | killed by | s |",
        "|---|---|---|---|--:|",
    ]
    for v in verdicts:
        verdict = "KILLED" if v.killed_by is not None else "SURVIVED"
        by = f"`{v.killed_by}`" + (f" ({v.stage})" if v.stage == "sanitize" else "") if v.killed_by else v.detail[:200]
        lines.append(f"| `{v.mutant.name}` | {v.mutant.what} | {verdict} | {by} | {v.seconds:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 4), help="builds at a time")
    ap.add_argument("--parallel-tests", type=int, default=4, help="mutants tested at a time on the GPU")
    ap.add_argument("--report", default=str(ROOT / "tests" / "mutants" / "REPORT.md"))
    ap.add_argument("--skip-clean", metavar="SUMMARY", nargs="?", const="not run", default=None,
                    help="do not run the suite on the unmutated build (it ran just before: give pytest's summary line)")
    ap.add_argument("--build-only", action="store_true", help="build the mutants, test none")
    ap.add_argument("--all-sources", action="store_true",
                    help="compile every source for each mutant (default: only those using it, the rest linked "
                    "from the in-place build)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a mutant already built in build/mutants/<name>/ (same sources) instead of rebuilding")
    args = ap.parse_args(argv)
    mutants = catalog()
    if args.names:
        unknown = set(args.names) - {m.name for m in mutants}
        if unknown:
            ap.error(f"not in {CATALOG}: {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.name in args.names]
    t0 = time.time()
    clean = f"{args.skip_clean} (run before this script, --skip-clean)"
    if args.skip_clean is None and not args.build_only:  # the in-place build, which `nox -s mutants` made first
        rc, out = run_tests(None, ROOT)
        tail = out.strip().splitlines()[-1] if out.strip() else ""
        clean = f"all tests pass ({tail})" if rc == 0 else f"FAILS ({tail})"
        print(f"unmutated build: {clean}", flush=True)
        if rc != 0:
            print(out[-3000:])
            return 1
    per_build = max(1, (os.cpu_count() or 2) // args.jobs)
    objects = None if args.all_sources else unmutated_objects()
    print(f"mutant builds link the unmodified sources' objects from {objects}" if objects
          else "mutant builds compile every source", flush=True)

    def build_or_reuse(m: Mutant) -> tuple[Path, str | None]:
        lib = BUILD / m.name / "lib"
        if args.reuse and list((lib / "attn_kernels").glob("_C*.so")):
            return lib, None
        return build(m, per_build, objects)

    with cf.ThreadPoolExecutor(args.jobs) as pool:
        built = dict(zip([m.name for m in mutants], pool.map(build_or_reuse, mutants)))
    failed = [name for name, (_, err) in built.items() if err]
    print(f"built {len(mutants)} mutants in {time.time() - t0:.0f} s"
          + (f"; FAILED to build: {', '.join(failed)}" if failed else ""), flush=True)
    if args.build_only:
        for name in failed:
            print(f"--- {name}\n{built[name][1]}")
        return 1 if failed else 0

    def judge_and_say(m: Mutant) -> Verdict:  # each verdict printed as it comes (a cut-off run keeps them)
        v = judge(m, *built[m.name])
        print(f"{v.mutant.name:<32} {'KILLED by ' + v.killed_by if v.killed_by else 'SURVIVED ' + v.detail[:300]}"
              f" ({v.seconds:.0f} s)", flush=True)
        return v

    with cf.ThreadPoolExecutor(args.parallel_tests) as pool:
        verdicts = list(pool.map(judge_and_say, mutants))
    write_report(Path(args.report), verdicts, clean, time.time() - t0)
    print(f"report: {args.report}")
    return 0 if all(v.killed_by is not None for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
