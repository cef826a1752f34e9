"""Rollouts, metrics and noise injection against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.catalog import N_STATE
from training.metrics import per_variable, summary
from training.models import N_INPUT, DynamicsModel, ModelConfig, build_model
from training.rollout import add_state_noise, rollout_windows


class Recorder(DynamicsModel):
    """Predicts state + 0.1 and records every input it is given (per step, per row)."""

    def __init__(self) -> None:
        super().__init__(ModelConfig(model="recorder"))
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.seen: list[torch.Tensor] = []

    def init_state(self, batch, device, dtype):  # noqa: ANN001
        return [torch.zeros(batch, 1, dtype=dtype)]

    def step(self, x, state):  # noqa: ANN001
        self.seen.append(x.clone())
        return x[:, :N_STATE] + 0.1, [state[0] + 1]


def _stay(n: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs whose state / interventions encode the bin index, so leaks are visible."""
    x = np.zeros((n, N_INPUT))
    for t in range(n):
        x[t, :N_STATE] = offset + t
        x[t, N_STATE : 2 * N_STATE] = 1.0
        x[t, 2 * N_STATE :] = 100 + offset + t  # interventions of bin t
    return x, x[:, :N_STATE].copy()


def test_rollout_feeds_predictions_back_with_true_interventions() -> None:
    x, s = _stay(6)
    model = Recorder()
    w = rollout_windows(model, [x], [s], (3,))[3]
    assert w.start.tolist() == [0, 1, 2]  # every start with s + 3 <= n - 1
    for j, start in enumerate(w.start):
        # step k predicts bin start+k as state_start + 0.1 k (prediction fed back each step)
        np.testing.assert_allclose(w.pred[j, :, 0], start + 0.1 * np.arange(1, 4))
        np.testing.assert_allclose(w.true[j, :, 0], start + np.arange(1, 4))
    # The inputs of the fed-back steps: prediction, mask 0, true interventions of that bin.
    fed = model.seen[len(x) - 1 :]  # after the history pass (bins 0..n-2: every start)
    assert len(fed) == 2
    for k, inp in enumerate(fed, start=1):
        inp = inp.numpy()[w.start]  # one row per start bin, in order
        np.testing.assert_allclose(inp[:, 0], w.start + 0.1 * k)
        assert (inp[:, N_STATE : 2 * N_STATE] == 0).all()
        np.testing.assert_allclose(inp[:, 2 * N_STATE], 100 + w.start + k)


@pytest.mark.parametrize("name", ["gru", "cfc", "lstm"])
def test_rollout_does_not_leak_future_state(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=name, units=8, layers=1, backbone_units=8)).double()
    rng = np.random.default_rng(0)
    x = rng.random((7, N_INPUT))
    s = x[:, :N_STATE].copy()
    base = rollout_windows(model, [x], [s], (1, 3))
    x2 = x.copy()
    x2[4:, : 2 * N_STATE] = rng.random((3, 2 * N_STATE))  # change state + masks after bin 3
    changed = rollout_windows(model, [x2], [s], (1, 3))
    for k in (1, 3):
        keep = base[k].start <= 3  # windows whose history ends at bin <= 3
        np.testing.assert_array_equal(base[k].pred[keep], changed[k].pred[keep])
        if (~keep).any():  # K=1 has windows starting later, which must see the change
            assert not np.allclose(base[k].pred[~keep], changed[k].pred[~keep])
    # ... and a window's rollout does not use later interventions than bin start + K - 1.
    x3 = x.copy()
    x3[6, 2 * N_STATE :] += 5.0  # interventions of the last bin, never an input for K=3 from s<=3
    again = rollout_windows(model, [x3], [s], (3,))
    np.testing.assert_array_equal(base[3].pred, again[3].pred)


def test_rollout_windows_batch_many_stays_like_one() -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig(model="gru", units=8, layers=2)).double()
    rng = np.random.default_rng(1)
    stays = [rng.random((n, N_INPUT)) for n in (3, 7, 5)]
    states = [x[:, :N_STATE].copy() for x in stays]
    together = rollout_windows(model, stays, states, (2,))[2]
    for i in range(3):
        alone = rollout_windows(model, [stays[i]], [states[i]], (2,))[2]
        np.testing.assert_allclose(together.pred[together.stay == i], alone.pred, atol=1e-12)


