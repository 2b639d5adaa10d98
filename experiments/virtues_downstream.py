"""`make exp-virtues-downstream`: VirTues' downstream science (Figs. 3e-g, 4d, 5, Suppl. Fig. 20) on a
synthetic cohort that carries planted signals, with the paper's numbers beside ours.

    python -m experiments.virtues_downstream [--cohort data/cohort] [--out runs/virtues-downstream/<run>]
        [--ckpt C | --config experiments/configs/virtues/synthetic.yaml --cohort-config ...cohort.yaml]
        [--only STEP,...] [--seed 0]

Steps (each a command of this project, run in order into ``<out>/<step>``; a rerun with the same
``--out`` skips finished steps, so a killed run resumes):

1. ``cohort`` — the cohort preset (``datamodules.synthetic.generate_cohort``), unless present;
2. ``pretrain`` — VirTues on the discovery cohort (the exp-virtues recipe plus the cohort overrides;
   step-bounded), or ``--ckpt``;
3. ``tokens_*`` — cell tokens of the discovery and validation cohorts, and of discovery and panel B
   restricted to their shared markers (``experiments.virtues_tokens --channels-from``);
4. ``biomarkers`` (Fig. 5c-g), ``transfer`` (Fig. 5h-k), ``treatment`` (Fig. 5b), ``risk`` + ``tme``
   (Fig. 4a-d on the validation cohort), ``cross_panel`` (Fig. 3e-g), ``attention`` (Suppl. Fig. 20);
5. ``report.md`` (:mod:`experiments.virtues_downstream_report`) with the checks of what was planted.

What was reduced for a CPU (the paper's values stay in the commands' defaults and in
``experiments/configs/virtues/paper.yaml``): a d=64 VirTues pretrained for the cohort config's steps;
Leiden resolutions 1.0-2.0 (the paper's 4.0-5.0 is for ~10^6 cells; ours has ~3,000 pre-treatment
cells, where resolution 4 splits into clusters of a few cells); k-means 20 clusters for the risk groups
(paper 120); cell tokens from 128-px crops at a stride of 64 px over a 64-px zero pad (official: stride
42, pad 120: 4x the crops); the cross-panel source is the discovery cohort's train split.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import experiments.cli  # noqa: F401  (W&B offline by default)
from datamodules.command_line import run_command
from datamodules.synthetic import generate_cohort, read_cohort_manifest
from experiments.virtues_pretrain import main as virtues_pretrain
from experiments.reporting import new_run_dir, train_with_cli
from experiments.virtues_downstream_report import write_downstream_report

log = logging.getLogger(__name__)
DONE = ".step-done.json"


@dataclass(frozen=True)
class Step:
    """One command of the pipeline: ``python -m <module> <args>`` writing into ``<out>/<name>``."""

    name: str
    module: str
    args: tuple[str, ...]
    owns_folder: bool = True  # the command creates its --out folder itself (atomic outputs); else it is made empty


def cohort_paths(cohort: Path) -> dict[str, Path]:
    return {name: cohort / name for name in ("discovery", "validation", "panel_b")}


def analysis_steps(out: Path, ckpt: str, cohort: Path, seed: int) -> list[Step]:
    """Every command after pretraining, with the CPU-size arguments described in the module docstring."""
    d = cohort_paths(cohort)
    tok = {k: out / f"tokens_{k}" for k in ("discovery", "validation", "discovery_shared", "panel_b_shared")}
    token_args = ("--ckpt", ckpt, "--split", "all", "--stride", "64", "--pad", "64", "--no-progress")
    s = str(seed)
    return [
        Step("tokens_discovery", "experiments.virtues_tokens", (*token_args, "--data", str(d["discovery"]),
                                                                 "--out", str(tok["discovery"])), False),
        Step("tokens_validation", "experiments.virtues_tokens", (*token_args, "--data", str(d["validation"]),
                                                                  "--out", str(tok["validation"])), False),
        Step("tokens_discovery_shared", "experiments.virtues_tokens",
             (*token_args[:-1], "--data", str(d["discovery"]), "--channels-from", str(d["panel_b"]), "--split", "train",
              "--no-progress", "--out", str(tok["discovery_shared"])), False),
        Step("tokens_panel_b_shared", "experiments.virtues_tokens",
             (*token_args, "--data", str(d["panel_b"]), "--channels-from", str(d["discovery"]),
              # the checkpoint's marker table names panel A's markers: their embeddings live with panel A
              "--embeddings", str(d["discovery"] / "marker_embeddings"), "--out", str(tok["panel_b_shared"])), False),
        Step("biomarkers", "experiments.virtues_biomarkers",
             ("--tokens", str(tok["discovery"]), "--data", str(d["discovery"]), "--out", str(out / "biomarkers"),
              "--resolutions", "1.0:2.0:0.1", "--seed", s)),
        Step("transfer", "experiments.virtues_signature_transfer",
             ("--biomarkers", str(out / "biomarkers"), "--discovery-tokens", str(tok["discovery"]),
              "--tokens", str(tok["validation"]), "--data", str(d["validation"]), "--out", str(out / "transfer"),
              "--response-protective", "--seed", s)),
        Step("treatment", "experiments.virtues_treatment_response",
             ("--tokens", str(tok["discovery"]), "--data", str(d["discovery"]), "--out", str(out / "treatment"),
              "--seed", s, "--no-progress")),
        Step("risk", "experiments.virtues_risk",
             ("--tokens", str(tok["validation"]), "--data", str(d["validation"]), "--out", str(out / "risk"),
              "--clusters", "20")),
        Step("tme", "experiments.virtues_tme_risk",
             ("--risk", str(out / "risk"), "--data", str(d["validation"]), "--out", str(out / "tme"))),
        Step("cross_panel", "experiments.virtues_cross_panel",
             ("--source-tokens", str(tok["discovery_shared"]), "--target-tokens", str(tok["panel_b_shared"]),
              "--label", "coarse_type", "--out", str(out / "cross_panel"), "--seed", s)),
        Step("attention", "experiments.virtues_attention",
             ("--ckpt", ckpt, "--data", str(d["discovery"]), "--out", str(out / "attention"), "--label-column",
              "response", "--epochs", "3", "--no-progress", "--seed", s)),
    ]


def run_step(step: Step, out: Path) -> float:
    """Run one step unless finished; returns its seconds (0 when skipped)."""
    folder = out / step.name
    marker = out / f"{step.name}{DONE}"
    if marker.exists():
        log.info("step %s: done earlier, skipped", step.name)
        return 0.0
    if folder.exists():
        shutil.rmtree(folder)  # a partial folder of a killed run
    if not step.owns_folder:
        folder.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"[{step.name}] python -m {step.module} {' '.join(step.args)}", flush=True)
    code = importlib.import_module(step.module).main(list(step.args))
    if code:
        raise ValueError(f"step {step.name}: `python -m {step.module}` exited {code} (its error is above); "
                         f"rerun with the same --out {out} to resume from this step")
    seconds = time.perf_counter() - t0
    marker.write_text(json.dumps({"step": step.name, "seconds": round(seconds, 1), "args": list(step.args)}))
    return seconds


def pretrain(args: argparse.Namespace, out: Path, discovery: Path) -> str:
    if args.ckpt:
        return args.ckpt
    model = out / "pretrain" / "model.ckpt"
    if model.exists() and (out / f"pretrain{DONE}").exists():
        return str(model)
    t0 = time.perf_counter()
    folder = out / "pretrain"
    folder.mkdir(parents=True, exist_ok=True)
    trained = train_with_cli(virtues_pretrain, args.config, str(discovery), folder,
                             ["--config", args.cohort_config, *args.trainer_arg], keep="final")
    (out / f"pretrain{DONE}").write_text(json.dumps({"step": "pretrain", "steps": trained.steps,
                                                     "seconds": round(time.perf_counter() - t0, 1)}))
    return trained.checkpoint


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    out = new_run_dir(args.out, "virtues-downstream")
    cohort = Path(args.cohort)
    if not (cohort / "cohort.json").exists():
        print(f"[cohort] generating the synthetic cohort into {cohort}", flush=True)
        generate_cohort(cohort, n_validation=args.validation, seed=args.seed, workers=args.workers,
                        overwrite=cohort.exists())
    manifest = read_cohort_manifest(cohort)
    ckpt = pretrain(args, out, cohort_paths(cohort)["discovery"])
    steps = analysis_steps(out, ckpt, cohort, args.seed)
    wanted = set(args.only.split(",")) if args.only else None
    unknown = sorted(wanted - {s.name for s in steps}) if wanted else []
    if unknown:
        raise ValueError(f"--only: unknown step(s) {unknown}; steps: {[s.name for s in steps]}")
    failures: dict[str, str] = {}
    for step in steps:
        if wanted is None or step.name in wanted:
            try:
                run_step(step, out)
            except (ValueError, OSError, RuntimeError) as exc:  # one analysis failing must not hide the others
                if args.strict:
                    raise
                failures[step.name] = str(exc)
                log.error("step %s failed: %s", step.name, exc)
    report = write_downstream_report(out, manifest, ckpt, failures, minutes=(time.perf_counter() - t_start) / 60,
                                     argv=args.argv)
    print(f"report: {report}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.virtues_downstream", description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", default="data/cohort", help="cohort folder (generated when absent)")
    parser.add_argument("--out", default=None, help="run folder (default runs/virtues-downstream/<timestamp>); reuse it to resume")
    parser.add_argument("--ckpt", default=None, help="skip pretraining and use this VirTues checkpoint")
    parser.add_argument("--config", default="experiments/configs/virtues/synthetic.yaml")
    parser.add_argument("--cohort-config", default="experiments/configs/virtues/cohort.yaml",
                        help="overrides of --config for pretraining on the cohort")
    parser.add_argument("--trainer-arg", action="append", default=[], help="extra LightningCLI args")
    parser.add_argument("--only", default=None, help="run only these steps (comma-separated)")
    parser.add_argument("--workers", type=int, default=2, help="processes for generating the cohort")
    parser.add_argument("--validation", type=int, default=80,
                        help="independent patients when generating the cohort (80: enough events for the log-rank test)")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing analysis")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
