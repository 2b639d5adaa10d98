"""The experiment matrix: cells from YAML, resumable runs, tables with the paper's numbers, W&B runs.

A stand-in command (tests/matrix_fixture/command.py) writes planted metrics and counts its runs, so
the tests check what ran, what was skipped after a crash, and what W&B recorded, without training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments.matrix import main, waves
from experiments.matrix_cells import load_matrix
from experiments.matrix_wandb import offline_runs

FIXTURE = "tests.matrix_fixture.command"


def write_cells(root: Path, counter: Path, fail_flag: Path) -> Path:
    folder = root / "rosie"
    folder.mkdir(parents=True)
    (folder / "_matrix.yaml").write_text(yaml.safe_dump({"group": "rosie-matrix-test", "data": {"default": "unused"},
                                                         "order": ["base", "derived", "second"]}))
    common = ["--counter", str(counter)]
    cells = {
        "base": {"module": FIXTURE, "args": ["--out", "{work}", "--value", "0.5", *common], "table": "Table 2",
                 "metrics": {"eval/pearson_r": {"file": "scores.csv", "where": {"method": "ours"}, "column": "score"},
                             "baseline/pearson_r": {"file": "scores.csv", "where": {"method": "baseline"}, "column": "score"}},
                 "paper": {"eval/pearson_r": 0.319}, "tables": ["scores.csv"]},
        "derived": {"reads": "base", "table": "Fig. 3",
                    "metrics": {"nested/n": {"file": "summary.json", "path": "nested.n"}}},
        "second": {"module": FIXTURE, "table": "Table 2",
                   "args": ["--out", "{work}", "--value", "0.25", "--input", "{cell:base}", "--fail-flag", str(fail_flag),
                            *common],
                   "metrics": {"eval/pearson_r": {"file": "scores.csv", "where": {"method": "ours"}, "column": "score"}}},
    }
    for name, body in cells.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "reproduces": f"{name} of the paper", **body}))
    return root


@pytest.fixture()
def matrix(tmp_path: Path) -> dict:
    counter, flag = tmp_path / "runs.json", tmp_path / "crash"
    root = write_cells(tmp_path / "configs", counter, flag)
    return {"root": root, "out": tmp_path / "out", "counter": counter, "flag": flag,
            "argv": ["--paper", "rosie", "--config-root", str(root), "--out", str(tmp_path / "out")]}


def runs(counter: Path) -> list[str]:
    return json.loads(counter.read_text()) if counter.exists() else []


def test_cells_load_in_dependency_order_and_waves() -> None:
    matrix = load_matrix("rosie")  # the real ROSIE matrix parses, and every cell it reads exists
    names = list(matrix["cells"])
    assert names[0] == "table2" and {"fig3_phenotyping", "fig4_scgp", "suppl_fig5_stride", "context_128px"} <= set(names)
    for name, cell in matrix["cells"].items():
        assert all(names.index(dep) < names.index(name) for dep in cell.dependencies())
    levels = waves(matrix["cells"], names)
    assert "table2" in levels[0] and "suppl_fig5_stride" in levels[1]


def test_a_killed_matrix_reruns_only_its_unfinished_cells(matrix: dict, capsys) -> None:
    matrix["flag"].write_text("crash")
    assert main(matrix["argv"] + ["--no-wandb"]) == 2  # `second` fails after base and derived are done
    assert "cell second" in capsys.readouterr().err
    assert runs(matrix["counter"]) == ["base", "second"]
    assert main(matrix["argv"] + ["--list"]) == 0
    listing = capsys.readouterr().out
    status = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:]}
    assert status == {"base": "done", "derived": "done", "second": "partial"}
    matrix["flag"].unlink()
    assert main(matrix["argv"] + ["--no-wandb"]) == 0
    assert runs(matrix["counter"]) == ["base", "second", "second"]  # base was not run again
    record = json.loads((matrix["out"] / "rosie" / "second" / "cell.json").read_text())
    assert record["metrics"]["eval/pearson_r"] == pytest.approx(0.75)  # 0.25 + base's 0.5: it read base's output
    assert main(matrix["argv"] + ["--no-wandb"]) == 0
    assert len(runs(matrix["counter"])) == 3  # everything done: nothing runs


def test_tables_put_the_papers_numbers_beside_ours(matrix: dict) -> None:
    assert main(matrix["argv"] + ["--no-wandb"]) == 0
    tables = (matrix["out"] / "rosie" / "tables.md").read_text()
    assert "## Table 2" in tables and "## Fig. 3" in tables
    assert "| base | 0.250 | — | 0.500 | 0.319 |" in tables  # baseline, then eval (the YAML's key order)
    assert "| derived | 3.000 | — |" in tables
    assert (matrix["out"] / "rosie" / "comparison.png").stat().st_size > 1000


def test_only_runs_one_cell_and_what_it_reads(matrix: dict) -> None:
    assert main(matrix["argv"] + ["--no-wandb", "--only", "derived"]) == 0
    assert runs(matrix["counter"]) == ["base"]
    assert not (matrix["out"] / "rosie" / "second" / "cell.json").exists()


def test_bad_cell_config_is_one_line(matrix: dict, capsys) -> None:
    (matrix["root"] / "rosie" / "typo.yaml").write_text(yaml.safe_dump({"name": "typo", "reproduces": "x",
                                                                        "modul": FIXTURE, "metrics": {}}))
    assert main(matrix["argv"] + ["--list"]) == 2
    assert "unknown field(s) ['modul']" in capsys.readouterr().err


def test_cells_share_the_wandb_group_and_metric_keys(matrix: dict) -> None:
    assert main(matrix["argv"]) == 0
    logged = {r["name"]: r for r in offline_runs(matrix["out"], "rosie")}
    assert set(logged) == {"base", "derived", "second"}
    assert {r["group"] for r in logged.values()} == {"rosie-matrix-test"}
    assert logged["second"]["job_type"] == "second"
    assert logged["base"]["summary"]["eval/pearson_r"] == pytest.approx(0.5)
    assert logged["second"]["summary"]["eval/pearson_r"] == pytest.approx(0.75)
    assert logged["base"]["config"]["table"] == "Table 2" and "--value" in logged["base"]["config"]["args"]


def test_local_submitit_launcher_runs_the_waves(matrix: dict) -> None:
    assert main(matrix["argv"] + ["--no-wandb", "--launcher", "local"]) == 0
    assert sorted(runs(matrix["counter"])) == ["base", "second"]
    assert (matrix["out"] / "rosie" / "second" / "cell.json").exists()
