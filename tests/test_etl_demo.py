"""End to end: ``icu-forecast etl`` on the MIMIC-III demo copy, checked against the contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.catalog import (
    INTERVENTION_BY_NAME,
    INTERVENTION_NAMES,
    OBSERVED_NAMES,
    STATE_BY_NAME,
    STATE_NAMES,
)
from features.preprocess import FEATURE_NAMES, Preprocessor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(mimic_dir, tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("demo") / "processed"
    env = dict(os.environ, MIMIC_DIR=str(mimic_dir))
    # The installed console script, as a user runs it (the module when not installed).
    script = Path(sys.executable).with_name("icu-forecast")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    proc = subprocess.run(
        [*cmd, "etl", "--out", str(out), "--no-progress"],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CHARTEVENTS: 587,447 rows read" in proc.stderr
    return out


def test_output_contract(demo_out) -> None:
    bins = pd.read_parquet(demo_out / "bins.parquet")
    head = ["subject_id", "hadm_id", "icustay_id", "bin", "bin_start", "split"]
    assert list(bins.columns) == head + list(STATE_NAMES + INTERVENTION_NAMES + OBSERVED_NAMES)
    for col in ("subject_id", "hadm_id", "icustay_id"):
        assert bins[col].dtype == np.int64
    assert bins["bin"].dtype == np.int32
    assert all(bins[n].dtype == np.float64 for n in FEATURE_NAMES)
    assert all(bins[n].dtype == np.float32 for n in OBSERVED_NAMES)
    assert pd.api.types.is_datetime64_any_dtype(bins["bin_start"])
    # Sorted, contiguous 0..n-1 per stay, every bin complete.
    assert bins[["icustay_id", "bin"]].equals(
        bins[["icustay_id", "bin"]].sort_values(["icustay_id", "bin"]).reset_index(drop=True)
    )
    for _, g in bins.groupby("icustay_id"):
        assert g["bin"].tolist() == list(range(len(g)))
        steps = g["bin_start"].diff().dropna().unique()
        assert len(g) == 1 or list(steps) == [pd.Timedelta(hours=12)]
    # Nothing imputed: a state value is missing exactly until its first measurement in the
    # stay (forward fill within the stay); everything else is complete.
    assert not bins.drop(columns=list(STATE_NAMES)).isna().any().any()
    seen = bins.groupby("icustay_id")[list(OBSERVED_NAMES)].cummax().to_numpy() > 0
    np.testing.assert_array_equal(bins[list(STATE_NAMES)].notna().to_numpy(), seen)
    assert bins[list(STATE_NAMES)].isna().any().any()
    # Values inside the clamp ranges, interventions inside theirs, masks 0/1.
    for n in STATE_NAMES:
        lo, hi = STATE_BY_NAME[n].clamp
        assert bins[n].dropna().between(lo, hi).all(), n
    for n in INTERVENTION_NAMES:
        assert bins[n].between(0, INTERVENTION_BY_NAME[n].max_value).all(), n
    assert set(np.unique(bins[list(OBSERVED_NAMES)].to_numpy())) <= {0.0, 1.0}
    # Splits disjoint by subject, roughly 70/15/15 of subjects.
    per_subject = bins.groupby("subject_id")["split"].nunique()
    assert (per_subject == 1).all()
    counts = bins.drop_duplicates("subject_id")["split"].value_counts()
    assert set(counts.index) == {"train", "val", "test"}
    assert abs(counts["train"] / counts.sum() - 0.70) < 0.03


def test_data_card_accounts_for_all_109_stays(demo_out) -> None:
    card = json.loads((demo_out / "data_card.json").read_text())
    cohort = card["cohort"]
    assert cohort["icustays_rows"] == 109
    assert cohort["stays_kept"] + cohort["stays_excluded"] == 109
    assert sum(cohort["excluded_by_reason"].values()) == cohort["stays_excluded"]
    assert len(cohort["excluded_stays"]) == cohort["stays_excluded"]
    bins = pd.read_parquet(demo_out / "bins.parquet")
    assert bins["icustay_id"].nunique() == cohort["stays_kept"]
    assert len(bins) == card["bins"]["total"]
    assert set(card["missingness"]) == set(STATE_NAMES)
    for n in STATE_NAMES:
        observed_share = bins[f"{n}_observed"].mean()
        missing = card["missingness"][n]
        assert missing["not_observed"] == pytest.approx(1 - observed_share, abs=1e-6)
        assert missing["missing_after_ffill"] == pytest.approx(bins[n].isna().mean(), abs=1e-6)
    assert set(card["inputs"]) >= {"CHARTEVENTS.csv.gz", "ICUSTAYS.csv.gz", "LABEVENTS.csv.gz"}


def test_checksums_match_the_files(demo_out, mimic_dir) -> None:
    card = json.loads((demo_out / "data_card.json").read_text())
    sums_file = mimic_dir / "SHA256SUMS"
    assert sums_file.exists()
    listed = {}
    for line in sums_file.read_text().splitlines():
        digest, name = line.split()[:2]
        listed[name.lstrip("*").split("/")[-1]] = digest
    for name, info in card["inputs"].items():
        assert info["sha256"] == listed[name], name


def test_nothing_is_fitted_and_training_can_fit_on_any_patients(demo_out) -> None:
    # The imputer and scaler are fitted by training, per split or fold (issue 14): the ETL
    # output holds only the bins and the card.
    assert sorted(p.name for p in demo_out.iterdir()) == ["bins.parquet", "data_card.json"]
    bins = pd.read_parquet(demo_out / "bins.parquet")
    train = bins[bins["split"] == "train"]
    pre, _ = Preprocessor.fit(train, seed=0)
    filled = pre.impute(bins[list(FEATURE_NAMES)].to_numpy())
    assert not np.isnan(filled).any()
    # Measured (and forward-filled) values pass through the imputer unchanged.
    known = bins[list(FEATURE_NAMES)].notna().to_numpy()
    np.testing.assert_array_equal(filled[known], bins[list(FEATURE_NAMES)].to_numpy()[known])
