"""How far treatment moves each patient's cell states, and where it moves responders and
non-responders (paper Fig. 5b, Methods "Quantifying treatment responses").

* **Per patient**: the entropy-regularised 2-Wasserstein distance between the cell tokens of two
  consecutive time points (pre → on, on → post), uniform weights, squared-Euclidean ground cost,
  ε = 1e-3; several tissues of one patient at one time point are pooled (the paper's union).
* **Per cohort**: a 2-D embedding (UMAP) of a 1/10 subsample of all cells; per response group and
  time point the free-support Wasserstein barycentre (m = 500 points, exact W2 as in the Methods'
  ``W_2^0``) of the patients' embedded cells; the group's trajectory is the displacement of the
  barycentre's coordinate-wise median between consecutive time points.

Numerical choices (the paper gives ε but not its scale or solver):

* ε is **relative to the largest squared distance of the pair**: the cost matrix is divided by its
  maximum before Sinkhorn and the transport cost multiplied back. On raw token scales (squared
  distances of tens to hundreds) ε = 1e-3 makes ``exp(-C/ε)`` underflow to 0 for every pair, and the
  plain Sinkhorn iteration returns NaN (tested); relative to the maximum, ε = 1e-3 is still a
  sharp plan (close to exact W2) and well defined.
* **Log-domain Sinkhorn** (``ot.sinkhorn2(method="sinkhorn_log")``): no underflow however far apart
  two cells are. The value reported is ``sqrt(<π_ε, C>)``, the transport cost of the entropic plan
  (what POT's ``sinkhorn2`` returns). The Methods' formula adds the entropy term with a sign that
  would reward low entropy; we take it as the usual entropic OT problem and leave the term out of
  the reported value (at ε = 1e-3 of the maximum cost it changes W2 by well under 1 %).
* **Cap**: at most ``max_cells`` cells (default 1,000) per patient and time point, drawn without
  replacement from a generator seeded by (seed, patient, time point) — Sinkhorn is O(n²) per
  iteration. The Sinkhorn marginal error is reported per patient so a non-converged pair is visible.
* **Iterations**: 1,000 by default. At ε = 1e-3 the marginal error falls slowly (~5e-5 after 1,000,
  ~1e-5 after 3,000 for 200 vs 200 cells in 32-D) while W2 itself is settled: 6.64495 after 1,000,
  6.64501 after 3,000, exact 6.64355 (measured with POT 0.9.7). ε-scaling with warm starts did
  not converge faster.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import ot
import pandas as pd
import torch
from scipy.stats import mannwhitneyu

TIMEPOINTS = ("pre", "on", "post")
EPSILON = 1e-3
MAX_CELLS = 1000
SINKHORN_ITERATIONS = 1000
SINKHORN_STOP = 1e-7
EMBEDDING_FRACTION = 0.1
SUPPORT_SIZE = 500
COHORTS = {1: "responders", 0: "non_responders"}


def seeded_rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator fixed by the seed and the keys (crc32 of their text, stable across runs unlike ``hash``)."""
    return np.random.default_rng([seed, *[zlib.crc32(str(k).encode()) for k in keys]])


