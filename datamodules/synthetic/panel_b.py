"""A second IMC-like panel that shares only part of the first (real 43-channel) panel's markers.

Why: the paper transfers a cell-type classifier from one lung IMC cohort to another whose panel
overlaps only partly (Fig. 3e-g), using the markers common to both. Panel B keeps 20 of panel A's
channels under the same names and UniProt ids (the lineage markers a classifier needs, plus a few
state markers) and adds 10 channels panel A lacks (GranzymeB, CD163, PD-L1, ...). The project ships
ESM-2 embeddings only for panel A's proteins, so panel B's own markers have none: VirTues leaves them
out and reports why, which is the paper's protocol anyway (shared markers only). The instrument
differs too: :func:`~datamodules.synthetic.render_multiplex.render_imc` draws its per-channel
brightness by channel position, so the shared markers have other gains in panel B.
"""

from __future__ import annotations

import pandas as pd

from datamodules.synthetic.catalogue import NO_SIGNAL_PROTEINS
from datamodules.synthetic.panels import IMC_PROTEIN, imc_channels_table

#: Panel A channels kept in panel B (names exactly as in panel A).
PANEL_B_SHARED: tuple[str, ...] = (
    "Iridium", "CD45RA+CD45RO", "CD3e", "CD8", "CD4", "FOXP3", "CD20", "CD68", "panCK", "SMA", "VIM",
    "CD31+vWF", "HLA-DR", "Ki-67", "PD-1", "FAP", "Collagen I+Fibronectin", "MPO", "TCF1/TCF7", "IDO",
)
#: Channels only panel B has: (channel name, UniProt accession, protein key of the catalogue).
PANEL_B_ONLY: tuple[tuple[str, str, str], ...] = (
    ("GranzymeB", "P10144", "GZMB"),
    ("CD163", "Q86VB7", "CD163"),
    ("PD-L1", "Q9NZQ7", "CD274"),
    ("CD11c", "P20702", "ITGAX"),
    ("E-Cadherin", "P12830", "CDH1"),
    ("CD14", "P08571", "CD14"),
    ("CD38", "P28907", "CD38"),
    ("CD79a", "P11912", "CD79A"),
    ("EpCAM", "P16422", "EPCAM"),
    ("CD39", "P49961", "ENTPD1"),
)
#: Channel name → protein key, for every panel B channel.
PANEL_B_PROTEIN: dict[str, str] = {**{c: IMC_PROTEIN[c] for c in PANEL_B_SHARED}, **{c: k for c, _, k in PANEL_B_ONLY}}
PANEL_B_CHANNELS: tuple[str, ...] = PANEL_B_SHARED + tuple(c for c, _, _ in PANEL_B_ONLY)


def panel_b_channels_table() -> pd.DataFrame:
    """Panel B's channel table, with the columns of panel A's (shared rows copied from it unchanged)."""
    a = imc_channels_table().set_index("channel_name")
    shared = a.loc[list(PANEL_B_SHARED)].reset_index()
    own = pd.DataFrame({
        "channel_name": [c for c, _, _ in PANEL_B_ONLY],
        "qc_pass": True,
        "uniprot_id": pd.array([u for _, u, _ in PANEL_B_ONLY], dtype="string"),
        "is_nuclear_marker": False,
        "description": pd.array([None] * len(PANEL_B_ONLY), dtype=a["description"].dtype),
        "original_channel_name": [c for c, _, _ in PANEL_B_ONLY],
        "no_morphological_signal": [k in NO_SIGNAL_PROTEINS for _, _, k in PANEL_B_ONLY],
    })
    table = pd.concat([shared, own[shared.columns]], ignore_index=True)
    table["uniprot_id"] = table["uniprot_id"].astype("string")
    return table
