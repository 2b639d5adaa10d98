"""Summary tables of a masked-reconstruction evaluation: mean over markers per strategy and method,
per seen/unseen marker and per dataset (NaN markers left out of the mean)."""

from __future__ import annotations

import logging

import pandas as pd

from analysis.virtues_reconstruction_data import SEEN_SUMMARY_COLUMNS, STRATEGIES, SUMMARY_COLUMNS

# ============================================================================================
# Summaries
# ============================================================================================

log = logging.getLogger("analysis.virtues_reconstruction")


def _order(df: pd.DataFrame) -> pd.DataFrame:
    strat = {s: i for i, s in enumerate(STRATEGIES)}
    meth = {"virtues": 0, "visible_mean": 1, "most_correlated": 2}
    return df.sort_values(["strategy", "method"], key=lambda s: s.map(strat if s.name == "strategy" else meth).fillna(99))


def summarise(per_marker: pd.DataFrame) -> pd.DataFrame:
    """Mean over markers (and datasets) per strategy and method; columns exactly SUMMARY_COLUMNS."""
    if per_marker.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    nan = per_marker[per_marker["pearson_r"].isna()]
    for (strategy, method), grp in nan.groupby(["strategy", "method"]):
        log.warning("%s/%s: Pearson r undefined (constant truth or prediction) for %d markers, left out of the mean: %s",
                    strategy, method, len(grp), ", ".join(map(str, grp["marker"].head(10))))
    df = per_marker.groupby(["strategy", "method"], as_index=False)[["pearson_r", "f1"]].mean()
    return _order(df)[SUMMARY_COLUMNS].reset_index(drop=True)


def summarise_seen(per_marker: pd.DataFrame) -> pd.DataFrame:
    """As :func:`summarise`, separately for markers seen / unseen during pretraining."""
    if per_marker.empty:
        return pd.DataFrame(columns=SEEN_SUMMARY_COLUMNS)
    g = per_marker.groupby(["strategy", "method", "seen"], as_index=False)
    df = g[["pearson_r", "f1"]].mean().merge(g.size().rename(columns={"size": "n_markers"}))
    return _order(df)[SEEN_SUMMARY_COLUMNS].reset_index(drop=True)


def summarise_per_dataset(per_marker: pd.DataFrame) -> pd.DataFrame:
    """Dataset-wise means over markers (the points of the paper's Fig. 2d)."""
    cols = ["dataset", "strategy", "method", "pearson_r", "f1", "n_markers"]
    if per_marker.empty:
        return pd.DataFrame(columns=cols)
    g = per_marker.groupby(["dataset", "strategy", "method"], as_index=False)
    df = g[["pearson_r", "f1"]].mean().merge(g.size().rename(columns={"size": "n_markers"}))
    return _order(df).sort_values("dataset", kind="stable")[cols].reset_index(drop=True)
