"""`hf-paged bench diff A.json B.json`: two runs of one benchmark side by side, row by row, as B over A.

For the A/B runs of a switch (`.ci/device-plan.sh pipeline`, `pdl`: the same command with an
environment variable off, then on): rows are matched by what they measured, and each gets its figure in both runs
and the ratio. Below 1 is faster for times, slower for rates (the column says which).

    hf-paged bench diff steps_pdl0.json steps_pdl1.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# bench -> how to read its rows: (rows of the JSON, the row's key fields, the figure compared, "time" or "rate")
_KINDS = {
    "kernels": (lambda run: run["rows"], ("kernel", "shape", "config"), "ms", "time"),
    "steps": (lambda run: run["results"], ("setting", "batch"), "step_ms", "time"),
    "throughput": (lambda run: run["systems"], ("system", "name"), "output_tok_per_s", "rate"),
}


def kind_of(run: dict) -> str:
    """Which benchmark wrote `run` (by the fields it holds)."""
    if "systems" in run and "roofline" in run:
        return "throughput"
    if "results" in run and "batches" in run:
        return "steps"
    if "rows" in run and "copy_bandwidth_gbps" in run:
        return "kernels"
    raise ValueError(f"not a JSON of bench kernels, steps or throughput (fields: {sorted(run)})")


def compare(a: dict, b: dict) -> list[dict]:
    """The rows both runs measured, in A's order: key, figure in A, in B, and B / A."""
    kind = kind_of(a)
    if kind_of(b) != kind:
        raise ValueError(f"A is a {kind} run, B a {kind_of(b)} run")
    rows, fields, figure, unit = _KINDS[kind]
    in_b = {tuple(str(row.get(f)) for f in fields): row for row in rows(b)}
    out = []
    for row in rows(a):
        key = tuple(str(row.get(f)) for f in fields)
        other = in_b.get(key)
        if other is None or not row.get(figure) or other.get(figure) is None:
            continue
        out.append({"key": " | ".join(k for k in key if k != "None"), "a": row[figure], "b": other[figure],
                    "ratio": other[figure] / row[figure], "figure": figure, "unit": unit})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-paged bench diff", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the run to compare against (say, the switch off)")
    parser.add_argument("b", type=Path, help="the other run")
    args = parser.parse_args(argv)
    rows = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
    if not rows:
        print("no rows measured in both runs", file=sys.stderr)
        return 1
    figure, unit = rows[0]["figure"], rows[0]["unit"]
    better = "< 1 is faster" if unit == "time" else "> 1 is faster"
    print(f"| row | {figure} A | {figure} B | B / A ({better}) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['key']} | {row['a']:.4f} | {row['b']:.4f} | {row['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
