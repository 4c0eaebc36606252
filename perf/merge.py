"""Merge perf runs (pytest-benchmark JSON) of one commit on one GPU into one run: a whole-suite baseline recorded
in parts (e.g. two CI jobs, or a runner whose job time limit is shorter than the suite).

    python -m perf.merge PART.json [PART.json ...] -o perf/baselines/<gpu-slug>/NNNN_<name>.json

The parts must share the GPU (machine_info gpu_slug), the commit (commit_info id, and dirty) and torch; no
benchmark may appear twice. The result keeps the first part's machine_info, commit_info, datetime and version,
all benchmarks (sorted by fullname), the union of "skipped" minus what ran in another part, and names its
parts under machine_info["merged_from"]. No torch, no GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class MergeRefused(ValueError):
    pass


def _same(docs: list[dict], what: str, get) -> None:
    values = {json.dumps(get(d), sort_keys=True) for d in docs}
    if len(values) > 1:
        raise MergeRefused(f"the parts differ in {what}: {sorted(values)}")


def merge_runs(docs: list[dict], labels: list[str]) -> dict:
    """-> one run document from `docs` (parsed pytest-benchmark JSON), labelled `labels` in merged_from."""
    if not docs:
        raise MergeRefused("no parts given")
    _same(docs, "GPU (machine_info gpu_slug)", lambda d: (d.get("machine_info") or {}).get("gpu_slug"))
    _same(docs, "torch (machine_info torch_version)", lambda d: (d.get("machine_info") or {}).get("torch_version"))
    _same(docs, "commit (commit_info id, dirty)",
          lambda d: [(d.get("commit_info") or {}).get(k) for k in ("id", "dirty")])
    benches: dict[str, dict] = {}
    for doc, label in zip(docs, labels):
        for b in doc.get("benchmarks", []):
            if b["fullname"] in benches:
                raise MergeRefused(f"{b['fullname']} is in more than one part (again in {label})")
            benches[b["fullname"]] = b
    skipped: dict[str, str] = {}
    for doc in docs:
        skipped.update(doc.get("skipped") or {})
    out = dict(docs[0])
    out["machine_info"] = dict(docs[0].get("machine_info") or {}, merged_from=list(labels))
    out["benchmarks"] = [benches[name] for name in sorted(benches)]
    out["skipped"] = {name: why for name, why in sorted(skipped.items()) if name not in benches}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        merged = merge_runs([json.loads(p.read_text()) for p in args.parts], [p.name for p in args.parts])
    except MergeRefused as exc:
        print(f"perf.merge: refused: {exc}", file=sys.stderr)
        return 2
    args.output.write_text(json.dumps(merged, indent=4) + "\n")
    print(f"{args.output}: {len(merged['benchmarks'])} benchmarks from {len(args.parts)} parts, "
          f"{len(merged['skipped'])} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
