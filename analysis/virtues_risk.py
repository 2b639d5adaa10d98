"""Risk stratification from the composition of cell-token clusters (paper Fig. 4a–d, Methods
"Tissue structure-based risk stratification").

Protocol: cluster all cell tokens with k-means (paper: 120 clusters); describe each tissue by the
proportion of its cells in each cluster; group tissues by k-means on those proportion vectors
(paper: 4 groups); merge the groups into a high-risk and a low-risk half by their observed risk
(paper: two groups turned out higher-risk and two lower-risk — here the groups are ordered by
their Nelson–Aalen cumulative hazard at the median follow-up and split in the middle); compare the two
with Kaplan–Meier curves and a log-rank test.

The merge looks at the outcome, so the log-rank p-value is optimistic (the paper's protocol has
the same property); the grouping itself does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


def cluster_proportions(tokens: np.ndarray, tissue_of_cell: Sequence[str], n_clusters: int = 120,
                        seed: int = 0) -> pd.DataFrame:
    """(tissues × clusters) share of each tissue's cells in each k-means cluster of the cell tokens."""
    from sklearn.cluster import KMeans

    tokens = np.asarray(tokens, dtype=np.float32)
    if len(tokens) < n_clusters:
        raise ValueError(f"{len(tokens)} cells cannot form {n_clusters} clusters; lower n_clusters")
    labels = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(tokens)
    table = pd.crosstab(pd.Series(np.asarray(tissue_of_cell).astype(str), name="tissue_id"),
                        pd.Series(labels, name="cluster"), normalize="index")
    return table.reindex(columns=range(n_clusters), fill_value=0.0)


def group_tissues(proportions: pd.DataFrame, n_groups: int = 4, seed: int = 0) -> pd.Series:
    from sklearn.cluster import KMeans

    if len(proportions) < n_groups:
        raise ValueError(f"{len(proportions)} tissues cannot form {n_groups} groups")
    groups = KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit_predict(proportions.to_numpy())
    return pd.Series(groups, index=proportions.index, name="group")


def cumulative_hazard_at(time: np.ndarray, event: np.ndarray, horizon: float) -> float:
    """Nelson–Aalen cumulative hazard at ``horizon`` (0 when no event happens before it)."""
    from lifelines import NelsonAalenFitter

    if len(time) == 0:
        return float("nan")
    fitter = NelsonAalenFitter().fit(time, event_observed=event)
    return float(fitter.cumulative_hazard_at_times(min(horizon, float(np.max(time)))).iloc[0])


@dataclass
class RiskStratification:
    groups: pd.Series  # tissue -> k-means group
    group_hazard: pd.Series  # group -> cumulative hazard at the median follow-up
    risk: pd.Series  # tissue -> "high" / "low"
    logrank_p: float
    logrank_statistic: float


def stratify(groups: pd.Series, time: pd.Series, event: pd.Series) -> RiskStratification:
    """Merge k-means groups into high / low risk by cumulative hazard and test the split (log-rank)."""
    from lifelines.statistics import logrank_test

    time, event = time.loc[groups.index].astype(float), event.loc[groups.index].astype(bool)
    horizon = float(np.median(time))
    hazard = pd.Series({g: cumulative_hazard_at(time[groups == g].to_numpy(), event[groups == g].to_numpy(), horizon)
                        for g in sorted(groups.unique())}, name="cumulative_hazard")
    order = hazard.sort_values(kind="stable").index.tolist()
    high = set(order[len(order) // 2 :])
    risk = groups.map(lambda g: "high" if g in high else "low").rename("risk")
    hi, lo = risk == "high", risk == "low"
    test = logrank_test(time[hi], time[lo], event_observed_A=event[hi], event_observed_B=event[lo])
    return RiskStratification(groups, hazard, risk, float(test.p_value), float(test.test_statistic))


def plot_kaplan_meier(result: RiskStratification, time: pd.Series, event: pd.Series, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for level, colour in (("low", "tab:blue"), ("high", "tab:red")):
        ids = result.risk.index[result.risk == level]
        KaplanMeierFitter().fit(time.loc[ids].astype(float), event.loc[ids].astype(bool),
                                label=f"{level} risk (n={len(ids)})").plot_survival_function(ax=ax, color=colour, ci_show=True)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_title(f"Cell-token cluster groups, log-rank p = {result.logrank_p:.3g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
