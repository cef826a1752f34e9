"""Extract the catalog's events from the MIMIC-III tables into DuckDB.

Each table is streamed once; each block is filtered by item id (and the few value conditions
the catalog has) before it reaches DuckDB, so only the rows the ETL needs are stored: full
MIMIC-III's 330 million CHARTEVENTS rows shrink to the tens of millions of vitals and
ventilator settings, which DuckDB keeps compressed on disk under its memory limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from features import catalog as cat
from pipeline.etl.tables import TableStats, find_table, stream_table

log = logging.getLogger(__name__)

TS = pa.timestamp("s")
I64 = pa.int64()
STR = pa.string()
# Each column the ETL reads has the same type in every table that holds it.
COLUMN_TYPES = (
    dict.fromkeys(("subject_id", "hadm_id", "icustay_id", "itemid"), I64)
    | dict.fromkeys(("intime", "outtime", "charttime", "starttime", "endtime"), TS)
    | dict.fromkeys(("valuenum", "amount", "rate"), pa.float64())
    | dict.fromkeys(("value", "error", "amountuom", "statusdescription"), STR)
)
# Per table, the columns the ETL reads (lower-case name -> type).
SPECS: dict[str, dict[str, pa.DataType]] = {
    name: {c: COLUMN_TYPES[c] for c in columns}
    for name, columns in {
        "ICUSTAYS": ("subject_id", "hadm_id", "icustay_id", "intime", "outtime"),
        "CHARTEVENTS": ("icustay_id", "itemid", "charttime", "value", "valuenum", "error"),
        "LABEVENTS": ("subject_id", "hadm_id", "itemid", "charttime", "valuenum"),
        "INPUTEVENTS_CV": ("icustay_id", "charttime", "itemid", "amount", "amountuom", "rate"),
        "INPUTEVENTS_MV": (
            "icustay_id",
            "starttime",
            "endtime",
            "itemid",
            "amount",
            "amountuom",
            "statusdescription",
        ),
        "PROCEDUREEVENTS_MV": ("icustay_id", "starttime", "itemid", "statusdescription"),
    }.items()
}

Filter = Callable[[pa.Table], pa.Table]


def _ids(values) -> pa.Array:
    return pa.array(sorted(set(values)), I64)


def chart_filter() -> Filter:
    """Keep catalog items; drop retracted rows (error = 1); reduce ``value`` to a flag."""
    ids = _ids(cat.chart_itemids())
    vent_mode, vent_device = 720, 467

    def keep(b: pa.Table) -> pa.Table:
        # Item ids first: the cheap integer test removes most rows before any string work.
        b = b.filter(pc.and_(pc.is_in(b.column("itemid"), value_set=ids),
                             pc.is_valid(b.column("icustay_id"))))  # fmt: skip
        error = pc.fill_null(pc.utf8_trim_whitespace(b.column("error")), "")
        b = b.filter(pc.not_equal(error, "1"))
        value = pc.fill_null(b.column("value"), "")
        itemid = b.column("itemid")
        # The catalog's text conditions: vent mode 720 != 'Other/Remarks', O2 device 467 =
        # 'Ventilator', significant event 640 in the extubation values.
        text_ok = pc.case_when(
            pc.make_struct(
                pc.equal(itemid, vent_mode),
                pc.equal(itemid, vent_device),
                pc.equal(itemid, cat.EXTUBATION_CHART_ITEMID),
            ),
            pc.and_(pc.not_equal(value, cat.VENT_MODE_EXCLUDED_VALUE), pc.not_equal(value, "")),
            pc.equal(value, cat.VENT_DEVICE_VALUE),
            pc.is_in(value, value_set=pa.array(cat.EXTUBATION_CHART_VALUES)),
            pa.scalar(True),
        )
        columns = ["icustay_id", "itemid", "charttime", "valuenum"]
        return b.select(columns).append_column("text_ok", text_ok)

    return keep


def itemid_filter(itemids, require: tuple[str, ...] = ()) -> Filter:
    """Keep the rows of ``itemids`` whose ``require`` columns are all present."""
    ids = _ids(itemids)

    def keep(b: pa.Table) -> pa.Table:
        mask = pc.is_in(b.column("itemid"), value_set=ids)
        for col in require:
            mask = pc.and_(mask, pc.is_valid(b.column(col)))
        return b.filter(mask)

    return keep


def table_filters() -> dict[str, Filter]:
    vaso = cat.INTERVENTION_BY_NAME["vasopressor"]
    vent = cat.INTERVENTION_BY_NAME["mechanical_ventilation"]
    fluid = cat.INTERVENTION_BY_NAME["iv_fluid_ml"]
    return {
        "ICUSTAYS": lambda b: b,
        "CHARTEVENTS": chart_filter(),
        "LABEVENTS": itemid_filter(
            cat.lab_itemids(), require=("subject_id", "charttime", "valuenum")
        ),
        "INPUTEVENTS_CV": itemid_filter(
            vaso.inputevents_cv + fluid.inputevents_cv, require=("icustay_id", "charttime")
        ),
        "INPUTEVENTS_MV": itemid_filter(
            vaso.inputevents_mv + fluid.inputevents_mv, require=("icustay_id", "starttime")
        ),
        "PROCEDUREEVENTS_MV": itemid_filter(
            vent.procedureevents_mv, require=("icustay_id", "starttime")
        ),
    }


def load_table(
    con: duckdb.DuckDBPyConnection,
    mimic_dir: Path,
    name: str,
    keep: Filter,
    *,
    block_size: int,
    threads: int = 2,
    on_rows: Callable[[int], None] | None = None,
    flush_rows: int = 2_000_000,
) -> TableStats:
    """Stream table ``name`` through ``keep`` into DuckDB table ``raw_<name>``."""
    path = find_table(mimic_dir, name)
    stats = TableStats(name, path)
    target = f"raw_{name.lower()}"
    # The filter of an empty table gives the schema of what it keeps.
    empty = keep(pa.schema(list(SPECS[name].items())).empty_table())  # noqa: F841
    con.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT * FROM empty")
    pending: list[pa.Table] = []

    def flush() -> None:
        buf = pa.concat_tables(pending)  # noqa: F841 - read by DuckDB's replacement scan
        con.execute(f"INSERT INTO {target} SELECT * FROM buf")
        pending.clear()

    for kept in stream_table(
        path,
        SPECS[name],
        stats,
        block_size=block_size,
        threads=threads,
        transform=keep,
        on_rows=on_rows,
    ):
        if kept.num_rows:
            pending.append(kept)
            stats.rows_kept += kept.num_rows
        if sum(t.num_rows for t in pending) >= flush_rows:
            flush()
    if pending:
        flush()
    log.info(
        f"{name}: {stats.rows_read:,} rows read, {stats.rows_kept:,} kept ({stats.seconds:.1f} s)"
    )
    return stats


TIME_MIN = "1678-01-01"
TIME_MAX = "2262-01-01"
"""Timestamps must lie in ``[TIME_MIN, TIME_MAX)``: nanosecond timestamps (pandas, and DuckDB
inside some functions) hold 1677-09-21 .. 2262-04-11, and the margin leaves room for the stay
arithmetic (a maximum stay of years, the lab window). MIMIC-III's shifted dates lie in
2100 .. 2210; anything outside the range is a corrupt value, not a date to shift."""


def clean_table(con: duckdb.DuckDBPyConnection, name: str, stats: TableStats) -> None:
    """Drop exact duplicate rows and rows holding an unusable timestamp, counting both.

    Duplicates are rows identical in every column the ETL keeps (a line written twice would
    otherwise count an IV bag twice). A timestamp outside ``[TIME_MIN, TIME_MAX)`` drops its
    event row; in ICUSTAYS it flags the stay instead (``time_out_of_range``), so that the stay
    is excluded with its reason and the cohort still accounts for every row.
    """
    target = f"raw_{name.lower()}"
    columns = [r[0] for r in con.execute(f"DESCRIBE {target}").fetchall()]
    times = [c for c in columns if pa.types.is_timestamp(SPECS[name].get(c, STR))]
    before = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
    ok = (
        " AND ".join(
            f"({c} IS NULL OR ({c}::TIMESTAMP >= TIMESTAMP '{TIME_MIN}' "
            f"AND {c}::TIMESTAMP < TIMESTAMP '{TIME_MAX}'))"
            for c in times
        )
        or "TRUE"
    )
    con.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT DISTINCT * FROM {target}")
    after = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
    bad = con.execute(f"SELECT count(*) FROM {target} WHERE NOT ({ok})").fetchone()[0]
    if name == "ICUSTAYS":
        blank = ", ".join(f"CASE WHEN {ok} THEN {c} END AS {c}" for c in times)
        con.execute(
            f"""CREATE OR REPLACE TABLE {target} AS
            SELECT * REPLACE ({blank}), NOT ({ok}) AS time_out_of_range FROM {target}"""
        )
    elif bad:
        con.execute(f"DELETE FROM {target} WHERE NOT ({ok})")
    stats.duplicate_rows = int(before - after)
    stats.time_out_of_range_rows = int(bad)
    if stats.duplicate_rows or bad:
        log.warning(
            f"{name}: {stats.duplicate_rows} exact duplicate row(s) dropped, {bad} row(s) with a "
            f"timestamp outside {TIME_MIN} .. {TIME_MAX}"
        )
