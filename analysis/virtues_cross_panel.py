"""Cross-panel cell-type transfer (paper Fig. 3e–g, Methods "Cell-level tasks", transfer experiment).

A lab with a new panel wants the cell types of an annotated dataset measured with another panel.
Both datasets' cell tokens are computed from the markers their panels share
(``experiments.virtues_tokens --channels-from OTHER``), a random forest is trained on the source
dataset's coarse labels and applied to the target; per-class F1 on the target's own (regrouped)
labels says how much of the annotation carries over. The same forest on the cells' mean abundances
of the shared markers is the non-learned baseline the paper compares with.

Forest as in the Methods: 100 trees, Gini, bootstrap, maximum depth 16, and the training cells
balanced by down-sampling every class to the rarest one (not class weights: the paper balances
"via downsampling to address potential distribution shifts between datasets"). Chance for a class
is the F1 of guessing uniformly among the K trained classes (what a balanced forest that learned
nothing does): precision = the class's prevalence p in the target, recall = 1/K, F1 = 2p/K / (p + 1/K).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score

#: Methods: 100 trees, Gini, bootstrap, depth 16.
N_TREES = 100
MAX_DEPTH = 16


def balanced_downsample(labels: Sequence, seed: int = 0) -> np.ndarray:
    """Sorted indices keeping an equal number of cells of every class (the rarest class's count), seeded."""
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n = int(counts.min())
    keep = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c in classes]
    return np.sort(np.concatenate(keep))


def per_class_f1(truth: Sequence, predicted: Sequence, classes: Sequence[str]) -> dict[str, float]:
    """F1 of each class (0 where the class is neither predicted nor present)."""
    scores = f1_score(np.asarray(truth).astype(str), np.asarray(predicted).astype(str), labels=list(classes),
                      average=None, zero_division=0.0)
    return {str(c): float(s) for c, s in zip(classes, scores)}


def chance_f1(truth: Sequence, classes: Sequence[str]) -> dict[str, float]:
    """Expected F1 per class of uniform guessing among ``classes`` (see the module docstring)."""
    truth = np.asarray(truth).astype(str)
    k = len(classes)
    out = {}
    for c in classes:
        p = float((truth == str(c)).mean()) if len(truth) else 0.0
        out[str(c)] = 0.0 if p == 0 else 2 * p / k / (p + 1 / k)
    return out


def shared_columns(source_names: Sequence[str], target_names: Sequence[str]) -> tuple[list[int], list[int], list[str]]:
    """Column positions of the channel names both panels have, in the source's order (case-insensitive)."""
    lower = {str(n).lower(): j for j, n in enumerate(target_names)}
    pairs = [(i, lower[str(n).lower()], str(n)) for i, n in enumerate(source_names) if str(n).lower() in lower]
    return [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]


@dataclass
class TransferResult:
    classes: list[str]
    per_class: dict[str, float]
    macro_f1: float  # over the trained classes present in the target
    chance: dict[str, float]
    predictions: np.ndarray
    n_train: int
    n_test: int
    confusion: pd.DataFrame = field(default_factory=pd.DataFrame)  # truth (rows) × predicted (columns)


def transfer_random_forest(x_source: np.ndarray, y_source: Sequence, x_target: np.ndarray, y_target: Sequence,
                           seed: int = 0, n_trees: int = N_TREES, max_depth: int = MAX_DEPTH,
                           n_jobs: int | None = None) -> TransferResult:
    """Train on the balanced source cells, predict every target cell whose label is one of the source's
    classes, and score per class. Target cells of other labels are the caller's to drop (they cannot be right)."""
    y_source = np.asarray(y_source).astype(str)
    y_target = np.asarray(y_target).astype(str)
    if len(x_source) != len(y_source) or len(x_target) != len(y_target):
        raise ValueError("features and labels differ in length")
    if x_source.shape[1] != x_target.shape[1]:
        raise ValueError(f"source has {x_source.shape[1]} features, target {x_target.shape[1]}: compute both from "
                         "the same markers (experiments.virtues_tokens --channels-from)")
    classes = sorted(set(y_source.tolist()))
    if len(classes) < 2:
        raise ValueError(f"the source has {len(classes)} class(es); a classifier needs at least 2")
    idx = balanced_downsample(y_source, seed)
    forest = RandomForestClassifier(n_estimators=n_trees, criterion="gini", bootstrap=True, max_depth=max_depth,
                                    random_state=seed, n_jobs=n_jobs)
    forest.fit(np.asarray(x_source, np.float32)[idx], y_source[idx])
    predicted = forest.predict(np.asarray(x_target, np.float32)).astype(str)
    scores = per_class_f1(y_target, predicted, classes)
    present = [c for c in classes if (y_target == c).any()]  # a class the target lacks has no F1 to average
    confusion = pd.crosstab(pd.Series(y_target, name="truth"), pd.Series(predicted, name="predicted"))
    macro = float(np.mean([scores[c] for c in present])) if present else float("nan")
    return TransferResult(classes, scores, macro, chance_f1(y_target, classes),
                          predicted, len(idx), len(y_target), confusion)


def plot_transfer_f1(table: pd.DataFrame, path: str) -> str:
    """Grouped bars: per-class F1 of each representation (``table``: class, representation, f1, chance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(table["class"]))
    reps = list(dict.fromkeys(table["representation"]))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(classes), 3.4))
    width = 0.8 / max(len(reps), 1)
    for r, rep in enumerate(reps):
        sub = table[table["representation"] == rep].set_index("class").reindex(classes)
        ax.bar(np.arange(len(classes)) + r * width, sub["f1"], width, label=rep)
    chance = table.drop_duplicates("class").set_index("class").reindex(classes)["chance"]
    ax.scatter(np.arange(len(classes)) + 0.4 - width / 2, chance, marker="_", color="k", s=200, label="chance", zorder=3)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=30, ha="right")
    ax.set_ylabel("F1 on the target dataset")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
