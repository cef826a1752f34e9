"""The 70/15/15 split by subject: disjoint, seeded, reproducible."""

from __future__ import annotations

from collections import Counter

from pipeline.etl.split import split_subjects


def test_split_fractions_and_reproducible() -> None:
    ids = list(range(1000, 1200))
    a = split_subjects(ids, 0.7, 0.15, seed=3)
    assert set(a) == set(ids)
    assert Counter(a.values()) == {"train": 140, "val": 30, "test": 30}
    assert split_subjects(reversed(ids), 0.7, 0.15, seed=3) == a  # order does not matter
    assert split_subjects(ids, 0.7, 0.15, seed=4) != a  # the seed does


def test_small_cohort_keeps_every_split() -> None:
    got = split_subjects([5, 6, 7], 0.7, 0.15, seed=0)
    assert sorted(got.values()) == ["test", "train", "val"]
