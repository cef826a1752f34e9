"""The ETL on a tiny synthetic MIMIC-III folder whose bins were computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from etl_support import EXPECTED, write_mimic

from features.catalog import INTERVENTION_NAMES, STATE_NAMES
from features.errors import UserError
from pipeline.etl import EtlSettings, run_etl


def settings(mimic: Path, out: Path, **kw) -> EtlSettings:
    return EtlSettings(mimic_dir=mimic, out=out, progress=False, **kw)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    mimic = write_mimic(root / "mimic")
    result = run_etl(settings(mimic, root / "out"))
    return mimic, result


def test_expected_bins(synthetic_run) -> None:
    _, result = synthetic_run
    bins = pd.read_parquet(result.bins_path)
    assert bins[["icustay_id", "bin"]].values.tolist() == [[101, 0], [101, 1], [101, 2],
                                                           [102, 0], [102, 1]]  # fmt: skip
    assert bins["bin_start"].iloc[1] == pd.Timestamp("2100-01-01 12:00:00")
    for (stay, b), expected in EXPECTED.items():
        row = bins[(bins["icustay_id"] == stay) & (bins["bin"] == b)].iloc[0]
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, abs=1e-6), (stay, b, name)
            if name in STATE_NAMES:
                assert row[f"{name}_observed"] == 1.0, (stay, b, name)
        for name in INTERVENTION_NAMES:
            if name not in expected:
                assert row[name] == 0.0, (stay, b, name)  # zero-filled, not imputed
        for name in STATE_NAMES:
            if name not in expected:
                assert row[f"{name}_observed"] == 0.0, (stay, b, name)
    # Forward-filled within the stay: 101's bin 2 carries bin 1's heart rate.
    assert bins.loc[2, "heart_rate"] == 70.0
    # Not imputed: missing until first measured in the stay, and never carried across stays
    # (102's bin 0 has no creatinine although 101's last bin has one).
    assert bins["spo2"].isna().tolist() == [True, True, False, True, True]
    assert bins["creatinine"].isna().tolist() == [False, False, False, True, True]
    assert bins["lactate"].isna().all()
    assert not bins[list(INTERVENTION_NAMES)].isna().any().any()
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["bins.parquet", "data_card.json"]


def test_data_card_accounts_for_every_stay(synthetic_run) -> None:
    _, result = synthetic_run
    card = json.loads(result.data_card_path.read_text())
    cohort = card["cohort"]
    assert cohort["icustays_rows"] == 4
    assert cohort["stays_kept"] + cohort["stays_excluded"] == 4
    assert {e["icustay_id"]: e["reason"] for e in cohort["excluded_stays"]} == {
        103: "no usable state-variable events in the stay",
        104: "missing intime or outtime",
    }
    assert card["values"]["heart_rate"]["dropped"] == 1  # the 999 bpm
    assert card["values"]["spo2"]["bins_clamped"] == 1  # the 45 %
    assert card["tables"]["CHARTEVENTS"]["rows_read"] == 25
    assert card["tables"]["CHARTEVENTS"]["rows_kept"] == 23  # the error = 1 row is gone
    assert len(card["inputs"]) == 6 and all(len(v["sha256"]) == 64 for v in card["inputs"].values())
    assert card["bins_sha256"] == result.bins_sha256
    assert card["missingness"]["lactate"] == {"not_observed": 1.0, "missing_after_ffill": 1.0}
    assert card["missingness"]["spo2"] == {"not_observed": 0.8, "missing_after_ffill": 0.8}
    assert card["missingness"]["creatinine"] == {"not_observed": 0.6, "missing_after_ffill": 0.4}
    assert card["producer"] == "icu-forecast etl" and card["format"] == 2


@pytest.mark.parametrize(
    "fmt", [{"lower": True, "gz": False}, {"quote_all": True}], ids=["lower-csv", "quoted"]
)
def test_other_file_formats_give_the_same_bins(synthetic_run, tmp_path, fmt) -> None:
    _, result = synthetic_run
    mimic = write_mimic(tmp_path / "mimic", **fmt)
    again = run_etl(settings(mimic, tmp_path / "out"))
    assert again.bins_sha256 == result.bins_sha256


def test_rerun_is_idempotent_and_failure_keeps_output(synthetic_run, tmp_path) -> None:
    mimic, result = synthetic_run
    out = tmp_path / "out"
    first = run_etl(settings(mimic, out))
    second = run_etl(settings(mimic, out))
    assert first.bins_sha256 == second.bins_sha256 == result.bins_sha256
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    broken = write_mimic(tmp_path / "inputs" / "broken")
    (broken / "LABEVENTS.csv.gz").unlink()
    with pytest.raises(UserError, match="LABEVENTS"):
        run_etl(settings(broken, out))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no staging or scratch folder left behind


def test_seed_changes_split_not_values(synthetic_run, tmp_path) -> None:
    mimic, result = synthetic_run
    a = pd.read_parquet(result.bins_path)
    for seed in (1, 2, 3):
        b = pd.read_parquet(run_etl(settings(mimic, tmp_path / f"o{seed}", seed=seed)).bins_path)
        np.testing.assert_array_equal(a["heart_rate_observed"], b["heart_rate_observed"])
        if not a["split"].equals(b["split"]):
            return
    pytest.fail("three seeds gave the same split")
