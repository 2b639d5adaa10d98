"""Virtual biomarker discovery from VirTues cell tokens (paper Fig. 5c–g, Methods "Identification of
FM-based biomarkers predictive of therapy response").

Protocol, step by step (statistics in :mod:`analysis.virtues_biomarker_stats`, compositions in
:mod:`analysis.virtues_biomarker_context`):

1. Cohort (:func:`discovery_cohort`): cells of the tissues taken at ``timepoint`` ("pre": "only
   patient samples collected prior to treatment") with a response label; a patient's cells are
   pooled over their tissues ("merged across their available samples"). Patients without any such
   cell are not in the cohort. Conflicting response labels of one patient are an error.
2. Clusters (:func:`token_graph`, :func:`leiden_sweep`): one neighbour graph for all resolutions —
   PCA of the tokens (``n_pcs`` components, arpack, seeded; skipped when tokens have <= n_pcs
   dimensions), exact 15-nearest-neighbour graph (scanpy's own NN-descent path fails with this
   scipy) with scanpy's umap connectivities (``connectivities="gauss"`` avoids umap's numba
   compilation, for tests), then ``sc.tl.leiden`` (igraph flavour, 2 iterations,
   modularity, seeded, like :func:`analysis.rosie_phenotyping.leiden_clusters`) at every resolution
   (paper: 4.0–5.0 in steps of 0.05; an argument because the useful range grows with cohort size).
   Clusters are numbered by decreasing size; a candidate is called ``r<resolution>_c<number>``.
3. Candidates (:func:`score_candidates`): every cluster of every resolution with fewer than
   ``max_cluster_cells`` cells (paper: 2000). Per candidate: per-patient proportion -> ranks 0–3,
   univariate logistic AUROC (stratified 4-fold × 10), risk ratio of response given rank > 1.
   Risk ratio > 1: response cluster; < 1: non-response cluster; = 1 or undefined: neither.
   Identical rank vectors (the same cluster at neighbouring resolutions) are scored once.
4. Selection (:func:`select_signatures`): the ``n_response`` response and ``n_nonresponse``
   non-response candidates with the highest mean AUROC "from all clusters identified across
   resolutions". Left open by the paper: a cluster reappears, nearly unchanged, at neighbouring
   resolutions, which would select the same cells twice; here a candidate whose Jaccard overlap with
   an already selected signature exceeds ``max_overlap`` (default 0.5) is skipped (``max_overlap=1``
   keeps the literal reading). AUROC ties go to the lower resolution, then the larger cluster.
   Names: RS1, RS2, ... and NRS1, NRS2, ... in order of AUROC.
5. Joint model: multivariate logistic regression on the selected ranks, stratified 4-fold × 25;
   baselines: univariate tumour:CD4, tumour:CD8, tumour:B cell ratios on the same folds; one-sided
   t-test of the signatures' fold AUROCs against each baseline's.
6. Interpretation: cell-type composition of each signature and neighbourhood composition inside vs
   outside (needs ``obsm['spatial']``; skipped with a log line otherwise).

The selection looks at the response labels, so the joint AUROC of step 5 is optimistic (selection
is not nested in the cross-validation) — as in the paper's protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from rich.progress import track

from analysis.cell_graphs import delaunay_edges
from analysis.virtues_biomarker_context import neighbourhood_composition, type_composition
from analysis.virtues_biomarker_stats import (cell_type_ratio, cv_auroc_folds, cv_splits, one_sided_t_test,
                                              patient_proportions, proportion_ranks, resolution_grid, risk_ratio)

log = logging.getLogger(__name__)

TUMOUR_TYPES: tuple[str, ...] = ("Tumor", "Tumour", "Tumor cells", "Tumour cells", "Cancer")
#: Ratio baselines: name -> the denominator cell types (numerator: the tumour types).
RATIO_TYPES: dict[str, tuple[str, ...]] = {
    "CD4": ("CD4_T", "CD4 T", "CD4 T cells", "CD4+ T cells", "CD4 T cell", "CD4"),
    "CD8": ("CD8_T", "CD8 T", "CD8 T cells", "CD8+ T cells", "CD8 T cell", "CD8"),
    "B": ("B_cell", "B cells", "B cell", "B"),
}


@dataclass(frozen=True)
class DiscoveryConfig:
    """Every number of the protocol (paper values as defaults) and the table's column names."""

    resolutions: tuple[float, ...] = tuple(resolution_grid(4.0, 5.0, 0.05))
    max_cluster_cells: int = 2000
    n_response: int = 2
    n_nonresponse: int = 2
    univariate_cv: tuple[int, int] = (4, 10)  # (folds, repeats)
    multivariate_cv: tuple[int, int] = (4, 25)
    max_overlap: float = 0.5
    n_pcs: int = 50
    n_neighbors: int = 15
    connectivities: str = "umap"  # scanpy's neighbour weights: "umap" (its default) or "gauss" (no numba JIT)
    seed: int = 0
    patient_column: str = "patient_id"
    timepoint_column: str = "timepoint"
    timepoint: str | None = "pre"
    response_column: str = "response"
    cell_type_column: str = "cell_type"
    tumour_types: tuple[str, ...] = TUMOUR_TYPES
    ratio_types: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(RATIO_TYPES))
    embedding: str = "umap"  # 2-D map for the figure: "umap", "pca" or "none"
    progress: bool = False


