"""bins.parquet -> per-stay sequences of model inputs and next-bin targets, padded and masked."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from features.catalog import INTERVENTION_NAMES, N_STATE, OBSERVED_NAMES, STATE_NAMES
from features.errors import UserError
from features.preprocess import FEATURE_NAMES, Preprocessor

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = (
    "icustay_id",
    "bin",
    "split",
    *STATE_NAMES,
    *INTERVENTION_NAMES,
    *OBSERVED_NAMES,
)


class DataError(UserError):
    """An ETL output folder that does not follow the bins.parquet contract."""


@dataclass
class StaySequences:
    """The stays of one split as arrays, one entry per stay, in (icustay_id) order.

    ``inputs[i]`` is (n_i, 39) model inputs for every bin of stay i (scaled state, observed mask,
    scaled interventions); ``state[i]`` is (n_i, 18) scaled state; ``physical[i]`` the same in
    physical units; ``raw_state[i]`` the state with NaN where not observed (what a client sends).
    """

    stay_ids: np.ndarray
    inputs: list[np.ndarray]
    state: list[np.ndarray]
    physical: list[np.ndarray]
    raw_state: list[np.ndarray]
    interventions: list[np.ndarray]  # physical units

    def __len__(self) -> int:
        return len(self.stay_ids)

    @property
    def n_transitions(self) -> int:
        return int(sum(max(len(s) - 1, 0) for s in self.state))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bins(data_dir: Path) -> tuple[pd.DataFrame, Preprocessor, dict]:
    """Read and check an ETL output folder: bins frame, preprocessor, data card."""
    data_dir = Path(data_dir)
    bins_path = data_dir / "bins.parquet"
    if not bins_path.is_file():
        raise DataError(f"{bins_path}: not found (run `icu-forecast etl` first or pass --data)")
    frame = pd.read_parquet(bins_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{bins_path}: missing columns {missing}")
    bad_split = sorted(set(frame["split"].astype(str)) - set(SPLITS))
    if bad_split:
        raise DataError(f"{bins_path}: column 'split' has unknown values {bad_split}")
    nan_cols = [c for c in FEATURE_NAMES if frame[c].isna().any()]
    if nan_cols:
        raise DataError(f"{bins_path}: missing values in {nan_cols} (the ETL imputes them all)")
    frame = frame.sort_values(["icustay_id", "bin"], kind="stable").reset_index(drop=True)
    bins = frame["bin"].to_numpy()
    first = frame.groupby("icustay_id")["bin"].transform("min").to_numpy()
    rank = frame.groupby("icustay_id").cumcount().to_numpy()
    if (first != 0).any() or (bins != rank).any():
        raise DataError(f"{bins_path}: bins are not contiguous 0..n-1 within every stay")
    pre = Preprocessor.load(data_dir / "preprocessor")
    card_path = data_dir / "data_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card.setdefault("bins_sha256", file_sha256(bins_path))
    return frame, pre, card


def model_inputs(
    state_scaled: np.ndarray, observed: np.ndarray, iv_scaled: np.ndarray
) -> np.ndarray:
    """The 39 model features at each bin (docs/architecture.md, model convention)."""
    return np.concatenate([state_scaled, observed, iv_scaled], axis=-1).astype(np.float32)


def split_sequences(frame: pd.DataFrame, pre: Preprocessor, split: str) -> StaySequences:
    part = frame[frame["split"].astype(str) == split]
    physical = part[list(STATE_NAMES)].to_numpy(np.float64)
    iv = part[list(INTERVENTION_NAMES)].to_numpy(np.float64)
    observed = part[list(OBSERVED_NAMES)].to_numpy(np.float64)
    scaled = pre.scale_state(physical)
    inputs = model_inputs(scaled, observed, pre.scale_interventions(iv))
    raw = np.where(observed > 0, physical, np.nan)
    ids = part["icustay_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)
    bounds = list(zip(starts, np.r_[starts[1:], len(ids)], strict=True))
    return StaySequences(
        stay_ids=ids[starts],
        inputs=[inputs[a:b] for a, b in bounds],
        state=[scaled[a:b].astype(np.float32) for a, b in bounds],
        physical=[physical[a:b] for a, b in bounds],
        raw_state=[raw[a:b] for a, b in bounds],
        interventions=[iv[a:b] for a, b in bounds],
    )


class TransitionDataset(Dataset):
    """One item per stay with at least two bins: inputs at 0..n-2, targets at 1..n-1.

    A single-bin stay has no next bin, so it holds no training target (it is still used as
    history nowhere else either); nothing else is dropped.
    """

    def __init__(self, seqs: StaySequences) -> None:
        self.items = [
            (torch.from_numpy(x[:-1]), torch.from_numpy(s[1:]))
            for x, s in zip(seqs.inputs, seqs.state, strict=True)
            if len(s) >= 2
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest stay; ``mask`` is 1 on real bins (recurrent models are causal,
    so padding after a stay's end cannot affect its earlier predictions)."""
    lengths = torch.tensor([len(x) for x, _ in batch])
    t = int(lengths.max())
    x = torch.zeros(len(batch), t, batch[0][0].shape[1])
    y = torch.zeros(len(batch), t, N_STATE)
    for i, (xi, yi) in enumerate(batch):
        x[i, : len(xi)] = xi
        y[i, : len(yi)] = yi
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    return {"x": x, "y": y, "mask": mask, "lengths": lengths}


class BinsDataModule(L.LightningDataModule):
    """Train / val / test by the ETL's split column; batches of whole stays."""

    def __init__(self, data_dir: Path | str, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.frame, self.preprocessor, self.card = load_bins(self.data_dir)
        self.sequences = {s: split_sequences(self.frame, self.preprocessor, s) for s in SPLITS}
        for s in ("train", "val"):
            if TransitionDataset(self.sequences[s]).__len__() == 0:
                raise DataError(f"{self.data_dir}: split {s!r} has no stay with two or more bins")

    @property
    def checksum(self) -> str:
        return str(self.card["bins_sha256"])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            TransitionDataset(self.sequences[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=pad_collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
