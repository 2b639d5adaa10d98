"""Tables written by other tools and dataset pieces that disagree: splits, booleans, ids, missing rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from datamodules import layout
from experiments.data_ingest import main as ingest_main
from datamodules.rosie import RosieDataModule
from datamodules.store import DatasetStore, StoreError
from experiments.cli import run_cli
from experiments.data_info import main as info_main
from experiments.rosie_train import main as rosie_train_main
from experiments.virtues_pretrain import main as virtues_pretrain_main
from experiments.virtues_tokens import main as tokens_main

from . import Case, Ctx
from .outputs import multiplex_tiff

REPO = Path(__file__).resolve().parents[2]


def ingest(ctx: Ctx, *extra: str) -> int:
    return ingest_main(["--image", multiplex_tiff(ctx), "--modality", "codex", "--dataset", "ds", "--tissue-id", "t0",
                        "--out", str(ctx.out), *extra])


def csv(ctx: Ctx, name: str, text: str) -> str:
    path = ctx.tmp / name
    path.write_text(text)
    return str(path)


def rewrite_tissues(root: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = root / layout.TISSUES_TABLE
    df = pd.read_parquet(path)
    change(df)
    df.to_parquet(path)


def train_rosie(ctx: Ctx, data: Path) -> int:
    return run_cli(rosie_train_main, ["fit", "--config", str(REPO / "experiments/configs/rosie/tiny.yaml"),
                                      "--data.data_dirs", f"[{data}]", "--trainer.default_root_dir", str(ctx.out / "run"),
                                      "--trainer.logger", "false"])


# ---- tables from other tools ------------------------------------------------------------------------


def split_label_unknown(ctx: Ctx) -> int:
    return ingest(ctx, "--tissues-csv", csv(ctx, "clinical.csv", "tissue_id,split,age\nt0,training_set,61\n"))


def split_option_unknown(ctx: Ctx) -> int:
    return ingest(ctx, "--split", "calibration")


def channel_flag_not_boolean(ctx: Ctx) -> int:
    table = csv(ctx, "channels.csv", "channel_name;uniprot_id;is_nuclear_marker\nA;P08575;maybe\nB;;no\nC;;no\n")
    return ingest(ctx, "--channels", table)


def channel_table_empty(ctx: Ctx) -> int:
    return ingest(ctx, "--channels", csv(ctx, "channels.csv", ""))


def cells_table_text_ids(ctx: Ctx) -> int:
    mask = np.zeros((64, 64), np.uint16)
    mask[5:10, 5:10], mask[20:30, 20:30] = 1, 2
    np.save(ctx.tmp / "cells.npy", mask)
    table = csv(ctx, "cells.csv", "cell_id,cell_type\nc1,T cell\nc2,B cell\n")
    return ingest(ctx, "--cell-mask", str(ctx.tmp / "cells.npy"), "--cells-csv", table)


def tissues_table_without_row(ctx: Ctx) -> int:
    return ingest(ctx, "--tissues-csv", csv(ctx, "clinical.csv", "tissue_id,split\nt1,train\nt2,test\n"))


# ---- dataset pieces that disagree -------------------------------------------------------------------


def tissue_without_split_label(ctx: Ctx) -> None:
    root = ctx.dataset_copy()
    rewrite_tissues(root, lambda df: df.__setitem__("split", df["split"].where(df.index != 0, None)))
    DatasetStore(root).tissue_ids("train")


def no_val_split(ctx: Ctx) -> int:
    root = ctx.dataset_copy()
    rewrite_tissues(root, lambda df: df.__setitem__("split", df["split"].replace({"val": "train"})))
    return train_rosie(ctx, root)


def tissue_row_without_image(ctx: Ctx) -> None:
    root = ctx.dataset_copy()

    def add_ghost(df: pd.DataFrame) -> None:
        df.loc[len(df)] = {**df.iloc[0].to_dict(), "tissue_id": "ghost", "split": "train"}

    rewrite_tissues(root, add_ghost)
    markers = [str(n) for n in DatasetStore(root).channels("codex")["channel_name"]][:4]
    RosieDataModule([str(root)], marker_names=markers, target_scale="none").setup("fit")


def embedding_wrong_dimension_training(ctx: Ctx) -> int:
    root = ctx.dataset_copy()
    victim = sorted((root / "marker_embeddings").glob("*.pt"))[3]
    torch.save(torch.randn(320), victim)
    return run_cli(virtues_pretrain_main, ["fit", "--config", str(REPO / "experiments/configs/virtues/tiny.yaml"),
                                           "--data.data_dirs", f"[{root}]", "--trainer.default_root_dir",
                                           str(ctx.out / "run"), "--trainer.logger", "false"])


def training_data_missing(ctx: Ctx) -> int:
    return train_rosie(ctx, ctx.tmp / "no_such_dataset")


def info_missing_dataset(ctx: Ctx) -> int:
    return info_main([str(ctx.tmp / "no_such_dataset")])


def info_json_missing_dataset(ctx: Ctx) -> int:
    return info_main(["--json", str(ctx.tmp / "no_such_dataset")])


def tokens_unknown_modality(ctx: Ctx) -> int:
    return tokens_main(["--ckpt", str(ctx.virtues_ckpt), "--data", str(ctx.dataset), "--out", str(ctx.out / "tok"),
                        "--modality", "codexx", "--no-progress"])


def tokens_unknown_split(ctx: Ctx) -> int:
    return tokens_main(["--ckpt", str(ctx.virtues_ckpt), "--data", str(ctx.dataset), "--out", str(ctx.out / "tok"),
                        "--split", "holdout_2", "--no-progress"])


CASES: list[Case] = [
    Case("split_label_unknown", "ingest", "a split label no spelling matches (e.g. 'training_set')",
         "use train, val or test (Train, validation, testing, ... are accepted)", split_label_unknown,
         r"clinical\.csv: split: split label 'training_set' is not one of"),
    Case("split_option_unknown", "ingest", "--split with an unknown label", "pass --split train, val or test",
         split_option_unknown, r"split label 'calibration' is not one of \('train', 'val', 'test'\)"),
    Case("channel_flag_not_boolean", "ingest", "a true/false column holds another word", "use true/false, yes/no or 1/0",
         channel_flag_not_boolean, r"channels\.csv: is_nuclear_marker: value 'maybe' in row 2 is not a boolean"),
    Case("channel_table_empty", "ingest", "the channel table CSV is empty", "a header row and one row per channel",
         channel_table_empty, r"channels\.csv: .*empty"),
    Case("cells_table_text_ids", "ingest", "cell ids in the cell table are not integers",
         "use the cell mask's instance labels as cell_id", cells_table_text_ids,
         r"cells\.csv: cell_id: cell ids must be positive integers"),
    Case("tissues_table_without_row", "ingest", "the clinical table has no row for the tissue", "add a row for it",
         tissues_table_without_row, r"clinical\.csv: tissue_id: no row for tissue 't0'"),
    Case("tissue_without_split_label", "store", "a tissue with an empty split label",
         "give every tissue train, val or test", tissue_without_split_label,
         r"tissues\.parquet: split: 1 tissue\(s\) have no valid split label", kind="library", exception=StoreError),
    Case("no_val_split", "training", "no tissue has split 'val'",
         "mark some tissues 'val' (test tissues are never used to validate)", no_val_split,
         r"no tissue has split 'val'.*never used for validation.*limit_val_batches 0"),
    Case("tissue_row_without_image", "datamodule", "a tissue row with no image", "ingest its image or drop the row",
         tissue_row_without_image, r"ghost\.ome\.zarr: no (he|codex) image for tissue 'ghost'", kind="library", exception=StoreError),
    Case("embedding_wrong_dimension_training", "training", "one marker embedding of another size in a dataset",
         "recompute it with the same ESM-2 model", embedding_wrong_dimension_training,
         r"marker_embeddings/\w+\.pt: embedding has 320 values but the other markers' have 640"),
    Case("training_data_missing", "training", "--data.data_dirs names a missing folder", "check the path",
         training_data_missing, r"no_such_dataset: dataset folder does not exist"),
    Case("info_missing_dataset", "store", "store info on a missing folder", "check the path", info_missing_dataset,
         r"no_such_dataset: dataset folder does not exist"),
    Case("info_json_missing_dataset", "store", "store info --json on a missing folder", "check the path",
         info_json_missing_dataset, r"no_such_dataset: dataset folder does not exist"),
    Case("tokens_unknown_modality", "virtues", "--modality the dataset does not have", "pass one of its modalities",
         tokens_unknown_modality, r"no modality 'codexx'.*--modality"),
    Case("tokens_unknown_split", "virtues", "--split with an unknown label", "pass train, val, test or all",
         tokens_unknown_split, r"split label 'holdout_2' is not one of"),
]
