"""Patient-level statistics of the virtual-biomarker analyses (VirTues paper, Methods "Identification
of FM-based biomarkers predictive of therapy response" and "Transferring predictive virtual spatial
biomarkers across datasets"): cluster proportions and their four ranks, cross-validated logistic
AUROC, risk ratios with confidence intervals, cell-type ratio baselines, one-sided t-tests.

Why a module of its own: the discovery (:mod:`analysis.virtues_biomarkers`) and the transfer
(:mod:`analysis.virtues_signature_transfer`) must compute ranks and ratios identically ("mirroring
the original discovery procedure"), and each function here is small enough to test against a direct
computation.

Choices the Methods leave open, made here:

* **Ranks** (:func:`proportion_ranks`): rank 0 = the patient has no cell in the cluster; ranks 1–3 =
  tertiles of the *positive* proportions of the cohort at hand, boundaries ``np.quantile(positive,
  [1/3, 2/3])`` (linear interpolation); a proportion equal to a boundary takes the lower rank
  (rank = 1 + number of boundaries strictly below it). A patient with no cells at all has no
  proportion and is left out by the callers, never given rank 0.
* **AUROC** (:func:`cv_auroc_folds`): sklearn ``RepeatedStratifiedKFold(n_splits, n_repeats,
  random_state=seed)`` over patients; ``LogisticRegression()`` with sklearn's defaults (L2, C = 1;
  the paper names no regularisation for this model) on the raw ranks; AUROC of each test fold;
  the reported score is the mean over all folds (how a fold is fitted: :func:`cv_auroc_folds`). Folds depend only on the labels and the seed, so
  every predictor of one cohort is scored on the same splits (paired folds).
* **Risk ratio** (:func:`risk_ratio`): P(response | rank > 1) / P(response | rank <= 1). 95 % CI by
  the Katz log method, ``exp(log RR ± z·sqrt(1/a − 1/n₁ + 1/c − 1/n₀))``; when a or c is 0 the CI
  (not the point estimate) adds 0.5 to all four cells (Haldane); undefined (NaN) when one group is
  empty.
* **Ratio baselines** (:func:`cell_type_ratio`): (tumour cells + 1) / (other cells + 1) per patient;
  the pseudocount keeps patients without CD4/CD8/B cells finite.
* **t-test** (:func:`one_sided_t_test`): Student's independent two-sample t-test, one-sided
  (mean of the first > mean of the second), on the fold AUROCs — the paper's test; fold scores
  share patients, so the p-value is optimistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold


def resolution_grid(start: float, stop: float, step: float) -> list[float]:
    """``start, start+step, ..., stop`` (inclusive, rounded to 6 decimals against float drift)."""
    if not (step > 0 and stop >= start > 0):
        raise ValueError(f"resolutions need 0 < start <= stop and step > 0, got {start}:{stop}:{step}")
    n = int(np.floor((stop - start) / step + 1e-9))
    return [round(start + k * step, 6) for k in range(n + 1)]


def parse_resolutions(text: str) -> list[float]:
    """``"4.0:5.0:0.05"`` (start:stop:step, inclusive) or a comma list ``"4.0,4.5"``."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            return resolution_grid(start, stop, step)
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--resolutions {text!r}: expected start:stop:step or a comma list of numbers") from None
    if not values or min(values) <= 0:
        raise ValueError(f"--resolutions {text!r}: resolutions must be > 0")
    return values


def squash(name: object) -> str:
    """Lower-case alphanumerics only: ``"CD4+ T"`` and ``"cd4_t"`` compare equal."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def type_mask(cell_types: Sequence[object] | np.ndarray, wanted: Sequence[str]) -> np.ndarray:
    """Cells whose type is one of ``wanted`` (ignoring case and punctuation)."""
    keys = {squash(w) for w in wanted}
    return np.array([squash(t) in keys for t in np.asarray(cell_types, dtype=object)], dtype=bool)


def patient_proportions(member: np.ndarray, patient_of_cell: np.ndarray, patients: Sequence[str]) -> pd.Series:
    """Per patient: share of the patient's cells that are members (patients without cells: NaN)."""
    member = np.asarray(member, dtype=bool)
    frame = pd.DataFrame({"patient": np.asarray(patient_of_cell).astype(str), "member": member})
    return frame.groupby("patient")["member"].mean().reindex(list(patients)).astype(float)


def proportion_ranks(proportions: pd.Series) -> pd.Series:
    """Rank 0 for a zero proportion, 1–3 for the tertiles of the positive proportions (module docstring)."""
    p = proportions.astype(float)
    if p.isna().any():
        raise ValueError("proportion_ranks: NaN proportion (a patient without cells); drop such patients first")
    positive = p[p > 0].to_numpy()
    ranks = pd.Series(0, index=p.index, dtype=np.int64)
    if len(positive):
        q1, q2 = np.quantile(positive, [1 / 3, 2 / 3])
        ranks[p > 0] = 1 + (p[p > 0] > q1).astype(int) + (p[p > 0] > q2).astype(int)
    return ranks


def tertile_ranks(values: pd.Series) -> pd.Series:
    """Ranks 1–3 = tertiles of all values (the ratio baselines' "tertile-transformed" risk score)."""
    v = values.astype(float)
    q1, q2 = np.quantile(v.to_numpy(), [1 / 3, 2 / 3])
    return (1 + (v > q1).astype(int) + (v > q2).astype(int)).astype(np.int64)


