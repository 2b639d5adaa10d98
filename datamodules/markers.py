"""Marker panels and the alias table that matches marker names across studies.

Studies spell the same antibody target differently (`PanCK` / `Pan-Cytokeratin`, `CD3e` / `CD3`).
Names are matched through :func:`canonical_marker`: case-, space- and punctuation-insensitive,
then through :data:`MARKER_ALIASES`. Extend the table rather than renaming channels in data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: ROSIE's 50 markers, in the paper's order of prevalence (Methods).
ROSIE_PANEL: tuple[str, ...] = (
    "DAPI", "CD45", "CD68", "CD14", "PDI", "FoxP3", "CD8", "HLA-DR", "PanCK", "CD3e", "CD4", "aSMA", "CD31",
    "Vimentin", "CD45RO", "Ki67", "CD20", "CD11c", "Podoplanin", "PDL1", "GranzymeB", "CD38", "CD141", "CD21",
    "CD163", "BCL2", "LAG3", "EpCAM", "CD44", "ICOS", "GATA3", "Gal3", "CD39", "CD34", "TIGIT", "ECad", "CD40",
    "VISTA", "HLA-A", "MPO", "PCNA", "ATM", "TP63", "IFNg", "Keratin8/18", "IDO1", "CD79a", "HLA-E",
    "CollagenIV", "CD66",
)

#: alias -> canonical name (keys are compared after :func:`_squash`).
MARKER_ALIASES: dict[str, str] = {
    "pancytokeratin": "PanCK", "pankeratin": "PanCK", "panck": "PanCK", "cytokeratin": "PanCK",
    "ecadherin": "ECad", "ecad": "ECad", "cdh1": "ECad",
    "cd3": "CD3e", "cd3e": "CD3e", "cd3epsilon": "CD3e",
    "foxp3": "FoxP3",
    "cd8": "CD8", "cd8a": "CD8",
    "hladr": "HLA-DR",
    "asma": "aSMA", "sma": "aSMA", "alphasma": "aSMA", "acta2": "aSMA",
    "vimentin": "Vimentin", "vim": "Vimentin",
    "ki67": "Ki67", "mki67": "Ki67",
    "pdl1": "PDL1", "cd274": "PDL1",
    "granzymeb": "GranzymeB", "gzmb": "GranzymeB",
    "podoplanin": "Podoplanin", "pdpn": "Podoplanin",
    "galectin3": "Gal3", "gal3": "Gal3", "mac2": "Gal3", "mac2galectin3": "Gal3", "lgals3": "Gal3",
    "keratin818": "Keratin8/18", "ck818": "Keratin8/18", "cytokeratin818": "Keratin8/18",
    "collageniv": "CollagenIV", "collagen4": "CollagenIV", "col4": "CollagenIV",
    "ifng": "IFNg", "ifngamma": "IFNg", "interferongamma": "IFNg",
    "hlaa": "HLA-A", "hlae": "HLA-E",
    "p63": "TP63", "tp63": "TP63",
    "cd45ro": "CD45RO", "cd79a": "CD79a", "cd66": "CD66", "cd66b": "CD66",
    "dapi": "DAPI", "hoechst": "DAPI", "dsdna": "DAPI",
    "ido": "IDO1", "ido1": "IDO1",
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


_CANONICAL_BY_SQUASH = {_squash(m): m for m in ROSIE_PANEL}


def canonical_marker(name: str) -> str:
    """The panel's spelling of `name` when known, else `name` unchanged."""
    key = _squash(name)
    if key in MARKER_ALIASES:
        return MARKER_ALIASES[key]
    return _CANONICAL_BY_SQUASH.get(key, str(name))


def match_markers(panel: Sequence[str], available: Iterable[str]) -> dict[str, str]:
    """Map each panel marker to the name it has in `available` (missing ones are left out)."""
    by_canonical: dict[str, str] = {}
    for name in available:
        by_canonical.setdefault(canonical_marker(name), str(name))
    return {m: by_canonical[canonical_marker(m)] for m in panel if canonical_marker(m) in by_canonical}
