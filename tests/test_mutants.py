"""CPU checks of the mutation-testing machinery (tests/mutants/run.py, csrc/common/mutants.h, setup.py).
The mutants themselves are built and killed on a GPU box: `nox -s mutants` writes tests/mutants/REPORT.md."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutants_run", ROOT / "tests" / "mutants" / "run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = run  # dataclasses look their module up
_spec.loader.exec_module(run)

SOURCES = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cpp", ".h", ".cuh")
           and p.name != "mutants.h"]


def test_catalog_has_named_unique_mutants_over_every_kernel_and_the_binding():
    mutants = run.catalog()
    assert len(mutants) >= 15
    assert len({m.name for m in mutants}) == len(mutants) and len({m.ident for m in mutants}) == len(mutants)
    assert all(m.ident > 0 and m.what for m in mutants)
    assert {m.name.split("_", 1)[0] for m in mutants} == {"prefill", "decode", "swd", "swp", "bwd", "binding"}


@pytest.mark.parametrize("name", [m.name for m in run.catalog()])
def test_every_mutant_is_compiled_in_somewhere(name):
    uses = [p for p in SOURCES if re.search(rf"AK_MUTANT\({name}\)", p.read_text())]
    assert uses, f"AK_MUTANT({name}) appears in no csrc file: the mutant would be the unmutated kernel"


CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="needs a C++ preprocessor")
def test_preprocessor_selects_exactly_one_mutant_and_rejects_unknown_names(tmp_path):
    src = tmp_path / "probe.cpp"
    src.write_text('#include "common/mutants.h"\n'
                   'int on_split = AK_MUTANT(prefill_split_carry); int on_tail = AK_MUTANT(prefill_tail_dropped);\n')

    def expand(*defs):
        return subprocess.run([CXX, "-E", "-P", f"-I{ROOT / 'csrc'}", *defs, str(src)], capture_output=True,
                              text=True)

    normal = expand()
    assert normal.returncode == 0 and "on_split = (0 == 1)" in normal.stdout and "on_tail = (0 == 3)" in normal.stdout
    one = expand("-DATTN_KERNELS_MUTANT=prefill_tail_dropped")
    assert one.returncode == 0 and "on_split = (3 == 1)" in one.stdout and "on_tail = (3 == 3)" in one.stdout
    bad = expand("-DATTN_KERNELS_MUTANT=no_such_mutant")
    assert bad.returncode != 0 and "names no mutant" in bad.stderr


def test_setup_refuses_an_unknown_mutant_name():
    env = dict(os.environ, ATTN_KERNELS_MUTANT="no_such_mutant")
    env.pop("ATTN_KERNELS_NO_CUDA", None)
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env)
    if "no CUDA toolchain found" in res.stdout:
        pytest.skip("no nvcc here: setup.py builds without kernels and never reads the mutant")
    assert res.returncode != 0 and "is not in csrc/common/mutants.h" in res.stderr


def _setup_functions() -> dict:
    """setup.py's helpers without running setup(): its source up to the module-level build."""
    code = (ROOT / "setup.py").read_text().split("\next_modules, cmdclass =")[0]
    space = {"__file__": str(ROOT / "setup.py"), "__name__": "attn_kernels_setup"}
    exec(compile(code, str(ROOT / "setup.py"), "exec"), space)
    return space


OP_DIRS = {"prefill": "based_prefill", "decode": "based_decode", "swd": "sliding_window_decode",
           "swp": "sliding_window_prefill", "bwd": "based_prefill_backward", "binding": None}


