"""From the extracted raw rows to per-(stay, bin, variable) aggregates, in DuckDB SQL.

Order of operations (the catalog's rules): unit conversion -> drop range -> binning
(``features.binning``'s SQL, the same rules the service applies with pandas). Only the
aggregates, a few rows per stay and bin, leave DuckDB.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from features import catalog as cat
from features.binning import BIN_US, PRE_INTIME_HOURS, wide_bins_sql

REASON_MISSING_IDS = "missing icustay_id, subject_id or hadm_id"
REASON_MISSING_TIMES = "missing intime or outtime"
REASON_TIME_RANGE = "intime or outtime outside the representable range (1678 .. 2261)"
REASON_BAD_TIMES = "outtime not after intime"
REASON_DUPLICATE = "duplicate icustay_id"
REASON_NO_EVENTS = "no usable state-variable events in the stay"
PRE_US = PRE_INTIME_HOURS * 3600 * 1_000_000
PLAUSIBLE_RATE = "isfinite(rate) AND rate >= 0"
PLAUSIBLE_DOSE = (
    "isfinite(amount) AND amount > 0 "
    f"AND amount <= {cat.INTERVENTION_BY_NAME['iv_fluid_ml'].max_value}"
)


def _in(ids) -> str:
    return "(" + ", ".join(str(int(i)) for i in sorted(set(ids))) + ")"


def create_stays(con: duckdb.DuckDBPyConnection, max_stay_days: int) -> None:
    """``stays_all`` (every ICUSTAYS row with an exclusion reason or NULL) and ``stays``.

    A stay longer than ``max_stay_days`` is cut to its first ``max_stay_days`` (its ``outtime``
    in ``stays`` becomes the cut, so later events fall outside the stay and are counted as
    such); an outtime decades after intime is a data error that would otherwise become tens
    of thousands of empty bins. ``stays.cut`` marks the stays cut.
    """
    # One microsecond short of the limit: the stay then has exactly max_stay_days * 2 bins.
    max_us = max_stay_days * 24 * 3600 * 1_000_000 - 1
    con.execute(
        f"""
        CREATE OR REPLACE TABLE stays_all AS
        SELECT icustay_id, subject_id, hadm_id, intime, outtime,
               CASE WHEN icustay_id IS NULL OR subject_id IS NULL OR hadm_id IS NULL
                         THEN '{REASON_MISSING_IDS}'
                    WHEN time_out_of_range THEN '{REASON_TIME_RANGE}'
                    WHEN intime IS NULL OR outtime IS NULL THEN '{REASON_MISSING_TIMES}'
                    WHEN outtime <= intime THEN '{REASON_BAD_TIMES}'
                    WHEN row_number() OVER (PARTITION BY icustay_id ORDER BY intime) > 1
                         THEN '{REASON_DUPLICATE}'
               END AS reason,
               epoch_us(outtime) - epoch_us(intime) > {max_us} AS cut
        FROM raw_icustays;
        CREATE OR REPLACE TABLE stays AS
        SELECT icustay_id, subject_id, hadm_id, intime, out AS outtime, cut,
               (floor((epoch_us(out) - epoch_us(intime)) / {BIN_US}) + 1)::INTEGER AS n_bins
        FROM (
            SELECT *, CASE WHEN cut THEN make_timestamp(epoch_us(intime) + {max_us})
                           ELSE outtime::TIMESTAMP END AS out
            FROM stays_all WHERE reason IS NULL
        );
        """
    )


def _item_map() -> pd.DataFrame:
    rows = []
    gcs_parts = set(cat.GCS_COMPONENT_ITEMIDS)
    for var in cat.STATE_VARIABLES:
        lo, hi = var.drop
        when_above = next((c for c in var.conversions if c.also_when_above is not None), None)
        for itemid in var.chart_itemids:
            if itemid in gcs_parts:
                continue
            conv = next((c for c in var.conversions if itemid in c.itemids), None)
            if conv is not None:  # (scale, offset, always, above)
                how = (conv.scale, conv.offset, True, None)
            elif when_above is not None:
                how = (when_above.scale, when_above.offset, False, when_above.also_when_above)
            else:
                how = (1.0, 0.0, False, None)
            rows.append((itemid, "chart", var.name, lo, hi, *how))
        for itemid in var.lab_itemids:
            rows.append((itemid, "lab", var.name, lo, hi, 1.0, 0.0, False, None))
    return pd.DataFrame(
        rows,
        columns=["itemid", "source", "variable", "lo", "hi", "scale", "offset", "always", "above"],
    ).astype({"above": "float64"})


def create_state_events(con: duckdb.DuckDBPyConnection) -> None:
    """``state_raw``: converted values per stay; ``state_events``: those inside drop ranges.

    Labs are assigned to every stay of the subject whose window
    ``[intime - LAB_WINDOW_HOURS, outtime]`` holds their charttime.
    """
    item_map = _item_map()  # noqa: F841 - read by DuckDB's replacement scan
    con.execute("CREATE OR REPLACE TABLE item_map AS SELECT * FROM item_map")
    eye, verbal, motor = cat.GCS_COMPONENT_ITEMIDS
    gcs_lo, gcs_hi = cat.STATE_BY_NAME["gcs_total"].drop
    con.execute(
        f"""
        CREATE OR REPLACE TABLE state_raw AS
        SELECT c.icustay_id, c.charttime AS time, m.variable, m.lo, m.hi,
               CASE WHEN m.always OR (m.above IS NOT NULL AND c.valuenum >= m.above)
                    THEN (c.valuenum + m.offset) * m.scale ELSE c.valuenum END AS value
        FROM raw_chartevents c JOIN item_map m ON c.itemid = m.itemid AND m.source = 'chart'
        WHERE c.valuenum IS NOT NULL
        UNION ALL
        -- MetaVision GCS: the total is the sum of eye, verbal and motor charted together.
        SELECT icustay_id, charttime, 'gcs_total', {gcs_lo}, {gcs_hi}, sum(v)
        FROM (
            SELECT icustay_id, charttime, itemid, avg(valuenum) AS v
            FROM raw_chartevents
            WHERE itemid IN ({eye}, {verbal}, {motor}) AND valuenum IS NOT NULL
            GROUP BY ALL
        )
        GROUP BY icustay_id, charttime HAVING count(*) = 3
        UNION ALL
        SELECT s.icustay_id, l.charttime, m.variable, m.lo, m.hi, l.valuenum
        FROM raw_labevents l
        JOIN item_map m ON l.itemid = m.itemid AND m.source = 'lab'
        JOIN stays s ON l.subject_id = s.subject_id
             AND epoch_us(l.charttime) >= epoch_us(s.intime) - {PRE_US}
             AND l.charttime <= s.outtime;
        CREATE OR REPLACE VIEW state_events AS
        SELECT icustay_id, time, variable, value FROM state_raw
        WHERE value >= lo AND value <= hi;
        """
    )


def dropped_counts(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, int]]:
    """Per variable: values extracted, values dropped as outside the drop range, and values
    of the cohort's stays dropped as charted outside the stay (before ``intime`` minus the
    lab window, or after ``outtime``, or after the cut of a stay longer than the maximum)."""
    rows = con.execute(
        f"""
        SELECT r.variable, count(*) AS n,
               count(*) FILTER (WHERE value < lo OR value > hi) AS dropped,
               count(*) FILTER (WHERE value >= lo AND value <= hi AND s.icustay_id IS NOT NULL
                   AND (r.time IS NULL OR epoch_us(r.time) < epoch_us(s.intime) - {PRE_US}
                        OR r.time > s.outtime)) AS outside
        FROM state_raw r LEFT JOIN stays s ON r.icustay_id = s.icustay_id
        GROUP BY r.variable
        """
    ).fetchall()
    empty = {"values": 0, "dropped": 0, "outside_stay": 0}
    got = {
        r[0]: {"values": int(r[1]), "dropped": int(r[2]), "outside_stay": int(r[3])} for r in rows
    }
    return {n: got.get(n, empty) for n in cat.STATE_NAMES}


def create_interventions(con: duckdb.DuckDBPyConnection) -> None:
    """``intervals`` (coverage interventions) and ``doses`` (volumes) per stay."""
    vaso = cat.INTERVENTION_BY_NAME["vasopressor"]
    vent = cat.INTERVENTION_BY_NAME["mechanical_ventilation"]
    fluid = cat.INTERVENTION_BY_NAME["iv_fluid_ml"]
    cv_max_us = int(cat.CV_INFUSION_MAX_HOURS * 3600 * 1_000_000)
    gap_us = int(cat.VENT_EPISODE_GAP_HOURS * 3600 * 1_000_000)
    con.execute(
        f"""
        CREATE OR REPLACE TABLE intervals AS
        -- MetaVision infusions run from starttime to endtime; 'Rewritten' rows were replaced.
        SELECT icustay_id, 'vasopressor' AS variable, starttime AS start, endtime AS "end"
        FROM raw_inputevents_mv
        WHERE itemid IN {_in(vaso.inputevents_mv)}
          AND coalesce(statusdescription, '') <> 'Rewritten'
        UNION ALL
        -- CareVue charts rates: a rate > 0 runs until the item's next charting, at most 4 h.
        SELECT icustay_id, 'vasopressor', charttime,
               least(coalesce(next_t, charttime + to_microseconds({cv_max_us})),
                     charttime + to_microseconds({cv_max_us}))
        FROM (
            SELECT icustay_id, charttime, rate,
                   lead(charttime) OVER (PARTITION BY icustay_id, itemid
                                         ORDER BY charttime, coalesce(rate, 0) > 0) AS next_t
            FROM raw_inputevents_cv WHERE itemid IN {_in(vaso.inputevents_cv)}
              -- an infinite, NaN or negative rate is a charting error, neither on nor off
              -- (dropped; counted by intervention_problems)
              AND (rate IS NULL OR {PLAUSIBLE_RATE})
        ) WHERE rate > 0
        UNION ALL
        -- Ventilation: each charted setting extends the episode to the next event of the stay
        -- when that comes within the gap; an extubation ends it (ties sort vent first).
        SELECT icustay_id, 'mechanical_ventilation', t,
               CASE WHEN next_t IS NOT NULL AND epoch_us(next_t) - epoch_us(t) <= {gap_us}
                    THEN next_t ELSE t END
        FROM (
            SELECT icustay_id, t, kind,
                   lead(t) OVER (PARTITION BY icustay_id ORDER BY t, kind DESC) AS next_t
            FROM (
                SELECT DISTINCT icustay_id, charttime AS t, 1 AS kind FROM raw_chartevents
                WHERE itemid IN {_in(vent.chartevents)} AND text_ok
                UNION
                SELECT DISTINCT icustay_id, charttime, 0 FROM raw_chartevents
                WHERE itemid = {cat.EXTUBATION_CHART_ITEMID} AND text_ok
                UNION
                SELECT DISTINCT icustay_id, starttime, 0 FROM raw_procedureevents_mv
                WHERE itemid IN {_in(vent.procedureevents_mv)}
                  AND coalesce(statusdescription, '') <> 'Rewritten'
            )
        ) WHERE kind = 1;

        CREATE OR REPLACE TABLE doses_all AS
        SELECT icustay_id, 'iv_fluid_ml' AS variable, starttime AS start, endtime AS "end",
               amount * CASE WHEN lower(amountuom) = 'l' THEN 1000 ELSE 1 END AS amount
        FROM raw_inputevents_mv
        WHERE itemid IN {_in(fluid.inputevents_mv)} AND amount <> 0
          AND coalesce(statusdescription, '') <> 'Rewritten'
          AND lower(coalesce(amountuom, 'ml')) IN ('ml', 'l')
        UNION ALL
        SELECT icustay_id, 'iv_fluid_ml', charttime, NULL::TIMESTAMP, amount
        FROM raw_inputevents_cv
        WHERE itemid IN {_in(fluid.inputevents_cv)} AND amount <> 0
          AND lower(coalesce(amountuom, 'ml')) = 'ml';

        -- A single dose beyond the most a 12-hour bin may hold (or a negative, infinite or NaN
        -- one) is a charting error: it is dropped (counted by intervention_problems), not capped.
        CREATE OR REPLACE TABLE doses AS SELECT * FROM doses_all WHERE {PLAUSIBLE_DOSE};
        """
    )


def intervention_problems(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, int]]:
    """Per intervention, for the cohort's stays: implausible doses dropped, and records that lie
    entirely outside their stay (outside ``[intime, outtime]``, so they reach no bin)."""
    out = {n: {"implausible_doses": 0, "outside_stay": 0} for n in cat.INTERVENTION_NAMES}
    vaso = cat.INTERVENTION_BY_NAME["vasopressor"]
    for variable, n in con.execute(
        f"""
        SELECT variable, count(*) FROM (
            SELECT icustay_id, variable FROM doses_all WHERE NOT ({PLAUSIBLE_DOSE})
            UNION ALL
            SELECT icustay_id, 'vasopressor' FROM raw_inputevents_cv
            WHERE itemid IN {_in(vaso.inputevents_cv)} AND rate IS NOT NULL
              AND NOT ({PLAUSIBLE_RATE})
        ) JOIN stays USING (icustay_id) GROUP BY variable
        """
    ).fetchall():
        out[variable]["implausible_doses"] = int(n)
    for variable, n in con.execute(
        """
        SELECT variable, count(*) FROM (
            SELECT i.variable FROM intervals i JOIN stays s USING (icustay_id)
            WHERE i."end" <= s.intime OR i.start >= s.outtime
            UNION ALL
            SELECT d.variable FROM doses d JOIN stays s USING (icustay_id)
            WHERE CASE WHEN d."end" IS NULL OR d."end" <= d.start
                       THEN d.start < s.intime OR d.start > s.outtime
                       ELSE d."end" <= s.intime OR d.start >= s.outtime END
        ) GROUP BY variable
        """
    ).fetchall():
        out[variable]["outside_stay"] = int(n)
    return out


def wide_aggregates(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """One row per (stay, bin) that has any aggregate; a column per catalog variable."""
    return con.execute(wide_bins_sql("state_events", "intervals", "doses", "stays")).df()
