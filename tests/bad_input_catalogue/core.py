"""The original bad-input cases: library calls of ingest, the store, DataModules and model loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from datamodules.ingest import IngestError, ingest
from datamodules.store import DatasetStore, DatasetWriter, StoreError

from . import Case

REPO = Path(__file__).resolve().parents[2]


def _rgb_tiff(path: Path, data: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, data, **kwargs)
    return path


def _multiplex_tiff(path: Path, channels: int = 3, size: int = 64) -> Path:
    data = np.random.default_rng(0).random((channels, size, size), dtype=np.float32)
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "Channel": {"Name": [f"M{i}" for i in range(channels)]}})
    return path


def _channels_csv(path: Path, names: list[str]) -> Path:
    pd.DataFrame({"channel_name": names, "uniprot_id": [None] * len(names)}).to_csv(path, index=False)
    return path


def _assert_no_temporaries(out: Path) -> None:
    """No temporary (half-written) file or folder may survive a failed write."""
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name] if out.exists() else []
    assert not leftovers, f"half-written output left behind: {leftovers}"
    if out.exists() and out.parent.exists():
        assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def _ingest(tmp: Path, image: Path, modality: str = "codex", **kw) -> None:
    ingest(image, modality, "ds", kw.pop("tissue_id", "t0"), tmp / "out", **kw)


# ---- cases ----------------------------------------------------------------------------------


def case_he_grayscale(tmp: Path) -> None:
    _ingest(tmp, _rgb_tiff(tmp / "g.tif", np.zeros((64, 64), np.uint8)), "he")


def case_he_rgba(tmp: Path) -> None:
    _ingest(tmp, _rgb_tiff(tmp / "rgba.tif", np.zeros((64, 64, 4), np.uint8), photometric="rgb", extrasamples=["unassalpha"]), "he")


def case_he_16bit(tmp: Path) -> None:
    _ingest(tmp, _rgb_tiff(tmp / "he16.tif", np.zeros((64, 64, 3), np.uint16), photometric="rgb"), "he")


def case_he_cmyk(tmp: Path) -> None:
    _ingest(tmp, _rgb_tiff(tmp / "cmyk.tif", np.zeros((64, 64, 4), np.uint8), photometric="separated"), "he")


def case_channel_count_mismatch(tmp: Path) -> None:
    tifffile.imwrite(tmp / "plain.tif", np.ones((3, 32, 32), np.float32))  # no names: the CSV gives them in order
    _ingest(tmp, tmp / "plain.tif", channels=_channels_csv(tmp / "c.csv", ["A", "B"]))


def case_duplicate_channel_names(tmp: Path) -> None:
    _ingest(tmp, _multiplex_tiff(tmp / "m.ome.tif", 3), channels=_channels_csv(tmp / "c.csv", ["A", "B", "A"]))


def case_empty_channel_name(tmp: Path) -> None:
    pd.DataFrame({"channel_name": ["A", " ", "C"], "uniprot_id": [None] * 3}).to_csv(tmp / "c.csv", index=False)
    _ingest(tmp, _multiplex_tiff(tmp / "m.ome.tif", 3), channels=tmp / "c.csv")


def case_nan_pixels(tmp: Path) -> None:
    data = np.ones((2, 32, 32), np.float32)
    data[1, 3, 4] = np.nan
    tifffile.imwrite(tmp / "nan.ome.tif", data, metadata={"axes": "CYX", "Channel": {"Name": ["A", "B"]}})
    _ingest(tmp, tmp / "nan.ome.tif")


def case_channels_last_multiplex(tmp: Path) -> None:
    data = np.random.default_rng(0).random((64, 48, 5), dtype=np.float32)
    tifffile.imwrite(tmp / "yxc.tif", data)
    _ingest(tmp, tmp / "yxc.tif", channels=_channels_csv(tmp / "c.csv", list("ABCDE")))


def case_cell_mask_shape(tmp: Path) -> None:
    tifffile.imwrite(tmp / "cells.tif", np.ones((10, 10), np.uint16))
    _ingest(tmp, _multiplex_tiff(tmp / "m.ome.tif", 3), cell_mask=tmp / "cells.tif")


def case_negative_cell_ids(tmp: Path) -> None:
    DatasetWriter.open(tmp / "out" / "ds").write_cell_mask("t0", 1.0, -np.ones((8, 8), np.int32))


def case_duplicate_tissue_id(tmp: Path) -> None:
    image = _multiplex_tiff(tmp / "m.ome.tif", 3)
    _ingest(tmp, image)
    _ingest(tmp, image)


def case_path_escape_tissue_id(tmp: Path) -> None:
    DatasetWriter.open(tmp / "out" / "ds").write_tissues(pd.DataFrame({"tissue_id": ["../../etc"], "split": ["train"]}))


def _one_image_dataset(tmp: Path) -> Path:
    root = tmp / "out" / "ds"
    with DatasetWriter.create(root) as w:
        w.write_image("imc", "t0", np.random.default_rng(0).random((2, 64, 64), dtype=np.float32), 1.0, ["A", "B"])
    return root


def case_missing_chunk(tmp: Path) -> None:
    root = _one_image_dataset(tmp)
    (root / "imc/1_0mpp/images/t0.ome.zarr/0/c/0/0/0").unlink()
    DatasetStore(root).image("imc", "t0").read(0, 0, 16, 16)


def case_corrupt_chunk(tmp: Path) -> None:
    root = _one_image_dataset(tmp)
    shard = root / "imc/1_0mpp/images/t0.ome.zarr/0/c/0/0/0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    DatasetStore(root).image("imc", "t0").read(0, 0, 16, 16)


def case_missing_split_column(tmp: Path) -> None:
    root = tmp / "out" / "ds"
    DatasetWriter.open(root).write_tissues(pd.DataFrame({"tissue_id": ["a", "b"]}))
    DatasetStore(root).tissue_ids(split="train")


def _he_codex_dataset(tmp: Path, codex_shape: tuple[int, int], tissue_mask: np.ndarray | None = None) -> Path:
    """One tissue with a 64×64 H&E and a 2-marker CODEX image of `codex_shape`."""
    root = tmp / "out" / "ds"
    rng = np.random.default_rng(0)
    with DatasetWriter.create(root) as w:
        w.write_image("he", "t0", (rng.random((3, 64, 64)) * 255).astype(np.uint8), 0.5, ["R", "G", "B"])
        w.write_image("codex", "t0", rng.random((2, *codex_shape), dtype=np.float32), 0.5, ["CD45", "PanCK"])
        w.write_channels("codex", pd.DataFrame({"channel_name": ["CD45", "PanCK"], "uniprot_id": [None, None]}))
        if tissue_mask is not None:
            w.write_tissue_mask("t0", 0.5, tissue_mask)
        w.write_tissues(pd.DataFrame({"tissue_id": ["t0"], "split": ["train"]}))
    return root


def case_no_tissue_pixels(tmp: Path) -> None:
    from datamodules.rosie import RosieDataModule

    root = _he_codex_dataset(tmp, (64, 64), tissue_mask=np.zeros((64, 64), bool))
    dm = RosieDataModule([str(root)], marker_names=["CD45", "PanCK"], target_scale="none")
    dm.setup("fit")
    dm.train_dataloader()


def case_marker_without_embedding(tmp: Path) -> None:
    from lightning_modules.components.marker_embeddings import load_marker_embeddings

    folder = tmp / "emb"
    folder.mkdir()
    torch.save(torch.zeros(640), folder / "P08575.pt")
    load_marker_embeddings(folder, ["P08575", "Q99999"])


def case_he_not_on_codex_grid(tmp: Path) -> None:
    from datamodules.rosie import RosieDataModule

    root = _he_codex_dataset(tmp, (48, 64))
    RosieDataModule([str(root)], marker_names=["CD45", "PanCK"], target_scale="none").setup("fit")


def case_output_exists(tmp: Path) -> None:
    _one_image_dataset(tmp)
    DatasetWriter.create(tmp / "out" / "ds")


def case_write_permission_denied(tmp: Path) -> None:
    import os

    if os.geteuid() == 0:  # root ignores permission bits: simulate the OS refusal instead
        import fsspec.implementations.local as local

        def deny(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise PermissionError(13, "Permission denied", str(path))

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(local.LocalFileSystem, "makedirs", deny)
            DatasetWriter.create(tmp / "out" / "ds")
    else:
        (tmp / "out").mkdir()
        (tmp / "out").chmod(0o500)
        DatasetWriter.create(tmp / "out" / "ds")


def case_disk_full_during_write(tmp: Path) -> None:
    import errno

    import zarr

    original = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def full(self, key, value):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if key.startswith("0/c/"):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await original(self, key, value)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zarr.storage.LocalStore, "set", full)
        with DatasetWriter.create(tmp / "out" / "ds") as w:
            w.write_image("imc", "t0", np.ones((2, 64, 64), np.float32), 1.0, ["A", "B"])
    assert False, "unreachable"


class _Exploit:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this pickle runs code",))


def case_pickle_checkpoint_code(tmp: Path) -> None:
    from lightning_modules.components.rosie_backbone import load_weights_file

    path = tmp / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model_state_dict": _Exploit()}, f)
    load_weights_file(path)


def case_unknown_config_key(tmp: Path) -> None:
    from experiments.rosie_train import main

    try:
        main(["fit", "--config", str(REPO / "experiments/configs/rosie/tiny.yaml"), "--model.no_such_key", "1"])
    except SystemExit as exc:  # jsonargparse prints the error and exits 2
        raise ValueError(f"configuration rejected: model.no_such_key (exit {exc.code}); check --print_config") from exc


def case_huge_tiff_header(tmp: Path) -> None:
    """A 64×64 RGB TIFF whose ImageWidth/ImageLength tags are patched to 200,000: ~120 GB claimed."""
    import struct

    path = tmp / "huge.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offsets = [tif.pages[0].tags[n].valueoffset for n in ("ImageWidth", "ImageLength", "RowsPerStrip")]
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset : offset + 4] = struct.pack("<I", 200_000)
    path.write_bytes(bytes(data))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIRTUPLEX_MAX_IMAGE_GB", "8")  # the same answer on any machine
        _ingest(tmp, path, "he")


def case_huge_zarr_header(tmp: Path) -> None:
    import json

    root = _one_image_dataset(tmp)
    meta_path = root / "imc/1_0mpp/images/t0.ome.zarr/0/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [2, 1_000_000, 1_000_000]  # 8 TB of float32 claimed by a few bytes of JSON
    meta_path.write_text(json.dumps(meta))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIRTUPLEX_MAX_IMAGE_GB", "8")
        DatasetStore(root).image("imc", "t0").read_all()


CASES: list[Case] = [
    Case("he_grayscale", "ingest", "H&E is single-channel", "export the H&E as 8-bit RGB",
         lambda ctx: case_he_grayscale(ctx.tmp), r"g\.tif.*(3|RGB)", kind="library", exception=IngestError),
    Case("he_rgba", "ingest", "H&E has an alpha channel (RGBA)", "drop the alpha channel",
         lambda ctx: case_he_rgba(ctx.tmp), r"rgba\.tif.*alpha", kind="library", exception=IngestError),
    Case("he_16bit", "ingest", "H&E is 16-bit", "convert to 8 bits per channel",
         lambda ctx: case_he_16bit(ctx.tmp), r"he16\.tif.*(8-bit|uint8|16)", kind="library", exception=IngestError),
    Case("he_cmyk", "ingest", "H&E stored as CMYK (4 channels)", "convert to RGB",
         lambda ctx: case_he_cmyk(ctx.tmp), r"cmyk\.tif", kind="library", exception=IngestError),
    Case("channel_count_mismatch", "ingest", "image channel count differs from the channel table", "fix the CSV or the image",
         lambda ctx: case_channel_count_mismatch(ctx.tmp), r"(c\.csv|plain\.tif).*3.*2|(c\.csv|plain\.tif).*2.*3", kind="library", exception=IngestError),
    Case("duplicate_channel_names", "ingest", "two channels share a name", "rename one",
         lambda ctx: case_duplicate_channel_names(ctx.tmp), r"(?i)duplicate", kind="library", exception=IngestError),
    Case("empty_channel_name", "ingest", "a channel name is empty", "name every channel",
         lambda ctx: case_empty_channel_name(ctx.tmp), r"(?i)empty", kind="library", exception=IngestError),
    Case("nan_pixels", "ingest", "NaN or inf pixels", "replace them (e.g. with 0) before ingest",
         lambda ctx: case_nan_pixels(ctx.tmp), r"nan\.ome\.tif.*(?i:nan)", kind="library", exception=IngestError),
    Case("channels_last_multiplex", "ingest", "multiplex image given as Y,X,C", "transpose to C,Y,X",
         lambda ctx: case_channels_last_multiplex(ctx.tmp), r"yxc\.tif", kind="library", exception=IngestError),
    Case("cell_mask_shape", "ingest", "cell mask shape differs from the image", "export the mask on the image's grid",
         lambda ctx: case_cell_mask_shape(ctx.tmp), r"cells\.tif.*shape", kind="library", exception=IngestError),
    Case("negative_cell_ids", "store", "cell mask with negative ids", "use 0 for background and positive ids",
         lambda ctx: case_negative_cell_ids(ctx.tmp), r"negative", kind="library", exception=StoreError),
    Case("duplicate_tissue_id", "ingest", "tissue id already in the dataset", "choose another id or pass --overwrite",
         lambda ctx: case_duplicate_tissue_id(ctx.tmp), r"t0.*(?i:overwrite)", kind="library", exception=IngestError),
    Case("path_escape_tissue_id", "store", "tissue id with '../' or '/'", "use letters, digits, '_', '-', '.'",
         lambda ctx: case_path_escape_tissue_id(ctx.tmp), r"invalid tissue id", kind="library", exception=ValueError),
    Case("missing_chunk", "store", "an image's chunk file is missing", "re-copy or re-ingest the image",
         lambda ctx: case_missing_chunk(ctx.tmp), r"0/c/0/0/0' is missing", kind="library", exception=StoreError),
    Case("corrupt_chunk", "store", "an image's chunk file is corrupt or truncated", "re-copy or re-ingest the image",
         lambda ctx: case_corrupt_chunk(ctx.tmp), r"corrupt or truncated", kind="library", exception=StoreError),
    Case("missing_split_column", "store", "tissues table without a 'split' column", "add train/val/test per tissue",
         lambda ctx: case_missing_split_column(ctx.tmp), r"tissues\.parquet.*'split'", kind="library", exception=StoreError),
    Case("no_tissue_pixels", "datamodule", "every tissue mask of a split is empty", "recompute tissue masks or lower min_tissue_fraction",
         lambda ctx: case_no_tissue_pixels(ctx.tmp), r"(?i)tissue mask", kind="library", exception=StoreError),
    Case("marker_without_embedding", "model", "a marker's UniProt id has no embedding file", "compute it with experiments.data_embeddings",
         lambda ctx: case_marker_without_embedding(ctx.tmp), r"Q99999", kind="library", exception=Exception),
    Case("he_not_on_codex_grid", "datamodule", "H&E and CODEX of a tissue differ in size", "co-register (ingest --register-to-dapi)",
         lambda ctx: case_he_not_on_codex_grid(ctx.tmp), r"co-register", kind="library", exception=StoreError),
    Case("output_exists", "store", "the output dataset exists", "pass --overwrite or choose another path",
         lambda ctx: case_output_exists(ctx.tmp), r"overwrite", kind="library", exception=StoreError),
    Case("write_permission_denied", "store", "the output folder is not writable", "choose a writable folder",
         lambda ctx: case_write_permission_denied(ctx.tmp), r"(?i)permission denied", kind="library", exception=PermissionError),
    Case("disk_full_during_write", "store", "the disk fills up while writing an image", "free space; nothing partial is left",
         lambda ctx: case_disk_full_during_write(ctx.tmp), r"No space left", kind="library", exception=OSError),
    Case("pickle_checkpoint_code", "model", "a weights file whose pickle would run code", "use a safetensors / weights-only file",
         lambda ctx: case_pickle_checkpoint_code(ctx.tmp), r"evil\.pth", kind="library", exception=ValueError),
    Case("unknown_config_key", "training", "a config key the model does not have", "check --print_config for valid keys",
         lambda ctx: case_unknown_config_key(ctx.tmp), r"no_such_key", kind="library", exception=ValueError),
    Case("huge_tiff_header", "ingest", "a TIFF whose header claims more pixels than memory holds", "tile/crop it first (ingest reads whole images); rosie_predict streams huge H&E",
         lambda ctx: case_huge_tiff_header(ctx.tmp), r"huge\.tif.*size.*200000.*GB.*(?i:tile|crop)", kind="library", exception=IngestError),
    Case("huge_zarr_header", "store", "a Zarr image whose header claims a huge shape, read whole", "read crops (ImageArray.read); raise VIRTUPLEX_MAX_IMAGE_GB only with that much RAM",
         lambda ctx: case_huge_zarr_header(ctx.tmp), r"t0\.ome\.zarr.*1000000.*GB.*crops", kind="library", exception=StoreError),
]
