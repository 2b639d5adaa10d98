"""What each modality measures: pixel sizes, ROSIE's 50-marker CODEX panel, the real 43-channel IMC
panel, and the channel tables written beside the images.

Why apart from the catalogue: a panel is an instrument's view of the proteins (names, accessions,
which channel reads which protein), and it is what other code needs (tests, benchmarks, training
configs read :data:`CODEX_CHANNELS`) without any of the simulation.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from datamodules.synthetic.catalogue import NO_SIGNAL_PROTEINS

HE_MPP = 0.5
CODEX_MPP = 0.5
IMC_MPP = 1.0
#: The simulation's pixel grid is the H&E one: every length in µm is multiplied by this.
PX_PER_UM = 1.0 / HE_MPP

#: Unmodified copies of the VirTues example dataset's IMC panel and ESM-2 embeddings (MIT, see
#: ATTRIBUTION.md there). Always read from here so output never depends on `../shared`.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "imc_example"

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
#: The protein key behind each CODEX channel, in panel order.
CODEX_PROTEIN_KEYS: tuple[str, ...] = tuple(k for _, _, k in CODEX_PANEL)
#: CODEX markers without any morphological signal (names as in the panel).
CODEX_NO_SIGNAL: tuple[str, ...] = tuple(c for c, _, k in CODEX_PANEL if k in NO_SIGNAL_PROTEINS)
#: Proteins whose CODEX channel the channel table marks `is_nuclear_marker`.
CODEX_NUCLEAR_PROTEINS = frozenset({"DNA", "FOXP3", "MKI67", "GATA3", "PCNA", "ATM", "TP63"})

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
#: IMC channels whose gain differs from 1 (the DNA intercalators are much brighter than antibodies).
IMC_GAIN_OVERRIDES: dict[str, float] = {"Iridium": 3.0, "Iridium (V2)": 6.0, "H3": 0.8}

HE_CHANNELS: tuple[str, ...] = ("R", "G", "B")


def codex_channels_table() -> pd.DataFrame:
    """The CODEX channel table written to `codex/channels.parquet`."""
    return pd.DataFrame({
        "channel_name": list(CODEX_CHANNELS),
        "uniprot_id": pd.array([u for _, u, _ in CODEX_PANEL], dtype="string"),
        "is_nuclear_marker": [k in CODEX_NUCLEAR_PROTEINS for _, _, k in CODEX_PANEL],
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
    """The H&E channel table: three RGB channels, no protein behind them."""
    return pd.DataFrame({"channel_name": list(HE_CHANNELS), "uniprot_id": pd.array([None] * 3, dtype="string"),
                         "is_nuclear_marker": False, "qc_pass": True})
