"""The per-variable level memory (training.models.level) around the networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.catalog import N_STATE
from training.lit import rollout_errors
from training.models import ModelConfig, build_model
from training.models.level import LevelMemory, fit_gains, start_from_ridge
from training.rollout import encode, forecast_rollout

N_IN = 2 * N_STATE + 3


def _history(rng: np.random.Generator, b: int, t: int) -> torch.Tensor:
    x = torch.as_tensor(rng.random((b, t, N_IN)))
    x[..., N_STATE : 2 * N_STATE] = torch.as_tensor(rng.random((b, t, N_STATE)) < 0.6).double()
    return x


def _with_gain(model: torch.nn.Module, value: float) -> torch.nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LevelMemory):
                m.gain.fill_(value)
    return model


@pytest.mark.parametrize("name", ["cfc", "gru"])
def test_untrained_network_with_level_memory_is_persistence(name: str) -> None:
    rng = np.random.default_rng(0)
    model = build_model(ModelConfig(model=name, units=8, backbone_units=8, ensemble=2)).double()
    x = _history(rng, 3, 6)
    lengths = torch.tensor([6, 4, 2])
    pred = forecast_rollout(model, x, lengths, torch.as_tensor(rng.random((3, 4, 3))))
    last = x[torch.arange(3), lengths - 1, :N_STATE]
    torch.testing.assert_close(pred, last[:, None].expand_as(pred))


@pytest.mark.parametrize("name", ["cfc", "gru", "lstm"])
def test_teacher_forced_forward_equals_chained_steps(name: str) -> None:
    rng = np.random.default_rng(3)
    cfg = ModelConfig(model=name, units=8, backbone_units=8, ensemble=1, zero_head=False)
    model = _with_gain(build_model(cfg).double(), 0.02)
    x = _history(rng, 2, 7)
    ys, _ = encode(model, x)
    torch.testing.assert_close(model(x), ys)


def test_the_pull_is_towards_measured_values_only() -> None:
    """Unmeasured (carried-forward) values and fed-back predictions never move the level."""
    model = _with_gain(
        build_model(ModelConfig(model="gru", units=4, ensemble=1, direct_weight=0.0)).double(), 0.01
    )
    x = torch.zeros(1, 5, N_IN, dtype=torch.float64)
    x[0, :3, :N_STATE] = 0.2
    x[0, :3, N_STATE : 2 * N_STATE] = 1.0  # measured at 0.2 three times
    x[0, 3:, :N_STATE] = 0.9  # then 0.9, but not measured (imputed)
    free = build_model(
        ModelConfig(model="gru", units=4, ensemble=1, level_memory=False, direct_weight=0.0)
    )
    free.load_state_dict(model.inner.state_dict())
    free.double()
    ys, _ = encode(model, x)
    base, _ = encode(free, x)
    # At the last bin the level is 0.2 (all three measurements), the state 0.9: pulled down.
    assert (ys[0, -1] < base[0, -1]).all()
    # At bin 0 the only measurement is the value itself: no pull.
    torch.testing.assert_close(ys[0, 0], base[0, 0])
    pred = forecast_rollout(model, x, torch.tensor([5]), torch.zeros(1, 9, 3, dtype=x.dtype))
    gap = (pred[0, :, 0] - base[0, -1, 0]).abs()
    # The rollout relaxes towards the measured level, monotonically, without overshooting it.
    assert (pred[0, 1:, 0] <= pred[0, :-1, 0]).all()
    assert (pred[0, :, 0] >= 0.2 - 1e-9).all() and gap[-1] > gap[0]


def test_levels_use_only_bins_up_to_t() -> None:
    rng = np.random.default_rng(1)
    model = _with_gain(build_model(ModelConfig(model="cfc", units=8, ensemble=1)).double(), 0.03)
    x = _history(rng, 1, 8)
    y = x.clone()
    y[0, 5:] = torch.as_tensor(rng.random((3, N_IN)))
    a, _ = encode(model, x)
    b, _ = encode(model, y)
    torch.testing.assert_close(a[0, :5], b[0, :5])
    assert not torch.allclose(a[0, 5:], b[0, 5:])


def test_a_model_saved_before_level_memory_existed_loads_without_it() -> None:
    old = ModelConfig(model="cfc", units=8, backbone_units=8, ensemble=1).to_dict()
    del old["level_memory"]
    state = build_model(ModelConfig(**old, level_memory=False)).state_dict()
    rebuilt = build_model(ModelConfig.from_dict(old))
    rebuilt.load_state_dict(state)  # strict: same keys and shapes
    assert not isinstance(rebuilt, LevelMemory)


def _noisy_levels(rng: np.random.Generator, b: int, t: int) -> torch.Tensor:
    """Noisy readings around a per-stay level, every value measured."""
    level = rng.random((b, 1, N_STATE)) * 0.6 + 0.2
    x = torch.zeros(b, t, N_IN, dtype=torch.float32)
    x[..., :N_STATE] = torch.as_tensor(level + rng.normal(0, 0.08, (b, t, N_STATE))).float()
    x[..., N_STATE : 2 * N_STATE] = 1.0
    return x


def test_ridge_start_beats_persistence_before_any_training() -> None:
    """The gains' closed-form start, fitted on some stays, already forecasts other stays of
    the same kind better than persistence (and than the zero start, which is persistence)."""
    rng = np.random.default_rng(4)
    train, held_out = _noisy_levels(rng, 40, 12), _noisy_levels(rng, 16, 12)
    lengths = torch.full((16,), 12)
    model = build_model(ModelConfig(model="gru", units=8, ensemble=2))
    zero, counts = rollout_errors(model, held_out, lengths, 3, None)
    start_from_ridge(model, [s.numpy() for s in train], alpha=1.0)
    with torch.no_grad():
        ridge, _ = rollout_errors(model, held_out, lengths, 3, None)
    assert (ridge / counts < 0.8 * zero / counts).all()
    gains = fit_gains([s.numpy() for s in train], alpha=1.0)
    assert gains.shape == (3, N_STATE) and (gains.sum(dim=0) > 0).all()


def test_ridge_gains_ignore_unmeasured_targets_and_short_stays() -> None:
    rng = np.random.default_rng(5)
    x = _noisy_levels(rng, 6, 10).numpy()
    x[:, :, N_STATE] = 0.0  # variable 0 never measured: no data, gain 0
    gains = fit_gains([*x, x[0, :1]], alpha=1.0)
    assert (gains[:, 0] == 0).all() and (gains[:, 1:].abs().sum(dim=0) > 0).all()
    assert (fit_gains([x[0, :1]], alpha=1.0) == 0).all()


def test_frozen_gains_keep_their_start_while_the_network_trains() -> None:
    rng = np.random.default_rng(6)
    x = _noisy_levels(rng, 8, 8)
    model = build_model(ModelConfig(model="cfc", units=4, backbone_units=4, ensemble=1))
    start_from_ridge(model, [s.numpy() for s in x], alpha=1.0)
    gains = model.gain.detach().clone()
    head = [p.detach().clone() for p in model.inner.parameters()]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sums, n = rollout_errors(model, x, torch.full((8,), 8), 3, None)
    (sums.sum() / n.sum()).backward()
    opt.step()
    torch.testing.assert_close(model.gain.detach(), gains)
    assert any(not torch.equal(p, q) for p, q in zip(model.inner.parameters(), head, strict=True))
