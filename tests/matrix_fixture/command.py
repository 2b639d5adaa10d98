"""A stand-in matrix command for tests: writes a planted metric, counts its runs, fails on request.

    python -m tests.matrix_fixture.command --out DIR --value 0.7 [--input OTHER_WORK] [--fail-flag FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--value", type=float, required=True)
    p.add_argument("--input", default=None, help="another cell's work folder: its value is added")
    p.add_argument("--counter", required=True, help="file counting the runs of this command")
    p.add_argument("--fail-flag", default=None, help="exit 1 while this file exists (a crash mid-matrix)")
    args = p.parse_args(argv)
    counter = Path(args.counter)
    runs = json.loads(counter.read_text()) if counter.exists() else []
    runs.append(Path(args.out).parent.name)
    counter.write_text(json.dumps(runs))
    out = Path(args.out)
    (out / "partial.txt").write_text("started")
    if args.fail_flag and Path(args.fail_flag).exists():
        return 1
    value = args.value + (json.loads((Path(args.input) / "summary.json").read_text())["value"] if args.input else 0.0)
    pd.DataFrame({"method": ["ours", "baseline"], "score": [value, value / 2]}).to_csv(out / "scores.csv", index=False)
    (out / "summary.json").write_text(json.dumps({"value": value, "nested": {"n": 3}}))
    return 0
