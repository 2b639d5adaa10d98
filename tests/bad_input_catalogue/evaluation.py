"""rosie_evaluate: the prediction folder, the output folder and the numbers it is given."""

from __future__ import annotations

from experiments.rosie_evaluate import main as evaluate_main

from . import Case, Ctx


def evaluate(ctx: Ctx, *argv: str) -> int:
    return evaluate_main(["--truth", str(ctx.dataset), "--no-figures", *argv])


def pred_missing(ctx: Ctx) -> int:
    return evaluate(ctx, "--pred", str(ctx.tmp / "no_such_pred"), "--out", str(ctx.out / "eval"))


def pred_is_measured(ctx: Ctx) -> int:
    return evaluate(ctx, "--pred", str(ctx.dataset), "--out", str(ctx.out / "eval"))


def out_is_dataset(ctx: Ctx) -> int:
    return evaluate(ctx, "--pred", str(ctx.tmp / "pred"), "--out", str(ctx.dataset_copy()), "--overwrite")


def unknown_split(ctx: Ctx) -> int:
    (ctx.tmp / "pred").mkdir()
    return evaluate(ctx, "--pred", str(ctx.dataset), "--out", str(ctx.out / "eval"), "--split", "discovery")


def zero_epochs(ctx: Ctx) -> int:
    return evaluate(ctx, "--pred", str(ctx.dataset), "--out", str(ctx.out / "eval"), "--morphology-epochs", "0")


CASES: list[Case] = [
    Case("evaluate_pred_missing", "evaluation", "--pred names a missing folder", "give the rosie_predict output folder",
         pred_missing, r"no_such_pred: dataset folder does not exist"),
    Case("evaluate_pred_is_measured", "evaluation", "--pred is a measured dataset, not a prediction",
         "give the rosie_predict output folder", pred_is_measured, r"--pred .*synth: is a measured dataset.*not an output of "
         r"rosie_predict"),
    Case("evaluate_out_is_dataset", "evaluation", "--out --overwrite names a dataset", "choose another output folder",
         out_is_dataset, r"--out .*synth is a dataset.*never replaced"),
    Case("evaluate_unknown_split", "evaluation", "--split with an unknown label", "pass train, val or test",
         unknown_split, r"split label 'discovery' is not one of"),
    Case("evaluate_zero_epochs", "evaluation", "--morphology-epochs 0", "pass >= 1 (the paper trains 50)", zero_epochs,
         r"--morphology-epochs 0: must be >= 1"),
]