@dataclass
class BiomarkerDiscovery:
    """Everything the discovery computed; tables are what the command writes as CSV."""

    candidates: pd.DataFrame  # one row per candidate cluster: resolution, size, AUROC, risk ratio, kind
    signatures: pd.DataFrame  # the selected ones: signature (RS1, NRS1, ...), kind, candidate columns
    membership: pd.DataFrame  # cohort cells × signatures (bool) + tissue_id, patient_id; index = token obs names
    patients: pd.DataFrame  # patient × (response, n_cells, <signature> rank, ratio_<name>)
    folds: pd.DataFrame  # predictor, fold (0..), auroc — the joint model and the baselines
    comparison: pd.DataFrame  # predictor, auroc mean/std, t and one-sided p of the signatures vs it
    composition: pd.DataFrame
    neighbourhoods: pd.DataFrame
    embedding: np.ndarray | None  # (cells, 2) map for the figure, or None
    cell_types: np.ndarray
    summary: dict


def discovery_cohort(cells: ad.AnnData, tissues: pd.DataFrame,
                     config: DiscoveryConfig) -> tuple[ad.AnnData, np.ndarray, pd.Series]:
    """(cohort cells, patient of each cell, response per patient) — step 1 of the module docstring."""
    c = config
    needed = ["tissue_id", c.patient_column, c.response_column] + ([c.timepoint_column] if c.timepoint else [])
    missing = [col for col in needed if col not in tissues.columns]
    if missing:
        raise ValueError(f"tissue table has no column(s) {missing} (columns: {list(tissues.columns)})")
    table = tissues.assign(tissue_id=tissues["tissue_id"].astype(str))
    if c.timepoint:
        table = table[table[c.timepoint_column].astype(str).str.lower() == str(c.timepoint).lower()]
    table = table[table[c.response_column].notna() & table[c.patient_column].notna()]
    if c.cell_type_column not in cells.obs:
        raise ValueError(f"cell tokens have no column {c.cell_type_column!r} (columns: {list(cells.obs.columns)})")
    tissue_of_cell = cells.obs["tissue_id"].astype(str).to_numpy()
    keep = np.isin(tissue_of_cell, table["tissue_id"].to_numpy())
    if not keep.any():
        raise ValueError(f"no cell token belongs to a tissue with timepoint {c.timepoint!r} and a response label")
    patient_of_tissue = table.set_index("tissue_id")[c.patient_column].astype(str)
    cohort = cells[keep].copy()
    patient_of_cell = patient_of_tissue.loc[tissue_of_cell[keep]].to_numpy()
    responses = table.assign(p=table[c.patient_column].astype(str)).groupby("p")[c.response_column]
    if (responses.nunique() > 1).any():
        bad = responses.nunique()[responses.nunique() > 1].index.tolist()
        raise ValueError(f"patients {bad[:5]} have conflicting {c.response_column!r} labels across tissues")
    response = responses.first().astype(int).loc[sorted(set(patient_of_cell))].rename("response")
    return cohort, patient_of_cell, response