@pytest.mark.parametrize("name", [m.name for m in run.catalog()])
def test_a_mutant_build_compiles_the_sources_that_use_it_and_links_the_rest(name, tmp_path, monkeypatch):
    """ATTN_KERNELS_MUTANT_OBJECTS: the mutant's own source is compiled (never linked unmutated: that build would
    be the clean kernel), every other source's object comes from the unmutated build."""
    setup = _setup_functions()
    sources = setup["_sources"]()
    assert "csrc/binding.cpp" in sources and len(sources) == 1 + len(list((ROOT / "csrc").glob("*/*.cu")))
    for src in sources:
        obj = tmp_path / (os.path.splitext(src)[0] + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.touch()
    monkeypatch.setenv("ATTN_KERNELS_MUTANT", name)
    monkeypatch.setenv("ATTN_KERNELS_MUTANT_OBJECTS", str(tmp_path))
    compiled, linked = setup["_mutated_sources"](sources)
    op_dir = OP_DIRS[name.split("_", 1)[0]]
    own = "csrc/binding.cpp" if op_dir is None else f"csrc/{op_dir}/{op_dir}.cu"
    assert own in compiled
    rest = [src for src in sources if src not in compiled]
    assert linked == [str(tmp_path / (os.path.splitext(src)[0] + ".o")) for src in rest]
    monkeypatch.delenv("ATTN_KERNELS_MUTANT_OBJECTS")
    assert setup["_mutated_sources"](sources) == (sources, [])


def test_first_failure_is_the_first_failed_or_errored_test():
    out = ("....F\n=== short test summary info ===\n"
           "FAILED tests/test_based_prefill.py::test_matrix[B2-H3-N65-bf16-bhnd-norm-s0] - AssertionError: o\n"
           "!!!!! stopping after 1 failures !!!!!\n")
    assert run.first_failure(out) == "tests/test_based_prefill.py::test_matrix[B2-H3-N65-bf16-bhnd-norm-s0]"
    assert run.first_failure("ERROR tests/test_x.py::test_y - RuntimeError\n") == "tests/test_x.py::test_y"
    assert run.first_failure("5 passed in 1.0s\n") is None


def test_the_mutated_ops_tests_run_first():
    m = next(m for m in run.catalog() if m.name.startswith("swd_"))
    files = run.test_files(m)
    assert files[0].endswith("test_sliding_window_decode.py") and len(files) == len(set(files))
    assert files[1].endswith("test_sliding_window_decode_pooled.py")
    assert all(Path(f).is_file() for f in files)
    assert {Path(f).name for f in files} == {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert set(run.OP_TESTS) == {m.name.split("_", 1)[0] for m in run.catalog()}


def test_killing_test_ids_are_relative_to_the_repository():
    lib = run.BUILD / "prefill_tail_dropped" / "lib"
    printed = "../../../../tests/test_based_prefill.py::test_matrix[B1-H1-N1-fp16-bhnd-norm-s0]"
    assert run.repo_test_id(printed, lib) == "tests/test_based_prefill.py::test_matrix[B1-H1-N1-fp16-bhnd-norm-s0]"


def test_the_committed_device_report_kills_every_mutant_of_the_catalog():
    """tests/mutants/REPORT.md comes from a GPU run (`nox -s mutants`): every mutant it lists KILLED, and with
    tests/mutants/PENDING.md (mutants added since that run, not yet run on a GPU) it covers the catalog as it
    is now, no mutant in both. A new mutant in neither fails here."""
    report = (ROOT / "tests" / "mutants" / "REPORT.md").read_text()
    pending_md = (ROOT / "tests" / "mutants" / "PENDING.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| .*? \| (KILLED|SURVIVED) \|", report, re.M))
    pending = re.findall(r"^\| `(\w+)` \|", pending_md, re.M)
    names = [m.name for m in run.catalog()]
    assert not set(rows) & set(pending), f"in REPORT.md and PENDING.md: {sorted(set(rows) & set(pending))}"
    assert sorted(rows) + sorted(pending) and sorted([*rows, *pending]) == sorted(names), \
        "REPORT.md + PENDING.md are not the current catalog: rerun nox -s mutants, or list a new mutant as pending"
    assert all(v == "KILLED" for v in rows.values()), {k: v for k, v in rows.items() if v != "KILLED"}
    assert f"**{len(rows)} of {len(rows)} killed**" in report