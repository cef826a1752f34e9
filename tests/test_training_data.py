"""bins.parquet -> padded, masked per-stay sequences; contract errors name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from features.catalog import N_STATE, STATE_NAMES
from tests.synthetic import write_synthetic_etl_output
from training.data import BinsDataModule, DataError, load_bins, pad_collate
from training.lit import masked_mse


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_etl_output(tmp_path_factory.mktemp("syn") / "out", n_stays=20, n_bins=6)


def test_synthetic_output_follows_the_contract(data_dir: Path) -> None:
    frame = pd.read_parquet(data_dir / "bins.parquet")
    assert set(frame["split"]) == {"train", "val", "test"}
    assert not frame[list(STATE_NAMES)].isna().any().any()
    assert frame.groupby("subject_id")["split"].nunique().max() == 1  # split by subject
    assert (
        frame.groupby("icustay_id")["bin"].apply(lambda b: list(b) == list(range(len(b))))
    ).all()
    assert (data_dir / "preprocessor" / "preprocessor.json").is_file()
    assert (data_dir / "data_card.json").is_file()


def test_sequences_cover_every_bin_and_targets_are_next_bins(data_dir: Path) -> None:
    dm = BinsDataModule(data_dir, batch_size=4)
    frame = pd.read_parquet(data_dir / "bins.parquet")
    for split in ("train", "val", "test"):
        seqs = dm.sequences[split]
        assert sum(len(s) for s in seqs.state) == (frame["split"] == split).sum()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape[-1] == 2 * N_STATE + 3
    lengths = batch["lengths"]
    assert torch.equal(batch["mask"].sum(1).long(), lengths)
    seqs = dm.sequences["train"]
    total = sum(int(b["mask"].sum()) for b in dm.train_dataloader())
    assert total == seqs.n_transitions  # every transition is used exactly once per epoch
    # inputs at t and targets at t+1 of one stay
    x0 = torch.from_numpy(seqs.inputs[0])
    y0 = torch.from_numpy(seqs.state[0])
    single = pad_collate([(x0[:-1], y0[1:])])
    assert torch.equal(single["y"][0], y0[1:])
    assert torch.equal(single["x"][0, :, :N_STATE], x0[:-1, :N_STATE])


def test_masked_mse_ignores_padding() -> None:
    pred = torch.zeros(2, 3, N_STATE)
    target = torch.ones(2, 3, N_STATE)
    target[1, 2] = 100.0  # padding: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float32)
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)


def test_missing_column_and_bad_split_are_clear_errors(data_dir: Path, tmp_path: Path) -> None:
    import shutil

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
    with pytest.raises(DataError, match="not found"):
        load_bins(tmp_path / "absent")


def test_train_config_carries_every_architecture_field_with_its_default() -> None:
    from training.config import TrainConfig
    from training.models import ModelConfig

    arch = {k for k in ModelConfig.__dataclass_fields__ if k != "extra"}
    assert arch <= set(TrainConfig.model_fields)
    assert TrainConfig().model_cfg() == ModelConfig(model="cfc")
