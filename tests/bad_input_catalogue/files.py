"""Damaged image files and metadata that disagrees with the pixels, fed to ingest and rosie_predict.

Both commands read images through ``datamodules.image_files``: a cut-off, empty or header-only file
and an OME-XML header that lists planes the file does not store must each end in one line naming
the file and saying what is wrong, before any output (or model) is touched.
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

from datamodules import layout
from experiments.data_ingest import main as ingest_main
from datamodules.store import DatasetStore, StoreError
from experiments.rosie_predict import main as predict_main

from . import Case, Ctx

RECOPY = "copy or export the file again"

# ---- helpers --------------------------------------------------------------------------------


def _multiplex(path: Path, channels: int = 3, size: int = 64, **kwargs) -> Path:
    """A valid float32 OME-TIFF with named channels."""
    data = np.random.default_rng(0).random((channels, size, size), dtype=np.float32)
    names = [f"M{i}" for i in range(channels)]
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "Channel": {"Name": names}}, **kwargs)
    return path


def _he_array(size: int = 200) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (size, size, 3)).astype(np.uint8)


def _he_tiff(path: Path) -> Path:
    tifffile.imwrite(path, _he_array(), photometric="rgb")
    return path


def _he_png(path: Path, data: np.ndarray | None = None) -> Path:
    iio.imwrite(path, _he_array() if data is None else data)
    return path


def _cut(path: Path, keep: float | int) -> Path:
    """Keep the first ``keep`` bytes of ``path`` (a fraction of its size when a float)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    return path


def _ingest(ctx: Ctx, image: Path, modality: str = "codex", *extra: str) -> int:
    return ingest_main(["--image", str(image), "--modality", modality, "--dataset", "ds", "--tissue-id", "t0",
                        "--out", str(ctx.out), *extra])


def _predict(ctx: Ctx, he: Path, *extra: str) -> int:
    return predict_main(["--ckpt", str(ctx.rosie_ckpt), "--he", str(he), "--out", str(ctx.out / "pred"),
                         "--device", "cpu", "--no-progress", *extra])


# ---- damaged files at ingest ----------------------------------------------------------------
"""Cut-off, empty and header-only TIFF/PNG files given to ``ingest --image``."""


def truncated_tiff_ingest(ctx: Ctx) -> int:
    return _ingest(ctx, _cut(_multiplex(ctx.tmp / "trunc.ome.tif", 5), 0.5))


def truncated_compressed_tiff_ingest(ctx: Ctx) -> int:
    path = _multiplex(ctx.tmp / "zcut.ome.tif", 4, 128, compression="zlib", tile=(16, 16))
    return _ingest(ctx, _cut(path, 0.7))


def empty_tiff_ingest(ctx: Ctx) -> int:
    (ctx.tmp / "empty.tif").write_bytes(b"")
    return _ingest(ctx, ctx.tmp / "empty.tif", "codex", "--channels", "A,B,C")


def header_only_tiff_ingest(ctx: Ctx) -> int:
    return _ingest(ctx, _cut(_multiplex(ctx.tmp / "head.ome.tif", 3), 16))


def truncated_png_he_ingest(ctx: Ctx) -> int:
    return _ingest(ctx, _cut(_he_png(ctx.tmp / "half.png"), 0.5), "he")


# ---- damaged files at prediction ------------------------------------------------------------
"""The same damage handed to ``rosie_predict --he``: refused before the model is loaded."""


def truncated_tiff_predict(ctx: Ctx) -> int:
    return _predict(ctx, _cut(_he_tiff(ctx.tmp / "trunc_he.tif"), 0.5))


def truncated_png_predict(ctx: Ctx) -> int:
    return _predict(ctx, _cut(_he_png(ctx.tmp / "trunc_he.png"), 0.5))


def header_only_png_predict(ctx: Ctx) -> int:
    return _predict(ctx, _cut(_he_png(ctx.tmp / "head_he.png"), 40))


def empty_png_predict(ctx: Ctx) -> int:
    (ctx.tmp / "empty_he.png").write_bytes(b"")
    return _predict(ctx, ctx.tmp / "empty_he.png")


def image_path_is_folder_predict(ctx: Ctx) -> int:
    (ctx.tmp / "slides").mkdir()
    return _predict(ctx, ctx.tmp / "slides")


def no_tissue_in_he_predict(ctx: Ctx) -> int:
    return _predict(ctx, _he_png(ctx.tmp / "white.png", np.full((256, 256, 3), 255, np.uint8)))


# ---- metadata that disagrees with the pixels ------------------------------------------------
"""OME-XML listing planes the file does not store; mask files whose arrays cannot be told apart."""


def ome_channel_count_mismatch(ctx: Ctx) -> int:
    source = _multiplex(ctx.tmp / "five.ome.tif", 5)
    with tifffile.TiffFile(source) as tif:
        xml, data = tif.ome_metadata, tif.asarray()
    path = ctx.tmp / "liar.ome.tif"
    tifffile.imwrite(path, data[:3], description=xml, metadata=None)
    return _ingest(ctx, path)


