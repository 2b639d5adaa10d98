"""Planted multicellular niches and cell states: the known truth of the cohort preset.

Why planted on top of the default layout: the downstream science (VirTues tokens → Leiden niches →
response / survival association, treatment shifts of cell states) needs structures whose presence is
decided by the cohort design, not by chance. A niche is a disc of co-localised cell types *with
distinct marker states* (e.g. Ki-67/GZMB/HLA-DR-high CD8 T cells in contact with tumour), placed
into a tissue laid out by :func:`~datamodules.synthetic.tissue_layout.lay_out_tissue`. Cells that
sat there are removed. The default lymphoid aggregates are replaced by plain stroma first, so that
a tertiary lymphoid structure exists only where the design plants one.

Cell states change protein levels after :func:`~datamodules.synthetic.expression.cell_protein_levels`
(:func:`apply_cell_states`). Note that in cohort datasets Ki-67 and IDO carry state signal; in the
default generator they are no-signal markers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from datamodules.synthetic.catalogue import CELL_TYPE_INDEX, CELL_TYPES, NICHES, TYPE_BY_SHORT_NAME
from datamodules.synthetic.geometry import dart_throw_discs, jittered_hex_grid, non_overlapping_mask, sample_at
from datamodules.synthetic.tissue_layout import UM, TissueLayout, draw_cell_types

#: Cell states (cells table column `cell_state`); index = integer code stored per cell.
CELL_STATES: tuple[str, ...] = ("resting", "activated", "exhausted", "suppressive", "caf", "proliferating",
                                "germinal", "hev")
STATE_INDEX = {name: i for i, name in enumerate(CELL_STATES)}
#: Which states each cell type (short name) may take besides "resting".
STATES_OF_TYPE: dict[str, tuple[str, ...]] = {
    "cd8": ("activated", "exhausted"), "cd4": ("activated",), "mac": ("suppressive",), "fib": ("caf",),
    "tum": ("proliferating",), "b": ("germinal",), "endo": ("hev",),
}
#: Protein changes per state: ("add", level) raises the level by `level` × log-normal noise,
#: ("mul", factor) scales it. Strong on purpose: a small model must see them.
STATE_MARKERS: dict[str, dict[str, tuple[str, float]]] = {
    "activated": {"MKI67": ("add", 1.3), "HLA-DR": ("add", 1.0), "GZMB": ("add", 1.5), "IFNG": ("add", 0.8),
                  "TCF7": ("mul", 0.25), "PDCD1": ("mul", 0.5)},
    "exhausted": {"PDCD1": ("add", 1.6), "ENTPD1": ("add", 0.9), "TCF7": ("mul", 0.15), "MKI67": ("mul", 0.2),
                  "GZMB": ("mul", 0.3)},
    "suppressive": {"CD163": ("add", 1.3), "CD274": ("add", 1.3), "IDO1": ("add", 1.3), "NT5E": ("add", 1.1),
                    "MMP9": ("add", 0.8), "LYVE1": ("add", 0.7), "HLA-DR": ("mul", 0.3)},
    "caf": {"FAP": ("add", 1.5), "ACTA2": ("add", 1.0), "PDGFRB": ("add", 0.9), "MMP11": ("add", 1.1),
            "CXCL12": ("add", 0.9), "CD248": ("add", 0.6)},
    "proliferating": {"MKI67": ("add", 1.6), "PCNA": ("add", 0.9)},
    "germinal": {"MKI67": ("add", 1.2), "HLA-DR": ("add", 0.5), "CD38": ("add", 0.6)},
    "hev": {"PNAD": ("add", 1.6), "CCL21": ("add", 1.1)},
}


@dataclasses.dataclass(frozen=True)
class PlantedNiche:
    """A multicellular niche: where it sits, which cells it holds, and their states."""

    name: str
    site: str  # "tumour_border" (centred on the tumour edge) or "stroma" (away from tumour)
    radius_um: tuple[float, float]  # drawn uniformly
    composition: dict[str, float]  # short type name → probability (TLS: the mantle; core below)
    states: dict[str, str]  # short type name → state of that type inside the niche
    core: dict[str, float] | None = None  # composition of the inner 55 % of the radius, if different
    description: str = ""


PLANTED_NICHES: tuple[PlantedNiche, ...] = (
    PlantedNiche("cd8_tumour_contact", "tumour_border", (18.0, 24.0),
                 {"tum": 0.45, "cd8": 0.42, "cd4": 0.13}, {"cd8": "activated", "cd4": "activated"},
                 description="tumour cells in contact with Ki-67/GZMB/HLA-DR-high (activated) CD8 T cells"),
    PlantedNiche("tls", "stroma", (20.0, 26.0),
                 {"cd4": 0.5, "cd8": 0.2, "endo": 0.12, "b": 0.18}, {"b": "germinal", "endo": "hev"},
                 core={"b": 0.88, "cd4": 0.12},
                 description="tertiary lymphoid structure: Ki-67-high germinal B-cell core, T-cell mantle, "
                             "PNAd/CCL21-high endothelial venules"),
    PlantedNiche("suppressive_macrophage", "tumour_border", (18.0, 24.0),
                 {"mac": 0.52, "treg": 0.18, "tum": 0.30}, {"mac": "suppressive", "tum": "proliferating"},
                 description="CD163/PD-L1/IDO/CD73-high macrophages with Tregs beside proliferating tumour"),
    PlantedNiche("caf_exclusion", "tumour_border", (18.0, 24.0),
                 {"fib": 0.55, "cd8": 0.35, "tum": 0.10}, {"fib": "caf", "cd8": "exhausted"},
                 description="immune exclusion: FAP/SMA-high cancer-associated fibroblasts trapping "
                             "PD-1-high, TCF7-low (exhausted) CD8 T cells at the tumour edge"),
)
NICHE_NAMES: tuple[str, ...] = tuple(n.name for n in PLANTED_NICHES)
NICHE_BY_NAME: dict[str, PlantedNiche] = {n.name: n for n in PLANTED_NICHES}
#: Coarse cell classes (cells table column `coarse_type`), for the cross-panel transfer (paper: six classes).
COARSE_TYPE: dict[str, str] = {
    "Tumor": "tumour", "CD4_T": "T cell", "CD8_T": "T cell", "Treg": "T cell", "B_cell": "B cell",
    "Plasma": "B cell", "Macrophage": "myeloid", "Neutrophil": "myeloid", "Fibroblast": "fibroblast",
    "Endothelial": "endothelial",
}
_STROMA_FILL = {"fib": 0.72, "cd4": 0.08, "cd8": 0.06, "mac": 0.1, "pc": 0.04}


def _type_radius_px(types: np.ndarray) -> np.ndarray:
    """Overlap radius of each cell (as lay_out_tissue uses it), in px."""
    return np.array([0.4 * (t.nucleus[0] + t.nucleus[1]) for t in CELL_TYPES])[types.astype(int)] * UM


def strip_aggregates(rng: np.random.Generator, layout: TissueLayout) -> None:
    """Replace the default lymphoid aggregates (in place) by stroma, so TLSs exist only where planted."""
    if not layout.aggregate.any():
        return
    cells = layout.cells
    keep = cells["niche"] != NICHES.index("lymphoid_aggregate")
    for k in list(cells):
        cells[k] = cells[k][keep]
    points = jittered_hex_grid(rng, layout.tissue.shape, 9.0 * UM, 0.15)
    points = points[sample_at(layout.aggregate, points)]
    types = draw_cell_types(rng, len(points), _STROMA_FILL)
    _append(cells, points, types, NICHES.index("stroma"), planted=None, states=None)
    layout.aggregate[:] = False
    layout.maps["fdc"][:] = 0.0
    layout.maps["tzone"][:] = 0.0


def _append(cells: dict[str, np.ndarray], points: np.ndarray, types: np.ndarray, compartment: int | np.ndarray,
            planted: np.ndarray | None, states: np.ndarray | None) -> None:
    """Append cells to a layout's cell arrays (planted/state only when the arrays already exist)."""
    n = len(points)
    new = {"y": points[:, 0], "x": points[:, 1], "type": types.astype(np.int64), "angle": np.full(n, np.nan),
           "niche": np.broadcast_to(np.asarray(compartment, np.int64), (n,)).copy(), "layer": np.full(n, -1, np.int64)}
    if "planted" in cells:
        new["planted"] = np.full(n, -1, np.int64) if planted is None else planted
        new["state"] = np.zeros(n, np.int64) if states is None else states
    for k in cells:
        cells[k] = np.concatenate([cells[k], new[k].astype(cells[k].dtype)])


