"""Builds attn_kernels._C (the CUDA kernels) with torch.utils.cpp_extension + ninja.

Environment:
  ATTN_KERNELS_CUDA_ARCH   gencode list, default "-gencode=arch=compute_90a,code=sm_90a" (Hopper);
                           several flags are separated by spaces.
  ATTN_KERNELS_NO_CUDA=1   skip the extension: a pure-Python install whose CUDA calls raise a clear error.
  ATTN_KERNELS_CUTLASS_INCLUDE
                           the CUTLASS/CuTe include folder (based_prefill's kernel uses CuTe); default: the
                           copy inside the nvidia-cutlass wheel (cutlass_library/source/include).
  MAX_JOBS                 parallel compile jobs (ninja), as usual for torch extensions.
  ATTN_KERNELS_MUTANT      mutation testing only (tests/mutants/, `nox -s mutants`): compile in the one named
                           bug of csrc/common/mutants.h. Never set for a real build.
  ATTN_KERNELS_MUTANT_OBJECTS
                           with ATTN_KERNELS_MUTANT: the build-temp folder of an unmutated build of these
                           sources; only the sources whose includes use that mutant are compiled, the others'
                           objects are linked from there (their code does not depend on the mutant).
Without nvcc the package installs without _C, as with ATTN_KERNELS_NO_CUDA=1.
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH = "-gencode=arch=compute_90a,code=sm_90a"


def _cuda_home():
    """CUDA_HOME, where torch's own guess (the parent of whichever nvcc is on PATH) can be a wrapper's folder."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _cutlass_include():
    """CuTe headers for the kernels: ATTN_KERNELS_CUTLASS_INCLUDE, else the nvidia-cutlass wheel's copy."""
    where = os.environ.get("ATTN_KERNELS_CUTLASS_INCLUDE")
    if not where:
        try:
            import cutlass_library

            where = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
        except ImportError:
            pass
    if where and os.path.isfile(os.path.join(where, "cute", "tensor.hpp")):
        return where
    raise RuntimeError(
        "attn_kernels: the CUDA kernels need the CUTLASS/CuTe headers, and "
        + (f"{where} has no cute/tensor.hpp. " if where else "none were found. ")
        + "Install them with `pip install nvidia-cutlass==4.2.0.0`, or set ATTN_KERNELS_CUTLASS_INCLUDE "
        "to a CUTLASS include folder (the one holding cute/ and cutlass/), or build without the kernels "
        "(ATTN_KERNELS_NO_CUDA=1)."
    )


def _mutant_flags():
    """-DATTN_KERNELS_MUTANT=<name> for a mutant build (a name from the catalog), else nothing."""
    name = os.environ.get("ATTN_KERNELS_MUTANT")
    if not name:
        return []
    with open(os.path.join(HERE, "csrc", "common", "mutants.h")) as f:
        catalog = re.findall(r"^#define AK_MUTANT_(\w+) \d+", f.read(), re.M)
    if name not in catalog:
        raise RuntimeError(f"attn_kernels: ATTN_KERNELS_MUTANT={name!r} is not in csrc/common/mutants.h "
                           f"(known: {', '.join(catalog)})")
    print(f"attn_kernels: building MUTANT {name} (a deliberately wrong kernel, for mutation testing)")
    return [f"-DATTN_KERNELS_MUTANT={name}"]


def _sources():
    """The extension's sources, relative to this folder: the binding, then every op's .cu."""
    kernels = glob.glob("*/*.cu", root_dir=os.path.join(HERE, "csrc"))
    return ["csrc/binding.cpp"] + sorted(os.path.join("csrc", cu) for cu in kernels)


def _read(path):
    with open(path) as f:
        return f.read()


def _includes(path, seen):
    """`path` and every csrc file it includes with #include "..." (the including file's folder, then csrc/)."""
    if path in seen:
        return seen
    seen.add(path)
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', _read(path), re.M):
        for where in (os.path.dirname(path), os.path.join(HERE, "csrc")):
            candidate = os.path.normpath(os.path.join(where, name))
            if os.path.isfile(candidate):
                _includes(candidate, seen)
                break
    return seen


def _mutated_sources(sources):
    """-> (sources to compile, objects to link). A mutant build with ATTN_KERNELS_MUTANT_OBJECTS compiles only the
    sources whose include closure uses AK_MUTANT(<name>): in the others every AK_MUTANT(...) is false, so their
    objects equal the unmutated build's, which are linked instead."""
    name, reuse = os.environ.get("ATTN_KERNELS_MUTANT"), os.environ.get("ATTN_KERNELS_MUTANT_OBJECTS")
    if not (name and reuse):
        return sources, []
    use = re.compile(r"AK_MUTANT\(\s*" + re.escape(name) + r"\s*\)")
    compile_, objects = [], []
    for src in sources:
        files = _includes(os.path.join(HERE, src), set()) - {os.path.join(HERE, "csrc", "common", "mutants.h")}
        if any(use.search(_read(f)) for f in files):
            compile_.append(src)
            continue
        obj = os.path.join(reuse, os.path.splitext(src)[0] + ".o")
        if not os.path.isfile(obj):
            raise RuntimeError(f"attn_kernels: ATTN_KERNELS_MUTANT_OBJECTS={reuse!r} has no {obj!r} (build the "
                               "unmutated extension there first)")
        objects.append(obj)
    if not compile_:
        raise RuntimeError(f"attn_kernels: no source uses AK_MUTANT({name})")
    return compile_, objects


def _extensions():
    if os.environ.get("ATTN_KERNELS_NO_CUDA") == "1":
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home is None:
        print("attn_kernels: no CUDA toolchain found; installing without the kernels")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    include_dirs = [os.path.join(HERE, "csrc"), _cutlass_include()]
    # ATen's CUDA headers include cuBLAS/cuSPARSE headers, which pip's torch ships in its nvidia-* wheels.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    arch = os.environ.get("ATTN_KERNELS_CUDA_ARCH", DEFAULT_ARCH).split()
    mutant = _mutant_flags()
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "-lineinfo",
        # torch adds these to every nvcc call; the kernels use the half/bf16 operators.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        *arch,
        *mutant,
    ]
    sources, objects = _mutated_sources(_sources())
    ext = CUDAExtension(
        name="attn_kernels._C",
        sources=sources,
        extra_objects=objects,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++20", *mutant], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="attn_kernels",
    version="0.1.0",
    description="Fused Hopper CUDA kernels for Based linear attention and sliding-window attention",
    packages=find_packages(include=["attn_kernels", "attn_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
