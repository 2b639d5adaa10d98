"""Marker (protein) embeddings: the frozen ESM-2 table VirTues uses to know each channel.

On disk the table is a folder of ``<UniProtID>.pt`` files, each a float32 tensor ``(640,)``
(mean over residues of ESM-2 ``esm2_t30_150M_UR50D`` layer 30, BOS/EOS excluded). The official
code stacks them in *sorted file-name order*, so a marker's index depends on the folder contents;
that is why the loader returns the id list next to the tensor and why checkpoints store it.

Computing new embeddings (``compute_esm_embeddings`` / the CLI) needs ``fair-esm`` or
``transformers`` installed and the ESM-2 weights as a LOCAL file or folder: nothing is downloaded.

CLI::

    python -m experiments.data_embeddings \\
        --fasta markers.fasta --weights esm2_t30_150M_UR50D.pt --out marker_embeddings/
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_modules.components.model_files import load_tensor_file, load_torch_file

ESM_LAYER = 30
ESM_DIM = 640


def list_marker_ids(folder: str | os.PathLike) -> list[str]:
    """UniProt ids of the ``*.pt`` files in ``folder``, sorted (= official table order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"marker embedding folder not found: {folder}")
    return sorted(p.stem for p in folder.glob("*.pt"))


def load_marker_embeddings(
    folder: str | os.PathLike,
    uniprot_ids: Sequence[str] | None = None,
    expected_dim: int | None = ESM_DIM,
) -> tuple[Tensor, list[str]]:
    """Stack ``<folder>/<id>.pt`` into an ``(N, dim)`` float32 table.

    Args:
        folder: directory of ``<UniProtID>.pt`` files.
        uniprot_ids: the rows to load, in this order; ``None`` = every file, sorted by name.
        expected_dim: embedding size to enforce (``None`` = any, but all files must agree).

    Raises:
        FileNotFoundError: listing every requested id without a file.
        ValueError: a file does not hold a 1-d tensor of the expected size.
    """
    folder = Path(folder)
    ids = list_marker_ids(folder) if uniprot_ids is None else [str(u) for u in uniprot_ids]
    if not ids:
        raise FileNotFoundError(f"no <UniProtID>.pt files in {folder}")
    missing = [u for u in ids if not (folder / f"{u}.pt").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} marker embedding(s) missing in {folder}: {missing}. "
            "Compute them with `python -m experiments.data_embeddings "
            "--fasta F --weights W --out DIR` or copy the <UniProtID>.pt files there."
        )
    rows: list[Tensor] = []
    for u in ids:
        dim = expected_dim if expected_dim is not None else (rows[0].numel() if rows else None)
        rows.append(load_tensor_file(folder / f"{u}.pt", expected_dim=dim))
    return torch.stack(rows), ids


def save_marker_embeddings(embeddings: dict[str, Tensor], out_dir: str | os.PathLike) -> list[Path]:
    """Write one ``<id>.pt`` per embedding (temp name, then rename, so no half-written file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for uid, emb in embeddings.items():
        target = out / f"{uid}.pt"
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
        os.close(fd)
        torch.save(emb.detach().to("cpu", torch.float32).contiguous(), tmp)
        os.replace(tmp, target)
        written.append(target)
    return written


def read_fasta(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(ids, sequences) from a FASTA file. The id is the UniProt accession: the second
    ``|``-field of UniProt headers (``>sp|P01730|CD4_HUMAN ...``), else the first word."""
    ids: list[str] = []
    seqs: list[str] = []
    current: list[str] = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if ids:
                    seqs.append("".join(current))
                header = line[1:].split()[0] if line[1:].strip() else ""
                parts = header.split("|")
                uid = parts[1] if len(parts) >= 3 else header
                if not uid:
                    raise ValueError(f"{path}: empty FASTA header")
                ids.append(uid)
                current = []
            else:
                if not ids:
                    raise ValueError(f"{path}: sequence line before the first '>' header")
                current.append(line)
    if ids:
        seqs.append("".join(current))
    if not ids:
        raise ValueError(f"{path}: no FASTA records")
    empty = [u for u, s in zip(ids, seqs) if not s]
    if empty:
        raise ValueError(f"{path}: empty sequence for {empty}")
    return ids, seqs


