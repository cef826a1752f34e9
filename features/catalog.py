"""The variable catalog: the one definition of what icu-forecast reads, predicts and feeds.

Every id below was checked against the demo's D_ITEMS / D_LABITEMS (labels in the comments).
Sources: ``../shared/docs/variables.md`` (mimic-code, mimic3-benchmarks, MIMIC-Extract, ricu).
Where the sources disagree, the choice is documented next to the definition it affects.

Ranges:
- ``drop``: outside it a value is a charting or unit error and becomes missing (MIMIC-Extract's
  outlier bounds). Applied before aggregation so one bad value cannot poison a bin mean.
- ``clamp``: a plausible physiological range (ricu / mimic-code); values between the clamp and
  drop ranges are clamped, after aggregation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

BIN_HOURS = 12
"""Width of one time bin: the review's case study uses non-overlapping 12-hour windows."""

LAB_WINDOW_HOURS = 6
"""LABEVENTS has no icustay_id; a lab belongs to a stay if charted within the stay widened by
this many hours on each side (mimic-code's convention). Labs before intime land in bin 0; labs
after outtime are dropped, because the stay's bins end at outtime."""


@dataclass(frozen=True)
class UnitConversion:
    """Converts the values of some items into the canonical unit."""

    itemids: tuple[int, ...]
    from_unit: str
    scale: float = 1.0
    offset: float = 0.0
    # Applied to values of *other* items too when they exceed this: some degC items hold
    # degF values (mimic3-benchmarks treats >= 79 as degF).
    also_when_above: float | None = None


@dataclass(frozen=True)
class StateVariable:
    """A physiological / lab variable: observed, predicted, forward-filled and imputed."""

    name: str
    unit: str
    drop: tuple[float, float]
    clamp: tuple[float, float]
    chart_itemids: tuple[int, ...] = ()
    lab_itemids: tuple[int, ...] = ()
    conversions: tuple[UnitConversion, ...] = ()
    description: str = ""
    # Units accepted on input (service events); values are converted to ``unit``.
    accepted_units: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Intervention:
    """A treatment variable: an input only, never predicted; zero when absent."""

    name: str
    unit: str
    kind: Literal["coverage", "volume"]
    description: str
    max_value: float
    # Item ids by source table; their meaning depends on ``kind``.
    inputevents_cv: tuple[int, ...] = ()
    inputevents_mv: tuple[int, ...] = ()
    chartevents: tuple[int, ...] = ()
    procedureevents_mv: tuple[int, ...] = ()


_F_TO_C = UnitConversion(
    itemids=(678, 679, 223761), from_unit="degF", scale=5 / 9, offset=-32.0, also_when_above=79.0
)

