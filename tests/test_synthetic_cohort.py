"""The cohort preset: layout, and the planted truth checked from the cells tables directly.

The cohort is what the VirTues downstream analyses (response niches, treatment shifts, survival,
cross-panel transfer) are tested on, so these tests hold the generator to its promises: the planted
niches differ between responders and non-responders before treatment, treatment shifts cell states
in the declared direction, validation survival follows the niches, panel B shares exactly the
declared markers, states are visible in the rendered IMC, and the default generator is untouched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from datamodules import synthetic as S
from datamodules.store import DatasetStore
from datamodules.synthetic.cohort import discovery_specs
from datamodules.synthetic.cohort_tissue import MIN_NICHE_CELLS, simulate_cohort_tissue
from experiments import data_synthetic

#: sha256 of two default tissues (seed 7, 128 px) rendered before the cohort preset existed.
DEFAULT_GOLDEN = "239e779730dd9d2a2ad192803b4513532d420ca3f3cc1981bb9d915a5a36107f"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "c"
    argv = ["--preset", "cohort", "--out", str(out), "--patients", "4", "--validation", "12", "--panel-b", "2",
            "--size", "192", "--seed", "1"]
    assert data_synthetic.main(argv) == 0
    return out


def _tables(root: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    store = DatasetStore(str(root / name))
    return store.tissues(), store.cells()


def test_layout_columns_and_manifest(cohort: Path) -> None:
    manifest = json.loads((cohort / S.COHORT_MANIFEST).read_text())
    assert manifest["response_niches"] == list(S.RESPONSE_NICHES)
    assert manifest["non_response_niches"] == list(S.NON_RESPONSE_NICHES)
    assert manifest["validation_risk"]["risk_niches"] == list(S.NON_RESPONSE_NICHES)
    assert set(manifest["treatment_shift_direction"]) == {"responder", "non_responder"}
    structure = [f"has_{n}" for n in S.NICHE_NAMES]
    for name in S.COHORT_DATASETS:
        store = DatasetStore(str(cohort / name))
        assert not [p for p in store.validate() if p.severity == "error"], name
        assert store.modalities() == ["imc"]
        tissues, cells = store.tissues(), store.cells()
        assert {"tissue_id", "patient_id", "split", *structure}.issubset(tissues.columns), name
        assert {"cell_type", "coarse_type", "cell_state", "niche", "compartment", "x", "y"}.issubset(cells.columns)
        assert set(cells["niche"]).issubset({*S.NICHE_NAMES, "none"})
        assert set(cells["cell_state"]).issubset(S.CELL_STATES)
    discovery, _ = _tables(cohort, "discovery")
    assert len(discovery) == 12 and set(discovery["timepoint"]) == set(S.TIMEPOINTS)
    per_patient = discovery.groupby("patient_id")
    assert (per_patient["timepoint"].nunique() == 3).all() and (per_patient["response"].nunique() == 1).all()
    assert (per_patient["split"].nunique() == 1).all(), "a patient's timepoints must share a split"
    assert sorted(per_patient["response"].first()) == [0, 0, 1, 1]
    validation, _ = _tables(cohort, "validation")
    assert {"survival_time", "survival_event"}.issubset(validation.columns) and "response" not in validation.columns
    assert not set(validation["patient_id"]) & set(discovery["patient_id"])


def test_structure_labels_follow_the_cells(cohort: Path) -> None:
    for name in S.COHORT_DATASETS:
        tissues, cells = _tables(cohort, name)
        counts = pd.crosstab(cells["tissue_id"], cells["niche"]).reindex(tissues["tissue_id"], fill_value=0)
        for niche in S.NICHE_NAMES:
            direct = counts.get(niche, pd.Series(0, index=counts.index)) >= MIN_NICHE_CELLS
            assert (direct.to_numpy() == tissues[f"has_{niche}"].to_numpy()).all(), (name, niche)


def test_responders_carry_response_niches_before_treatment(cohort: Path) -> None:
    tissues, cells = _tables(cohort, "discovery")
    pre = tissues[tissues["timepoint"] == "pre"].set_index("tissue_id")
    counts = pd.crosstab(cells["tissue_id"], cells["niche"]).reindex(pre.index, fill_value=0)
    response_cells = counts.reindex(columns=list(S.RESPONSE_NICHES), fill_value=0).sum(axis=1)
    non_response_cells = counts.reindex(columns=list(S.NON_RESPONSE_NICHES), fill_value=0).sum(axis=1)
    responder = pre["response"] == 1
    assert response_cells[responder].mean() > 2 * response_cells[~responder].mean()
    assert non_response_cells[~responder].mean() > 2 * non_response_cells[responder].mean()


def test_treatment_shifts_states_per_response_group(cohort: Path) -> None:
    tissues, cells = _tables(cohort, "discovery")
    cells = cells.merge(tissues[["tissue_id", "response", "timepoint"]], on="tissue_id")

    def fraction(response: int, timepoint: str, cell_type: str, state: str) -> float:
        """Share of `state` among the cells of `cell_type` outside planted niches (the background shift)."""
        sub = cells[(cells["response"] == response) & (cells["timepoint"] == timepoint)
                    & (cells["cell_type"] == cell_type) & (cells["niche"] == "none")]
        return float((sub["cell_state"] == state).mean())

    assert fraction(1, "post", "CD8_T", "activated") > fraction(1, "pre", "CD8_T", "activated") + 0.1
    assert fraction(0, "post", "CD8_T", "exhausted") > fraction(0, "pre", "CD8_T", "exhausted")
    suppressive = cells[(cells["cell_type"] == "Macrophage") & (cells["cell_state"] == "suppressive")]
    per_tissue = suppressive.groupby("tissue_id").size().reindex(tissues["tissue_id"], fill_value=0)
    design = tissues.set_index("tissue_id")
    per_group = per_tissue.groupby([design["response"], design["timepoint"]]).mean()
    assert per_group[(0, "post")] > per_group[(0, "pre")], "non-responders gain suppressive macrophages on treatment"
    tumour = tissues.groupby(["response", "timepoint"])["tumour_cell_fraction"].mean()
    assert tumour[(1, "post")] < tumour[(1, "pre")]


def _concordance(score: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C: a higher score should go with an earlier event."""
    agree = total = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        later = time > time[i]
        total += later.sum()
        agree += (score[i] > score[later]).sum() + 0.5 * (score[i] == score[later]).sum()
    return agree / total


