"""Assign events to 12-hour bins from ICU intime and aggregate them per bin.

One definition, two engines: the ETL runs the SQL builders below in DuckDB over millions of
events; the service runs the pandas functions on one patient's POSTed events. Both implement
the same rules (``tests/test_features_binning.py`` runs both on the same events):

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

Long frames use the columns ``icustay_id, bin, variable, value``; stays frames ``icustay_id,
intime, outtime`` (``outtime`` may be missing: then there is no upper cut-off, as for a
patient still in the ICU).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from features.catalog import (
    BIN_HOURS,
    INTERVENTION_BY_NAME,
    INTERVENTION_NAMES,
    LAB_WINDOW_HOURS,
    STATE_BY_NAME,
    STATE_NAMES,
)

BIN_SECONDS = BIN_HOURS * 3600
BIN_US = BIN_SECONDS * 1_000_000
PRE_INTIME_HOURS = LAB_WINDOW_HOURS
"""State values charted this long before intime still count (for bin 0)."""
ROUND_DECIMALS = 6

LONG_COLUMNS = ("icustay_id", "bin", "variable", "value")


# ---------------------------------------------------------------------------- pandas path
def _us(times: pd.Series | pd.Index) -> np.ndarray:
    """Timestamps as int64 microseconds since the epoch (the resolution DuckDB uses)."""
    return pd.to_datetime(pd.Series(times)).astype("datetime64[us]").to_numpy().view(np.int64)


def _stay_columns(frame: pd.DataFrame, stays: pd.DataFrame) -> pd.DataFrame:
    s = stays[["icustay_id", "intime", "outtime"]]
    out = frame.merge(s, on="icustay_id", how="inner")
    out["_in"] = _us(out["intime"])
    outtime = pd.to_datetime(out["outtime"])
    out["_out"] = np.where(
        outtime.isna(), np.iinfo(np.int64).max, _us(outtime.fillna(pd.Timestamp(0)))
    )
    return out


def _empty_long() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "icustay_id": pd.Series(dtype="int64"),
            "bin": pd.Series(dtype="int32"),
            "variable": pd.Series(dtype="object"),
            "value": pd.Series(dtype="float64"),
        }
    )


def bin_index(times: pd.Series | pd.Index, intime: pd.Timestamp) -> np.ndarray:
    """``floor((t - intime) / 12 h)`` for each time (negative before intime)."""
    delta = _us(times) - _us(pd.Series([intime]))[0]
    return np.floor_divide(delta, BIN_US).astype(np.int64)


def aggregate_state(events: pd.DataFrame, stays: pd.DataFrame) -> pd.DataFrame:
    """Mean per (stay, bin, variable) of events ``icustay_id, time, variable, value``."""
    ev = _stay_columns(events[["icustay_id", "time", "variable", "value"]], stays)
    ev = ev[ev["value"].notna()]
    t = _us(ev["time"])
    keep = (t >= ev["_in"].to_numpy() - PRE_INTIME_HOURS * 3600 * 1_000_000) & (
        t <= ev["_out"].to_numpy()
    )
    ev = ev[keep]
    if ev.empty:
        return _empty_long()
    ev = ev.assign(
        bin=np.maximum(np.floor_divide(_us(ev["time"]) - ev["_in"].to_numpy(), BIN_US), 0)
    )
    out = (
        ev.groupby(["icustay_id", "bin", "variable"], sort=True)["value"]
        .mean()
        .round(ROUND_DECIMALS)
        .reset_index()
    )
    return out.astype({"icustay_id": "int64", "bin": "int32", "value": "float64"})


def _clip_intervals(intervals: pd.DataFrame, stays: pd.DataFrame) -> pd.DataFrame:
    iv = _stay_columns(intervals, stays)
    iv = iv.assign(_st=_us(iv["start"]), _en=_us(iv["end"]))
    return iv


def _expand_to_bins(frame: pd.DataFrame, st: np.ndarray, en: np.ndarray) -> pd.DataFrame:
    """One row per (interval, bin it touches) with the seconds of overlap in ``overlap``."""
    intime = frame["_in"].to_numpy()
    b0 = np.floor_divide(st - intime, BIN_US)
    b1 = -np.floor_divide(-(en - intime), BIN_US)  # ceil: exclusive end
    n = np.maximum(b1 - b0, 0)
    rows = np.repeat(np.arange(len(frame)), n)
    offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    bins = b0[rows] + offsets
    bin_start = intime[rows] + bins * BIN_US
    overlap_us = np.minimum(en[rows], bin_start + BIN_US) - np.maximum(st[rows], bin_start)
    out = frame.iloc[rows].reset_index(drop=True)
    out["bin"] = bins
    out["overlap"] = overlap_us / 1e6
    return out[out["overlap"] > 0]


def aggregate_coverage(intervals: pd.DataFrame, stays: pd.DataFrame) -> pd.DataFrame:
    """Covered share of each bin, from intervals ``icustay_id, variable, start, end``."""
    iv = _clip_intervals(intervals[["icustay_id", "variable", "start", "end"]], stays)
    st = np.maximum(iv["_st"].to_numpy(), iv["_in"].to_numpy())
    en = np.minimum(iv["_en"].to_numpy(), iv["_out"].to_numpy())
    iv = iv.assign(_st=st, _en=en)[en > st]
    if iv.empty:
        return _empty_long()
    # Union of overlapping intervals (gaps and islands): a new island starts where an interval
    # begins after every earlier one of the same (stay, variable) has ended.
    iv = iv.sort_values(["icustay_id", "variable", "_st", "_en"], kind="stable")
    keys = ["icustay_id", "variable"]
    prev_end = (
        iv.groupby(keys, sort=False)["_en"]
        .cummax()
        .groupby([iv["icustay_id"], iv["variable"]], sort=False)
        .shift()
    )
    island = (prev_end.isna() | (iv["_st"] > prev_end)).cumsum()
    merged = (
        iv.assign(_island=island.to_numpy())
        .groupby([*keys, "_island"], sort=False)
        .agg(_st=("_st", "min"), _en=("_en", "max"), _in=("_in", "first"))
        .reset_index()
    )
    parts = _expand_to_bins(merged, merged["_st"].to_numpy(), merged["_en"].to_numpy())
    out = (
        parts.groupby(["icustay_id", "bin", "variable"], sort=True)["overlap"]
        .sum()
        .div(BIN_SECONDS)
        .round(ROUND_DECIMALS)
        .rename("value")
        .reset_index()
    )
    return out.astype({"icustay_id": "int64", "bin": "int32", "value": "float64"})


def aggregate_volume(doses: pd.DataFrame, stays: pd.DataFrame) -> pd.DataFrame:
    """Amount per bin from doses ``icustay_id, variable, start, end, amount``.

    A dose with ``end`` missing or not after ``start`` counts whole in the bin of ``start``.
    """
    d = doses[["icustay_id", "variable", "start", "end", "amount"]].copy()
    d["end"] = d["end"].where(d["end"].notna(), d["start"])
    d = _clip_intervals(d[d["amount"].notna()], stays)
    if d.empty:
        return _empty_long()
    st, en = d["_st"].to_numpy(), d["_en"].to_numpy()
    lo, hi = d["_in"].to_numpy(), d["_out"].to_numpy()
    point = en <= st
    pts = d[point & (st >= lo) & (st <= hi)]
    pts = pts.assign(
        bin=np.floor_divide(pts["_st"].to_numpy() - pts["_in"].to_numpy(), BIN_US),
        part=pts["amount"].to_numpy(np.float64),
    )
    spread = d[~point]
    duration = (spread["_en"] - spread["_st"]).to_numpy() / 1e6
    cst = np.maximum(spread["_st"].to_numpy(), spread["_in"].to_numpy())
    cen = np.minimum(spread["_en"].to_numpy(), spread["_out"].to_numpy())
    spread = spread.assign(_rate=spread["amount"].to_numpy(np.float64) / duration)
    parts = _expand_to_bins(spread, cst, cen)
    parts = parts.assign(part=parts["_rate"] * parts["overlap"])
    cols = ["icustay_id", "bin", "variable", "part"]
    both = pd.concat([pts[cols], parts[cols]])
    if both.empty:
        return _empty_long()
    out = (
        both.groupby(["icustay_id", "bin", "variable"], sort=True)["part"]
        .sum()
        .round(ROUND_DECIMALS)
        .rename("value")
        .reset_index()
    )
    return out.astype({"icustay_id": "int64", "bin": "int32", "value": "float64"})


def to_wide(long: pd.DataFrame, grid: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Pivot long aggregates onto ``grid`` (``icustay_id, bin`` rows); NaN where absent.

    Aggregates for bins outside the grid are ignored.
    """
    columns = list(columns)
    out = grid.reset_index(drop=True).copy()
    if long.empty:
        for c in columns:
            out[c] = np.nan
        return out
    wide = long.pivot_table(
        index=["icustay_id", "bin"], columns="variable", values="value", aggfunc="first"
    )
    wide = wide.reindex(columns=columns)
    wide.columns = list(columns)
    wide = wide.reset_index().astype({"icustay_id": "int64", "bin": "int64"})
    key = out[["icustay_id", "bin"]].astype("int64")
    merged = key.merge(wide, on=["icustay_id", "bin"], how="left")
    for c in columns:
        out[c] = merged[c].to_numpy(np.float64)
    return out


