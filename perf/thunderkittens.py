"""ThunderKittens' hand-written H100 Based prefill kernel (``kernels/based/linear_attn.cu``), built at run
time as a torch extension named ``thunderkittens``: the perf suite's ``thunderkittens`` peer (prefill,
numerator only) and tests/test_thunderkittens.py.

Where the checkout comes from (an unmodified copy of TK's ``include/`` and ``kernels/based/``; ``tk_dir``):

* ``ATTN_KERNELS_TK_DIR``, when set (it must then hold ``include/kittens.cuh`` and
  ``kernels/based/linear_attn.cu``: a wrong path is an error, not an absent peer);
* else ``../shared/peers/thunderkittens`` next to the repository root, where it exists;
* else ``.tk/`` in the repository root (git-ignored; the copy a device box receives with the repository:
  ``cp -r ../shared/peers/thunderkittens .tk``).

Neither there: ``import thunderkittens`` (``install_import_hook``, the perf suite's way in) fails with
``ModuleNotFoundError: No module named 'thunderkittens'``, the reason of any optional peer whose package is
not installed (perf/gate.py excuses exactly that). A build that fails raises from the import instead
(``ThunderKittensBuildError``): a broken peer, which the gate never excuses.

What is built (``patched_source``): a copy of ``linear_attn.cu`` in the build folder with exactly these edits
to its torch launcher (``dispatch_based`` / ``based``), the kernel itself untouched:

1. the three ``cudaDeviceSynchronize()`` calls are removed (before the launch, after it, and the unreachable
   one after ``based``'s ``return``): host syncs that no caller wants inside a timed region;
2. the kernel launches on torch's current stream (``at::cuda::getCurrentCUDAStream()``, declared by TK's own
   ``pyutils/torchutils.cuh``) instead of the legacy default stream, like every other op the suite times.

Each edit must match the upstream text exactly the expected number of times, or the build fails with the
reason (an upstream change is seen, never half-applied). Everything else stays as TK ships it: the
``cudaFuncSetAttribute`` call per launch (no sync), ``CHECK_CUDA_ERROR(cudaGetLastError())`` (exits the
process on a launch error), the outputs allocated by the launcher and the ``at::cat`` that returns the
273-row state.

Flags (TK's ``kernels/common.mk``, pytorch config, and its ORIGIN.md): ``-gencode=arch=compute_90a,code=sm_90a
-DKITTENS_HOPPER -DTORCH_COMPILE -std=c++20 -O3 --use_fast_math --expt-extended-lambda
--expt-relaxed-constexpr -DNDEBUG`` (plus torch's own), torch's ``nvidia/*/include`` folders on the include
path, linked with ``-lcuda`` (TK encodes its TMA descriptors with the driver API; ``ldflags`` finds the driver
library or CUDA's stub of it). CUDA_HOME is found as setup.py finds it (``cuda_home``). The build folder is
``build/thunderkittens/<key>`` in the repository root (git-ignored; ``ATTN_KERNELS_TK_BUILD`` overrides the
``build/thunderkittens`` part), keyed by the patched source, the flags and torch's version, so a changed
checkout or flag rebuilds and an unchanged one is reused.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import sys
from pathlib import Path

NAME = "thunderkittens"  # the extension's module name (TORCH_EXTENSION_NAME)
ENV_DIR = "ATTN_KERNELS_TK_DIR"
ENV_BUILD = "ATTN_KERNELS_TK_BUILD"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIRS = (REPO.parent / "shared" / "peers" / "thunderkittens", REPO / ".tk")
SOURCE = Path("kernels") / "based" / "linear_attn.cu"
HEADER = Path("include") / "kittens.cuh"
SUPPORTED_N = 64  # TK's kernel runs N / 64 chunks of 64 tokens: N must be a multiple of 64
# The skip reason's prefix where there is no checkout (perf.impls.import_optional adds "`import
# thunderkittens` failed: ModuleNotFoundError: No module named 'thunderkittens'", which perf/gate.py excuses).
MISSING = (f"thunderkittens (a ThunderKittens checkout: ${ENV_DIR}, ../shared/peers/thunderkittens or .tk/) "
           f"not available")

# (upstream text, replacement, expected count): the copy's edits, in order. See the module docstring.
EDITS = (
    ("    cudaDeviceSynchronize();\n", "", 3),
    ("based_linear_attention<<<grid,NUM_THREADS,mem_size>>>(g);",
     "based_linear_attention<<<grid,NUM_THREADS,mem_size,at::cuda::getCurrentCUDAStream()>>>(g);", 1),
)
ARCH = "-gencode=arch=compute_90a,code=sm_90a"
NVCC_FLAGS = (ARCH, "-DKITTENS_HOPPER", "-DTORCH_COMPILE", "-std=c++20", "-O3", "--use_fast_math",
              "--expt-extended-lambda", "--expt-relaxed-constexpr", "-DNDEBUG", "-Xcompiler=-Wno-psabi",
              "-Xcompiler=-fno-strict-aliasing", "-diag-suppress=3189")
CXX_FLAGS = ("-O3", "-std=c++20")


class ThunderKittensBuildError(RuntimeError):
    """The checkout is there but could not be patched or built."""


def tk_dir() -> Path | None:
    """The ThunderKittens checkout to build from, or None where there is none (see the module docstring)."""
    given = os.environ.get(ENV_DIR)
    if given:
        root = Path(given).expanduser().resolve()
        missing = [str(p) for p in (HEADER, SOURCE) if not (root / p).is_file()]
        if missing:
            raise ThunderKittensBuildError(f"{ENV_DIR}={given}: no {' or '.join(missing)} there")
        return root
    found = (d.resolve() for d in DEFAULT_DIRS if (d / HEADER).is_file() and (d / SOURCE).is_file())
    return next(found, None)


def patched_source(text: str) -> str:
    """linear_attn.cu as built: the EDITS applied, each exactly as often as expected."""
    for old, new, count in EDITS:
        found = text.count(old)
        if found != count:
            raise ThunderKittensBuildError(f"{SOURCE}: expected {count} x {old.strip()!r}, found {found}: "
                                           f"the upstream launcher changed (perf/thunderkittens.py, EDITS)")
        text = text.replace(old, new)
    assert "cudaDeviceSynchronize" not in text and "<<<grid,NUM_THREADS,mem_size>>>" not in text
    return text


def include_dirs(root: Path) -> list[str]:
    """TK's include/ and torch's nvidia/*/include folders (ATen's CUDA headers include cuBLAS and friends,
    which pip's torch ships in its nvidia-* wheels)."""
    import torch

    site = Path(torch.__file__).resolve().parents[1]
    return [str(root / "include"), *sorted(glob.glob(str(site / "nvidia" / "*" / "include")))]


def cuda_home() -> str | None:
    """CUDA_HOME as setup.py finds it: the variable, else /usr/local/cuda, else the parent of nvcc's real path
    (torch's own guess, the parent of whichever nvcc is on PATH, can be a wrapper's folder)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(os.path.realpath(nvcc)).parents[1]) if nvcc else None


def _cpp_extension():
    """torch.utils.cpp_extension with its CUDA_HOME set to cuda_home(). The module reads it when it builds a
    command (nvcc, include and library folders), so setting the attribute suffices; the environment of the
    process (which torch.compile, Triton and the rest may read) is left as it is."""
    from torch.utils import cpp_extension

    home = cuda_home()
    if home:
        cpp_extension.CUDA_HOME = home
    return cpp_extension


def ldflags() -> list[str]:
    """-lcuda, with the folder that holds the driver library (or CUDA's stub of it) on the link path: the
    stubs of cuda_home(), else the usual driver folders; a driver with only libcuda.so.1 is linked by that
    name."""
    home = cuda_home()
    dirs = [Path(home) / sub for sub in ("lib64/stubs", "lib/stubs", "targets/x86_64-linux/lib/stubs",
                                         "targets/sbsa-linux/lib/stubs")] if home else []
    dirs += [Path(d) for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                               "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib")]
    for d in dirs:
        if (d / "libcuda.so").exists():
            return [f"-L{d}", "-lcuda"]
    for d in dirs:
        if (d / "libcuda.so.1").exists():
            return [f"-L{d}", "-l:libcuda.so.1"]
    return ["-lcuda"]


def build_dir(source: str, flags: tuple) -> Path:
    import torch

    key = hashlib.sha256("\0".join([source, *flags, torch.__version__, str(torch.version.cuda)]).encode())
    base = Path(os.environ[ENV_BUILD]) if os.environ.get(ENV_BUILD) else REPO / "build" / "thunderkittens"
    return base / key.hexdigest()[:16]


def prepare(root: Path) -> tuple[Path, list[str]]:
    """Write the patched copy into its build folder; -> (its path, its include folders)."""
    text = patched_source((root / SOURCE).read_text())
    includes = include_dirs(root)
    folder = build_dir(text, NVCC_FLAGS + CXX_FLAGS + tuple(includes))
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "linear_attn_nosync.cu"
    if not src.is_file() or src.read_text() != text:
        src.write_text(text)
    return src, includes


_MODULE: dict = {}  # NAME -> the built module, or the ThunderKittensBuildError of the one attempt


def load(verbose: bool = False):
    """The built extension (``based(q, k, v) -> (o, kv_state)``), built once per process (ninja reuses an
    unchanged build folder). ModuleNotFoundError where there is no checkout; ThunderKittensBuildError where
    the build fails (the compiler's output in the message; raised again, not retried, for every later
    benchmark of the process)."""
    if NAME in _MODULE:
        if isinstance(_MODULE[NAME], Exception):
            raise _MODULE[NAME]
        return _MODULE[NAME]
    root = tk_dir()
    if root is None:
        raise ModuleNotFoundError(f"No module named '{NAME}'", name=NAME)
    src, includes = prepare(root)
    try:
        module = _cpp_extension().load(NAME, [str(src)], extra_cflags=list(CXX_FLAGS),
                                       extra_cuda_cflags=list(NVCC_FLAGS), extra_ldflags=ldflags(),
                                       extra_include_paths=includes, build_directory=str(src.parent),
                                       verbose=verbose)
    except Exception as exc:  # noqa: BLE001
        _MODULE[NAME] = ThunderKittensBuildError(f"building {src} from {root} failed: {type(exc).__name__}: "
                                                 f"{str(exc)[-1500:]}")
        raise _MODULE[NAME] from exc
    module.__tk_source__ = str(src)  # the patched copy it was built from
    _MODULE[NAME] = module
    return module


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import thunderkittens`` builds and returns load()'s module. With no checkout it raises
    ModuleNotFoundError itself, so no other package of that name is ever taken for the patched build."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        if tk_dir() is None:
            raise ModuleNotFoundError(f"No module named '{NAME}'", name=NAME)
        return importlib.machinery.ModuleSpec(NAME, self)

    def create_module(self, spec):
        return load()

    def exec_module(self, module):
        pass


def install_import_hook() -> None:
    """Make ``import thunderkittens`` build the peer (first on sys.meta_path: an installed package of that
    name is never taken instead of the patched build). Nothing is built until something imports it."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def supports(B: int, H: int, N: int) -> bool:
    """The shapes TK's kernel runs: N a multiple of 64 (and bf16, d = 16, e = 64: the suite's prefill)."""
    return N > 0 and N % SUPPORTED_N == 0
