"""Recursive K-step rollouts under the model convention (docs/architecture.md).

Step 1 predicts bin s+1 from the history's inputs 0..s. Step k > 1 feeds back the prediction
for bin s+k-1 as the state, with the observed mask 0, and the interventions of bin s+k-1 (true
ones offline, planned ones in the service). Nothing from bins after s enters except those
interventions: the true state of later bins is never an input.

The same two functions serve evaluation and :class:`training.forecaster.Forecaster`, which is
why the service reproduces the offline rollouts exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from features.catalog import N_STATE
from features.preprocess import CLAMP_HIGH, CLAMP_LOW, Preprocessor
from training.models import DynamicsModel
from training.models.base import State

Bounds = tuple[torch.Tensor, torch.Tensor]


def state_bounds(pre: Preprocessor, dtype: torch.dtype = torch.float64) -> Bounds:
    """The clamp (plausible) range of each state variable in the model's scaled space.

    Every training target lies inside it, so projecting a prediction onto it can only move the
    prediction closer to the truth; without it, fed-back predictions drift to values no patient
    has (negative creatinine) within a few steps.
    """
    lo = torch.as_tensor(pre.scale_state(CLAMP_LOW), dtype=dtype)
    hi = torch.as_tensor(pre.scale_state(CLAMP_HIGH), dtype=dtype)
    return lo, hi


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(iter(model.parameters()), torch.empty(0, dtype=torch.float64)).dtype


@torch.no_grad()
def encode(
    model: DynamicsModel, x: torch.Tensor, lengths: torch.Tensor, keep_all: bool = False
) -> tuple[torch.Tensor, State, list[State] | None]:
    """Run the history through the model one bin at a time (one call per bin for the batch).

    Returns the predictions at every bin (B, T, 18), the recurrent state after each row's last
    real bin (padding after it is never consumed), and, with ``keep_all``, the state after every
    bin (for rollouts from every start).
    """
    b, t, _ = x.shape
    state = model.init_state(b, x.device, x.dtype)
    ys = []
    every: list[State] | None = [] if keep_all else None
    # Bins before the shortest history's end are real for every row: no masking needed.
    all_live = int(lengths.min()) if b else t
    with model.stepping():
        for i in range(t):
            y, new = model.step(x[:, i], state)
            if i < all_live:
                state = new
            else:
                live = i < lengths
                # Rows whose history has ended keep the state after their last real bin.
                state = [
                    torch.where(live.view(-1, *[1] * (n.dim() - 1)), n, o)
                    for n, o in zip(new, state, strict=True)
                ]
            if every is not None:
                every.append(new)
            ys.append(y)
    return torch.stack(ys, dim=1), state, every


@torch.no_grad()
def continue_rollout(
    model: DynamicsModel,
    first: torch.Tensor,
    state: State,
    future_iv: torch.Tensor,
    bounds: Bounds | None = None,
) -> torch.Tensor:
    """From step 1's prediction ``first`` (W, 18) and the state that produced it, roll on.

    ``future_iv`` (W, K-1, 3): scaled interventions of the bins whose state was just predicted,
    fed with that prediction (observed mask 0). Returns (W, K, 18) predictions for steps 1..K.
    With ``bounds`` (:func:`state_bounds`) every prediction is clipped to the plausible range
    before it is returned or fed back.
    """

    def clip(y: torch.Tensor) -> torch.Tensor:
        return y if bounds is None else torch.clamp(y, bounds[0], bounds[1])

    y = clip(first)
    preds = [y]
    zeros = torch.zeros_like(first)
    with model.stepping():
        for k in range(future_iv.shape[1]):
            x = torch.cat([y, zeros, future_iv[:, k]], dim=-1)
            y, state = model.step(x, state)
            y = clip(y)
            preds.append(y)
    return torch.stack(preds, dim=1)


@torch.no_grad()
def forecast_rollout(
    model: DynamicsModel,
    x: torch.Tensor,
    lengths: torch.Tensor,
    future_iv: torch.Tensor,
    bounds: Bounds | None = None,
) -> torch.Tensor:
    """K-step rollouts from the last real bin of each history: :func:`encode` then
    :func:`continue_rollout`. Returns (B, K, 18)."""
    ys, state, _ = encode(model, x, lengths)
    first = ys[torch.arange(x.shape[0]), lengths - 1]
    return continue_rollout(model, first, state, future_iv, bounds)


@dataclass
class Windows:
    """K-step rollouts from every start bin s with s + K <= n - 1, all stays of a split."""

    k: int
    stay: np.ndarray  # (W,) index of the stay in the split
    start: np.ndarray  # (W,) start bin s
    pred: np.ndarray  # (W, K, 18) scaled predictions for bins s+1..s+K
    true: np.ndarray  # (W, K, 18) scaled truth
    observed: np.ndarray | None = None  # (W, K, 18) 1 where the true value was measured


def add_state_noise(inputs: list[np.ndarray], sigma: float, seed: int) -> list[np.ndarray]:
    """Copies of ``inputs`` with Gaussian noise (scaled space) on the state columns only."""
    rng = np.random.default_rng(seed)
    inputs = [x.copy() for x in inputs]
    for x in inputs:
        x[:, :N_STATE] += rng.normal(0.0, sigma, (len(x), N_STATE)).astype(x.dtype)
    return inputs


@torch.no_grad()
def rollout_windows(
    model: DynamicsModel,
    inputs: list[np.ndarray],
    states: list[np.ndarray],
    ks: tuple[int, ...],
    noise_sigma: float = 0.0,
    seed: int = 0,
    bounds: Bounds | None = None,
) -> dict[int, Windows]:
    """Rollouts of every length in ``ks`` from every start bin of every stay.

    ``noise_sigma`` adds Gaussian noise (scaled space, i.e. relative to the min-max range) to
    the state part of the history inputs; interventions, masks and the truth are untouched.
    Runs in the model's dtype: evaluation and the Forecaster use float64, so results do not
    depend on how windows are batched. ``bounds`` clips predictions as in :func:`continue_rollout`.
    """
    model.eval()
    if noise_sigma > 0:
        inputs = add_state_noise(inputs, noise_sigma, seed)
    dtype = model_dtype(model)
    x = pad_sequence([torch.as_tensor(s, dtype=dtype) for s in inputs], batch_first=True)
    lengths = torch.tensor([len(s) for s in inputs])
    ys, _, every = encode(model, x, lengths, keep_all=True)
    out: dict[int, Windows] = {}
    for k in ks:
        idx = [(i, s) for i, st in enumerate(states) for s in range(len(st) - k)]
        if not idx:
            empty = np.zeros((0, k, N_STATE))
            out[k] = Windows(k, np.zeros(0, int), np.zeros(0, int), empty, empty, empty)
            continue
        stay = np.array([i for i, _ in idx])
        start = np.array([s for _, s in idx])
        st_t, sa_t = torch.as_tensor(stay), torch.as_tensor(start)
        first = ys[st_t, sa_t]
        state0 = [torch.stack([every[s][j][i] for i, s in idx]) for j in range(len(every[0]))]
        # The interventions of bins s+1..s+K-1 (W, K-1, 3); none for K = 1.
        fut = x[st_t[:, None], sa_t[:, None] + torch.arange(1, k), 2 * N_STATE :]
        pred = continue_rollout(model, first, state0, fut, bounds).numpy()
        true = np.stack([states[i][s + 1 : s + k + 1] for i, s in idx])
        obs = np.stack([inputs[i][s + 1 : s + k + 1, N_STATE : 2 * N_STATE] for i, s in idx])
        out[k] = Windows(k, stay, start, pred.astype(np.float64), true.astype(np.float64), obs)
    return out
