"""One VirTues architecture value: validation, the official config.json, plain hyper-parameters and
checkpoints of both hyper-parameter layouts (flat, written before ``arch``; and ``arch``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import save_untrained

from lightning_modules.components.model_files import ModelFileError
from lightning_modules.components.virtues import (
    VirTues,
    VirTuesArch,
    independent_masks_for_batch,
)
from lightning_modules.virtues import (
    VirTuesModule,
    current_hparams,
    load_virtues_module,
)

TINY = VirTuesArch(d_model=32, encoder_heads=2, decoder_heads=2, ffn_dim=64, encoder_pattern="hvhv", decoder_pattern="f")
IDS = ["P00001", "P00002", "Q00003", "Q00004"]

#: The parity fixture's config.json (shared/data/virtues_parity_small), without the tolerances.
PARITY_CONFIG = {
    "d_model": 128, "encoder_heads": 2, "decoder_heads": 2, "head_dim": 64, "ffn_dim": 256,
    "activation": "gelu_exact_erf", "encoder_pattern": "hvhv", "decoder_pattern": "ff", "patch_size": 8,
    "esm_dim": 640, "n_markers": 40, "marker_prior": "esm", "marker_fusion": "add", "positional_embedding": "rope",
    "rope_base": 10000, "rope_table_positions": 1200, "decoder_output_hidden_layers": 0, "dropout": 0.0,
    "norm_after_encoder_and_decoder": True, "layernorm_eps": 1e-05, "num_registers": 0, "group_layers": False,
    "mask_ratio_range": [0.6, 1.0], "n_parameters": 894272, "n_state_dict_entries": 116,
}


def test_defaults_are_the_released_model():
    arch = VirTuesArch()
    assert (arch.d_model, arch.encoder_heads, arch.decoder_heads, arch.ffn_dim) == (512, 8, 8, 1024)
    assert (arch.encoder_pattern, arch.decoder_pattern, arch.patch_size, arch.esm_dim) == ("hv" * 8, "ffff", 8, 640)
    assert arch.dropout == 0.0 and arch.rope_table_positions == 1200
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.d_model = 64  # type: ignore[misc]


@pytest.mark.parametrize("change, message", [
    ({"d_model": 30}, "d_model 30 is not divisible by encoder_heads 8"),
    ({"decoder_heads": 5, "d_model": 96, "encoder_heads": 2}, "not divisible by decoder_heads 5"),
    ({"d_model": 48, "encoder_heads": 8, "decoder_heads": 8}, "head width divisible by 4"),
    ({"encoder_pattern": "hvxv"}, r"encoder pattern 'hvxv' has unsupported letters \['x'\]"),
    ({"decoder_pattern": "fh"}, r"decoder pattern 'fh' has unsupported letters \['h'\]"),
    ({"encoder_pattern": ""}, "encoder pattern is empty"),
    ({"d_model": "512"}, "d_model must be an integer"),
    ({"patch_size": 0}, "patch_size must be at least 1"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"attention_backend": "fast"}, "attention_backend 'fast' is not one of"),
])
def test_invalid_settings_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        VirTuesArch(**change)


def test_official_config_reads_and_writes_the_parity_fixtures_names():
    arch = VirTuesArch.from_official_config(PARITY_CONFIG)
    assert arch == VirTuesArch(d_model=128, encoder_heads=2, decoder_heads=2, ffn_dim=256, decoder_pattern="ff",
                               encoder_pattern="hvhv")
    written = arch.to_official_config()
    assert {k: v for k, v in written.items() if k in PARITY_CONFIG} == {
        k: v for k, v in PARITY_CONFIG.items() if k in written}
    assert "attention_backend" not in written and written["official_constructor_names"]["d_model"] == "model_dim"
    assert VirTuesArch.from_official_config(written) == arch
    assert sum(p.numel() for p in VirTues.from_official_config(PARITY_CONFIG).parameters()) == 894_272
    official_names = {"model_dim": 128, "num_encoder_heads": 2, "num_decoder_heads": 2, "feedforward_dim": 256,
                      "encoder_pattern": "hvhv", "decoder_pattern": "ff", "prior_bias_embedding_type": "esm"}
    assert VirTuesArch.from_official_config(official_names) == arch


@pytest.mark.parametrize("change, error, message", [
    ({"head_dim": 32}, ValueError, "head_dim 32"),
    ({"positional_embedding": "sinusoidal"}, NotImplementedError, "positional_embedding"),
    ({"num_registers": 4}, NotImplementedError, "num_registers"),
    ({"bogus": 1}, ValueError, r"unknown VirTues config keys \['bogus'\]"),
    ({"n_parameters": 5}, ValueError, "n_parameters=5"),
])
def test_official_config_errors(change, error, message):
    with pytest.raises(error, match=message):
        VirTues.from_official_config({**PARITY_CONFIG, **change})


def test_attention_backend_is_switchable_and_validated():
    model = VirTues(TINY)
    model.attention_backend = "loop"
    assert model.arch.attention_backend == "loop" and model.arch.d_model == 32
    with pytest.raises(ValueError, match="attention_backend"):
        model.attention_backend = "fast"


# ---- checkpoints ---------------------------------------------------------------------------------
def _module() -> VirTuesModule:
    torch.manual_seed(0)
    module = VirTuesModule(TINY, lr=3e-3)
    module.set_marker_table(torch.randn(len(IDS), 640, generator=torch.Generator().manual_seed(1)), IDS)
    return module


def _outputs(module: VirTuesModule) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 16, 24, generator=g), torch.randn(4, 16, 24, generator=g)]
    ids = [torch.tensor([0, 2, 3]), torch.tensor([3, 1, 0, 2])]
    masks = independent_masks_for_batch([3, 4], 2, 3, generator=g)
    with torch.no_grad():
        out = module.eval()(images, ids, masks)
    return out.decoded + out.patch_summary


def test_hyper_parameters_are_plain_values(tmp_path):
    module = _module()
    path = tmp_path / "v.ckpt"
    save_untrained(module, path)
    raw = torch.load(path, weights_only=True)  # no dataclass to rebuild
    assert raw["hyper_parameters"]["arch"] == TINY.to_dict() and raw["hyper_parameters"]["lr"] == 3e-3
    assert module.hparams_initial["arch"] == TINY.to_dict()  # what loggers record (W&B config, hparams.yaml)
    for loaded in (load_virtues_module(path), VirTuesModule.load_from_checkpoint(path)):
        assert loaded.model.arch == TINY and loaded.model.marker_uniprot_ids == IDS
        for a, b in zip(_outputs(module), _outputs(loaded)):
            assert torch.equal(a, b)


def test_legacy_flat_checkpoint_loads_strictly_with_its_marker_table(tmp_path):
    """A checkpoint as VirTuesModule wrote it before ``arch``: sizes at the top level of the
    hyper-parameters, the module's retired mask settings, and paths of the training machine."""
    module = _module()
    legacy_hparams = {
        "d_model": 32, "encoder_heads": 2, "decoder_heads": 2, "ffn_dim": 64, "encoder_pattern": "hvhv",
        "decoder_pattern": "f", "patch_size": 8, "esm_dim": 640, "dropout": 0.0, "attention_backend": "auto",
        "lr": 3e-3, "min_lr_ratio": 0.0, "warmup_fraction": 0.1, "weight_decay": 0.01, "wd_schedule": "constant",
        "wd_end": 0.0, "weight_decay_on_tokens": True, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
        "mask_ratio_min": 0.6, "mask_ratio_max": 1.0, "val_mask_seed": 1234,
        "marker_table_dir": "/training/machine/markers", "marker_uniprot_ids": IDS,
        "pretrained_weights": "/training/machine/model.safetensors",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    path = tmp_path / "legacy.ckpt"
    torch.save({"hyper_parameters": legacy_hparams, "state_dict": module.state_dict(),
                "virtues_marker_uniprot_ids": IDS, "virtues_marker_table": module.model.marker_table.clone()}, path)

    loaded = load_virtues_module(path)
    assert loaded.model.arch == TINY
    assert loaded.hparams["arch"] == TINY.to_dict() and loaded.hparams["lr"] == 3e-3
    assert "mask_ratio_min" not in loaded.hparams and loaded.hparams["marker_table_dir"] is None
    assert loaded.model.marker_uniprot_ids == IDS
    assert torch.equal(loaded.model.marker_table, module.model.marker_table)
    for a, b in zip(_outputs(module), _outputs(loaded)):
        assert torch.equal(a, b)


def test_loader_errors_name_the_problem(tmp_path):
    module = _module()
    hp = current_hparams(dict(module.hparams))
    cases = {
        "both.ckpt": ({**hp, "d_model": 32}, module.state_dict(), "both 'arch' and the old flat sizes"),
        "unknown.ckpt": ({**hp, "mystery": 1}, module.state_dict(), r"unknown VirTuesModule hyper-parameters \['mystery'\]"),
        "bad_arch.ckpt": ({**hp, "arch": {**TINY.to_dict(), "d_model": 33}}, module.state_dict(), "not divisible by encoder_heads 2"),
        "weights.ckpt": ({**hp, "arch": {**TINY.to_dict(), "encoder_pattern": "hvhvhv"}}, module.state_dict(),
                         r"Missing key\(s\).*encoder\.encoder\.4"),
    }
    for name, (hparams, state, message) in cases.items():
        torch.save({"hyper_parameters": hparams, "state_dict": state, "virtues_marker_uniprot_ids": IDS}, tmp_path / name)
        with pytest.raises(ModelFileError, match=message):
            load_virtues_module(tmp_path / name)
    torch.save(module.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelFileError, match="no 'state_dict'"):
        load_virtues_module(tmp_path / "bare.pt")
