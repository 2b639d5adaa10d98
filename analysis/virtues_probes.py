"""Linear probes on cell tokens (paper Fig. 3a–b, Methods "Cell-level tasks").

The paper classifies cell types with logistic regression on single cell summary tokens: L-BFGS,
L2 penalty with coefficient 1.0 (sklearn ``C = 1.0``). The same probe on each cell's mean
expression per channel is the non-learned reference a lab should always look at: a token has to
beat what the measured intensities already say. Features are z-scored with training statistics so
the fixed ``C`` means the same for both feature sets (the paper does not say; sklearn's L2 is
scale-dependent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class ProbeResult:
    features: str
    accuracy: float
    macro_f1: float
    per_class: pd.DataFrame  # class, f1, support
    confusion: pd.DataFrame  # true × predicted counts
    n_train: int
    n_test: int


def linear_probe(name: str, x_train: np.ndarray, y_train: Sequence, x_test: np.ndarray, y_test: Sequence,
                 c: float = 1.0, max_iter: int = 2000, seed: int = 0) -> ProbeResult:
    """Fit the paper's logistic-regression probe on (x_train, y_train); score it on the test cells."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.preprocessing import StandardScaler

    y_train, y_test = np.asarray(y_train).astype(str), np.asarray(y_test).astype(str)
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"{name}: the training cells hold fewer than two classes ({np.unique(y_train).tolist()})")
    if len(y_test) == 0:
        raise ValueError(f"{name}: no test cells")
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed)
    clf.fit(scaler.transform(x_train), y_train)
    pred = clf.predict(scaler.transform(x_test))
    classes = sorted(set(y_train) | set(y_test))
    f1 = f1_score(y_test, pred, labels=classes, average=None, zero_division=0)
    support = [int((y_test == k).sum()) for k in classes]
    present = [i for i, s in enumerate(support) if s > 0]  # macro over classes that occur in the test cells
    per_class = pd.DataFrame({"features": name, "class": classes, "f1": f1, "support": support})
    confusion = pd.DataFrame(confusion_matrix(y_test, pred, labels=classes), index=classes, columns=classes)
    return ProbeResult(name, float(accuracy_score(y_test, pred)), float(np.mean(f1[present])), per_class, confusion,
                       len(y_train), len(y_test))


def plot_per_class_f1(results: Sequence[ProbeResult], path: str) -> str:
    """Grouped bars of per-class F1, one colour per feature set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.concat([r.per_class for r in results]).pivot(index="class", columns="features", values="f1")
    ax = table.plot.bar(figsize=(max(6, 0.6 * len(table)), 3.5), width=0.8)
    ax.set_ylabel("F1 (test cells)")
    ax.set_ylim(0, 1)
    ax.set_title("Cell-type linear probe: " + ", ".join(f"{r.features} acc {r.accuracy:.2f}" for r in results), fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="features")
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close()
    return path
