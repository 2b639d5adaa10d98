"""exp-virtues-downstream: the report's planted-signal checks read the steps' files, and steps resume.

The analyses themselves are tested in their own files against direct computations; this checks
the driver's wiring: a check passes or fails on the numbers the steps wrote (it can fail), a failed
step is reported instead of hiding the others, and a rerun skips finished steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from experiments.virtues_downstream import Step, analysis_steps, run_step
from experiments.virtues_downstream_report import write_downstream_report


def fake_outputs(out: Path, auroc: float, ratio: float, p: float, above_chance: bool) -> None:
    (out / "biomarkers").mkdir(parents=True)
    (out / "biomarkers" / "summary.json").write_text(json.dumps({
        "n_patients": 24, "n_responders": 12, "n_cells": 3000, "n_candidates": 40, "resolutions": [1.0, 2.0],
        "signatures": ["RS1", "RS2", "NRS1", "NRS2"], "multivariate_auroc": auroc, "best_baseline": "ratio_CD8",
        "best_baseline_auroc": ratio}))
    (out / "transfer").mkdir()
    (out / "transfer" / "summary.json").write_text(json.dumps({"n_patients": 40, "n_events": 25, "logrank_p": p,
                                                              "c_index": 0.7, "strata": {"high": 10}}))
    (out / "treatment").mkdir()
    (out / "treatment" / "summary.json").write_text(json.dumps({"responders_shift_more": True, "direction_detail": "x"}))
    (out / "cross_panel").mkdir()
    pd.DataFrame({"representation": ["virtues_cell_tokens"] * 2 + ["mean_expression"] * 2,
                  "class": ["T cell", "tumour"] * 2, "f1": [0.6, 0.3 if above_chance else 0.1, 0.2, 0.9],
                  "chance": [0.2, 0.2, 0.2, 0.2], "n_target": [10, 10, 10, 10]}).to_csv(out / "cross_panel" / "per_class_f1.csv", index=False)
    pd.DataFrame({"representation": ["virtues_cell_tokens"], "macro_f1": [0.5]}).to_csv(out / "cross_panel" / "summary.csv", index=False)


def checks(report: str) -> dict[str, str]:
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ") and line.count(" | ") == 2]
    return {r[0].lstrip("| "): r[1] for r in rows[1:]}


def test_report_checks_pass_on_planted_numbers(tmp_path: Path) -> None:
    fake_outputs(tmp_path, auroc=0.85, ratio=0.6, p=0.01, above_chance=True)
    report = write_downstream_report(tmp_path, {"datasets": {}}, "model.ckpt", {}, 1.0, []).read_text()
    found = checks(report)
    assert [v for k, v in found.items() if "biomarkers" in k] == ["yes"]
    assert [v for k, v in found.items() if "strata" in k] == ["yes"]
    assert [v for k, v in found.items() if "cross-panel" in k] == ["yes"]
    assert "0.817" in report and "0.628" in report  # the paper's numbers beside ours


def test_report_checks_fail_when_the_signal_is_not_found(tmp_path: Path) -> None:
    fake_outputs(tmp_path, auroc=0.65, ratio=0.7, p=0.2, above_chance=False)
    report = write_downstream_report(tmp_path, {}, "m", {"attention": "boom"}, 1.0, []).read_text()
    found = checks(report)
    assert [v for k, v in found.items() if "biomarkers" in k] == ["**no**"]
    assert [v for k, v in found.items() if "strata" in k] == ["**no**"]
    assert [v for k, v in found.items() if "cross-panel" in k] == ["**no**"]
    assert "`attention`: boom" in report


def test_steps_resume_and_use_the_cpu_protocol(tmp_path: Path) -> None:
    counter = tmp_path / "runs.json"
    step = Step("fixture", "tests.matrix_fixture.command",
                ("--out", str(tmp_path / "fixture"), "--value", "1", "--counter", str(counter)), owns_folder=False)
    (tmp_path / "fixture").mkdir()
    assert run_step(step, tmp_path) > 0
    assert run_step(step, tmp_path) == 0.0  # finished: skipped
    assert len(json.loads(counter.read_text())) == 1  # ran once
    names = [s.name for s in analysis_steps(tmp_path, "m.ckpt", tmp_path / "cohort", 0)]
    assert names[:4] == ["tokens_discovery", "tokens_validation", "tokens_discovery_shared", "tokens_panel_b_shared"]
    biomarkers = next(s for s in analysis_steps(tmp_path, "m.ckpt", tmp_path / "cohort", 0) if s.name == "biomarkers")
    assert "--resolutions" in biomarkers.args
