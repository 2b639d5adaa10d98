"""No command runs code from a model file it is given.

Every command that reads a checkpoint, weights or marker-embedding file is fed a pickle whose
unpickling would run ``touch <tmp>/PWNED`` (``bad_input_catalogue.write_code_running_pickle``). It
must refuse the file by name with the safe alternative (exit code 2, one ``error:`` line) and the
mark must not exist afterwards. A control test shows the payload really runs under full unpickling,
so these tests can fail.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from bad_input_catalogue import Case, CodeRunner, Ctx, Shared, write_code_running_pickle
from bad_input_catalogue.models import CASES, CODE_RUNNING_FILES, mark

CODE_RUNNING = [c for c in CASES if c.id in CODE_RUNNING_FILES]


def test_every_code_running_case_is_listed() -> None:
    assert len(CODE_RUNNING) == len(CODE_RUNNING_FILES) >= 9, sorted(CODE_RUNNING_FILES)


@pytest.mark.parametrize("case", CODE_RUNNING, ids=[c.id for c in CODE_RUNNING])
def test_command_refuses_code_running_file(case: Case, catalogue_shared: Shared, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    ctx = Ctx(tmp_path, catalogue_shared)
    capsys.readouterr()
    try:
        rc = case.run(ctx)
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    assert not mark(ctx).exists(), f"{case.id}: CODE FROM THE FILE RAN (the mark {mark(ctx)} was created)"
    assert "Traceback" not in captured.err + captured.out, f"{case.id}: a traceback reached the user:\n{captured.err}"
    assert rc == 2, f"{case.id}: exit code {rc}, expected 2; stderr:\n{captured.err}"
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"{case.id}: expected exactly one 'error:' line, got:\n{captured.err}"
    line = lines[0]
    assert CODE_RUNNING_FILES[case.id] in line, f"{case.id}: the error does not name the file: {line}"
    assert re.search(r"refusing|run code", line), f"{case.id}: the error does not say why: {line}"
    assert re.search(r"safetensors|state_dict", line), f"{case.id}: the error gives no safe alternative: {line}"
    assert re.search(case.expect, line, flags=re.S), f"{case.id}: {line}"


@pytest.mark.parametrize("wrap", ["checkpoint", "object"])
def test_payload_runs_under_full_unpickling(tmp_path: Path, wrap: str) -> None:
    """Control: the file really runs code when unpickled without weights_only."""
    target = tmp_path / "PWNED"
    path = write_code_running_pickle(tmp_path / "evil.ckpt", target, wrap=wrap)
    assert not target.exists()
    torch.load(path, weights_only=False)
    assert target.exists(), "the payload did not run: the tests above would pass vacuously"


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_loader_refuses_payload(tmp_path: Path, protocol: int) -> None:
    """Control: the project's loader refuses the payload whatever the pickle protocol, and the mark
    stays absent. Protocol 2 (torch.save's default) reaches the blocked ``os.system`` global itself,
    which the refusal names; the highest protocol may be refused earlier, at its framing opcode."""
    from lightning_modules.components.model_files import UnsafeModelFileError, load_torch_file

    target = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": CodeRunner(target)}}, path, pickle_protocol=protocol)
    with pytest.raises(UnsafeModelFileError, match=r"evil\.ckpt.*refusing.*(safetensors|state_dict)") as info:
        load_torch_file(path)
    if protocol == 2:
        assert "system" in str(info.value), f"the refusal does not name the global it blocked: {info.value}"
    assert not target.exists()
