"""Synthetic co-registered H&E / CODEX / IMC tissues: the embedded default dataset and test fixture.

`python -m datamodules.synthetic --out DIR --tissues N --size PX --seed S`

Why a generative model rather than noise: every pipeline in the project (ROSIE H&E→CODEX, VirTues
masked multiplex modelling, cell phenotyping, survival analysis) needs data in which the signal it
looks for exists, is imperfect, and has known ground truth. One tissue model is therefore drawn per
tissue and *rendered* into each modality, so all modalities agree pixel for pixel:

* **Tissue model** (`_layout`, `_place_cells`): a tissue-level latent (immune level, tumour
  infiltration, tumour fraction, grade, architecture) sets the composition. Niches: tumour glands
  (epithelial rings around lumens, basal + luminal layer) or solid nests, stroma (spindle
  fibroblasts aligned with collagen fibres), vessels (endothelial lining around a lumen with red
  blood cells), lymphoid aggregates (B-cell core, T-cell rim), scattered and intra-tumoural immune
  cells. Cell types differ in nucleus size, eccentricity, irregularity, lobes, chromatin density and
  texture, cytoplasm amount, eosin and basophilia.
* **H&E** (`_render_he`): hematoxylin / eosin optical densities → RGB by Beer–Lambert with the
  Ruifrok–Johnston stain vectors, per-tissue stain strength, blur and noise.
* **Markers** (`_cell_levels`, `_render_panel`): per-cell protein levels from cell-type profiles,
  context (hypoxia far from vessels, cancer-associated fibroblasts near tumour, basal gland layer,
  interferon response in immune-hot tissue), random subsets and log-normal cell noise; rendered
  with nuclear / membrane / cytoplasmic / extracellular localisation. Proteins measured in both
  panels share their per-cell levels, so CODEX and IMC agree.
* **No-signal markers** (:data:`NO_SIGNAL_PROTEINS`: Ki67, IDO1, ATM, LAG3, TIGIT) are drawn per
  cell independently of type, context and morphology: as in real tissue, some markers cannot be
  predicted from H&E, and a model that "predicts" them reveals leakage.
* **Outcomes** (`_clinical`): a binary `response` and survival (`survival_time` in months,
  `survival_event`) depend on the *measured* CD8 infiltration of tumour (more → better), tumour
  fraction and grade (more → worse), with noise.

Everything is vectorised numpy/scipy except loops over cells and structures (hundreds per tissue).
Each tissue draws from its own `SeedSequence([seed, index])`, so the output is identical for the
same arguments whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from datamodules.command_errors import run_command
from lightning_modules.components.model_files import load_tensor_file

HE_MPP = 0.5
CODEX_MPP = 0.5
IMC_MPP = 1.0
PX_PER_UM = 1.0 / HE_MPP
TILE_SIZE = 128
MIN_TILE_TISSUE = 0.30

#: Unmodified copies of the VirTues example dataset's IMC panel and ESM-2 embeddings (MIT, see
#: ATTRIBUTION.md there). Always read from here so output never depends on `../shared`.
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "imc_example"

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
T = {name: i for i, name in enumerate(TYPE_NAMES)}
_SHORT = {"tum": "Tumor", "cd4": "CD4_T", "cd8": "CD8_T", "treg": "Treg", "b": "B_cell", "pc": "Plasma",
          "mac": "Macrophage", "neu": "Neutrophil", "fib": "Fibroblast", "endo": "Endothelial"}
_T_CELLS = ("cd4", "cd8", "treg")
_NUCLEATED = tuple(_SHORT)

#: niche codes of a cell (cells table column `niche`)
NICHES = ("stroma", "tumor", "gland", "vessel", "lymphoid_aggregate")

# ================================================================================================
# Marker profiles (per protein, shared by both panels)
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class Protein:
    """Where a protein sits and which cells carry it.

    `loc`: "nuc", "mem", "cyto", "whole" or "dna" (follows the chromatin texture: DAPI, H3, Ir).
    `levels`: mean level per cell type (short names, see `_SHORT`); `subset`: per type, the
    fraction of cells that express it (the rest at 10 %), unpredictable from morphology.
    `ecm`: extracellular maps (see `_layout`) and their weight. `random`: (fraction positive,
    log-sd) for no-signal proteins, drawn independently of everything else.
    """

    loc: str
    levels: dict[str, float] = dataclasses.field(default_factory=dict)
    subset: dict[str, float] = dataclasses.field(default_factory=dict)
    ecm: dict[str, float] = dataclasses.field(default_factory=dict)
    random: tuple[float, float] | None = None


def _all(level: float, **over: float) -> dict[str, float]:
    d = {k: level for k in _NUCLEATED}
    d.update(over)
    return d


def _tc(level: float, **over: float) -> dict[str, float]:
    d = {k: level for k in _T_CELLS}
    d.update(over)
    return d


PROTEINS: dict[str, Protein] = {
    "DNA": Protein("dna", _all(1.0)),
    "PTPRC": Protein("mem", _tc(1.0, b=1.0, pc=0.45, mac=0.7, neu=0.6)),
    "CD68": Protein("cyto", {"mac": 1.0, "neu": 0.12}),
    "CD14": Protein("mem", {"mac": 0.8, "neu": 0.25}, subset={"mac": 0.7}),
    "P4HB": Protein("cyto", _all(0.15, pc=1.0, tum=0.5, fib=0.45, mac=0.35, endo=0.3)),
    "FOXP3": Protein("nuc", {"treg": 1.0}),
    "CD8": Protein("mem", {"cd8": 1.0}),
    "HLA-DR": Protein("mem", {"mac": 0.9, "b": 0.9, "pc": 0.2, "endo": 0.25}),  # + tumour in hot tissue
    "KRT": Protein("cyto", {"tum": 1.0}),
    "CD3": Protein("mem", _tc(1.0)),
    "CD4": Protein("mem", {"cd4": 1.0, "treg": 0.9, "mac": 0.3}),
    "ACTA2": Protein("cyto", {"fib": 0.8}, subset={"fib": 0.5}, ecm={"vessel_wall": 1.0, "collagen": 0.3}),
    "PECAM1": Protein("mem", {"endo": 1.0, "mac": 0.1, "neu": 0.1}),
    "VIM": Protein("cyto", _all(0.3, fib=1.0, endo=0.8, mac=0.6, pc=0.2, tum=0.08), ecm={"collagen": 0.45}),
    "CD45RO": Protein("mem", _tc(0.8, cd8=0.6, treg=0.9, mac=0.3), subset=_tc(0.65)),
    "MKI67": Protein("nuc", random=(0.2, 0.5)),
    "MS4A1": Protein("mem", {"b": 1.0}),
    "ITGAX": Protein("mem", {"mac": 0.7, "b": 0.1}),
    "PDPN": Protein("mem", {"fib": 0.6, "endo": 0.15}, subset={"fib": 0.4}, ecm={"collagen": 0.15}),
    "CD274": Protein("mem", {"tum": 0.05, "mac": 0.1}),  # + interferon response (context)
    "GZMB": Protein("cyto", {"cd8": 0.3, "neu": 0.1}, subset={"cd8": 0.5}),  # + hot tissue
    "CD38": Protein("mem", {"pc": 1.0, "b": 0.3, "cd8": 0.2, "cd4": 0.1}),
    "THBD": Protein("mem", {"endo": 0.7, "mac": 0.2}),
    "CR2": Protein("mem", {"b": 0.5}, ecm={"fdc": 1.0}),
    "CD163": Protein("mem", {"mac": 0.9}, subset={"mac": 0.55}),
    "BCL2": Protein("cyto", _tc(0.8, b=0.45, tum=0.25)),
    "LAG3": Protein("mem", random=(0.1, 0.5)),
    "EPCAM": Protein("mem", {"tum": 1.0}),
    "CD44": Protein("mem", _tc(0.5, mac=0.6, fib=0.4, tum=0.35, neu=0.3, b=0.3)),
    "ICOS": Protein("mem", {"treg": 0.6, "cd4": 0.4}),
    "GATA3": Protein("nuc", {"tum": 0.6, "cd4": 0.3, "treg": 0.3}),
    "LGALS3": Protein("cyto", {"mac": 0.9, "tum": 0.55, "neu": 0.3, "fib": 0.15}),
    "ENTPD1": Protein("mem", {"treg": 0.8, "endo": 0.6, "mac": 0.3, "b": 0.3}),
    "CD34": Protein("mem", {"endo": 0.9, "fib": 0.2}, ecm={"collagen": 0.2}),
    "TIGIT": Protein("mem", random=(0.12, 0.5)),
    "CDH1": Protein("mem", {"tum": 0.9}),
    "CD40": Protein("mem", {"b": 0.8, "mac": 0.5, "endo": 0.3}),
    "VSIR": Protein("mem", _tc(0.2, mac=0.6, neu=0.5)),
    "HLA-A": Protein("mem", _all(0.55, tum=0.3)),  # + interferon response on tumour
    "MPO": Protein("cyto", {"neu": 1.0, "mac": 0.05}),
    "PCNA": Protein("nuc", _all(0.08, tum=0.45), subset={"tum": 0.6}),
    "ATM": Protein("nuc", random=(0.4, 0.6)),
    "TP63": Protein("nuc", {"tum": 0.05}),  # + basal layer (context)
    "IFNG": Protein("cyto", {"cd8": 0.05, "cd4": 0.03}),  # + hot tissue
    "KRT8_18": Protein("cyto", {"tum": 0.5}),  # + luminal layer (context)
    "IDO1": Protein("cyto", random=(0.15, 0.5)),
    "CD79A": Protein("cyto", {"b": 0.8, "pc": 0.9}),
    "HLA-E": Protein("mem", _all(0.3, tum=0.5, endo=0.5)),
    "COL4": Protein("mem", {}, ecm={"basement": 1.0, "collagen": 0.15}),
    "CEACAM": Protein("mem", {"neu": 1.0, "tum": 0.25}),
    # IMC-only
    "S100A4": Protein("cyto", {"fib": 0.8, "mac": 0.5}),
    "FAP": Protein("mem", {"fib": 0.1}),  # + cancer-associated fibroblasts (context)
    "MCAM": Protein("mem", {"endo": 0.8, "fib": 0.15}),
    "CDH11": Protein("mem", {"fib": 0.6}),
    "CA9": Protein("mem", {"tum": 0.02}),  # + hypoxia (context)
    "COL1": Protein("cyto", {"fib": 0.25}, ecm={"collagen": 1.0}),
    "VCAM1": Protein("mem", {"endo": 0.2, "fib": 0.2}),  # + hot tissue
    "NT5E": Protein("mem", {"tum": 0.4, "fib": 0.3, "endo": 0.3, "b": 0.2}),
    "MMP11": Protein("cyto", {"fib": 0.05}),  # + CAF
    "PDCD1": Protein("mem", {"cd8": 0.2, "cd4": 0.3}, subset={"cd8": 0.6, "cd4": 0.4}),  # + hot
    "MMP9": Protein("cyto", {"neu": 0.7, "mac": 0.5}),
    "NGFR": Protein("mem", {"fib": 0.25}, subset={"fib": 0.3}),
    "TCF7": Protein("nuc", {"cd4": 0.6, "cd8": 0.4, "treg": 0.3, "b": 0.1}),
    "MME": Protein("mem", {"fib": 0.3, "neu": 0.5}),
    "PNAD": Protein("mem", {"endo": 0.3}),
    "CD248": Protein("mem", {"fib": 0.6}, ecm={"collagen": 0.2}),
    "LYVE1": Protein("mem", {"mac": 0.25, "endo": 0.2}, subset={"mac": 0.3, "endo": 0.3}),
    "PDGFRB": Protein("mem", {"fib": 0.7, "endo": 0.15}, ecm={"collagen": 0.3}),
    "VWF": Protein("cyto", {"endo": 1.0}),
    "CXCL12": Protein("cyto", {"fib": 0.4, "endo": 0.2}),
    "CCL21": Protein("cyto", {"endo": 0.2, "fib": 0.1}, ecm={"tzone": 0.5}),
    "CDH6": Protein("mem", {"tum": 0.3}, subset={"tum": 0.5}),
    "CAV1": Protein("mem", {"endo": 0.8, "fib": 0.4}),
    "FUT4": Protein("mem", {"neu": 1.0, "tum": 0.2}),
}
PROTEIN_KEYS: tuple[str, ...] = tuple(PROTEINS)
NO_SIGNAL_PROTEINS: tuple[str, ...] = tuple(k for k, p in PROTEINS.items() if p.random is not None)

# ------------------------------------------------------------------------------------------------
# CODEX: ROSIE's 50-marker panel (paper Methods, order of prevalence)
# ------------------------------------------------------------------------------------------------
#: (channel name exactly as in the ROSIE paper, UniProt accession or None, protein key).
#: Accessions are the human canonical entries of the named gene. Conventions, for the ambiguous:
#: * antibody cocktails take one accession, as the VirTues example panel does: PanCK → P02533
#:   (KRT14, the VirTues example's choice for its pan-cytokeratin channel), Keratin8/18 → P05787
#:   (KRT8), CollagenIV → P02462 (COL4A1);
#: * None where no single protein can be named with confidence: DAPI (a dye), CD45RO (an isoform of
#:   PTPRC whose accession suffix we do not assert; CD45 holds the canonical P08575), CD66 (a
#:   CEACAM-family antibody whose member is not stated).
CODEX_PANEL: tuple[tuple[str, str | None, str], ...] = (
    ("DAPI", None, "DNA"),
    ("CD45", "P08575", "PTPRC"),
    ("CD68", "P34810", "CD68"),
    ("CD14", "P08571", "CD14"),
    ("PDI", "P07237", "P4HB"),
    ("FoxP3", "Q9BZS1", "FOXP3"),
    ("CD8", "P01732", "CD8"),
    ("HLA-DR", "P01903", "HLA-DR"),
    ("PanCK", "P02533", "KRT"),
    ("CD3e", "P07766", "CD3"),
    ("CD4", "P01730", "CD4"),
    ("aSMA", "P62736", "ACTA2"),
    ("CD31", "P16284", "PECAM1"),
    ("Vimentin", "P08670", "VIM"),
    ("CD45RO", None, "CD45RO"),
    ("Ki67", "P46013", "MKI67"),
    ("CD20", "P11836", "MS4A1"),
    ("CD11c", "P20702", "ITGAX"),
    ("Podoplanin", "Q86YL7", "PDPN"),
    ("PDL1", "Q9NZQ7", "CD274"),
    ("GranzymeB", "P10144", "GZMB"),
    ("CD38", "P28907", "CD38"),
    ("CD141", "P07204", "THBD"),
    ("CD21", "P20023", "CR2"),
    ("CD163", "Q86VB7", "CD163"),
    ("BCL2", "P10415", "BCL2"),
    ("LAG3", "P18627", "LAG3"),
    ("EpCAM", "P16422", "EPCAM"),
    ("CD44", "P16070", "CD44"),
    ("ICOS", "Q9Y6W8", "ICOS"),
    ("GATA3", "P23771", "GATA3"),
    ("Gal3", "P17931", "LGALS3"),
    ("CD39", "P49961", "ENTPD1"),
    ("CD34", "P28906", "CD34"),
    ("TIGIT", "Q495A1", "TIGIT"),
    ("ECad", "P12830", "CDH1"),
    ("CD40", "P25942", "CD40"),
    ("VISTA", "Q9H7M9", "VSIR"),
    ("HLA-A", "P04439", "HLA-A"),
    ("MPO", "P05164", "MPO"),
    ("PCNA", "P12004", "PCNA"),
    ("ATM", "Q13315", "ATM"),
    ("TP63", "Q9H3D4", "TP63"),
    ("IFNg", "P01579", "IFNG"),
    ("Keratin8/18", "P05787", "KRT8_18"),
    ("IDO1", "P14902", "IDO1"),
    ("CD79a", "P11912", "CD79A"),
    ("HLA-E", "P13747", "HLA-E"),
    ("CollagenIV", "P02462", "COL4"),
    ("CD66", None, "CEACAM"),
)
CODEX_CHANNELS: tuple[str, ...] = tuple(c for c, _, _ in CODEX_PANEL)
#: CODEX markers without any morphological signal (names as in the panel).
CODEX_NO_SIGNAL: tuple[str, ...] = tuple(c for c, _, k in CODEX_PANEL if k in NO_SIGNAL_PROTEINS)
_CODEX_NUCLEAR = {"DNA", "FOXP3", "MKI67", "GATA3", "PCNA", "ATM", "TP63"}

#: IMC channel (VirTues example panel, `assets/imc_example/channels.parquet`) → protein key.
IMC_PROTEIN: dict[str, str] = {
    "MPO": "MPO", "S100": "S100A4", "SMA": "ACTA2", "H3": "DNA", "FAP": "FAP", "HLA-DR": "HLA-DR",
    "CD146": "MCAM", "CDH11": "CDH11", "CA9": "CA9", "Collagen I+Fibronectin": "COL1", "VCAM1": "VCAM1",
    "CD20": "MS4A1", "CD68": "CD68", "IDO": "IDO1", "CD3e": "CD3", "PDN": "PDPN", "MMP11": "MMP11",
    "PD-1": "PDCD1", "CD73": "NT5E", "MMP9": "MMP9", "p75": "NGFR", "TCF1/TCF7": "TCF7", "CD10": "MME",
    "VIM": "VIM", "FOXP3": "FOXP3", "CD45RA+CD45RO": "PTPRC", "PNAd": "PNAD", "CD8": "CD8",
    "CD248": "CD248", "LYVE-1": "LYVE1", "PDGFRB": "PDGFRB", "CD34": "CD34", "CD4": "CD4",
    "CD31+vWF": "VWF", "CXCL12": "CXCL12", "CCL21": "CCL21", "panCK": "KRT", "CDH6": "CDH6",
    "Iridium": "DNA", "Iridium (V2)": "DNA", "Ki-67": "MKI67", "CAV1": "CAV1", "CD15": "FUT4",
}
_IMC_GAIN_OVERRIDE = {"Iridium": 3.0, "Iridium (V2)": 6.0, "H3": 0.8}


def codex_channels_table() -> pd.DataFrame:
    """The CODEX channel table written to `codex/channels.parquet`."""
    return pd.DataFrame({
        "channel_name": list(CODEX_CHANNELS),
        "uniprot_id": pd.array([u for _, u, _ in CODEX_PANEL], dtype="string"),
        "is_nuclear_marker": [k in _CODEX_NUCLEAR for _, _, k in CODEX_PANEL],
        "qc_pass": True,
        "no_morphological_signal": [k in NO_SIGNAL_PROTEINS for _, _, k in CODEX_PANEL],
    })


def imc_channels_table() -> pd.DataFrame:
    """The real IMC panel (shipped copy), columns unchanged, plus `no_morphological_signal`."""
    path = ASSETS_DIR / "channels.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the shipped IMC panel is missing; restore datamodules/assets/imc_example from git")
    df = pd.read_parquet(path)
    unknown = [c for c in df["channel_name"] if c not in IMC_PROTEIN]
    if unknown:
        raise ValueError(f"{path}: channels {unknown} have no protein mapping in datamodules.synthetic.IMC_PROTEIN")
    df = df.copy()
    df["no_morphological_signal"] = [IMC_PROTEIN[c] in NO_SIGNAL_PROTEINS for c in df["channel_name"]]
    return df


def he_channels_table() -> pd.DataFrame:
    return pd.DataFrame({"channel_name": ["R", "G", "B"], "uniprot_id": pd.array([None] * 3, dtype="string"),
                         "is_nuclear_marker": False, "qc_pass": True})


# ================================================================================================
# Random fields
# ================================================================================================


def _grf(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean unit-sd Gaussian random field with Gaussian correlation of `sigma` px (periodic)."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    spec = np.fft.rfft2(noise) * np.exp(-2.0 * (math.pi * sigma) ** 2 * (fy**2 + fx**2))
    f = np.fft.irfft2(spec, s=shape)
    f -= f.mean()
    sd = f.std()
    return (f / sd if sd > 0 else f).astype(np.float32)


def _fibre_field(rng: np.random.Generator, shape: tuple[int, int], theta: np.ndarray) -> np.ndarray:
    """Collagen-like fibres in [0, 1] that follow the orientation field `theta` (radians).

    Four oriented line kernels (FFT convolution) blended by cos⁴ of the angle difference: a cheap,
    vectorised stand-in for line-integral convolution.
    """
    noise = rng.standard_normal(shape).astype(np.float32)
    half = 15
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    out = np.zeros(shape, np.float32)
    wsum = np.zeros(shape, np.float32)
    for alpha in np.arange(4) * (math.pi / 4):
        par = xx * math.cos(alpha) + yy * math.sin(alpha)
        perp = -xx * math.sin(alpha) + yy * math.cos(alpha)
        k = np.exp(-(perp**2) / (2 * 0.9**2) - par**2 / (2 * 7.0**2))
        f = signal.fftconvolve(noise, k / np.sqrt((k**2).sum()), mode="same").astype(np.float32)
        w = np.cos(theta - alpha) ** 4
        out += w * f
        wsum += w
    out /= wsum
    out /= max(float(out.std()), 1e-6)
    return (1.0 / (1.0 + np.exp(-2.5 * (out - 0.3)))).astype(np.float32)


# ================================================================================================
# Tissue model
# ================================================================================================


@dataclasses.dataclass
class Latent:
    """Tissue-level latent variables: they set composition, and through it, the outcome."""

    immune: float  # overall immune density in [0, 1]
    infiltration: float  # fraction of T cells that enter tumour, [0, 1]
    tumour_fraction: float
    grade: int  # 1..3, pleomorphism of tumour nuclei
    glandular: bool
    neutrophil: float
    stain_h: float
    stain_e: float

    @property
    def phenotype(self) -> str:
        if self.immune < 0.3:
            return "desert"
        return "inflamed" if self.infiltration >= 0.5 else "excluded"


def _draw_latent(rng: np.random.Generator) -> Latent:
    return Latent(
        immune=float(rng.uniform(0.0, 1.0)),
        infiltration=float(rng.uniform(0.0, 1.0)),
        tumour_fraction=float(rng.uniform(0.2, 0.65)),
        grade=int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])),
        glandular=bool(rng.uniform() < 0.55),
        neutrophil=float(rng.beta(1.5, 4.0)),
        stain_h=float(rng.uniform(0.85, 1.15)),
        stain_e=float(rng.uniform(0.8, 1.2)),
    )


@dataclasses.dataclass
class Cells:
    """Cell attributes (positions in px at 0.5 µm/px); built by appending structure by structure."""

    y: list[np.ndarray] = dataclasses.field(default_factory=list)
    x: list[np.ndarray] = dataclasses.field(default_factory=list)
    type: list[np.ndarray] = dataclasses.field(default_factory=list)
    angle: list[np.ndarray] = dataclasses.field(default_factory=list)  # NaN: random
    niche: list[np.ndarray] = dataclasses.field(default_factory=list)
    layer: list[np.ndarray] = dataclasses.field(default_factory=list)  # 0 luminal / inner, 1 basal / outer, -1 n/a

    def add(self, y, x, types, niche: int, angle=None, layer=None) -> None:  # type: ignore[no-untyped-def]
        n = len(y)
        self.y.append(np.asarray(y, np.float64))
        self.x.append(np.asarray(x, np.float64))
        self.type.append(np.broadcast_to(np.asarray(types, np.int64), (n,)).copy())
        self.angle.append(np.full(n, np.nan) if angle is None else np.asarray(angle, np.float64))
        self.niche.append(np.full(n, niche, np.int64))
        self.layer.append(np.full(n, -1, np.int64) if layer is None else np.asarray(layer, np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.y:
            return {k: np.zeros(0) for k in ("y", "x", "type", "angle", "niche", "layer")}
        return {k: np.concatenate(getattr(self, k)) for k in ("y", "x", "type", "angle", "niche", "layer")}


def _jittered_grid(rng: np.random.Generator, shape: tuple[int, int], spacing: float, jitter: float = 0.3) -> np.ndarray:
    """Hexagonal grid points (y, x) with uniform jitter: dense packing without overlaps."""
    dy = spacing * 0.866
    oy, ox = rng.uniform(0, dy), rng.uniform(0, spacing)
    ys = np.arange(oy, shape[0], dy)
    pts = []
    for i, y in enumerate(ys):
        xs = np.arange(ox + (spacing / 2) * (i % 2), shape[1], spacing)
        pts.append(np.stack([np.full_like(xs, y), xs], 1))
    p = np.concatenate(pts) if pts else np.zeros((0, 2))
    p = p + rng.uniform(-jitter * spacing, jitter * spacing, p.shape)
    ok = (p[:, 0] >= 0) & (p[:, 0] < shape[0] - 0.5) & (p[:, 1] >= 0) & (p[:, 1] < shape[1] - 0.5)
    return p[ok]


def _at(mask: np.ndarray, pts: np.ndarray) -> np.ndarray:
    iy = np.clip(np.round(pts[:, 0]).astype(int), 0, mask.shape[0] - 1)
    ix = np.clip(np.round(pts[:, 1]).astype(int), 0, mask.shape[1] - 1)
    return mask[iy, ix]


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """(window, boolean disc inside it) for a disc that may cross the border."""
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, shape[0])
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, shape[1])
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _ring(shape: tuple[int, int], cy: float, cx: float, r_in: float, r_out: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """(window, boolean annulus r_in < r <= r_out inside it)."""
    win, outer = _disc(shape, cy, cx, r_out)
    yy, xx = np.ogrid[win[0], win[1]]
    return win, outer & ((yy - cy) ** 2 + (xx - cx) ** 2 > r_in * r_in)


def _dart_throw(rng: np.random.Generator, allowed: np.ndarray, radii: np.ndarray, gap: float,
                tries: int = 40) -> list[tuple[float, float, float, int]]:
    """Non-overlapping discs (cy, cx, r, index into `radii`) centred on `allowed` pixels.

    Radii are tried in the given order (pass them large first), `tries` random centres each.
    """
    idx = np.flatnonzero(allowed.ravel())
    placed: list[tuple[float, float, float, int]] = []
    if idx.size == 0:
        return placed
    for i, r in enumerate(radii):
        for _ in range(tries):
            k = idx[rng.integers(idx.size)]
            cy, cx = divmod(int(k), allowed.shape[1])
            cy, cx = cy + rng.uniform(-0.5, 0.5), cx + rng.uniform(-0.5, 0.5)
            if all((cy - oy) ** 2 + (cx - ox) ** 2 >= (r + orr + gap) ** 2 for oy, ox, orr, _ in placed):
                placed.append((cy, cx, float(r), i))
                break
    return placed


@dataclasses.dataclass
class Layout:
    """Regions (boolean, 0.5 µm/px), extracellular maps and the placed cells of one tissue."""

    tissue: np.ndarray
    tumour: np.ndarray  # tumour niche: gland discs or solid nests
    gland_lumen: np.ndarray
    vessel_lumen: np.ndarray
    aggregate: np.ndarray
    rbc: np.ndarray  # red blood cell OD map
    maps: dict[str, np.ndarray]  # collagen, basement, vessel_wall, fdc, tzone
    theta: np.ndarray
    cells: dict[str, np.ndarray]
    vessels: list[tuple[float, float, float]]


def _thin(pts: np.ndarray, radius: np.ndarray, prev_pts: np.ndarray, prev_r: np.ndarray, factor: float = 0.9) -> np.ndarray:
    """Keep-mask dropping candidates closer than factor·(r_i + r_j) to a previous or earlier candidate."""
    keep = np.ones(len(pts), bool)
    if len(pts) == 0:
        return keep
    if len(prev_pts):
        d, j = cKDTree(prev_pts).query(pts)
        keep &= d >= factor * (radius + prev_r[j])
    tree = cKDTree(pts)
    pairs = tree.query_pairs(r=factor * 2 * float(radius.max()), output_type="ndarray")
    if len(pairs):
        d = np.linalg.norm(pts[pairs[:, 0]] - pts[pairs[:, 1]], axis=1)
        bad = pairs[d < factor * (radius[pairs[:, 0]] + radius[pairs[:, 1]])]
        keep[np.unique(bad.max(axis=1))] = False
    return keep


def _choose(rng: np.random.Generator, n: int, probs: dict[str, float]) -> np.ndarray:
    names = list(probs)
    p = np.array([probs[k] for k in names], np.float64)
    return np.array([T[_SHORT[k]] for k in names])[rng.choice(len(names), size=n, p=p / p.sum())]


def _layout(rng: np.random.Generator, size: int, lat: Latent) -> Layout:
    """Place niches and cells of one tissue (everything in px at 0.5 µm/px)."""
    shape = (size, size)
    u = PX_PER_UM
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # --- tissue region: smooth field + a ramp so that background sits at one side ---
    phi = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - size / 2) * math.cos(phi) + (yy - size / 2) * math.sin(phi)) / size
    field = _grf(rng, shape, size / 6) + 3.0 * ramp
    coverage = rng.uniform(0.72, 0.9)
    tissue = field > np.quantile(field, 1 - coverage)
    tissue = ndimage.binary_opening(tissue, iterations=3)
    tissue = ndimage.binary_fill_holes(tissue)
    lab, n = ndimage.label(tissue)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        tissue = lab == sizes.argmax()

    # --- tumour compartment ---
    tf = _grf(rng, shape, size / 9)
    inside = tf[tissue]
    thr = np.quantile(inside, 1 - lat.tumour_fraction) if inside.size else 0.0
    tumour_zone = tissue & (tf > thr)
    cells = Cells()
    tumour = np.zeros(shape, bool)
    gland_lumen = np.zeros(shape, bool)
    basement = np.zeros(shape, np.float32)
    cell_h, cell_w = 10.0 * u, 8.5 * u  # epithelial cell height (radial) and width
    immune, infil = lat.immune, lat.infiltration
    p_intra = 0.01 + 0.35 * immune * infil  # immune cells replacing tumour cells
    intra_mix = {"cd8": 0.55, "cd4": 0.15, "treg": 0.05, "mac": 0.2, "neu": 0.05}

    if lat.glandular:
        n_try = int(40 * (size / 512) ** 2) + 4
        layers_of = rng.choice([1, 2], size=n_try, p=[0.6, 0.4])
        lumen_r = rng.uniform(5, 15, size=n_try) * u
        outer = lumen_r + layers_of * cell_h
        order = np.argsort(-outer)
        glands = _dart_throw(rng, tumour_zone & ndimage.binary_erosion(tissue, iterations=int(8 * u)),
                             outer[order], gap=6 * u)
        for cy, cx, R, k in glands:
            i = order[k]
            rl, nl = lumen_r[i], int(layers_of[i])
            win, disc = _disc(shape, cy, cx, R)
            tumour[win] |= disc
            win, ldisc = _disc(shape, cy, cx, rl)
            gland_lumen[win] |= ldisc
            for layer in range(nl):
                rho = rl + (layer + 0.5) * cell_h
                k = max(int(2 * math.pi * rho / cell_w), 5)
                ang = rng.uniform(0, 2 * math.pi) + np.arange(k) * (2 * math.pi / k) + rng.normal(0, 0.04, k)
                rr = rho + rng.normal(0, 0.6 * u, k)
                ty = np.full(k, T["Tumor"])
                swap = rng.uniform(size=k) < p_intra * 0.5
                ty[swap] = _choose(rng, int(swap.sum()), intra_mix)
                basal = np.full(k, 1 if (nl == 2 and layer == 1) else 0)
                cells.add(cy + rr * np.sin(ang), cx + rr * np.cos(ang), ty, NICHES.index("gland"), angle=ang, layer=basal)
            # basement membrane: thin ring just outside the gland
            win, ring = _ring(shape, cy, cx, R, R + 1.5 * u)
            basement[win] = np.maximum(basement[win], ring.astype(np.float32))
        tumour &= tissue
    else:
        tumour = ndimage.binary_opening(tumour_zone, iterations=4)
        pts = _jittered_grid(rng, shape, 10.5 * u, 0.22)
        pts = pts[_at(tumour, pts)]
        ty = np.full(len(pts), T["Tumor"])
        swap = rng.uniform(size=len(pts)) < p_intra
        ty[swap] = _choose(rng, int(swap.sum()), intra_mix)
        # nest periphery = basal-like layer
        edge = ndimage.distance_transform_edt(tumour)
        layer = (_at(edge, pts) < 9 * u).astype(np.int64)
        cells.add(pts[:, 0], pts[:, 1], ty, NICHES.index("tumor"), layer=layer)
        bm = tumour & ~ndimage.binary_erosion(tumour, iterations=int(1.5 * u))
        basement = np.maximum(basement, ndimage.binary_dilation(bm, iterations=1).astype(np.float32) * ~tumour + bm)

    # --- lymphoid aggregates (stroma, away from tumour) ---
    free = tissue & ~ndimage.binary_dilation(tumour, iterations=int(8 * u))
    n_agg = int(rng.poisson(immune * 1.6 * (size / 512) ** 2 + (0.3 if immune > 0.6 else 0.0)))
    agg_r = np.sort(rng.uniform(22, 45, size=n_agg) * u)[::-1]
    aggs = _dart_throw(rng, free & ndimage.binary_erosion(tissue, iterations=int(10 * u)), agg_r, gap=10 * u)
    aggregate = np.zeros(shape, bool)
    fdc = np.zeros(shape, np.float32)
    tzone = np.zeros(shape, np.float32)
    net = np.clip(_grf(rng, shape, 1.5), 0, None)
    for cy, cx, R, _ in aggs:
        win, disc = _disc(shape, cy, cx, R)
        aggregate[win] |= disc
        _, rim = _ring(shape, cy, cx, 0.6 * R, R)
        fdc[win] = np.maximum(fdc[win], (disc & ~rim).astype(np.float32))
        tzone[win] = np.maximum(tzone[win], rim.astype(np.float32))
    aggregate &= tissue
    fdc = fdc * (0.3 + net) * aggregate
    tzone = tzone * aggregate
    if aggs:
        pts = _jittered_grid(rng, shape, 6.8 * u, 0.12)
        pts = pts[_at(aggregate, pts) & (rng.uniform(size=len(pts)) < 0.93)]
        centres = np.array([(c[0], c[1]) for c in aggs])
        radii = np.array([c[2] for c in aggs])
        d, j = cKDTree(centres).query(pts)
        rel = d / radii[j]
        ty = np.where(rel < 0.6,
                      _choose(rng, len(pts), {"b": 0.85, "cd4": 0.07, "mac": 0.04, "treg": 0.02, "cd8": 0.02}),
                      _choose(rng, len(pts), {"cd4": 0.52, "cd8": 0.24, "treg": 0.08, "b": 0.1, "mac": 0.04, "pc": 0.02}))
        cells.add(pts[:, 0], pts[:, 1], ty, NICHES.index("lymphoid_aggregate"))

    # --- vessels (stroma) ---
    area_um2 = float(tissue.sum()) / u**2
    n_ves = int(rng.poisson(area_um2 / 5500.0))
    ves_r = np.sort(rng.uniform(3.0, 11.0, size=n_ves) * u)[::-1]
    vfree = tissue & ~ndimage.binary_dilation(tumour, iterations=int(3 * u)) & ~aggregate
    vessels = _dart_throw(rng, vfree & ndimage.binary_erosion(tissue, iterations=int(6 * u)), ves_r + 4 * u, gap=8 * u)
    vessels = [(cy, cx, R - 4 * u) for cy, cx, R, _ in vessels]
    vessel_lumen = np.zeros(shape, bool)
    vessel_wall = np.zeros(shape, np.float32)
    rbc = np.zeros(shape, np.float32)
    rbc_r = 3.7 * u
    for cy, cx, rv in vessels:
        win, disc = _disc(shape, cy, cx, rv)
        vessel_lumen[win] |= disc
        rho = rv + 1.3 * u
        k = max(int(2 * math.pi * rho / (11 * u)), 2)
        ang = rng.uniform(0, 2 * math.pi) + np.arange(k) * (2 * math.pi / k)
        cells.add(cy + rho * np.sin(ang), cx + rho * np.cos(ang), T["Endothelial"], NICHES.index("vessel"),
                  angle=ang + math.pi / 2)
        win, ring = _ring(shape, cy, cx, rv + 2.5 * u, rv + (5.5 if rv > 6 * u else 3.5) * u)
        vessel_wall[win] = np.maximum(vessel_wall[win], ring.astype(np.float32))
        basement[win] = np.maximum(basement[win], ring.astype(np.float32) * 0.7)
        n_rbc = int(rng.poisson(0.6 * (rv / rbc_r) ** 2 + 0.5))
        for _ in range(n_rbc):
            rr = rng.uniform(0, max(rv - rbc_r * 0.7, 0.5))
            a = rng.uniform(0, 2 * math.pi)
            ry, rx = cy + rr * math.sin(a), cx + rr * math.cos(a)
            w2, d2 = _disc(shape, ry, rx, rbc_r)
            yy2, xx2 = np.ogrid[w2[0], w2[1]]
            rel = np.sqrt((yy2 - ry) ** 2 + (xx2 - rx) ** 2) / rbc_r
            val = np.where(d2, 0.55 + 0.35 * rel**2, 0.0).astype(np.float32)
            rbc[w2] = np.maximum(rbc[w2], val)
    rbc *= vessel_lumen
    vessel_wall *= tissue

    # --- stroma: fibroblasts along fibres, scattered immune cells ---
    theta = (_grf(rng, shape, size / 7) * 1.2).astype(np.float32)
    collagen = _fibre_field(rng, shape, theta)
    ves_excl = np.zeros(shape, bool)
    for cy, cx, rv in vessels:
        win, disc = _disc(shape, cy, cx, rv + 4.5 * u)
        ves_excl[win] |= disc
    stroma = tissue & ~tumour & ~aggregate & ~ves_excl & ~gland_lumen
    pts = _jittered_grid(rng, shape, 8.5 * u, 0.3)
    pts = pts[_at(stroma, pts)]
    d_tum = ndimage.distance_transform_edt(~tumour) / u if tumour.any() else np.full(shape, 1e3, np.float32)
    dt = _at(d_tum, pts)
    near = np.exp(-dt / 25.0)
    if lat.phenotype == "excluded":
        margin = np.exp(-((dt - 20.0) ** 2) / (2 * 12.0**2))
        p_imm = 0.04 + 0.25 * immune + 0.45 * immune * margin
    else:
        p_imm = 0.04 + 0.3 * immune + 0.25 * immune * infil * near
    p_fib = np.full(len(pts), 0.36)
    r = rng.uniform(size=len(pts))
    is_imm = r < p_imm
    is_fib = (~is_imm) & (r < p_imm + p_fib)
    t_share = 0.25 + 0.5 * immune
    mix = {"cd4": 0.45 * t_share, "cd8": 0.4 * t_share, "treg": 0.15 * t_share, "b": 0.05, "pc": 0.08,
           "mac": 0.2, "neu": 0.04 + 0.25 * lat.neutrophil}
    ty = np.where(is_imm, _choose(rng, len(pts), mix), T["Fibroblast"])
    keep = is_imm | is_fib
    ang = np.where(ty == T["Fibroblast"], _at(theta, pts) + rng.normal(0, 0.15, len(pts)), np.nan)
    cells.add(pts[keep, 0], pts[keep, 1], ty[keep], NICHES.index("stroma"), angle=ang[keep])

    arr = cells.arrays()
    # drop overlapping candidates (structures were added first, so they win)
    rad = np.array([0.4 * (t.nucleus[0] + t.nucleus[1]) for t in CELL_TYPES])[arr["type"].astype(int)] * u
    pts = np.stack([arr["y"], arr["x"]], 1)
    keep = _thin(pts, rad, np.zeros((0, 2)), np.zeros(0), factor=0.9)
    keep &= _at(tissue, pts)
    arr = {k: v[keep] for k, v in arr.items()}
    # collagen fibres (and the fibroblast processes along them) exist in stroma only
    stroma_region = tissue & ~tumour & ~aggregate & ~gland_lumen & ~vessel_lumen
    maps = {"collagen": collagen * stroma_region, "basement": np.clip(basement, 0, 1) * tissue, "vessel_wall": vessel_wall,
            "fdc": fdc.astype(np.float32), "tzone": tzone.astype(np.float32)}
    return Layout(tissue=tissue, tumour=tumour, gland_lumen=gland_lumen & tumour, vessel_lumen=vessel_lumen & tissue,
                  aggregate=aggregate, rbc=rbc, maps=maps, theta=theta, cells=arr, vessels=vessels)


# ================================================================================================
# Cell geometry: nuclei, bodies, compartments
# ================================================================================================


@dataclasses.dataclass
class Geometry:
    nucleus: np.ndarray  # int32 label image of nuclei (= cell id)
    cell: np.ndarray  # int32 label image of whole cells
    membrane: np.ndarray  # bool
    chromatin: np.ndarray  # float32 chromatin density (H OD before staining strength), 0 outside nuclei
    nucleus_area: np.ndarray  # px, index = cell id
    cell_type: np.ndarray  # index = cell id (0: background = -1)


def _paint_cells(rng: np.random.Generator, lay: Layout, lat: Latent) -> tuple[Geometry, dict[str, np.ndarray]]:
    """Rasterise nuclei (ellipses with harmonics, or lobes) and grow cytoplasm (nearest nucleus)."""
    shape = lay.tissue.shape
    u = PX_PER_UM
    c = lay.cells
    n = len(c["y"])
    types = c["type"].astype(int)
    spec = [CELL_TYPES[t] for t in types]
    pleo = np.where(types == T["Tumor"], 0.7 + 0.3 * (lat.grade - 1), 1.0)
    cv = np.array([s.size_cv for s in spec]) * pleo
    scale = np.exp(rng.normal(0, 1, n) * cv) * np.where(types == T["Tumor"], 0.9 + 0.08 * lat.grade, 1.0)
    a = np.array([s.nucleus[0] for s in spec]) * scale * u
    b = np.array([s.nucleus[1] for s in spec]) * scale * np.exp(rng.normal(0, 0.06, n)) * u
    b = np.minimum(a, b)
    ang = np.where(np.isnan(c["angle"]), rng.uniform(0, math.pi, n), c["angle"])
    irr = np.array([s.irregularity for s in spec]) * pleo
    harm = rng.uniform(0.3, 1.0, (n, 3)) * irr[:, None] * np.array([1.0, 0.6, 0.4])
    phase = rng.uniform(0, 2 * math.pi, (n, 3))
    lobes = np.array([s.lobes for s in spec])
    chrom_cell = np.array([s.chromatin for s in spec]) * np.exp(rng.normal(0, 0.1, n))
    chrom_cell = np.where(types == T["Tumor"], chrom_cell * (0.9 + 0.1 * lat.grade), chrom_cell)

    label = np.zeros(shape, np.int32)
    rel_map = np.zeros(shape, np.float32)
    nucleoli = np.zeros(shape, np.float32)
    for i in range(n):
        cy, cx = c["y"][i], c["x"][i]
        R = a[i] * (1 + 2 * irr[i]) + 3
        y0, y1 = max(int(cy - R), 0), min(int(cy + R) + 2, shape[0])
        x0, x1 = max(int(cx - R), 0), min(int(cx + R) + 2, shape[1])
        if y1 <= y0 or x1 <= x0:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        ca, sa = math.cos(ang[i]), math.sin(ang[i])
        pu = dx * ca + dy * sa
        pv = -dx * sa + dy * ca
        if lobes[i] > 1:
            rl = b[i] * 0.5
            rel = np.full(pu.shape, np.inf, np.float32)
            for j in range(lobes[i]):
                o = (j - (lobes[i] - 1) / 2) * rl * 1.55
                ov = 0.45 * rl * (2 * abs(j - (lobes[i] - 1) / 2) - 1)
                rel = np.minimum(rel, np.sqrt((pu - o) ** 2 + (pv - ov) ** 2) / rl)
        else:
            nu, nv = pu / a[i], pv / b[i]
            rr = np.sqrt(nu**2 + nv**2)
            th = np.arctan2(nv, nu)
            bound = 1 + harm[i, 0] * np.cos(2 * th + phase[i, 0]) + harm[i, 1] * np.cos(3 * th + phase[i, 1]) \
                + harm[i, 2] * np.cos(5 * th + phase[i, 2])
            rel = rr / bound
        win = label[y0:y1, x0:x1]
        free = (rel <= 1.0) & (win == 0)
        win[free] = i + 1
        rel_map[y0:y1, x0:x1][free] = rel[free]
        if types[i] == T["Tumor"]:
            for _ in range(1 + int(rng.uniform() < 0.3 * lat.grade)):
                ou, ov = rng.uniform(-0.35, 0.35) * a[i], rng.uniform(-0.35, 0.35) * b[i]
                rn = (0.6 + 0.15 * lat.grade) * u
                dot = ((pu - ou) ** 2 + (pv - ov) ** 2 <= rn * rn) & free
                nucleoli[y0:y1, x0:x1][dot] = 0.55

    # drop cells whose nucleus was (almost) painted over, relabel 1..n
    counts = np.bincount(label.ravel(), minlength=n + 1)
    valid = counts[1:] >= max(4, int(1.0 * u * u))
    new_id = np.zeros(n + 1, np.int32)
    new_id[1:][valid] = np.arange(1, int(valid.sum()) + 1, dtype=np.int32)
    label = new_id[label]
    keep = np.flatnonzero(valid)
    nucleus_area = np.concatenate([[0], counts[1:][valid]]).astype(np.float64)

    # cytoplasm: pixels whose nearest nucleus pixel is within that cell's cytoplasm extent
    allowed = lay.tissue & ~lay.gland_lumen & ~lay.vessel_lumen
    dist, (iy, ix) = ndimage.distance_transform_edt(label == 0, return_indices=True)
    nearest = label[iy, ix]
    extent = np.concatenate([[0.0], np.array([spec[k].cytoplasm for k in keep]) * u * np.exp(rng.normal(0, 0.12, len(keep)))])
    cell = np.where((dist <= extent[nearest]) & allowed & (nearest > 0), nearest, 0).astype(np.int32)
    cell[label > 0] = label[label > 0]

    membrane = np.zeros(shape, bool)
    membrane[:-1] |= cell[:-1] != cell[1:]
    membrane[1:] |= cell[1:] != cell[:-1]
    membrane[:, :-1] |= cell[:, :-1] != cell[:, 1:]
    membrane[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    membrane &= cell > 0

    # chromatin: per-type density × texture (× vesicular rim for tumour) + nucleoli
    tex = _grf(rng, shape, 0.9)
    kt = np.concatenate([[-1], types[keep]])
    tex_amp = np.array([t.texture for t in CELL_TYPES] + [0.0])[kt]
    dens = np.concatenate([[0.0], chrom_cell[keep]])
    is_tum = kt == T["Tumor"]
    nuc = label > 0
    chrom = np.zeros(shape, np.float32)
    li = label[nuc]
    rim = np.where(is_tum[li], 0.7 + 0.55 * rel_map[nuc] ** 2, 1.0)
    chrom[nuc] = dens[li] * np.clip(1 + tex_amp[li] * 0.6 * tex[nuc], 0.2, None) * rim
    chrom[nuc] += nucleoli[nuc]
    cells = {k: v[keep] for k, v in lay.cells.items()}
    cells["nucleus_a"], cells["nucleus_b"] = a[keep] / u, b[keep] / u
    geo = Geometry(nucleus=label, cell=cell, membrane=membrane, chromatin=chrom, nucleus_area=nucleus_area,
                   cell_type=kt)
    return geo, cells


# ================================================================================================
# H&E
# ================================================================================================

#: Ruifrok & Johnston (2001) optical-density vectors (R, G, B) of hematoxylin and eosin.
STAIN_H = np.array([0.650, 0.704, 0.286])
STAIN_E = np.array([0.072, 0.990, 0.105])


def _render_he(rng: np.random.Generator, lay: Layout, geo: Geometry, lat: Latent) -> np.ndarray:
    """(3,Y,X) uint8 RGB by Beer–Lambert: I = I0 · 10^(−(OD_H·h + OD_E·e))."""
    shape = lay.tissue.shape
    n_cells = len(geo.cell_type)
    kt = geo.cell_type
    eos = np.array([t.eosin for t in CELL_TYPES] + [0.0])[kt] * np.exp(rng.normal(0, 0.12, n_cells))
    baso = np.array([t.basophilia for t in CELL_TYPES] + [0.0])[kt]
    eos[0] = baso[0] = 0.0
    nuc = geo.nucleus > 0
    body = (geo.cell > 0) & ~nuc
    H = np.zeros(shape, np.float32)
    E = np.zeros(shape, np.float32)
    H += geo.chromatin
    H[body] += baso[geo.cell[body]]
    vac = np.clip(_grf(rng, shape, 1.6), 0, None)
    foamy = np.where(kt == T["Macrophage"], 0.5, 0.0)
    E[body] += eos[geo.cell[body]] * (1 - foamy[geo.cell[body]] * np.clip(vac[body], 0, 1.5) / 1.5)
    E[nuc] += 0.07
    extra = lay.tissue & (geo.cell == 0)
    stroma = extra & ~lay.tumour & ~lay.aggregate & ~lay.gland_lumen & ~lay.vessel_lumen
    E[stroma] += 0.06 + 0.32 * lay.maps["collagen"][stroma]
    H[stroma] += 0.02 + 0.03 * lay.maps["collagen"][stroma]
    tum_extra = extra & lay.tumour & ~lay.gland_lumen
    E[tum_extra] += 0.16
    H[tum_extra] += 0.03
    agg_extra = extra & lay.aggregate
    E[agg_extra] += 0.1
    H[agg_extra] += 0.05
    lum = lay.gland_lumen
    E[lum] += 0.04 * np.clip(1 + _grf(rng, shape, 4.0)[lum], 0, None)
    E += 0.9 * lay.rbc
    E += 0.25 * lay.maps["basement"] * lay.tissue
    # section thickness: smooth variation and thinner edges
    thick = 1.0 + 0.12 * _grf(rng, shape, shape[0] / 6)
    edge = ndimage.distance_transform_edt(lay.tissue) / PX_PER_UM
    thick *= 0.65 + 0.35 * np.clip(edge / 8.0, 0, 1)
    H *= thick * lat.stain_h
    E *= thick * lat.stain_e
    h = STAIN_H + rng.normal(0, 0.02, 3)
    e = STAIN_E + rng.normal(0, 0.02, 3)
    h, e = np.abs(h) / np.linalg.norm(h), np.abs(e) / np.linalg.norm(e)
    i0 = rng.uniform(238, 250, 3) + np.array([0.0, -2.0, 3.0])
    od = H[None] * h[:, None, None] + E[None] * e[:, None, None]
    rgb = i0[:, None, None] * np.power(10.0, -od, dtype=np.float32)
    rgb = ndimage.gaussian_filter(rgb, (0, 0.6, 0.6))
    rgb += rng.normal(0, 2.0, rgb.shape).astype(np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# ================================================================================================
# Markers
# ================================================================================================


def _cell_levels(rng: np.random.Generator, lay: Layout, geo: Geometry, cells: dict[str, np.ndarray], lat: Latent,
                 keys: Sequence[str]) -> np.ndarray:
    """(n_cells + 1, K) protein levels (row 0 = background, zero).

    Type profile × random subset × context × log-normal cell noise × tissue batch factor.
    No-signal proteins are drawn from their own distribution with no reference to any cell property.
    """
    n = len(cells["y"])
    types = cells["type"].astype(int)
    u = PX_PER_UM
    pts = np.stack([cells["y"], cells["x"]], 1)
    d_tum = (ndimage.distance_transform_edt(~lay.tumour) / u) if lay.tumour.any() else np.full(lay.tumour.shape, 1e3)
    dt = _at(d_tum, pts)
    if lay.vessels:
        dv, _ = cKDTree(np.array([(v[0], v[1]) for v in lay.vessels])).query(pts)
        dv = dv / u
    else:
        dv = np.full(n, 1e3)
    is_ = {k: types == T[name] for k, name in _SHORT.items()}
    hot = lat.immune * (0.4 + 0.6 * lat.infiltration)
    out = np.zeros((n + 1, len(keys)), np.float32)
    for j, key in enumerate(keys):
        p = PROTEINS[key]
        if p.random is not None:
            frac, sd = p.random
            pos = rng.uniform(size=n) < frac
            out[1:, j] = np.where(pos, np.exp(rng.normal(0, sd, n)), 0.03)
            continue
        lv = np.zeros(n)
        for short, level in p.levels.items():
            lv[is_[short]] = level
        for short, frac in p.subset.items():
            sel = is_[short]
            lv[sel] *= np.where(rng.uniform(size=int(sel.sum())) < frac, 1.0, 0.1)
        # context
        if key == "HLA-DR":
            lv[is_["tum"]] += 0.5 * hot
        elif key == "CD274":
            lv[is_["tum"]] += 0.7 * hot * (dt[is_["tum"]] < 1.0)
            lv[is_["mac"]] += 0.6 * hot
        elif key == "HLA-A":
            lv[is_["tum"]] += 0.5 * hot
        elif key == "GZMB":
            lv[is_["cd8"]] *= 0.5 + 2.0 * hot
        elif key == "IFNG":
            lv[is_["cd8"]] += 0.5 * hot
            lv[is_["cd4"]] += 0.25 * hot
        elif key == "PDCD1":
            lv[is_["cd8"]] *= 0.5 + 2.0 * hot
        elif key == "VCAM1":
            lv[is_["endo"]] += 0.6 * lat.immune
        elif key == "CA9":
            hyp = np.clip((dv - 45.0) / 70.0, 0, 1)
            lv[is_["tum"]] += 1.0 * hyp[is_["tum"]]
        elif key in ("FAP", "MMP11"):
            caf = np.exp(-dt / 30.0)
            lv[is_["fib"]] += (0.9 if key == "FAP" else 0.6) * caf[is_["fib"]]
        elif key == "TP63":
            lv[is_["tum"] & (cells["layer"] == 1)] += 0.9
        elif key == "KRT8_18":
            lv[is_["tum"] & (cells["layer"] != 1)] += 0.5
        elif key == "PNAD":
            lv[is_["endo"] & (_at(ndimage.binary_dilation(lay.aggregate, iterations=int(15 * u)), pts))] += 0.7
        noise = np.exp(rng.normal(0, 0.3, n))
        out[1:, j] = lv * noise
    batch = np.exp(rng.normal(0, 0.1, len(keys))).astype(np.float32)
    return out * batch[None, :]


_LOC_WEIGHTS = {  # (nucleus, membrane, cytoplasm)
    "nuc": (1.0, 0.05, 0.03),
    "dna": (1.0, 0.05, 0.0),
    "mem": (0.08, 1.0, 0.3),
    "cyto": (0.12, 0.6, 1.0),
    "whole": (1.0, 1.0, 1.0),
}


def _render_panel(levels: np.ndarray, keys: Sequence[str], geo: Geometry, lay: Layout) -> np.ndarray:
    """Noise-free (K,Y,X) float32 protein maps at 0.5 µm/px from per-cell levels and localisation."""
    shape = geo.cell.shape
    n1 = levels.shape[0]
    nuc = geo.nucleus > 0
    comp = np.where(geo.membrane, 1, np.where(nuc, 0, 2))  # 0 nucleus, 1 membrane, 2 cytoplasm
    index = (comp * n1 + geo.cell).ravel()
    w = np.array([_LOC_WEIGHTS[PROTEINS[k].loc] for k in keys], np.float32)  # (K, 3)
    table = np.concatenate([levels * w[:, c][None, :] for c in range(3)], 0)  # (3*n1, K)
    table[[0, n1, 2 * n1]] = 0.0
    img = table[index].T.reshape(len(keys), *shape)
    chrom = geo.chromatin / 0.9
    for j, k in enumerate(keys):
        p = PROTEINS[k]
        if p.loc == "dna":
            img[j] = np.where(nuc, chrom * levels[geo.cell, j], img[j])
        for name, weight in p.ecm.items():
            img[j] += weight * lay.maps[name]
    return img


def _instrument_constants(keys: Sequence[str], salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel brightness and background, fixed for a panel (an instrument property, not a tissue's)."""
    rng = np.random.default_rng([977, salt])
    return rng.uniform(0.6, 1.6, len(keys)), rng.uniform(0.5, 1.5, len(keys))


