"""CA-MAE baseline: shapes, no marker identity, per-channel decoders, Kraus loss, CLI training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from lightning_modules.components.camae import (
    CAMAE,
    CAMAEArch,
    camae_loss,
    count_parameters,
    decoder_parameters_per_channel,
)
from lightning_modules.components.virtues import VirTues, independent_masks_for_batch
from lightning_modules.components.virtues.encoder import patchify

REPO = Path(__file__).resolve().parents[1]
TINY = CAMAEArch(d_model=32, encoder_depth=2, encoder_heads=2, encoder_ffn_dim=64, decoder_dim=16, decoder_depth=2,
                 decoder_heads=2, decoder_ffn_dim=32, cross_attention_heads=2)


def _model(n_table: int = 6, seed: int = 0) -> CAMAE:
    torch.manual_seed(seed)
    m = CAMAE(TINY)
    m.set_marker_table(torch.randn(n_table, 640), [f"M{i}" for i in range(n_table)])
    return m.eval()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 32, 24, generator=g), torch.randn(5, 32, 24, generator=g)]
    ids = [torch.tensor([0, 2, 4]), torch.tensor([1, 2, 3, 4, 5])]
    masks = independent_masks_for_batch([3, 5], 4, 3, (0.5, 0.9), generator=g)
    return images, ids, masks


def test_forward_and_encode_shapes_on_a_ragged_batch() -> None:
    m = _model()
    images, ids, masks = _batch()
    out = m(images, ids, masks)
    assert [tuple(d.shape) for d in out.decoded] == [(3, 32, 24), (5, 32, 24)]
    assert [tuple(p.shape) for p in out.patch_summary] == [(4, 3, 32)] * 2
    assert [tuple(c.shape) for c in out.channel_tokens] == [(3, 4, 3, 32), (5, 4, 3, 32)]
    # masked tokens are not encoded: zero channel tokens there, and the patch summary is the mean of the visible ones
    for c, mk, ps in zip(out.channel_tokens, masks, out.patch_summary):
        assert torch.all(c[mk] == 0) and torch.any(c[~mk] != 0)
        n = (~mk).sum(0).clamp(min=1)[..., None]
        torch.testing.assert_close(ps, c.sum(0) / n)
    enc = m.encode(images, ids)
    assert [tuple(p.shape) for p in enc.patch_summary] == [(4, 3, 32)] * 2
    torch.testing.assert_close(enc.patch_summary[1], enc.channel_tokens[1].mean(0))  # paper: mean over channels


def test_no_marker_identity_encoder_ignores_the_marker_table_and_labels() -> None:
    m = _model()
    images, ids, masks = _batch()
    ref = m.encode(images, ids, masks)
    relabelled = [torch.tensor([5, 1, 0]), torch.tensor([0, 4, 5, 3, 2])]
    other = _model(seed=0)
    other.load_state_dict(m.state_dict())
    other.marker_uniprot_ids = []
    other.set_marker_table(torch.randn(6, 640) * 100, [f"X{i}" for i in range(6)])  # different ESM vectors and ids
    for model, marker_ids in ((m, relabelled), (other, ids)):
        enc = model.encode(images, marker_ids, masks)
        for a, b in zip(enc.channel_tokens + enc.patch_summary, ref.channel_tokens + ref.patch_summary):
            torch.testing.assert_close(a, b)


def test_channel_permutation_is_equivariant() -> None:
    """Shuffling a sample's channels together with their marker ids permutes every per-channel output
    the same way and leaves the patch summary unchanged (no channel order, no channel embedding)."""
    m = _model()
    images, ids, masks = _batch()
    out = m(images, ids, masks)
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = m([images[0], images[1][perm]], [ids[0], ids[1][perm]], [masks[0], masks[1][perm]])
    torch.testing.assert_close(shuffled.decoded[1], out.decoded[1][perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled.channel_tokens[1], out.channel_tokens[1][perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled.patch_summary[1], out.patch_summary[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled.decoded[0], out.decoded[0], atol=1e-5, rtol=1e-5)
    # ... but each channel has its own decoder: relabelling a channel changes its reconstruction
    relabelled = m(images, [ids[0], torch.tensor([5, 2, 3, 4, 1])], masks)
    assert not torch.allclose(relabelled.decoded[1][0], out.decoded[1][0])


def test_per_channel_decoder_parameter_count() -> None:
    base = count_parameters(CAMAE(TINY))
    for k in (1, 7):
        grown = CAMAE(CAMAEArch(**{**TINY.to_dict(), "num_channels": k}))
        assert count_parameters(grown) - base == k * decoder_parameters_per_channel(TINY)
        one = sum(p.numel() for p in grown.channel_decoders[0].parameters()) + TINY.decoder_dim
        assert decoder_parameters_per_channel(TINY) == one


def test_paper_size_parameter_ratio_is_the_papers_25x_at_40_markers() -> None:
    """Paper: "the number of parameters in VirTues is already 25x less than CA-MAE for 40 markers"."""
    with torch.device("meta"):
        camae, virtues = CAMAE(), VirTues()
    n40 = count_parameters(camae) + 40 * decoder_parameters_per_channel(camae.arch)
    assert 24.0 <= n40 / count_parameters(virtues) <= 27.0


def test_loss_is_the_masked_patch_mse_mixed_with_fourier() -> None:
    images, _, masks = _batch()
    g = torch.Generator().manual_seed(3)
    pred = [x + torch.randn(x.shape, generator=g) for x in images]
    total, mse, fourier = camae_loss(pred, images, masks, 8, fourier_weight=0.01)
    err = torch.cat([patchify(p - x, 8).square().mean(-1) for p, x in zip(pred, images)])
    m = torch.cat(masks).reshape(err.shape)
    torch.testing.assert_close(mse, err[m].mean())
    torch.testing.assert_close(total, 0.99 * mse + 0.01 * fourier)
    # visible patches do not enter the MSE term
    moved = [p.clone() for p in pred]
    vis = ~masks[0].repeat_interleave(8, 1).repeat_interleave(8, 2)
    moved[0][vis] += 5.0
    assert torch.allclose(camae_loss(moved, images, masks, 8, 0.0)[1], mse)
    with pytest.raises(ValueError, match="mixing factor"):
        camae_loss(pred, images, masks, 8, fourier_weight=1.0)


def test_marker_table_of_another_size_is_refused() -> None:
    m = _model(6)
    with pytest.raises(ValueError, match="6 per-channel decoders"):
        m.set_marker_table(torch.zeros(7, 640), [f"M{i}" for i in range(7)])


def test_cli_training_lowers_the_loss_and_the_checkpoint_reloads(synthetic_dataset: Path, tmp_path: Path) -> None:
    from experiments.camae_pretrain import main
    from lightning_modules.camae import CAMAEModule, load_camae_module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = main(["fit", "--config", str(REPO / "experiments/configs/virtues/camae_tiny.yaml"),
                    "--data.data_dirs", f"[{synthetic_dataset}]", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.max_steps", "30", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "0",
                    "--model.lr", "3e-3", "--trainer.enable_model_summary", "false"])
    finally:
        torch.set_num_threads(threads)
    assert cli.trainer.global_step == 30
    losses = pd.read_csv(Path(cli.trainer.logger.log_dir) / "metrics.csv")["train/loss"].dropna().to_numpy()
    assert len(losses) == 30 and losses[-8:].mean() < 0.75 * losses[:4].mean(), losses
    assert cli.model.model.num_channels == 40  # one decoder per marker of the synthetic panel
    path = tmp_path / "c.ckpt"
    cli.trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["arch"]["num_channels"] == 40
    batch = next(iter(cli.datamodule.val_dataloader()))
    cli.model.eval()
    with torch.no_grad():
        a = cli.model(batch["images"], batch["marker_ids"], batch["masks"]).decoded[0]
    for reloaded in (load_camae_module(path), CAMAEModule.load_from_checkpoint(path, map_location="cpu")):
        assert reloaded.model.marker_uniprot_ids == cli.model.model.marker_uniprot_ids
        with torch.no_grad():
            torch.testing.assert_close(reloaded.eval()(batch["images"], batch["marker_ids"], batch["masks"]).decoded[0], a)
