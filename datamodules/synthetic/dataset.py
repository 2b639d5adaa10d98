"""Write a synthetic dataset: tissues, splits, standardization statistics, tiling, embeddings.

Why through :class:`datamodules.store.DatasetWriter`: a synthetic dataset must be indistinguishable
in layout from an ingested one (the DataModules, evaluation and every command read both the same
way), and it is written atomically, so a crash leaves nothing half-written. Tissues may be rendered
in worker processes; they are written in index order and each tissue has its own seed, so the
bytes on disk do not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from datamodules.preprocess import clip_log1p
from datamodules.provenance import read_manifest
from datamodules.statistics import RunningMoments, upper_quantiles
from datamodules.store import DatasetWriter
from datamodules.synthetic.panels import (
    ASSETS_DIR,
    CODEX_CHANNELS,
    CODEX_MPP,
    HE_CHANNELS,
    HE_MPP,
    IMC_MPP,
    codex_channels_table,
    he_channels_table,
    imc_channels_table,
)
from datamodules.synthetic.tissue import Tissue, simulate_tissue
from lightning_modules.components.model_files import load_tensor_file

TILE_SIZE = 128
MIN_TILE_TISSUE = 0.30
#: `written_by` of the manifest and `generator` of `.complete`: how a dataset is recognised as ours.
#: Kept as the package name it has always had, so datasets written before stay recognised.
GENERATOR = "datamodules.synthetic"
#: Salt of the split permutation's seed, so splits do not share a stream with the tissues.
SPLIT_SEED_SALT = 0x5B17


def assign_splits(n: int, seed: int) -> list[str]:
    """Deterministic train/val/test per tissue: ≥1 val and ≥1 test once n ≥ 4 (≈15 % each)."""
    if n <= 1:
        return ["train"] * n
    n_test = max(1, round(0.15 * n)) if n >= 3 else 0
    n_val = max(1, round(0.15 * n))
    order = np.random.default_rng([int(seed), SPLIT_SEED_SALT]).permutation(n)
    split = ["train"] * n
    for rank, i in enumerate(order):
        if rank < n_test:
            split[i] = "test"
        elif rank < n_test + n_val:
            split[i] = "val"
    return split


def tiles_for(tissue_id: str, mask_1um: np.ndarray, tile: int = TILE_SIZE, min_tissue: float = MIN_TILE_TISSUE) -> pd.DataFrame:
    """128-px tiles (stride 128) at 1 µm/px holding at least `min_tissue` tissue."""
    h, w = mask_1um.shape
    rows = []
    for r in range(0, h - tile + 1, tile):
        for c in range(0, w - tile + 1, tile):
            fraction = float(mask_1um[r : r + tile, c : c + tile].mean())
            if fraction >= min_tissue:
                rows.append((tissue_id, r, c, fraction))
    return pd.DataFrame(rows, columns=["tissue_id", "row", "col", "tissue_fraction"])


def validate_generation_args(n_tissues: int, size: int) -> None:
    """Refuse a tissue count or size the generator cannot honour, before anything is written."""
    if not isinstance(n_tissues, (int, np.integer)) or n_tissues < 1:
        raise ValueError(f"--tissues must be an integer >= 1, got {n_tissues!r}")
    if not isinstance(size, (int, np.integer)) or size < 128 or size % 16:
        raise ValueError(f"--size must be an integer >= 128 and a multiple of 16 (pixels at 0.5 µm/px), got {size!r}")


class StandardizationAccumulator:
    """Per-image 99th percentiles + pooled clip/log1p moments, fed one tissue at a time.

    Why incremental: the images of a large dataset do not fit in memory together, and the
    statistics must be the ones `datamodules.statistics` computes for an ingested dataset.
    """

    def __init__(self, channel_names: Sequence[str]):
        self.names = list(channel_names)
        self.upper_quantiles: dict[str, np.ndarray] = {}
        self.moments = RunningMoments(len(self.names))

    def add(self, tissue_id: str, image: np.ndarray, mask: np.ndarray) -> None:
        """Take one tissue's (C,Y,X) image and its tissue mask into the statistics."""
        quantiles = upper_quantiles(image, mask, q=0.99)
        self.upper_quantiles[tissue_id] = quantiles
        clipped = clip_log1p(image, quantiles)
        for c in range(clipped.shape[0]):
            self.moments.update(c, clipped[c][mask])

    def frames(self) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
        """(upper quantiles per tissue, channel means, channel sds), as `DatasetWriter.write_standardization` takes them."""
        quantiles = pd.DataFrame.from_dict(self.upper_quantiles, orient="index", columns=self.names)
        quantiles.index.name = "tissue_id"
        means, stds = self.moments.result()
        return quantiles, pd.Series(means, index=self.names), pd.Series(stds, index=self.names)


