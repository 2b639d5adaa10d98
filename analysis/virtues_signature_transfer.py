"""Transfer of the discovered virtual biomarkers to an independent cohort and survival risk strata
(VirTues paper Fig. 5h–k, Methods "Transferring predictive virtual spatial biomarkers across datasets").

Protocol and the choices the Methods leave open:

1. Per signature a random forest (:func:`train_signature_classifier`): 200 trees, Gini, bootstrap,
   depth <= 16, seeded, on the discovery cohort's cell tokens, target = member of the signature.
   20 % of the cells (stratified by membership) are held out *first*; the remaining 80 % are balanced
   by down-sampling the majority class (non-members, as signatures are < 2,000 cells) to the
   minority's size. The held-out cells keep the cohort's imbalance; recall, precision, balanced
   accuracy and AUROC on them are reported. The forest trained on the 80 % is the one transferred.
2. Every cell of the independent cohort gets a yes/no membership per signature (forest majority
   vote, probability > 0.5); signatures are predicted independently, so one cell may carry several.
3. Per patient (cells pooled over the patient's tissues; ``timepoint`` filter optional): proportion
   of cells per signature -> ranks 0–3 with tertiles of the *independent* cohort's positive
   proportions ("mirroring the original discovery procedure"; :func:`analysis.virtues_biomarker_stats.proportion_ranks`).
4. ``R = Σ response-signature ranks − Σ non-response-signature ranks``; strata (:func:`risk_strata`):
   ``R > 2`` and ``R < −1`` as in the paper; the paper leaves R = 2 and R = −1 unassigned (its
   medium stratum is ``−1 < R < 2``): here both go to **medium** (medium = ``−1 <= R <= 2``).
   The paper calls ``R > 2`` high risk although R grows with the *response* signatures; that is its
   empirical finding on its cohort. ``high_r_is_high_risk=False`` names ``R > 2`` low risk instead
   (use it where response and survival go together, as in this project's synthetic cohort); the
   C-index follows the naming.
5. Kaplan–Meier per stratum; log-rank test high vs low; Harrell's C-index of the stratum as a risk
   score (low < medium < high; lifelines ``concordance_index(time, -risk, event)``, ties in risk
   count one half). Baselines: tertile ranks (1–3, :func:`analysis.virtues_biomarker_stats.tertile_ranks`)
   of the per-patient tumour:CD4, tumour:CD8, tumour:B cell ratios ((n+1)/(m+1)), tertile 3 = high
   risk; optionally a reference stratification given in the tissue table (paper: Meyer et al.'s).
6. Optionally (``phenotype_column``, e.g. immune inflamed / excluded / cold per tissue): for each
   signature the share of its predicted cells in tissues of each phenotype (Fig. 5i).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

from analysis.virtues_biomarker_stats import auroc, patient_proportions, proportion_ranks, tertile_ranks
from analysis.virtues_biomarkers import RATIO_TYPES, TUMOUR_TYPES, ratio_baselines

log = logging.getLogger(__name__)

RISK_ORDER = {"low": 0, "medium": 1, "high": 2}


@dataclass(frozen=True)
class TransferConfig:
    n_trees: int = 200
    max_depth: int = 16
    holdout: float = 0.2
    seed: int = 0
    n_jobs: int = 1
    high_above: float = 2.0  # R > high_above: the paper's high-risk stratum
    low_below: float = -1.0  # R < low_below: the paper's low-risk stratum
    high_r_is_high_risk: bool = True
    patient_column: str = "patient_id"
    time_column: str = "survival_time"
    event_column: str = "survival_event"
    timepoint_column: str = "timepoint"
    timepoint: str | None = None
    cell_type_column: str = "cell_type"
    tumour_types: tuple[str, ...] = TUMOUR_TYPES
    ratio_types: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(RATIO_TYPES))
    reference_column: str | None = None  # tissue-table column with a reference risk group/score
    phenotype_column: str | None = None  # tissue-table column with the immune phenotype (Fig. 5i)


@dataclass
class SignatureClassifier:
    signature: str
    kind: str  # "response" / "non-response"
    model: RandomForestClassifier
    metrics: dict


@dataclass
class TransferResult:
    classifiers: pd.DataFrame  # signature, kind, sizes and held-out metrics
    membership: pd.DataFrame  # independent cells × signatures (bool) + tissue_id, patient_id
    patients: pd.DataFrame  # patient × proportions, ranks, R, stratum, time, event, ratios, ratio tertiles
    survival: pd.DataFrame  # predictor × group sizes, events, log-rank high vs low, C-index
    phenotypes: pd.DataFrame  # signature × phenotype share of predicted cells (empty without a column)
    summary: dict
    models: list[SignatureClassifier] = field(default_factory=list)


def train_signature_classifier(tokens: np.ndarray, member: np.ndarray, *, signature: str = "signature",
                               kind: str = "response", config: TransferConfig = TransferConfig()) -> SignatureClassifier:
    """Random forest for one signature, balanced by down-sampling, scored on a 20 % hold-out (step 1)."""
    x, y = np.asarray(tokens, dtype=np.float32), np.asarray(member, dtype=bool)
    if y.sum() < 5 or (~y).sum() < 5:
        raise ValueError(f"{signature}: {int(y.sum())} members and {int((~y).sum())} non-members; need >= 5 of each")
    train, held = train_test_split(np.arange(len(y)), test_size=config.holdout, stratify=y, random_state=config.seed)
    rng = np.random.default_rng(config.seed)
    pos, neg = train[y[train]], train[~y[train]]
    n = min(len(pos), len(neg))
    balanced = np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))
    model = RandomForestClassifier(n_estimators=config.n_trees, criterion="gini", bootstrap=True,
                                   max_depth=config.max_depth, random_state=config.seed, n_jobs=config.n_jobs)
    model.fit(x[balanced], y[balanced])
    proba = model.predict_proba(x[held])[:, list(model.classes_).index(True)]
    pred, truth = proba > 0.5, y[held]
    recall = float((pred & truth).sum() / truth.sum())
    specificity = float((~pred & ~truth).sum() / (~truth).sum())
    metrics = {"n_members": int(y.sum()), "n_train_balanced": int(len(balanced)), "n_heldout": int(len(held)),
               "heldout_members": int(truth.sum()), "recall": recall,
               "precision": float((pred & truth).sum() / max(pred.sum(), 1)),
               "balanced_accuracy": (recall + specificity) / 2, "auroc": auroc(truth, proba)}
    return SignatureClassifier(signature, kind, model, metrics)


def predict_membership(classifiers: list[SignatureClassifier], tokens: np.ndarray) -> pd.DataFrame:
    """cells × signatures: forest probability of membership > 0.5 (step 2)."""
    x = np.asarray(tokens, dtype=np.float32)
    return pd.DataFrame({c.signature: c.model.predict_proba(x)[:, list(c.model.classes_).index(True)] > 0.5
                         for c in classifiers})


def risk_score(ranks: pd.DataFrame, kinds: Mapping[str, str]) -> pd.Series:
    """R = Σ ranks of response signatures − Σ ranks of non-response signatures (step 4)."""
    sign = pd.Series({s: 1 if kinds[s] == "response" else -1 for s in ranks.columns})
    return (ranks * sign).sum(axis=1).rename("R")


def risk_strata(r: pd.Series, *, high_above: float = 2.0, low_below: float = -1.0,
                high_r_is_high_risk: bool = True) -> pd.Series:
    """Risk group per patient: R > high_above, R < low_below, medium in between *inclusive* (step 4)."""
    top, bottom = ("high", "low") if high_r_is_high_risk else ("low", "high")
    return pd.Series(np.where(r > high_above, top, np.where(r < low_below, bottom, "medium")), index=r.index,
                     name="stratum")


def survival_comparison(groups: pd.Series, time: pd.Series, event: pd.Series) -> dict:
    """Group sizes and events, log-rank high vs low, C-index of the group as risk (step 5)."""
    from lifelines.statistics import logrank_test
    from lifelines.utils import concordance_index

    t, e = time.loc[groups.index].astype(float), event.loc[groups.index].astype(bool)
    row: dict = {}
    for level in ("low", "medium", "high"):
        row[f"n_{level}"], row[f"events_{level}"] = int((groups == level).sum()), int(e[groups == level].sum())
    hi, lo = groups == "high", groups == "low"
    if hi.any() and lo.any():
        test = logrank_test(t[hi], t[lo], event_observed_A=e[hi], event_observed_B=e[lo])
        row["logrank_statistic"], row["logrank_p"] = float(test.test_statistic), float(test.p_value)
    else:
        row["logrank_statistic"], row["logrank_p"] = float("nan"), float("nan")
    risk = groups.map(RISK_ORDER).astype(float)
    row["c_index"] = float(concordance_index(t, -risk, e)) if e.any() else float("nan")
    return row


def reference_groups(values: pd.Series) -> pd.Series:
    """A reference stratification as low/medium/high: words are kept, numbers are cut into tertiles."""
    words = values.astype(str).str.strip().str.lower()
    if words.isin(RISK_ORDER).all():
        return words
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any():
        raise ValueError("reference risk column must hold low/medium/high or numbers (higher = higher risk)")
    return tertile_ranks(numeric).map({1: "low", 2: "medium", 3: "high"})


def independent_cohort(cells: ad.AnnData, tissues: pd.DataFrame,
                       config: TransferConfig) -> tuple[np.ndarray, pd.DataFrame]:
    """(cell mask of the cohort, patient table with time, event and per-tissue extras) — step 3."""
    c = config
    needed = ["tissue_id", c.patient_column, c.time_column, c.event_column] + \
        ([c.timepoint_column] if c.timepoint else []) + [col for col in (c.reference_column,) if col]
    missing = [col for col in needed if col not in tissues.columns]
    if missing:
        raise ValueError(f"tissue table has no column(s) {missing} (columns: {list(tissues.columns)})")
    table = tissues.assign(tissue_id=tissues["tissue_id"].astype(str))
    if c.timepoint:
        table = table[table[c.timepoint_column].astype(str).str.lower() == str(c.timepoint).lower()]
    table = table[table[c.time_column].notna() & table[c.event_column].notna() & table[c.patient_column].notna()]
    keep = cells.obs["tissue_id"].astype(str).isin(table["tissue_id"]).to_numpy()
    if not keep.any():
        raise ValueError("no cell token belongs to a tissue with survival data")
    table = table.assign(patient_id=table[c.patient_column].astype(str))
    per_patient = table.groupby("patient_id")
    for column in (c.time_column, c.event_column):
        if (per_patient[column].nunique() > 1).any():
            raise ValueError(f"patients have conflicting {column!r} values across tissues")
    columns = {"time": c.time_column, "event": c.event_column, **({"reference": c.reference_column}
                                                                  if c.reference_column else {})}
    patients = pd.DataFrame({k: per_patient[v].first() for k, v in columns.items()})
    return keep, patients


def transfer_signatures(discovery_cells: ad.AnnData, discovery_membership: pd.DataFrame, signatures: pd.DataFrame,
                        cells: ad.AnnData, tissues: pd.DataFrame,
                        config: TransferConfig = TransferConfig()) -> TransferResult:
    """Steps 1–6: train on ``discovery_membership`` (index = discovery token obs names, one bool column per
    signature of ``signatures``' ``signature``/``kind`` rows), predict on ``cells`` (independent cohort)."""
    c = config
    names = signatures["signature"].astype(str).tolist()
    kinds = dict(zip(names, signatures["kind"].astype(str)))
    if not names:
        raise ValueError("no signature to transfer (the discovery selected none)")
    absent = discovery_membership.index.difference(discovery_cells.obs_names)
    if len(absent):
        raise ValueError(f"{len(absent)} signature cells (e.g. {absent[0]!r}) are not in the discovery tokens; "
                         "pass the token folder the biomarkers were discovered on")
    if discovery_cells.n_vars != cells.n_vars:
        raise ValueError(f"discovery tokens have {discovery_cells.n_vars} dimensions, the independent cohort's "
                         f"{cells.n_vars}: both must come from the same model")
    train_x = np.asarray(discovery_cells[discovery_membership.index].X)
    models = [train_signature_classifier(train_x, discovery_membership[s].to_numpy(bool), signature=s,
                                         kind=kinds[s], config=c) for s in names]
    classifiers = pd.DataFrame([{"signature": m.signature, "kind": m.kind, **m.metrics} for m in models])
    keep, patients = independent_cohort(cells, tissues, c)
    cohort = cells[keep]
    tissue_of_cell = cohort.obs["tissue_id"].astype(str).to_numpy()
    patient_of_tissue = tissues.assign(tissue_id=tissues["tissue_id"].astype(str)).drop_duplicates("tissue_id") \
        .set_index("tissue_id")[c.patient_column].astype(str)
    patient_of_cell = patient_of_tissue.loc[tissue_of_cell].to_numpy()
    patients = patients.loc[sorted(set(patient_of_cell))]
    ids = patients.index.tolist()
    membership = predict_membership(models, np.asarray(cohort.X)).set_index(cohort.obs_names)
    proportions = pd.DataFrame({s: patient_proportions(membership[s].to_numpy(), patient_of_cell, ids) for s in names})
    ranks = proportions.apply(proportion_ranks)
    r = risk_score(ranks, kinds)
    strata = risk_strata(r, high_above=c.high_above, low_below=c.low_below, high_r_is_high_risk=c.high_r_is_high_risk)
    table = pd.concat([patients, proportions.add_prefix("proportion_"), ranks.add_prefix("rank_"), r, strata], axis=1)
    survival = [{"predictor": "signatures_R", **survival_comparison(strata, table["time"], table["event"])}]
    if c.cell_type_column in cohort.obs:
        types = cohort.obs[c.cell_type_column].astype(str).to_numpy()
        ratios = ratio_baselines(types, patient_of_cell, ids, c.tumour_types, c.ratio_types)
        for name in ratios.columns:
            groups = tertile_ranks(ratios[name]).map({1: "low", 2: "medium", 3: "high"})
            table[name], table[f"{name}_group"] = ratios[name], groups
            survival.append({"predictor": name, **survival_comparison(groups, table["time"], table["event"])})
    else:
        log.info("independent cells have no %r column; ratio baselines skipped", c.cell_type_column)
    if c.reference_column:
        table["reference_group"] = reference_groups(table["reference"])
        survival.append({"predictor": "reference", **survival_comparison(table["reference_group"], table["time"],
                                                                         table["event"])})
    phenotypes = pd.DataFrame()
    if c.phenotype_column:
        if c.phenotype_column not in tissues.columns:
            raise ValueError(f"tissue table has no column {c.phenotype_column!r}")
        phenotype = tissues.assign(tissue_id=tissues["tissue_id"].astype(str)).drop_duplicates("tissue_id") \
            .set_index("tissue_id")[c.phenotype_column].astype(str).loc[tissue_of_cell].to_numpy()
        phenotypes = pd.DataFrame({s: pd.Series(phenotype[membership[s].to_numpy()]).value_counts(normalize=True)
                                   for s in names}).fillna(0.0).T.rename_axis("signature")
    membership.insert(0, "patient_id", patient_of_cell)
    membership.insert(0, "tissue_id", tissue_of_cell)
    survival_table = pd.DataFrame(survival)
    summary = {"n_patients": len(ids), "n_events": int(table["event"].astype(bool).sum()), "n_cells": int(cohort.n_obs),
               "signatures": names,
               "strata": {k: int(v) for k, v in strata.value_counts().items()},
               "logrank_p": float(survival_table["logrank_p"].iloc[0]),
               "c_index": float(survival_table["c_index"].iloc[0]),
               "ties": "R == high_above and R == low_below are medium",
               "high_r_is_high_risk": c.high_r_is_high_risk}
    return TransferResult(classifiers, membership, table.rename_axis("patient_id"), survival_table, phenotypes,
                          summary, models)
