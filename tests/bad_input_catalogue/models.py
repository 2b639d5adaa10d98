"""Bad model files: pickles that would run code, the other model's checkpoint, cut-off and empty
files, embeddings of the wrong size and the wrong official weights, each given to the command that
reads it. Every command that accepts a checkpoint, weights or embedding file is fed a pickle whose
loading would run ``touch <tmp>/PWNED``: it must refuse it by name without running it
(``tests/test_no_code_from_files.py`` also checks that the mark was never created).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
from PIL import Image

from . import Case, Ctx, write_code_running_pickle

REPO = Path(__file__).resolve().parents[2]
ROSIE_TINY = REPO / "experiments/configs/rosie/tiny.yaml"
VIRTUES_TINY = REPO / "experiments/configs/virtues/tiny.yaml"

#: refused by name, says it would run code, and names the safe alternative
UNSAFE = r"(refusing|run code).*(safetensors|state_dict)"
SYMPTOM_UNSAFE = "a downloaded or shared model file whose unpickling would run code"
FIX_UNSAFE = ("re-save only the weights (`torch.save(model.state_dict(), path)`) or convert to .safetensors; "
              "`--trust-checkpoint` only for a file you made yourself")


def mark(ctx: Ctx) -> Path:
    """The file the code-running payload would create."""
    return ctx.tmp / "PWNED"


def _evil(ctx: Ctx, name: str, wrap: str = "checkpoint", folder: str = "") -> Path:
    return write_code_running_pickle(ctx.tmp / folder / name if folder else ctx.tmp / name, mark(ctx), wrap=wrap)


def _he_png(ctx: Ctx) -> Path:
    path = ctx.tmp / "he.png"
    rgb = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(path)
    return path


def _ome_tiff(path: Path, names: list[str], size: int = 64) -> Path:
    data = np.random.default_rng(0).random((len(names), size, size), dtype=np.float32)
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "Channel": {"Name": names}})
    return path


def _channels_csv(path: Path, ids: dict[str, str | None]) -> Path:
    pd.DataFrame({"channel_name": list(ids), "uniprot_id": list(ids.values())}).to_csv(path, index=False)
    return path


def _ingest_argv(ctx: Ctx, tissue_id: str, embeddings: Path, channels: dict[str, str | None]) -> list[str]:
    image = _ome_tiff(ctx.tmp / f"{tissue_id}.ome.tif", list(channels))
    csv = _channels_csv(ctx.tmp / f"{tissue_id}_channels.csv", channels)
    return ["--image", str(image), "--modality", "imc", "--dataset", "ds", "--tissue-id", tissue_id,
            "--out", str(ctx.out), "--channels", str(csv), "--embeddings", str(embeddings), "--split", "train"]


# ---- a code-running pickle given to every command that reads a model file ----------------------


def case_pickle_rosie_predict(ctx: Ctx) -> int:
    from experiments.rosie_predict import main

    return main(["--ckpt", str(_evil(ctx, "evil.ckpt")), "--he", str(_he_png(ctx)), "--out", str(ctx.out / "pred"),
                 "--device", "cpu", "--no-progress"])


def case_pickle_rosie_evaluate_gradcam(ctx: Ctx) -> int:
    """With dataset truth ``--ckpt`` is unused; the checkpoint it reads is ``--gradcam-ckpt``."""
    from experiments.rosie_evaluate import main

    return main(["--pred", str(ctx.dataset), "--truth", str(ctx.dataset), "--out", str(ctx.out / "eval"),
                 "--gradcam-ckpt", str(_evil(ctx, "evil.ckpt"))])


def case_pickle_rosie_evaluate_patch_level(ctx: Ctx) -> int:
    """Patch-level truth (markers.csv, channel_registered/, he_patches/): the model is ``--ckpt``."""
    from experiments.rosie_evaluate import main

    truth = ctx.tmp / "patch_truth"
    (truth / "channel_registered").mkdir(parents=True)
    (truth / "he_patches" / "s0").mkdir(parents=True)
    pd.DataFrame({"channel_index": [0], "marker": ["CD45"]}).to_csv(truth / "markers.csv", index=False)
    pd.DataFrame({"index": [0], "x": [0], "y": [0], "mean_intensity_channel0": [1.0]}).to_csv(
        truth / "channel_registered" / "s0.csv", index=False)
    Image.fromarray(np.zeros((128, 128, 3), np.uint8), "RGB").save(truth / "he_patches" / "s0" / "s0_0.png")
    return main(["--ckpt", str(_evil(ctx, "evil.ckpt")), "--truth", str(truth), "--out", str(ctx.out / "eval")])


def case_pickle_virtues_reconstruct(ctx: Ctx) -> int:
    from experiments.virtues_reconstruct import main

    return main(["--ckpt", str(_evil(ctx, "evil.ckpt")), "--data", str(ctx.dataset), "--out", str(ctx.out / "rec")])


def case_pickle_virtues_tokens(ctx: Ctx) -> int:
    from experiments.virtues_tokens import main

    return main(["--ckpt", str(_evil(ctx, "evil.ckpt")), "--data", str(ctx.dataset), "--out", str(ctx.out / "tok"),
                 "--split", "test", "--device", "cpu", "--no-progress"])


def case_pickle_virtues_retrieval(ctx: Ctx) -> int:
    from experiments.virtues_retrieval import main

    return main(["--ckpt", str(_evil(ctx, "evil.ckpt")), "--data", str(ctx.dataset), "--out", str(ctx.out / "ret"),
                 "--device", "cpu", "--no-progress"])


def case_pickle_rosie_train_resume(ctx: Ctx) -> int:
    from experiments.cli import run_cli
    from experiments.rosie_train import main

    return run_cli(main, ["fit", "--config", str(ROSIE_TINY), "--data.data_dirs", f"[{ctx.dataset}]",
                          "--ckpt_path", str(_evil(ctx, "evil.ckpt")), "--trainer.default_root_dir", str(ctx.out / "run")])


def case_pickle_virtues_pretrain_resume(ctx: Ctx) -> int:
    from experiments.cli import run_cli
    from experiments.virtues_pretrain import main

    return run_cli(main, ["fit", "--config", str(VIRTUES_TINY), "--data.data_dirs", f"[{ctx.dataset}]",
                          "--ckpt_path", str(_evil(ctx, "evil.ckpt")), "--trainer.default_root_dir", str(ctx.out / "run")])


def case_pickle_esm_weights(ctx: Ctx) -> int:
    from experiments.data_embeddings import main

    fasta = ctx.tmp / "f.fasta"
    fasta.write_text(">sp|P01730|CD4\nMNRGV\n")
    return main(["--fasta", str(fasta), "--weights", str(_evil(ctx, "evil.pt")), "--out", str(ctx.out / "emb")])


def case_pickle_marker_embedding_ingest(ctx: Ctx) -> int:
    """A bare code-running object (not even a checkpoint dict) as a marker embedding file."""
    from experiments.data_ingest import main

    folder = _evil(ctx, "P08575.pt", wrap="object", folder="emb").parent
    return main(_ingest_argv(ctx, "t0", folder, {"A": "P08575", "B": None, "C": None}))


# ---- wrong, damaged and mismatched model files --------------------------------------------------


def case_virtues_ckpt_to_rosie_predict(ctx: Ctx) -> int:
    from experiments.rosie_predict import main

    return main(["--ckpt", str(ctx.virtues_ckpt), "--he", str(_he_png(ctx)), "--out", str(ctx.out / "pred"),
                 "--device", "cpu", "--no-progress"])


def case_rosie_ckpt_to_virtues_tokens(ctx: Ctx) -> int:
    from experiments.virtues_tokens import main

    return main(["--ckpt", str(ctx.rosie_ckpt), "--data", str(ctx.dataset), "--out", str(ctx.out / "tok"),
                 "--split", "test", "--device", "cpu", "--no-progress"])


def case_truncated_checkpoint_predict(ctx: Ctx) -> int:
    from experiments.rosie_predict import main

    data = ctx.rosie_ckpt.read_bytes()
    cut = ctx.tmp / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    return main(["--ckpt", str(cut), "--he", str(_he_png(ctx)), "--out", str(ctx.out / "pred"), "--device", "cpu",
                 "--no-progress"])


def case_empty_checkpoint_predict(ctx: Ctx) -> int:
    from experiments.rosie_predict import main

    empty = ctx.tmp / "empty.ckpt"
    empty.write_bytes(b"")
    return main(["--ckpt", str(empty), "--he", str(_he_png(ctx)), "--out", str(ctx.out / "pred"), "--device", "cpu",
                 "--no-progress"])


def case_embedding_wrong_dimension_ingest(ctx: Ctx) -> int:
    from experiments.data_ingest import main

    channels = {"A": "P08575", "B": "P01730", "C": None}
    first = ctx.tmp / "emb640"
    first.mkdir()
    torch.save(torch.randn(640), first / "P08575.pt")
    rc = main(_ingest_argv(ctx, "t0", first, channels))
    if rc != 0:
        raise AssertionError(f"the first (valid) ingest failed with exit code {rc}")
    second = ctx.tmp / "emb320"
    second.mkdir()
    torch.save(torch.randn(320), second / "P01730.pt")
    return main(_ingest_argv(ctx, "t1", second, channels))


def case_official_weights_wrong_file_virtues(ctx: Ctx) -> int:
    from safetensors.torch import save_file

    from experiments.virtues_reconstruct import main

    weights = ctx.tmp / "weights.safetensors"
    save_file({"features.0.0.weight": torch.zeros(2, 2)}, str(weights))
    return main(["--ckpt", str(weights), "--data", str(ctx.dataset), "--out", str(ctx.out / "rec")])


def _unsafe(id: str, run, name: str = "evil.ckpt", where: str = "") -> Case:  # noqa: A002, ANN001
    return Case(id, "model", f"{SYMPTOM_UNSAFE}{where}", FIX_UNSAFE, run, re.escape(name) + ".*" + UNSAFE)


#: case id -> name of the code-running file it feeds (tests/test_no_code_from_files.py)
CODE_RUNNING_FILES: dict[str, str] = {
    "pickle_rosie_predict": "evil.ckpt",
    "pickle_rosie_evaluate_gradcam": "evil.ckpt",
    "pickle_rosie_evaluate_patch_level": "evil.ckpt",
    "pickle_virtues_reconstruct": "evil.ckpt",
    "pickle_virtues_tokens": "evil.ckpt",
    "pickle_virtues_retrieval": "evil.ckpt",
    "pickle_rosie_train_resume": "evil.ckpt",
    "pickle_virtues_pretrain_resume": "evil.ckpt",
    "pickle_esm_weights": "evil.pt",
    "pickle_marker_embedding_ingest": "P08575.pt",
}

CASES: list[Case] = [
    _unsafe("pickle_rosie_predict", case_pickle_rosie_predict, where=" (rosie_predict --ckpt)"),
    _unsafe("pickle_rosie_evaluate_gradcam", case_pickle_rosie_evaluate_gradcam, where=" (rosie_evaluate --gradcam-ckpt)"),
    _unsafe("pickle_rosie_evaluate_patch_level", case_pickle_rosie_evaluate_patch_level,
            where=" (rosie_evaluate --ckpt, patch-level truth)"),
    _unsafe("pickle_virtues_reconstruct", case_pickle_virtues_reconstruct, where=" (virtues_reconstruct --ckpt)"),
    _unsafe("pickle_virtues_tokens", case_pickle_virtues_tokens, where=" (virtues_tokens --ckpt)"),
    _unsafe("pickle_virtues_retrieval", case_pickle_virtues_retrieval, where=" (virtues_retrieval --ckpt)"),
    _unsafe("pickle_rosie_train_resume", case_pickle_rosie_train_resume, where=" (rosie_train fit --ckpt_path)"),
    _unsafe("pickle_virtues_pretrain_resume", case_pickle_virtues_pretrain_resume,
            where=" (virtues_pretrain fit --ckpt_path)"),
    _unsafe("pickle_esm_weights", case_pickle_esm_weights, "evil.pt", " (marker_embeddings --weights)"),
    _unsafe("pickle_marker_embedding_ingest", case_pickle_marker_embedding_ingest, "P08575.pt",
            " (a marker embedding in ingest --embeddings)"),
    Case("virtues_ckpt_to_rosie_predict", "model", "a VirTues checkpoint given to rosie_predict",
         "pass a ROSIE checkpoint (rosie_train) to rosie_predict; VirTues checkpoints go to the virtues_* commands",
         case_virtues_ckpt_to_rosie_predict, r"virtues_tiny\.ckpt.*this is a VirTues checkpoint.*rosie_predict needs"),
    Case("rosie_ckpt_to_virtues_tokens", "model", "a ROSIE checkpoint given to virtues_tokens",
         "pass a VirTues checkpoint (virtues_pretrain) or the official VirTues weights",
         case_rosie_ckpt_to_virtues_tokens, r"rosie_atto\.ckpt.*this is a ROSIE checkpoint.*VirTues"),
    Case("truncated_checkpoint_predict", "model", "a checkpoint cut off mid-download or mid-copy",
         "copy the checkpoint again (compare its size with the original)",
         case_truncated_checkpoint_predict, r"cut\.ckpt.*(truncated|damaged)"),
    Case("empty_checkpoint_predict", "model", "a 0-byte checkpoint file (a failed copy)",
         "copy the checkpoint again", case_empty_checkpoint_predict, r"empty\.ckpt.*empty"),
    Case("embedding_wrong_dimension_ingest", "model",
         "a marker embedding of another size than the dataset's (another ESM-2 model)",
         "recompute it with the model the dataset's embeddings came from (esm2_t30_150M: 640 values)",
         case_embedding_wrong_dimension_ingest, r"P01730\.pt.*320.*640"),
    Case("official_weights_wrong_file_virtues", "model", "the ROSIE authors' weights given to a VirTues command",
         "pass the VirTues model.safetensors (with its config.json) or a VirTues checkpoint",
         case_official_weights_wrong_file_virtues, r"weights\.safetensors.*ROSIE"),
]
