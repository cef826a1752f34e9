"""The networks' served forecast: their closed-loop rollout combined with the direct ridge."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from features.catalog import N_STATE
from training.models import ModelConfig, build_model
from training.rollout import rollout_windows

N_INPUT = 2 * N_STATE + 3


def _stays(n_stays: int = 12, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    inputs = []
    for n in rng.integers(4, 9, n_stays):
        x = rng.uniform(0.1, 0.9, (n, N_INPUT))
        x[:, N_STATE : 2 * N_STATE] = rng.integers(0, 2, (n, N_STATE))
        inputs.append(x)
    return inputs, [x[:, :N_STATE].copy() for x in inputs]


def _bounds() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((N_STATE,), 0.05, dtype=torch.float64), torch.full(
        (N_STATE,), 0.95, dtype=torch.float64
    )


def _fitted(weight: float, horizon: int = 5, model: str = "gru"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        model=model, units=4, backbone_units=4, ensemble=2, zero_head=False,
        direct_weight=weight, direct_horizon=horizon,
    )  # fmt: skip
    m = build_model(cfg).double().eval()
    inputs, states = _stays()
    m.direct.fit(inputs, states, groups=np.arange(len(inputs)))
    assert any(c.abs().sum() > 0 for c in m.direct.coef)
    network = copy.deepcopy(m)
    del network.direct  # the network alone: its own closed-loop rollout
    return m, network, inputs, states


@pytest.mark.parametrize("model", ["gru", "cfc"])
def test_evaluation_scores_the_weighted_combination_for_the_steps_the_ridge_covers(model: str):
    m, network, inputs, states = _fitted(0.3, horizon=2, model=model)
    lo, hi = _bounds()
    served = rollout_windows(m, inputs, states, (1, 2, 3), bounds=(lo, hi))
    own = rollout_windows(network, inputs, states, (1, 2, 3), bounds=(lo, hi))
    for k in (1, 2):
        direct, stay, start = m.direct.predict(inputs, k, (lo.numpy(), hi.numpy()))
        assert (stay == served[k].stay).all() and (start == served[k].start).all()
        expect = 0.7 * own[k].pred[:, k - 1] + 0.3 * direct
        np.testing.assert_allclose(served[k].pred[:, k - 1], expect, atol=1e-12)
    # step 3 lies past the ridge's horizon: the rollout's own
    np.testing.assert_allclose(served[3].pred[:, 2], own[3].pred[:, 2], atol=1e-12)
    # and the combination stays inside the plausible range
    assert served[3].pred.min() >= 0.05 - 1e-12 and served[3].pred.max() <= 0.95 + 1e-12


def test_a_model_saved_before_the_direct_ridge_existed_loads_without_it() -> None:
    old = ModelConfig(model="gru", units=4, ensemble=1).to_dict()
    del old["direct_weight"], old["direct_horizon"]
    cfg = ModelConfig.from_dict(old)
    assert cfg.direct_weight == 0.0
    state = build_model(ModelConfig(**(old | {"direct_weight": 0.0}))).state_dict()
    rebuilt = build_model(cfg)
    assert not hasattr(rebuilt, "direct")
    rebuilt.load_state_dict(state)  # strict: same keys and shapes


def test_level_direct_is_the_level_forecast_combined_with_the_ridge() -> None:
    """The ``level-direct`` family: ``level`` and the direct ridge, fitted in closed form on
    the training stays, combined as the networks' forecasts are; no network."""
    from training.data import StaySequences
    from training.train import fit_baseline

    inputs, states = _stays(seed=3)
    n = len(inputs)
    seqs = StaySequences(
        stay_ids=np.arange(n), subject_ids=np.arange(n), split=np.array(["train"] * n),
        raw_state=states, interventions=[x[:, -3:] for x in inputs],
        inputs=inputs, state=states, physical=states,
    )  # fmt: skip
    both = build_model(ModelConfig(model="level-direct", direct_horizon=3)).double()
    level = build_model(ModelConfig(model="level")).double()
    fit_baseline(both, seqs)
    fit_baseline(level, seqs)
    torch.testing.assert_close(both.gain, level.gain)
    lo, hi = _bounds()
    served = rollout_windows(both, inputs, states, (2,), bounds=(lo, hi))[2]
    alone = rollout_windows(level, inputs, states, (2,), bounds=(lo, hi))[2]
    direct, _, _ = both.direct.predict(inputs, 2, (lo.numpy(), hi.numpy()))
    expect = 0.5 * alone.pred[:, 1] + 0.5 * direct
    np.testing.assert_allclose(served.pred[:, 1], expect, atol=1e-12)
