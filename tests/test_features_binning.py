"""Binning: edges and per-bin aggregation (the SQL that the ETL and the service both run)."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from features.binning import (
    bin_patient_events,
    coverage_bins_sql,
    state_bins_sql,
    volume_bins_sql,
)
from features.catalog import INTERVENTION_NAMES, STATE_NAMES

T0 = pd.Timestamp("2150-03-01 07:30:00")


def at(hours: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(hours=hours)


def stays(outtime_hours: float | None = 40.0) -> pd.DataFrame:
    out = pd.NaT if outtime_hours is None else at(outtime_hours)
    return pd.DataFrame({"icustay_id": [1], "intime": [T0], "outtime": [out]})


def run_sql(sql_of, **tables: pd.DataFrame) -> pd.DataFrame:
    """``sql_of(*table names)`` run in DuckDB over the frames given by name."""
    con = duckdb.connect()
    for name, frame in tables.items():
        con.register(name, frame)
    return con.execute(sql_of(*tables)).df()


def values_of(long: pd.DataFrame, variable: str) -> dict[int, float]:
    sel = long[long["variable"] == variable]
    return dict(zip(sel["bin"].astype(int), sel["value"], strict=True))


def test_bin_edges() -> None:
    times = [at(0), at(12) - pd.Timedelta(seconds=1), at(12), at(23.99), at(24)]
    ev = pd.DataFrame({"icustay_id": 1, "time": times, "variable": "sbp", "value": 100.0})
    long = run_sql(state_bins_sql, events=ev, stays=stays(None))
    # Bin 0 is [intime, intime + 12 h): the second before 12 h is in it, 12 h starts bin 1.
    assert dict(zip(long["bin"], long["n"], strict=True)) == {0: 2, 1: 2, 2: 1}


def test_state_mean_window_and_edges() -> None:
    ev = pd.DataFrame(
        {
            "icustay_id": 1,
            "time": [at(-7), at(-5), at(0), at(11.9), at(12), at(40), at(40.01)],
            "variable": "heart_rate",
            "value": [1.0, 60.0, 80.0, 100.0, 70.0, 90.0, 500.0],
        }
    )
    got = values_of(run_sql(state_bins_sql, events=ev, stays=stays(40)), "heart_rate")
    # -7 h is before the 6 h pre-intime window; -5 h counts for bin 0; 40.01 h is after outtime.
    assert got == {0: pytest.approx(80.0), 1: 70.0, 3: 90.0}


def test_coverage_union_and_clipping() -> None:
    iv = pd.DataFrame(
        {
            "icustay_id": 1,
            "variable": "vasopressor",
            # two drugs overlapping 2..8 and 4..10 -> 2..10 once; one spanning bins 1-2; one
            # before intime clipped to start at intime.
            "start": [at(2), at(4), at(18), at(-3)],
            "end": [at(8), at(10), at(30), at(1)],
        }
    )
    got = values_of(run_sql(coverage_bins_sql, iv=iv, stays=stays(27)), "vasopressor")
    assert got == pytest.approx({0: 9 / 12, 1: 6 / 12, 2: 3 / 12})


def test_volume_spread_and_points() -> None:
    doses = pd.DataFrame(
        {
            "icustay_id": 1,
            "variable": "iv_fluid_ml",
            "start": [at(10), at(5), at(-2), at(30)],
            "end": [at(14), pd.NaT, at(2), pd.NaT],
            "amount": [1000.0, 250.0, 400.0, 80.0],
        }
    )
    got = values_of(run_sql(volume_bins_sql, doses=doses, stays=stays(26)), "iv_fluid_ml")
    # 1000 mL over 10..14 h: 500 in each bin; 400 mL over -2..2 h: half before intime is lost;
    # 80 mL at 30 h is after outtime.
    assert got == pytest.approx({0: 250 + 500 + 200, 1: 500.0})


def test_bin_patient_events_states_and_interventions() -> None:
    events = [
        {"time": at(1), "variable": "temperature", "value": 37.0},
        {"time": at(2), "variable": "temperature", "value": 37.5},
        {"time": at(13), "variable": "glucose", "value": 90.0},
        {"time": at(6), "variable": "vasopressor", "value": 1.0, "end_time": at(18)},
        {"time": at(14), "variable": "iv_fluid_ml", "value": 250.0},
    ]
    wide = bin_patient_events(events, T0)
    assert list(wide.columns) == ["bin", "bin_start", *STATE_NAMES, *INTERVENTION_NAMES]
    assert wide["bin"].tolist() == [0, 1]
    assert wide["bin_start"].tolist() == [T0, at(12)]
    assert wide.loc[0, "temperature"] == pytest.approx(37.25)
    assert np.isnan(wide.loc[0, "heart_rate"])
    assert wide.loc[1, "glucose"] == pytest.approx(90.0)
    assert wide["vasopressor"].tolist() == pytest.approx([0.5, 0.5])
    assert np.isnan(wide.loc[0, "iv_fluid_ml"]) and wide.loc[1, "iv_fluid_ml"] == 250.0
    assert len(bin_patient_events(events, T0, n_bins=4)) == 4
