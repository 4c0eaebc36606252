"""The hand-made pytest-benchmark JSON the gate and noise-study tests read (tests/fixtures/gate_*.json), the
benchmark ids in them and two helpers.

The run against the baseline: decode fp32 +12% (noise spread 5%: 15% wanted, capped at 10%), decode bf16
+1%, prefill +5% (spread 0.4%: threshold 3%), sliding-window attn_kernels 2x, sliding-window torch 30% faster
(one noise median only: default threshold), fla decode only in the baseline (the run records it as skipped:
fla not installed), flash_attn only in the run.
"""
import json
from pathlib import Path

FIX = Path(__file__).resolve().parent / "fixtures"
BASELINE, RUN, RUN_H100, NOISE = (FIX / f"gate_{n}.json" for n in ("baseline_h200", "run_h200", "run_h100",
                                                                   "noise_h200"))
DECODE = "perf/test_perf_based_decode.py::test_perf_based_decode[{}-B64-H16-bf16]"
SWA_ID = "perf/test_perf_sliding_window_decode.py::test_perf_sliding_window_decode[{}-B256-H16-W64-e64-bf16]"
DEC32, DEC16, FLA = (DECODE.format(i) for i in ("attn_kernels-state_fp32", "attn_kernels-state_bf16",
                                                "fla_fused_recurrent-state_fp32"))
PREFILL = "perf/test_perf_based_prefill.py::test_perf_based_prefill[attn_kernels-norm-B16-H16-N4096-bf16]"
SWA, SWA_TORCH, SWA_FA = (SWA_ID.format(i) for i in ("attn_kernels", "torch", "flash_attn"))


def load(path):
    return json.loads(path.read_text())


def by_name(result):
    return {c.name: c for c in result.compared}
