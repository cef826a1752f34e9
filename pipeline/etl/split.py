"""The train / val / test split by subject: a patient's stays never straddle two splits."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def split_subjects(
    subject_ids: Iterable[int], train_frac: float, val_frac: float, seed: int
) -> dict[int, str]:
    """Map each subject to ``train`` / ``val`` / ``test``: a seeded shuffle of the sorted ids.

    The result depends only on the set of ids and the seed (not on their order).
    """
    ids = np.unique(np.asarray(list(subject_ids), dtype=np.int64))
    order = np.random.default_rng(seed).permutation(len(ids))
    n = len(ids)
    n_train = int(round(train_frac * n))
    n_val = int(round(val_frac * n))
    if n >= 3:  # keep every split non-empty when there are enough subjects
        n_train = min(max(n_train, 1), n - 2)
        n_val = min(max(n_val, 1), n - n_train - 1)
    labels = np.empty(n, dtype=object)
    labels[order[:n_train]] = "train"
    labels[order[n_train : n_train + n_val]] = "val"
    labels[order[n_train + n_val :]] = "test"
    return {int(s): str(lab) for s, lab in zip(ids, labels, strict=True)}
