"""Figures of the virtual-biomarker analyses, in the style of VirTues paper Fig. 5c–g and 5j–k.

Each function takes the tables the analyses return (:mod:`analysis.virtues_biomarkers`,
:mod:`analysis.virtues_signature_transfer`) and writes one PNG; matplotlib is imported lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

KIND_COLOURS = {"response": "tab:green", "non-response": "tab:red", "none": "lightgrey"}
STRATUM_COLOURS = {"low": "tab:blue", "medium": "tab:orange", "high": "tab:red"}


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    _pyplot().close(fig)
    return Path(path)


def plot_candidates(candidates: pd.DataFrame, signatures: pd.DataFrame, path: str | Path) -> Path:
    """Fig. 5c: univariate AUROC of every candidate cluster against the Leiden resolution."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    jitter = np.random.default_rng(0).uniform(-0.01, 0.01, len(candidates))
    for kind, colour in KIND_COLOURS.items():
        part = candidates["kind"] == kind
        ax.scatter(candidates["resolution"][part] + jitter[part.to_numpy()], candidates["auroc"][part], s=8,
                   color=colour, alpha=0.6, label=kind)
    for _, row in signatures.iterrows():
        ax.scatter(row["resolution"], row["auroc"], s=80, marker="*", color="black")
        ax.annotate(row["signature"], (row["resolution"], row["auroc"]), xytext=(4, 4), textcoords="offset points",
                    fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("Leiden resolution")
    ax.set_ylabel("univariate CV AUROC")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Candidate clusters (< max cells) and selected signatures", fontsize=9)
    return _save(fig, path)


def plot_embedding(embedding: np.ndarray, cell_types: np.ndarray, membership: pd.DataFrame, path: str | Path,
                   max_points: int = 50_000) -> Path:
    """Fig. 5d: the 2-D map of the cohort's cells by cell type, with the signatures' cells outlined."""
    plt = _pyplot()
    rng = np.random.default_rng(0)
    n = len(embedding)
    shown = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    types = np.asarray(cell_types).astype(str)
    for i, t in enumerate(sorted(set(types))):
        sel = shown[types[shown] == t]
        ax.scatter(embedding[sel, 0], embedding[sel, 1], s=2, color=plt.cm.tab20(i % 20), label=t, alpha=0.5)
    signature_columns = [c for c in membership.columns if c not in ("tissue_id", "patient_id")]
    for j, name in enumerate(signature_columns):
        sel = np.flatnonzero(membership[name].to_numpy(bool))
        ax.scatter(embedding[sel, 0], embedding[sel, 1], s=10, facecolors="none",
                   edgecolors=plt.cm.Dark2(j % 8), linewidths=0.6, label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_title("Cohort cells by type; signature cells outlined", fontsize=9)
    return _save(fig, path)


def plot_auroc_comparison(folds: pd.DataFrame, comparison: pd.DataFrame, path: str | Path) -> Path:
    """Fig. 5e: fold AUROCs of the joint signature model and the ratio baselines, one-sided t-test p."""
    plt = _pyplot()
    names = comparison["predictor"].tolist()
    data = [folds.loc[folds["predictor"] == n, "auroc"].to_numpy() for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.6))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, fontsize=8)
    for i, (scores, (_, row)) in enumerate(zip(data, comparison.iterrows()), start=1):
        ax.scatter(np.full(len(scores), i) + np.random.default_rng(i).uniform(-0.15, 0.15, len(scores)), scores,
                   s=4, alpha=0.4, color="tab:blue")
        if np.isfinite(row["p_one_sided"]):
            ax.annotate(f"p={row['p_one_sided']:.1e}", (i, 1.02), ha="center", fontsize=7, annotation_clip=False)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("CV AUROC (response)")
    ax.set_title("Joint signatures vs ratio baselines (p: signatures > baseline)", fontsize=9, pad=14)
    return _save(fig, path)


