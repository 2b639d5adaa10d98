"""Multiplex rendering: per-cell protein levels → noise-free protein maps → CODEX or IMC images.

Why two stages: the noise-free maps (localisation in nucleus, membrane, cytoplasm, plus
extracellular matrix) are the same biology for both instruments; what differs is the instrument.
CODEX (ROSIE's 50 markers) is fluorescence at 0.5 µm/px: blur, autofluorescence, shot and read
noise, uint16. IMC (the real 43-channel panel) is mass cytometry at 1 µm/px: 2×2 binning, Poisson
counts, sparse hot pixels, float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from datamodules.synthetic.catalogue import PROTEINS
from datamodules.synthetic.cell_shapes import CellGeometry
from datamodules.synthetic.panels import CODEX_CHANNELS, IMC_GAIN_OVERRIDES
from datamodules.synthetic.tissue_layout import TissueLayout

#: Share of a protein's level seen in (nucleus, membrane, cytoplasm), per localisation.
COMPARTMENT_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "nuc": (1.0, 0.05, 0.03),
    "dna": (1.0, 0.05, 0.0),
    "mem": (0.08, 1.0, 0.3),
    "cyto": (0.12, 0.6, 1.0),
    "whole": (1.0, 1.0, 1.0),
}
#: Seeds of the per-panel instrument constants (fixed: an instrument, not a tissue, property).
CODEX_INSTRUMENT_SALT = 1
IMC_INSTRUMENT_SALT = 2


def render_clean_panel(levels: np.ndarray, keys: Sequence[str], geometry: CellGeometry,
                       layout: TissueLayout) -> np.ndarray:
    """Noise-free (K,Y,X) float32 protein maps at 0.5 µm/px from per-cell levels and localisation."""
    shape = geometry.cell.shape
    n_rows = levels.shape[0]
    in_nucleus = geometry.nucleus > 0
    compartment = np.where(geometry.membrane, 1, np.where(in_nucleus, 0, 2))  # 0 nucleus, 1 membrane, 2 cytoplasm
    index = (compartment * n_rows + geometry.cell).ravel()
    weights = np.array([COMPARTMENT_WEIGHTS[PROTEINS[k].localisation] for k in keys], np.float32)  # (K, 3)
    table = np.concatenate([levels * weights[:, c][None, :] for c in range(3)], 0)  # (3*n_rows, K)
    table[[0, n_rows, 2 * n_rows]] = 0.0
    image = table[index].T.reshape(len(keys), *shape)
    chromatin = geometry.chromatin / 0.9
    for j, key in enumerate(keys):
        protein = PROTEINS[key]
        if protein.localisation == "dna":
            image[j] = np.where(in_nucleus, chromatin * levels[geometry.cell, j], image[j])
        for name, weight in protein.extracellular.items():
            image[j] += weight * layout.maps[name]
    return image


def instrument_constants(keys: Sequence[str], salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel brightness and background, fixed for a panel (an instrument property, not a tissue's)."""
    rng = np.random.default_rng([977, salt])
    return rng.uniform(0.6, 1.6, len(keys)), rng.uniform(0.5, 1.5, len(keys))


def render_codex(rng: np.random.Generator, clean: np.ndarray, layout: TissueLayout,
                 autofluorescence: np.ndarray) -> np.ndarray:
    """CODEX-like uint16: blur, brightness, autofluorescence (stroma, RBC), shot and read noise."""
    n_channels = clean.shape[0]
    brightness, background = instrument_constants(CODEX_CHANNELS, CODEX_INSTRUMENT_SALT)
    image = ndimage.gaussian_filter(clean, (0, 0.9, 0.9), truncate=3.0)
    auto = (0.4 + 0.6 * ndimage.gaussian_filter(layout.tissue.astype(np.float32), 6)) + 1.5 * autofluorescence
    image *= (4000.0 * brightness).astype(np.float32)[:, None, None]
    image += (150.0 * background).astype(np.float32)[:, None, None] * auto[None]
    # shot noise (variance ∝ signal, gain 8) and read noise (sd 25) in one Gaussian draw
    sd = np.sqrt(np.maximum(image, 0) * np.float32(8.0) + np.float32(625.0))
    image += sd * rng.standard_normal(image.shape, dtype=np.float32)
    assert image.shape[0] == n_channels
    return np.clip(np.rint(image, out=image), 0, 65535).astype(np.uint16)


def render_imc(rng: np.random.Generator, clean: np.ndarray, names: Sequence[str], layout: TissueLayout) -> np.ndarray:
    """IMC-like float32 counts at 1 µm/px: 2×2 binning, Poisson counts, sparse hot pixels."""
    brightness, background = instrument_constants(names, IMC_INSTRUMENT_SALT)
    gain = np.array([IMC_GAIN_OVERRIDES.get(n, 1.0) for n in names]) * brightness * 12.0
    image = ndimage.gaussian_filter(clean, (0, 0.8, 0.8), truncate=3.0)
    k, h, w = image.shape
    image = image.reshape(k, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    tissue = layout.tissue.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    expected = image * gain[:, None, None] + (0.15 * background)[:, None, None] * (0.3 + tissue)[None]
    counts = rng.poisson(np.maximum(expected, 0)).astype(np.float32)
    hot = rng.uniform(size=counts.shape) < 2e-4
    counts[hot] += rng.uniform(30, 300, int(hot.sum())).astype(np.float32)
    return counts