def mask_npz_several_arrays(ctx: Ctx) -> int:
    mask = np.ones((64, 64), np.uint8)
    np.savez(ctx.tmp / "two.npz", tissue=mask, background=1 - mask)
    return _ingest(ctx, _multiplex(ctx.tmp / "m.ome.tif"), "codex", "--mask", str(ctx.tmp / "two.npz"))


def cell_ids_beyond_uint32_ingest(ctx: Ctx) -> int:
    cells = np.zeros((64, 64), np.uint64)
    cells[4:10, 4:10] = 1
    cells[20:30, 20:30] = 2**32 + 5
    np.save(ctx.tmp / "cells.npy", cells)
    return _ingest(ctx, _multiplex(ctx.tmp / "m.ome.tif"), "codex", "--cell-mask", str(ctx.tmp / "cells.npy"))


def stored_mask_under_other_key(ctx: Ctx) -> None:
    """A stored cell mask saved under 'labels' instead of 'mask': the store must not guess."""
    root = ctx.dataset_copy()
    store = DatasetStore(root)
    mpp = store.resolutions("imc")[0]
    tissue = next(t for t in store.tissue_ids() if store.cell_mask(t, mpp) is not None)
    path = root / layout.cell_mask_path(mpp, tissue)
    with np.load(path) as data:
        mask = data["mask"]
    path.unlink()
    np.savez_compressed(path, labels=mask)
    DatasetStore(root).cell_mask(tissue, mpp)


# ---- the catalogue --------------------------------------------------------------------------

_DAMAGED = r"(?i:truncated|damaged|not a readable)"

CASES: list[Case] = [
    Case("truncated_tiff_ingest", "ingest", "the image TIFF was cut off (interrupted copy or download)",
         RECOPY, truncated_tiff_ingest, r"trunc\.ome\.tif.*" + _DAMAGED),
    Case("truncated_compressed_tiff_ingest", "ingest", "a compressed TIFF's pixel data runs past the end of the file",
         RECOPY, truncated_compressed_tiff_ingest, r"zcut\.ome\.tif.*" + _DAMAGED),
    Case("empty_tiff_ingest", "ingest", "the image file is empty (0 bytes)", RECOPY, empty_tiff_ingest,
         r"empty\.tif.*(?i:empty|0 bytes)"),
    Case("header_only_tiff_ingest", "ingest", "only the TIFF header survived (a few bytes)", RECOPY,
         header_only_tiff_ingest, r"head\.ome\.tif.*" + _DAMAGED),
    Case("truncated_png_he_ingest", "ingest", "the H&E PNG was cut off", RECOPY, truncated_png_he_ingest,
         r"half\.png.*" + _DAMAGED),
    Case("truncated_tiff_predict", "prediction", "the H&E TIFF given to rosie_predict was cut off", RECOPY,
         truncated_tiff_predict, r"trunc_he\.tif.*" + _DAMAGED),
    Case("truncated_png_predict", "prediction", "the H&E PNG given to rosie_predict was cut off", RECOPY,
         truncated_png_predict, r"trunc_he\.png.*" + _DAMAGED),
    Case("header_only_png_predict", "prediction", "only the PNG header of the H&E survived", RECOPY,
         header_only_png_predict, r"head_he\.png.*" + _DAMAGED),
    Case("empty_png_predict", "prediction", "the H&E file is empty (0 bytes)", RECOPY, empty_png_predict,
         r"empty_he\.png.*(?i:empty|0 bytes)"),
    Case("image_path_is_folder_predict", "prediction", "--he names an empty folder, not an image or a dataset",
         "give the H&E image file, or a dataset folder with --tissue-id/--split", image_path_is_folder_predict,
         r"slides.*(?i:not a dataset|no dataset|empty|not an image)"),
    Case("no_tissue_in_he_predict", "prediction", "the H&E is blank: Otsu finds no tissue",
         "check the image, or pass --foreground all", no_tissue_in_he_predict,
         r"white.*(?i:no tissue found).*--foreground all"),
    Case("ome_channel_count_mismatch", "ingest", "OME-XML lists more channels than the TIFF stores planes",
         "re-export so the header matches the pixels (bfconvert, tifffile)", ome_channel_count_mismatch,
         r"liar\.ome\.tif.*(?i:metadata disagrees).*(?i:planes)"),
    Case("mask_npz_several_arrays", "ingest", "a mask .npz holds several arrays, none named 'mask'",
         "save it as np.savez(path, mask=...)", mask_npz_several_arrays,
         r"two\.npz.*2 arrays.*(tissue.*background|background.*tissue).*none is named 'mask'"),
    Case("cell_ids_beyond_uint32_ingest", "ingest", "a cell mask id is 2^32 or more",
         "relabel to consecutive ids (skimage.segmentation.relabel_sequential)", cell_ids_beyond_uint32_ingest,
         r"cells\.npy.*4294967301.*(2\^32|wrap).*(?i:relabel)"),
    Case("stored_mask_under_other_key", "store", "a stored cell-mask .npz lacks the key 'mask'",
         "re-save it with np.savez(path, mask=...) or re-ingest the tissue", stored_mask_under_other_key,
         r"cell_masks/instances/[^/]+\.npz.*no key 'mask'.*labels", kind="library", exception=StoreError),
]
