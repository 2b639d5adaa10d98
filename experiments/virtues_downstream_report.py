"""``report.md`` of `make exp-virtues-downstream`: each analysis's numbers, the paper's beside them,
and whether what the cohort generator planted was found.

The paper's values (Wenckstern et al. 2025, text of Results): virtual biomarkers — univariate CV
AUROC of RS1, RS2, NRS1, NRS2 0.783 / 0.707 / 0.599 / 0.577, multivariate 0.817, ratio baselines
23-30 % lower; transferred risk strata — log-rank P < 0.005, C-index 0.628 against the tumour:CD8
0.602, tumour:CD4 0.608, tumour:B 0.569 ratios; TME risk ratios in the high-risk group — vascular
stroma 0.399, suppressed expansion 4.464, APC-enriched 5.636 (our structures are the planted niches,
so only the direction is comparable). Each check is read from the steps' own output files; a step
that failed is reported with its error instead of hiding the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd

PAPER = {"multivariate_auroc": 0.817, "univariate_auroc": "0.783 / 0.707 / 0.599 / 0.577 (RS1, RS2, NRS1, NRS2)",
         "transfer_c_index": 0.628, "transfer_baselines": "tumour:CD8 0.602, tumour:CD4 0.608, tumour:B 0.569",
         "tme_rr": "vascular stroma 0.399 (protective), suppressed expansion 4.464, APC-enriched 5.636 (adverse)"}


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—" if value is None else str(value)
    return "—" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"


def _table(df: pd.DataFrame, columns: list[str] | None = None, rows: int = 12) -> list[str]:
    df = df[columns] if columns else df
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|---" * len(df.columns) + "|"]
    for row in df.head(rows).itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) if isinstance(v, float) else str(v) for v in row) + " |")
    return lines


def _figures(out: Path, folder: str, limit: int = 4) -> list[str]:
    return [f"![{p.stem}]({p.relative_to(out)})" for p in sorted((out / folder).glob("*.png"))[:limit]]


def _check(name: str, passed: bool | None, detail: str) -> str:
    mark = "—" if passed is None else ("yes" if passed else "**no**")
    return f"| {name} | {mark} | {detail} |"


def biomarker_section(out: Path) -> tuple[list[str], str]:
    s = _json(out / "biomarkers" / "summary.json")
    if not s:
        return [], _check("discovered biomarkers predict response (AUROC ≥ 0.7, above the ratios)", None, "not run")
    auc, base = s.get("multivariate_auroc"), s.get("best_baseline_auroc")
    lines = ["## Virtual biomarkers (Fig. 5c-g)", "",
             f"{s.get('n_patients')} patients ({s.get('n_responders')} responders), {s.get('n_cells')} pre-treatment cells, "
             f"{s.get('n_candidates')} candidate clusters over Leiden resolutions {s.get('resolutions', ['?'])[0]}–"
             f"{s.get('resolutions', ['?'])[-1]}; signatures {', '.join(s.get('signatures', []))}.", ""]
    comparison = _csv(out / "biomarkers" / "comparison.csv")
    if comparison is not None:
        lines += _table(comparison) + [""]
    lines += [f"Multivariate CV AUROC {_fmt(auc)} (paper 0.817); best ratio baseline {s.get('best_baseline')} "
              f"{_fmt(base)} (paper: the signatures beat the ratios by 23-30 %). Univariate in the paper: "
              f"{PAPER['univariate_auroc']}.", "", *_figures(out, "biomarkers"), ""]
    ok = auc is not None and base is not None and auc >= 0.7 and auc > base
    return lines, _check("discovered biomarkers predict response (AUROC ≥ 0.7, above the best ratio)", ok,
                         f"AUROC {_fmt(auc)} vs {s.get('best_baseline')} {_fmt(base)}")


def niche_section(out: Path, manifest: dict) -> tuple[list[str], str]:
    """Which planted niches the signatures' cells come from (the generator's ground truth, unseen by the analysis)."""
    members = out / "biomarkers" / "signature_cells.parquet"
    cells_dir = out / "tokens_discovery" / "cells"
    if not members.exists() or not cells_dir.exists():
        return [], _check("response signatures enriched in the planted response niches", None, "not run")
    m = pd.read_parquet(members)
    obs = pd.concat([ad.read_h5ad(f, backed="r").obs for f in sorted(cells_dir.glob("*.h5ad"))])
    if "niche" not in obs:
        return [], _check("response signatures enriched in the planted response niches", None, "no niche labels")
    obs.index = obs["tissue_id"].astype(str) + ":" + obs["cell_id"].astype(str)
    niche = obs["niche"].astype(str).reindex(m.index)
    response, non_response = set(manifest.get("response_niches", [])), set(manifest.get("non_response_niches", []))
    rows = [{"signature": "all pre-treatment cells", "n_cells": len(niche),
             "response_niches": niche.isin(response).mean(), "non_response_niches": niche.isin(non_response).mean()}]
    for name in [c for c in m.columns if c.startswith(("RS", "NRS"))]:
        sel = m[name].astype(bool)
        rows.append({"signature": name, "n_cells": int(sel.sum()), "response_niches": niche[sel].isin(response).mean(),
                     "non_response_niches": niche[sel].isin(non_response).mean()})
    table = pd.DataFrame(rows)
    base = table.iloc[0]
    rs = table[table["signature"].str.startswith("RS")]
    nrs = table[table["signature"].str.startswith("NRS")]
    ok_rs = bool((rs["response_niches"] > base["response_niches"]).all())
    ok_nrs = bool((nrs["non_response_niches"] > base["non_response_niches"]).all())
    lines = ["### Where the signatures' cells come from (planted niches; ground truth the analysis never saw)", "",
             *_table(table), ""]
    rs_detail = (f"{', '.join(f'{v:.0%}' for v in rs['response_niches'])} response-niche cells vs "
                 f"{base['response_niches']:.0%} of all pre-treatment cells")
    nrs_detail = (f"{', '.join(f'{v:.0%}' for v in nrs['non_response_niches'])} non-response-niche cells vs "
                  f"{base['non_response_niches']:.0%} of all pre-treatment cells")
    return lines, "\n".join([_check("response signatures (RS) come from the planted response niches", ok_rs, rs_detail),
                              _check("non-response signatures (NRS) come from the planted non-response niches", ok_nrs,
                                     nrs_detail)])


def transfer_section(out: Path) -> tuple[list[str], str]:
    s = _json(out / "transfer" / "summary.json")
    if not s:
        return [], _check("transferred risk strata separate survival (log-rank p < 0.05)", None, "not run")
    lines = ["## Signature transfer and risk strata (Fig. 5h-k)", "",
             f"{s.get('n_patients')} independent patients ({s.get('n_events')} events), strata {s.get('strata')}; "
             f"log-rank p {_fmt(s.get('logrank_p'))} (paper P < 0.005), C-index {_fmt(s.get('c_index'))} (paper 0.628; "
             f"baselines {PAPER['transfer_baselines']}). Ties: {s.get('ties')}.", ""]
    survival = _csv(out / "transfer" / "survival.csv")
    if survival is not None:
        lines += _table(survival) + [""]
    lines += [*_figures(out, "transfer"), ""]
    p = s.get("logrank_p")
    return lines, _check("transferred risk strata separate survival (log-rank p < 0.05)",
                         p is not None and p < 0.05, f"p {_fmt(p)}, C-index {_fmt(s.get('c_index'))}")


def treatment_section(out: Path, manifest: dict) -> tuple[list[str], str]:
    s = _json(out / "treatment" / "summary.json")
    if not s:
        return [], _check("responders' cell states shift differently under treatment", None, "not run")
    lines = ["## Treatment response (Fig. 5b)", "", "```", json.dumps(s, indent=1)[:1500], "```", ""]
    for name in ("displacement.csv", "w2_per_patient.csv"):
        table = _csv(out / "treatment" / name)
        if table is not None:
            lines += [f"`{name}`", "", *_table(table), ""]
    lines += [f"Planted: {manifest.get('treatment_shift_direction', manifest.get('treatment_shift', ''))}", "",
              *_figures(out, "treatment"), ""]
    # planted: responders and non-responders shift in different directions (activation and tumour loss vs
    # suppressive macrophages and exhausted T cells); also reported: whether responders' W2 is the larger
    contrast = s.get("contrast", {}).get("virtues_cell_tokens", {})
    angles = {k: v.get("displacement_angle_deg") for k, v in contrast.items() if isinstance(v, dict)}
    differs = None if not angles else any(a is not None and a >= 90 for a in angles.values())
    angle_text = ", ".join(f"{k} {a:.0f}°" for k, a in angles.items() if a is not None)
    ok = s.get("responders_shift_more")
    return lines, "\n".join([
        _check("responders' and non-responders' barycentres move in different directions (angle ≥ 90°)", differs,
               f"angle between the cohorts' displacements: {angle_text}"),
        _check("responders' cell states shift more (W2) than non-responders'", None if ok is None else bool(ok),
               str(s.get("direction_detail", "")))])


def cross_panel_section(out: Path) -> tuple[list[str], str]:
    summary = _csv(out / "cross_panel" / "summary.csv")
    if summary is None:
        return [], _check("cross-panel transfer F1 above chance for every class", None, "not run")
    per_class = _csv(out / "cross_panel" / "per_class_f1.csv")
    lines = ["## Cross-panel cell-type transfer (Fig. 3e-g)", "", *_table(summary), ""]
    ok = None
    if per_class is not None:
        lines += _table(per_class, rows=30) + [""]
        tokens = per_class[per_class["representation"] != "mean_expression"]
        ok = bool((tokens["f1"] > tokens["chance"]).all()) if len(tokens) else None
    lines += [*_figures(out, "cross_panel"), ""]
    return lines, _check("cross-panel transfer F1 above chance for every class", ok, "random forest on shared-marker tokens")


def tme_section(out: Path, manifest: dict) -> tuple[list[str], str]:
    table = _csv(out / "tme" / "risk_ratios.csv")
    risk = _csv(out / "risk" / "summary.csv")
    if table is None and risk is None:
        return [], _check("TME structures enriched in the high-risk group as planted", None, "not run")
    lines = ["## Risk groups and TME-structure risk ratios (Fig. 4a-d)", ""]
    if risk is not None:
        lines += _table(risk) + [""]
    if table is not None:
        lines += _table(table, rows=20) + ["", f"Paper: {PAPER['tme_rr']}.", ""]
    lines += [*_figures(out, "risk", 2), *_figures(out, "tme", 2), ""]
    risk = manifest.get("validation_risk", {})
    ok, detail = None, "no planted risk in the manifest"
    if table is not None and risk:
        ours = table[table["stratification"] == "virtues_cell_tokens"].set_index("structure")["risk_ratio"]
        adverse = [ours.get(f"has_{n}") for n in risk.get("risk_niches", [])]
        protective = [ours.get(f"has_{n}") for n in risk.get("protective_niches", [])]
        if None not in adverse + protective:
            ok = all(v > 1 for v in adverse) and all(v < 1 for v in protective)
            detail = (f"high-risk group: adverse niches RR {', '.join(_fmt(v) for v in adverse)}, protective "
                      f"{', '.join(_fmt(v) for v in protective)}")
    return lines, _check("TME risk ratios point the planted way (adverse > 1, protective < 1)", ok, detail)


def attention_section(out: Path) -> list[str]:
    table = _csv(out / "attention" / "marker_importance.csv")
    if table is None:
        return []
    return ["## Marker importance and attention maps (Suppl. Fig. 20)", "", *_table(table, rows=6), "",
            *_figures(out, "attention", 3), ""]


def write_downstream_report(out: Path, manifest: dict, ckpt: str, failures: dict[str, str], minutes: float,
                            argv: list[str]) -> Path:
    sections, checks = [], []
    builds = (lambda: biomarker_section(out), lambda: niche_section(out, manifest), lambda: transfer_section(out),
              lambda: treatment_section(out, manifest), lambda: tme_section(out, manifest),
              lambda: cross_panel_section(out))
    for build in builds:
        lines, check = build()
        sections += lines
        checks.append(check)
    sections += attention_section(out)
    pretrain = _json(out / "pretrain.step-done.json")
    steps_s = sum(_json(p).get("seconds", 0.0) for p in out.glob("*.step-done.json"))  # across resumed runs too
    sizes = {k: {n: v.get(n) for n in ("n_patients", "n_tissues", "n_cells")} for k, v in manifest.get("datasets", {}).items()}
    head = ["# VirTues downstream science on the synthetic cohort", "",
            f"Cohort: {sizes}. Model: `{ckpt}`"
            + (f" ({pretrain.get('steps')} pretraining steps)" if pretrain else "")
            + f"; steps took {steps_s / 60:.1f} min in all (this invocation {minutes:.1f} min).", "",
            "## What was planted, and was it found", "", "| check | found | detail |", "|---|---|---|", *checks, ""]
    if failures:
        head += ["## Steps that failed", "", *(f"- `{k}`: {v}" for k, v in failures.items()), ""]
    tail = ["## Reproduce", "", "```", "python -m experiments.virtues_downstream " + " ".join(argv), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(head + sections + tail))
    return path
