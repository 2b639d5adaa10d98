"""virtuplex: one command with a subcommand for every entry point of the project.

    virtuplex rosie fit --config experiments/configs/rosie/paper.yaml --data.data_dirs '[datasets/mystudy]'
    virtuplex rosie predict --ckpt best.ckpt --he slide.tif --out preds/
    virtuplex virtues pretrain --config experiments/configs/virtues/paper.yaml
    virtuplex data info datasets/mystudy

Each subcommand runs the ``main`` of one module under ``experiments/`` (or ``benchmarks/``) with the
rest of the command line, so ``virtuplex rosie predict ...`` and ``python -m experiments.rosie_predict
...`` are the same program with the same options, errors (one ``error:`` line, exit code 2) and
outputs. Modules are imported only when their subcommand runs: ``virtuplex --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Command:
    module: str  # a module with main(argv) -> int | None
    help: str
    prefix: tuple[str, ...] = ()  # arguments put before the user's (LightningCLI subcommand)
    lightning_cli: bool = False  # main(argv) builds a LightningCLI: run under the error contract


COMMANDS: dict[str, dict[str, Command]] = {
    "rosie": {
        "fit": Command("experiments.rosie_train", "train ROSIE (LightningCLI fit; --config, --print_config)", ("fit",), True),
        "validate": Command("experiments.rosie_train", "validate a ROSIE checkpoint (LightningCLI validate)", ("validate",), True),
        "test": Command("experiments.rosie_train", "test a ROSIE checkpoint (LightningCLI test)", ("test",), True),
        "predict": Command("experiments.rosie_predict", "predict multiplex images from H&E (slides or a dataset)"),
        "evaluate": Command("experiments.rosie_evaluate", "score predictions against measured CODEX with the paper's baselines"),
        "experiment": Command("experiments.rosie_experiment", "train, predict and evaluate end to end (make exp-rosie)"),
        "downstream": Command("experiments.rosie_downstream",
                              "phenotyping, SCGP, TIL/LNE and QC filters on predictions (Figs. 3-5, Suppl. Fig. 6)"),
        "stride": Command("experiments.rosie_stride_comparison", "stride 8 vs stride 1 output, measured (Suppl. Fig. 5)"),
        "scgp": Command("experiments.scgp", "tissue structures by SCGP (Fig. 4), ARI/F1 against a reference partition"),
    },
    "virtues": {
        "pretrain": Command("experiments.virtues_pretrain", "pretrain VirTues (LightningCLI; fit is the default)", (), True),
        "pretrain-camae": Command("experiments.camae_pretrain", "pretrain the CA-MAE baseline with the VirTues CLI and data", (), True),
        "zero-shot": Command("experiments.virtues_zero_shot", "leave-one-dataset-out pretraining + reconstruction, seen vs unseen"),
        "reconstruct": Command("experiments.virtues_reconstruct", "masked-reconstruction evaluation (Fig. 2)"),
        "tokens": Command("experiments.virtues_tokens", "cell, niche and tissue tokens of a dataset"),
        "probe": Command("experiments.virtues_cell_probe", "cell-type linear probe on cell tokens (Fig. 3a-b)"),
        "biomarkers": Command("experiments.virtues_biomarkers",
                              "virtual biomarkers predictive of response (Leiden sweep, CV AUROC, risk ratios; Fig. 5c-g)"),
        "transfer": Command("experiments.virtues_signature_transfer",
                            "transfer biomarker signatures to an independent cohort: risk strata, KM, log-rank, C-index (Fig. 5h-k)"),
        "treatment": Command("experiments.virtues_treatment_response",
                             "per-patient entropic W2 between time points, cohort barycentre shifts (Fig. 5b)"),
        "tme-risk": Command("experiments.virtues_tme_risk", "risk ratios of tissue structures in high- vs low-risk groups (Fig. 4d)"),
        "cross-panel": Command("experiments.virtues_cross_panel", "cell-type transfer across panels from shared-marker tokens (Fig. 3e-g)"),
        "attention": Command("experiments.virtues_attention", "marker importance scores and spatial attention maps (Suppl. Fig. 20)"),
        "classify": Command("experiments.virtues_tissue_classification", "ABMIL tissue classification on niche tokens"),
        "retrieval": Command("experiments.virtues_retrieval", "tissue retrieval by Wasserstein distance of niche tokens"),
        "risk": Command("experiments.virtues_risk", "risk groups from cell-token clusters, Kaplan-Meier + log-rank"),
        "experiment": Command("experiments.virtues_experiment", "pretrain and evaluate reconstruction end to end (make exp-virtues)"),
    },
    "data": {
        "synthetic": Command("experiments.data_synthetic", "generate the synthetic H&E / CODEX / IMC dataset"),
        "ingest": Command("experiments.data_ingest", "add one tissue's image, masks and tables to a dataset"),
        "register": Command("experiments.data_register", "register an H&E image onto its CODEX DAPI channel"),
        "info": Command("experiments.data_info", "summarise a dataset and list every problem"),
        "stats": Command("experiments.data_stats", "(re)compute a dataset's standardisation statistics"),
        "embeddings": Command("experiments.data_embeddings", "ESM-2 marker embeddings from local weights"),
    },
    "bench": {
        "datamodules": Command("benchmarks.datamodules_throughput", "loader throughput of the ROSIE and VirTues DataModules"),
        "rosie-inference": Command("benchmarks.rosie_inference", "ROSIE patches/s: model only and full prediction"),
        "rosie-memory": Command("benchmarks.rosie_predict_memory", "peak memory of predicting a 20k x 20k slide"),
        "virtues-attention": Command("benchmarks.virtues_attention", "factorised vs full attention, packed backends"),
        "rosie-dense": Command("benchmarks.rosie_dense", "dense vs exact ROSIE: FLOPs per output pixel and agreement"),
        "gpu": Command("benchmarks.gpu_suite", "GPU speed table of ROSIE and VirTues (exits 0 without a GPU)"),
        "virtues-vs-camae": Command("benchmarks.virtues_vs_camae", "Fig. 1e cost: VirTues vs CA-MAE at 10/20/40 markers"),
        "cell-segmentation": Command("benchmarks.cell_segmentation", "nucleus/cell object F1 and speed on the synthetic data"),
    },
    "matrix": {
        "run": Command("experiments.matrix", "every table/figure of a paper as resumable cells (--paper rosie|virtues, --list)"),
    },
}


def overview() -> str:
    """Every subcommand with its one-line help, for ``virtuplex --help``."""
    width = max(len(f"{g} {c}") for g, cmds in COMMANDS.items() for c in cmds) + 2
    lines = ["commands:"]
    for group, cmds in COMMANDS.items():
        lines += [f"  {f'{group} {name}':<{width}}{cmd.help}" for name, cmd in cmds.items()]
    lines.append("\n`virtuplex GROUP COMMAND --help` shows a command's options.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtuplex", description=__doc__.split("\n")[0], epilog=overview(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for group, cmds in COMMANDS.items():
        sub = groups.add_parser(group, help=f"{group} commands", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(f"  {name:<20}{cmd.help}" for name, cmd in cmds.items()))
        sub.add_argument("command", choices=list(cmds), metavar="COMMAND", help=", ".join(cmds))
        sub.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options (COMMAND --help lists them)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.group][args.command]
    rest = [*command.prefix, *args.args]
    if command.lightning_cli and not command.prefix and (not rest or rest[0].startswith("-")) \
            and not {"-h", "--help"} & set(rest):
        rest = ["fit", *rest]  # `virtuplex virtues pretrain --config ...` = fit
    module = importlib.import_module(command.module)
    if command.lightning_cli:
        cli = importlib.import_module("experiments.cli")
        return cli.run_cli(module.main, rest)
    code = module.main(rest)
    return code if isinstance(code, int) else 0  # benchmarks return their tables


if __name__ == "__main__":
    sys.exit(main())
