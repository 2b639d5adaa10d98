"""Runs the bad-input catalogue (``tests/bad_input_catalogue``): each case must end in one clear line.

``pytest -k bad_input`` lists the cases. A command case must exit 2 with exactly one ``error:``
line on stderr (no traceback), a library case must raise an exception of the error contract;
both must name the problem (the case's regex) and leave nothing half-written. README's
troubleshooting table is checked against the catalogue (regenerate it with
``python -m tests.test_bad_inputs``).
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported here, not inside a captured case: its log handler keeps the real stderr)
import pytest

from datamodules.command_line import USER_ERRORS

if __package__:  # `python -m tests.test_bad_inputs` (regenerating the README table)
    from tests.bad_input_catalogue import CATALOGUE, Case, Ctx, Shared
else:  # pytest puts tests/ on sys.path
    from bad_input_catalogue import CATALOGUE, Case, Ctx, Shared

REPO = Path(__file__).resolve().parents[1]


def _temporaries(root: Path) -> list[Path]:
    """Half-written leftovers: temporary names of datasets, images, tables and outputs."""
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".tmp")]


def _run_command_case(case: Case, ctx: Ctx, capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    try:
        rc = case.run(ctx)
    except SystemExit as exc:  # argparse / jsonargparse refusals print their own usage line
        rc = exc.code
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out, f"{case.id}: a traceback reached the user:\n{err}"
    assert rc == 2, f"{case.id}: exit code {rc}, expected 2; stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"{case.id}: expected exactly one 'error:' line, got:\n{err}"
    return lines[0]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input(case: Case, catalogue_shared: Shared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ctx = Ctx(tmp_path, catalogue_shared)
    if case.kind == "command":
        message = _run_command_case(case, ctx, capsys)
    else:
        with pytest.raises(case.exception) as info:
            case.run(ctx)
        assert isinstance(info.value, USER_ERRORS), \
            f"{case.id}: {type(info.value).__name__} is not a user error: a command would show a traceback"
        message = str(info.value)
    assert re.search(case.expect, message, flags=re.S), f"{case.id}: message does not name the problem: {message}"
    leftovers = _temporaries(tmp_path / "out") + _temporaries(tmp_path / "copy")
    assert not leftovers, f"{case.id}: half-written output left behind: {leftovers}"
    if case.id == "disk_full_during_write":
        assert not (tmp_path / "out" / "ds").exists(), "a dataset was left behind after a failed write"


def test_catalogue_is_complete() -> None:
    assert len(CATALOGUE) >= 60
    stages = {c.stage for c in CATALOGUE}
    assert {"ingest", "store", "datamodule", "training", "prediction", "virtues", "evaluation"} <= stages, stages
    assert len({c.id for c in CATALOGUE}) == len(CATALOGUE)


def test_readme_lists_every_case() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [c.id for c in CATALOGUE if f"`{c.id}`" not in readme]
    assert not missing, f"README troubleshooting table lacks: {missing} (regenerate with python -m tests.test_bad_inputs)"


def troubleshooting_table() -> str:
    """Markdown table for the README, generated from the catalogue."""
    rows = ["| case | stage | symptom | fix |", "|---|---|---|---|"]
    rows += [f"| `{c.id}` | {c.stage} | {c.symptom} | {c.fix} |" for c in CATALOGUE]
    return "\n".join(rows)


if __name__ == "__main__":
    print(troubleshooting_table())
