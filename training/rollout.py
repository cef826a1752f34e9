"""Recursive K-step rollouts under the model convention (docs/architecture.md): step k > 1
feeds back the prediction for bin s+k-1 (observed mask 0) with that bin's interventions, so
the true state of bins after s is never an input.

The same functions serve training, evaluation and :class:`training.forecaster.Forecaster`,
which is why the service reproduces the offline rollouts exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from features.catalog import N_STATE
from features.preprocess import CLAMP_HIGH, CLAMP_LOW, Preprocessor
from training.models import DynamicsModel
from training.models.base import State
from training.models.direct import interventions_from

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


def encode(model: DynamicsModel, x: torch.Tensor) -> tuple[torch.Tensor, State]:
    """Run histories (B, T, 39) through the model one bin at a time (one call per bin for the
    batch): the predictions at every bin (B, T, 18) and the recurrent state after every bin
    (each part stacked to (B, T, ...), so the state after any bin can be gathered)."""
    state = model.init_state(x.shape[0], x.device, x.dtype)
    ys, states = [], []
    with model.stepping():
        for i in range(x.shape[1]):
            y, state = model.step(x[:, i], state)
            ys.append(y)
            states.append(state)
    return torch.stack(ys, dim=1), [torch.stack(part, dim=1) for part in zip(*states, strict=True)]


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
    """K-step rollouts from the last real bin of each history (padding after it is never
    consumed): :func:`encode` then :func:`continue_rollout`. Returns (B, K, 18)."""
    ys, states = encode(model, x)
    rows, last = torch.arange(x.shape[0]), lengths - 1
    state = [s[rows, last] for s in states]
    pred = continue_rollout(model, ys[rows, last], state, future_iv, bounds)
    return with_direct(model, pred, x, rows, last, future_iv, bounds)


def with_direct(
    model: DynamicsModel,
    pred: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    future_iv: torch.Tensor | None,
    bounds: Bounds | None = None,
) -> torch.Tensor:
    """The forecast a model serves: its rollouts ``pred`` (W, K, 18) from bin ``starts`` of
    rows ``rows`` of ``x``, combined with the model's direct K-step ridge where it has one
    (``direct_weight`` of the ridge's forecast, the rest the rollout's, for the steps the
    ridge covers). ``future_iv`` (W, K-1, 3) as in :func:`continue_rollout`; None: the
    interventions of ``x`` after each start.

    Why a fixed-weight combination of two forecasters fitted on the same patients:
    docs/training.md (``--direct-weight``) and docs/results.md.
    """
    direct = getattr(model, "direct", None)
    if direct is None or not len(rows):
        return pred
    if future_iv is None:  # every window's interventions are x's own (every-start rollouts)
        iv = interventions_from(x, rows, starts, pred.shape[1])
    else:
        iv = torch.cat([x[rows, starts, 2 * N_STATE :][:, None], future_iv], dim=1)
    d = direct.forecast(x, rows, starts, iv, bounds)
    w, h = model.cfg.direct_weight, d.shape[1]
    return torch.cat([(1 - w) * pred[:, :h] + w * d, pred[:, h:]], dim=1)


def every_start_rollouts(
    model: DynamicsModel,
    x: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    bounds: Bounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-step rollouts from every start bin s <= n - 2 of every padded history (B, T, 39), fed
    the true interventions: the stay and start of each, and its (W, K, 18) predictions of bins
    s+1..s+K (steps past a stay's end run on padding: callers mask them).

    Autograd works through it: the closed-loop training objective (:mod:`training.lit`) and
    evaluation (:func:`rollout_windows`) start from this very rollout; evaluation then combines
    it with the model's direct ridge as served (:func:`with_direct`).
    """
    t = x.shape[1]
    live = torch.arange(t - 1, device=x.device)[None] < (lengths[:, None] - 1)
    rows, starts = live.nonzero(as_tuple=True)
    if not len(rows):
        return rows, starts, x.new_zeros((0, k, N_STATE))
    ys, states = encode(model, x[:, :-1])
    state = [s[rows, starts] for s in states]
    fut = interventions_from(x, rows, starts + 1, k - 1)
    return rows, starts, continue_rollout(model, ys[rows, starts], state, fut, bounds)


@dataclass
class Windows:
    """K-step rollouts from every start bin s with s + K <= n - 1, all stays of a split."""

    k: int
    stay: np.ndarray  # (W,) index of the stay in the split
    start: np.ndarray  # (W,) start bin s
    pred: np.ndarray  # (W, K, 18) scaled predictions for bins s+1..s+K
    true: np.ndarray  # (W, K, 18) scaled truth
    observed: np.ndarray  # (W, K, 18) 1 where the true value was measured

    def middle_windows(self, lengths: list[int], n: int = 3) -> list[int]:
        """The middle window of each of the ``n`` longest stays that have one (for plots)."""
        mine = (np.flatnonzero(self.stay == i) for i in np.argsort([-m for m in lengths]))
        return [int(m[len(m) // 2]) for m in itertools.islice(filter(len, mine), n)]


def add_state_noise(inputs: list[np.ndarray], sigma: float, seed: int) -> list[np.ndarray]:
    """Copies of ``inputs`` with Gaussian noise (scaled space, i.e. relative to the min-max
    range) on the state columns only: masks and interventions are untouched."""
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
    bounds: Bounds | None = None,
) -> dict[int, Windows]:
    """Rollouts of every length in ``ks`` from every start bin of every stay.

    Runs in the model's dtype: evaluation and the Forecaster use float64, so results do not
    depend on how windows are batched. ``bounds`` clips predictions as in :func:`continue_rollout`.
    """
    model.eval()
    dtype = next(iter(model.parameters()), torch.empty(0, dtype=torch.float64)).dtype
    x = pad_sequence([torch.as_tensor(s, dtype=dtype) for s in inputs], batch_first=True)
    truth = pad_sequence([torch.as_tensor(s) for s in states], batch_first=True)
    lengths = torch.tensor([len(s) for s in inputs])
    # A k-step rollout is the first k steps of the longest one (the same interventions fed).
    stay, start, pred = every_start_rollouts(model, x, lengths, max(ks), bounds)
    pred = with_direct(model, pred, x, stay, start, None, bounds)
    bins = (start[:, None] + torch.arange(1, max(ks) + 1)).clamp_max(x.shape[1] - 1)
    true = truth[stay[:, None], bins].double()
    observed = x[stay[:, None], bins, N_STATE : 2 * N_STATE].double()
    out: dict[int, Windows] = {}
    for k in ks:
        keep = start + k <= lengths[stay] - 1
        out[k] = Windows(
            k,
            *(a[keep].numpy() for a in (stay, start)),
            *(a[keep, :k].numpy() for a in (pred.double(), true, observed)),
        )
    return out
