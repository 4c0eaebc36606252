"""CPU tests of perf/merge.py: a stored baseline cut in two parts merges back into the same benchmarks, the
gate finds nothing between them, and parts of other GPUs, commits or with a benchmark twice are refused."""
import copy
import json
from pathlib import Path

import pytest

from perf import gate, merge

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT / "perf" / "baselines" / "nvidia-h100-80gb-hbm3" / "0002_h100-thunderkittens.json"


def halves():
    doc = json.loads(STORED.read_text())
    names = sorted(b["fullname"] for b in doc["benchmarks"])
    first = {n for n in names if "based_prefill" in n}
    a, b = copy.deepcopy(doc), copy.deepcopy(doc)
    a["benchmarks"] = [x for x in doc["benchmarks"] if x["fullname"] in first]
    b["benchmarks"] = [x for x in doc["benchmarks"] if x["fullname"] not in first]
    # each part also lists the other part's ids as skipped ("deselected" is not what pytest records, but a part
    # may skip what the other ran): the merge drops those
    a["skipped"] = dict(doc["skipped"], **{x["fullname"]: "ran in the other part" for x in b["benchmarks"][:3]})
    return doc, a, b


def test_two_parts_merge_back_into_the_whole_run():
    doc, a, b = halves()
    assert a["benchmarks"] and b["benchmarks"]
    merged = merge.merge_runs([b, a], ["b.json", "a.json"])
    assert [x["fullname"] for x in merged["benchmarks"]] == sorted(x["fullname"] for x in doc["benchmarks"])
    assert merged["skipped"] == doc["skipped"]
    assert merged["machine_info"]["merged_from"] == ["b.json", "a.json"]
    assert merged["commit_info"] == doc["commit_info"]
    result = gate.compare(doc, merged)
    assert len(result.compared) == len(doc["benchmarks"])
    assert result.ok and not result.regressions and not result.missing and not result.new


@pytest.mark.parametrize("field,key", [("machine_info", "gpu_slug"), ("machine_info", "torch_version"),
                                       ("commit_info", "id"), ("commit_info", "dirty")])
def test_parts_of_another_gpu_torch_or_commit_are_refused(field, key):
    _, a, b = halves()
    b[field][key] = "other"
    with pytest.raises(merge.MergeRefused, match=key.split("_")[0]):
        merge.merge_runs([a, b], ["a", "b"])


def test_a_benchmark_in_two_parts_is_refused():
    _, a, b = halves()
    b["benchmarks"].append(a["benchmarks"][0])
    with pytest.raises(merge.MergeRefused, match="more than one part"):
        merge.merge_runs([a, b], ["a", "b"])


def test_command_line_writes_the_merged_run(tmp_path):
    doc, a, b = halves()
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "0003_x.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert merge.main([str(pa), str(pb), "-o", str(out)]) == 0
    assert len(json.loads(out.read_text())["benchmarks"]) == len(doc["benchmarks"])
    b["commit_info"]["id"] = "other"
    pb.write_text(json.dumps(b))
    assert merge.main([str(pa), str(pb), "-o", str(out)]) == 2
