"""Turn a validated forecast request into model arrays and the warnings it deserves.

No pandas on the ``history`` path: a request is a few dozen numbers, and building a frame
would cost more than the model call. The ``events`` path bins with ``features.binning``, the
ETL's own code, so a value lands in the same bin (and is aggregated the same way) as in training.
Clamping, forward-fill and imputation themselves happen inside the model's ``Forecaster`` (the
same code as training); this module only reports which values they will touch.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError

from features.catalog import (
    BIN_HOURS,
    INTERVENTION_NAMES,
    STATE_BY_NAME,
    STATE_NAMES,
)
from features.preprocess import CLAMP_HIGH, CLAMP_LOW

BIN = timedelta(hours=BIN_HOURS)


def format_loc(loc: tuple | list) -> str:
    """``("body", "history", 2, "values", "sbp")`` -> ``history[2].values.sbp``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def field_error(loc: tuple, msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": kind}


def as_utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@dataclass
class PatientInput:
    """One patient's arrays as the Forecaster takes them, plus what to tell the client."""

    state: np.ndarray  # (T, 18) raw bin means in canonical units, NaN = not measured
    interventions: np.ndarray  # (T, 3), NaN = not given
    planned: np.ndarray  # (H, 3), no NaN
    horizon: int
    first_bin_start: datetime
    warnings: list[dict[str, Any]] = field(default_factory=list)
    id: str | None = None
    interval_levels: tuple[float, ...] | None = None  # None: the model's default levels

    @property
    def n_bins(self) -> int:
        return self.state.shape[0]


def _matrix(models: list[Any], names: tuple[str, ...]) -> np.ndarray:
    """The ``names`` fields of each of ``models`` as a (len(models), len(names)) array, an
    absent value (None) as NaN.

    One C-level lookup per model instead of a Python-level one per field (the batch endpoint
    builds thousands of bins per request), read by ``fromiter`` (which turns None into NaN)
    without the nested list that ``np.array`` would inspect first.
    """
    values = itertools.chain.from_iterable(
        map(operator.itemgetter(*names), [m.__dict__ for m in models])
    )
    return np.fromiter(values, np.float64, len(models) * len(names)).reshape(-1, len(names))


def _history_arrays(history: list[Any], loc: tuple) -> tuple[np.ndarray, np.ndarray, datetime]:
    errors: list[dict] = []
    starts: list[datetime] = []
    for i, b in enumerate(history):
        where = (*loc, "history", i, "bin_start")
        try:
            starts.append(as_utc(b.bin_start))
        except OverflowError:  # an offset pushes it outside years 1..9999
            raise RequestValidationError([field_error(where, "date out of range")]) from None
        if i == 0 or (gap := starts[i] - starts[i - 1]) == BIN:
            continue
        if gap <= timedelta(0):
            msg = f"bins out of order: {starts[i].isoformat()} is not after the previous bin"
        elif gap < BIN:
            msg = (
                f"bins overlap: starts {gap} after the previous bin; bins are {BIN_HOURS} h "
                "wide, so each must start exactly 12 h after the previous one"
            )
        else:
            msg = (
                f"gap of {gap} after the previous bin: bins must be contiguous; send a bin "
                "with empty values for a window where nothing was charted"
            )
        errors.append(field_error(where, msg))
    if errors:
        raise RequestValidationError(errors)
    state = _matrix([b.values for b in history], STATE_NAMES)
    return state, _matrix([b.interventions for b in history], INTERVENTION_NAMES), starts[0]


def _planned(req: Any, last_iv: np.ndarray, loc: tuple) -> tuple[np.ndarray, list[dict]]:
    horizon = req.horizon
    if req.planned_interventions is None:
        assumed = [0.0 if v != v else v for v in last_iv.tolist()]  # NaN (not given) -> 0
        desc = ", ".join(f"{n} {v:g}" for n, v in zip(INTERVENTION_NAMES, assumed, strict=True))
        warning = {
            "kind": "interventions_assumed",
            "field": format_loc((*loc, "planned_interventions")),
            "message": (
                "no planned_interventions given: assumed the last history bin's interventions "
                f"continue for all {horizon} forecast bins ({desc})"
            ),
        }
        return np.array([assumed] * horizon, dtype=np.float64), [warning]
    plan = req.planned_interventions
    if len(plan) != horizon:
        msg = f"has {len(plan)} entries, expected one per forecast bin (horizon={horizon})"
        raise RequestValidationError([field_error((*loc, "planned_interventions"), msg)])
    out = _matrix(plan, INTERVENTION_NAMES)
    # An absent (None, read as NaN) planned intervention is 0; the schema refuses a real NaN.
    out[np.isnan(out)] = 0.0
    return out, []


def _fmt_bins(bins: Sequence[int]) -> str:
    if len(bins) > 6:
        return f"{len(bins)} bins ({bins[0]}..{bins[-1]})"
    return "bin " + str(bins[0]) if len(bins) == 1 else "bins " + ", ".join(map(str, bins))


def _clamp_warning(state: np.ndarray, t: int, j: int, loc: tuple, source: str) -> dict[str, Any]:
    name = STATE_NAMES[j]
    v = float(state[t, j])
    lo, hi = float(CLAMP_LOW[j]), float(CLAMP_HIGH[j])
    what = f"{name} {v!r} {STATE_BY_NAME[name].unit}"
    if source == "history":
        where = format_loc((*loc, "history", t, "values", name))
        what += f" in {where}"
    else:
        where = format_loc((*loc, "events"))
        what += f" (mean of bin {t})"
    return {
        "kind": "clamped",
        "variable": name,
        "field": where,
        "bins": [t],
        "message": (
            f"{what} is outside the plausible range [{lo:g}, {hi:g}]: "
            f"clamped to {lo if v < lo else hi:g}, as in training"
        ),
    }


@functools.lru_cache(maxsize=4096)
def _column_warnings(j: int, missing: tuple[bool, ...]) -> tuple[tuple[str, tuple, str], ...]:
    """(kind, bins, message) of the forward-fill and imputation warnings of state column ``j``
    with the missing-value pattern ``missing`` (one flag per bin). The same few gap patterns
    recur in every request (a lab drawn once a day leaves every other bin empty), so each is
    worked out and its text formatted once (a few microseconds per warning otherwise)."""
    name, n = STATE_NAMES[j], len(missing)
    # Bins before the first measurement are imputed; later gaps are carried forward.
    first = missing.index(False) if False in missing else n
    out: list[tuple[str, tuple, str]] = []
    if ffilled := tuple([t for t in range(first + 1, n) if missing[t]]):
        msg = (
            f"{name} not measured in {_fmt_bins(ffilled)}: carried forward from its last "
            "measurement, as in training"
        )
        out.append(("forward_filled", ffilled, msg))
    if first:
        imputed = tuple(range(first))
        msg = (
            f"{name} not measured up to {_fmt_bins(imputed)}: imputed from the other variables "
            "of the bin (the training split's iterative imputer)"
        )
        out.append(("imputed", imputed, msg))
    return tuple(out)


def value_warnings(state: np.ndarray, loc: tuple, source: str) -> list[dict[str, Any]]:
    """Warnings naming every value the preprocessing will clamp, carry forward or impute.

    Clamp warnings come first, in bin order (as a reader scans the history), then per variable
    the forward-filled and the imputed bins. Whole-array masks find the few values that need a
    warning; only those are walked in Python.
    """
    outside = state < CLAMP_LOW
    outside |= state > CLAMP_HIGH  # NaN compares False
    bins, cols = outside.nonzero()  # row-major: in bin order
    out = [
        _clamp_warning(state, t, j, loc, source)
        for t, j in zip(bins.tolist(), cols.tolist(), strict=True)
    ]
    for j, missing in enumerate(np.isnan(state).T.tolist()):
        if True not in missing:
            continue
        name = STATE_NAMES[j]
        for kind, where, message in _column_warnings(j, tuple(missing)):
            out.append({"kind": kind, "variable": name, "bins": list(where), "message": message})
    return out


def patient_input(req: Any, loc: tuple = ("body",), events_binner: Any = None) -> PatientInput:
    """Validate what the schema cannot and build the arrays; bad input raises a 422 error."""
    has_history = req.history is not None
    has_events = req.events is not None
    if has_history == has_events:
        msg = "give exactly one of `history` and `events`"
        raise RequestValidationError([field_error((*loc, "history"), msg, "missing")])
    if has_history:
        state, iv, first = _history_arrays(req.history, loc)
        warnings: list[dict[str, Any]] = []
    else:
        state, iv, first, warnings = events_binner(req, loc)
    try:
        first + BIN * (state.shape[0] + req.horizon)
    except OverflowError:
        last = ("history", state.shape[0] - 1, "bin_start") if has_history else ("icu_intime",)
        where = (*loc, *last)
        raise RequestValidationError(
            [field_error(where, "the forecast would end after year 9999")]
        ) from None
    planned, plan_warnings = _planned(req, iv[-1], loc)
    warnings.extend(value_warnings(state, loc, "history" if has_history else "events"))
    warnings.extend(plan_warnings)
    levels = None if req.interval_levels is None else tuple(dict.fromkeys(req.interval_levels))
    return PatientInput(state, iv, planned, req.horizon, first, warnings, req.id, levels)
