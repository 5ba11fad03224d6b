"""The table of tests/cpu_paths.sh: one row per learning claim, one column per CPU path, from the JSONL records that
tests/learning.py writes (DSFT_LEARNING_LOG). A cell is the measured value, marked ! where the claim did not do what
it had to (hold on a learning run, fail on a run that does not learn); the last columns are the value nearest the
bound over all paths and the bound.

    python tests/cpu_paths_table.py cpu_paths/*.jsonl
"""

import json
import sys
from pathlib import Path


def read_records(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        records += [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return records


def column(record: dict) -> str:
    blas = record.get("mkl_cbwr", "auto")
    return f"{record['capability'].lower()} t{record['omp_num_threads']}" + ("" if blas == "auto" else f" mkl:{blas.lower()}")


def table(records: list[dict]) -> str:
    """Markdown: test and claim, then the value on each path, the value nearest the bound, the relation and bound."""
    columns = sorted({column(r) for r in records})
    rows: dict[tuple, dict] = {}
    nearest: dict[tuple, float] = {}
    for record in records:
        key = (record["test"].split("::", 1)[-1], record["quantity"], record["expect"], record["relation"], record["bound"])
        good = record["holds"] == (record["expect"] == "holds")
        rows.setdefault(key, {})[column(record)] = f"{record['value']:.4g}" + ("" if good else " !")
        if key not in nearest or abs(record["value"] - record["bound"]) < abs(nearest[key] - record["bound"]):
            nearest[key] = record["value"]
    lines = ["| test | claim | must | " + " | ".join(columns) + " | nearest | bound |",
             "|---|---|---|" + "---|" * len(columns) + "---|---|"]
    for key, cells in sorted(rows.items()):
        test, quantity, expect, relation, bound = key
        values = " | ".join(cells.get(c, "") for c in columns)
        lines.append(f"| {test} | {quantity} | {expect} | {values} | {nearest[key]:.4g} | {relation} {bound:.4g} |")
    bad = sum(cell.endswith("!") for cells in rows.values() for cell in cells.values())
    lines.append(f"\n{len(rows)} claims on {len(columns)} paths; {bad} did not do what they had to (marked !).")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/cpu_paths_table.py RECORDS.jsonl ...")
    print(table(read_records(sys.argv[1:])))
