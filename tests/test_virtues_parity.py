"""Parity with the official VirTues code on the stored fixture (float32, CPU).

The fixture folder holds the official state dict, inputs (ragged channel counts, a fully masked
channel, a non-square image) and the outputs the official code produced. Folder from the env var
``VIRTUES_PARITY_DIR`` (e.g. the full-size fixture), default ``../shared/data/virtues_parity_small``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lightning_modules.components.virtues import VirTues


def _shared() -> Path:
    env = os.environ.get("VIRTUPLEX_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


FIXTURE = Path(os.environ.get("VIRTUES_PARITY_DIR", _shared() / "data" / "virtues_parity_small"))


def _esm_dir() -> Path:
    # the fixture README points to ../imc_example/marker_embeddings relative to itself
    beside = FIXTURE.parent / "imc_example" / "marker_embeddings"
    return beside if beside.is_dir() else _shared() / "data" / "imc_example" / "marker_embeddings"


_needed = [FIXTURE / f for f in ("config.json", "markers.json", "model.safetensors", "inputs.safetensors",
                                 "outputs.safetensors")]
pytestmark = pytest.mark.skipif(
    not all(p.is_file() for p in _needed) or not _esm_dir().is_dir(),
    reason=f"VirTues parity fixture or ESM embeddings not found (looked in {FIXTURE} and {_esm_dir()}); "
    "set VIRTUES_PARITY_DIR / VIRTUPLEX_SHARED",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fixture(_one_thread):
    from safetensors.torch import load_file

    config = json.loads((FIXTURE / "config.json").read_text())
    model = VirTues.from_pretrained(FIXTURE / "model.safetensors", config=FIXTURE / "config.json")
    model.load_marker_table(_esm_dir(), json.loads((FIXTURE / "markers.json").read_text()))
    model.eval()
    return model, config, load_file(str(FIXTURE / "inputs.safetensors")), load_file(str(FIXTURE / "outputs.safetensors"))


def _sample_groups(inputs: dict) -> list[list[int]]:
    """Samples sharing (H, W) run in one call, as in the official run (0 and 1 together)."""
    n = len([k for k in inputs if k.startswith("image_")])
    groups: dict[tuple, list[int]] = {}
    for b in range(n):
        groups.setdefault(tuple(inputs[f"image_{b}"].shape[-2:]), []).append(b)
    return list(groups.values())


def test_structure_matches_config(fixture):
    model, config, _, _ = fixture
    assert sum(p.numel() for p in model.parameters()) == config["n_parameters"]
    assert len(model.state_dict()) == config["n_state_dict_entries"]


@pytest.mark.parametrize("backend", ["sdpa_padded", "sdpa_bucketed"])
def test_masked_forward_matches_official(fixture, backend):
    model, config, inputs, outputs = fixture
    atol = config["tolerance"]["atol"]
    model.attention_backend = backend
    errors = {}
    with torch.no_grad():
        for group in _sample_groups(inputs):
            out = model([inputs[f"image_{b}"] for b in group], [inputs[f"markers_{b}"] for b in group],
                        [inputs[f"mask_{b}"] for b in group])
            for i, b in enumerate(group):
                errors[f"decoded_{b}"] = (out.decoded[i] - outputs[f"decoded_{b}"]).abs().max().item()
                errors[f"patch_summary_{b}"] = (out.patch_summary[i] - outputs[f"patch_summary_{b}"]).abs().max().item()
                if f"channel_tokens_{b}" in outputs:
                    errors[f"channel_tokens_{b}"] = (
                        out.channel_tokens[i] - outputs[f"channel_tokens_{b}"]
                    ).abs().max().item()
    expected = {k for k in outputs if not k.startswith("patch_summary_unmasked")}
    assert set(errors) == expected
    print(f"parity ({backend}) max abs errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < atol, errors


def test_unmasked_encoder_matches_official(fixture):
    model, config, inputs, outputs = fixture
    atol = config["tolerance"]["atol"]
    errors = {}
    with torch.no_grad():
        for group in _sample_groups(inputs):
            enc = model.encode([inputs[f"image_{b}"] for b in group], [inputs[f"markers_{b}"] for b in group])
            for i, b in enumerate(group):
                key = f"patch_summary_unmasked_{b}"
                if key in outputs:
                    errors[key] = (enc.patch_summary[i] - outputs[key]).abs().max().item()
    assert errors, "fixture has no patch_summary_unmasked_* outputs"
    print("unmasked parity max abs errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < atol, errors


def test_wrong_marker_order_breaks_parity(fixture):
    """The ESM table order matters: swapping two rows must move the outputs far beyond atol."""
    model, config, inputs, outputs = fixture
    table, ids = model.marker_table.clone(), list(model.marker_uniprot_ids)
    last = len([k for k in inputs if k.startswith("image_")]) - 1  # the smallest sample
    a, b = inputs[f"markers_{last}"][:2].tolist()  # two markers this sample uses
    swapped = table.clone()
    swapped[[a, b]] = swapped[[b, a]]
    try:
        model.set_marker_table(swapped, ids)
        with torch.no_grad():
            out = model([inputs[f"image_{last}"]], [inputs[f"markers_{last}"]], [inputs[f"mask_{last}"]])
        err = (out.decoded[0] - outputs[f"decoded_{last}"]).abs().max().item()
        assert err > 100 * config["tolerance"]["atol"]
    finally:
        model.set_marker_table(table, ids)