def _render_codex(rng: np.random.Generator, clean: np.ndarray, lay: Layout, autofluorescence: np.ndarray) -> np.ndarray:
    """CODEX-like uint16: blur, brightness, autofluorescence (stroma, RBC), shot and read noise."""
    k = clean.shape[0]
    bright, bg = _instrument_constants(CODEX_CHANNELS, 1)
    img = ndimage.gaussian_filter(clean, (0, 0.9, 0.9), truncate=3.0)
    auto = (0.4 + 0.6 * ndimage.gaussian_filter(lay.tissue.astype(np.float32), 6)) + 1.5 * autofluorescence
    img *= (4000.0 * bright).astype(np.float32)[:, None, None]
    img += (150.0 * bg).astype(np.float32)[:, None, None] * auto[None]
    # shot noise (variance ∝ signal, gain 8) and read noise (sd 25) in one Gaussian draw
    sd = np.sqrt(np.maximum(img, 0) * np.float32(8.0) + np.float32(625.0))
    img += sd * rng.standard_normal(img.shape, dtype=np.float32)
    assert img.shape[0] == k
    return np.clip(np.rint(img, out=img), 0, 65535).astype(np.uint16)


def _render_imc(rng: np.random.Generator, clean: np.ndarray, names: Sequence[str], lay: Layout) -> np.ndarray:
    """IMC-like float32 counts at 1 µm/px: 2×2 binning, Poisson counts, sparse hot pixels."""
    bright, bg = _instrument_constants(names, 2)
    gain = np.array([_IMC_GAIN_OVERRIDE.get(n, 1.0) for n in names]) * bright * 12.0
    img = ndimage.gaussian_filter(clean, (0, 0.8, 0.8), truncate=3.0)
    k, h, w = img.shape
    img = img.reshape(k, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    tissue = lay.tissue.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    lam = img * gain[:, None, None] + (0.15 * bg)[:, None, None] * (0.3 + tissue)[None]
    counts = rng.poisson(np.maximum(lam, 0)).astype(np.float32)
    hot = rng.uniform(size=counts.shape) < 2e-4
    counts[hot] += rng.uniform(30, 300, int(hot.sum())).astype(np.float32)
    return counts


# ================================================================================================
# Outcome
# ================================================================================================


def _composition(cells: pd.DataFrame) -> dict[str, float]:
    """Composition summaries the outcome depends on (computed from the cells actually placed)."""
    n = max(len(cells), 1)
    tum = int((cells["cell_type"] == "Tumor").sum())
    cd8_in = int(((cells["cell_type"] == "CD8_T") & (cells["dist_to_tumor"] <= 15.0)).sum())
    return {"tumour_cell_fraction": tum / n, "cd8_infiltration": cd8_in / max(tum, 1) * 100.0}


def _clinical(rng: np.random.Generator, comp: dict[str, float], lat: Latent) -> dict[str, float | int]:
    """Outcome from composition: CD8 infiltration of tumour protects, tumour burden and grade harm."""
    infil = min(comp["cd8_infiltration"] / 10.0, 1.5)  # CD8 per 100 tumour cells, saturating
    risk = -2.2 * (infil - 0.5) + 1.5 * (comp["tumour_cell_fraction"] - 0.4) + 0.35 * (lat.grade - 2) + rng.normal(0, 0.3)
    k = 1.5
    t_event = 40.0 * (-math.log(rng.uniform(1e-9, 1.0)) / math.exp(risk)) ** (1 / k)
    t_censor = rng.uniform(24.0, 120.0)
    p_resp = 1.0 / (1.0 + math.exp(-(3.5 * (infil - 0.5) + 1.0 * (lat.immune - 0.5) + rng.normal(0, 0.5))))
    return {
        "response": int(rng.uniform() < p_resp),
        "survival_time": float(round(min(t_event, t_censor), 3)),
        "survival_event": int(t_event <= t_censor),
        "risk_score": float(risk),
    }


# ================================================================================================
# One tissue
# ================================================================================================


@dataclasses.dataclass
class Tissue:
    tissue_id: str
    he: np.ndarray  # (3,Y,X) uint8, 0.5 µm/px
    codex: np.ndarray  # (50,Y,X) uint16, 0.5 µm/px
    imc: np.ndarray  # (43,Y/2,X/2) float32, 1 µm/px
    tissue_mask: np.ndarray  # 0.5 µm/px
    tissue_mask_1um: np.ndarray
    cell_mask: np.ndarray  # 0.5 µm/px
    cell_mask_1um: np.ndarray
    cells: pd.DataFrame
    info: dict[str, object]


def tissue_id_for(seed: int, index: int) -> str:
    return f"synth_s{seed}_{index:04d}"


def simulate_tissue(seed: int, index: int, size: int, imc_names: Sequence[str] | None = None) -> Tissue:
    """Draw and render tissue `index` of a dataset with `seed` (deterministic, independent of others)."""
    from datamodules.preprocess import otsu_tissue_mask

    imc_names = list(imc_names if imc_names is not None else imc_channels_table()["channel_name"])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5EED]))
    lat = _draw_latent(rng)
    lay = _layout(rng, size, lat)
    geo, cells = _paint_cells(rng, lay, lat)
    he = _render_he(rng, lay, geo, lat)

    keys = list(dict.fromkeys([k for _, _, k in CODEX_PANEL] + [IMC_PROTEIN[n] for n in imc_names]))
    levels = _cell_levels(rng, lay, geo, cells, lat, keys)
    col = {k: i for i, k in enumerate(keys)}
    codex_keys = [k for _, _, k in CODEX_PANEL]
    imc_keys = [IMC_PROTEIN[n] for n in imc_names]
    clean_codex = _render_panel(levels[:, [col[k] for k in codex_keys]], codex_keys, geo, lay)
    eosin_auto = np.clip(0.2 * lay.maps["collagen"] * (lay.tissue & ~lay.tumour) + 0.8 * lay.rbc, 0, 1)
    codex = _render_codex(rng, clean_codex, lay, eosin_auto)
    del clean_codex
    clean_imc = _render_panel(levels[:, [col[k] for k in imc_keys]], imc_keys, geo, lay)
    imc = _render_imc(rng, clean_imc, imc_names, lay)
    del clean_imc

    tissue_mask = otsu_tissue_mask(he, "he")
    if tissue_mask.mean() < 0.2 or tissue_mask.mean() > 0.995:  # Otsu failed: fall back to the model's region
        tissue_mask = lay.tissue.copy()
    h, w = tissue_mask.shape
    tissue_1um = tissue_mask.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) >= 0.5
    cell_1um = geo.cell[::2, ::2]

    tid = tissue_id_for(seed, index)
    n = len(cells["y"])
    ids = np.arange(1, n + 1)
    area_px = np.bincount(geo.cell.ravel(), minlength=n + 1)[1:]
    u = PX_PER_UM
    d_tum = (ndimage.distance_transform_edt(~lay.tumour) / u) if lay.tumour.any() else np.full(lay.tumour.shape, 1e3)
    pts = np.stack([cells["y"], cells["x"]], 1)
    tnames = np.array(TYPE_NAMES)[cells["type"].astype(int)]
    df = pd.DataFrame({
        "tissue_id": tid,
        "cell_id": ids.astype(np.int64),
        "cell_type": tnames,
        "cell_category": [CELL_TYPES[t].category for t in cells["type"].astype(int)],
        "x": (cells["x"] * HE_MPP).astype(np.float64),  # µm (= px at 1 µm/px)
        "y": (cells["y"] * HE_MPP).astype(np.float64),
        "area": (area_px * HE_MPP**2).astype(np.float64),  # µm²
        "nucleus_area": (geo.nucleus_area[1:] * HE_MPP**2).astype(np.float64),
        "niche": np.array(NICHES)[cells["niche"].astype(int)],
        "dist_to_tumor": _at(d_tum, pts).astype(np.float64),
    })
    comp = _composition(df)
    info: dict[str, object] = {
        "tissue_id": tid,
        "immune_level": lat.immune,
        "infiltration": lat.infiltration,
        "immune_phenotype": lat.phenotype,
        "architecture": "glandular" if lat.glandular else "solid",
        "grade": lat.grade,
        "n_cells": n,
        **comp,
        **_clinical(rng, comp, lat),
    }
    return Tissue(tid, he, codex, imc, tissue_mask, tissue_1um, geo.cell, cell_1um, df, info)


