"""The report section of ROSIE's downstream science, with the paper's own numbers beside ours.

The paper's values (Wu et al., Nature Communications 2025) are quoted from its text: cell
phenotyping average F1 0.507 on Stanford-PGC (0.411 on Ochsner-CRC); SCGP tissue structures ARI
0.475 / F1 0.624 for ROSIE and 0.105 / 0.229 for the morphology baseline; TIL count Pearson 0.805,
Spearman 0.329; LNE proportion Pearson 0.598, Spearman 0.575. The per-type F1 of Fig. 3A and the
baselines' phenotyping F1 are only plotted in the paper, so they are shown as "—".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PAPER: dict[str, dict[str, float]] = {
    "phenotyping_macro_f1": {"rosie": 0.507},
    "scgp_ari": {"rosie": 0.475, "cell_morphology": 0.105},
    "scgp_f1": {"rosie": 0.624, "cell_morphology": 0.229},
    "til_pearson": {"rosie": 0.805}, "til_spearman": {"rosie": 0.329},
    "lne_pearson": {"rosie": 0.598}, "lne_spearman": {"rosie": 0.575},
}
NAMES = {"rosie": "ROSIE", "cell_morphology": "Cell morphology", "bulk": "Bulk phenotyping", "measured": "Measured"}


def _fmt(value: object) -> str:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "—"
    return "—" if not np.isfinite(v) else f"{v:.3f}"


def _markdown(table: pd.DataFrame) -> list[str]:
    cells = [[_fmt(v) if isinstance(v, (float, np.floating)) else str(v) for v in row] for row in table.itertuples(index=False)]
    return ["| " + " | ".join(map(str, table.columns)) + " |", "|---" * len(table.columns) + "|",
            *("| " + " | ".join(row) + " |" for row in cells)]


def _paper(key: str, method: str) -> str:
    return _fmt(PAPER.get(key, {}).get(method))


def phenotyping_lines(scores: pd.DataFrame, proportions: pd.DataFrame | None) -> list[str]:
    macro = scores[scores["cell_type"] == "macro"].set_index("method")
    lines = ["### Cell phenotyping (Fig. 3)", "",
             "| method | macro F1 [95% CI] | paper (Stanford-PGC) |", "|---|---|---|"]
    for method in macro.index:
        row = macro.loc[method]
        lines.append(f"| {NAMES.get(method, method)} | {_fmt(row['f1'])} [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}] | "
                     f"{_paper('phenotyping_macro_f1', method)} |")
    per_type = scores[scores["cell_type"] != "macro"].pivot(index="cell_type", columns="method", values="f1")
    lines += ["", "F1 per cell type:", "", "| cell type | " + " | ".join(NAMES.get(m, m) for m in per_type.columns) + " |",
              "|---" * (len(per_type.columns) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(_fmt(v) for v in row) + " |" for t, row in per_type.iterrows()]
    if proportions is not None and len(proportions):
        lines += ["", "T-cell proportion per sample (measured vs predicted labels):", "", *_markdown(proportions)]
    return lines


def scgp_lines(scores: pd.DataFrame) -> list[str]:
    lines = ["### Tissue structures, SCGP (Fig. 4)", "",
             "| method | ARI (mean over samples) | F1 macro [95% CI] | paper ARI | paper F1 |", "|---|---|---|---|---|"]
    for method, group in scores.groupby("method", sort=False):
        row = group[group["sample"] == "all"].iloc[0] if (group["sample"] == "all").any() else group.iloc[0]
        lines.append(f"| {NAMES.get(method, method)} | {_fmt(row['ari'])} | {_fmt(row['f1_macro'])} "
                     f"[{_fmt(row.get('f1_macro_ci_low'))}, {_fmt(row.get('f1_macro_ci_high'))}] | "
                     f"{_paper('scgp_ari', method)} | {_paper('scgp_f1', method)} |")
    return lines


def neighbourhood_lines(correlations: pd.DataFrame) -> list[str]:
    lines = ["### TIL and LNE neighbourhoods (Fig. 5)", "",
             "| method | phenotype | samples | Pearson R | Spearman R | paper Pearson | paper Spearman |",
             "|---|---|---|---|---|---|---|"]
    key = {"n_til": "til", "lne_proportion": "lne"}
    for row in correlations.itertuples(index=False):
        k = key.get(row.phenotype, row.phenotype)
        lines.append(f"| {NAMES.get(row.method, row.method)} | {row.phenotype} | {int(row.n_samples)} | {_fmt(row.pearson_r)} | "
                     f"{_fmt(row.spearman_r)} | {_paper(f'{k}_pearson', row.method)} | {_paper(f'{k}_spearman', row.method)} |")
    return lines


def qc_lines(filters: pd.DataFrame) -> list[str]:
    lines = ["### Quality-control filters (Supplementary Fig. 6)", "",
             "| samples kept | n | mean Pearson R (ROSIE) |", "|---|---|---|"]
    lines += [f"| {r.filter} | {r.n_samples} | {_fmt(r.mean_pearson_r)} |" for r in filters.itertuples(index=False)]
    return lines


def report_section(tables: dict[str, pd.DataFrame], results: dict, figure_dir: str | None = ".") -> list[str]:
    """Markdown lines for every part that ran; ``figure_dir`` None leaves the figures out (terminal)."""
    settings = results.get("settings", {})
    lines = ["## ROSIE downstream science", "",
             f"{settings.get('n_cells', '?')} cells of {settings.get('n_samples', '?')} held-out samples "
             f"(split `{settings.get('split', '?')}`); the paper's numbers are from its text (real cohorts of "
             "hundreds of samples), ours from this run.", ""]
    figures = results.get("figures", [])
    if "phenotyping_f1" in tables:
        lines += phenotyping_lines(tables["phenotyping_f1"], tables.get("t_cell_proportions")) + [""]
        source = results.get("phenotyping", {})
        lines += [f"Reference labels: {source.get('reference', '?')}; kNN (k = {settings.get('knn_k', 100)}) on the top "
                  f"{len(source.get('knn_markers', []))} markers by Pearson R ({source.get('top_markers_from', '?')}).", ""]
    if "scgp_scores" in tables:
        lines += scgp_lines(tables["scgp_scores"]) + [""]
    if "neighbourhood_correlations" in tables:
        lines += neighbourhood_lines(tables["neighbourhood_correlations"]) + [""]
    if "qc_filters" in tables:
        lines += qc_lines(tables["qc_filters"]) + [""]
    if figure_dir is not None:
        lines += [f"![{name}]({figure_dir}/{name})" for name in figures]
    return lines
