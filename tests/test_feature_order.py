"""CPU test: the order of the 153 compact Based features has one definition in C++
(csrc/common/feature_order.h, used by based_prefill's feature map and based_decode's feature loop), and
it is the order of the reference (attn_kernels/reference.py: torch.triu_indices(16, 16, 1) and the
compact index 33 + 15 i - i (i - 1) / 2 + (j - i - 1) that the prefill kernel's z uses).

A tiny host program includes the header (g++, no CUDA), prints every feature's kind and (i, j), and the
test compares that with the reference."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from attn_kernels import reference as ref

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++")

PROGRAM = r"""
#include <cstdio>
#include "common/feature_order.h"
using namespace attn_kernels;
int main() {
  std::printf("sizes %d %d %d %d %d\n", kFeatDim, kCompactFeatures, kLinearFeature0, kSquareFeature0,
              kPairFeature0);
  for (int f = kPairFeature0; f < kCompactFeatures; ++f) {
    const FeaturePair p = feature_pair(f);
    std::printf("pair %d %d %d %d\n", f, p.i, p.j, quad_feature(p.i, p.j));
  }
  for (int i = 0; i < kFeatDim; ++i)
    for (int j = i + 1; j < kFeatDim; ++j) std::printf("quad %d %d %d\n", i, j, quad_feature(i, j));
  return 0;
}
"""


@pytest.fixture(scope="module")
def order(tmp_path_factory):
    if CXX is None:
        pytest.skip("needs g++")
    tmp = tmp_path_factory.mktemp("feature_order")
    src, exe = tmp / "order.cpp", tmp / "order"
    src.write_text(PROGRAM)
    subprocess.run([CXX, "-std=c++17", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    rows = {"sizes": [], "pair": [], "quad": []}
    for line in out.splitlines():
        kind, *nums = line.split()
        rows[kind].append(tuple(int(n) for n in nums))
    return rows


def test_sizes_match_the_reference(order):
    (d, F, lin0, sq0, pair0), = order["sizes"]
    assert (d, F) == (ref.FEAT_DIM, ref.COMPACT_FEATURES) == (16, 153)
    # reference.feature_map_compact: [1, sqrt(c) x (16), c x^2 / sqrt(2) (16), c x_i x_j (120)]
    assert (lin0, sq0, pair0) == (1, 1 + d, 1 + 2 * d)


def test_pair_order_is_torch_triu_indices(order):
    pairs = order["pair"]
    assert [f for f, *_ in pairs] == list(range(33, 153))
    assert [(i, j) for _, i, j, _ in pairs] == list(zip(ref._PAIR_I.tolist(), ref._PAIR_J.tolist()))
    assert all(quad == f for f, _, _, quad in pairs)  # quad_feature inverts feature_pair


def test_quad_feature_is_the_reference_index(order):
    reference_index = {(int(i), int(j)): 33 + n for n, (i, j) in enumerate(zip(ref._PAIR_I, ref._PAIR_J))}
    got = {(i, j): f for i, j, f in order["quad"]}
    assert got == reference_index
    assert all(f == 33 + 15 * i - i * (i - 1) // 2 + (j - i - 1) for (i, j), f in got.items())


def test_the_kernels_take_the_order_from_the_one_header():
    """No kernel spells the pair enumeration out itself: both include the header and use it."""
    for kernel in ("based_prefill/feature_map.cuh", "based_decode/based_decode.cu"):
        text = (ROOT / "csrc" / kernel).read_text()
        assert '#include "../common/feature_order.h"' in text and "feature_pair(" in text, kernel
    definitions = [p for p in (ROOT / "csrc").rglob("*")
                   if p.suffix in (".h", ".cuh", ".cu", ".cpp")
                   and re.search(r"\b(pair_i|pair_j|feature_pair|quad_feature)\s*\(int", p.read_text())]
    assert [p.relative_to(ROOT).as_posix() for p in definitions] == ["csrc/common/feature_order.h"]
