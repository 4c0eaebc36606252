"""Sessions: build, test, perf, perf_save, plots, sanitize, mutants.

    nox -s build perf    the main job on a GPU box: compile the kernels, benchmark against the stored baseline
    nox -s test          the correctness tests (GPU tests skip without a GPU)

Each session runs in a virtualenv that sees the system's site-packages, so a preinstalled torch (a GPU box's
CUDA build) is used as is; only what is missing is pip-installed. On a machine with no network and everything
preinstalled, run `nox --no-venv ...` (or set NOX_DEFAULT_VENV_BACKEND=none) to use the current interpreter.
The extension is built in place (attn_kernels/_C*.so) with ninja; every session builds first, which is a
no-op when nothing changed.
"""
from __future__ import annotations

import os
import sys

import nox
import nox.virtualenv


nox.options.sessions = ["build", "test"]
nox.options.default_venv_backend = os.environ.get("NOX_DEFAULT_VENV_BACKEND", "virtualenv")
VENV_PARAMS = ["--system-site-packages"]

# import name -> pip requirement, installed only when the import fails
BUILD_REQUIRES = {"torch": "torch", "ninja": "ninja", "setuptools": "setuptools>=64", "wheel": "wheel",
                  "cutlass_library": "nvidia-cutlass==4.2.0.0"}  # CuTe headers
TEST_REQUIRES = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "matplotlib": "matplotlib"}


def _python(session: nox.Session) -> str:
    """The interpreter sessions run: the virtualenv's `python`, or with --no-venv the one running nox (a GPU
    box may have only `python3` on PATH, or a `python` that is not the one with torch)."""
    return sys.executable if isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv) else "python"


def _ensure(session: nox.Session, requires: dict[str, str]) -> None:
    missing = []
    for module, requirement in requires.items():
        try:
            session.run(_python(session), "-c", f"import {module}", silent=True, log=False)
        except nox.command.CommandFailed:
            missing.append(requirement)
    if missing:
        session.run(_python(session), "-m", "pip", "install", *missing)


def _build(session: nox.Session) -> None:
    requires = dict(BUILD_REQUIRES)
    if os.environ.get("ATTN_KERNELS_CUTLASS_INCLUDE"):  # headers given directly (a box without the wheel)
        del requires["cutlass_library"]
    _ensure(session, requires)
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    session.run(_python(session), "setup.py", "-q", "build_ext", "--inplace", env={"MAX_JOBS": jobs})


@nox.session(venv_params=VENV_PARAMS)
def build(session: nox.Session) -> None:
    """Compile attn_kernels._C in place (sm_90a; ATTN_KERNELS_CUDA_ARCH overrides)."""
    _build(session)


@nox.session(venv_params=VENV_PARAMS)
def test(session: nox.Session) -> None:
    """pytest tests/ (posargs passed through). Without a GPU the CPU tests run and the GPU tests skip."""
    _build(session)
    _ensure(session, TEST_REQUIRES)
    session.run(_python(session), "-m", "pytest", "tests", *session.posargs)


# perf/conftest.py points pytest-benchmark's storage at perf/baselines/<gpu-slug>/ of the GPU it runs on.
PERF_ARGS = ["-p", "no:cacheprovider", "--benchmark-columns=median,iqr,min,rounds", "--benchmark-sort=fullname"]


@nox.session(venv_params=VENV_PARAMS)
def perf(session: nox.Session) -> None:
    """pytest perf/, then perf/gate.py against this GPU model's newest stored baseline: fails when any
    benchmark's median regressed beyond its own threshold, min(10%, max(3%, 3x its measured run-to-run
    spread)) from perf/noise/<gpu-slug>.json (10% where no noise was measured), when a baseline benchmark is
    missing from the run (except an optional peer whose package is not installed), when the run is empty,
    and when this GPU has no baseline (record one with `nox -s perf_save -- NAME`, or commit the run's JSON
    as the candidate baseline) (perf/README.md, "Regression gate"). `-- --benchmark-json=PATH` keeps the
    run's JSON."""
    _build(session)
    _ensure(session, TEST_REQUIRES)
    kept = [a for a in session.posargs if a.startswith("--benchmark-json=")]
    run_json = kept[-1].split("=", 1)[1] if kept else os.path.join(session.create_tmp(), "perf-run.json")
    pytest_args = [a for a in session.posargs if not a.startswith("--benchmark-json=")]
    session.run(_python(session), "-m", "pytest", "perf", *PERF_ARGS, f"--benchmark-json={run_json}",
                *pytest_args)
    session.run(_python(session), "-m", "perf.gate", "--baseline", "perf/baselines", "--noise", "perf/noise",
                "--run", run_json)


@nox.session(venv_params=VENV_PARAMS)
def perf_save(session: nox.Session) -> None:
    """Run the perf suite and store it as this GPU's newest baseline: `nox -s perf_save -- NAME [pytest args]`
    writes perf/baselines/<gpu-slug>/NNNN_NAME.json (with the skipped ids and reasons); commit it."""
    _build(session)
    _ensure(session, TEST_REQUIRES)
    name = session.posargs[0] if session.posargs else "baseline"
    session.run(_python(session), "-m", "pytest", "perf", *PERF_ARGS, f"--benchmark-save={name}",
                *session.posargs[1:])


@nox.session(venv_params=VENV_PARAMS)
def plots(session: nox.Session) -> None:
    """perf/plots/<gpu>/*.png and perf/REPORT.md from the newest baseline of each GPU folder, or from the
    runs given: `nox -s plots -- RUN.json ... [--out DIR]`; README.md's state-precision table from
    perf/results/decode_drift.json. Needs no GPU and no build."""
    _ensure(session, {"matplotlib": "matplotlib"})
    session.run(_python(session), "-m", "perf.report", *session.posargs)


SANITIZE_SUBSET = "tests/test_sanitize.py"


@nox.session(venv_params=VENV_PARAMS)
def sanitize(session: nox.Session) -> None:
    """A small GPU subset (tests/test_sanitize.py, three shapes per op incl. ragged tails) under
    compute-sanitizer memcheck, racecheck, initcheck and synccheck (ATTN_KERNELS_SANITIZE_TOOLS picks some)."""
    _build(session)
    _ensure(session, TEST_REQUIRES)
    tools = os.environ.get("ATTN_KERNELS_SANITIZE_TOOLS", "memcheck racecheck initcheck synccheck").split()
    for tool in tools:
        session.run("compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", "--target-processes=all",
                    _python(session), "-m", "pytest", "-q", "-p", "no:cacheprovider", SANITIZE_SUBSET,
                    *session.posargs,
                    external=True)


@nox.session(venv_params=VENV_PARAMS)
def mutants(session: nox.Session) -> None:
    """Mutation testing on a GPU box (tests/mutants/run.py): the suite on the normal build, then every mutant
    of csrc/common/mutants.h built and tested; writes tests/mutants/REPORT.md, fails if one survived.
    `nox -s mutants -- NAME ...` runs only those; `-- --jobs J` sets the parallel builds."""
    _build(session)
    _ensure(session, TEST_REQUIRES)
    session.run(_python(session), "tests/mutants/run.py", *session.posargs)
