"""The catalog's item ids: an item measured for two variables would count its values twice."""

from __future__ import annotations

from collections import Counter

from features.catalog import STATE_VARIABLES


def test_every_item_measures_one_state_variable() -> None:
    counts = Counter(i for v in STATE_VARIABLES for i in (*v.chart_itemids, *v.lab_itemids))
    assert [i for i, n in counts.items() if n > 1] == []
