"""Which tissue structures the risk groups carry (paper Fig. 4d and Suppl. Fig. 18, Methods
"Tissue structure-based risk stratification").

For each structure (a boolean "present in this tissue" column, e.g. ``has_tls``) the risk ratio of
its occurrence in the high-risk group against the low-risk group:

    RR = P(structure | high) / P(structure | low) = (a / n_high) / (c / n_low)

with a = high-risk tissues with the structure, c = low-risk tissues with it; 95 % CI by Katz's log
method, exp(log RR ± 1.96 · sqrt(1/a − 1/n_high + 1/c − 1/n_low)). When a or c is 0 the log is
undefined: 0.5 is added to every cell of that structure's 2×2 table (Haldane–Anscombe) and the row
is flagged ``corrected``. A structure absent (or present) everywhere has no ratio (NaN).

Two stratifications are compared, as in the paper: the cell-token one of :mod:`analysis.virtues_risk`,
and a baseline from the survival data alone — high risk = died, or censored before the horizon;
low risk = censored at or after it (the paper: "deceased and early censored" against "surviving and
late censored"; the horizon, which the paper does not give, defaults to the median follow-up, the
same horizon :func:`analysis.virtues_risk.stratify` orders the groups at).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

Z95 = float(norm.ppf(0.975))


@dataclass
class RiskRatio:
    risk_ratio: float
    ci_low: float
    ci_high: float
    corrected: bool  # 0.5 added to every cell (a zero count)


def risk_ratio(a: int, n_exposed: int, c: int, n_unexposed: int, z: float = Z95) -> RiskRatio:
    """RR of an outcome in the exposed (a of n_exposed) against the unexposed (c of n_unexposed), Katz CI."""
    if n_exposed <= 0 or n_unexposed <= 0:
        raise ValueError("both groups need at least one member")
    if not (0 <= a <= n_exposed and 0 <= c <= n_unexposed):
        raise ValueError(f"counts out of range: {a}/{n_exposed}, {c}/{n_unexposed}")
    if a + c == 0 or (a == n_exposed and c == n_unexposed):
        return RiskRatio(float("nan"), float("nan"), float("nan"), False)
    corrected = a == 0 or c == 0
    if corrected:
        a, c, n_exposed, n_unexposed = a + 0.5, c + 0.5, n_exposed + 1.0, n_unexposed + 1.0
    rr = (a / n_exposed) / (c / n_unexposed)
    se = float(np.sqrt(1 / a - 1 / n_exposed + 1 / c - 1 / n_unexposed))
    return RiskRatio(float(rr), float(np.exp(np.log(rr) - z * se)), float(np.exp(np.log(rr) + z * se)), corrected)


def structure_columns(table: pd.DataFrame, structures: str | Sequence[str] = "has_") -> list[str]:
    """The structure columns: every column starting with the prefix (a string), or the listed names."""
    if isinstance(structures, str):
        cols = [c for c in table.columns if str(c).startswith(structures)]
        if not cols:
            raise ValueError(f"no column starts with {structures!r} (columns: {list(table.columns)}); pass the names")
        return cols
    missing = [c for c in structures if c not in table.columns]
    if missing:
        raise ValueError(f"no column(s) {missing} in the tissue table (columns: {list(table.columns)})")
    return list(structures)


def _as_bool(column: pd.Series) -> pd.Series:
    values = column.dropna()
    if values.dtype == bool:
        return values
    numeric = pd.to_numeric(values.astype(str).str.lower().map({"true": 1, "false": 0}).fillna(values), errors="coerce")
    if numeric.isna().any() or not set(numeric.unique()) <= {0, 1}:
        raise ValueError(f"structure column {column.name!r} must be boolean (True/False or 1/0)")
    return numeric.astype(bool)


def structure_risk_ratios(risk: pd.Series, table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """One row per structure: counts, RR of occurrence in ``risk == 'high'`` against ``'low'``, Katz 95 % CI.
    ``risk`` and ``table`` are indexed by tissue; tissues missing a structure value are left out of that row."""
    rows = []
    for col in columns:
        present = _as_bool(table[col])
        groups = risk.reindex(present.index).dropna()
        present = present.loc[groups.index]
        high, low = present[groups == "high"], present[groups == "low"]
        if len(high) == 0 or len(low) == 0:
            raise ValueError(f"{col}: the stratification has no {'high' if len(high) == 0 else 'low'}-risk tissue with a value")
        rr = risk_ratio(int(high.sum()), len(high), int(low.sum()), len(low))
        rows.append({"structure": col, "n_high_with": int(high.sum()), "n_high": len(high), "n_low_with": int(low.sum()),
                     "n_low": len(low), "risk_ratio": rr.risk_ratio, "ci_low": rr.ci_low, "ci_high": rr.ci_high,
                     "corrected": rr.corrected})
    return pd.DataFrame(rows)


def survival_baseline_risk(time: pd.Series, event: pd.Series, horizon: float | None = None) -> tuple[pd.Series, float]:
    """High risk = died, or censored before ``horizon`` (default: median follow-up); low = censored later."""
    ok = time.notna() & event.notna()
    time, event = time[ok].astype(float), event[ok].astype(bool)
    if len(time) == 0:
        raise ValueError("no tissue has both a survival time and an event flag")
    horizon = float(np.median(time)) if horizon is None else float(horizon)
    high = event | (time < horizon)
    return high.map({True: "high", False: "low"}).rename("risk"), horizon


def plot_risk_ratios(table: pd.DataFrame, path: str) -> str:
    """Forest plot: RR with 95 % CI per structure, one marker per stratification (log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    structures = list(dict.fromkeys(table["structure"]))
    strata = list(dict.fromkeys(table["stratification"]))
    fig, ax = plt.subplots(figsize=(5.5, 0.9 + 0.45 * len(structures) * max(len(strata), 1)))
    offsets = np.linspace(-0.2, 0.2, len(strata)) if len(strata) > 1 else [0.0]
    for off, name in zip(offsets, strata):
        part = table[table["stratification"] == name].set_index("structure").reindex(structures)
        y = np.arange(len(structures)) + off
        ok = part["risk_ratio"].notna().to_numpy()
        ax.errorbar(part["risk_ratio"][ok], y[ok], xerr=[(part["risk_ratio"] - part["ci_low"])[ok],
                                                        (part["ci_high"] - part["risk_ratio"])[ok]],
                    fmt="o", capsize=3, label=name)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(range(len(structures)), structures, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("risk ratio of occurrence in the high-risk group (95 % CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
