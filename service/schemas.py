"""Request and response models (pydantic v2), built from the variable catalog and the limits.

Numbers are strict (``"horizon": true`` or ``"3"`` is a 422, not 1 or 3: a client that sends
a string or a boolean has a bug worth hearing about); an integer is accepted where a float is,
and ``3.0`` where an integer is (JSON Schema counts it as one).
The request models carry every check a schema can express (known variable names, finite
numbers, the drop range of each variable, 0..max of each intervention, list lengths), so the
OpenAPI document tells clients exactly what is accepted and pydantic's errors name the field.
Checks across fields (bins in order, units of events, one plan per forecast step) live in
:mod:`service.requests`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from features.catalog import (
    BIN_HOURS,
    INTERVENTIONS,
    STATE_VARIABLES,
)
from service.settings import ServiceSettings

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
MAX_INTERVAL_LEVELS = 5


def _integral_float_to_int(v: Any) -> Any:
    """``3.0`` is an integer in JSON Schema (and so in the OpenAPI document); ``true``, ``"3"``
    and ``3.5`` stay type errors."""
    return int(v) if type(v) is float and v.is_integer() else v


StateValues = create_model(
    "StateValues",
    __config__=_STRICT,
    __doc__=(
        f"Mean of each state variable over the {BIN_HOURS}-hour bin, in its canonical unit "
        "(see GET /v1/variables). Leave out (or null) what was not measured: it is "
        "forward-filled or imputed exactly as in training, with a warning."
    ),
    **{
        v.name: (
            float | None,
            Field(
                None,
                strict=True,
                ge=v.drop[0],
                le=v.drop[1],
                description=(
                    f"{v.unit}. Outside [{v.drop[0]:g}, {v.drop[1]:g}] is rejected (likely a "
                    f"unit error); outside [{v.clamp[0]:g}, {v.clamp[1]:g}] is clamped with a "
                    "warning."
                ),
            ),
        )
        for v in STATE_VARIABLES
    },
)
Interventions = create_model(
    "Interventions",
    __config__=_STRICT,
    __doc__="Interventions during a bin; a missing one is 0 (not given), as in training.",
    **{
        i.name: (
            float | None,
            Field(
                None, strict=True, ge=0, le=i.max_value, description=f"{i.unit}: {i.description}"
            ),
        )
        for i in INTERVENTIONS
    },
)

EventVariable = Literal[  # type: ignore[valid-type]
    tuple(v.name for v in STATE_VARIABLES) + tuple(i.name for i in INTERVENTIONS)
]


class HistoryBin(BaseModel):
    model_config = _STRICT
    bin_start: datetime = Field(
        description=f"Start of the {BIN_HOURS}-hour bin (ISO 8601; no offset means UTC). "
        f"Bins must be contiguous: each starts {BIN_HOURS} h after the previous one."
    )
    values: StateValues = Field(default_factory=StateValues)  # type: ignore[valid-type]
    interventions: Interventions = Field(default_factory=Interventions)  # type: ignore[valid-type]


class Event(BaseModel):
    model_config = _STRICT
    time: datetime = Field(description="When the value was charted (ISO 8601; no offset = UTC).")
    variable: EventVariable  # type: ignore[valid-type]
    value: float = Field(
        strict=True,
        description="State variables: the charted value. Coverage interventions (vasopressor, "
        "mechanical_ventilation): > 0 means it ran over [time, end_time). iv_fluid_ml: mL "
        "given, spread over [time, end_time) or counted at `time` without end_time.",
    )
    unit: str | None = Field(
        None, description="Unit of `value`; absent means the variable's canonical unit."
    )
    end_time: datetime | None = Field(None, description="End of an intervention interval.")


class ModelRef(BaseModel):
    name: str
    version: str | None
    run_id: str | None


class InputWarning(BaseModel):
    kind: Literal["clamped", "forward_filled", "imputed", "interventions_assumed", "ignored"]
    message: str
    variable: str | None = None
    field: str | None = None
    bins: list[int] | None = Field(None, description="history bin indices (0 = first bin)")


class IntervalBounds(BaseModel):
    lower: dict[str, float] = Field(description="lower bound per state variable (its unit)")
    upper: dict[str, float] = Field(description="upper bound per state variable (its unit)")


class ForecastStep(BaseModel):
    step: int
    bin_start: datetime
    values: dict[str, float]
    interventions: dict[str, float] = Field(
        description="the interventions fed to the model for this bin (planned or assumed)"
    )
    intervals: dict[str, IntervalBounds] | None = Field(
        None,
        description=(
            'Conformal prediction intervals keyed by level (`"0.8"`, `"0.95"` or the '
            "`interval_levels` asked for): with the model's calibration, the measured value "
            "of this bin lies inside with about that probability (split-conformal on "
            "validation patients' rollouts; docs/intervals.md). Always inside the clamp "
            "range. Absent when the model carries no calibration or `interval_levels` is []."
        ),
        examples=[{"0.8": {"lower": {"heart_rate": 78.1}, "upper": {"heart_rate": 101.5}}}],
    )


class PatientForecast(BaseModel):
    horizon: int
    forecast: list[ForecastStep]
    warnings: list[InputWarning]
    id: str | None = None


class ForecastResponse(PatientForecast):
    model: ModelRef


class BatchResponse(BaseModel):
    model: ModelRef
    results: list[PatientForecast]


class VariableInfo(BaseModel):
    name: str
    kind: Literal["state", "intervention"]
    unit: str
    description: str
    accepted_units: list[str]
    drop_range: tuple[float, float] | None
    clamp_range: tuple[float, float] | None
    max_value: float | None = None


class ModelDescription(ModelRef):
    uri: str
    data_checksum: str | None
    loaded_at: datetime
    catalog_version: str
    bin_hours: int
    variables: list[VariableInfo]


# A what-if request as a user would send it: two bins of history, a plan for the next three.
# In the OpenAPI document (the /docs "Try it out" body); the fuzz test checks it is valid.
FORECAST_EXAMPLE: dict[str, Any] = {
    "id": "bed-7",
    "horizon": 3,
    "history": [
        {
            "bin_start": "2150-03-01T00:00:00Z",
            "values": {"heart_rate": 96.0, "sbp": 104.0, "creatinine": 1.4, "lactate": 2.1},
            "interventions": {"mechanical_ventilation": 1.0, "iv_fluid_ml": 1200.0},
        },
        {
            "bin_start": "2150-03-01T12:00:00Z",
            "values": {"heart_rate": 104.0, "sbp": 96.0},
            "interventions": {"vasopressor": 0.5, "mechanical_ventilation": 1.0},
        },
    ],
    "planned_interventions": [
        {"vasopressor": 1.0, "mechanical_ventilation": 1.0},
        {"vasopressor": 1.0, "mechanical_ventilation": 1.0, "iv_fluid_ml": 500.0},
        {"mechanical_ventilation": 1.0},
    ],
    "interval_levels": [0.8, 0.95],
}


def _either(item: type[BaseModel], most: int, description: str) -> tuple[Any, Any]:
    """The ``history`` or ``events`` field: a list of 1..``most`` items, or absent."""
    return list[item] | None, Field(None, min_length=1, max_length=most, description=description)


def request_models(settings: ServiceSettings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The forecast and batch request models for ``settings``' limits (OpenAPI shows them)."""
    forecast = create_model(
        "ForecastRequest",
        __config__=ConfigDict(**_STRICT, json_schema_extra={"examples": [FORECAST_EXAMPLE]}),
        __doc__=(
            "One patient's history, as bins or as raw events, and the forecast wanted. "
            "Exactly one of `history` and `events` (with `icu_intime`) must be given."
        ),
        id=(str | None, Field(None, max_length=128, description="echoed back (batch)")),
        horizon=(
            Annotated[int, BeforeValidator(_integral_float_to_int)],
            Field(strict=True, ge=1, le=settings.max_horizon, description="bins to forecast"),
        ),
        history=_either(
            HistoryBin,
            settings.max_history_bins,
            "The patient's bins, oldest first. Give this or `events`.",
        ),
        events=_either(
            Event, settings.max_events, "Raw charted values; binned like the ETL from `icu_intime`."
        ),
        icu_intime=(datetime | None, Field(None, description="ICU admission (events form)")),
        planned_interventions=(
            list[Interventions] | None,  # type: ignore[valid-type]
            Field(
                None,
                max_length=settings.max_horizon,
                description=(
                    "One dict per forecast step (bin after the history, then the next...). "
                    "When absent, the last history bin's interventions are assumed to "
                    "continue, and a warning says so."
                ),
            ),
        ),
        interval_levels=(
            list[Annotated[float, Field(strict=True, gt=0, lt=1)]] | None,
            Field(
                None,
                max_length=MAX_INTERVAL_LEVELS,
                description=(
                    "Coverage levels of the prediction intervals returned with each step, each "
                    f"in (0, 1), at most {MAX_INTERVAL_LEVELS}. Absent: the model's defaults "
                    "(0.8 and 0.95); [] returns no intervals."
                ),
                examples=[[0.5, 0.8, 0.95]],
            ),
        ),
    )
    batch = create_model(
        "BatchForecastRequest",
        __config__=_STRICT,
        patients=(
            list[forecast],  # type: ignore[valid-type]
            Field(min_length=1, max_length=settings.max_batch_patients),
        ),
    )
    return forecast, batch