def test_noise_injection_only_touches_history_state() -> None:
    x, s = _stay(8)
    clean = Recorder()
    rollout_windows(clean, [x], [s], (1,))
    noisy = Recorder()
    w = rollout_windows(noisy, add_state_noise([x], 0.05, 3), [s], (1,))[1]
    hist_clean = torch.stack(clean.seen[:8], 1).numpy()[0]
    hist_noisy = torch.stack(noisy.seen[:8], 1).numpy()[0]
    diff = hist_noisy - hist_clean
    assert np.abs(diff[:, N_STATE:]).max() == 0  # masks and interventions untouched
    assert 0.03 < diff[:, :N_STATE].std() < 0.07  # sigma 0.05 in scaled units
    np.testing.assert_array_equal(w.true[:, 0, 0], np.arange(1, 8))  # truth stays clean
    again = Recorder()
    rollout_windows(again, add_state_noise([x], 0.05, 3), [s], (1,))
    np.testing.assert_array_equal(torch.stack(again.seen[:8], 1).numpy()[0], hist_noisy)


def test_metrics_match_hand_computed_values() -> None:
    true = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    pred = np.array([[2.0, 2.0], [3.0, 2.0], [4.0, 9.0]])
    m = summary(pred, true)
    # errors: 1, 0, 0, -2, -1, 0 -> MAE 4/6, MSE 6/6
    assert m["mae"] == pytest.approx(4 / 6)
    assert m["rmse"] == pytest.approx(1.0)
    # var 0: SSE 2, SST 8 -> 0.75; var 1: SSE 4, mean 5, SST 9+1+16=26 -> 1 - 4/26
    assert m["r2"] == pytest.approx((0.75 + (1 - 4 / 26)) / 2)
    rows = per_variable(pred, true, ("a", "b"))
    assert rows[0]["variable"] == "a"
    assert rows[0]["mae"] == pytest.approx(2 / 3)
    assert rows[0]["rmse"] == pytest.approx(np.sqrt(2 / 3))
    assert rows[0]["r2"] == pytest.approx(0.75)
    assert rows[1]["rmse"] == pytest.approx(np.sqrt(4 / 3))
    assert rows[1]["mae"] == pytest.approx(2 / 3)
    assert rows[1]["r2"] == pytest.approx(1 - 4 / 26)
    assert np.isnan(summary(np.ones((3, 1)), np.full((3, 1), 2.0))["r2"])  # constant truth


def test_rollout_clips_predictions_to_bounds_before_feeding_them_back() -> None:
    x, s = _stay(6)
    model = Recorder()  # predicts state + 0.1 each step: 3 steps from bin 2 would reach 2.3
    lo = torch.full((N_STATE,), -1.0, dtype=torch.float64)
    hi = torch.full((N_STATE,), 2.15, dtype=torch.float64)
    w = rollout_windows(model, [x], [s], (3,), bounds=(lo, hi))[3]
    assert (w.pred <= 2.15).all()
    j = int(np.flatnonzero(w.start == 2)[0])
    np.testing.assert_allclose(w.pred[j, :, 0], [2.1, 2.15, 2.15])
    # What is fed back is the clipped value, not the raw prediction.
    fed = [inp.numpy() for inp in model.seen[len(x) :]]
    assert max(inp[:, 0].max() for inp in fed) <= 2.15


def test_state_bounds_are_the_clamp_ranges_in_scaled_space(tmp_path) -> None:  # noqa: ANN001
    from features.preprocess import CLAMP_HIGH, CLAMP_LOW
    from tests.synthetic import write_synthetic_etl_output
    from training.data import BinsDataModule
    from training.rollout import state_bounds

    dm = BinsDataModule(write_synthetic_etl_output(tmp_path / "out", n_stays=8))
    dm.setup("fit")
    pre = dm.preprocessor
    lo, hi = state_bounds(pre)
    np.testing.assert_allclose(pre.unscale_state(lo.numpy()), CLAMP_LOW)
    np.testing.assert_allclose(pre.unscale_state(hi.numpy()), CLAMP_HIGH)


def test_a_horizon_longer_than_every_stay_gives_empty_windows_with_masks() -> None:
    """A validation split whose stays are all shorter than K+1 bins (it happens in CV folds):
    the K windows are empty, not missing their observed masks."""
    model = build_model(ModelConfig(model="gru", units=4, ensemble=1)).double()
    inputs = [np.random.default_rng(0).random((3, N_INPUT))]
    wins = rollout_windows(model, inputs, [x[:, :N_STATE] for x in inputs], (1, 5))
    assert len(wins[1].stay) == 2 and wins[1].observed.shape == (2, 1, N_STATE)
    assert wins[5].pred.shape == wins[5].observed.shape == (0, 5, N_STATE)
