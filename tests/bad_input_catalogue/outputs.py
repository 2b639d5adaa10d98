"""Output paths and numbers: no command writes into, or replaces, what it does not own; numbers
outside their physical range are refused before anything is written."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pandas as pd
import tifffile

from experiments import data_synthetic as synthetic
from experiments.data_ingest import main as ingest_main
from datamodules.provenance import PREDICTION
from datamodules.store import DatasetWriter
from experiments.rosie_predict import main as predict_main
from experiments.virtues_reconstruct import main as reconstruct_main
from experiments.virtues_retrieval import main as retrieval_main
from experiments.virtues_tokens import main as tokens_main

from . import Case, Ctx


def he_png(ctx: Ctx, name: str = "he.png", size: int = 96) -> str:
    """A small RGB uint8 H&E-like PNG with dark (tissue) blobs on white."""
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 240, np.uint8)
    img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = rng.integers(60, 160, (size // 2, size // 2, 3))
    path = ctx.tmp / name
    iio.imwrite(path, img)
    return str(path)


def predict(ctx: Ctx, he: str, out: str, *extra: str) -> int:
    return predict_main(["--ckpt", str(ctx.rosie_ckpt), "--he", he, "--out", out, "--device", "cpu", "--no-progress",
                         "--foreground", "all", *extra])


def multiplex_tiff(ctx: Ctx, name: str = "m.ome.tif") -> str:
    path = ctx.tmp / name
    tifffile.imwrite(path, np.random.default_rng(0).random((3, 64, 64), dtype=np.float32),
                     metadata={"axes": "CYX", "Channel": {"Name": ["A", "B", "C"]}})
    return str(path)


def ingest(ctx: Ctx, image: str, *extra: str, out: str | None = None) -> int:
    return ingest_main(["--image", image, "--modality", "codex", "--dataset", "ds", "--tissue-id", "t0",
                        "--out", out or str(ctx.out), *extra])


# ---- rosie_predict output folder --------------------------------------------------------------------


def predict_into_measured_dataset(ctx: Ctx) -> int:
    return predict(ctx, he_png(ctx), str(ctx.dataset_copy()))


def predict_out_is_file(ctx: Ctx) -> int:
    target = ctx.tmp / "notes"
    target.write_text("my notes\n")
    return predict(ctx, he_png(ctx), str(target))


def predict_out_with_file_extension(ctx: Ctx) -> int:
    return predict(ctx, he_png(ctx), str(ctx.out / "pred.ome.tif"))


def predict_out_foreign_folder(ctx: Ctx) -> int:
    folder = ctx.tmp / "documents"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"draft")
    return predict(ctx, he_png(ctx), str(folder))


def predict_colliding_tissue_ids(ctx: Ctx) -> int:
    """'a b.png' and 'a_b.png' both default to tissue id 'a_b'."""
    out = str(ctx.out / "pred")
    assert predict(ctx, he_png(ctx, "a b.png"), out) == 0
    return predict(ctx, he_png(ctx, "a_b.png"), out)


# ---- other commands' outputs ------------------------------------------------------------------------


def ingest_into_prediction(ctx: Ctx) -> int:
    with DatasetWriter.create(ctx.out / "ds", kind=PREDICTION, written_by="rosie_predict") as w:
        w.write_tissues(pd.DataFrame({"tissue_id": ["p0"], "split": ["test"]}))
    return ingest(ctx, multiplex_tiff(ctx))


def reconstruct_over_dataset(ctx: Ctx) -> int:
    return reconstruct_main(["--ckpt", str(ctx.virtues_ckpt), "--data", str(ctx.dataset), "--out",
                             str(ctx.dataset_copy()), "--overwrite"])


def retrieval_over_foreign_folder(ctx: Ctx) -> int:
    folder = ctx.tmp / "results"
    folder.mkdir()
    (folder / "keep.csv").write_text("a,b\n1,2\n")
    return retrieval_main(["--ckpt", str(ctx.virtues_ckpt), "--data", str(ctx.dataset), "--out", str(folder),
                           "--overwrite"])


def tokens_into_foreign_folder(ctx: Ctx) -> int:
    folder = ctx.tmp / "results"
    folder.mkdir()
    (folder / "keep.csv").write_text("a,b\n1,2\n")
    return tokens_main(["--ckpt", str(ctx.virtues_ckpt), "--data", str(ctx.dataset), "--out", str(folder),
                        "--split", "test", "--no-progress"])


def synthetic_over_measured(ctx: Ctx) -> int:
    target = ctx.tmp / "measured"
    with DatasetWriter.create(target) as w:
        w.write_tissues(pd.DataFrame({"tissue_id": ["real1"], "split": ["train"]}))
    return synthetic.main(["--out", str(target), "--tissues", "1", "--size", "128", "--overwrite"])


# ---- numbers ----------------------------------------------------------------------------------------


def ingest_zero_resolution(ctx: Ctx) -> int:
    return ingest(ctx, multiplex_tiff(ctx), "--resolution", "0")


def predict_absurd_mpp(ctx: Ctx) -> int:
    return predict(ctx, he_png(ctx), str(ctx.out / "pred"), "--mpp", "5000")


def predict_zero_batch(ctx: Ctx) -> int:
    return predict(ctx, he_png(ctx), str(ctx.out / "pred"), "--batch-size", "0")


def predict_stride_nine(ctx: Ctx) -> int:
    return predict(ctx, he_png(ctx), str(ctx.out / "pred"), "--stride", "9")


def reconstruct_tissue_fraction(ctx: Ctx) -> int:
    return reconstruct_main(["--ckpt", str(ctx.virtues_ckpt), "--data", str(ctx.dataset), "--out", str(ctx.out / "rec"),
                             "--min-tissue-fraction", "1.5"])


def tokens_zero_stride(ctx: Ctx) -> int:
    return tokens_main(["--ckpt", str(ctx.virtues_ckpt), "--data", str(ctx.dataset), "--out", str(ctx.out / "tok"),
                        "--stride", "0"])


CASES: list[Case] = [
    Case("predict_into_measured_dataset", "prediction", "rosie_predict --out is a measured dataset",
         "write predictions to a new or empty folder", predict_into_measured_dataset, r"synth is a measured dataset.*never mixes"),
    Case("predict_out_is_file", "prediction", "rosie_predict --out is an existing file", "give a folder",
         predict_out_is_file, r"notes is an existing file"),
    Case("predict_out_with_file_extension", "prediction", "rosie_predict --out pred.ome.tif (a file name)",
         "give a folder; --ome-tiff adds <tissue>.ome.tif inside it", predict_out_with_file_extension,
         r"pred\.ome\.tif looks like a file name.*--ome-tiff"),
    Case("predict_out_foreign_folder", "prediction", "rosie_predict --out is a non-empty folder that is not a dataset",
         "choose a new or empty folder", predict_out_foreign_folder, r"documents is a non-empty folder that is not a dataset"),
    Case("predict_colliding_tissue_ids", "prediction", "two file names that sanitise to one tissue id",
         "pass --tissue-id", predict_colliding_tissue_ids, r"'a_b'.*a_b\.png.*another file.*a b\.png.*--tissue-id"),
    Case("ingest_into_prediction", "ingest", "ingest into a folder of predictions", "ingest into a measured dataset",
         ingest_into_prediction, r"ds is a prediction dataset; ingest writes measured data"),
    Case("reconstruct_over_dataset", "virtues", "--out --overwrite names a dataset", "choose another output folder",
         reconstruct_over_dataset, r"synth is a dataset.*never replaced"),
    Case("retrieval_over_foreign_folder", "virtues", "--out --overwrite names a folder no command made",
         "choose another output folder", retrieval_over_foreign_folder, r"results is a non-empty folder that no virtuplex "
         r"command made.*even with --overwrite"),
    Case("tokens_into_foreign_folder", "virtues", "virtues_tokens --out is another folder with files",
         "choose a new folder", tokens_into_foreign_folder, r"results is a non-empty folder that no virtuplex command made"),
    Case("synthetic_over_measured", "store", "synthetic --overwrite aimed at a real dataset",
         "choose another --out", synthetic_over_measured, r"measured: exists and is not a synthetic dataset"),
    Case("ingest_zero_resolution", "ingest", "--resolution 0", "pass the pixel size in µm (e.g. 0.5)",
         ingest_zero_resolution, r"--resolution.*0.*physical range"),
    Case("predict_absurd_mpp", "prediction", "--mpp 5000", "pass the pixel size in µm (e.g. 0.5)",
         predict_absurd_mpp, r"--mpp.*5000.*physical range"),
    Case("predict_zero_batch", "prediction", "--batch-size 0", "pass a positive batch size", predict_zero_batch,
         r"--batch-size 0.*positive"),
    Case("predict_stride_nine", "prediction", "--stride 9", "use a stride from 1 to 8", predict_stride_nine,
         r"stride.*1 to 8.*9"),
    Case("reconstruct_tissue_fraction", "virtues", "--min-tissue-fraction 1.5", "give a fraction in [0, 1]",
         reconstruct_tissue_fraction, r"--min-tissue-fraction 1\.5.*0.*1"),
    Case("tokens_zero_stride", "virtues", "virtues_tokens --stride 0", "pass a positive stride", tokens_zero_stride,
         r"--stride.*positive"),
]
