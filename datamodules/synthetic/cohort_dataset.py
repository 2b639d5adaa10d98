"""Write the cohort preset: discovery, validation and panel-B datasets plus the `cohort.json` truth.

    generate_cohort(out, n_patients=24, n_validation=40, n_panel_b=12, size=256, seed=0)

writes `out/discovery`, `out/validation` and `out/panel_b`, each a dataset in the project's layout
(through :class:`datamodules.store.DatasetWriter`, as :func:`~datamodules.synthetic.generate_dataset`
writes one) with a single `imc` modality at 1 µm/px, and `out/cohort.json` (the planted truth, the
panels, the paths). Why three datasets: the validation cohort must never be seen by pretraining or
discovery, and panel B has another channel table, so each is its own dataset. Splits are drawn per
patient (all timepoints of a discovery patient share a split). Tissues may be rendered in worker
processes; the bytes do not depend on their number.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from datamodules.store import DatasetWriter
from datamodules.synthetic.cohort import (CohortTissueSpec, discovery_specs, independent_specs, instances_per_niche,
                                          planted_truth)
from datamodules.synthetic.cohort_tissue import MIN_NICHE_CELLS, CohortTissue, simulate_cohort_tissue
from datamodules.synthetic.dataset import (GENERATOR, TILE_SIZE, StandardizationAccumulator, assign_splits,
                                           is_synthetic_dataset, tiles_for)
from datamodules.synthetic.niches import CELL_STATES, COARSE_TYPE, NICHE_NAMES, niche_type_table
from datamodules.synthetic.panel_b import (PANEL_B_CHANNELS, PANEL_B_ONLY, PANEL_B_PROTEIN, PANEL_B_SHARED,
                                           panel_b_channels_table)
from datamodules.synthetic.panels import ASSETS_DIR, IMC_MPP, IMC_PROTEIN, imc_channels_table
from lightning_modules.components.model_files import load_tensor_file

COHORT_MANIFEST = "cohort.json"
COHORT_DATASETS: tuple[str, ...] = ("discovery", "validation", "panel_b")


def validate_cohort_args(n_patients: int, n_validation: int, n_panel_b: int, size: int) -> None:
    """Refuse counts or a size the preset cannot honour, before anything is written."""
    checks = (("--patients", n_patients, 2), ("--validation", n_validation, 2), ("--panel-b", n_panel_b, 1))
    for flag, value, low in checks:
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
    if not isinstance(size, (int, np.integer)) or size < 128 or size % 32:
        raise ValueError(f"--size must be an integer >= 128 and a multiple of 32 (pixels at 0.5 µm/px), got {size!r}")


def generate_cohort(out: str | Path, n_patients: int = 24, n_validation: int = 40, n_panel_b: int = 12,
                    size: int = 256, seed: int = 0, overwrite: bool = False, workers: int = 1,
                    progress: bool = True) -> Path:
    """Generate the three cohort datasets and `cohort.json` under `out`; returns `out`."""
    validate_cohort_args(n_patients, n_validation, n_panel_b, size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out.exists() and any(out.iterdir()) and not (out / COHORT_MANIFEST).exists():
        raise FileExistsError(f"{out}: exists and is not a synthetic cohort; --overwrite replaces only a cohort this "
                              "generator wrote: choose another --out")
    for name in COHORT_DATASETS:
        sub = out / name
        if sub.exists() and any(sub.iterdir()) and not is_synthetic_dataset(sub):
            raise FileExistsError(f"{sub}: exists and is not a synthetic dataset: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / COHORT_MANIFEST).unlink(missing_ok=True)  # a half-replaced cohort must not look complete
    panel_a = imc_channels_table()
    panels = {"discovery": (panel_a, IMC_PROTEIN), "validation": (panel_a, IMC_PROTEIN),
              "panel_b": (panel_b_channels_table(), PANEL_B_PROTEIN)}
    specs = {"discovery": discovery_specs(n_patients, size, seed),
             "validation": independent_specs("validation", n_validation, size, seed),
             "panel_b": independent_specs("panel_b", n_panel_b, size, seed)}
    summaries = {}
    for name in COHORT_DATASETS:
        table, protein_of = panels[name]
        summaries[name] = write_cohort_dataset(out / name, specs[name], size, seed, table, protein_of,
                                               overwrite=overwrite, workers=workers, progress=progress)
    manifest = {
        "generator": GENERATOR, "preset": "cohort", "seed": seed, "size": size, "imc_mpp": IMC_MPP,
        "datasets": {name: {"path": name, **summaries[name]} for name in COHORT_DATASETS},
        "niches": niche_type_table(), "niche_names": list(NICHE_NAMES), "cell_states": list(CELL_STATES),
        "coarse_types": sorted(set(COARSE_TYPE.values())), "instances_per_present_niche": instances_per_niche(size),
        "min_niche_cells_for_presence": MIN_NICHE_CELLS,
        "panels": {"panel_a": [str(c) for c in panel_a["channel_name"]], "panel_b": list(PANEL_B_CHANNELS),
                   "shared_markers": list(PANEL_B_SHARED), "panel_b_only": [c for c, _, _ in PANEL_B_ONLY],
                   "panel_a_only": [str(c) for c in panel_a["channel_name"] if c not in PANEL_B_SHARED]},
        **planted_truth(),
    }
    (out / COHORT_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def read_cohort_manifest(out: str | Path) -> dict:
    """The planted truth and layout of a cohort written by :func:`generate_cohort` (`out/cohort.json`)."""
    path = Path(out) / COHORT_MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no cohort manifest; generate the cohort with "
                                "`python -m experiments.data_synthetic --preset cohort --out DIR`")
    return json.loads(path.read_text())


def _render_job(job: tuple[CohortTissueSpec, int, list[str], dict[str, str]]) -> CohortTissue:
    """`simulate_cohort_tissue(*job)`, as a module-level function a worker process can receive."""
    return simulate_cohort_tissue(*job)


def write_cohort_dataset(out: Path, specs: Sequence[CohortTissueSpec], size: int, seed: int, channels: pd.DataFrame,
                         protein_of: Mapping[str, str], overwrite: bool, workers: int, progress: bool) -> dict:
    """Render `specs` and write them as one dataset (imc only); returns a summary for the manifest."""
    names = [str(c) for c in channels["channel_name"]]
    patients = list(dict.fromkeys(s.patient_id for s in specs))
    split_of = dict(zip(patients, assign_splits(len(patients), seed)))
    stats = StandardizationAccumulator(names)
    rows, cell_tables, tiles = [], [], []
    jobs = [(s, size, names, dict(protein_of)) for s in specs]
    cohort = specs[0].cohort
    with DatasetWriter.create(out, overwrite=overwrite, written_by=GENERATOR) as writer:
        pool = None
        if workers > 1:
            pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
            results = pool.imap(_render_job, jobs)
        else:
            results = (simulate_cohort_tissue(*job) for job in jobs)
        try:
            for tissue in tqdm(results, total=len(jobs), desc=f"cohort {cohort}", unit="tissue", disable=not progress):
                writer.write_image("imc", tissue.tissue_id, tissue.imc, IMC_MPP, names)
                writer.write_tissue_mask(tissue.tissue_id, IMC_MPP, tissue.tissue_mask_1um)
                writer.write_cell_mask(tissue.tissue_id, IMC_MPP, tissue.cell_mask_1um)
                stats.add(tissue.tissue_id, tissue.imc, tissue.tissue_mask_1um)
                tiles.append(tiles_for(tissue.tissue_id, tissue.tissue_mask_1um))
                cell_tables.append(tissue.cells)
                rows.append({"tissue_id": tissue.tissue_id, "patient_id": tissue.info["patient_id"],
                             "split": split_of[str(tissue.info["patient_id"])], "dataset": f"synthetic_{cohort}",
                             **{k: v for k, v in tissue.info.items() if k not in ("tissue_id", "patient_id")}})
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        tissues = pd.DataFrame(rows)
        writer.write_tissues(tissues)
        writer.write_cells(pd.concat(cell_tables, ignore_index=True))
        writer.write_channels("imc", channels)
        present = pd.DataFrame(True, index=pd.Index(tissues["tissue_id"], name="tissue_id"), columns=names)
        writer.write_channels_per_tissue("imc", present)
        writer.write_standardization("imc", IMC_MPP, *stats.frames())
        tiling = pd.concat(tiles, ignore_index=True)
        tiling.insert(1, "tile_id", np.arange(len(tiling), dtype=np.int64))
        writer.write_tiling(IMC_MPP, tiling, tile_size=TILE_SIZE)
        embedded = _write_marker_embeddings(writer, channels)
        meta = {"generator": GENERATOR, "preset": "cohort", "cohort": cohort, "n_tissues": len(specs),
                "size": size, "seed": seed, "imc_mpp": IMC_MPP}
        with writer.fs.open(f"{writer.root}/.complete", "w") as f:
            f.write(json.dumps(meta, sort_keys=True) + "\n")
    return {"n_tissues": len(specs), "n_patients": len(patients), "n_cells": int(sum(len(c) for c in cell_tables)),
            "n_tiles": len(tiling), "channels": names, "channels_with_embedding": embedded}


def _write_marker_embeddings(writer: DatasetWriter, channels: pd.DataFrame) -> list[str]:
    """The shipped ESM-2 embedding of every accession of the panel that has one; returns their channel names."""
    embeddings_dir = ASSETS_DIR / "marker_embeddings"
    for uniprot_id in sorted({str(u) for u in channels["uniprot_id"].dropna()}):
        path = embeddings_dir / f"{uniprot_id}.pt"
        if path.exists():
            writer.write_embedding(uniprot_id, load_tensor_file(path))
    return [str(c) for c, u in zip(channels["channel_name"], channels["uniprot_id"])
            if not pd.isna(u) and (embeddings_dir / f"{u}.pt").exists()]
