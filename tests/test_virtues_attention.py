"""VirTues attention readouts: the Methods' importance scores against hand-computed attention, the
encoder's opt-in attention hook (bit-identical outputs when off, the block's real softmax when on),
the channel-summary probe (reproduces the packed encoder without its tokens) and the command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.virtues_attention import importance_from_rho, importance_scores, marker_rho, stitch_maps
from lightning_modules.components.virtues import VirTues, VirTuesArch
from lightning_modules.virtues_attention_probe import (
    ChannelSummaryVirTues,
    first_marker_layer,
    marker_attention,
    penultimate_spatial_layer,
)

ARCH = VirTuesArch(d_model=32, encoder_heads=2, decoder_heads=2, ffn_dim=64, encoder_pattern="hvhvhv",
                   decoder_pattern="f", esm_dim=16)


def _model(seed: int = 0) -> VirTues:
    torch.manual_seed(seed)
    model = VirTues(ARCH).eval()
    model.set_marker_table(torch.randn(6, 16), [f"P{i:05d}" for i in range(6)])
    return model


def test_importance_scores_of_a_hand_computed_attention_tensor():
    # one head, one position; row m' = attending marker, column m = attended marker
    alpha = np.array([[0.7, 0.2, 0.1],
                      [0.1, 0.8, 0.1],
                      [0.3, 0.3, 0.4]])[None, :, :, None, None]
    # m=0 receives [.7, .1, .3] from m'=0,1,2 -> min-max [1, 0, 1/3]; m=1: [.2, .8, .3] -> [0, 1, 1/6];
    # m=2: [.1, .1, .4] -> [0, 0, 1]
    assert importance_scores(alpha) == pytest.approx([4 / 3, 7 / 6, 1.0])
    # two heads and two positions: rho sums positions before the scaling, heads are summed after it
    second = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    two = np.stack([np.stack([alpha[0, ..., 0, 0], second], -1), np.stack([second, second], -1)])  # (2, 3, 3, 2)
    rho_head0 = alpha[0, ..., 0, 0] + second  # [m', m]
    rho_head1 = 2 * second
    expected = np.zeros(3)
    for rho in (rho_head0, rho_head1):
        for m in range(3):
            col = rho[:, m]
            expected[m] += ((col - col.min()) / (col.max() - col.min())).sum()
    assert importance_scores(two) == pytest.approx(expected)
    assert marker_rho(two).shape == (3, 3, 2) and marker_rho(two)[0, 1, 1] == pytest.approx(rho_head1[1, 0])
    # a marker every m' attends to equally has no defined scaling: 0, never NaN
    flat = np.full((1, 3, 3, 4), 1 / 3)
    assert np.array_equal(importance_from_rho(marker_rho(flat)), np.zeros(3))
    with pytest.raises(ValueError):
        marker_rho(np.zeros((2, 3, 4)))


def test_encoder_attention_hook_is_opt_in_and_is_the_blocks_softmax():
    model = _model()
    crops, ids = torch.randn(2, 4, 32, 32), torch.tensor([0, 2, 3, 5])
    packed = (crops.reshape(8, 32, 32), ids.repeat(2), None, [4, 4])
    plain = model.encoder(*packed)
    layer = first_marker_layer(ARCH.encoder_pattern)
    captured = {}
    def keep_input(module, inputs):  # type: ignore[no-untyped-def]
        captured["x"] = inputs[0]  # returns None: the input is left as it is

    handle = model.encoder.encoder[layer].register_forward_pre_hook(keep_input)
    hooked = model.encoder(*packed, return_attention=[layer, 2])
    handle.remove()
    assert torch.equal(plain.patch_summary, hooked.patch_summary) and torch.equal(plain.channel_tokens, hooked.channel_tokens)
    assert plain.attention == {} and set(hooked.attention) == {layer, 2}
    # by hand from the block's own weights: marker sequences are ordered (sample, position), PS token first
    block = model.encoder.encoder[layer].encoder_layer
    x = captured["x"]  # packed in the marker layout: (B * P * (1 + C), d)
    h = block.layernorm1(x)
    heads, hd = block.multi_head_attention.num_heads, block.multi_head_attention.head_dim
    q = block.multi_head_attention.W_q(h).view(2 * 16, 5, heads, hd).transpose(1, 2)
    k = block.multi_head_attention.W_k(h).view(2 * 16, 5, heads, hd).transpose(1, 2)
    manual = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)  # (B*P, heads, 5, 5)
    assert torch.allclose(hooked.attention[layer], manual, atol=1e-6)
    spatial = hooked.attention[2]  # rows: 2 PS rows then 8 channel rows, 16 positions each
    assert spatial.shape == (10, 2, 16, 16) and torch.allclose(spatial.sum(-1), torch.ones(10, 2, 16))
    # marker_attention: alpha[b, head, m', m, i, j] without the PS token
    alpha = marker_attention(model, crops, ids)
    assert alpha.shape == (2, 2, 4, 4, 4, 4)
    assert torch.allclose(alpha[1, 0, 2, 3, 1, 2], manual[1 * 16 + 1 * 4 + 2, 0, 3, 4])


def test_channel_summary_probe_reproduces_the_encoder_and_maps_attention():
    model = _model(1)
    crops, ids = torch.randn(3, 4, 32, 32), torch.tensor([1, 2, 3, 4])
    net = ChannelSummaryVirTues(model, 4, num_classes=2)
    with torch.no_grad():
        logits, grid, att = net(crops, ids, summary=False)
        reference = torch.stack(model.encode(list(crops), [ids] * 3).patch_summary)
        assert logits is None and att is None and torch.allclose(grid, reference, atol=1e-5)
        layer = penultimate_spatial_layer(ARCH.encoder_pattern)
        assert layer == 2
        logits, grid, att = net(crops, ids, attention_layer=layer)
    assert logits.shape == (3, 2) and att.shape == (3, 2, 4, 4)
    total = att.sum((-1, -2))
    assert (total > 0).all() and (total < 1).all()  # the rest goes to the summary token itself
    assert not torch.allclose(att[0], att[1])  # depends on the crop at a layer after marker mixing
    with pytest.raises(ValueError):
        penultimate_spatial_layer("vv")


def test_stitch_maps_places_crops_on_the_patch_grid():
    maps = [np.full((2, 2), 1.0), np.full((2, 2), 2.0)]
    out = stitch_maps(maps, [(0, 0), (16, 16)], (40, 40), patch_size=8)
    assert out.shape == (5, 5) and out[0, 0] == 1.0 and out[2, 2] == 2.0 and out[3, 3] == 2.0
    assert np.isnan(out[0, 4]) and np.isnan(out[4, 0])


def test_cli_writes_importance_and_attention_maps(synthetic_dataset, tmp_path, capsys):
    from datamodules.store import DatasetStore
    from experiments.virtues_attention import main
    from tests.test_virtues_reconstruct import save_random_checkpoint

    store = DatasetStore(synthetic_dataset)
    ids = store.embedding_ids()
    ckpt = save_random_checkpoint(tmp_path / "tiny.ckpt", ids, torch.stack([store.embedding(u) for u in ids]))
    out = tmp_path / "attention"
    args = ["--ckpt", str(ckpt), "--data", str(synthetic_dataset), "--out", str(out), "--device", "cpu",
            "--no-progress", "--label-column", "architecture", "--epochs", "1", "--min-tissue", "0"]
    assert main(args) == 0
    importance = pd.read_csv(out / "marker_importance.csv")
    tissues = store.tissue_ids()
    assert set(importance["tissue_id"]) == set(tissues) | {"all"}
    n_markers = importance.groupby("tissue_id").size()
    assert n_markers.nunique() == 1 and n_markers.iloc[0] > 1
    for _, region in importance.groupby("tissue_id"):
        assert sorted(region["rank"]) == list(range(1, len(region) + 1))
        assert (region["importance"] >= 0).all() and (region["importance"] <= 2 * len(region)).all()  # <= M' x heads
    probe = pd.read_csv(out / "probe.csv")
    assert set(probe["tissue_id"]) == set(tissues) and probe["trained_on"].sum() == 3  # train 2 + val 1
    maps = np.load(out / "attention_maps.npz")
    image = store.image("imc", tissues[0], store.resolutions("imc")[0])
    assert set(maps.files) == set(tissues) and maps[tissues[0]].shape == (image.shape[1] // 8, image.shape[2] // 8)
    assert np.nanmax(maps[tissues[0]]) < 1 and np.nanmin(maps[tissues[0]]) > 0
    assert all((out / "attention_maps" / f"{t}.png").stat().st_size > 0 for t in tissues)
    assert (out / "marker_importance.png").stat().st_size > 0
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err
    assert main(args[:8] + ["--out", str(tmp_path / "x"), "--label-column", "nope"]) == 2