STATE_VARIABLES: tuple[StateVariable, ...] = (
    StateVariable(
        "heart_rate",
        "bpm",
        chart_itemids=(211, 220045),  # Heart Rate (cv / mv)
        drop=(0, 390),
        clamp=(0, 300),
        accepted_units={"bpm": (1.0, 0.0), "/min": (1.0, 0.0)},
    ),
    StateVariable(
        "sbp",
        "mmHg",
        # Arterial BP [Systolic], Manual BP [Systolic], NBP [Systolic], Arterial BP #2 [Systolic];
        # Arterial Blood Pressure systolic, Non Invasive Blood Pressure systolic.
        chart_itemids=(51, 442, 455, 6701, 220050, 220179),
        drop=(0, 375),
        clamp=(0, 300),
    ),
    StateVariable(
        "dbp",
        "mmHg",
        chart_itemids=(8368, 8440, 8441, 8555, 220051, 220180),
        drop=(0, 375),
        clamp=(0, 200),
    ),
    StateVariable(
        "mbp",
        "mmHg",
        # ricu lists 6072 for MAP, but in D_ITEMS 6072 is "vision fields"; mimic-code's 6702
        # ("Arterial BP Mean #2") is the right one.
        chart_itemids=(52, 443, 456, 6702, 220052, 220181, 225312),
        drop=(0, 375),
        clamp=(0, 250),
    ),
    StateVariable(
        "resp_rate",
        "/min",
        chart_itemids=(615, 618, 220210, 224690),
        drop=(0, 330),
        clamp=(0, 120),
        accepted_units={"/min": (1.0, 0.0), "insp/min": (1.0, 0.0), "bpm": (1.0, 0.0)},
    ),
    StateVariable(
        "temperature",
        "degC",
        # Temperature C, Temperature C (calc), Temperature Celsius; F items converted. The drop
        # range is applied after conversion, in degC.
        chart_itemids=(676, 677, 223762, 678, 679, 223761),
        drop=(14.2, 47),
        clamp=(32, 42),
        conversions=(_F_TO_C,),
        accepted_units={"degC": (1.0, 0.0), "degF": (5 / 9, -32.0)},
    ),
    StateVariable(
        "spo2",
        "%",
        # SpO2, O2 saturation pulseoxymetry. Not 834 / 220227: those are arterial SaO2.
        chart_itemids=(646, 220277),
        drop=(0, 150),
        clamp=(50, 100),
    ),
    StateVariable(
        "gcs_total",
        "points",
        # CareVue charts the total (198); MetaVision charts eye (220739), verbal (223900) and
        # motor (223901), summed per charttime when all three are present. Verbal for intubated
        # patients ("No Response-ETT", valuenum 1 in MetaVision) is taken as charted, not as 0
        # (mimic-code's pivoted_gcs scores it 0 and then substitutes the previous total;
        # taking the charted 1 keeps the sum within 3-15 and needs no look-back).
        chart_itemids=(198, 220739, 223900, 223901),
        drop=(3, 15),
        clamp=(3, 15),
        accepted_units={"points": (1.0, 0.0)},
    ),
    StateVariable(
        "glucose",
        "mg/dL",
        # One source per measurement: lab values (Glucose 50931, blood gas 50809) and the
        # bedside chart items (fingerstick 807, 811, 1529, 3745; 225664, 220621, 226537) are
        # all glucose in mg/dL; both are averaged in a bin, as mimic-code's pivoted_lab does.
        chart_itemids=(807, 811, 1529, 3745, 225664, 220621, 226537),
        lab_itemids=(50931, 50809),
        drop=(0, 2200),
        clamp=(0, 1000),
        accepted_units={"mg/dL": (1.0, 0.0), "mmol/L": (18.0, 0.0)},
    ),
    StateVariable("creatinine", "mg/dL", lab_itemids=(50912,), drop=(0, 66), clamp=(0, 15)),
    StateVariable(
        "bun",
        "mg/dL",
        lab_itemids=(51006,),  # Urea Nitrogen
        drop=(0, 275),
        clamp=(0, 200),
    ),
    StateVariable("wbc", "K/uL", lab_itemids=(51301, 51300), drop=(0, 1100), clamp=(0, 1000)),
    StateVariable("hemoglobin", "g/dL", lab_itemids=(51222, 50811), drop=(0, 30), clamp=(4, 18)),
    StateVariable("platelets", "K/uL", lab_itemids=(51265,), drop=(0, 2200), clamp=(5, 1200)),
    StateVariable(
        "sodium",
        "mEq/L",
        lab_itemids=(50983, 50824),
        drop=(0, 250),
        clamp=(110, 165),
        accepted_units={"mEq/L": (1.0, 0.0), "mmol/L": (1.0, 0.0)},
    ),
    StateVariable(
        "potassium",
        "mEq/L",
        lab_itemids=(50971, 50822),
        drop=(0, 15),
        clamp=(0, 10),
        accepted_units={"mEq/L": (1.0, 0.0), "mmol/L": (1.0, 0.0)},
    ),
    StateVariable(
        "bicarbonate",
        "mEq/L",
        lab_itemids=(50882, 50803),
        drop=(0, 66),
        clamp=(5, 50),
        accepted_units={"mEq/L": (1.0, 0.0), "mmol/L": (1.0, 0.0)},
    ),
    StateVariable("lactate", "mmol/L", lab_itemids=(50813,), drop=(0, 33), clamp=(0, 50)),
)

GCS_COMPONENT_ITEMIDS: tuple[int, int, int] = (220739, 223900, 223901)

