"""The tissue model: a tissue-level latent and the niches and cells it lays out (px at 0.5 µm/px).

A latent (immune level, tumour infiltration, tumour fraction, grade, architecture) sets the
composition. Niches: tumour glands (epithelial rings around lumens, basal + luminal layer) or solid
nests, lymphoid aggregates (B-cell core, T-cell rim), vessels (endothelial lining around a lumen
with red blood cells), stroma (spindle fibroblasts aligned with collagen fibres, scattered immune
cells). Why one model for all modalities: H&E, CODEX and IMC are rendered from the same layout, so
they agree pixel for pixel and the ground truth is known.

The niches are placed in a fixed order (tissue region, tumour, aggregates, vessels, stroma), each
drawing from the same generator: changing that order changes every dataset.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from datamodules.synthetic.catalogue import CELL_TYPE_INDEX, CELL_TYPES, NICHES, TYPE_BY_SHORT_NAME
from datamodules.synthetic.geometry import (
    dart_throw_discs,
    disc_window,
    fibre_field,
    gaussian_random_field,
    jittered_hex_grid,
    non_overlapping_mask,
    ring_window,
    sample_at,
)
from datamodules.synthetic.panels import PX_PER_UM

#: µm in pixels of the simulation grid: `10 * UM` is 10 µm.
UM = PX_PER_UM
CELL_FIELDS = ("y", "x", "type", "angle", "niche", "layer")


@dataclasses.dataclass
class TissueLatent:
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
        """Immune phenotype as pathologists name it: desert, excluded (at the margin) or inflamed."""
        if self.immune < 0.3:
            return "desert"
        return "inflamed" if self.infiltration >= 0.5 else "excluded"


def draw_latent(rng: np.random.Generator) -> TissueLatent:
    """One tissue's latent variables (the first draws of a tissue's generator)."""
    return TissueLatent(
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
class CellCollector:
    """Cell attributes (positions in px at 0.5 µm/px); built by appending structure by structure."""

    y: list[np.ndarray] = dataclasses.field(default_factory=list)
    x: list[np.ndarray] = dataclasses.field(default_factory=list)
    type: list[np.ndarray] = dataclasses.field(default_factory=list)
    angle: list[np.ndarray] = dataclasses.field(default_factory=list)  # NaN: random
    niche: list[np.ndarray] = dataclasses.field(default_factory=list)
    layer: list[np.ndarray] = dataclasses.field(default_factory=list)  # 0 luminal / inner, 1 basal / outer, -1 n/a

    def add(self, y: np.ndarray, x: np.ndarray, types: np.ndarray | int, niche: int,
            angle: np.ndarray | None = None, layer: np.ndarray | None = None) -> None:
        """Append one structure's cells; a scalar `types` gives every cell that type."""
        n = len(y)
        self.y.append(np.asarray(y, np.float64))
        self.x.append(np.asarray(x, np.float64))
        self.type.append(np.broadcast_to(np.asarray(types, np.int64), (n,)).copy())
        self.angle.append(np.full(n, np.nan) if angle is None else np.asarray(angle, np.float64))
        self.niche.append(np.full(n, niche, np.int64))
        self.layer.append(np.full(n, -1, np.int64) if layer is None else np.asarray(layer, np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        """All cells so far, one array per attribute."""
        if not self.y:
            return {k: np.zeros(0) for k in CELL_FIELDS}
        return {k: np.concatenate(getattr(self, k)) for k in CELL_FIELDS}


@dataclasses.dataclass
class TissueLayout:
    """Regions (boolean, 0.5 µm/px), extracellular maps and the placed cells of one tissue."""

    tissue: np.ndarray
    tumour: np.ndarray  # tumour niche: gland discs or solid nests
    gland_lumen: np.ndarray
    vessel_lumen: np.ndarray
    aggregate: np.ndarray
    red_blood_cells: np.ndarray  # red blood cell OD map
    maps: dict[str, np.ndarray]  # collagen, basement, vessel_wall, fdc, tzone
    theta: np.ndarray  # fibre orientation (radians)
    cells: dict[str, np.ndarray]
    vessels: list[tuple[float, float, float]]  # (cy, cx, lumen radius) in px


def draw_cell_types(rng: np.random.Generator, n: int, probabilities: dict[str, float]) -> np.ndarray:
    """`n` cell type indices drawn from (unnormalised) probabilities keyed by short type name."""
    names = list(probabilities)
    p = np.array([probabilities[k] for k in names], np.float64)
    return np.array([CELL_TYPE_INDEX[TYPE_BY_SHORT_NAME[k]] for k in names])[rng.choice(len(names), size=n, p=p / p.sum())]


def _tissue_region(rng: np.random.Generator, size: int) -> np.ndarray:
    """One connected tissue piece: a smooth field plus a ramp, so that background sits at one side."""
    shape = (size, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phi = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - size / 2) * math.cos(phi) + (yy - size / 2) * math.sin(phi)) / size
    field = gaussian_random_field(rng, shape, size / 6) + 3.0 * ramp
    coverage = rng.uniform(0.72, 0.9)
    tissue = field > np.quantile(field, 1 - coverage)
    tissue = ndimage.binary_opening(tissue, iterations=3)
    tissue = ndimage.binary_fill_holes(tissue)
    labels, n = ndimage.label(tissue)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        tissue = labels == sizes.argmax()
    return tissue


def _tumour_compartment(rng: np.random.Generator, tissue: np.ndarray, latent: TissueLatent,
                        cells: CellCollector) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Glands or solid nests in a smooth tumour zone; adds their cells. Returns (tumour, gland lumen, basement)."""
    shape = tissue.shape
    size = shape[0]
    zone_field = gaussian_random_field(rng, shape, size / 9)
    inside = zone_field[tissue]
    threshold = np.quantile(inside, 1 - latent.tumour_fraction) if inside.size else 0.0
    tumour_zone = tissue & (zone_field > threshold)
    tumour = np.zeros(shape, bool)
    gland_lumen = np.zeros(shape, bool)
    basement = np.zeros(shape, np.float32)
    cell_height, cell_width = 10.0 * UM, 8.5 * UM  # epithelial cell height (radial) and width
    p_intratumoural = 0.01 + 0.35 * latent.immune * latent.infiltration  # immune cells replacing tumour cells
    intratumoural_mix = {"cd8": 0.55, "cd4": 0.15, "treg": 0.05, "mac": 0.2, "neu": 0.05}

    if latent.glandular:
        n_try = int(40 * (size / 512) ** 2) + 4
        layers_of = rng.choice([1, 2], size=n_try, p=[0.6, 0.4])
        lumen_radius = rng.uniform(5, 15, size=n_try) * UM
        outer = lumen_radius + layers_of * cell_height
        order = np.argsort(-outer)
        glands = dart_throw_discs(rng, tumour_zone & ndimage.binary_erosion(tissue, iterations=int(8 * UM)),
                                  outer[order], gap=6 * UM)
        for cy, cx, radius, placed_index in glands:
            i = order[placed_index]
            lumen_r, n_layers = lumen_radius[i], int(layers_of[i])
            window, disc = disc_window(shape, cy, cx, radius)
            tumour[window] |= disc
            window, lumen_disc = disc_window(shape, cy, cx, lumen_r)
            gland_lumen[window] |= lumen_disc
            for layer in range(n_layers):
                rho = lumen_r + (layer + 0.5) * cell_height
                n_cells = max(int(2 * math.pi * rho / cell_width), 5)
                angles = rng.uniform(0, 2 * math.pi) + np.arange(n_cells) * (2 * math.pi / n_cells) \
                    + rng.normal(0, 0.04, n_cells)
                radii = rho + rng.normal(0, 0.6 * UM, n_cells)
                types = np.full(n_cells, CELL_TYPE_INDEX["Tumor"])
                swap = rng.uniform(size=n_cells) < p_intratumoural * 0.5
                types[swap] = draw_cell_types(rng, int(swap.sum()), intratumoural_mix)
                basal = np.full(n_cells, 1 if (n_layers == 2 and layer == 1) else 0)
                cells.add(cy + radii * np.sin(angles), cx + radii * np.cos(angles), types, NICHES.index("gland"),
                          angle=angles, layer=basal)
            # basement membrane: thin ring just outside the gland
            window, ring = ring_window(shape, cy, cx, radius, radius + 1.5 * UM)
            basement[window] = np.maximum(basement[window], ring.astype(np.float32))
        tumour &= tissue
    else:
        tumour = ndimage.binary_opening(tumour_zone, iterations=4)
        points = jittered_hex_grid(rng, shape, 10.5 * UM, 0.22)
        points = points[sample_at(tumour, points)]
        types = np.full(len(points), CELL_TYPE_INDEX["Tumor"])
        swap = rng.uniform(size=len(points)) < p_intratumoural
        types[swap] = draw_cell_types(rng, int(swap.sum()), intratumoural_mix)
        # nest periphery = basal-like layer
        depth = ndimage.distance_transform_edt(tumour)
        layer = (sample_at(depth, points) < 9 * UM).astype(np.int64)
        cells.add(points[:, 0], points[:, 1], types, NICHES.index("tumor"), layer=layer)
        rim = tumour & ~ndimage.binary_erosion(tumour, iterations=int(1.5 * UM))
        basement = np.maximum(basement, ndimage.binary_dilation(rim, iterations=1).astype(np.float32) * ~tumour + rim)
    return tumour, gland_lumen, basement


def _lymphoid_aggregates(rng: np.random.Generator, tissue: np.ndarray, tumour: np.ndarray, latent: TissueLatent,
                         cells: CellCollector) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B-cell follicles with a T-cell rim in stroma away from tumour. Returns (aggregate, FDC map, T-zone map)."""
    shape = tissue.shape
    size = shape[0]
    free = tissue & ~ndimage.binary_dilation(tumour, iterations=int(8 * UM))
    n_aggregates = int(rng.poisson(latent.immune * 1.6 * (size / 512) ** 2 + (0.3 if latent.immune > 0.6 else 0.0)))
    radii_wanted = np.sort(rng.uniform(22, 45, size=n_aggregates) * UM)[::-1]
    aggregates = dart_throw_discs(rng, free & ndimage.binary_erosion(tissue, iterations=int(10 * UM)), radii_wanted,
                                  gap=10 * UM)
    aggregate = np.zeros(shape, bool)
    fdc = np.zeros(shape, np.float32)
    tzone = np.zeros(shape, np.float32)
    network = np.clip(gaussian_random_field(rng, shape, 1.5), 0, None)
    for cy, cx, radius, _ in aggregates:
        window, disc = disc_window(shape, cy, cx, radius)
        aggregate[window] |= disc
        _, rim = ring_window(shape, cy, cx, 0.6 * radius, radius)
        fdc[window] = np.maximum(fdc[window], (disc & ~rim).astype(np.float32))
        tzone[window] = np.maximum(tzone[window], rim.astype(np.float32))
    aggregate &= tissue
    fdc = fdc * (0.3 + network) * aggregate
    tzone = tzone * aggregate
    if aggregates:
        points = jittered_hex_grid(rng, shape, 6.8 * UM, 0.12)
        points = points[sample_at(aggregate, points) & (rng.uniform(size=len(points)) < 0.93)]
        centres = np.array([(a[0], a[1]) for a in aggregates])
        radii = np.array([a[2] for a in aggregates])
        distance, nearest = cKDTree(centres).query(points)
        relative = distance / radii[nearest]
        core = draw_cell_types(rng, len(points), {"b": 0.85, "cd4": 0.07, "mac": 0.04, "treg": 0.02, "cd8": 0.02})
        mantle = draw_cell_types(rng, len(points),
                                 {"cd4": 0.52, "cd8": 0.24, "treg": 0.08, "b": 0.1, "mac": 0.04, "pc": 0.02})
        cells.add(points[:, 0], points[:, 1], np.where(relative < 0.6, core, mantle), NICHES.index("lymphoid_aggregate"))
    return aggregate, fdc, tzone


def _vessels(rng: np.random.Generator, tissue: np.ndarray, tumour: np.ndarray, aggregate: np.ndarray,
             cells: CellCollector) -> tuple[list[tuple[float, float, float]], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vessels in stroma: lumen, endothelial lining, wall, red blood cells.

    Returns (vessels, lumen, wall map, basement map, red blood cell OD map).
    """
    shape = tissue.shape
    area_um2 = float(tissue.sum()) / UM**2
    n_vessels = int(rng.poisson(area_um2 / 5500.0))
    radii_wanted = np.sort(rng.uniform(3.0, 11.0, size=n_vessels) * UM)[::-1]
    free = tissue & ~ndimage.binary_dilation(tumour, iterations=int(3 * UM)) & ~aggregate
    placed = dart_throw_discs(rng, free & ndimage.binary_erosion(tissue, iterations=int(6 * UM)),
                              radii_wanted + 4 * UM, gap=8 * UM)
    vessels = [(cy, cx, radius - 4 * UM) for cy, cx, radius, _ in placed]
    lumen = np.zeros(shape, bool)
    wall = np.zeros(shape, np.float32)
    basement = np.zeros(shape, np.float32)
    red_cells = np.zeros(shape, np.float32)
    red_cell_radius = 3.7 * UM
    for cy, cx, lumen_r in vessels:
        window, disc = disc_window(shape, cy, cx, lumen_r)
        lumen[window] |= disc
        rho = lumen_r + 1.3 * UM
        n_cells = max(int(2 * math.pi * rho / (11 * UM)), 2)
        angles = rng.uniform(0, 2 * math.pi) + np.arange(n_cells) * (2 * math.pi / n_cells)
        cells.add(cy + rho * np.sin(angles), cx + rho * np.cos(angles), CELL_TYPE_INDEX["Endothelial"],
                  NICHES.index("vessel"), angle=angles + math.pi / 2)
        window, ring = ring_window(shape, cy, cx, lumen_r + 2.5 * UM, lumen_r + (5.5 if lumen_r > 6 * UM else 3.5) * UM)
        wall[window] = np.maximum(wall[window], ring.astype(np.float32))
        basement[window] = np.maximum(basement[window], ring.astype(np.float32) * 0.7)
        n_red_cells = int(rng.poisson(0.6 * (lumen_r / red_cell_radius) ** 2 + 0.5))
        for _ in range(n_red_cells):
            offset = rng.uniform(0, max(lumen_r - red_cell_radius * 0.7, 0.5))
            direction = rng.uniform(0, 2 * math.pi)
            ry, rx = cy + offset * math.sin(direction), cx + offset * math.cos(direction)
            cell_window, cell_disc = disc_window(shape, ry, rx, red_cell_radius)
            yy, xx = np.ogrid[cell_window[0], cell_window[1]]
            relative = np.sqrt((yy - ry) ** 2 + (xx - rx) ** 2) / red_cell_radius
            density = np.where(cell_disc, 0.55 + 0.35 * relative**2, 0.0).astype(np.float32)
            red_cells[cell_window] = np.maximum(red_cells[cell_window], density)
    red_cells *= lumen
    wall *= tissue
    return vessels, lumen, wall, basement, red_cells


def _stroma(rng: np.random.Generator, tissue: np.ndarray, stroma: np.ndarray, tumour: np.ndarray,
            latent: TissueLatent, cells: CellCollector) -> tuple[np.ndarray, np.ndarray]:
    """Fibroblasts along collagen fibres and scattered immune cells. Returns (fibre orientation, collagen)."""
    shape = tissue.shape
    size = shape[0]
    theta = (gaussian_random_field(rng, shape, size / 7) * 1.2).astype(np.float32)
    collagen = fibre_field(rng, shape, theta)
    points = jittered_hex_grid(rng, shape, 8.5 * UM, 0.3)
    points = points[sample_at(stroma, points)]
    to_tumour = ndimage.distance_transform_edt(~tumour) / UM if tumour.any() else np.full(shape, 1e3, np.float32)
    distance = sample_at(to_tumour, points)
    near = np.exp(-distance / 25.0)
    immune = latent.immune
    if latent.phenotype == "excluded":
        margin = np.exp(-((distance - 20.0) ** 2) / (2 * 12.0**2))
        p_immune = 0.04 + 0.25 * immune + 0.45 * immune * margin
    else:
        p_immune = 0.04 + 0.3 * immune + 0.25 * immune * latent.infiltration * near
    p_fibroblast = np.full(len(points), 0.36)
    draw = rng.uniform(size=len(points))
    is_immune = draw < p_immune
    is_fibroblast = (~is_immune) & (draw < p_immune + p_fibroblast)
    t_share = 0.25 + 0.5 * immune
    mix = {"cd4": 0.45 * t_share, "cd8": 0.4 * t_share, "treg": 0.15 * t_share, "b": 0.05, "pc": 0.08,
           "mac": 0.2, "neu": 0.04 + 0.25 * latent.neutrophil}
    types = np.where(is_immune, draw_cell_types(rng, len(points), mix), CELL_TYPE_INDEX["Fibroblast"])
    keep = is_immune | is_fibroblast
    angles = np.where(types == CELL_TYPE_INDEX["Fibroblast"],
                      sample_at(theta, points) + rng.normal(0, 0.15, len(points)), np.nan)
    cells.add(points[keep, 0], points[keep, 1], types[keep], NICHES.index("stroma"), angle=angles[keep])
    return theta, collagen


def lay_out_tissue(rng: np.random.Generator, size: int, latent: TissueLatent) -> TissueLayout:
    """Place niches and cells of one tissue (everything in px at 0.5 µm/px)."""
    shape = (size, size)
    cells = CellCollector()
    tissue = _tissue_region(rng, size)
    tumour, gland_lumen, basement = _tumour_compartment(rng, tissue, latent, cells)
    aggregate, fdc, tzone = _lymphoid_aggregates(rng, tissue, tumour, latent, cells)
    vessels, vessel_lumen, vessel_wall, vessel_basement, red_cells = _vessels(rng, tissue, tumour, aggregate, cells)
    basement = np.maximum(basement, vessel_basement)
    around_vessels = np.zeros(shape, bool)
    for cy, cx, lumen_r in vessels:
        window, disc = disc_window(shape, cy, cx, lumen_r + 4.5 * UM)
        around_vessels[window] |= disc
    stroma = tissue & ~tumour & ~aggregate & ~around_vessels & ~gland_lumen
    theta, collagen = _stroma(rng, tissue, stroma, tumour, latent, cells)

    placed = cells.arrays()
    # drop overlapping candidates (structures were added first, so they win)
    radius = np.array([0.4 * (t.nucleus[0] + t.nucleus[1]) for t in CELL_TYPES])[placed["type"].astype(int)] * UM
    points = np.stack([placed["y"], placed["x"]], 1)
    keep = non_overlapping_mask(points, radius, np.zeros((0, 2)), np.zeros(0), factor=0.9)
    keep &= sample_at(tissue, points)
    placed = {k: v[keep] for k, v in placed.items()}
    # collagen fibres (and the fibroblast processes along them) exist in stroma only
    stroma_region = tissue & ~tumour & ~aggregate & ~gland_lumen & ~vessel_lumen
    maps = {"collagen": collagen * stroma_region, "basement": np.clip(basement, 0, 1) * tissue,
            "vessel_wall": vessel_wall, "fdc": fdc.astype(np.float32), "tzone": tzone.astype(np.float32)}
    return TissueLayout(tissue=tissue, tumour=tumour, gland_lumen=gland_lumen & tumour,
                        vessel_lumen=vessel_lumen & tissue, aggregate=aggregate, red_blood_cells=red_cells, maps=maps,
                        theta=theta, cells=placed, vessels=vessels)