def plot_composition(composition: pd.DataFrame, path: str | Path) -> Path:
    """Fig. 5f: cell-type composition of each signature beside all cells (stacked bars)."""
    plt = _pyplot()
    table = composition.pivot(index="signature", columns="cell_type", values="proportion").fillna(0.0)
    order = ["all cells"] + [s for s in composition["signature"].unique() if s != "all cells"]
    table = table.loc[[s for s in order if s in table.index]]
    fig, ax = plt.subplots(figsize=(1.0 * len(table) + 3, 3.6))
    bottom = np.zeros(len(table))
    for i, t in enumerate(table.columns):
        ax.bar(range(len(table)), table[t], bottom=bottom, color=plt.cm.tab20(i % 20), label=t)
        bottom += table[t].to_numpy()
    ax.set_xticks(range(len(table)), table.index, fontsize=8)
    ax.set_ylabel("share of cells")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_title("Cell-type composition of the signatures", fontsize=9)
    return _save(fig, path)


def plot_neighbourhoods(neighbourhoods: pd.DataFrame, path: str | Path, *, centres: int = 3, neighbours: int = 5) -> Path:
    """Fig. 5g: per signature, the most frequent centre types' neighbour shares inside vs outside (* p < 0.05)."""
    plt = _pyplot()
    signatures = neighbourhoods["signature"].unique().tolist() if len(neighbourhoods) else []
    fig, axes = plt.subplots(max(len(signatures), 1), centres, figsize=(3.2 * centres, 2.6 * max(len(signatures), 1)),
                             squeeze=False)
    for r, name in enumerate(signatures):
        part = neighbourhoods[neighbourhoods["signature"] == name]
        top = part.drop_duplicates("centre_type").nlargest(centres, "n_centre_inside")["centre_type"].tolist()
        for col in range(centres):
            ax = axes[r, col]
            if col >= len(top):
                ax.axis("off")
                continue
            rows = part[part["centre_type"] == top[col]].nlargest(neighbours, "share_inside")
            x = np.arange(len(rows))
            ax.bar(x - 0.2, rows["share_inside"], 0.4, color="black", label="inside")
            ax.bar(x + 0.2, rows["share_outside"], 0.4, color="grey", label="outside")
            for xi, p in zip(x, rows["p_value"]):
                if p < 0.05:
                    ax.annotate("*", (xi, max(rows["share_inside"].max(), rows["share_outside"].max())), ha="center")
            ax.set_xticks(x, rows["neighbour_type"], rotation=30, fontsize=6)
            ax.set_title(f"{name}: neighbours of {top[col]}", fontsize=8)
            if col == 0:
                ax.set_ylabel("share of neighbours", fontsize=7)
                ax.legend(fontsize=6)
    if not signatures:
        axes[0, 0].text(0.5, 0.5, "no spatial coordinates", ha="center")
    return _save(fig, path)


def plot_kaplan_meier(patients: pd.DataFrame, survival: pd.DataFrame, path: str | Path) -> Path:
    """Fig. 5j/Suppl. 23: Kaplan–Meier curves per risk group for R and every baseline, log-rank p and C-index."""
    plt = _pyplot()
    from lifelines import KaplanMeierFitter

    columns = {"signatures_R": "stratum", "reference": "reference_group"}
    predictors = survival["predictor"].tolist()
    fig, axes = plt.subplots(1, len(predictors), figsize=(3.6 * len(predictors), 3.2), squeeze=False)
    for ax, (_, row) in zip(axes[0], survival.iterrows()):
        groups = patients[columns.get(row["predictor"], f"{row['predictor']}_group")]
        for level, colour in STRATUM_COLOURS.items():
            ids = groups.index[groups == level]
            if len(ids):
                KaplanMeierFitter().fit(patients.loc[ids, "time"].astype(float), patients.loc[ids, "event"].astype(bool),
                                        label=f"{level} (n={len(ids)})").plot_survival_function(
                    ax=ax, color=colour, ci_show=False)
        ax.set_title(f"{row['predictor']}: log-rank p={row['logrank_p']:.2g}, C={row['c_index']:.3f}", fontsize=8)
        ax.set_xlabel("time")
        ax.set_ylabel("survival probability")
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_c_index(survival: pd.DataFrame, path: str | Path) -> Path:
    """Fig. 5k: C-index of the signature risk groups and the baselines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(survival) + 2, 3.2))
    ax.bar(range(len(survival)), survival["c_index"], color=["tab:purple"] + ["grey"] * (len(survival) - 1))
    ax.set_xticks(range(len(survival)), survival["predictor"], rotation=20, fontsize=8)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("C-index")
    return _save(fig, path)
