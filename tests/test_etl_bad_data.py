"""Bad rows in otherwise readable tables: each one counted and explained in the data card, or
one error line; never a traceback, never silent (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from etl_support import T0, T2, h, tables, write_mimic

from pipeline.cli import main
from pipeline.etl.transform import REASON_TIME_RANGE


def run(tmp_path: Path, rows: dict, capsys, *flags: str) -> tuple[pd.DataFrame, dict]:
    mimic = write_mimic(tmp_path / "mimic", rows)
    out = tmp_path / "out"
    code = main(["etl", "--mimic-dir", str(mimic), "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    card = json.loads((out / "data_card.json").read_text())
    return pd.read_parquet(out / "bins.parquet"), card


def cell(bins: pd.DataFrame, stay: int, b: int, col: str) -> float:
    return float(bins.loc[(bins["icustay_id"] == stay) & (bins["bin"] == b), col].iloc[0])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    mimic = write_mimic(root / "mimic")
    assert (
        main(["etl", "--mimic-dir", str(mimic), "--out", str(root / "out"), "--no-progress"]) == 0
    )
    card = json.loads((root / "out" / "data_card.json").read_text())
    return pd.read_parquet(root / "out" / "bins.parquet"), card


def test_duplicate_rows_are_dropped_and_counted(tmp_path, capsys, baseline) -> None:
    rows = tables()
    mv_fluid = rows["INPUTEVENTS_MV"][2]  # 1200 mL over 10..14 h of stay 102
    rows["INPUTEVENTS_MV"].append(dict(mv_fluid))
    rows["CHARTEVENTS"].insert(0, dict(rows["CHARTEVENTS"][0]))  # HR 80 twice
    rows["CHARTEVENTS"].append(dict(rows["CHARTEVENTS"][7]))  # HR 70 in bin 1, twice
    # Rows the ETL does not read (an item outside the catalog) are not its to count.
    rows["CHARTEVENTS"].append(dict(rows["CHARTEVENTS"][-2]))
    bins, card = run(tmp_path, rows, capsys)
    assert cell(bins, 102, 0, "iv_fluid_ml") == 600.0  # not doubled
    assert cell(bins, 102, 1, "iv_fluid_ml") == 600.0
    pd.testing.assert_frame_equal(bins, baseline[0])
    problem = card["input_problems"]["duplicate_rows"]
    assert problem["count"] == 3
    assert problem["per_table"] == {"CHARTEVENTS": 2, "INPUTEVENTS_MV": 1}
    assert "kept once" in problem["action"]
    assert card["tables"]["INPUTEVENTS_MV"]["duplicate_rows"] == 1
    assert baseline[1]["input_problems"]["duplicate_rows"]["count"] == 0


@pytest.mark.parametrize(
    ("table", "index", "column", "value"),
    [
        ("CHARTEVENTS", 0, "charttime", "9999-12-31 23:59:59"),
        ("CHARTEVENTS", 0, "charttime", "1000-01-01 00:00:00"),
        ("LABEVENTS", 0, "charttime", "0001-01-01 00:00:00"),
        ("INPUTEVENTS_MV", 2, "starttime", "0001-01-01 00:00:00"),
        ("INPUTEVENTS_MV", 0, "endtime", "9999-12-31 23:59:59"),
        ("INPUTEVENTS_CV", 0, "charttime", "9999-12-31 23:59:59"),
    ],
)
def test_unrepresentable_event_times_drop_the_row(
    tmp_path, capsys, table, index, column, value
) -> None:
    rows = tables()
    rows[table][index] = dict(rows[table][index], **{column: value})
    bins, card = run(tmp_path, rows, capsys)
    problem = card["input_problems"]["timestamps_out_of_range"]
    assert problem["count"] == 1 and problem["per_table"] == {table: 1}
    assert card["tables"][table]["time_out_of_range_rows"] == 1
    assert len(bins) == 5


@pytest.mark.parametrize("column", ["intime", "outtime"])
@pytest.mark.parametrize("value", ["1000-01-01 00:00:00", "2300-01-01 00:00:00"])
def test_unrepresentable_stay_times_exclude_the_stay(tmp_path, capsys, column, value) -> None:
    rows = tables()
    rows["ICUSTAYS"][0] = dict(rows["ICUSTAYS"][0], **{column: value})
    bins, card = run(tmp_path, rows, capsys)
    assert 101 not in set(bins["icustay_id"])
    reasons = {e["icustay_id"]: e["reason"] for e in card["cohort"]["excluded_stays"]}
    assert reasons[101] == REASON_TIME_RANGE
    assert card["cohort"]["stays_kept"] + card["cohort"]["stays_excluded"] == 4
    assert card["input_problems"]["timestamps_out_of_range"]["per_table"] == {"ICUSTAYS": 1}


def test_events_far_outside_the_stay_are_counted(tmp_path, capsys, baseline) -> None:
    rows = tables()
    hr = rows["CHARTEVENTS"][0]
    rows["CHARTEVENTS"] += [
        dict(hr, charttime=h(-24 * 365 * 40)),  # decades before
        dict(hr, charttime=h(24 * 365 * 40)),  # decades after
    ]
    mv = rows["INPUTEVENTS_MV"][2]
    rows["INPUTEVENTS_MV"].append(dict(mv, starttime=h(24 * 400, T2), endtime=h(24 * 400 + 2, T2)))
    bins, card = run(tmp_path, rows, capsys)
    pd.testing.assert_frame_equal(bins, baseline[0])
    before = baseline[1]["values"]["heart_rate"]["outside_stay"]
    assert card["values"]["heart_rate"]["outside_stay"] == before + 2
    assert card["interventions"]["iv_fluid_ml"]["outside_stay"] == (
        baseline[1]["interventions"]["iv_fluid_ml"]["outside_stay"] + 1
    )
    problem = card["input_problems"]["events_outside_stay"]
    assert problem["count"] == baseline[1]["input_problems"]["events_outside_stay"]["count"] + 3


def test_a_stay_decades_long_is_cut_to_the_maximum(tmp_path, capsys) -> None:
    rows = tables()
    rows["ICUSTAYS"][0] = dict(rows["ICUSTAYS"][0], outtime=str(T0 + pd.Timedelta(days=365 * 60)))
    bins, card = run(tmp_path, rows, capsys)
    assert (bins["icustay_id"] == 101).sum() == 120  # 60 days of 12-hour bins
    assert card["input_problems"]["stays_cut_to_max_length"]["count"] == 1
    assert card["settings"]["max_stay_days"] == 60
    assert card["bins"]["per_stay"]["max"] == 120


def test_max_stay_days_flag_cuts_and_counts(tmp_path, capsys, baseline) -> None:
    bins, card = run(tmp_path, tables(), capsys, "--max-stay-days", "1")
    # 101 lasts 30 h (3 bins) -> its first day, 2 bins; 102 (20 h) is not cut.
    assert (bins["icustay_id"] == 101).sum() == 2 and (bins["icustay_id"] == 102).sum() == 2
    assert card["input_problems"]["stays_cut_to_max_length"]["count"] == 1
    # The SpO2 value at 25 h now lies after the cut: dropped and counted.
    assert card["values"]["spo2"]["outside_stay"] == 1
    assert baseline[1]["values"]["spo2"]["outside_stay"] == 0


@pytest.mark.parametrize("amount", ["inf", "1e308", "nan", "-inf", "-5", "25000"])
def test_implausible_dose_is_dropped_and_counted(tmp_path, capsys, amount) -> None:
    rows = tables()
    rows["INPUTEVENTS_MV"][2] = dict(rows["INPUTEVENTS_MV"][2], amount=amount)
    bins, card = run(tmp_path, rows, capsys)
    assert cell(bins, 102, 0, "iv_fluid_ml") == 0.0
    assert cell(bins, 102, 1, "iv_fluid_ml") == 0.0
    # A negative amount is an implausible dose too (counted); "nan" reads as a missing amount.
    expected = 0 if amount == "nan" else 1
    assert card["interventions"]["iv_fluid_ml"]["implausible_doses"] == expected
    assert card["input_problems"]["implausible_intervention_amounts"]["count"] == expected


def test_bins_over_the_intervention_maximum_are_clamped_and_counted(tmp_path, capsys) -> None:
    rows = tables()
    mv = rows["INPUTEVENTS_MV"][2]
    rows["INPUTEVENTS_MV"] += [
        dict(mv, starttime=h(1, T2), endtime=h(2, T2), amount=15000),
        dict(mv, starttime=h(3, T2), endtime=h(4, T2), amount=15000),
    ]
    bins, card = run(tmp_path, rows, capsys)
    assert cell(bins, 102, 0, "iv_fluid_ml") == 20000.0
    assert card["interventions"]["iv_fluid_ml"]["bins_clamped"] == 1
    assert card["input_problems"]["intervention_bins_clamped"]["per_variable"] == {"iv_fluid_ml": 1}


def test_a_stay_row_written_twice_is_one_stay(tmp_path, capsys, baseline) -> None:
    rows = tables()
    rows["ICUSTAYS"].append(dict(rows["ICUSTAYS"][1]))  # 102 exactly twice: kept once
    conflicting = dict(rows["ICUSTAYS"][0], outtime=h(40))  # 101 twice, disagreeing
    rows["ICUSTAYS"].append(conflicting)
    bins, card = run(tmp_path, rows, capsys)
    assert (bins["icustay_id"] == 102).sum() == 2
    assert card["input_problems"]["duplicate_rows"]["per_table"] == {"ICUSTAYS": 1}
    cohort = card["cohort"]
    assert cohort["icustays_rows"] == 5  # 6 rows read, one exact duplicate
    assert cohort["excluded_by_reason"]["duplicate icustay_id"] == 1
    assert card["tables"]["ICUSTAYS"]["rows_read"] == 6


@pytest.mark.parametrize("rate", ["inf", "-inf", "-1"])
def test_implausible_vasopressor_rate_is_dropped_and_counted(tmp_path, capsys, rate) -> None:
    rows = tables()
    rows["INPUTEVENTS_CV"][1] = dict(rows["INPUTEVENTS_CV"][1], rate=rate)  # the stop at 14 h
    bins, card = run(tmp_path, rows, capsys)
    # The infusion from 12 h then runs its 4-hour maximum instead of stopping at 14 h.
    assert cell(bins, 101, 1, "vasopressor") == pytest.approx(4 / 12)
    assert card["interventions"]["vasopressor"]["implausible_doses"] == 1
    assert card["input_problems"]["implausible_intervention_amounts"]["per_variable"] == {
        "vasopressor": 1
    }