def token_graph(tokens: np.ndarray, *, n_pcs: int = 50, n_neighbors: int = 15, seed: int = 0,
                connectivities: str = "umap") -> ad.AnnData:
    """AnnData of the tokens with ``X_pca`` and scanpy's kNN connectivities (step 2)."""
    x = np.asarray(tokens, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("cell tokens must be finite")
    graph = ad.AnnData(x)
    n, d = x.shape
    if d > n_pcs and n > n_pcs + 1:
        sc.pp.pca(graph, n_comps=n_pcs, svd_solver="arpack", random_state=seed)
    else:
        graph.obsm["X_pca"] = x.copy()
    sc.pp.neighbors(graph, n_neighbors=min(n_neighbors, n - 1), use_rep="X_pca", random_state=seed,
                    transformer="sklearn", method=connectivities)
    return graph


def leiden_sweep(graph: ad.AnnData, resolutions: Sequence[float], *, seed: int = 0,
                 progress: bool = False) -> dict[float, np.ndarray]:
    """Leiden labels (0 = largest cluster) of the graph's cells at every resolution."""
    labelings: dict[float, np.ndarray] = {}
    for resolution in track(list(resolutions), description="Leiden", disable=not progress):
        sc.tl.leiden(graph, resolution=float(resolution), random_state=seed, flavor="igraph", n_iterations=2,
                     directed=False, key_added="_leiden")
        raw = graph.obs["_leiden"].astype(int).to_numpy()
        order = np.argsort(-np.bincount(raw), kind="stable")
        labelings[float(resolution)] = np.argsort(order)[raw].astype(np.int32)
    return labelings


def score_candidates(labelings: Mapping[float, np.ndarray], patient_of_cell: np.ndarray, response: pd.Series, *,
                     max_cluster_cells: int = 2000, cv: tuple[int, int] = (4, 10), seed: int = 0,
                     progress: bool = False) -> pd.DataFrame:
    """One row per candidate cluster (< ``max_cluster_cells`` cells) with its AUROC and risk ratio (step 3)."""
    patients, y = response.index.tolist(), response.to_numpy(int)
    codes = pd.Categorical(np.asarray(patient_of_cell).astype(str), categories=patients).codes
    cells_per_patient = np.bincount(codes, minlength=len(patients))
    splits = cv_splits(y, n_splits=cv[0], n_repeats=cv[1], seed=seed)
    cache: dict[bytes, tuple[float, float]] = {}
    rows = []
    for resolution, labels in track(list(labelings.items()), description="Scoring clusters", disable=not progress):
        sizes = np.bincount(labels)
        per_patient = np.zeros((len(sizes), len(patients)), dtype=np.int64)
        np.add.at(per_patient, (labels, codes), 1)
        for label in np.flatnonzero(sizes < max_cluster_cells):
            proportions = pd.Series(per_patient[label] / cells_per_patient, index=patients)
            ranks = proportion_ranks(proportions).to_numpy()
            key = ranks.astype(np.int8).tobytes()
            if key not in cache:
                folds = cv_auroc_folds(ranks, y, splits=splits)
                cache[key] = (float(folds.mean()), float(folds.std(ddof=1)))
            rr = risk_ratio(ranks > 1, y)
            kind = "response" if rr.rr > 1 else "non-response" if rr.rr < 1 else "none"
            rows.append({"candidate": f"r{resolution:.2f}_c{label}", "resolution": resolution, "cluster": int(label),
                         "n_cells": int(sizes[label]), "n_patients_present": int((ranks > 0).sum()),
                         "auroc": cache[key][0], "auroc_std": cache[key][1], "risk_ratio": rr.rr,
                         "rr_ci_lower": rr.lower, "rr_ci_upper": rr.upper, "responders_high": rr.exposed_events,
                         "n_high": rr.exposed_total, "responders_low": rr.unexposed_events, "n_low": rr.unexposed_total,
                         "kind": kind})
    columns = ["candidate", "resolution", "cluster", "n_cells", "n_patients_present", "auroc", "auroc_std",
               "risk_ratio", "rr_ci_lower", "rr_ci_upper", "responders_high", "n_high", "responders_low", "n_low", "kind"]
    return pd.DataFrame(rows, columns=columns)


def select_signatures(candidates: pd.DataFrame, labelings: Mapping[float, np.ndarray], *, n_response: int = 2,
                      n_nonresponse: int = 2, max_overlap: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(selected rows with a ``signature`` name, cells × signatures membership) — step 4."""
    ordered = candidates.sort_values(["auroc", "resolution", "n_cells"], ascending=[False, True, False], kind="stable")
    chosen: list[tuple[str, pd.Series, np.ndarray]] = []
    for kind, wanted, prefix in (("response", n_response, "RS"), ("non-response", n_nonresponse, "NRS")):
        picked = 0
        for _, row in ordered[ordered["kind"] == kind].iterrows():
            if picked == wanted:
                break
            member = labelings[float(row["resolution"])] == int(row["cluster"])
            overlaps = [(member & m).sum() / (member | m).sum() for _, _, m in chosen]
            if overlaps and max(overlaps) > max_overlap:
                continue
            picked += 1
            chosen.append((f"{prefix}{picked}", row, member))
        if picked < wanted:
            log.warning("only %d %s signature(s) found (wanted %d)", picked, kind, wanted)
    selected = pd.DataFrame([{"signature": name, **row.to_dict()} for name, row, _ in chosen],
                            columns=["signature", *candidates.columns])
    n_cells = len(next(iter(labelings.values()))) if labelings else 0
    membership = pd.DataFrame({name: member for name, _, member in chosen}, index=pd.RangeIndex(n_cells))
    return selected, membership


def ratio_baselines(cell_types: np.ndarray, patient_of_cell: np.ndarray, patients: Sequence[str],
                    tumour_types: Sequence[str], ratio_types: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """patients × ``ratio_<name>`` = (tumour + 1) / (<name> cells + 1)."""
    return pd.DataFrame({f"ratio_{name}": cell_type_ratio(cell_types, patient_of_cell, patients, tumour_types, types)
                         for name, types in ratio_types.items()})


def joint_comparison(ranks: pd.DataFrame, baselines: pd.DataFrame, response: pd.Series, *,
                     cv: tuple[int, int] = (4, 25), seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fold AUROCs, summary with one-sided t-tests of the signatures against each baseline) — step 5."""
    y = response.to_numpy(int)
    predictors = {"signatures": ranks.to_numpy(float)} if ranks.shape[1] else {}
    predictors.update({name: baselines[[name]].to_numpy(float) for name in baselines.columns})
    splits = cv_splits(y, n_splits=cv[0], n_repeats=cv[1], seed=seed)
    folds = {name: cv_auroc_folds(x, y, splits=splits) for name, x in predictors.items()}
    long = pd.DataFrame([{"predictor": name, "fold": i, "auroc": s} for name, sc_ in folds.items()
                         for i, s in enumerate(sc_)])
    rows = []
    for name, scores in folds.items():
        t, p = one_sided_t_test(folds["signatures"], scores) if "signatures" in folds and name != "signatures" \
            else (float("nan"), float("nan"))
        rows.append({"predictor": name, "auroc_mean": float(scores.mean()), "auroc_std": float(scores.std(ddof=1)),
                     "n_folds": len(scores), "t_signatures_vs_this": t, "p_one_sided": p})
    return long, pd.DataFrame(rows)


def discover_biomarkers(cells: ad.AnnData, tissues: pd.DataFrame,
                        config: DiscoveryConfig = DiscoveryConfig()) -> BiomarkerDiscovery:
    """Run steps 1–6 on cell tokens (``X``; ``obs``: tissue_id, cell type; ``obsm['spatial']``) and a tissue table."""
    c = config
    cohort, patient_of_cell, response = discovery_cohort(cells, tissues, c)
    n_folds = max(c.univariate_cv[0], c.multivariate_cv[0])
    counts = np.bincount(response.to_numpy(int), minlength=2)
    if counts.min() < n_folds:
        raise ValueError(f"{counts[1]} responders and {counts[0]} non-responders with pre-treatment cells: each class "
                         f"needs >= {n_folds} patients for stratified {n_folds}-fold cross-validation")
    log.info("discovery cohort: %d patients (%d responders), %d cells", len(response), counts[1], cohort.n_obs)
    graph = token_graph(cohort.X, n_pcs=c.n_pcs, n_neighbors=c.n_neighbors, seed=c.seed,
                        connectivities=c.connectivities)
    labelings = leiden_sweep(graph, c.resolutions, seed=c.seed, progress=c.progress)
    candidates = score_candidates(labelings, patient_of_cell, response, max_cluster_cells=c.max_cluster_cells,
                                  cv=c.univariate_cv, seed=c.seed, progress=c.progress)
    if candidates.empty:
        raise ValueError(f"no Leiden cluster has fewer than {c.max_cluster_cells} cells; raise the resolutions "
                         "or --max-cluster-cells")
    selected, membership = select_signatures(candidates, labelings, n_response=c.n_response,
                                             n_nonresponse=c.n_nonresponse, max_overlap=c.max_overlap)
    membership.index = cohort.obs_names
    patients = response.index.tolist()
    ranks = pd.DataFrame({name: proportion_ranks(patient_proportions(membership[name].to_numpy(), patient_of_cell,
                                                                     patients)) for name in membership.columns},
                         index=pd.Index(patients, name="patient_id"))
    cell_types = cohort.obs[c.cell_type_column].astype(str).to_numpy()
    baselines = ratio_baselines(cell_types, patient_of_cell, patients, c.tumour_types, c.ratio_types)
    folds, comparison = joint_comparison(ranks, baselines, response, cv=c.multivariate_cv, seed=c.seed)
    composition = type_composition(cell_types, membership)
    neighbourhoods = pd.DataFrame()
    if "spatial" in cohort.obsm:
        edges = delaunay_edges(np.asarray(cohort.obsm["spatial"], float), cohort.obs["tissue_id"].astype(str).to_numpy())
        neighbourhoods = neighbourhood_composition(cell_types, edges, membership)
    else:
        log.info("cell tokens carry no obsm['spatial']; neighbourhood composition skipped")
    embedding = None
    if c.embedding == "umap":
        sc.tl.umap(graph, random_state=c.seed)
        embedding = np.asarray(graph.obsm["X_umap"])
    elif c.embedding == "pca":
        embedding = np.asarray(graph.obsm["X_pca"])[:, :2]
    n_cells = pd.Series(patient_of_cell).value_counts().reindex(patients).to_numpy()
    patient_table = pd.concat([response.rename("response"), pd.Series(n_cells, index=patients, name="n_cells"),
                               ranks.set_axis(patients), baselines], axis=1).rename_axis("patient_id")
    membership.insert(0, "patient_id", patient_of_cell)
    membership.insert(0, "tissue_id", cohort.obs["tissue_id"].astype(str).to_numpy())
    joint = comparison.set_index("predictor")["auroc_mean"]
    base = joint.drop("signatures", errors="ignore")
    summary = {"n_patients": len(response), "n_responders": int(counts[1]), "n_cells": int(cohort.n_obs),
               "resolutions": [float(r) for r in c.resolutions], "n_candidates": len(candidates),
               "signatures": selected["signature"].tolist(), "candidates_of_signatures": selected["candidate"].tolist(),
               "multivariate_auroc": float(joint.get("signatures", float("nan"))),
               "best_baseline": str(base.idxmax()) if len(base) else None,
               "best_baseline_auroc": float(base.max()) if len(base) else float("nan"),
               "config": {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v)
                          for k, v in c.__dict__.items() if k != "progress"}}
    return BiomarkerDiscovery(candidates, selected, membership, patient_table, folds, comparison, composition,
                              neighbourhoods, embedding, cell_types, summary)
