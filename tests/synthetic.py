"""Tiny synthetic ETL output (bins.parquet + data_card.json) for tests.

Contract-conforming (docs/architecture.md) and learnable: every state variable relaxes towards
a stay-specific set point, vasopressors raise blood pressure, ventilation raises SpO2, fluids
lower creatinine. No patient data is involved; everything is drawn from a seeded generator.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from features.atomic import atomic_dir
from features.catalog import (
    BIN_HOURS,
    INTERVENTION_NAMES,
    N_STATE,
    OBSERVED_NAMES,
    STATE_NAMES,
    catalog_version,
)
from features.preprocess import BINS_COLUMNS, prepare_bins

# Typical physiological centre and spread of each state variable (physical units).
_CENTRE = np.array(
    [85, 120, 60, 80, 18, 37, 96, 12, 130, 1.2, 25, 10, 10.5, 220, 139, 4.1, 24, 1.8], float
)
_SPREAD = np.array([12, 15, 9, 10, 4, 0.6, 2, 2.5, 30, 0.5, 10, 3, 1.5, 70, 3, 0.4, 3, 0.9], float)
_LAB = np.array([i >= 8 for i in range(N_STATE)])
_IV_EFFECT = np.zeros((N_STATE, 3))
_IV_EFFECT[[1, 2, 3], 0] = 0.6  # vasopressor raises sbp / dbp / mbp
_IV_EFFECT[6, 1] = 0.5  # ventilation raises spo2
_IV_EFFECT[9, 2] = -0.3 / 1000  # 1000 mL of fluid lowers creatinine


def synthetic_raw_bins(n_stays: int = 40, n_bins: int = 8, seed: int = 0) -> pd.DataFrame:
    """Aggregated bins before preprocessing: NaN where a variable was not measured.

    Stay lengths vary between 2 and ``n_bins`` so padding and masking are exercised.
    """
    if n_stays < 7:
        raise ValueError("n_stays must be >= 7 so that every split gets a stay")
    if n_bins < 2:
        raise ValueError("n_bins must be >= 2 (a stay needs a next bin to forecast)")
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_stays):
        length = int(rng.integers(max(2, n_bins // 2), n_bins + 1)) if s % 3 else n_bins
        set_point = rng.normal(0.0, 1.0, N_STATE)
        z = rng.normal(0.0, 1.0, N_STATE)
        subject = 1000 + s - (s % 5 == 4)  # every fifth stay is its subject's second stay
        intime = pd.Timestamp("2100-01-01") + pd.Timedelta(days=int(rng.integers(0, 3000)))
        for b in range(length):
            iv = np.array(
                [
                    float(rng.random() < 0.3) * rng.uniform(0.2, 1.0),
                    float(rng.random() < 0.4),
                    float(rng.random() < 0.6) * rng.uniform(100, 3000),
                ]
            )
            physical = _CENTRE + _SPREAD * z
            measured = rng.random(N_STATE) < np.where(_LAB, 0.6, 0.9)
            if b == 0:
                measured[:8] = True  # vitals are charted on admission
            raw = np.where(measured, physical, np.nan)
            raw_iv = np.where(iv > 0, iv, np.nan)  # absent interventions are simply not charted
            rows.append(
                {
                    "subject_id": subject,
                    "hadm_id": 50_000 + s,
                    "icustay_id": 200_000 + s,
                    "bin": b,
                    "bin_start": intime + pd.Timedelta(hours=BIN_HOURS * b),
                    **dict(zip(STATE_NAMES, raw, strict=True)),
                    **dict(zip(INTERVENTION_NAMES, raw_iv, strict=True)),
                }
            )
            # Learnable dynamics in standardised units, then the interventions' effects.
            z = 0.7 * z + 0.3 * set_point + _IV_EFFECT @ iv + rng.normal(0.0, 0.1, N_STATE)
    frame = pd.DataFrame(rows)
    frame["subject_id"] = frame["subject_id"].astype("int64")
    frame["hadm_id"] = frame["hadm_id"].astype("int64")
    frame["icustay_id"] = frame["icustay_id"].astype("int64")
    frame["bin"] = frame["bin"].astype("int32")
    frame["bin_start"] = frame["bin_start"].astype("datetime64[us]")
    return frame


def _split(subjects: np.ndarray, seed: int) -> dict[int, str]:
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(np.unique(subjects))
    n = len(order)
    n_val = max(1, round(0.15 * n))
    n_test = max(1, round(0.15 * n))
    out = {int(s): "train" for s in order[: n - n_val - n_test]}
    out |= {int(s): "val" for s in order[n - n_val - n_test : n - n_test]}
    out |= {int(s): "test" for s in order[n - n_test :]}
    return out


def write_synthetic_etl_output(
    out_dir: Path, n_stays: int = 40, n_bins: int = 8, seed: int = 0
) -> Path:
    """Write a tiny contract-conforming ETL output folder to ``out_dir`` and return it.

    State values are clamped and forward-filled within each stay (NaN before a variable's
    first measurement), as the ETL writes them; imputation and scaling are fitted by training.
    """
    out_dir = Path(out_dir)
    raw = synthetic_raw_bins(n_stays, n_bins, seed)
    frame = prepare_bins(raw)
    split_of = _split(frame["subject_id"].to_numpy(), seed)
    frame["split"] = frame["subject_id"].map(split_of).astype("str")
    columns = list(BINS_COLUMNS)
    frame = frame[columns]
    for name in OBSERVED_NAMES:
        frame[name] = frame[name].astype("float32")
    with atomic_dir(out_dir) as tmp:
        bins_path = tmp / "bins.parquet"
        frame.to_parquet(bins_path, index=False)
        sha = hashlib.sha256(bins_path.read_bytes()).hexdigest()
        splits = {
            name: {
                "subjects": int(g["subject_id"].nunique()),
                "stays": int(g["icustay_id"].nunique()),
                "bins": len(g),
            }
            for name, g in frame.groupby("split")
        }
        card = {
            "format": 1,
            "synthetic": True,
            "catalog_version": catalog_version(),
            "bin_hours": BIN_HOURS,
            "settings": {"seed": seed, "n_stays": n_stays, "n_bins": n_bins},
            "bins_sha256": sha,
            "cohort": {"stays_kept": n_stays, "splits": splits},
            "bins": {"total": len(frame)},
        }
        (tmp / "data_card.json").write_text(json.dumps(card, indent=1))
    return out_dir
