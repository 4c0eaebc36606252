"""CPU test: the source distribution carries every kernel source and header (csrc/), so that a
`pip install attn_kernels-*.tar.gz` on a GPU box can build the extension."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_carries_every_kernel_source(tmp_path):
    env = dict(os.environ, ATTN_KERNELS_NO_CUDA="1")  # listing files needs no CUDA toolchain
    # egg_info in tmp: a stale SOURCES.txt in the tree would otherwise be merged into the file list
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                    "--dist-dir", str(tmp_path)], cwd=ROOT, env=env, check=True, capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert wanted, "no kernel sources found"
    assert wanted <= shipped, f"missing from the sdist: {sorted(wanted - shipped)}"