def _simulate_star(args: tuple[int, int, int, list[str]]) -> Tissue:
    return simulate_tissue(*args)


# ================================================================================================
# Dataset
# ================================================================================================


def assign_splits(n: int, seed: int) -> list[str]:
    """Deterministic train/val/test per tissue: ≥1 val and ≥1 test once n ≥ 4 (≈15 % each)."""
    if n <= 1:
        return ["train"] * n
    n_test = max(1, round(0.15 * n)) if n >= 3 else 0
    n_val = max(1, round(0.15 * n))
    order = np.random.default_rng([int(seed), 0x5B17]).permutation(n)
    split = ["train"] * n
    for k, i in enumerate(order):
        if k < n_test:
            split[i] = "test"
        elif k < n_test + n_val:
            split[i] = "val"
    return split


def tiles_for(tissue_id: str, mask_1um: np.ndarray, tile: int = TILE_SIZE, min_tissue: float = MIN_TILE_TISSUE) -> pd.DataFrame:
    """128-px tiles (stride 128) at 1 µm/px holding at least `min_tissue` tissue."""
    h, w = mask_1um.shape
    rows = []
    for r in range(0, h - tile + 1, tile):
        for c in range(0, w - tile + 1, tile):
            frac = float(mask_1um[r : r + tile, c : c + tile].mean())
            if frac >= min_tissue:
                rows.append((tissue_id, r, c, frac))
    return pd.DataFrame(rows, columns=["tissue_id", "row", "col", "tissue_fraction"])