# ---------------------------------------------------------------------------- one patient
EVENT_COLUMNS = ("time", "variable", "value")


def _convert_units(events: pd.DataFrame) -> pd.Series:
    values = pd.to_numeric(events["value"], errors="coerce").astype(np.float64)
    if "unit" not in events:
        return values
    out = values.copy()
    for i, (var, unit, v) in enumerate(
        zip(events["variable"], events["unit"], values, strict=True)
    ):
        if unit is None or (isinstance(unit, float) and np.isnan(unit)):
            continue
        spec = STATE_BY_NAME.get(var)
        if spec is None:
            unit_name = INTERVENTION_BY_NAME[var].unit
            if unit != unit_name:
                raise ValueError(f"event {i}: unit {unit!r} for {var}, expected {unit_name!r}")
            continue
        accepted = spec.accepted_units or {spec.unit: (1.0, 0.0)}
        if unit not in accepted:
            raise ValueError(
                f"event {i}: unit {unit!r} not accepted for {var} (accepted: {sorted(accepted)})"
            )
        scale, offset = accepted[unit]
        out.iloc[i] = (v + offset) * scale
    return out


def bin_patient_events(
    events: pd.DataFrame | list[Mapping],
    icu_intime: pd.Timestamp | str,
    n_bins: int | None = None,
) -> pd.DataFrame:
    """Bin one patient's raw events, the online twin of the ETL's binning.

    ``events`` has ``time``, ``variable`` (a canonical state or intervention name) and
    ``value``, optionally ``end_time`` (interval interventions) and ``unit`` (converted to the
    canonical unit with the catalog's ``accepted_units``). Coverage interventions need
    ``end_time``: the intervention ran over ``[time, end_time)`` when ``value > 0``. A volume
    with ``end_time`` is spread over ``[time, end_time)``, otherwise it counts at ``time``.
    State values outside the catalog's drop range are discarded (they are errors, as in the
    ETL).

    Returns one row per bin ``0 .. n_bins - 1`` (default: up to the last bin holding an event)
    with ``bin``, ``bin_start``, the 18 state variables and 3 interventions in canonical units,
    NaN where nothing was charted (interventions too: :func:`features.preprocess.prepare_bins`
    zero-fills them).
    """
    from features.preprocess import drop_out_of_range

    frame = pd.DataFrame(list(events)) if not isinstance(events, pd.DataFrame) else events.copy()
    for col in EVENT_COLUMNS:
        if col not in frame:
            raise ValueError(f"events: column {col!r} missing")
    intime = pd.Timestamp(icu_intime)
    if intime.tzinfo is not None:
        intime = intime.tz_convert("UTC").tz_localize(None)
    known = set(STATE_NAMES) | set(INTERVENTION_NAMES)
    unknown = sorted(set(frame["variable"]) - known)
    if unknown:
        raise ValueError(f"events: unknown variable(s) {unknown}; expected catalog names")
    frame["time"] = _naive(frame["time"], "time")
    frame["end_time"] = _naive(frame["end_time"], "end_time") if "end_time" in frame else pd.NaT
    frame["value"] = _convert_units(frame)
    frame["icustay_id"] = 0
    stays = pd.DataFrame({"icustay_id": [0], "intime": [intime], "outtime": [pd.NaT]})

    state = frame[frame["variable"].isin(STATE_NAMES)].copy()
    for var, idx in state.groupby("variable").groups.items():
        state.loc[idx, "value"] = drop_out_of_range(state.loc[idx, "value"], var)
    longs = [aggregate_state(state, stays)]
    coverage_vars = [n for n in INTERVENTION_NAMES if INTERVENTION_BY_NAME[n].kind == "coverage"]
    cov = frame[frame["variable"].isin(coverage_vars) & (frame["value"] > 0)]
    if cov["end_time"].isna().any():
        bad = cov[cov["end_time"].isna()].iloc[0]
        raise ValueError(f"events: {bad['variable']} at {bad['time']} needs an end_time")
    longs.append(
        aggregate_coverage(cov.rename(columns={"time": "start", "end_time": "end"}), stays)
    )
    vol = frame[frame["variable"].isin([n for n in INTERVENTION_NAMES if n not in coverage_vars])]
    longs.append(
        aggregate_volume(
            vol.rename(columns={"time": "start", "end_time": "end", "value": "amount"}), stays
        )
    )
    long = (
        pd.concat([x for x in longs if not x.empty])
        if any(not x.empty for x in longs)
        else _empty_long()
    )
    if n_bins is None:
        n_bins = int(long["bin"].max()) + 1 if not long.empty else 0
    grid = pd.DataFrame({"icustay_id": np.zeros(n_bins, dtype=np.int64), "bin": np.arange(n_bins)})
    wide = to_wide(long, grid, STATE_NAMES + INTERVENTION_NAMES)
    wide.insert(2, "bin_start", intime + pd.to_timedelta(wide["bin"] * BIN_HOURS, unit="h"))
    return wide.drop(columns=["icustay_id"]).astype({"bin": "int32"})


