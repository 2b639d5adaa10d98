"""Path conventions of the harmonized dataset layout (the VirTues authors' "spora" layout).

Kept apart from the reader/writer so that every module that needs a path computes it the same
way, and so the layout is documented in one place:

```
<dataset>/metadata/tissues.parquet
<dataset>/metadata/cells.parquet
<dataset>/<modality>/channels.parquet
<dataset>/<modality>/channels_per_tissue.parquet
<dataset>/<modality>/<res>mpp/images/<tissue_id>.ome.zarr
<dataset>/<modality>/<res>mpp/standardization/quantile_clipping_log1p/uq_0.99_image/*.parquet
<dataset>/segmentations/<res>mpp/tissue_masks/<tissue_id>.npz
<dataset>/segmentations/<res>mpp/cell_masks/instances/<tissue_id>.npz
<dataset>/tiling/<res>mpp/default/<size>_tile_coordinates.parquet
<dataset>/marker_embeddings/<UniProtID>.pt
```
"""

from __future__ import annotations

import re

STANDARDIZATION_NAME = "quantile_clipping_log1p/uq_0.99_image"
UPPER_QUANTILES_FILE = "image_level_upper_quantiles.parquet"
MEANS_FILE = "global_level_means.parquet"
STDS_FILE = "global_level_stds.parquet"

#: UniProt accession (optionally with an isoform suffix), as spora-io filters channels.
UNIPROT_PATTERN = re.compile(r"^[OPQ][0-9][A-Z0-9]{3}[0-9](-[0-9]+)?$|^[A-NR-Z][0-9]([A-Z][A-Z0-9]{2}[0-9]){1,2}(-[0-9]+)?$")

#: Tissue ids become file names: keep them to a safe alphabet so no id escapes its folder.
TISSUE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,200}$")


#: The three splits, and the spellings other tools write for them (compared lower-cased, stripped).
SPLITS = ("train", "val", "test")
SPLIT_SPELLINGS = {
    "train": "train", "training": "train", "trn": "train",
    "val": "val", "valid": "val", "validation": "val", "validate": "val", "dev": "val",
    "test": "test", "testing": "test", "tst": "test", "holdout": "test", "held-out": "test", "heldout": "test",
}
#: Physical range of a pixel size in µm: 1 nm .. 1 mm covers every microscope and scanner.
MPP_RANGE = (0.001, 1000.0)


def normalise_split(value: object) -> str:
    """``'Train'``, ``' validation '`` -> ``'train'``, ``'val'``; ValueError for anything else."""
    key = str(value).strip().lower() if value is not None else ""
    if key in SPLIT_SPELLINGS:
        return SPLIT_SPELLINGS[key]
    raise ValueError(f"split label {value!r} is not one of {SPLITS} "
                     f"(also accepted: {', '.join(sorted(k for k in SPLIT_SPELLINGS if k not in SPLITS))})")


def check_mpp(mpp: object, what: str = "resolution") -> float:
    """A pixel size in µm/px within :data:`MPP_RANGE`, or ValueError saying what was given."""
    try:
        value = float(mpp)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} {mpp!r} is not a number of µm per pixel") from None
    lo, hi = MPP_RANGE
    if not lo <= value <= hi:
        raise ValueError(f"{what} {mpp!r} µm/px is outside the physical range {lo:g}-{hi:g} µm/px "
                         "(e.g. 0.5 for a 20x scan, 1.0 for IMC)")
    return value


def resolution_folder(mpp: float) -> str:
    """`1.0` -> `1_0mpp`, `0.5` -> `0_5mpp`, `0.25` -> `0_25mpp` (the spora naming)."""
    if not mpp > 0:
        raise ValueError(f"resolution must be a positive number of µm per pixel, got {mpp!r}")
    text = f"{float(mpp):.4f}".rstrip("0")
    if text.endswith("."):
        text += "0"
    return text.replace(".", "_") + "mpp"


def parse_resolution_folder(name: str) -> float:
    """Inverse of :func:`resolution_folder`; raises ValueError on a name that is not one."""
    match = re.fullmatch(r"(\d+)_(\d+)mpp", name)
    if not match:
        raise ValueError(f"not a resolution folder name: {name!r} (expected e.g. '1_0mpp')")
    return float(f"{match.group(1)}.{match.group(2)}")


def is_uniprot_id(value: object) -> bool:
    return isinstance(value, str) and bool(UNIPROT_PATTERN.match(value))


def check_tissue_id(tissue_id: str) -> str:
    """Reject ids that could escape the dataset folder or break file names (`../x`, `/abs`)."""
    if not isinstance(tissue_id, str) or not TISSUE_ID_PATTERN.match(tissue_id) or ".." in tissue_id:
        raise ValueError(
            f"invalid tissue id {tissue_id!r}: use letters, digits, '_', '-', '.' only "
            "(no path separators, no '..', at most 200 characters)"
        )
    return tissue_id


def image_path(modality: str, mpp: float, tissue_id: str) -> str:
    return f"{modality}/{resolution_folder(mpp)}/images/{check_tissue_id(tissue_id)}.ome.zarr"


def tissue_mask_path(mpp: float, tissue_id: str) -> str:
    return f"segmentations/{resolution_folder(mpp)}/tissue_masks/{check_tissue_id(tissue_id)}.npz"


def cell_mask_path(mpp: float, tissue_id: str) -> str:
    return f"segmentations/{resolution_folder(mpp)}/cell_masks/instances/{check_tissue_id(tissue_id)}.npz"


def channels_path(modality: str) -> str:
    return f"{modality}/channels.parquet"


def channels_per_tissue_path(modality: str) -> str:
    return f"{modality}/channels_per_tissue.parquet"


def standardization_dir(modality: str, mpp: float) -> str:
    return f"{modality}/{resolution_folder(mpp)}/standardization/{STANDARDIZATION_NAME}"


def tiling_path(mpp: float, tile_size: int = 128) -> str:
    return f"tiling/{resolution_folder(mpp)}/default/{tile_size}_tile_coordinates.parquet"


def embedding_path(uniprot_id: str) -> str:
    if not is_uniprot_id(uniprot_id):
        raise ValueError(f"not a UniProt accession: {uniprot_id!r}")
    return f"marker_embeddings/{uniprot_id}.pt"


TISSUES_TABLE = "metadata/tissues.parquet"
CELLS_TABLE = "metadata/cells.parquet"
