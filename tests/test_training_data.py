"""bins.parquet -> partitions by patient -> preprocessing fitted on training patients only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from features.catalog import N_STATE, STATE_NAMES
from tests.synthetic import write_synthetic_etl_output
from training.data import (
    BinsDataModule,
    DataError,
    fold_partition,
    holdout_partition,
    load_bins,
    stays_from_frame,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_etl_output(tmp_path_factory.mktemp("syn") / "out", n_stays=30, n_bins=6)


def _stays(data_dir: Path):
    frame, _ = load_bins(data_dir)
    return stays_from_frame(frame)


def test_synthetic_output_follows_the_contract(data_dir: Path) -> None:
    frame = pd.read_parquet(data_dir / "bins.parquet")
    assert set(frame["split"]) == {"train", "val", "test"}
    assert frame.groupby("subject_id")["split"].nunique().max() == 1  # split by subject
    assert (
        frame.groupby("icustay_id")["bin"].apply(lambda b: list(b) == list(range(len(b))))
    ).all()
    # no imputation in the ETL output: a value is missing until it is first measured
    assert frame[list(STATE_NAMES)].isna().any().any()
    assert not (data_dir / "preprocessor").exists()


def test_sequences_cover_every_bin_and_batches_every_start(data_dir: Path) -> None:
    dm = BinsDataModule(data_dir, batch_size=4)
    dm.setup("fit")
    frame = pd.read_parquet(data_dir / "bins.parquet")
    for split in ("train", "val", "test"):
        seqs = dm.sequences[split]
        assert sum(len(s) for s in seqs.state) == (frame["split"] == split).sum()
        assert all(np.isfinite(x).all() for x in seqs.inputs)  # imputed, scaled
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape[-1] == 2 * N_STATE + 3
    starts = sum(int((b["lengths"] - 1).sum()) for b in dm.train_dataloader())
    assert starts == dm.sequences["train"].n_transitions  # every transition once per epoch


def test_preprocessing_is_fitted_on_the_training_patients_only(data_dir: Path, tmp_path: Path):
    """Changing held-out patients' values leaves the fitted imputer and scaler unchanged."""
    dm = BinsDataModule(data_dir)
    dm.setup("fit")
    changed = tmp_path / "changed"
    shutil.copytree(data_dir, changed)
    frame = pd.read_parquet(changed / "bins.parquet")
    held_out = frame["split"] != "train"
    frame.loc[held_out, "heart_rate"] = 250.0
    frame.loc[held_out, "heart_rate_observed"] = 1.0
    frame.to_parquet(changed / "bins.parquet")
    dm2 = BinsDataModule(changed)
    dm2.setup("fit")
    assert dm.preprocessor.to_dict() == dm2.preprocessor.to_dict()
    n_train_bins = int((frame["split"] == "train").sum())
    assert dm.preprocessor.meta["n_train_rows"] == n_train_bins
    # ...while changing a training patient's values does change it
    frame.loc[frame["split"] == "train", "heart_rate"] = 40.0
    frame.to_parquet(changed / "bins.parquet")
    dm3 = BinsDataModule(changed)
    dm3.setup("fit")
    assert dm3.preprocessor.to_dict() != dm.preprocessor.to_dict()


@pytest.mark.parametrize("pool", ["all", "development"])
def test_folds_partition_patients(data_dir: Path, pool: str) -> None:
    stays = _stays(data_dir)
    folds = 4
    tested = []
    for fold in range(folds):
        p = fold_partition(stays, folds, fold, seed=3, pool=pool)
        parts = [set(stays.subject_ids[idx]) for idx in (p.train, p.val, p.test)]
        assert all(parts), "every part has patients"
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        tested += list(p.test)
        if pool == "development":
            assert not (stays.split[np.r_[p.train, p.val, p.test]] == "test").any()
    pool_idx = np.arange(len(stays)) if pool == "all" else np.flatnonzero(stays.split != "test")
    assert sorted(tested) == list(pool_idx)  # each stay of the pool is tested exactly once
    again = fold_partition(stays, folds, 1, seed=3, pool=pool)
    assert np.array_equal(again.test, fold_partition(stays, folds, 1, seed=3, pool=pool).test)
    other = fold_partition(stays, folds, 1, seed=4, pool=pool)
    assert not np.array_equal(other.test, again.test)


def test_holdout_partition_is_the_etl_split(data_dir: Path) -> None:
    stays = _stays(data_dir)
    p = holdout_partition(stays)
    for name in ("train", "val", "test"):
        assert (stays.split[getattr(p, name)] == name).all()


def test_bad_fold_settings_are_clear_errors(data_dir: Path) -> None:
    stays = _stays(data_dir)
    with pytest.raises(DataError, match="--folds must be in 2"):
        fold_partition(stays, 1000, 0)
    with pytest.raises(DataError, match="fold must be in 0..4"):
        fold_partition(stays, 5, 5)


def test_contract_errors_name_the_problem(data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    frame = pd.read_parquet(bad / "bins.parquet")
    frame.drop(columns=["lactate"]).to_parquet(bad / "bins.parquet")
    with pytest.raises(DataError, match="missing columns.*lactate"):
        load_bins(bad)
    frame.assign(split=np.where(frame["split"] == "val", "valid", frame["split"])).to_parquet(
        bad / "bins.parquet"
    )
    with pytest.raises(DataError, match="split.*valid"):
        load_bins(bad)
    frame.assign(heart_rate=np.inf).to_parquet(bad / "bins.parquet")
    with pytest.raises(DataError, match="infinite values.*heart_rate"):
        load_bins(bad)
    frame.assign(bin=frame["bin"] + 1).to_parquet(bad / "bins.parquet")
    with pytest.raises(DataError, match="contiguous"):
        load_bins(bad)
    (bad / "bins.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_bins(bad)
    with pytest.raises(DataError, match="not found"):
        load_bins(tmp_path / "absent")


def test_train_config_carries_every_architecture_field_with_its_default() -> None:
    from training.config import TrainConfig
    from training.models import ModelConfig

    arch = {k for k in ModelConfig.__dataclass_fields__ if k != "extra"}
    assert arch <= set(TrainConfig.model_fields)
    assert TrainConfig().model_cfg() == ModelConfig(model="cfc")


def test_presets_fill_unset_fields_and_explicit_values_win(monkeypatch) -> None:
    from training.config import TrainConfig

    paper = TrainConfig(preset="paper")
    assert (paper.objective, paper.epochs, paper.batch_size) == ("teacher_forced", 30, 64)
    assert not paper.measured_only
    assert TrainConfig(preset="paper", epochs=7).epochs == 7
    monkeypatch.setenv("ICU_TRAIN_BATCH_SIZE", "8")
    assert TrainConfig(preset="paper").batch_size == 8  # env beats the preset
    default = TrainConfig()
    assert (default.objective, default.measured_only) == ("closed_loop", True)


def test_padding_never_changes_a_stays_batch_items(data_dir: Path) -> None:
    from training.data import pad_collate

    dm = BinsDataModule(data_dir)
    dm.setup("fit")
    a, b = (torch.from_numpy(x) for x in dm.sequences["train"].inputs[:2])
    batch = pad_collate([a, b])
    assert torch.equal(batch["x"][0, : len(a)], a)
    assert torch.equal(batch["x"][1, : len(b)], b)
    assert batch["lengths"].tolist() == [len(a), len(b)]