def is_synthetic_dataset(root: Path) -> bool:
    """Whether ``root`` was written by this generator (its manifest, or the ``.complete`` marker of older runs)."""
    manifest = read_manifest(root) or {}
    if manifest.get("written_by") == GENERATOR:
        return True
    try:
        return json.loads((root / ".complete").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _simulate_tissue_job(job: tuple[int, int, int, list[str]]) -> Tissue:
    """`simulate_tissue(*job)`, as a module-level function a worker process can receive."""
    return simulate_tissue(*job)


def generate_dataset(out: str | Path, n_tissues: int, size: int, seed: int, overwrite: bool = False,
                     workers: int = 1, progress: bool = True) -> Path:
    """Generate `n_tissues` synthetic tissues of `size`×`size` px (0.5 µm/px) into `out`; returns `out`.

    Written atomically through :class:`datamodules.store.DatasetWriter`: modalities `he` (RGB uint8,
    0.5 µm/px), `codex` (ROSIE's 50 markers, uint16, 0.5 µm/px) and `imc` (the real 43-channel panel,
    float32 counts, 1 µm/px); tissue and cell masks at 0.5 and 1 µm/px; `metadata/tissues.parquet`
    (split, clinical labels, generator latents) and `metadata/cells.parquet` (x, y, area in µm / µm²);
    standardization statistics for codex and imc; the 128-px tiling at 1 µm/px; the real ESM-2
    embeddings of the IMC panel; and a `.complete` marker with the arguments. `workers` > 1 renders
    tissues in parallel processes with byte-identical output.
    """
    validate_generation_args(n_tissues, size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out.exists() and any(out.iterdir()) and not is_synthetic_dataset(out):
        raise FileExistsError(f"{out}: exists and is not a synthetic dataset; --overwrite replaces only a dataset this "
                              "generator wrote: choose another --out")
    imc_table = imc_channels_table()
    imc_names = [str(c) for c in imc_table["channel_name"]]
    splits = assign_splits(n_tissues, seed)
    codex_stats, imc_stats = StandardizationAccumulator(CODEX_CHANNELS), StandardizationAccumulator(imc_names)
    tissue_rows, cell_tables, tiles = [], [], []
    jobs = [(seed, i, size, imc_names) for i in range(n_tissues)]

    with DatasetWriter.create(out, overwrite=overwrite, written_by=GENERATOR) as writer:
        if workers > 1:
            pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
            results = pool.imap(_simulate_tissue_job, jobs)
        else:
            pool = None
            results = (simulate_tissue(*job) for job in jobs)
        try:
            bar = tqdm(results, total=n_tissues, desc="synthetic tissues", unit="tissue", disable=not progress)
            for i, tissue in enumerate(bar):
                _write_tissue_images(writer, tissue, imc_names)
                codex_stats.add(tissue.tissue_id, tissue.codex, tissue.tissue_mask)
                imc_stats.add(tissue.tissue_id, tissue.imc, tissue.tissue_mask_1um)
                tiles.append(tiles_for(tissue.tissue_id, tissue.tissue_mask_1um))
                cell_tables.append(tissue.cells)
                tissue_rows.append({"tissue_id": tissue.tissue_id, "patient_id": f"synth_s{seed}_p{i:04d}",
                                    "split": splits[i], "dataset": "synthetic",
                                    **{k: v for k, v in tissue.info.items() if k != "tissue_id"}})
        finally:
            if pool is not None:
                pool.close()
                pool.join()

        tissues = pd.DataFrame(tissue_rows)
        tissue_ids = list(tissues["tissue_id"])
        writer.write_tissues(tissues)
        writer.write_cells(pd.concat(cell_tables, ignore_index=True))
        _write_channel_tables(writer, tissue_ids, imc_table, imc_names)
        for stats, modality, mpp in ((codex_stats, "codex", CODEX_MPP), (imc_stats, "imc", IMC_MPP)):
            writer.write_standardization(modality, mpp, *stats.frames())
        tiling = pd.concat(tiles, ignore_index=True)
        tiling.insert(1, "tile_id", np.arange(len(tiling), dtype=np.int64))
        writer.write_tiling(IMC_MPP, tiling, tile_size=TILE_SIZE)
        _write_marker_embeddings(writer, imc_table)
        meta = {"generator": GENERATOR, "n_tissues": n_tissues, "size": size, "seed": seed,
                "he_mpp": HE_MPP, "codex_mpp": CODEX_MPP, "imc_mpp": IMC_MPP}
        with writer.fs.open(f"{writer.root}/.complete", "w") as f:
            f.write(json.dumps(meta, sort_keys=True) + "\n")
    return out


def _write_tissue_images(writer: DatasetWriter, tissue: Tissue, imc_names: list[str]) -> None:
    """The three modality images and the tissue and cell masks at both resolutions."""
    writer.write_image("he", tissue.tissue_id, tissue.he, HE_MPP, list(HE_CHANNELS))
    writer.write_image("codex", tissue.tissue_id, tissue.codex, CODEX_MPP, list(CODEX_CHANNELS))
    writer.write_image("imc", tissue.tissue_id, tissue.imc, IMC_MPP, imc_names)
    writer.write_tissue_mask(tissue.tissue_id, HE_MPP, tissue.tissue_mask)
    writer.write_tissue_mask(tissue.tissue_id, IMC_MPP, tissue.tissue_mask_1um)
    writer.write_cell_mask(tissue.tissue_id, HE_MPP, tissue.cell_mask)
    writer.write_cell_mask(tissue.tissue_id, IMC_MPP, tissue.cell_mask_1um)


def _write_channel_tables(writer: DatasetWriter, tissue_ids: list[str], imc_table: pd.DataFrame,
                          imc_names: list[str]) -> None:
    """Each modality's channel table, and which channels each tissue has (all of them, here)."""
    writer.write_channels("he", he_channels_table())
    writer.write_channels("codex", codex_channels_table())
    writer.write_channels("imc", imc_table)
    for modality, names in (("he", list(HE_CHANNELS)), ("codex", list(CODEX_CHANNELS)), ("imc", imc_names)):
        present = pd.DataFrame(True, index=pd.Index(tissue_ids, name="tissue_id"), columns=names)
        writer.write_channels_per_tissue(modality, present)


def _write_marker_embeddings(writer: DatasetWriter, imc_table: pd.DataFrame) -> None:
    """The shipped ESM-2 embedding of every UniProt accession of the IMC panel that has one."""
    embeddings_dir = ASSETS_DIR / "marker_embeddings"
    for uniprot_id in sorted({str(u) for u in imc_table["uniprot_id"].dropna()}):
        path = embeddings_dir / f"{uniprot_id}.pt"
        if path.exists():
            writer.write_embedding(uniprot_id, load_tensor_file(path))