def _sites(layout: TissueLayout, site: str) -> np.ndarray:
    """Pixels where a niche of this site may be centred (falls back to any inner tissue pixel)."""
    inner = ndimage.binary_erosion(layout.tissue, iterations=int(10 * UM))
    if site == "tumour_border" and layout.tumour.any():
        edge = ndimage.binary_dilation(layout.tumour, iterations=int(4 * UM)) \
            & ~ndimage.binary_erosion(layout.tumour, iterations=int(4 * UM))
        allowed = edge & inner
    else:
        allowed = inner & ~ndimage.binary_dilation(layout.tumour, iterations=int(12 * UM))
    if not allowed.any():
        allowed = inner if inner.any() else layout.tissue
    return allowed


def draw_background_states(rng: np.random.Generator, types: np.ndarray,
                           probabilities: dict[str, dict[str, float]]) -> np.ndarray:
    """State codes for cells outside niches: per type, the tissue's state probabilities (rest resting)."""
    states = np.zeros(len(types), np.int64)
    draw = rng.uniform(size=len(types))
    for short, per_state in probabilities.items():
        of_type = types == CELL_TYPE_INDEX[TYPE_BY_SHORT_NAME[short]]
        low = 0.0
        for state, p in per_state.items():
            states[of_type & (draw >= low) & (draw < low + p)] = STATE_INDEX[state]
            low += p
    return states


