"""Binning: edges, per-bin aggregation, and the SQL (ETL) and pandas (service) paths agreeing."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from features.binning import (
    aggregate_coverage,
    aggregate_state,
    aggregate_volume,
    bin_index,
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


def values_of(long: pd.DataFrame, variable: str) -> dict[int, float]:
    sel = long[long["variable"] == variable]
    return dict(zip(sel["bin"].astype(int), sel["value"], strict=True))


def test_bin_edges() -> None:
    times = pd.Series([at(0), at(12) - pd.Timedelta(seconds=1), at(12), at(23.99), at(24), at(-1)])
    assert bin_index(times, T0).tolist() == [0, 0, 1, 1, 2, -1]


def test_state_mean_window_and_edges() -> None:
    ev = pd.DataFrame(
        {
            "icustay_id": 1,
            "time": [at(-7), at(-5), at(0), at(11.9), at(12), at(40), at(40.01)],
            "variable": "heart_rate",
            "value": [1.0, 60.0, 80.0, 100.0, 70.0, 90.0, 500.0],
        }
    )
    got = values_of(aggregate_state(ev, stays(40)), "heart_rate")
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
    got = values_of(aggregate_coverage(iv, stays(27)), "vasopressor")
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
    got = values_of(aggregate_volume(doses, stays(26)), "iv_fluid_ml")
    # 1000 mL over 10..14 h: 500 in each bin; 400 mL over -2..2 h: half before intime is lost;
    # 80 mL at 30 h is after outtime.
    assert got == pytest.approx({0: 250 + 500 + 200, 1: 500.0})


def _random_events(seed: int):
    rng = np.random.default_rng(seed)
    n_stays = 4
    st = pd.DataFrame(
        {
            "icustay_id": np.arange(1, n_stays + 1),
            "intime": [
                T0 + pd.Timedelta(days=3 * i, seconds=int(rng.integers(0, 86400)))
                for i in range(n_stays)
            ],
            "outtime": [pd.NaT] * n_stays,
        }
    )
    st["outtime"] = st["intime"] + pd.to_timedelta(rng.uniform(1, 60, n_stays), unit="h").round("s")
    st.loc[n_stays - 1, "outtime"] = pd.NaT  # a stay with no outtime (the service's case)

    def times(n, lo=-10, hi=70):
        stay = rng.integers(1, n_stays + 1, n)
        base = st.set_index("icustay_id").loc[stay, "intime"].to_numpy()
        return stay, pd.to_datetime(base) + pd.to_timedelta(rng.uniform(lo, hi, n), unit="h").round(
            "s"
        )

    s, t = times(400)
    events = pd.DataFrame(
        {"icustay_id": s, "time": t, "variable": rng.choice(["heart_rate", "sbp"], 400),
         "value": rng.normal(90, 20, 400)}
    )  # fmt: skip
    s, t = times(60)
    dur = pd.to_timedelta(rng.uniform(0, 20, 60), unit="h").round("s")
    intervals = pd.DataFrame(
        {"icustay_id": s, "variable": rng.choice(["vasopressor", "mechanical_ventilation"], 60),
         "start": t, "end": t + dur}
    )  # fmt: skip
    s, t = times(60)
    dur = pd.to_timedelta(rng.uniform(0, 10, 60), unit="h").round("s")
    end = pd.Series(t + dur).where(rng.random(60) < 0.6)
    doses = pd.DataFrame(
        {"icustay_id": s, "variable": "iv_fluid_ml", "start": t, "end": end.to_numpy(),
         "amount": rng.uniform(10, 1000, 60)}
    )  # fmt: skip
    return st, events, intervals, doses


def _compare(pandas_long: pd.DataFrame, sql_long: pd.DataFrame) -> None:
    key = ["icustay_id", "bin", "variable"]
    a = pandas_long.sort_values(key).reset_index(drop=True)
    b = sql_long[key + ["value"]].sort_values(key).reset_index(drop=True)
    assert len(a) > 0
    assert a[key].astype(str).equals(b[key].astype(str))
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sql_and_pandas_paths_agree(seed: int) -> None:
    st, events, intervals, doses = _random_events(seed)
    con = duckdb.connect()
    con.register("stays_df", st)
    con.register("events_df", events)
    con.register("intervals_df", intervals)
    con.register("doses_df", doses)
    _compare(aggregate_state(events, st), con.execute(state_bins_sql("events_df", "stays_df")).df())
    _compare(
        aggregate_coverage(intervals, st),
        con.execute(coverage_bins_sql("intervals_df", "stays_df")).df(),
    )
    _compare(aggregate_volume(doses, st), con.execute(volume_bins_sql("doses_df", "stays_df")).df())


def test_bin_patient_events_units_drop_and_interventions() -> None:
    events = [
        {"time": at(1), "variable": "temperature", "value": 98.6, "unit": "degF"},
        {"time": at(2), "variable": "temperature", "value": 37.5, "unit": None},
        {"time": at(3), "variable": "heart_rate", "value": 1000.0},  # outside the drop range
        {"time": at(13), "variable": "glucose", "value": 5.0, "unit": "mmol/L"},
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


def test_bin_patient_events_rejects_bad_events() -> None:
    with pytest.raises(ValueError, match="unknown variable"):
        bin_patient_events([{"time": T0, "variable": "hr", "value": 1}], T0)
    with pytest.raises(ValueError, match="end_time"):
        bin_patient_events([{"time": T0, "variable": "vasopressor", "value": 1}], T0)
    with pytest.raises(ValueError, match="not accepted"):
        bin_patient_events([{"time": T0, "variable": "sodium", "value": 1, "unit": "g"}], T0)
