"""GPU identity: the slug that names a GPU model's baseline folder, and the machine_info of a run.

    python -m perf.machine --slug    # this GPU's baseline folder name, e.g. nvidia-h100-80gb-hbm3
    python -m perf.machine --info    # what the suite records as machine_info (JSON)
"""
from __future__ import annotations

import re
from typing import Any


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower())).strip("-")


def gpu_slug(device: int = 0) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return slugify(torch.cuda.get_device_name(device))


def _driver_version() -> str | None:
    try:  # nvidia-ml-py, when installed
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except Exception:
        pass
    return None


def gpu_info(device: int = 0) -> dict[str, Any]:
    """What goes into pytest-benchmark's machine_info (and the baselines)."""
    import torch

    info: dict[str, Any] = {"torch_version": torch.__version__, "cuda_version": torch.version.cuda}
    try:
        import triton

        info["triton_version"] = triton.__version__
    except Exception:
        info["triton_version"] = None
    if not torch.cuda.is_available():
        info.update(gpu_name=None, gpu_slug="no-cuda")
        return info
    p = torch.cuda.get_device_properties(device)
    cuda_driver_api = None
    try:
        cuda_driver_api = int(torch._C._cuda_getDriverVersion())  # e.g. 13000
    except Exception:
        pass
    info.update(
        gpu_name=p.name,
        gpu_slug=slugify(p.name),
        gpu_sm_count=p.multi_processor_count,
        gpu_l2_bytes=int(getattr(p, "L2_cache_size", 0)),
        gpu_memory_bytes=int(p.total_memory),
        gpu_compute_capability=f"{p.major}.{p.minor}",
        driver_version=_driver_version(),
        cuda_driver_api_version=cuda_driver_api,
    )
    try:
        info["cudnn_version"] = torch.backends.cudnn.version()
    except Exception:
        info["cudnn_version"] = None
    try:
        import fla  # noqa: F401

        info["fla_version"] = getattr(fla, "__version__", "unknown")
    except Exception:
        info["fla_version"] = None
    try:
        import attn_kernels as ak

        info["attn_kernels_compiled"] = bool(ak.kernels_available())
    except Exception as exc:  # noqa: BLE001
        info["attn_kernels_compiled"] = f"import failed: {type(exc).__name__}"
    return info


def l2_bytes(device: int = 0) -> int:
    import torch

    p = torch.cuda.get_device_properties(device)
    l2 = int(getattr(p, "L2_cache_size", 0))
    return l2 if l2 > 0 else 64 * 2**20  # unknown: assume a big one


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m perf.machine", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--slug", action="store_true", help="print this GPU's slug ('no-cuda' without one)")
    what.add_argument("--info", action="store_true", help="print the machine_info the suite records")
    args = p.parse_args(argv)
    if args.slug:
        print(gpu_slug() or "no-cuda")
    else:
        print(json.dumps(gpu_info(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
