"""Gated multi-head ABMIL: the paper's formula with U, V shared by the heads; padding-invariant,
permutation-invariant attention pooling that learns a bag label; training leaves the best-validation
weights; the tissue-classification command learns a planted label and reports macro-F1."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.tissue_bags import TissueBags, collate_bags
from lightning_modules.components.abmil import GatedAttentionMIL


def test_padding_and_order_do_not_change_the_output():
    torch.manual_seed(0)
    model = GatedAttentionMIL(6, 3, hidden_dim=8, num_heads=2).eval()
    bag = torch.randn(5, 6)
    alone, att = model(bag[None])
    assert att.shape == (1, 2, 5) and torch.allclose(att.sum(-1), torch.ones(1, 2))
    batch = collate_bags([(bag, torch.tensor(0)), (torch.randn(9, 6), torch.tensor(1))])
    padded, att_padded = model(batch["bags"], batch["mask"])
    assert torch.allclose(padded[0], alone[0], atol=1e-6)
    assert (att_padded[0, :, 5:] == 0).all()
    shuffled, _ = model(bag[torch.randperm(5)][None])
    assert torch.allclose(shuffled, alone, atol=1e-6)
    with pytest.raises(ValueError):
        GatedAttentionMIL(6, 1)


def test_u_and_v_are_shared_by_the_heads_only_w_differs():
    in_dim, hidden, heads, classes = 6, 8, 2, 3
    model = GatedAttentionMIL(in_dim, classes, hidden_dim=hidden, num_heads=heads)
    n_params = sum(p.numel() for p in model.parameters())
    # V and U: hidden x in_dim each, no bias (the paper's formula); w: one hidden vector per head;
    # classifier over the concatenated heads
    assert n_params == 2 * hidden * in_dim + heads * hidden + (heads * in_dim * classes + classes)
    more = GatedAttentionMIL(in_dim, classes, hidden_dim=hidden, num_heads=4 * heads)
    extra = sum(p.numel() for p in more.parameters()) - n_params
    assert extra == 3 * heads * hidden + 3 * heads * in_dim * classes  # only w and the classifier grow
    # a_n^h = softmax_n(w_h . (tanh(V x_n) * sigmoid(U x_n))), computed by hand for each head
    torch.manual_seed(1)
    x = torch.randn(1, 5, in_dim)
    V, U, W = model.attention_v.weight, model.attention_u.weight, model.attention_w
    for h in range(heads):
        scores = torch.stack([W[h] @ (torch.tanh(V @ x[0, n]) * torch.sigmoid(U @ x[0, n])) for n in range(5)])
        assert torch.allclose(model.attention(x)[0, h], torch.softmax(scores, 0), atol=1e-6)


def _bags(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Class 1 bags hide a few 'positive' instances among background ones (the MIL setting)."""
    rng = np.random.default_rng(seed)
    bags, labels = [], rng.integers(0, 2, n)
    for y in labels:
        bag = rng.normal(size=(int(rng.integers(20, 40)), 8)).astype(np.float32)
        if y:
            bag[: 3] += 4.0 * np.eye(8, dtype=np.float32)[0]
        bags.append(bag)
    return bags, labels


def test_module_learns_a_bag_label():
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_modules.abmil import AbmilModule

    L.seed_everything(0)
    bags, y = _bags(64, 0)
    test_bags, test_y = _bags(32, 1)
    module = AbmilModule(8, 2, hidden_dim=16, num_heads=2, lr=3e-3)
    trainer = L.Trainer(max_epochs=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(TissueBags(bags, y), batch_size=16, shuffle=True, collate_fn=collate_bags))
    probs = torch.cat(trainer.predict(module, DataLoader(TissueBags(test_bags, test_y), batch_size=16, collate_fn=collate_bags)))
    assert (probs.argmax(1).numpy() == test_y).mean() > 0.9


def test_fit_leaves_the_best_validation_weights_not_the_last():
    """Validation labels are the training labels flipped: the more the model learns, the worse its
    validation loss, so the best epoch is an early one and the last epoch's weights are wrong."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_modules.abmil import AbmilModule

    class Snapshots(L.Callback):
        def __init__(self) -> None:
            self.states: list[dict[str, torch.Tensor]] = []

        def on_validation_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
            if not trainer.sanity_checking:
                self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    L.seed_everything(0)
    bags, y = _bags(48, 3)
    val_bags, val_y = _bags(16, 4)
    module = AbmilModule(8, 2, hidden_dim=16, num_heads=2, lr=3e-3)
    snaps = Snapshots()
    trainer = L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[snaps])
    trainer.fit(module, DataLoader(TissueBags(bags, y), batch_size=16, shuffle=True, collate_fn=collate_bags),
                DataLoader(TissueBags(val_bags, 1 - val_y), batch_size=16, collate_fn=collate_bags))
    history = np.array(module.val_history)
    assert len(history) == len(snaps.states) == 8
    best = int(np.argmin(history))
    assert module.best_epoch == best and best < 7 and history[-1] > history[best]
    final = module.state_dict()
    assert all(torch.equal(final[k], snaps.states[best][k]) for k in final)
    assert not all(torch.equal(final[k], snaps.states[-1][k]) for k in final)


def test_cli_reports_abmil_and_mean_token_baseline(tmp_path, capsys):
    from datamodules.store import DatasetWriter
    from experiments.virtues_tissue_classification import main

    bags, y = _bags(32, 2)
    ids = [f"t{i:02d}" for i in range(32)]
    splits = ["train"] * 20 + ["val"] * 4 + ["test"] * 8
    data = tmp_path / "ds"
    with DatasetWriter.create(data) as w:
        w.write_tissues(pd.DataFrame({"tissue_id": ids, "split": splits, "status": np.where(y == 1, "pos", "neg")}))
    (tmp_path / "tokens" / "niches").mkdir(parents=True)
    for tid, bag in zip(ids, bags):
        k = len(bag) // 4
        np.savez(tmp_path / "tokens" / "niches" / f"{tid}.npz", tokens=bag[: 4 * k].reshape(4, k, 8).mean(1),
                 patch_tokens=bag[: 4 * k].reshape(4, k, 1, 8).astype(np.float16))
    out = tmp_path / "cls"
    args = ["--tokens", str(tmp_path / "tokens"), "--data", str(data), "--label", "status", "--out", str(out),
            "--seeds", "2", "--max-epochs", "15", "--lr", "3e-3"]
    assert main(args) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["virtues_abmil", "runs"] == 2 and summary.loc["mean_token_logreg", "runs"] == 1
    assert summary.loc["virtues_abmil", "n_train"] == 24 and summary.loc["virtues_abmil", "n_test"] == 8
    assert set(y[24:]) == {0, 1}  # both classes among the test tissues
    runs = pd.read_csv(out / "runs.csv").set_index("method")
    assert (runs.loc["virtues_abmil", "macro_f1"] >= 0.8).all()  # the planted label is learned in every seed
    assert (runs.loc["virtues_abmil", "best_epoch"] < runs.loc["virtues_abmil", "epochs"]).all()
    assert len(pd.read_csv(out / "predictions.csv")) == 2 * 8 + 8
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err
    assert main(args[:-8] + ["--label", "nope", "--out", str(tmp_path / "x")]) == 2
