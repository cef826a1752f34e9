"""Forecasts from unscaled histories: the object the pyfunc and the service call."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from features.catalog import N_INTERVENTION, N_STATE
from features.preprocess import INTERVENTION_MAX, Preprocessor
from training.conformal import Calibration, history_windows
from training.data import prepare_inputs
from training.models import DynamicsModel
from training.rollout import forecast_rollout, state_bounds


@dataclass
class Forecaster:
    """An eval-mode dynamics model with the preprocessor it was trained with."""

    model: DynamicsModel
    preprocessor: Preprocessor
    model_name: str
    config: dict = field(default_factory=dict)
    data_checksum: str | None = None
    calibration: Calibration | None = None  # conformal intervals; None: point forecasts only

    def __post_init__(self) -> None:
        # float64 inference: a forecast must not depend on which other rows share its batch
        # (float32 kernels round differently per batch size); the models are small.
        self.model = self.model.double().eval()
        self._bounds = state_bounds(self.preprocessor)

    def prepare(
        self, state: np.ndarray, interventions: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """Raw padded histories -> model inputs (B, T, 39), exactly as training prepares
        them (:func:`training.data.prepare_inputs`)."""
        b, t, _ = state.shape
        rows = np.flatnonzero(np.arange(t) < np.asarray(lengths)[:, None])  # real bins, in order
        flat_state = state.reshape(b * t, N_STATE)[rows]
        flat_iv = interventions.reshape(b * t, N_INTERVENTION)[rows]
        starts = np.repeat(np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        x, _ = prepare_inputs(self.preprocessor, flat_state, flat_iv, starts)
        out = np.zeros((b, t, x.shape[1]), dtype=np.float32)
        out.reshape(b * t, -1)[rows] = x
        return out

    def forecast(
        self,
        state: np.ndarray,
        interventions: np.ndarray,
        lengths: np.ndarray,
        planned: np.ndarray,
    ) -> np.ndarray:
        """Forecast the next H bins of B histories at once; physical units in and out.

        Args:
            state: (B, T, 18) bin means in physical units, NaN where not measured (raw, before
                clamping, forward-fill and imputation), right-padded after ``lengths[b]`` bins.
            interventions: (B, T, 3) physical units, NaN = absent (zero).
            lengths: (B,) number of real history bins per row (>= 1).
            planned: (B, H, 3) planned interventions, physical units (NaN = none), for the H
                forecast bins: ``planned[:, h]`` is what is given during forecast bin h.

        Returns:
            (B, H, 18) forecast state in physical units; ``[:, h]`` is the bin ``h + 1`` after the
            last history bin.

        Which plan is used when (model convention: the input at bin t carries the
        interventions during bin t and predicts bin t + 1): forecast step 1 uses the last
        history bin's own interventions; step h + 1 feeds back step h's prediction with
        ``planned[:, h - 1]``. ``planned[:, H - 1]`` (during the last forecast bin) cannot
        affect any forecast and is ignored.

        The model is called once per bin for the whole batch (history bins, then H - 1 steps).
        """
        state = np.asarray(state, dtype=np.float64)
        interventions = np.asarray(interventions, dtype=np.float64)
        lengths = np.asarray(lengths, dtype=np.int64)
        planned = np.asarray(planned, dtype=np.float64)
        b = state.shape[0]
        if state.ndim != 3 or state.shape[2] != N_STATE:
            raise ValueError(f"state must be (B, T, {N_STATE}), got {state.shape}")
        if interventions.shape != (*state.shape[:2], N_INTERVENTION):
            raise ValueError(
                f"interventions must be {(*state.shape[:2], N_INTERVENTION)}, got "
                f"{interventions.shape}"
            )
        if lengths.shape != (b,) or (lengths < 1).any() or (lengths > state.shape[1]).any():
            raise ValueError(f"lengths must be (B,) in 1..{state.shape[1]}, got {lengths}")
        if planned.ndim != 3 or planned.shape[0] != b or planned.shape[2] != N_INTERVENTION:
            raise ValueError(f"planned must be (B, H, {N_INTERVENTION}), got {planned.shape}")
        h = planned.shape[1]
        if h < 1:
            raise ValueError("planned must cover at least one forecast bin (H >= 1)")
        x = torch.from_numpy(self.prepare(state, interventions, lengths)).double()
        plan = np.clip(np.nan_to_num(planned[:, : h - 1], nan=0.0), 0.0, INTERVENTION_MAX)
        plan_scaled = self.preprocessor.scale_interventions(plan.reshape(-1, N_INTERVENTION))
        fut = torch.as_tensor(plan_scaled.reshape(b, h - 1, N_INTERVENTION), dtype=torch.float64)
        pred = forecast_rollout(self.model, x, torch.from_numpy(lengths), fut, self._bounds)
        return self.preprocessor.unscale_state(pred.numpy())

    def intervals(
        self,
        forecast: np.ndarray,
        state: np.ndarray,
        lengths: np.ndarray,
        levels: tuple[float, ...] | None = None,
    ) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """Conformal bands around ``forecast`` (what :meth:`forecast` returned for these
        histories): ``{level: (lower, upper)}``, each (B, H, 18) in physical units, inside the
        clamp range. ``levels`` default to the calibration's (0.8, 0.95); any in (0, 1).

        The band's width depends on the history only through the recent variability of each
        variable's measured values (raw ``state``, as given to :meth:`forecast`).
        """
        if self.calibration is None:
            raise ValueError(f"model {self.model_name!r} has no interval calibration")
        levels = self.calibration.levels if levels is None else levels
        window = history_windows(state, lengths, self.calibration.lookback)
        return self.calibration.intervals(forecast, window, levels)
