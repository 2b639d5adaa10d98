"""The experiment drivers' shared reporting: training run, curves, report frame, and each driver's body."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from experiments import rosie_experiment, virtues_experiment
from experiments.reporting import (
    Curve,
    CurvePanel,
    format_metric,
    plot_training_curves,
    ranked_markers,
    reproduce_command,
    train_with_cli,
    write_report,
)


def fake_cli(tmp_path: Path, best: str = "", metrics: pd.DataFrame | None = None, steps: int = 7):
    """Stands in for a LightningCLI after ``fit``: a trainer that saves checkpoints and has a CSV logger."""
    log_dir = tmp_path / "csv"
    log_dir.mkdir(exist_ok=True)
    if metrics is not None:
        metrics.to_csv(log_dir / "metrics.csv", index=False)
    trainer = SimpleNamespace(
        checkpoint_callback=SimpleNamespace(best_model_path=best),
        save_checkpoint=lambda path: Path(path).write_text(f"final weights at {Path(path).name}"),
        loggers=[SimpleNamespace(log_dir=None), SimpleNamespace(log_dir=str(log_dir))],
        global_step=steps,
    )
    calls: list[list[str]] = []

    def main(args: list[str]):
        calls.append(args)
        return SimpleNamespace(trainer=trainer)

    return main, calls


def test_train_with_cli_keeps_best_or_final_checkpoint(tmp_path: Path) -> None:
    metrics = pd.DataFrame({"step": [0, 1], "train/loss": [1.0, 0.5]})
    best = tmp_path / "best.ckpt"
    best.write_text("best weights")
    main, calls = fake_cli(tmp_path, best=str(best), metrics=metrics)
    run = train_with_cli(main, "c.yaml", "data", tmp_path, ["--trainer.max_steps=2"], keep="best")
    assert calls == [["fit", "--config", "c.yaml", "--data.data_dirs", "[data]", "--trainer.default_root_dir", str(tmp_path),
                      "--trainer.max_steps=2"]]
    assert run.checkpoint == str(tmp_path / "model.ckpt") and Path(run.checkpoint).read_text() == "best weights"
    assert run.steps == 7 and run.metrics is not None and list(run.metrics["train/loss"]) == [1.0, 0.5]

    (tmp_path / "no_best").mkdir()
    main, _ = fake_cli(tmp_path / "no_best", best="")
    run = train_with_cli(main, "c.yaml", "data", tmp_path / "no_best", [], keep="best")
    assert (tmp_path / "no_best" / "final.ckpt").exists()  # saved, then copied
    assert Path(run.checkpoint).read_text() == "final weights at final.ckpt"

    (tmp_path / "final").mkdir()
    main, _ = fake_cli(tmp_path / "final", best=str(best))
    run = train_with_cli(main, "c.yaml", "data", tmp_path / "final", [], keep="final")
    assert Path(run.checkpoint).read_text() == "final weights at model.ckpt"  # the final weights, not the best


def test_training_curves_skip_missing_columns(tmp_path: Path) -> None:
    panels = (CurvePanel("loss", (Curve("train/loss", label="train"), Curve("val/loss", label="val", marker="o")), log_y=True, legend=True),
              CurvePanel("never logged", (Curve("nothing"),)))
    assert plot_training_curves(None, tmp_path / "a.png", panels) is None
    assert plot_training_curves(pd.DataFrame({"step": [0], "other": [1.0]}), tmp_path / "b.png", panels) is None
    metrics = pd.DataFrame({"step": np.arange(4), "train/loss": [1.0, 0.8, np.nan, 0.5]})
    path = plot_training_curves(metrics, tmp_path / "c.png", panels)
    assert path == tmp_path / "c.png" and path.stat().st_size > 1000


def test_report_frame(tmp_path: Path) -> None:
    run_dir = tmp_path / "run7"
    (run_dir / "evaluation").mkdir(parents=True)
    fig = run_dir / "evaluation" / "per_marker.png"
    fig.write_bytes(b"png")
    command = reproduce_command("exp-x", "experiments.x", ["--data", "d"])
    assert command == "make exp-x  # = python -m experiments.x --data d"
    path = write_report(run_dir, "X on d", ["body line", ""], [fig], command)
    assert path.read_text().split("\n") == [
        "# X on d — run run7", "", "body line", "", "## Figures", "", "![per_marker](evaluation/per_marker.png)", "",
        "## Reproduce", "", "```", command, "```", ""]
    assert not list(run_dir.glob("*.tmp"))
    assert format_metric(float("nan")) == "n/a" and format_metric(0.12345) == "0.123"
    rows = pd.DataFrame({"marker": ["CD45", "PanCK"], "pearson_r": [0.914, 0.5]})
    assert ranked_markers(rows) == "CD45 0.91, PanCK 0.50"


def test_rosie_report_body_has_table_2_and_markers() -> None:
    summary = pd.DataFrame({"method": ["rosie", "he_expression"], "pearson_r": [0.5, 0.1], "spearman_r": [0.4, 0.1],
                            "c_index": [np.nan, 0.6], "n_patches": [100, 100]})
    per_marker = pd.DataFrame({"method": "rosie", "marker": [f"M{i}" for i in range(10)], "pearson_r": np.linspace(0.9, 0.0, 10)})
    info = {"split": "test", "n_tissues": 2, "n_markers": 10, "stride": 8, "arch": "convnext_atto", "train_minutes": 1.0,
            "device": "cpu", "patches_per_s": 50.0}
    body = rosie_experiment.report_body(summary, per_marker, {"t0": {"mean_dynamic_range": 1.5, "w1_distance": None}}, info)
    assert "| ROSIE | 0.500 | 0.400 | n/a | 100 |" in body and "| H&E expression | 0.100 | 0.100 | 0.600 | 100 |" in body
    assert "Best-predicted markers: M0 0.90, M1 0.80, M2 0.70, M3 0.60, M4 0.50, M5 0.40, M6 0.30, M7 0.20." in body
    assert "| t0 | 1.500 | n/a |" in body


@pytest.mark.parametrize("unseen", [False, True])
def test_virtues_report_body_verdicts_and_seen_section(unseen: bool) -> None:
    summary = pd.DataFrame({"strategy": ["independent", "independent"], "method": ["virtues", "visible_mean"],
                            "pearson_r": [0.6, 0.2], "f1": [0.7, np.nan]})
    per_marker = pd.DataFrame({"method": "virtues", "strategy": "independent", "marker": ["A", "B"], "pearson_r": [0.8, 0.4]})
    seen = pd.DataFrame({"strategy": ["independent"], "method": ["virtues"], "seen": [not unseen], "pearson_r": [0.5],
                         "f1": [0.5], "n_markers": [2]})
    info = {"split": "test", "n_tissues": 1, "n_crops": 1, "n_marker_crops": 1, "n_markers": 2, "d_model": 64,
            "encoder_pattern": "hvhv", "decoder_pattern": "f", "steps": 20, "train_minutes": 0.1, "eval_minutes": 0.1,
            "total_minutes": 0.2, "device": "cpu", "skipped": ["X"]}
    body = virtues_experiment.report_body(summary, per_marker, seen, info)
    assert "| independent | Visible-pixel mean | 0.200 | n/a |" in body
    assert "- independent masking: VirTues r = 0.600 vs Visible-pixel mean r = 0.200 — VirTues better." in body
    assert ("## Seen vs unseen markers (zero-shot)" in body) == unseen
    assert "Best reconstructed markers (independent masking): A 0.80, B 0.40." in body
