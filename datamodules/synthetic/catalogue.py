"""The biology the simulator draws from: cell types (what H&E shows of them), niches, and proteins
(where each sits and which cells carry it).

Why a catalogue separate from the simulation: the tissue model, the H&E renderer and the marker
renderers all read the same cell types and protein profiles, and the tests read them to know which
markers carry morphological signal. Keeping the numbers in one table-like module makes the biology
reviewable without reading any rendering code.
"""

from __future__ import annotations

import dataclasses

# ================================================================================================
# Cell types
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class CellType:
    """Morphology of one cell type: what H&E shows of it (lengths in µm, densities as OD)."""

    name: str
    category: str
    nucleus: tuple[float, float]  # semi-axes (major, minor)
    size_cv: float  # log-normal spread of the semi-axes
    irregularity: float  # amplitude of the boundary harmonics (pleomorphism)
    lobes: int  # > 1: segmented nucleus (neutrophil)
    chromatin: float  # hematoxylin OD of the nucleus
    texture: float  # relative amplitude of the chromatin texture
    cytoplasm: float  # cytoplasm extent beyond the nucleus
    eosin: float  # eosin OD of the cytoplasm
    basophilia: float  # hematoxylin OD of the cytoplasm (plasma cells)


CELL_TYPES: tuple[CellType, ...] = (
    CellType("Tumor", "Tumor", (5.0, 3.8), 0.16, 0.12, 1, 0.42, 0.6, 4.5, 0.30, 0.05),
    CellType("CD4_T", "T cell", (3.1, 2.8), 0.07, 0.03, 1, 1.05, 0.15, 1.0, 0.12, 0.02),
    CellType("CD8_T", "T cell", (3.1, 2.8), 0.07, 0.03, 1, 1.05, 0.15, 1.0, 0.12, 0.02),
    CellType("Treg", "T cell", (3.1, 2.8), 0.07, 0.03, 1, 1.05, 0.15, 1.0, 0.12, 0.02),
    CellType("B_cell", "Immune", (3.2, 2.9), 0.07, 0.03, 1, 1.00, 0.15, 1.0, 0.10, 0.03),
    CellType("Plasma", "Immune", (3.1, 2.6), 0.08, 0.04, 1, 0.85, 0.60, 3.5, 0.14, 0.16),
    CellType("Macrophage", "Immune", (4.3, 3.1), 0.12, 0.16, 1, 0.50, 0.30, 6.0, 0.26, 0.02),
    CellType("Neutrophil", "Immune", (3.6, 3.2), 0.08, 0.03, 3, 1.10, 0.10, 3.0, 0.30, 0.00),
    CellType("Fibroblast", "Fibroblast", (6.5, 1.6), 0.15, 0.05, 1, 0.75, 0.20, 1.5, 0.20, 0.01),
    CellType("Endothelial", "Vessel", (5.0, 1.3), 0.12, 0.04, 1, 0.80, 0.15, 1.0, 0.14, 0.01),
)
TYPE_NAMES: tuple[str, ...] = tuple(t.name for t in CELL_TYPES)
#: cell type name → its index in :data:`CELL_TYPES` (the integer code the simulation stores per cell)
CELL_TYPE_INDEX: dict[str, int] = {name: i for i, name in enumerate(TYPE_NAMES)}
#: short name (used in the protein profiles below, to keep them one line each) → cell type name
TYPE_BY_SHORT_NAME: dict[str, str] = {
    "tum": "Tumor", "cd4": "CD4_T", "cd8": "CD8_T", "treg": "Treg", "b": "B_cell", "pc": "Plasma",
    "mac": "Macrophage", "neu": "Neutrophil", "fib": "Fibroblast", "endo": "Endothelial",
}
T_CELL_SHORT_NAMES: tuple[str, ...] = ("cd4", "cd8", "treg")
NUCLEATED_SHORT_NAMES: tuple[str, ...] = tuple(TYPE_BY_SHORT_NAME)

#: niche codes of a cell (cells table column `niche`)
NICHES = ("stroma", "tumor", "gland", "vessel", "lymphoid_aggregate")

# ================================================================================================
# Marker profiles (per protein, shared by both panels)
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class Protein:
    """Where a protein sits and which cells carry it.

    `localisation`: "nuc", "mem", "cyto", "whole" or "dna" (follows the chromatin texture: DAPI,
    H3, Ir). `levels`: mean level per cell type (short names, see :data:`TYPE_BY_SHORT_NAME`).
    `positive_fraction`: per type, the fraction of cells that express it (the rest at 10 %), which
    morphology cannot predict. `extracellular`: extracellular maps (see
    :func:`~datamodules.synthetic.tissue_layout.lay_out_tissue`) and their weight.
    `no_signal_distribution`: (fraction positive, log-sd) for no-signal proteins, drawn
    independently of everything else.
    """

    localisation: str
    levels: dict[str, float] = dataclasses.field(default_factory=dict)
    positive_fraction: dict[str, float] = dataclasses.field(default_factory=dict)
    extracellular: dict[str, float] = dataclasses.field(default_factory=dict)
    no_signal_distribution: tuple[float, float] | None = None


