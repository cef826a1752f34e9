"""bins.parquet -> patients split for training -> fitted preprocessing -> padded stay batches.

The imputer and scaler are fitted on the training patients of the partition only, and every
stay is prepared through :func:`prepare_inputs`, the function the service runs on a POSTed
history (docs/training.md, "Which patients train, validate and test").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from features.catalog import INTERVENTION_NAMES, N_STATE, OBSERVED_NAMES, STATE_NAMES
from features.checksum import sha256_file
from features.errors import UserError
from features.preprocess import FEATURE_NAMES, Preprocessor, group_starts, prepare_arrays

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = (
    "subject_id",
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
class Stays:
    """Every stay of an ETL output as raw arrays, in (icustay_id) order.

    ``raw_state[i]`` (n_i, 18): the bin means that were measured, NaN elsewhere (what a client
    POSTs); ``interventions[i]`` (n_i, 3) physical units.
    """

    stay_ids: np.ndarray
    subject_ids: np.ndarray
    split: np.ndarray  # the ETL's holdout label of each stay
    raw_state: list[np.ndarray]
    interventions: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.stay_ids)


@dataclass
class StaySequences(Stays):
    """The stays of one part (train / val / test), with their model-ready arrays.

    ``inputs[i]`` (n_i, 39): scaled state, observed mask, scaled interventions; ``state[i]``
    (n_i, 18) scaled filled state; ``physical[i]`` the same in physical units.
    """

    inputs: list[np.ndarray]
    state: list[np.ndarray]
    physical: list[np.ndarray]

    @property
    def n_transitions(self) -> int:
        return int(sum(max(len(s) - 1, 0) for s in self.state))


def load_bins(data_dir: Path) -> tuple[pd.DataFrame, dict]:
    """Read and check an ETL output folder: the bins frame (sorted) and the data card."""
    data_dir = Path(data_dir)
    bins_path = data_dir / "bins.parquet"
    if not bins_path.is_file():
        raise DataError(f"{bins_path}: not found (run `icu-forecast etl` first or pass --data)")
    try:
        frame = pd.read_parquet(bins_path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{bins_path}: not a readable parquet file ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{bins_path}: missing columns {missing}")
    bad_split = sorted(set(frame["split"].astype(str)) - set(SPLITS))
    if bad_split:
        raise DataError(f"{bins_path}: column 'split' has unknown values {bad_split}")
    for col in (*STATE_NAMES, *INTERVENTION_NAMES, *OBSERVED_NAMES):
        if not pd.api.types.is_numeric_dtype(frame[col]):
            raise DataError(f"{bins_path}: column {col!r} is not numeric ({frame[col].dtype})")
    bad = [c for c in FEATURE_NAMES if np.isinf(frame[c].to_numpy(np.float64)).any()]
    if bad:
        raise DataError(f"{bins_path}: infinite values in {bad}")
    frame = frame.sort_values(["icustay_id", "bin"], kind="stable").reset_index(drop=True)
    # Sorted by bin, each stay's bins must be its row ranks 0..n-1.
    if (frame["bin"].to_numpy() != frame.groupby("icustay_id").cumcount().to_numpy()).any():
        raise DataError(f"{bins_path}: bins are not contiguous 0..n-1 within every stay")
    card_path = data_dir / "data_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card.setdefault("bins_sha256", sha256_file(bins_path))
    return frame, card


def stays_from_frame(frame: pd.DataFrame) -> Stays:
    """Per-stay raw arrays from a sorted bins frame (measured values only)."""
    observed = frame[list(OBSERVED_NAMES)].to_numpy(np.float64) > 0
    raw = np.where(observed, frame[list(STATE_NAMES)].to_numpy(np.float64), np.nan)
    iv = frame[list(INTERVENTION_NAMES)].to_numpy(np.float64)
    ids = frame["icustay_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)
    bounds = list(zip(starts, np.r_[starts[1:], len(ids)], strict=True))
    return Stays(
        stay_ids=ids[starts],
        subject_ids=frame["subject_id"].to_numpy()[starts],
        split=frame["split"].astype(str).to_numpy()[starts],
        raw_state=[raw[a:b] for a, b in bounds],
        interventions=[iv[a:b] for a, b in bounds],
    )


def prepare_inputs(
    pre: Preprocessor, raw_state: np.ndarray, interventions: np.ndarray, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Raw rows (stays concatenated, ``starts`` = first row of each row's stay) -> model inputs.

    Clamp, observed masks, forward-fill within each stay, zero-filled interventions, row-wise
    imputation and min-max scaling. Returns the inputs (n, 39) in the model convention
    (docs/architecture.md: scaled state, observed mask, scaled interventions) and the filled
    state (n, 18) in physical units. Training, evaluation and the service all call this.
    """
    prepared = prepare_arrays(raw_state, interventions, starts)
    filled = pre.impute(np.hstack([prepared.state, prepared.interventions]))
    state = filled[:, :N_STATE]
    ivs = pre.scale_interventions(filled[:, N_STATE:])
    x = np.concatenate([pre.scale_state(state), prepared.observed, ivs], axis=-1)
    return x.astype(np.float32), state