def _naive(values: pd.Series, name: str) -> pd.Series:
    """Parse to tz-naive timestamps (UTC if a zone was given)."""
    try:
        parsed = pd.to_datetime(values, utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"events: column {name!r} holds a value that is not a time ({exc})"
        ) from exc
    return parsed.dt.tz_localize(None)


# ---------------------------------------------------------------------------- SQL path
# Sums run in exact arithmetic (fixed-point decimals, integer microseconds): DuckDB adds in
# parallel in a varying order, and with floating point the last bits, and now and then a value
# rounded to ROUND_DECIMALS, changed between runs on large inputs. Exact sums make reruns
# byte-identical. 10 decimals keep sub-ROUND_DECIMALS detail; 38 digits hold any clinical sum.
_EXACT = "DECIMAL(38, 10)"


def _epoch_us(expr: str) -> str:
    return f"epoch_us({expr})"


def state_bins_sql(events: str, stays: str) -> str:
    """DuckDB SQL: per (stay, bin, variable) mean of ``events(icustay_id, time, variable, value)``.

    ``stays(icustay_id, intime, outtime)``. Same rules as :func:`aggregate_state`.
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
    ``intervals(icustay_id, variable, start, end)``. Same rules as :func:`aggregate_coverage`.
    """
    return f"""
    WITH clipped AS (
        SELECT i.icustay_id::BIGINT AS icustay_id, i.variable,
               epoch_us(s.intime) AS intime_us,
               greatest(epoch_us(i.start), epoch_us(s.intime)) AS st,
               least(epoch_us(i."end"), coalesce(epoch_us(s.outtime), epoch_us(i."end"))) AS en
        FROM {intervals} i JOIN {stays} s ON i.icustay_id = s.icustay_id
        WHERE i.start IS NOT NULL AND i."end" IS NOT NULL
    ), valid AS (
        SELECT * FROM clipped WHERE en > st
    ), ordered AS (
        SELECT *, max(en) OVER (
            PARTITION BY icustay_id, variable ORDER BY st, en
            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end
        FROM valid
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
    ``doses(icustay_id, variable, start, end, amount)``. Same rules as :func:`aggregate_volume`.
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
        SELECT icustay_id, bin, variable,
               rate * (least(cen, bin_start_us + {BIN_US}) - greatest(cst, bin_start_us)) / 1e6
                   AS part,
               (least(cen, bin_start_us + {BIN_US}) - greatest(cst, bin_start_us)) AS overlap
        FROM ({_bins_of("spread", "cst", "cen")})
    )
    SELECT icustay_id, bin::INTEGER AS bin, variable,
           -- Capped so that a garbage amount cannot overflow the decimal (the clamp to the
           -- intervention's range comes later and is far below the cap).
           round(sum(least(part, 1e20)::{_EXACT}), {ROUND_DECIMALS})::DOUBLE AS value
    FROM (
        SELECT icustay_id, bin, variable, part FROM points
        UNION ALL
        SELECT icustay_id, bin, variable, part FROM parts WHERE overlap > 0
    )
    GROUP BY ALL
    """