def cap_rows(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or ``cap`` of them drawn without replacement."""
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


@dataclass
class W2Result:
    value: float  # sqrt(<π_ε, C>) in the units of the inputs
    marginal_error: float  # Sinkhorn's last marginal violation (on the normalised problem)
    iterations: int
    cost_scale: float  # the maximum squared distance the cost was divided by


def entropic_w2(a: np.ndarray, b: np.ndarray, epsilon: float = EPSILON, max_iter: int = SINKHORN_ITERATIONS,
                stop: float = SINKHORN_STOP, device: str = "cpu") -> W2Result:
    """Entropic W2 between two point clouds with uniform weights (module docstring: ε relative to the
    largest squared distance, log-domain Sinkhorn). ``device`` = ``cuda`` runs POT on torch tensors there."""
    x = torch.as_tensor(np.asarray(a, np.float64), device=device)
    y = torch.as_tensor(np.asarray(b, np.float64), device=device)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("entropic W2 needs at least one point on each side")
    cost = ot.dist(x, y, metric="sqeuclidean")
    scale = float(cost.max())
    if scale == 0.0:
        return W2Result(0.0, 0.0, 0, 0.0)
    wa = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64, device=device)
    wb = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64, device=device)
    value, log = ot.sinkhorn2(wa, wb, cost / scale, epsilon, method="sinkhorn_log", numItermax=max_iter,
                              stopThr=stop, log=True)
    errors = log.get("err") or [float("nan")]
    return W2Result(float(np.sqrt(max(float(value) * scale, 0.0))), float(errors[-1]), int(log.get("niter", max_iter)),
                    scale)


def transitions(order: Sequence[str]) -> list[tuple[str, str]]:
    """Consecutive pairs of the time points (pre → on, on → post)."""
    return list(zip(order[:-1], order[1:]))


def patient_distances(features: np.ndarray, patient: Sequence, timepoint: Sequence, response: Sequence,
                      order: Sequence[str] = TIMEPOINTS, max_cells: int | None = MAX_CELLS, seed: int = 0,
                      epsilon: float = EPSILON, max_iter: int = SINKHORN_ITERATIONS, device: str = "cpu",
                      progress=None) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """One row per patient and consecutive pair of time points both measured: the entropic W2 between
    the patient's pooled cells at the two time points (capped, seeded), with sizes and convergence."""
    features = np.asarray(features)
    frame = pd.DataFrame({"patient": np.asarray(patient).astype(str), "timepoint": np.asarray(timepoint).astype(str),
                          "response": np.asarray(response)})
    rows = []
    for pid, cells in frame.groupby("patient", sort=True):
        by_time = {t: idx.to_numpy() for t, idx in cells.groupby("timepoint").groups.items()}
        responses = cells["response"].dropna().unique()
        if len(responses) != 1:
            raise ValueError(f"patient {pid} has response values {list(responses)}: one per patient expected")
        for t1, t2 in transitions(order):
            if t1 not in by_time or t2 not in by_time:
                continue
            pick = [by_time[t][cap_rows(len(by_time[t]), max_cells, seeded_rng(seed, pid, t))] for t in (t1, t2)]
            w2 = entropic_w2(features[pick[0]], features[pick[1]], epsilon, max_iter, device=device)
            rows.append({"patient_id": pid, "response": int(responses[0]), "t1": t1, "t2": t2,
                         "n_cells_t1": len(by_time[t1]), "n_cells_t2": len(by_time[t2]), "n_used_t1": len(pick[0]),
                         "n_used_t2": len(pick[1]), "w2": w2.value, "sinkhorn_marginal_error": w2.marginal_error,
                         "sinkhorn_iterations": w2.iterations})
            if progress is not None:
                progress(1)
    return pd.DataFrame(rows, columns=["patient_id", "response", "t1", "t2", "n_cells_t1", "n_cells_t2", "n_used_t1",
                                       "n_used_t2", "w2", "sinkhorn_marginal_error", "sinkhorn_iterations"])


def compare_cohorts(distances: pd.DataFrame) -> pd.DataFrame:
    """Per transition: patients, mean and median W2 of each cohort, and a two-sided Mann–Whitney U test
    of responders against non-responders (the paper reports the shift size qualitatively)."""
    rows = []
    for (t1, t2), part in distances.groupby(["t1", "t2"], sort=False):
        r, n = part.loc[part["response"] == 1, "w2"], part.loc[part["response"] == 0, "w2"]
        p = float(mannwhitneyu(r, n, alternative="two-sided").pvalue) if len(r) and len(n) else float("nan")
        rows.append({"t1": t1, "t2": t2, "n_responders": len(r), "n_non_responders": len(n),
                     "mean_w2_responders": r.mean(), "mean_w2_non_responders": n.mean(),
                     "median_w2_responders": r.median(), "median_w2_non_responders": n.median(), "mannwhitney_p": p})
    return pd.DataFrame(rows)


def embed_2d(features: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates: UMAP (the paper), PCA (fast, linear), or ``none`` (the input is already 2-D)."""
    features = np.asarray(features, np.float32)
    if method == "none":
        if features.shape[1] != 2:
            raise ValueError(f"embedding 'none' needs 2-D features, got {features.shape[1]}")
        return features.astype(np.float64)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(features).astype(np.float64)
    if method == "umap":
        import umap  # heavy (numba): imported only when used

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(features).astype(np.float64)
    raise ValueError(f"unknown embedding {method!r}: umap, pca or none")


def free_support_barycentre(clouds: Sequence[np.ndarray], support: int = SUPPORT_SIZE, seed: int = 0,
                            max_iter: int = 100) -> np.ndarray:
    """(support, 2) exact-W2 free-support barycentre (uniform weights) of point clouds; started from a
    seeded draw of their pooled points (with replacement only when fewer than ``support``)."""
    pooled = np.concatenate(clouds)
    rng = seeded_rng(seed, "barycentre", len(pooled))
    init = pooled[rng.choice(len(pooled), size=support, replace=len(pooled) < support)]
    weights = [np.full(len(c), 1.0 / len(c)) for c in clouds]
    return np.asarray(ot.lp.free_support_barycenter([np.asarray(c, np.float64) for c in clouds], weights,
                                                    init.astype(np.float64), numItermax=max_iter))


@dataclass
class CohortTrajectories:
    medians: pd.DataFrame  # cohort, timepoint, n_patients, x, y
    displacements: pd.DataFrame  # cohort, t1, t2, dx, dy, norm
    barycentres: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def cohort_trajectories(points: np.ndarray, patient: Sequence, timepoint: Sequence, response: Sequence,
                        order: Sequence[str] = TIMEPOINTS, support: int = SUPPORT_SIZE, seed: int = 0) -> CohortTrajectories:
    """Barycentre per cohort and time point of the patients' 2-D point clouds, its median, and the
    displacement of the medians between consecutive time points (Methods: Δ_{C,t})."""
    frame = pd.DataFrame({"patient": np.asarray(patient).astype(str), "timepoint": np.asarray(timepoint).astype(str),
                          "response": np.asarray(response)})
    medians, barycentres = [], {}
    for code, cohort in COHORTS.items():
        for t in order:
            groups = frame[(frame["response"] == code) & (frame["timepoint"] == t)].groupby("patient").groups
            clouds = [points[idx.to_numpy()] for _, idx in sorted(groups.items())]
            if not clouds:
                continue
            bary = free_support_barycentre(clouds, support, seed)
            barycentres[(cohort, t)] = bary
            x, y = np.median(bary, axis=0)
            medians.append({"cohort": cohort, "timepoint": t, "n_patients": len(clouds), "x": x, "y": y})
    med = pd.DataFrame(medians, columns=["cohort", "timepoint", "n_patients", "x", "y"])
    rows = []
    for cohort in COHORTS.values():
        at = med[med["cohort"] == cohort].set_index("timepoint")
        for t1, t2 in transitions(order):
            if t1 in at.index and t2 in at.index:
                dx, dy = at.loc[t2, "x"] - at.loc[t1, "x"], at.loc[t2, "y"] - at.loc[t1, "y"]
                rows.append({"cohort": cohort, "t1": t1, "t2": t2, "dx": dx, "dy": dy, "norm": float(np.hypot(dx, dy))})
    return CohortTrajectories(med, pd.DataFrame(rows, columns=["cohort", "t1", "t2", "dx", "dy", "norm"]), barycentres)


def cohort_contrast(cohorts: pd.DataFrame, displacements: pd.DataFrame) -> dict:
    """Per transition: does the responders' shift exceed the non-responders' (mean W2), and how their
    barycentre displacements compare (angle in degrees, norm ratio responders / non-responders)."""
    out = {}
    for _, row in cohorts.iterrows():
        key = f"{row['t1']}->{row['t2']}"
        d = displacements[(displacements["t1"] == row["t1"]) & (displacements["t2"] == row["t2"])].set_index("cohort")
        entry = {"responders_shift_more": bool(row["mean_w2_responders"] > row["mean_w2_non_responders"]),
                 "mannwhitney_p": row["mannwhitney_p"]}
        if {"responders", "non_responders"} <= set(d.index):
            r, n = d.loc["responders", ["dx", "dy"]].to_numpy(float), d.loc["non_responders", ["dx", "dy"]].to_numpy(float)
            cos = float(r @ n / (np.linalg.norm(r) * np.linalg.norm(n))) if np.linalg.norm(r) * np.linalg.norm(n) else np.nan
            entry.update({"displacement_angle_deg": float(np.degrees(np.arccos(np.clip(cos, -1, 1)))),
                          "displacement_norm_ratio": float(np.linalg.norm(r) / np.linalg.norm(n)) if np.linalg.norm(n) else np.inf})
        out[key] = entry
    return out


def embedding_subsample(n: int, fraction: float = EMBEDDING_FRACTION, seed: int = 0) -> np.ndarray:
    """Sorted indices of the seeded 1/10 (``fraction``) subsample of all cells the 2-D embedding uses."""
    if not 0 < fraction <= 1:
        raise ValueError(f"embedding fraction must be in (0, 1], got {fraction}")
    return cap_rows(n, max(1, int(round(n * fraction))), seeded_rng(seed, "embedding"))


def plot_treatment_response(panels: dict[str, tuple[pd.DataFrame, CohortTrajectories]], distances: dict[str, pd.DataFrame],
                            path: str) -> str:
    """One row per representation: the embedded cells of each cohort coloured by time point with the
    median trajectory as arrows (Fig. 5b), and the per-patient W2 by transition and cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"pre": "tab:blue", "on": "tab:orange", "post": "tab:green"}
    fig, axes = plt.subplots(len(panels), 3, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for row, (rep, (embedded, traj)) in enumerate(panels.items()):
        for col, (code, cohort) in enumerate(COHORTS.items()):
            ax = axes[row, col]
            part = embedded[embedded["response"] == code]
            for t, cells in part.groupby("timepoint", sort=False):
                ax.scatter(cells["x"], cells["y"], s=2, alpha=0.25, color=colours.get(str(t), "grey"), label=str(t))
            med = traj.medians[traj.medians["cohort"] == cohort].set_index("timepoint")
            for _, d in traj.displacements[traj.displacements["cohort"] == cohort].iterrows():
                ax.annotate("", xy=(med.loc[d["t2"], "x"], med.loc[d["t2"], "y"]),
                            xytext=(med.loc[d["t1"], "x"], med.loc[d["t1"], "y"]),
                            arrowprops={"arrowstyle": "->", "color": "k", "lw": 1.5})
            ax.set_title(f"{rep}: {cohort.replace('_', '-')}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize=7, markerscale=4)
        ax = axes[row, 2]
        dist = distances[rep]
        labels, values = [], []
        for (t1, t2), part in dist.groupby(["t1", "t2"], sort=False):
            for code, cohort in COHORTS.items():
                labels.append(f"{t1}→{t2}\n{cohort.split('_')[0][:7]}")
                values.append(part.loc[part["response"] == code, "w2"].to_numpy())
        if values:
            ax.boxplot(values, showfliers=False)
            ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_ylabel("entropic W2 per patient")
        ax.set_title(f"{rep}: shift between time points", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