def pad(arrays: list[np.ndarray], fill: float = np.nan) -> np.ndarray:
    """Right-pad (n_i, v) arrays to (B, max n_i, v) with ``fill``."""
    out = np.full((len(arrays), max(map(len, arrays)), arrays[0].shape[1]), fill)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


def _concat(stays: Stays, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raw rows of the (at least one) stays ``idx``, concatenated, and each row's stay start."""
    raw = [stays.raw_state[i] for i in idx]
    iv = [stays.interventions[i] for i in idx]
    starts = group_starts(np.repeat(np.arange(len(raw)), [len(r) for r in raw]))
    return np.concatenate(raw), np.concatenate(iv), starts


def fit_preprocessor(stays: Stays, train_idx: np.ndarray, seed: int = 0) -> Preprocessor:
    """Imputer + scaler fitted on the prepared bins of the stays ``train_idx`` only."""
    if len(train_idx) == 0:
        raise DataError("cannot fit the preprocessor: no training bins")
    prepared = prepare_arrays(*_concat(stays, np.asarray(train_idx)))
    table = pd.DataFrame(
        np.hstack([prepared.state, prepared.interventions]), columns=list(FEATURE_NAMES)
    )
    pre, _ = Preprocessor.fit(table, seed=seed)
    return pre


def build_sequences(stays: Stays, idx: np.ndarray, pre: Preprocessor) -> StaySequences:
    """Model-ready arrays of the stays ``idx`` under the fitted preprocessor ``pre``."""
    idx = np.asarray(idx, dtype=np.int64)
    inputs, state, physical = [], [], []
    if len(idx):
        x, filled = prepare_inputs(pre, *_concat(stays, idx))
        cuts = np.cumsum([len(stays.raw_state[i]) for i in idx])[:-1]
        scaled = pre.scale_state(filled).astype(np.float32)
        inputs, state, physical = (np.split(a, cuts) for a in (x, scaled, filled))
    return StaySequences(
        stay_ids=stays.stay_ids[idx],
        subject_ids=stays.subject_ids[idx],
        split=stays.split[idx],
        inputs=inputs,
        state=state,
        physical=physical,
        raw_state=[stays.raw_state[i] for i in idx],
        interventions=[stays.interventions[i] for i in idx],
    )


@dataclass(frozen=True)
class Partition:
    """Which stays train, validate (early stopping, model choice) and test."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    name: str = "holdout"


def holdout_partition(stays: Stays) -> Partition:
    """The ETL's seeded 70/15/15 split by patient."""
    return Partition(*(np.flatnonzero(stays.split == s) for s in SPLITS))


CV_POOLS = ("all", "development")


def fold_partition(
    stays: Stays,
    folds: int,
    fold: int,
    seed: int = 0,
    val_frac: float = 0.15,
    pool: str = "all",
) -> Partition:
    """Fold ``fold`` of a seeded patient-grouped ``folds``-fold cross-validation.

    ``pool="all"``: over every stay (the evaluation protocol). ``pool="development"``: over the
    ETL's train and val patients only, so the holdout test patients never influence a choice
    (hyperparameter and default selection). Test: the patients of that fold. Validation: a
    seeded ``val_frac`` of the remaining patients (early stopping and checkpoint choice).
    Train: the rest. No patient is in two parts.
    """
    from sklearn.model_selection import GroupKFold

    if pool not in CV_POOLS:
        raise DataError(f"cv pool must be one of {CV_POOLS}, got {pool!r}")
    members = np.arange(len(stays)) if pool == "all" else np.flatnonzero(stays.split != "test")
    groups = stays.subject_ids[members]
    if not 2 <= folds <= len(np.unique(groups)):
        raise DataError(f"--folds must be in 2..{len(np.unique(groups))}, got {folds}")
    if not 0 <= fold < folds:
        raise DataError(f"fold must be in 0..{folds - 1}, got {fold}")
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    rest, test = list(splitter.split(np.zeros(len(members)), groups=groups))[fold]
    rest, test = members[rest], members[test]
    subjects = np.unique(stays.subject_ids[rest])
    rng = np.random.default_rng([seed, fold])
    n_val = max(1, round(val_frac * len(subjects)))
    val_subjects = rng.choice(subjects, size=n_val, replace=False)
    is_val = np.isin(stays.subject_ids[rest], val_subjects)
    return Partition(
        np.sort(rest[~is_val]),
        np.sort(rest[is_val]),
        np.sort(test),
        f"{pool}-fold{fold}of{folds}-seed{seed}",
    )


def stay_items(seqs: StaySequences) -> list[torch.Tensor]:
    """The dataset: the (n, 39) inputs of each stay with at least two bins.

    Targets are read from the inputs themselves (the state and observed mask of the next bins),
    so one item serves the one-step and the closed-loop objectives. A single-bin stay has no
    next bin and therefore no target.
    """
    return [torch.from_numpy(x) for x in seqs.inputs if len(x) >= 2]


def pad_collate(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad stays to the longest with zeros; ``lengths`` = real bins (recurrent models are
    causal, so padding after a stay's end cannot affect its earlier predictions)."""
    lengths = torch.tensor([len(x) for x in batch])
    return {"x": pad_sequence(batch, batch_first=True), "lengths": lengths}


class BinsDataModule(L.LightningDataModule):
    """Train / val / test stays of an ETL output, preprocessing fitted on the training stays.

    ``folds=None`` uses the ETL's holdout split; ``folds=k, fold=i`` fold i of a seeded
    patient-grouped k-fold cross-validation (``cv_seed``).
    """

    def __init__(
        self,
        data_dir: Path | str,
        batch_size: int = 64,
        num_workers: int = 0,
        folds: int | None = None,
        fold: int = 0,
        cv_seed: int = 0,
        cv_pool: str = "all",
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.folds, self.fold, self.cv_seed, self.cv_pool = folds, fold, cv_seed, cv_pool
        self.preprocessor: Preprocessor | None = None
        self.sequences: dict[str, StaySequences] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.preprocessor is not None:  # Lightning calls setup per stage; fit once
            return
        frame, self.card = load_bins(self.data_dir)
        self.stays = stays_from_frame(frame)
        if self.folds:
            self.partition = fold_partition(
                self.stays, self.folds, self.fold, self.cv_seed, pool=self.cv_pool
            )
        else:
            self.partition = holdout_partition(self.stays)
        self.preprocessor = fit_preprocessor(self.stays, self.partition.train, seed=self.cv_seed)
        self.preprocessor.meta["partition"] = self.partition.name
        self.sequences = {
            s: build_sequences(self.stays, getattr(self.partition, s), self.preprocessor)
            for s in SPLITS
        }
        for s in ("train", "val"):
            if not stay_items(self.sequences[s]):
                raise DataError(f"{self.data_dir}: split {s!r} has no stay with two or more bins")

    @property
    def checksum(self) -> str:
        return str(self.card["bins_sha256"])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            stay_items(self.sequences[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=pad_collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)