def _check_args(n_tissues: int, size: int) -> None:
    if not isinstance(n_tissues, (int, np.integer)) or n_tissues < 1:
        raise ValueError(f"--tissues must be an integer >= 1, got {n_tissues!r}")
    if not isinstance(size, (int, np.integer)) or size < 128 or size % 16:
        raise ValueError(f"--size must be an integer >= 128 and a multiple of 16 (pixels at 0.5 µm/px), got {size!r}")


class _Stats:
    """Per-image 99th percentiles + pooled clip/log1p moments, fed one tissue at a time."""

    def __init__(self, channel_names: Sequence[str]):
        from datamodules.preprocess import RunningMoments

        self.names = list(channel_names)
        self.uq: dict[str, np.ndarray] = {}
        self.moments = RunningMoments(len(self.names))

    def add(self, tissue_id: str, image: np.ndarray, mask: np.ndarray) -> None:
        from datamodules.preprocess import clip_log1p, upper_quantiles

        uq = upper_quantiles(image, mask, q=0.99)
        self.uq[tissue_id] = uq
        x = clip_log1p(image, uq)
        for c in range(x.shape[0]):
            self.moments.update(c, x[c][mask])

    def frames(self) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
        uq = pd.DataFrame.from_dict(self.uq, orient="index", columns=self.names)
        uq.index.name = "tissue_id"
        means, stds = self.moments.result()
        return uq, pd.Series(means, index=self.names), pd.Series(stds, index=self.names)


