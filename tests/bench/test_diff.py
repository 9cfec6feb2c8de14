"""`hf-paged bench diff`: two runs of one benchmark, matched row by row, against the device's own JSONs."""

import json
from pathlib import Path

import pytest

from hf_paged.bench.diff import compare, kind_of
from hf_paged.cli import main

RUNS = Path(__file__).resolve().parents[2] / "docs" / "runs"
KERNELS, STEPS, THROUGHPUT = ("h200_kernels_sweep_onelaunch.json", "h200_llama2-7b_steps_onelaunch.json",
                              "h200_llama2-7b_sharegpt_d_splits.json")


def load(name: str) -> dict:
    return json.loads((RUNS / name).read_text())


@pytest.mark.parametrize("name, kind", [(KERNELS, "kernels"), (STEPS, "steps"), (THROUGHPUT, "throughput")])
def test_each_bench_is_recognised(name, kind):
    assert kind_of(load(name)) == kind


def test_a_run_against_itself_is_one_everywhere():
    run = load(KERNELS)
    rows = compare(run, run)
    assert len(rows) == len([r for r in run["rows"] if r["ms"]])
    assert all(row["ratio"] == 1.0 for row in rows)


def test_rows_are_matched_by_what_they_measured():
    a, b = load(STEPS), load(STEPS)
    b["results"] = list(reversed(b["results"]))  # another order
    for row in b["results"]:
        row["step_ms"] *= 2 if row["batch"] == 16 else 1
    b["results"].append({**b["results"][0], "batch": 4096})  # a row A did not measure is left out
    rows = compare(a, b)
    assert [r["key"] for r in rows] == [f"{r['setting']} | {r['batch']}" for r in a["results"]]
    assert [r["ratio"] for r in rows] == [2.0 if " | 16" in r["key"] else 1.0 for r in rows]


def test_throughput_compares_output_tokens_a_second():
    a = load(THROUGHPUT)
    b = json.loads(json.dumps(a))
    b["systems"][0]["output_tok_per_s"] *= 1.1
    (row,) = compare(a, b)
    assert row["figure"] == "output_tok_per_s" and row["unit"] == "rate" and row["ratio"] == pytest.approx(1.1)


def test_different_benchmarks_do_not_compare():
    with pytest.raises(ValueError, match="kernels run, B a steps run"):
        compare(load(KERNELS), load(STEPS))
    with pytest.raises(ValueError, match="not a JSON"):
        kind_of({"rows": []})


def test_cli_prints_the_table(capsys, tmp_path):
    b = load(STEPS)
    for row in b["results"]:
        row["step_ms"] /= 2
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["bench", "diff", str(RUNS / STEPS), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "B / A (< 1 is faster)" in out and out.count("| 0.500 |") == len(b["results"])
