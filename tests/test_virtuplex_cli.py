"""The `virtuplex` console script: every entry point is a subcommand that runs the same `main`."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import virtuplex

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        virtuplex.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for group, commands in virtuplex.COMMANDS.items():
        for name, command in commands.items():
            assert f"{group} {name}" in out and command.help in out


@pytest.mark.parametrize("group, name", [(g, n) for g, cmds in virtuplex.COMMANDS.items() for n in cmds])
def test_every_subcommand_names_a_module_with_main(group: str, name: str) -> None:
    module = importlib.import_module(virtuplex.COMMANDS[group][name].module)
    assert callable(module.main)


def test_dispatch_keeps_the_error_contract(tmp_path: Path, capsys) -> None:
    assert virtuplex.main(["data", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "missing: dataset folder does not exist" in err


def test_dispatch_runs_the_same_program_as_python_m(synthetic_dataset: Path, capsys) -> None:
    from experiments.data_info import main as info_main

    code_a = virtuplex.main(["data", "info", "--json", str(synthetic_dataset)])
    out_a = capsys.readouterr().out
    code_b = info_main(["--json", str(synthetic_dataset)])
    assert (code_a, out_a) == (code_b, capsys.readouterr().out)


def test_lightning_subcommands_default_to_fit(monkeypatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr("experiments.virtues_pretrain.main", lambda args=None: seen.append(list(args)))
    monkeypatch.setattr("experiments.rosie_train.main", lambda args=None: seen.append(list(args)))
    assert virtuplex.main(["virtues", "pretrain", "--config", "x.yaml"]) == 0
    assert virtuplex.main(["rosie", "validate", "--config", "y.yaml"]) == 0
    assert seen == [["fit", "--config", "x.yaml"], ["validate", "--config", "y.yaml"]]


def test_console_script_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'virtuplex = "experiments.virtuplex:main"' in text
    script = Path(sys.executable).parent / "virtuplex"
    if script.exists():  # installed by `make install`
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "rosie predict" in result.stdout