def test_validation_hazard_follows_the_niches(cohort: Path) -> None:
    tissues, cells = _tables(cohort, "validation")
    counts = pd.crosstab(cells["tissue_id"], cells["niche"]).reindex(tissues["tissue_id"], fill_value=0)
    present = counts >= MIN_NICHE_CELLS
    score = present.reindex(columns=list(S.NON_RESPONSE_NICHES), fill_value=False).sum(axis=1) \
        - present.reindex(columns=list(S.RESPONSE_NICHES), fill_value=False).sum(axis=1)
    c = _concordance(score.to_numpy(), tissues["survival_time"].to_numpy(), tissues["survival_event"].to_numpy())
    assert c > 0.6, f"survival must follow the planted niches (C = {c:.2f})"


def test_panel_b_shares_exactly_the_declared_markers(cohort: Path) -> None:
    manifest = json.loads((cohort / S.COHORT_MANIFEST).read_text())
    a = DatasetStore(str(cohort / "discovery")).channels("imc").set_index("channel_name")
    b = DatasetStore(str(cohort / "panel_b")).channels("imc").set_index("channel_name")
    shared = set(a.index) & set(b.index)
    assert shared == set(S.PANEL_B_SHARED) == set(manifest["panels"]["shared_markers"])
    assert 0 < len(shared) < min(len(a), len(b))
    assert set(b.index) - shared == {c for c, _, _ in S.PANEL_B_ONLY} == set(manifest["panels"]["panel_b_only"])
    assert (a.loc[sorted(shared), "uniprot_id"].fillna("") == b.loc[sorted(shared), "uniprot_id"].fillna("")).all()
    _, cells = _tables(cohort, "panel_b")
    assert set(cells["coarse_type"]).issubset(set(S.COARSE_TYPE.values())) and cells["coarse_type"].nunique() >= 4


def test_cell_states_are_visible_in_the_image(cohort: Path) -> None:
    store = DatasetStore(str(cohort / "discovery"))
    names = list(store.channels("imc")["channel_name"])
    cells = store.cells()
    rows = []
    for tissue_id in store.tissue_ids():
        image = store.image("imc", tissue_id, 1.0).read_all()
        mask = store.cell_mask(tissue_id, 1.0)
        ids = np.arange(1, int(mask.max()) + 1)
        means = {c: ndimage.mean(image[names.index(c)], mask, ids) for c in ("Ki-67", "PD-1", "IDO", "FAP")}
        rows.append(pd.DataFrame({"tissue_id": tissue_id, "cell_id": ids, **means}))
    cells = cells.merge(pd.concat(rows), on=["tissue_id", "cell_id"])

    def mean(cell_type: str, state: str, channel: str) -> float:
        return float(cells.loc[(cells["cell_type"] == cell_type) & (cells["cell_state"] == state), channel].mean())

    assert mean("CD8_T", "activated", "Ki-67") > 2 * mean("CD8_T", "exhausted", "Ki-67")
    assert mean("CD8_T", "exhausted", "PD-1") > 2 * mean("CD8_T", "resting", "PD-1")
    assert mean("Macrophage", "suppressive", "IDO") > 2 * mean("Macrophage", "resting", "IDO")
    assert mean("Fibroblast", "caf", "FAP") > 2 * mean("Fibroblast", "resting", "FAP")


def test_cohort_tissue_is_deterministic() -> None:
    spec = discovery_specs(2, 128, 5)[1]
    names = list(S.imc_channels_table()["channel_name"])
    a = simulate_cohort_tissue(spec, 128, names, S.IMC_PROTEIN)
    b = simulate_cohort_tissue(spec, 128, names, S.IMC_PROTEIN)
    assert np.array_equal(a.imc, b.imc) and a.cells.equals(b.cells) and a.info == b.info


def test_default_generator_output_unchanged() -> None:
    digest = hashlib.sha256()
    for i in range(2):
        t = S.simulate_tissue(7, i, 128)
        for array in (t.he, t.codex, t.imc, t.tissue_mask, t.tissue_mask_1um, t.cell_mask, t.cell_mask_1um):
            digest.update(array.tobytes())
        digest.update(t.cells.to_csv(index=False, float_format="%.6g").encode())
        digest.update(json.dumps(t.info, sort_keys=True, default=str).encode())
    assert digest.hexdigest() == DEFAULT_GOLDEN, "the default generator's output changed"


@pytest.mark.parametrize(("argv", "message"), [
    (["--size", "100"], "--size"),
    (["--patients", "1"], "--patients"),
    (["--panel-b", "0"], "--panel-b"),
])
def test_cli_rejects_bad_cohort_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                          message: str) -> None:
    assert data_synthetic.main(["--preset", "cohort", "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "x").exists()
