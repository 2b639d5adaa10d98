"""The bad-input catalogue: every way a user can hand a command something broken, and what they get.

Each :class:`Case` feeds one broken file, folder or setting to the stage that reads it. Two kinds:

* ``command`` cases run a command's ``main(argv)`` in-process and must end with exit code 2 and
  exactly one ``error: ...`` line on stderr that names the file or option and matches ``expect``
  (so no traceback can reach the user);
* ``library`` cases call the library function a command would call and must raise an exception of
  the error contract (``datamodules.command_line.USER_ERRORS``, so the command prints one line)
  whose message matches ``expect``.

After every case nothing half-written may be left behind. ``tests/test_bad_inputs.py`` runs them
(``pytest -k bad_input``); README's troubleshooting table is generated from :data:`CATALOGUE`.
Cases live in one module per stage; each module exports ``CASES``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    stage: str  # ingest | store | datamodule | training | prediction | virtues | evaluation | model
    symptom: str
    fix: str
    run: Callable[["Ctx"], Any]
    expect: str  # regex the one error line (or the exception message) must match
    kind: str = "command"  # "command": run returns main()'s exit code; "library": run raises
    exception: type[BaseException] = Exception  # library cases: the type that must be raised


class Ctx:
    """What a case needs: a fresh temporary folder and shared, read-only artifacts built once."""

    def __init__(self, tmp: Path, shared: "Shared"):
        self.tmp = tmp
        self.shared = shared

    @property
    def dataset(self) -> Path:
        """The session's synthetic dataset (4 tissues of 256 px): never write into it."""
        return self.shared.dataset

    def dataset_copy(self) -> Path:
        """A private copy of the synthetic dataset, to damage."""
        target = self.tmp / "copy" / "synth"
        shutil.copytree(self.shared.dataset, target)
        return target

    @property
    def rosie_ckpt(self) -> Path:
        return self.shared.rosie_ckpt

    @property
    def virtues_ckpt(self) -> Path:
        return self.shared.virtues_ckpt

    @property
    def out(self) -> Path:
        """Where cases write outputs (checked for half-written leftovers afterwards)."""
        return self.tmp / "out"


class Shared:
    """Artifacts built once per test session (per xdist worker)."""

    def __init__(self, root: Path, dataset: Path):
        self.root = root
        self.dataset = dataset

    @cached_property
    def rosie_ckpt(self) -> Path:
        """A random convnext_atto RosieModule over the synthetic CODEX panel, saved by Lightning."""
        from benchmarks.rosie_predict_memory import write_demo_checkpoint
        from datamodules.store import DatasetStore

        names = [str(n) for n in DatasetStore(self.dataset).channels("codex")["channel_name"]]
        return write_demo_checkpoint(self.root / "rosie_atto.ckpt", names)

    @cached_property
    def virtues_ckpt(self) -> Path:
        """A random tiny VirTuesModule with the synthetic IMC panel's marker table, saved by Lightning."""
        import lightning as L
        import torch

        from datamodules.store import DatasetStore
        from lightning_modules.components.virtues import VirTuesArch
        from lightning_modules.virtues import VirTuesModule

        store = DatasetStore(self.dataset)
        ids = store.embedding_ids()
        torch.manual_seed(0)
        module = VirTuesModule(VirTuesArch(d_model=32, encoder_heads=2, decoder_heads=2, ffn_dim=64,
                                           encoder_pattern="hvhv", decoder_pattern="f"))
        module.set_marker_table(torch.stack([store.embedding(u) for u in ids]), ids)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.strategy.connect(module)
        path = self.root / "virtues_tiny.ckpt"
        trainer.save_checkpoint(path)
        return path


class CodeRunner:
    """A pickle payload that runs a shell command on load (``touch <mark>``), as an attacker would."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.mark}",))


def write_code_running_pickle(path: Path, mark: Path, wrap: str = "checkpoint") -> Path:
    """``path`` holds a torch-style checkpoint whose unpickling would create ``mark``."""
    import torch

    payload = {"state_dict": {"w": CodeRunner(mark)}, "pytorch-lightning_version": "2.6.0"} if wrap == "checkpoint" \
        else CodeRunner(mark)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _collect() -> list[Case]:
    from . import core

    modules = [core]
    for name in ("files", "models", "outputs", "tables", "evaluation"):
        try:
            modules.append(__import__(f"{__name__}.{name}", fromlist=["CASES"]))
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    cases = [c for m in modules for c in m.CASES]
    seen: set[str] = set()
    for c in cases:
        if c.id in seen:
            raise ValueError(f"duplicate bad-input case id {c.id!r}")
        seen.add(c.id)
    return cases


CATALOGUE: list[Case] = _collect()