def check_labels(y: np.ndarray, n_splits: int) -> np.ndarray:
    y = np.asarray(y).astype(int)
    if set(np.unique(y)) - {0, 1}:
        raise ValueError(f"response labels must be 0/1, got {sorted(set(np.unique(y)))}")
    counts = np.bincount(y, minlength=2)
    if counts.min() < n_splits:
        raise ValueError(f"{counts[1]} responders and {counts[0]} non-responders: each class needs "
                         f">= {n_splits} patients for stratified {n_splits}-fold cross-validation")
    return y


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties count one half, as in sklearn's)."""
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("AUROC needs both classes")
    ranks = stats.rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def cv_splits(y: np.ndarray, *, n_splits: int = 4, n_repeats: int = 10,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) patient indices of repeated stratified k-fold (depend on the labels and seed only)."""
    y = check_labels(y, n_splits)
    folds = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    return list(folds.split(np.zeros((len(y), 1)), y))


def cv_auroc_folds(x: np.ndarray, y: np.ndarray, *, n_splits: int = 4, n_repeats: int = 10, seed: int = 0,
                   splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """Test-fold AUROCs of a logistic regression on ``x`` (patients × features), one per fold.

    One feature: the fit is skipped, exactly. With an unpenalised intercept and an L2 penalty the
    profile objective in the slope w is strictly convex and its derivative at w = 0 is
    ``-sum((x - mean x) * y)`` (envelope theorem), so the fitted slope has the sign of the training covariance of x and
    y (0 when it is 0); the predicted probability is monotone in x with that sign, so the fold AUROC
    is AUROC(±x), or 0.5. This makes scoring thousands of candidate clusters cheap.
    Several features: ``LogisticRegression(solver="newton-cholesky")`` — sklearn's default model
    (L2, C = 1, unpenalised intercept), solved exactly by Newton steps (20x faster than lbfgs on a
    hundred patients; the same optimum).
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = check_labels(y, n_splits)
    splits = cv_splits(y, n_splits=n_splits, n_repeats=n_repeats, seed=seed) if splits is None else splits
    scores = []
    for train, test in splits:
        if x.shape[1] == 1:
            xt, yt = x[train, 0], y[train]
            sign = np.sign(len(xt) * np.dot(xt, yt) - xt.sum() * yt.sum())  # exact for integer ranks
            scores.append(0.5 if sign == 0 else auroc(y[test], sign * x[test, 0]))
        else:
            model = LogisticRegression(solver="newton-cholesky", max_iter=100).fit(x[train], y[train])
            scores.append(auroc(y[test], model.decision_function(x[test])))
    return np.asarray(scores, dtype=np.float64)


@dataclass(frozen=True)
class RiskRatio:
    """Risk of the outcome in the exposed (rank > 1) over the unexposed, with a Katz-log CI."""

    rr: float
    lower: float
    upper: float
    exposed_events: int  # a
    exposed_total: int  # n1
    unexposed_events: int  # c
    unexposed_total: int  # n0


def risk_ratio(exposed: np.ndarray, outcome: np.ndarray, *, confidence: float = 0.95) -> RiskRatio:
    """Risk ratio of ``outcome`` (0/1) given ``exposed`` (bool) with the Katz log CI (module docstring)."""
    exposed, outcome = np.asarray(exposed, dtype=bool), np.asarray(outcome).astype(int)
    a, n1 = int(outcome[exposed].sum()), int(exposed.sum())
    c, n0 = int(outcome[~exposed].sum()), int((~exposed).sum())
    if n1 == 0 or n0 == 0:
        return RiskRatio(float("nan"), float("nan"), float("nan"), a, n1, c, n0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rr = float(np.divide(a / n1, c / n0))
    aa, cc, m1, m0 = (a + 0.5, c + 0.5, n1 + 1.0, n0 + 1.0) if a == 0 or c == 0 else (a, c, n1, n0)
    log_rr = np.log((aa / m1) / (cc / m0))
    se = np.sqrt(1 / aa - 1 / m1 + 1 / cc - 1 / m0)
    z = stats.norm.ppf(0.5 + confidence / 2)
    return RiskRatio(rr, float(np.exp(log_rr - z * se)), float(np.exp(log_rr + z * se)), a, n1, c, n0)


def cell_type_ratio(cell_types: np.ndarray, patient_of_cell: np.ndarray, patients: Sequence[str],
                    numerator: Sequence[str], denominator: Sequence[str], pseudocount: float = 1.0) -> pd.Series:
    """Per patient (numerator-type cells + pseudocount) / (denominator-type cells + pseudocount)."""
    patient = pd.Series(np.asarray(patient_of_cell).astype(str))
    num = patient[type_mask(cell_types, numerator)].value_counts().reindex(list(patients), fill_value=0)
    den = patient[type_mask(cell_types, denominator)].value_counts().reindex(list(patients), fill_value=0)
    return ((num + pseudocount) / (den + pseudocount)).astype(float)


def one_sided_t_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Student's t statistic and one-sided p for mean(a) > mean(b)."""
    result = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), alternative="greater")
    return float(result.statistic), float(result.pvalue)


def two_proportion_z_test(x1: float, n1: float, x2: float, n2: float) -> tuple[float, float]:
    """Pooled two-proportion z statistic and two-sided p (NaN when a group is empty or p̂ is 0 or 1)."""
    if n1 <= 0 or n2 <= 0:
        return float("nan"), float("nan")
    pooled = (x1 + x2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return float("nan"), float("nan")
    z = (x1 / n1 - x2 / n2) / se
    return float(z), float(2 * stats.norm.sf(abs(z)))