def compute_esm_embeddings(
    uniprot_ids: Sequence[str],
    sequences: Sequence[str],
    model_path: str | os.PathLike,
    layer: int = ESM_LAYER,
    device: str = "cpu",
    trust: bool = False,
) -> dict[str, Tensor]:
    """Mean over residues (BOS/EOS excluded) of ESM-2 layer ``layer``, one sequence at a time.

    Uses ``fair-esm`` if installed (``model_path`` = the ``esm2_t30_150M_UR50D.pt`` file), else
    ``transformers`` (``model_path`` = a local HF folder or file inside one). Nothing is downloaded.
    A fair-esm weights file is read through the project's safe loader before fair-esm sees it: the
    released file pickles an ``argparse.Namespace`` (allowed), anything that would run code needs
    ``trust`` (``--trust-checkpoint``).

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ImportError: neither fair-esm nor transformers is installed.
    """
    if len(uniprot_ids) != len(sequences):
        raise ValueError(f"{len(uniprot_ids)} ids but {len(sequences)} sequences")
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(
            f"ESM-2 weights not found at {path}; download esm2_t30_150M_UR50D yourself and pass the "
            "local path (this project never downloads weights at run time)"
        )
    weights = None
    if path.is_file() and path.suffix in (".pt", ".pth"):  # a fair-esm file: read it safely first
        weights = load_torch_file(path, trust=trust, what="ESM-2 weights", extra_globals=[argparse.Namespace])
    try:
        import esm  # fair-esm
    except ImportError:
        esm = None
    if esm is not None:
        if weights is None:
            raise FileNotFoundError(f"fair-esm needs the weights FILE (e.g. esm2_t30_150M_UR50D.pt), got {path}")
        return _embed_fair_esm(esm, uniprot_ids, sequences, path, weights, layer, device)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(
            "computing ESM embeddings needs `fair-esm` (pip install virtuplex[esm]) or `transformers`"
        ) from None
    return _embed_transformers(uniprot_ids, sequences, path, layer, device)


@torch.no_grad()
def _embed_fair_esm(esm, ids, seqs, path: Path, weights: dict, layer: int, device: str) -> dict[str, Tensor]:  # noqa: ANN001
    regression_file = path.with_name(f"{path.stem}-contact-regression.pt")
    regression = load_torch_file(regression_file, what="ESM-2 contact regression") if regression_file.is_file() else None
    model, alphabet = esm.pretrained.load_model_and_alphabet_core(path.stem, weights, regression)
    model.eval().to(device)
    if layer > model.num_layers:
        raise ValueError(f"layer {layer} > {model.num_layers} layers in {path}")
    convert = alphabet.get_batch_converter()
    out = {}
    for uid, seq in zip(ids, seqs):
        _, _, tokens = convert([(uid, seq)])
        reps = model(tokens.to(device), repr_layers=[layer])["representations"][layer]
        out[uid] = reps[0, 1 : len(seq) + 1].mean(0).float().cpu()  # drop BOS and EOS
    return out


@torch.no_grad()
def _embed_transformers(ids, seqs, path: Path, layer: int, device: str) -> dict[str, Tensor]:  # noqa: ANN001
    from transformers import AutoTokenizer, EsmModel

    folder = path if path.is_dir() else path.parent
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = EsmModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False).eval().to(device)
    n_layers = model.config.num_hidden_layers
    if layer > n_layers:
        raise ValueError(f"layer {layer} > {n_layers} layers in {folder}")
    out = {}
    for uid, seq in zip(ids, seqs):
        enc = tok(seq, return_tensors="pt").to(device)
        res = model(**enc, output_hidden_states=True)
        # fair-esm's last-layer representation is after the final LayerNorm = last_hidden_state
        hidden = res.last_hidden_state if layer == n_layers else res.hidden_states[layer]
        out[uid] = hidden[0, 1 : len(seq) + 1].mean(0).float().cpu()
    return out
