"""The ``events`` request form: raw charted values, binned by the ETL's own code.

Values are converted to the canonical unit here, and checks that need a client-facing answer
come first (unknown unit, a value outside the drop range, a coverage interval without an end,
events too far out), because the ETL treats those as data errors to drop, while a client must
be told. Binning itself is ``features.binning.bin_patient_events``, so a value lands in the
bin, and is averaged, exactly as in training. Interventions then meet training's limit too
(``features.preprocess``'s ``INTERVENTION_MAX``, which ``prepare_arrays`` clips to): a bin
total above it is clamped here, with a warning, so the arrays the response describes are the
ones the model is fed.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from fastapi.exceptions import RequestValidationError

from features.catalog import (
    INTERVENTION_BY_NAME,
    INTERVENTION_NAMES,
    STATE_BY_NAME,
    STATE_NAMES,
)
from features.preprocess import INTERVENTION_MAX
from service.requests import BIN, as_utc, field_error, format_loc


def _accepted(variable: str) -> dict[str, tuple[float, float]]:
    if variable in STATE_BY_NAME:
        spec = STATE_BY_NAME[variable]
        return spec.accepted_units or {spec.unit: (1.0, 0.0)}
    return {INTERVENTION_BY_NAME[variable].unit: (1.0, 0.0)}


def bin_events(
    req: Any, loc: tuple, settings: Any
) -> tuple[np.ndarray, np.ndarray, datetime, list[dict]]:
    """Validate and bin ``req.events``: state, interventions, first bin start and warnings
    (the history form's shapes), or :class:`RequestValidationError` naming every bad event."""
    from features.binning import PRE_INTIME_HOURS, bin_patient_events

    errors: list[dict] = []
    warnings: list[dict] = []
    if req.icu_intime is None:
        msg = "required with `events`: bins are counted from ICU admission"
        raise RequestValidationError([field_error((*loc, "icu_intime"), msg, "missing")])
    try:
        intime = as_utc(req.icu_intime)
        earliest = intime - timedelta(hours=PRE_INTIME_HOURS)
    except OverflowError:
        raise RequestValidationError(
            [field_error((*loc, "icu_intime"), "date out of range")]
        ) from None
    rows: list[dict[str, Any]] = []
    ignored: list[int] = []
    last_bin = -1
    for i, ev in enumerate(req.events):
        where = (*loc, "events", i)
        try:
            t = as_utc(ev.time)
            end_time = as_utc(ev.end_time) if ev.end_time is not None else None
        except OverflowError:
            errors.append(field_error((*where, "time"), "date out of range"))
            continue
        accepted = _accepted(ev.variable)
        unit = ev.unit
        if unit is not None and unit not in accepted:
            known = ", ".join(sorted(accepted))
            msg = f"unit {unit!r} not accepted for {ev.variable} (accepted: {known})"
            errors.append(field_error((*where, "unit"), msg, "unit_error"))
            continue
        scale, offset = accepted[unit] if unit is not None else (1.0, 0.0)
        value = (ev.value + offset) * scale
        if spec := STATE_BY_NAME.get(ev.variable):
            lo, hi = spec.drop
            if not lo <= value <= hi:
                msg = (
                    f"{value:g} {spec.unit} is outside the accepted range [{lo:g}, {hi:g}] "
                    f"for {ev.variable}: likely a unit error"
                )
                errors.append(field_error((*where, "value"), msg, "range_error"))
                continue
            if t < earliest:
                ignored.append(i)
                continue
        else:
            if not math.isfinite(value) or value < 0:
                # Finite on input (the schema refuses inf), but a unit factor can overflow it.
                msg = "must be >= 0" if value < 0 else "is not a finite number"
                errors.append(field_error((*where, "value"), msg, "range_error"))
                continue
            kind = INTERVENTION_BY_NAME[ev.variable].kind
            if ev.end_time is not None and end_time < t:
                errors.append(field_error((*where, "end_time"), "is before `time`"))
                continue
            if kind == "coverage" and value > 0 and ev.end_time is None:
                msg = f"{ev.variable} is a coverage interval: give end_time"
                errors.append(field_error((*where, "end_time"), msg, "missing"))
                continue
        if ev.end_time is not None and end_time > t:
            # The last bin an interval [time, end_time) touches (its end is exclusive).
            b = int((end_time - intime - timedelta(microseconds=1)) // BIN)
        else:
            # State values charted shortly before intime count for bin 0.
            b = max(int((t - intime) // BIN), 0 if ev.variable in STATE_BY_NAME else -1)
        if b >= settings.max_history_bins:
            msg = (
                f"falls in bin {b} after icu_intime; at most {settings.max_history_bins} bins of "
                "history are accepted"
            )
            field = "end_time" if ev.end_time is not None else "time"
            errors.append(field_error((*where, field), msg, "too_long"))
            continue
        last_bin = max(last_bin, b)
        rows.append(
            {
                "time": t.replace(tzinfo=None),
                "variable": ev.variable,
                "value": value,  # in the canonical unit
                "end_time": end_time.replace(tzinfo=None) if ev.end_time else None,
            }
        )
    if errors:
        raise RequestValidationError(errors)
    if ignored:
        warnings.append(
            {
                "kind": "ignored",
                "field": format_loc((*loc, "events")),
                "message": (
                    f"{len(ignored)} event(s) charted more than {PRE_INTIME_HOURS} h before "
                    f"icu_intime were ignored, as in training: events {ignored[:20]}"
                    + (" ..." if len(ignored) > 20 else "")
                ),
            }
        )
    if last_bin < 0:
        msg = "no event falls in a bin after icu_intime: the history is empty"
        raise RequestValidationError([field_error((*loc, "events"), msg, "too_short")])
    wide = bin_patient_events(rows, pd.Timestamp(intime.replace(tzinfo=None)), last_bin + 1)
    state = wide[list(STATE_NAMES)].to_numpy(np.float64)
    iv = wide[list(INTERVENTION_NAMES)].to_numpy(np.float64)
    warnings.extend(_clamp_interventions(iv, loc))
    return state, iv, intime.astimezone(UTC), warnings


def _clamp_interventions(iv: np.ndarray, loc: tuple) -> list[dict]:
    """Clamp bin totals above training's intervention maxima in place (the module docstring
    says why); one warning per value."""
    over = iv > INTERVENTION_MAX  # NaN (not given) compares False
    out = []
    for t, j in zip(*over.nonzero(), strict=True):
        name = INTERVENTION_NAMES[j]
        spec = INTERVENTION_BY_NAME[name]
        out.append(
            {
                "kind": "clamped",
                "variable": name,
                "field": format_loc((*loc, "events")),
                "bins": [int(t)],
                "message": (
                    f"{name} {float(iv[t, j])!r} {spec.unit} (total of bin {int(t)}) is above "
                    f"the most a bin holds in training ({spec.max_value:g}): clamped to "
                    f"{spec.max_value:g}, as in training"
                ),
            }
        )
    np.minimum(iv, INTERVENTION_MAX, out=iv, where=over)
    return out
