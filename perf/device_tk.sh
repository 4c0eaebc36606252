#!/bin/bash
# Device call TK (issue 14): ThunderKittens beside ours in the prefill benchmarks.
#   1. build attn_kernels in place; build the ThunderKittens peer (perf/thunderkittens.py) from .tk/
#   2. tests/test_thunderkittens.py (TK's o by the rule, its bf16 state vs ours) + the CPU-side TK tests
#   3. python -m pytest perf -k prefill (every prefill id, the 2 new shapes and the 9 thunderkittens ids)
#   4. a table: ours (num, norm) vs TK per shape, with the issue's targets
# Before the call, on the session's machine (the device receives only the repository):
#   cp -r ../shared/peers/thunderkittens .tk && chmod -R u+w .tk        # or let this script do it
# then run it from the repository root with carry [".whl", ".tk"] (.whl: nox, nvidia-cutlass, fla-core wheels), e.g.
#   run(command="bash perf/device_tk.sh", carry=[".whl", ".tk"])
# Outputs under $OUT: build.log, tk_build.log, tk_tests.log, prefill.log, prefill.json, table.txt.
# If a first call runs out of its 10 minutes, call again on the same warm machine: attn_kernels/_C*.so and
# build/thunderkittens/ are ignored build outputs the device keeps, so both builds are then skipped / reused.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
if [ ! -f .tk/include/kittens.cuh ]; then
    if [ -f ../shared/peers/thunderkittens/include/kittens.cuh ]; then
        cp -r ../shared/peers/thunderkittens .tk && chmod -R u+w .tk || exit 1
        echo "copied ../shared/peers/thunderkittens -> .tk (now carry .tk to the device)"
    else
        echo "no ThunderKittens checkout in .tk/ (cp -r ../shared/peers/thunderkittens .tk before the call)"; exit 1
    fi
fi
OUT=${OUT:-/tmp/tk_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 ATTN_KERNELS_TK_DIR=$PWD/.tk
nvidia-smi -L
T0=$(date +%s)
ls attn_kernels/_C*.so >/dev/null 2>&1 || MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 \
    || { tail -30 $OUT/build.log; exit 1; }
echo "attn_kernels build: $(( $(date +%s) - T0 )) s"
timeout 300 python3 -c "from perf import thunderkittens as t; m = t.load(verbose=True); print('built', m.__file__)" \
    > $OUT/tk_build.log 2>&1; RC=$?
grep -E "ptxas info *: Used|spill|^built|Error|error" $OUT/tk_build.log | grep -v "warning" | tail -8
[ $RC -eq 0 ] || { echo "TK build failed (rc=$RC)"; tail -30 $OUT/tk_build.log; exit 1; }
echo "TK build: $(( $(date +%s) - T0 )) s"
timeout 240 python3 -m pytest tests/test_thunderkittens.py -q -p no:cacheprovider -rfEs 2>&1 | tee $OUT/tk_tests.log | tail -15
echo "TK tests: $(( $(date +%s) - T0 )) s"
timeout $(( 585 - ($(date +%s) - T0) )) python3 -m pytest perf -k prefill -q -p no:cacheprovider -rs \
    --benchmark-json=$OUT/prefill.json > $OUT/prefill.log 2>&1; echo "perf -k prefill rc=$?"
tail -4 $OUT/prefill.log
echo "perf: $(( $(date +%s) - T0 )) s"
python3 - "$OUT/prefill.json" <<'EOF' | tee $OUT/table.txt
import json, sys
from collections import defaultdict

run = json.load(open(sys.argv[1]))
print(f"GPU: {run['machine_info'].get('gpu_name')}  torch {run['machine_info'].get('torch_version')}  "
      f"(ms, medians of device time per call)")
med = defaultdict(dict)  # (B, H, N) -> impl -> median ms
floor = {}
for b in run["benchmarks"]:
    if b["extra_info"].get("op") != "based_prefill":
        continue
    s = b["extra_info"]["shape"]
    key = (s["B"], s["H"], s["N"])
    med[key][b["extra_info"]["impl"]] = b["stats"]["median"] * 1e3
    floor[key] = b["extra_info"]["floor_us"] / 1e3
hdr = (f"{'shape (B,H,N)':>18} {'ours num':>9} {'ours norm':>9} {'TK num':>9} {'num/TK':>7} {'norm/TK':>7} "
       f"{'num %floor':>10}  targets: num <= 0.45 TK, norm <= 0.55 TK")
print(hdr)
for key in sorted(med, key=lambda k: (k[0] * k[1] * k[2], k)):
    m = med[key]
    num, norm, tk = m.get("attn_kernels-num"), m.get("attn_kernels-norm"), m.get("thunderkittens-num")
    f = lambda x: f"{x:9.3f}" if x else f"{'-':>9}"  # noqa: E731
    r = lambda a: f"{a / tk:7.2f}" if a and tk else f"{'-':>7}"  # noqa: E731
    ok = "" if not (num and norm and tk) else \
        ("ok" if num <= 0.45 * tk and norm <= 0.55 * tk else "MISSES TARGET")
    pct = f"{100 * floor[key] / num:9.1f}%" if num else f"{'-':>10}"
    print(f"{str(key):>18} {f(num)} {f(norm)} {f(tk)} {r(num)} {r(norm)} {pct}  {ok}")
skipped = {k: v for k, v in run.get("skipped", {}).items() if "prefill" in k}
print(f"skipped prefill ids: {len(skipped)}")
for k, v in list(skipped.items())[:12]:
    print("  ", k.split("[")[-1], "->", v[:160])
EOF
echo "total: $(( $(date +%s) - T0 )) s"
