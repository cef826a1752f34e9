"""The training objectives: the closed-loop loss is the evaluation rollout's error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.catalog import N_STATE
from training.data import pad_collate
from training.lit import LitDynamics, rollout_errors, teacher_forced_errors
from training.models import ModelConfig, build_model
from training.rollout import rollout_windows

N_INPUT = 2 * N_STATE + 3


def _stays(seed: int = 0, lengths=(7, 3, 5, 2)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        x = rng.uniform(0, 1, (n, N_INPUT)).astype(np.float32)
        x[:, N_STATE : 2 * N_STATE] = rng.integers(0, 2, (n, N_STATE))  # observed masks
        out.append(x)
    return out


def _bounds():
    lo = torch.full((N_STATE,), 0.05, dtype=torch.float64)
    return lo, torch.full((N_STATE,), 0.95, dtype=torch.float64)


@pytest.mark.parametrize("model", ["gru", "cfc", "lstm", "linear"])
@pytest.mark.parametrize("measured_only", [True, False])
def test_closed_loop_errors_equal_the_evaluation_rollouts(model: str, measured_only: bool):
    """Per-step squared-error sums of the training objective match those of the windows that
    evaluation scores: the model is trained on exactly the rollout it is judged by."""
    torch.manual_seed(0)
    cfg = ModelConfig(model=model, units=8, layers=2, backbone_units=8, direct_weight=0.0)
    m = build_model(cfg).double()
    m.eval()
    stays = _stays()
    k = 4
    batch = pad_collate([torch.from_numpy(x).double() for x in stays])
    with torch.no_grad():
        sums, counts = rollout_errors(m, batch["x"], batch["lengths"], k, _bounds(), measured_only)
    states = [x[:, :N_STATE] for x in stays]
    wins = rollout_windows(m, stays, states, tuple(range(1, k + 1)), bounds=_bounds())
    for step in range(1, k + 1):
        w = wins[step]
        err = (w.pred[:, -1] - w.true[:, -1]) ** 2
        weight = w.observed[:, -1] if measured_only else np.ones_like(err)
        assert sums[step - 1].item() == pytest.approx((err * weight).sum(), rel=1e-9, abs=1e-12)
        assert counts[step - 1].item() == pytest.approx(weight.sum())


def test_teacher_forced_errors_are_one_step_errors_over_real_bins() -> None:
    torch.manual_seed(0)
    m = build_model(ModelConfig(model="gru", units=8)).double().eval()
    stays = _stays(1)
    batch = pad_collate([torch.from_numpy(x).double() for x in stays])
    with torch.no_grad():
        sse, n = teacher_forced_errors(m, batch["x"], batch["lengths"], measured_only=False)
        expect = sum(
            ((m(torch.from_numpy(x).double()[None, :-1])[0] - x[1:, :N_STATE]) ** 2).sum().item()
            for x in stays
        )
    assert sse.item() == pytest.approx(expect, rel=1e-9)
    assert n.item() == sum(len(x) - 1 for x in stays) * N_STATE


def test_closed_loop_loss_has_gradients_through_fed_back_steps() -> None:
    """Only steps >= 2 in the loss: the gradient must still reach the weights (through the
    fed-back predictions), so the objective really trains the multi-step rollout."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(model="cfc", units=8, backbone_units=8))
    stays = _stays(2, lengths=(6, 6))
    batch = pad_collate([torch.from_numpy(x) for x in stays])
    sums, counts = rollout_errors(m, batch["x"], batch["lengths"], 3, None, True)
    (sums[2] / counts[2]).backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_lit_module_checkpoint_says_what_it_is(tmp_path) -> None:
    lit = LitDynamics(
        ModelConfig(model="gru", units=8).to_dict(), objective="closed_loop", rollout_k=3
    )
    assert lit.hparams.model_config["model"] == "gru"
    assert lit.hparams.rollout_k == 3
    restored = LitDynamics(**lit.hparams)
    assert type(restored.model) is type(lit.model)