# Ventilator settings (mimic-code ventilation_classification); 720 counts only when its value
# is not 'Other/Remarks', 467 only when it is 'Ventilator'.
_VENT_SETTINGS = (
    *(639, 654, 681, 682, 683, 684, 224684, 224685, 224686),  # tidal volume
    *(445, 448, 449, 450, 1340, 1486, 1600, 224687),  # minute volume
    *(60, 437, 505, 506, 686, 220339, 224700),  # PEEP
    543,  # plateau pressure
    *(720, 223849),  # ventilator mode
    467,  # O2 delivery device
)
# Crystalloids, then colloids (albumin, hetastarch, dextran).
_FLUIDS_MV = (
    *(225158, 225828, 225944, 225797, 225159, 225823, 225825, 225827, 225941, 226089),
    *(220864, 220862, 225174, 225795, 225796),
)
_FLUIDS_CV = (
    *(30015, 30018, 30020, 30021, 30058, 30060, 30061, 30063, 30065, 30159, 30160, 30169, 30190),
    *(30008, 30009, 30011, 30012),
)

INTERVENTIONS: tuple[Intervention, ...] = (
    Intervention(
        "vasopressor",
        "fraction",
        "coverage",
        "Fraction of the bin during which any vasopressor ran (norepinephrine, epinephrine, "
        "phenylephrine, vasopressin, dopamine). MV: starttime..endtime, statusdescription "
        "'Rewritten' skipped. CV: a charted rate > 0 starts or continues an infusion until the "
        "next charting of the same item with rate 0 or no rate, or at most 4 hours after it.",
        max_value=1.0,
        inputevents_cv=(30047, 30120, 30044, 30119, 30309, 30127, 30128, 30051, 30043, 30307),
        inputevents_mv=(221906, 221289, 221749, 222315, 221662),
    ),
    Intervention(
        "mechanical_ventilation",
        "fraction",
        "coverage",
        "Fraction of the bin covered by a ventilation episode (mimic-code "
        "ventilation_classification): a ventilator setting charted starts or extends an "
        "episode; it ends at extubation or when settings stop for more than 8 hours.",
        max_value=1.0,
        chartevents=_VENT_SETTINGS,
        procedureevents_mv=(227194, 225468, 225477),  # extubation (planned / unplanned)
    ),
    Intervention(
        "iv_fluid_ml",
        "mL",
        "volume",
        "Crystalloid and colloid volume given in the bin, mL. MV amounts are spread "
        "uniformly over starttime..endtime; CV amounts count at charttime.",
        max_value=20000.0,
        inputevents_mv=_FLUIDS_MV,
        inputevents_cv=_FLUIDS_CV,
    ),
)

VENT_MODE_EXCLUDED_VALUE = "Other/Remarks"  # item 720
VENT_DEVICE_VALUE = "Ventilator"  # item 467
EXTUBATION_CHART_ITEMID = 640  # "Significant Events", value 'Extubated' / 'Self Extubation'
EXTUBATION_CHART_VALUES = ("Extubated", "Self Extubation")
VENT_EPISODE_GAP_HOURS = 8.0
CV_INFUSION_MAX_HOURS = 4.0

STATE_NAMES: tuple[str, ...] = tuple(v.name for v in STATE_VARIABLES)
INTERVENTION_NAMES: tuple[str, ...] = tuple(i.name for i in INTERVENTIONS)
OBSERVED_NAMES: tuple[str, ...] = tuple(f"{n}_observed" for n in STATE_NAMES)
N_STATE = len(STATE_NAMES)
N_INTERVENTION = len(INTERVENTION_NAMES)

assert N_STATE == 18 and N_INTERVENTION == 3

STATE_BY_NAME: dict[str, StateVariable] = {v.name: v for v in STATE_VARIABLES}
INTERVENTION_BY_NAME: dict[str, Intervention] = {i.name: i for i in INTERVENTIONS}


def chart_itemids() -> tuple[int, ...]:
    """Every CHARTEVENTS item the ETL needs (state variables and ventilation)."""
    ids = {i for v in STATE_VARIABLES for i in v.chart_itemids}
    ids |= {i for iv in INTERVENTIONS for i in iv.chartevents}
    return tuple(sorted(ids | {EXTUBATION_CHART_ITEMID}))


def lab_itemids() -> tuple[int, ...]:
    return tuple(sorted({i for v in STATE_VARIABLES for i in v.lab_itemids}))


def catalog_dict() -> dict:
    """A JSON-able description of the catalog (shipped with the preprocessor and the model)."""
    return {
        "bin_hours": BIN_HOURS,
        "state_variables": [asdict(var) for var in STATE_VARIABLES],
        "interventions": [asdict(iv) for iv in INTERVENTIONS],
    }


def catalog_version() -> str:
    """Content hash of the catalog: a preprocessor or model built on another catalog is refused."""
    blob = json.dumps(catalog_dict(), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