GENERATOR = "datamodules.synthetic"


def is_synthetic_dataset(root: Path) -> bool:
    """Whether ``root`` was written by this generator (its manifest, or the ``.complete`` marker of older runs)."""
    from datamodules.provenance import read_manifest

    manifest = read_manifest(root) or {}
    if manifest.get("written_by") == GENERATOR:
        return True
    try:
        return json.loads((root / ".complete").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


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
    from tqdm import tqdm

    from datamodules.store import DatasetWriter

    _check_args(n_tissues, size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out.exists() and any(out.iterdir()) and not is_synthetic_dataset(out):
        raise FileExistsError(f"{out}: exists and is not a synthetic dataset; --overwrite replaces only a dataset this "
                              "generator wrote: choose another --out")
    imc_table = imc_channels_table()
    imc_names = [str(c) for c in imc_table["channel_name"]]
    emb_dir = ASSETS_DIR / "marker_embeddings"
    splits = assign_splits(n_tissues, seed)
    codex_stats, imc_stats = _Stats(CODEX_CHANNELS), _Stats(imc_names)
    tissue_rows, cell_tables, tiles = [], [], []
    jobs = [(seed, i, size, imc_names) for i in range(n_tissues)]

    with DatasetWriter.create(out, overwrite=overwrite, written_by=GENERATOR) as w:
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
            results = pool.imap(_simulate_star, jobs)
        else:
            pool = None
            results = (simulate_tissue(*j) for j in jobs)
        try:
            bar = tqdm(results, total=n_tissues, desc="synthetic tissues", unit="tissue", disable=not progress)
            for i, t in enumerate(bar):
                w.write_image("he", t.tissue_id, t.he, HE_MPP, ["R", "G", "B"])
                w.write_image("codex", t.tissue_id, t.codex, CODEX_MPP, list(CODEX_CHANNELS))
                w.write_image("imc", t.tissue_id, t.imc, IMC_MPP, imc_names)
                w.write_tissue_mask(t.tissue_id, HE_MPP, t.tissue_mask)
                w.write_tissue_mask(t.tissue_id, IMC_MPP, t.tissue_mask_1um)
                w.write_cell_mask(t.tissue_id, HE_MPP, t.cell_mask)
                w.write_cell_mask(t.tissue_id, IMC_MPP, t.cell_mask_1um)
                codex_stats.add(t.tissue_id, t.codex, t.tissue_mask)
                imc_stats.add(t.tissue_id, t.imc, t.tissue_mask_1um)
                tiles.append(tiles_for(t.tissue_id, t.tissue_mask_1um))
                cell_tables.append(t.cells)
                tissue_rows.append({"tissue_id": t.tissue_id, "patient_id": f"synth_s{seed}_p{i:04d}",
                                    "split": splits[i], "dataset": "synthetic", **{k: v for k, v in t.info.items() if k != "tissue_id"}})
        finally:
            if pool is not None:
                pool.close()
                pool.join()

        tissues = pd.DataFrame(tissue_rows)
        ids = list(tissues["tissue_id"])
        w.write_tissues(tissues)
        w.write_cells(pd.concat(cell_tables, ignore_index=True))
        w.write_channels("he", he_channels_table())
        w.write_channels("codex", codex_channels_table())
        w.write_channels("imc", imc_table)
        for modality, names in (("he", ["R", "G", "B"]), ("codex", list(CODEX_CHANNELS)), ("imc", imc_names)):
            per = pd.DataFrame(True, index=pd.Index(ids, name="tissue_id"), columns=names)
            w.write_channels_per_tissue(modality, per)
        for stats, modality, mpp in ((codex_stats, "codex", CODEX_MPP), (imc_stats, "imc", IMC_MPP)):
            w.write_standardization(modality, mpp, *stats.frames())
        tiling = pd.concat(tiles, ignore_index=True)
        tiling.insert(1, "tile_id", np.arange(len(tiling), dtype=np.int64))
        w.write_tiling(IMC_MPP, tiling, tile_size=TILE_SIZE)
        for uid in sorted({str(u) for u in imc_table["uniprot_id"].dropna()}):
            path = emb_dir / f"{uid}.pt"
            if path.exists():
                w.write_embedding(uid, load_tensor_file(path))
        meta = {"generator": GENERATOR, "n_tissues": n_tissues, "size": size, "seed": seed,
                "he_mpp": HE_MPP, "codex_mpp": CODEX_MPP, "imc_mpp": IMC_MPP}
        with w.fs.open(f"{w.root}/.complete", "w") as f:
            f.write(json.dumps(meta, sort_keys=True) + "\n")
    return out


# ================================================================================================
# CLI
# ================================================================================================


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.synthetic",
                                     description="Generate a synthetic co-registered H&E / CODEX / IMC dataset.")
    parser.add_argument("--out", required=True, help="output dataset folder (must not exist unless --overwrite)")
    parser.add_argument("--tissues", type=int, default=8, help="number of tissues (>= 1)")
    parser.add_argument("--size", type=int, default=512, help="tissue size in px at 0.5 µm/px (>= 128, multiple of 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering tissues in parallel (output is identical)")
    args = parser.parse_args(argv)

    def body() -> None:
        _check_args(args.tissues, args.size)
        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"{args.out}: already exists; pass --overwrite to replace it")
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        t0 = time.perf_counter()
        out = generate_dataset(args.out, args.tissues, args.size, args.seed, overwrite=args.overwrite, workers=args.workers)
        print(f"wrote {args.tissues} synthetic tissues ({args.size}×{args.size} px at {HE_MPP} µm/px) to {out} "
              f"in {time.perf_counter() - t0:.1f} s")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
