"""Synthetic co-registered H&E / CODEX / IMC tissues: the embedded default dataset and test fixture.

Generate one with `python -m experiments.data_synthetic --out DIR --tissues N --size PX --seed S`
or :func:`generate_dataset`.

Why a generative model rather than noise: every pipeline in the project (ROSIE H&E→CODEX, VirTues
masked multiplex modelling, cell phenotyping, survival analysis) needs data in which the signal it
looks for exists, is imperfect, and has known ground truth. One tissue model is therefore drawn per
tissue and *rendered* into each modality, so all modalities agree pixel for pixel:

* **Catalogue** (:mod:`.catalogue`, :mod:`.panels`): cell types (nucleus size, eccentricity,
  irregularity, lobes, chromatin density and texture, cytoplasm amount, eosin, basophilia),
  protein profiles, niches, and the CODEX and IMC panels that read the proteins.
* **Tissue model** (:mod:`.tissue_layout`, :mod:`.cell_shapes`): a tissue-level latent sets the
  composition; niches (glands or solid nests, stroma with aligned fibres, vessels, lymphoid
  aggregates) place the cells, which are then rasterised into nuclei, cytoplasm and membranes.
* **H&E** (:mod:`.render_he`): optical densities → RGB by Beer–Lambert.
* **Markers** (:mod:`.expression`, :mod:`.render_multiplex`): per-cell protein levels from
  profiles, context and noise, rendered with localisation and each instrument's noise. Proteins
  measured in both panels share their per-cell levels, so CODEX and IMC agree.
* **No-signal markers** (:data:`NO_SIGNAL_PROTEINS`: Ki67, IDO1, ATM, LAG3, TIGIT) are drawn per
  cell independently of type, context and morphology.
* **Outcomes** (:mod:`.outcome`): response and survival follow the *measured* CD8 infiltration of
  tumour, tumour fraction and grade, with noise.
* **Dataset** (:mod:`.dataset`): splits, statistics, tiling and embeddings, written through
  :class:`datamodules.store.DatasetWriter`.
* **Cohort preset** (:mod:`.cohort`, :mod:`.niches`, :mod:`.cohort_tissue`, :mod:`.cohort_dataset`,
  :mod:`.panel_b`): discovery patients before/on/after treatment with a response that goes with
  planted multicellular niches, an independent validation cohort whose survival the same niches
  drive, and tissues imaged with a second, partly overlapping IMC panel
  (:func:`generate_cohort`; `python -m experiments.data_synthetic --preset cohort --out DIR`).

Each tissue draws from its own `SeedSequence([seed, index, ...])` (:mod:`.tissue`), so the output
is identical for the same arguments whatever the number of worker processes.
"""

from __future__ import annotations

from datamodules.synthetic.catalogue import (
    CELL_TYPES,
    NICHES,
    NO_SIGNAL_PROTEINS,
    PROTEIN_KEYS,
    PROTEINS,
    TYPE_NAMES,
    CellType,
    Protein,
)
from datamodules.synthetic.cohort import NON_RESPONSE_NICHES, RESPONSE_NICHES, TIMEPOINTS
from datamodules.synthetic.cohort_dataset import (
    COHORT_DATASETS,
    COHORT_MANIFEST,
    generate_cohort,
    read_cohort_manifest,
    validate_cohort_args,
)
from datamodules.synthetic.dataset import (
    GENERATOR,
    MIN_TILE_TISSUE,
    TILE_SIZE,
    assign_splits,
    generate_dataset,
    is_synthetic_dataset,
    tiles_for,
    validate_generation_args,
)
from datamodules.synthetic.niches import CELL_STATES, COARSE_TYPE, NICHE_NAMES
from datamodules.synthetic.panel_b import PANEL_B_CHANNELS, PANEL_B_ONLY, PANEL_B_SHARED, panel_b_channels_table
from datamodules.synthetic.panels import (
    ASSETS_DIR,
    CODEX_CHANNELS,
    CODEX_MPP,
    CODEX_NO_SIGNAL,
    CODEX_PANEL,
    HE_MPP,
    IMC_MPP,
    IMC_PROTEIN,
    PX_PER_UM,
    codex_channels_table,
    he_channels_table,
    imc_channels_table,
)
from datamodules.synthetic.render_he import STAIN_E, STAIN_H
from datamodules.synthetic.tissue import Tissue, simulate_tissue, tissue_id_for

__all__ = [
    "CELL_STATES", "COARSE_TYPE", "COHORT_DATASETS", "COHORT_MANIFEST", "NICHE_NAMES", "NON_RESPONSE_NICHES",
    "PANEL_B_CHANNELS", "PANEL_B_ONLY", "PANEL_B_SHARED", "RESPONSE_NICHES", "TIMEPOINTS", "generate_cohort",
    "panel_b_channels_table", "read_cohort_manifest", "validate_cohort_args",
    "ASSETS_DIR", "CELL_TYPES", "CODEX_CHANNELS", "CODEX_MPP", "CODEX_NO_SIGNAL", "CODEX_PANEL", "GENERATOR",
    "HE_MPP", "IMC_MPP", "IMC_PROTEIN", "MIN_TILE_TISSUE", "NICHES", "NO_SIGNAL_PROTEINS", "PROTEINS",
    "PROTEIN_KEYS", "PX_PER_UM", "STAIN_E", "STAIN_H", "TILE_SIZE", "TYPE_NAMES", "CellType", "Protein", "Tissue",
    "assign_splits", "codex_channels_table", "generate_dataset", "he_channels_table", "imc_channels_table",
    "is_synthetic_dataset", "simulate_tissue", "tiles_for", "tissue_id_for", "validate_generation_args",
]