def test_closed_loop_training_lowers_the_validation_rollout_error(tmp_path) -> None:
    """A few epochs on learnable synthetic dynamics reduce val_rollout_mse."""
    import lightning as L
    from torch.utils.data import DataLoader

    rng = np.random.default_rng(0)
    stays = []
    for _ in range(24):
        n = 8
        x = np.zeros((n, N_INPUT), dtype=np.float32)
        x[0, :N_STATE] = rng.uniform(0.2, 0.8, N_STATE)
        for t in range(1, n):  # mean-reverting dynamics, all values measured
            x[t, :N_STATE] = 0.5 + 0.6 * (x[t - 1, :N_STATE] - 0.5)
        x[:, N_STATE : 2 * N_STATE] = 1.0
        stays.append(torch.from_numpy(x))
    loader = DataLoader(stays, batch_size=8, collate_fn=pad_collate)
    L.seed_everything(0, verbose=False)
    lit = LitDynamics(ModelConfig(model="gru", units=16).to_dict(), lr=1e-2, rollout_k=3)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    before = trainer.validate(lit, loader, verbose=False)[0]["val_rollout_mse"]
    trainer = L.Trainer(
        max_epochs=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(lit, loader, loader)
    after = trainer.validate(lit, loader, verbose=False)[0]["val_rollout_mse"]
    assert after < 0.5 * before


@pytest.mark.parametrize("model", ["gru", "cfc"])
def test_ensemble_forecasts_the_members_mean_and_trains_each_on_its_own_rollout(model: str):
    torch.manual_seed(0)
    cfg = ModelConfig(
        model=model, units=8, backbone_units=8, ensemble=3, zero_head=False, direct_weight=0.0
    )
    ens = build_model(cfg).double()
    stays = _stays(3)
    batch = pad_collate([torch.from_numpy(x).double() for x in stays])
    states = [x[:, :N_STATE] for x in stays]
    ens.eval()
    wins = rollout_windows(ens, stays, states, (1,))[1]  # unclipped: the mean of the members
    member_preds = [rollout_windows(m, stays, states, (1,))[1].pred for m in ens.members]
    np.testing.assert_allclose(wins.pred, np.mean(member_preds, axis=0), atol=1e-12)
    # training: the loss is the mean of the members' own closed-loop losses
    ens.train()
    sums, counts = rollout_errors(ens, batch["x"], batch["lengths"], 3, _bounds(), True)
    own = [rollout_errors(m, batch["x"], batch["lengths"], 3, _bounds(), True) for m in ens.members]
    expect = torch.stack([s for s, _ in own]).mean(dim=0)
    torch.testing.assert_close(sums, expect)
    torch.testing.assert_close(counts, own[0][1])


def test_training_that_never_beats_its_start_returns_the_start(tmp_path) -> None:
    """The starting model (the level gains' ridge fit) is a checkpoint candidate: when every
    epoch is worse on validation (here a learning rate that wrecks the weights), training
    returns the start, not the least bad epoch."""
    import lightning as L

    from tests.synthetic import write_synthetic_etl_output
    from training.config import TrainConfig
    from training.train import build_lit, data_module, fit_lightning

    data = write_synthetic_etl_output(tmp_path / "data", n_stays=24, n_bins=12, seed=0)
    cfg = TrainConfig(
        model="gru", data=data, epochs=2, batch_size=8, lr=50.0, grad_clip=0.0, units=4,
        ensemble=1, accelerator="cpu", devices="1", threads=1,
        checkpoint_dir=tmp_path / "ckpt",
    )  # fmt: skip
    dm = data_module(cfg)
    L.seed_everything(0, verbose=False)
    start = build_lit(cfg, dm).state_dict()
    L.seed_everything(0, verbose=False)
    _, lit, history, stats = fit_lightning(cfg, dm)
    assert stats["kept_start"] == 1.0
    assert min(e["val_rollout_mse"] for e in history.epochs) > stats["best_val_rollout_mse"]
    for key, value in lit.state_dict().items():
        torch.testing.assert_close(value, start[key])
