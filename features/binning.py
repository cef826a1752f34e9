"""Assign events to 12-hour bins from ICU intime and aggregate them per bin.

One definition: the SQL builders below, which the ETL runs in DuckDB over millions of events
and the service runs in an in-memory DuckDB on one patient's POSTed events. The rules:

- ``bin = floor((t - intime) / 12 h)``; bin 0 is ``[intime, intime + 12 h)``.
- State variables: the mean of the values in the bin. Values charted up to
  ``LAB_WINDOW_HOURS`` before intime count for bin 0 (admission labs and vitals are often charted
  just before the ICU transfer is recorded); earlier ones, and ones after outtime, are dropped.
- Coverage interventions (vasopressor, mechanical ventilation): the union of the intervals
  during which they ran, clipped to ``[intime, outtime]``; the value is the covered share of
  the bin's 12 hours (0..1). Overlapping intervals (two vasopressors at once) count once.
- Volume interventions (IV fluids): an amount given over ``[start, end)`` is spread uniformly
  over that time and the part inside each bin is summed (mL); an amount without duration counts
  in the bin of its start. Parts outside ``[intime, outtime]`` are dropped.

Aggregates are rounded to 6 decimals so that results do not depend on summation order (DuckDB
sums in parallel), which keeps ETL outputs byte-identical across reruns.

Long results have the columns ``icustay_id, bin, variable, value``; stays tables ``icustay_id,
intime, outtime`` (``outtime`` may be missing: then there is no upper cut-off, as for a
patient still in the ICU).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from features.catalog import (
    BIN_HOURS,
    INTERVENTION_BY_NAME,
    INTERVENTION_NAMES,
    LAB_WINDOW_HOURS,
    STATE_NAMES,
)

BIN_US = BIN_HOURS * 3600 * 1_000_000
PRE_INTIME_HOURS = LAB_WINDOW_HOURS
"""State values charted this long before intime still count (for bin 0)."""
ROUND_DECIMALS = 6


def bin_patient_events(
    events: list[Mapping], icu_intime: pd.Timestamp, n_bins: int | None = None
) -> pd.DataFrame:
    """Bin one patient's events with the ETL's SQL, in an in-memory DuckDB.

    ``events`` (validated by the caller: catalog names, canonical units, state values inside
    their drop range) hold ``time``, ``variable`` and ``value``, and ``end_time`` for an
    interval: a coverage intervention ran over ``[time, end_time)``; a volume with
    ``end_time`` is spread over ``[time, end_time)``, otherwise it counts at ``time``. Times
    are naive UTC, like ``icu_intime``.

    Returns one row per bin ``0 .. n_bins - 1`` (default: up to the last bin holding an event)
    with ``bin``, ``bin_start``, the 18 state variables and 3 interventions in canonical units,
    NaN where nothing was charted (interventions too: :func:`features.preprocess.prepare_bins`
    zero-fills them).
    """
    raw = pd.DataFrame(list(events), columns=["time", "variable", "value", "end_time"])
    time, value = pd.to_datetime(raw["time"]), raw["value"].astype(np.float64)
    # One frame with the columns of all three SQL inputs (each reads the ones it names).
    frame = pd.DataFrame(
        {"icustay_id": 0, "variable": raw["variable"], "time": time, "start": time}
        | {"end": pd.to_datetime(raw["end_time"]), "value": value, "amount": value}
    )
    variable = frame["variable"]
    coverage = variable.isin(
        [n for n in INTERVENTION_NAMES if INTERVENTION_BY_NAME[n].kind == "coverage"]
    )
    tables = {
        "events": frame[variable.isin(STATE_NAMES)],
        "intervals": frame[coverage & (value > 0)],
        "doses": frame[variable.isin(INTERVENTION_NAMES) & ~coverage],
        "stays": pd.DataFrame({"icustay_id": [0], "intime": [icu_intime], "outtime": [pd.NaT]}),
    }
    # A connection of its own (closed on exit): the tables below are its own.
    with _patient_db().cursor() as con:
        for name, table in tables.items():
            con.register(name, table)
        wide = con.execute(wide_bins_sql(*tables)).df()
    if n_bins is None:
        n_bins = int(wide["bin"].max()) + 1 if len(wide) else 0
    # One row per bin of the history; aggregates of bins beyond it are ignored.
    out = pd.DataFrame({"bin": np.arange(n_bins)}).merge(
        wide.drop(columns=["icustay_id"]), on="bin", how="left"
    )
    out.insert(1, "bin_start", icu_intime + pd.to_timedelta(out["bin"] * BIN_HOURS, unit="h"))
    return out.astype({"bin": "int32"})


@functools.cache
def _patient_db() -> Any:
    """One in-memory DuckDB for the service's per-request binning (a cursor per request).

    One thread: a request's few events gain nothing from more, and the cores serve requests.
    """
    import duckdb

    return duckdb.connect(config={"threads": 1})


# Sums run in exact arithmetic (fixed-point decimals, integer microseconds): DuckDB adds in
# parallel in a varying order, and with floating point the last bits, and now and then a value
# rounded to ROUND_DECIMALS, changed between runs on large inputs. Exact sums make reruns
# byte-identical. 10 decimals keep sub-ROUND_DECIMALS detail; 38 digits hold any clinical sum.
_EXACT = "DECIMAL(38, 10)"


def state_bins_sql(events: str, stays: str) -> str:
    """DuckDB SQL: per (stay, bin, variable) mean of ``events(icustay_id, time, variable, value)``.

    ``stays(icustay_id, intime, outtime)``. The state rule of the module docstring.
    """
    pre_us = PRE_INTIME_HOURS * 3600 * 1_000_000
    return f"""
    SELECT e.icustay_id::BIGINT AS icustay_id,
           greatest(0, floor((epoch_us(e.time) - epoch_us(s.intime)) / {BIN_US}))::INTEGER AS bin,
           e.variable,
           round(avg(e.value::{_EXACT}), {ROUND_DECIMALS})::DOUBLE AS value,
           count(*) AS n
    FROM {events} e JOIN {stays} s ON e.icustay_id = s.icustay_id
    WHERE e.value IS NOT NULL
      AND epoch_us(e.time) >= epoch_us(s.intime) - {pre_us}
      AND (s.outtime IS NULL OR e.time <= s.outtime)
    GROUP BY ALL
    """


def _bins_of(src: str, st: str, en: str) -> str:
    """Rows of ``src`` (with ``intime_us``) expanded to the bins ``[st, en)`` touches."""
    return f"""
    SELECT *, {BIN_US}::BIGINT * bin + intime_us AS bin_start_us
    FROM (
        SELECT *, unnest(range(
            floor(({st} - intime_us) / {BIN_US})::BIGINT,
            ceil(({en} - intime_us) / {BIN_US})::BIGINT)) AS bin
        FROM {src}
    )
    """


def coverage_bins_sql(intervals: str, stays: str) -> str:
    """DuckDB SQL: covered share per (stay, bin, variable) of
    ``intervals(icustay_id, variable, start, end)``. The coverage rule of the module docstring.
    """
    return f"""
    WITH clipped AS (
        SELECT i.icustay_id::BIGINT AS icustay_id, i.variable,
               epoch_us(s.intime) AS intime_us,
               greatest(epoch_us(i.start), epoch_us(s.intime)) AS st,
               least(epoch_us(i."end"), coalesce(epoch_us(s.outtime), epoch_us(i."end"))) AS en
        FROM {intervals} i JOIN {stays} s ON i.icustay_id = s.icustay_id
        WHERE i.start IS NOT NULL AND i."end" IS NOT NULL
    ), ordered AS (
        SELECT *, max(en) OVER (
            PARTITION BY icustay_id, variable ORDER BY st, en
            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end
        FROM clipped WHERE en > st
    ), islands AS (
        SELECT *, sum(CASE WHEN prev_end IS NULL OR st > prev_end THEN 1 ELSE 0 END) OVER (
            PARTITION BY icustay_id, variable ORDER BY st, en
            ROWS UNBOUNDED PRECEDING) AS island
        FROM ordered
    ), merged AS (
        SELECT icustay_id, variable, island, min(st) AS st, max(en) AS en,
               any_value(intime_us) AS intime_us
        FROM islands GROUP BY icustay_id, variable, island
    ), parts AS (
        SELECT icustay_id, bin, variable,
               least(en, bin_start_us + {BIN_US}) - greatest(st, bin_start_us) AS overlap
        FROM ({_bins_of("merged", "st", "en")})
    )
    SELECT icustay_id, bin::INTEGER AS bin, variable,
           round(sum(overlap) / {BIN_US}, {ROUND_DECIMALS})::DOUBLE AS value
    FROM parts WHERE overlap > 0
    GROUP BY ALL
    """


def volume_bins_sql(doses: str, stays: str) -> str:
    """DuckDB SQL: amount per (stay, bin, variable) of
    ``doses(icustay_id, variable, start, end, amount)``. The volume rule of the module docstring.
    """
    return f"""
    WITH d AS (
        SELECT i.icustay_id::BIGINT AS icustay_id, i.variable, i.amount::DOUBLE AS amount,
               epoch_us(s.intime) AS intime_us,
               coalesce(epoch_us(s.outtime), 9223372036854775807) AS outtime_us,
               epoch_us(i.start) AS st,
               coalesce(epoch_us(i."end"), epoch_us(i.start)) AS en
        FROM {doses} i JOIN {stays} s ON i.icustay_id = s.icustay_id
        WHERE i.amount IS NOT NULL AND i.start IS NOT NULL
    ), points AS (
        SELECT icustay_id, floor((st - intime_us) / {BIN_US})::BIGINT AS bin, variable,
               amount AS part
        FROM d WHERE en <= st AND st >= intime_us AND st <= outtime_us
    ), spread AS (
        SELECT *, amount / ((en - st) / 1e6) AS rate,
               greatest(st, intime_us) AS cst, least(en, outtime_us) AS cen
        FROM d WHERE en > st
    ), parts AS (
        SELECT icustay_id, bin, variable, rate,
               least(cen, bin_start_us + {BIN_US}) - greatest(cst, bin_start_us) AS overlap
        FROM ({_bins_of("spread", "cst", "cen")})
    )
    SELECT icustay_id, bin::INTEGER AS bin, variable,
           -- Capped so that a garbage amount cannot overflow the decimal (the clamp to the
           -- intervention's range comes later and is far below the cap).
           round(sum(least(part, 1e20)::{_EXACT}), {ROUND_DECIMALS})::DOUBLE AS value
    FROM (
        SELECT icustay_id, bin, variable, part FROM points
        UNION ALL
        SELECT icustay_id, bin, variable, rate * overlap / 1e6 FROM parts WHERE overlap > 0
    )
    GROUP BY ALL
    """


def wide_bins_sql(events: str, intervals: str, doses: str, stays: str) -> str:
    """DuckDB SQL: one row per (stay, bin) that has any aggregate, a column per catalog variable
    (NULL where absent), from the three aggregates above.

    The pivot runs in DuckDB so that only the wide rows (one per bin, not one per bin and
    variable) reach pandas.
    """
    columns = ",\n".join(
        f"max(value) FILTER (WHERE variable = '{n}') AS {n}"
        for n in (*STATE_NAMES, *INTERVENTION_NAMES)
    )
    return f"""
    SELECT icustay_id, bin::BIGINT AS bin, {columns}
    FROM (
        SELECT icustay_id, bin, variable, value FROM ({state_bins_sql(events, stays)})
        UNION ALL
        SELECT icustay_id, bin, variable, value FROM ({coverage_bins_sql(intervals, stays)})
        UNION ALL
        SELECT icustay_id, bin, variable, value FROM ({volume_bins_sql(doses, stays)})
    )
    GROUP BY icustay_id, bin
    ORDER BY icustay_id, bin
    """