def _on_all_nucleated(level: float, **overrides: float) -> dict[str, float]:
    """`level` on every nucleated type, except the types named in `overrides`."""
    levels = {short: level for short in NUCLEATED_SHORT_NAMES}
    levels.update(overrides)
    return levels


def _on_t_cells(level: float, **overrides: float) -> dict[str, float]:
    """`level` on the three T-cell types, plus (or instead) the types named in `overrides`."""
    levels = {short: level for short in T_CELL_SHORT_NAMES}
    levels.update(overrides)
    return levels


PROTEINS: dict[str, Protein] = {
    "DNA": Protein("dna", _on_all_nucleated(1.0)),
    "PTPRC": Protein("mem", _on_t_cells(1.0, b=1.0, pc=0.45, mac=0.7, neu=0.6)),
    "CD68": Protein("cyto", {"mac": 1.0, "neu": 0.12}),
    "CD14": Protein("mem", {"mac": 0.8, "neu": 0.25}, positive_fraction={"mac": 0.7}),
    "P4HB": Protein("cyto", _on_all_nucleated(0.15, pc=1.0, tum=0.5, fib=0.45, mac=0.35, endo=0.3)),
    "FOXP3": Protein("nuc", {"treg": 1.0}),
    "CD8": Protein("mem", {"cd8": 1.0}),
    "HLA-DR": Protein("mem", {"mac": 0.9, "b": 0.9, "pc": 0.2, "endo": 0.25}),  # + tumour in hot tissue
    "KRT": Protein("cyto", {"tum": 1.0}),
    "CD3": Protein("mem", _on_t_cells(1.0)),
    "CD4": Protein("mem", {"cd4": 1.0, "treg": 0.9, "mac": 0.3}),
    "ACTA2": Protein("cyto", {"fib": 0.8}, positive_fraction={"fib": 0.5},
                     extracellular={"vessel_wall": 1.0, "collagen": 0.3}),
    "PECAM1": Protein("mem", {"endo": 1.0, "mac": 0.1, "neu": 0.1}),
    "VIM": Protein("cyto", _on_all_nucleated(0.3, fib=1.0, endo=0.8, mac=0.6, pc=0.2, tum=0.08),
                   extracellular={"collagen": 0.45}),
    "CD45RO": Protein("mem", _on_t_cells(0.8, cd8=0.6, treg=0.9, mac=0.3), positive_fraction=_on_t_cells(0.65)),
    "MKI67": Protein("nuc", no_signal_distribution=(0.2, 0.5)),
    "MS4A1": Protein("mem", {"b": 1.0}),
    "ITGAX": Protein("mem", {"mac": 0.7, "b": 0.1}),
    "PDPN": Protein("mem", {"fib": 0.6, "endo": 0.15}, positive_fraction={"fib": 0.4},
                    extracellular={"collagen": 0.15}),
    "CD274": Protein("mem", {"tum": 0.05, "mac": 0.1}),  # + interferon response (context)
    "GZMB": Protein("cyto", {"cd8": 0.3, "neu": 0.1}, positive_fraction={"cd8": 0.5}),  # + hot tissue
    "CD38": Protein("mem", {"pc": 1.0, "b": 0.3, "cd8": 0.2, "cd4": 0.1}),
    "THBD": Protein("mem", {"endo": 0.7, "mac": 0.2}),
    "CR2": Protein("mem", {"b": 0.5}, extracellular={"fdc": 1.0}),
    "CD163": Protein("mem", {"mac": 0.9}, positive_fraction={"mac": 0.55}),
    "BCL2": Protein("cyto", _on_t_cells(0.8, b=0.45, tum=0.25)),
    "LAG3": Protein("mem", no_signal_distribution=(0.1, 0.5)),
    "EPCAM": Protein("mem", {"tum": 1.0}),
    "CD44": Protein("mem", _on_t_cells(0.5, mac=0.6, fib=0.4, tum=0.35, neu=0.3, b=0.3)),
    "ICOS": Protein("mem", {"treg": 0.6, "cd4": 0.4}),
    "GATA3": Protein("nuc", {"tum": 0.6, "cd4": 0.3, "treg": 0.3}),
    "LGALS3": Protein("cyto", {"mac": 0.9, "tum": 0.55, "neu": 0.3, "fib": 0.15}),
    "ENTPD1": Protein("mem", {"treg": 0.8, "endo": 0.6, "mac": 0.3, "b": 0.3}),
    "CD34": Protein("mem", {"endo": 0.9, "fib": 0.2}, extracellular={"collagen": 0.2}),
    "TIGIT": Protein("mem", no_signal_distribution=(0.12, 0.5)),
    "CDH1": Protein("mem", {"tum": 0.9}),
    "CD40": Protein("mem", {"b": 0.8, "mac": 0.5, "endo": 0.3}),
    "VSIR": Protein("mem", _on_t_cells(0.2, mac=0.6, neu=0.5)),
    "HLA-A": Protein("mem", _on_all_nucleated(0.55, tum=0.3)),  # + interferon response on tumour
    "MPO": Protein("cyto", {"neu": 1.0, "mac": 0.05}),
    "PCNA": Protein("nuc", _on_all_nucleated(0.08, tum=0.45), positive_fraction={"tum": 0.6}),
    "ATM": Protein("nuc", no_signal_distribution=(0.4, 0.6)),
    "TP63": Protein("nuc", {"tum": 0.05}),  # + basal layer (context)
    "IFNG": Protein("cyto", {"cd8": 0.05, "cd4": 0.03}),  # + hot tissue
    "KRT8_18": Protein("cyto", {"tum": 0.5}),  # + luminal layer (context)
    "IDO1": Protein("cyto", no_signal_distribution=(0.15, 0.5)),
    "CD79A": Protein("cyto", {"b": 0.8, "pc": 0.9}),
    "HLA-E": Protein("mem", _on_all_nucleated(0.3, tum=0.5, endo=0.5)),
    "COL4": Protein("mem", {}, extracellular={"basement": 1.0, "collagen": 0.15}),
    "CEACAM": Protein("mem", {"neu": 1.0, "tum": 0.25}),
    # IMC-only
    "S100A4": Protein("cyto", {"fib": 0.8, "mac": 0.5}),
    "FAP": Protein("mem", {"fib": 0.1}),  # + cancer-associated fibroblasts (context)
    "MCAM": Protein("mem", {"endo": 0.8, "fib": 0.15}),
    "CDH11": Protein("mem", {"fib": 0.6}),
    "CA9": Protein("mem", {"tum": 0.02}),  # + hypoxia (context)
    "COL1": Protein("cyto", {"fib": 0.25}, extracellular={"collagen": 1.0}),
    "VCAM1": Protein("mem", {"endo": 0.2, "fib": 0.2}),  # + hot tissue
    "NT5E": Protein("mem", {"tum": 0.4, "fib": 0.3, "endo": 0.3, "b": 0.2}),
    "MMP11": Protein("cyto", {"fib": 0.05}),  # + CAF
    "PDCD1": Protein("mem", {"cd8": 0.2, "cd4": 0.3}, positive_fraction={"cd8": 0.6, "cd4": 0.4}),  # + hot
    "MMP9": Protein("cyto", {"neu": 0.7, "mac": 0.5}),
    "NGFR": Protein("mem", {"fib": 0.25}, positive_fraction={"fib": 0.3}),
    "TCF7": Protein("nuc", {"cd4": 0.6, "cd8": 0.4, "treg": 0.3, "b": 0.1}),
    "MME": Protein("mem", {"fib": 0.3, "neu": 0.5}),
    "PNAD": Protein("mem", {"endo": 0.3}),
    "CD248": Protein("mem", {"fib": 0.6}, extracellular={"collagen": 0.2}),
    "LYVE1": Protein("mem", {"mac": 0.25, "endo": 0.2}, positive_fraction={"mac": 0.3, "endo": 0.3}),
    "PDGFRB": Protein("mem", {"fib": 0.7, "endo": 0.15}, extracellular={"collagen": 0.3}),
    "VWF": Protein("cyto", {"endo": 1.0}),
    "CXCL12": Protein("cyto", {"fib": 0.4, "endo": 0.2}),
    "CCL21": Protein("cyto", {"endo": 0.2, "fib": 0.1}, extracellular={"tzone": 0.5}),
    "CDH6": Protein("mem", {"tum": 0.3}, positive_fraction={"tum": 0.5}),
    "CAV1": Protein("mem", {"endo": 0.8, "fib": 0.4}),
    "FUT4": Protein("mem", {"neu": 1.0, "tum": 0.2}),
}
PROTEIN_KEYS: tuple[str, ...] = tuple(PROTEINS)
NO_SIGNAL_PROTEINS: tuple[str, ...] = tuple(k for k, p in PROTEINS.items() if p.no_signal_distribution is not None)