def plant_niches(rng: np.random.Generator, layout: TissueLayout, counts: dict[str, int],
                 state_probabilities: dict[str, dict[str, float]]) -> None:
    """Give every cell a state, then plant `counts[name]` instances of each niche (in place).

    Adds the cell arrays `planted` (index into :data:`NICHE_NAMES`, -1 none) and `state` (index
    into :data:`CELL_STATES`). Niches are placed in :data:`PLANTED_NICHES` order without overlapping
    each other; the cells they cover are removed. A niche that finds no room is left out (the
    tissue's structure labels are computed from the cells actually placed).
    """
    cells = layout.cells
    cells["planted"] = np.full(len(cells["y"]), -1, np.int64)
    cells["state"] = draw_background_states(rng, cells["type"].astype(int), state_probabilities)
    placed: list[tuple[float, float, float]] = []
    for code, niche in enumerate(PLANTED_NICHES):
        n = int(counts.get(niche.name, 0))
        if n <= 0:
            continue
        radii = np.sort(rng.uniform(*niche.radius_um, size=n) * UM)[::-1]
        allowed = _sites(layout, niche.site)
        for cy, cx, _ in placed:  # keep away from niches already planted
            yy, xx = np.ogrid[: allowed.shape[0], : allowed.shape[1]]
            allowed = allowed & ((yy - cy) ** 2 + (xx - cx) ** 2 > (2.0 * niche.radius_um[1] * UM) ** 2)
        for cy, cx, radius, _ in dart_throw_discs(rng, allowed, radii, gap=6 * UM):
            _plant_one(rng, layout, niche, code, cy, cx, radius)
            placed.append((cy, cx, radius))


def _plant_one(rng: np.random.Generator, layout: TissueLayout, niche: PlantedNiche, code: int,
               cy: float, cx: float, radius: float) -> None:
    """Clear a disc and fill it with the niche's cells in their niche states."""
    cells = layout.cells
    distance = np.hypot(cells["y"] - cy, cells["x"] - cx)
    keep = distance > radius + 3 * UM
    for k in list(cells):
        cells[k] = cells[k][keep]
    points = jittered_hex_grid(rng, layout.tissue.shape, 8.6 * UM, 0.1)
    relative = np.hypot(points[:, 0] - cy, points[:, 1] - cx) / radius
    points, relative = points[relative <= 1.0], relative[relative <= 1.0]
    types = draw_cell_types(rng, len(points), niche.composition)
    if niche.core is not None:
        types = np.where(relative < 0.55, draw_cell_types(rng, len(points), niche.core), types)
    inside = sample_at(layout.tissue, points)
    points, types = points[inside], types[inside]
    radius_px = _type_radius_px(types)
    keep_new = non_overlapping_mask(points, radius_px, np.stack([cells["y"], cells["x"]], 1),
                                    _type_radius_px(cells["type"]), factor=0.9)
    points, types = points[keep_new], types[keep_new]
    states = np.zeros(len(types), np.int64)
    for short, state in niche.states.items():
        states[types == CELL_TYPE_INDEX[TYPE_BY_SHORT_NAME[short]]] = STATE_INDEX[state]
    in_tumour = sample_at(layout.tumour, points)
    compartment = np.where(in_tumour, NICHES.index("tumor"), NICHES.index("stroma"))
    if niche.name == "tls":
        compartment[:] = NICHES.index("lymphoid_aggregate")
    _append(cells, points, types, compartment, np.full(len(types), code, np.int64), states)


def apply_cell_states(rng: np.random.Generator, levels: np.ndarray, keys: list[str], states: np.ndarray) -> None:
    """Change (in place) the (n_cells + 1, K) protein levels of cells by their state (row 0 = background).

    Draws one log-normal noise vector per (state, protein) in :data:`STATE_MARKERS` order, whatever
    the panel, so the states of a tissue do not depend on which proteins are rendered.
    """
    column = {k: j for j, k in enumerate(keys)}
    for state, changes in STATE_MARKERS.items():
        selected = np.flatnonzero(states == STATE_INDEX[state]) + 1
        for key, (how, amount) in changes.items():
            noise = np.exp(rng.normal(0, 0.25, len(selected))).astype(np.float32)
            if key not in column or not len(selected):
                continue
            j = column[key]
            if how == "add":
                levels[selected, j] += amount * noise
            else:
                levels[selected, j] *= amount


def niche_type_table() -> list[dict[str, object]]:
    """The planted niches as JSON-able rows (for the cohort manifest)."""
    return [{"name": n.name, "site": n.site, "radius_um": list(n.radius_um),
             "composition": {TYPE_BY_SHORT_NAME[k]: v for k, v in n.composition.items()},
             "core_composition": None if n.core is None else {TYPE_BY_SHORT_NAME[k]: v for k, v in n.core.items()},
             "states": {TYPE_BY_SHORT_NAME[k]: v for k, v in n.states.items()},
             "state_markers": {s: STATE_MARKERS[s] for s in sorted(set(n.states.values()))},
             "description": n.description} for n in PLANTED_NICHES]

