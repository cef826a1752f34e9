"""``run_etl``: MIMIC-III tables -> ``OUT/bins.parquet`` and ``OUT/data_card.json``.

Stages: stream + filter tables into DuckDB (``extract``) -> convert, drop, bin, aggregate in SQL
(``transform``) -> complete bin grid per kept stay -> clamp / observed masks / ffill / zero-fill
(``features.preprocess.prepare_bins``) -> split by subject -> write everything at once
(``features.atomic.atomic_dir``).

Nothing is fitted here: the imputer and scaler are fitted by training on the training patients
of each split or cross-validation fold (a fit on all stays would leak the evaluated patients
into every fold), so state values the stay has not measured yet stay NaN in ``bins.parquet``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from features import leftovers
from features.atomic import atomic_dir, recover
from features.binning import BIN_HOURS
from features.catalog import (
    INTERVENTION_NAMES,
    OBSERVED_NAMES,
    STATE_NAMES,
    catalog_version,
)
from features.checksum import sha256_file
from features.errors import UserError
from features.preprocess import (
    BINS_COLUMNS,
    CLAMP_HIGH,
    CLAMP_LOW,
    FEATURE_NAMES,
    INTERVENTION_MAX,
    prepare_bins,
)
from pipeline.etl import extract, transform
from pipeline.etl.output import PRODUCER, check_out_dir
from pipeline.etl.settings import EtlSettings
from pipeline.etl.split import split_subjects
from pipeline.etl.tables import InputError, TableStats

log = logging.getLogger(__name__)

TABLE_ORDER = tuple(extract.SPECS)
SCRATCH_PREFIX = ".etl-work-"
DATA_CARD_FORMAT = 2
"""2: state columns keep NaN until first measured in the stay; no ``preprocessor/`` (was 1)."""


@dataclass
class EtlResult:
    """What one ETL run produced (the DAG caches on ``bins_sha256``)."""

    out_dir: Path
    bins_path: Path
    data_card_path: Path
    bins_sha256: str
    counts: dict[str, int] = field(default_factory=dict)
    rows_read: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _connect(settings: EtlSettings, workdir: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(workdir / "etl.duckdb"))
    con.execute(f"SET threads = {int(settings.threads)}")
    try:
        con.execute(f"SET memory_limit = '{settings.memory_limit}'")
    except duckdb.Error as exc:
        raise UserError(f"memory_limit: {settings.memory_limit!r} is not a size ({exc})") from exc
    con.execute(f"SET temp_directory = '{workdir / 'spill'}'")
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")
    return con


def _extract(con: duckdb.DuckDBPyConnection, settings: EtlSettings) -> dict[str, TableStats]:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    filters = extract.table_filters()
    stats: dict[str, TableStats] = {}
    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<20}"),
        TextColumn("{task.completed:>14,.0f} rows read"),
        TimeElapsedColumn(),
        console=console,
        disable=not (settings.progress and console.is_terminal),
    ) as progress:
        for name in TABLE_ORDER:
            task = progress.add_task(name, total=None)
            stats[name] = extract.load_table(
                con,
                settings.mimic_dir,
                name,
                filters[name],
                block_size=settings.block_size_mb << 20,
                threads=settings.threads,
                on_rows=functools.partial(progress.advance, task),
            )
            extract.clean_table(con, name, stats[name])
            progress.update(task, description=f"{name} done")
            progress.stop_task(task)
    for name in ("ICUSTAYS", "CHARTEVENTS"):
        if stats[name].rows_read == 0:
            raise InputError(f"{stats[name].path}: {name} has no data rows")
    return stats


def _grid(stays: pd.DataFrame) -> pd.DataFrame:
    n = stays["n_bins"].to_numpy(np.int64)
    rows = np.repeat(np.arange(len(stays)), n)
    bins = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    grid = stays.iloc[rows][["subject_id", "hadm_id", "icustay_id", "intime"]].reset_index(
        drop=True
    )
    grid["bin"] = bins.astype(np.int64)
    grid["bin_start"] = grid["intime"] + pd.to_timedelta(grid["bin"] * BIN_HOURS, unit="h")
    return grid.drop(columns=["intime"])


def build_bins(
    con: duckdb.DuckDBPyConnection, settings: EtlSettings, stats: dict[str, TableStats]
) -> tuple[pd.DataFrame, dict]:
    """Aggregates -> prepared bins frame (state NaN until first measured), data card."""
    transform.create_stays(con, settings.max_stay_days)
    transform.create_state_events(con)
    transform.create_interventions(con)
    dropped = transform.dropped_counts(con)
    iv_problems = transform.intervention_problems(con)
    wide = transform.wide_aggregates(con)
    stays_all = con.execute(
        "SELECT icustay_id, subject_id, reason FROM stays_all ORDER BY icustay_id"
    ).df()
    stays = con.execute("SELECT * FROM stays ORDER BY icustay_id").df()

    has_state = wide[list(STATE_NAMES)].notna().any(axis=1)
    no_events = ~stays["icustay_id"].isin(wide.loc[has_state, "icustay_id"])
    excluded = pd.concat(
        [
            stays_all[stays_all["reason"].notna()][["icustay_id", "reason"]],
            stays[no_events][["icustay_id"]].assign(reason=transform.REASON_NO_EVENTS),
        ]
    ).sort_values("icustay_id", kind="stable")
    kept = stays[~no_events].reset_index(drop=True)
    if kept.empty:
        raise InputError(
            f"{settings.mimic_dir}: no ICU stay has any usable event; nothing to write"
        )

    grid = _grid(kept)
    frame = grid.merge(wide, on=["icustay_id", "bin"], how="left", validate="one_to_one")
    raw_state = frame[list(STATE_NAMES)].to_numpy(np.float64)
    observed_before = ~np.isnan(raw_state)
    clamped = observed_before & ((raw_state < CLAMP_LOW) | (raw_state > CLAMP_HIGH))
    iv_clamped = frame[list(INTERVENTION_NAMES)].to_numpy(np.float64) > INTERVENTION_MAX

    frame = prepare_bins(frame)
    missing_after_ffill = frame[list(STATE_NAMES)].isna().to_numpy()

    split_of = split_subjects(
        frame["subject_id"].unique(), settings.train_frac, settings.val_frac, settings.seed
    )
    frame.insert(frame.columns.get_loc("bin_start") + 1, "split", frame["subject_id"].map(split_of))

    frame = frame[list(BINS_COLUMNS)].astype(
        {"subject_id": "int64", "hadm_id": "int64", "icustay_id": "int64", "bin": "int32"}
        | {n: "float64" for n in FEATURE_NAMES}
        | {n: "float32" for n in OBSERVED_NAMES}
    )
    frame["split"] = frame["split"].astype(str)
    frame = frame.sort_values(["icustay_id", "bin"], kind="stable").reset_index(drop=True)

    n_bins = kept["n_bins"].to_numpy(np.int64)
    values = {
        n: dropped[n] | {"bins_clamped": int(clamped[:, i].sum())}
        for i, n in enumerate(STATE_NAMES)
    }
    interventions = {
        n: iv_problems[n] | {"bins_clamped": int(iv_clamped[:, i].sum())}
        for i, n in enumerate(INTERVENTION_NAMES)
    }
    counted = ("rows_read", "rows_kept", "duplicate_rows", "time_out_of_range_rows")
    tables = {name: {k: getattr(s, k) for k in counted} for name, s in stats.items()}
    per_split = {
        s: {
            "subjects": int(frame.loc[frame["split"] == s, "subject_id"].nunique()),
            "stays": int(frame.loc[frame["split"] == s, "icustay_id"].nunique()),
            "bins": int((frame["split"] == s).sum()),
        }
        for s in ("train", "val", "test")
    }
    card = {
        "format": DATA_CARD_FORMAT,
        "producer": PRODUCER,
        "catalog_version": catalog_version(),
        "bin_hours": BIN_HOURS,
        "settings": {
            "seed": settings.seed,
            "train_frac": settings.train_frac,
            "val_frac": settings.val_frac,
            "test_frac": round(settings.test_frac, 10),
            "max_stay_days": settings.max_stay_days,
        },
        "bins_sha256": None,  # filled in once the parquet is written
        "cohort": {
            "icustays_rows": int(len(stays_all)),
            "stays_kept": int(len(kept)),
            "stays_excluded": int(len(excluded)),
            "excluded_by_reason": {
                str(k): int(v) for k, v in excluded["reason"].value_counts().sort_index().items()
            },
            "excluded_stays": [
                {
                    "icustay_id": None if pd.isna(r.icustay_id) else int(r.icustay_id),
                    "reason": str(r.reason),
                }
                for r in excluded.itertuples()
            ],
            "subjects_kept": int(kept["subject_id"].nunique()),
            "splits": per_split,
        },
        "bins": {
            "total": int(len(frame)),
            "per_stay": {
                "min": int(n_bins.min()),
                "median": float(np.median(n_bins)),
                "mean": round(float(n_bins.mean()), 3),
                "max": int(n_bins.max()),
            },
        },
        "missingness": {
            n: {
                "not_observed": round(float(1 - observed_before[:, i].mean()), 6),
                "missing_after_ffill": round(float(missing_after_ffill[:, i].mean()), 6),
            }
            for i, n in enumerate(STATE_NAMES)
        },
        "interventions_nonzero": {
            n: round(float((frame[n] > 0).mean()), 6) for n in INTERVENTION_NAMES
        },
        "values": values,
        "interventions": interventions,
        "input_problems": _input_problems(
            tables, values, interventions, int(kept["cut"].sum()), settings.max_stay_days
        ),
        "tables": tables,
        "inputs": {s.path.name: {"sha256": s.sha256, "bytes": s.bytes} for s in stats.values()},
    }
    return frame, card


def _input_problems(
    tables: dict[str, dict],
    values: dict[str, dict],
    interventions: dict[str, dict],
    stays_cut: int,
    max_stay_days: int,
) -> dict[str, dict]:
    """Every kind of bad input the ETL repaired or dropped: how many, and what was done."""

    def nonzero(*sections: dict[str, dict], key: str) -> dict[str, int]:
        return {n: d[key] for section in sections for n, d in section.items() if d[key]}

    def problem(action: str, count: int | None = None, **detail: dict[str, int]) -> dict:
        total = sum(v for d in detail.values() for v in d.values()) if count is None else count
        return {"count": int(total), "action": action, **{k: v for k, v in detail.items() if v}}

    return {
        "duplicate_rows": problem(
            "rows identical in every column the ETL reads were kept once",
            per_table=nonzero(tables, key="duplicate_rows"),
        ),
        "timestamps_out_of_range": problem(
            f"rows with a timestamp outside {extract.TIME_MIN} .. {extract.TIME_MAX} (no "
            "timestamp type used here holds it) were dropped; in ICUSTAYS the stay was "
            "excluded with that reason",
            per_table=nonzero(tables, key="time_out_of_range_rows"),
        ),
        "stays_cut_to_max_length": problem(
            f"stays longer than max_stay_days = {max_stay_days} were cut to their "
            "first max_stay_days; events after the cut count as outside the stay",
            stays_cut,
        ),
        "events_outside_stay": problem(
            "state values charted before intime minus the lab window or after outtime (or the "
            "cut), and intervention records lying entirely outside the stay, were dropped",
            per_variable=nonzero(values, interventions, key="outside_stay"),
        ),
        "implausible_intervention_amounts": problem(
            "doses that are negative, infinite, NaN or larger than the intervention's maximum "
            "per bin, and CareVue vasopressor rates that are negative, infinite or NaN, were "
            "dropped as charting errors",
            per_variable=nonzero(interventions, key="implausible_doses"),
        ),
        "intervention_bins_clamped": problem(
            "bins whose summed intervention exceeded its maximum were clamped to it",
            per_variable=nonzero(interventions, key="bins_clamped"),
        ),
    }


def run_etl(settings: EtlSettings | None = None) -> EtlResult:
    """Run the whole ETL; raise :class:`features.errors.UserError` on bad input."""
    settings = settings or EtlSettings()
    start = time.perf_counter()
    # Absolute, so that ``--out .`` has a real parent for the staging folder (links are kept).
    out = Path(os.path.abspath(settings.out))
    # Before any work, and again before the swap (the folder may have changed meanwhile).
    check_out_dir(out, settings.mimic_dir, settings.temp_dir)
    # Every table resolved first: a missing one fails before any scratch or minutes of reading.
    for name in TABLE_ORDER:
        extract.find_table(settings.mimic_dir, name)
    scratch_parent = settings.temp_dir or out.parent
    what = "--temp-dir" if settings.temp_dir else "the folder of --out"
    try:
        scratch_parent.mkdir(parents=True, exist_ok=True)
        # Scratch and staging of an earlier ETL that was killed (only ours: by name and a
        # finished owner process), and the previous output if the kill split its swap.
        leftovers.remove_stale(scratch_parent, SCRATCH_PREFIX)
        recover(out)
        scratch = tempfile.TemporaryDirectory(
            prefix=SCRATCH_PREFIX + leftovers.owner_mark(), dir=scratch_parent
        )
    except OSError as exc:
        why = (
            "part of that path is a file, not a folder"
            if isinstance(exc, FileExistsError | NotADirectoryError)
            else exc.strerror or str(exc)
        )
        raise UserError(f"cannot write in {what}, {scratch_parent} ({why})") from exc
    with scratch as tmp:
        work = Path(tmp)
        con = _connect(settings, work)
        try:
            stats = _extract(con, settings)
            log.info("binning and aggregating")
            frame, card = build_bins(con, settings, stats)
        except duckdb.OutOfMemoryException as exc:
            raise UserError(
                f"DuckDB ran out of memory under --memory-limit {settings.memory_limit} "
                f"({str(exc).splitlines()[0]}); raise the limit"
            ) from exc
        except duckdb.IOException as exc:
            raise UserError(
                f"DuckDB could not use its scratch folder in {scratch_parent} "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        finally:
            con.close()
    log.info("writing %s (%d stays, %d bins)", out, card["cohort"]["stays_kept"], len(frame))
    check_out_dir(out, settings.mimic_dir, settings.temp_dir)
    try:
        # Both files go into a staging folder that replaces ``out`` at the end.
        with atomic_dir(out) as staging:
            frame.to_parquet(staging / "bins.parquet", index=False, compression="zstd")
            card["bins_sha256"] = sha256_file(staging / "bins.parquet")
            (staging / "data_card.json").write_text(json.dumps(card, indent=1) + "\n")
    except OSError as exc:
        raise UserError(
            f"cannot write --out {out} ({exc.strerror or exc}); any previous output is unchanged"
        ) from exc
    elapsed = time.perf_counter() - start
    log.info("ETL done in %.1f s", elapsed)
    return EtlResult(
        out_dir=out,
        bins_path=out / "bins.parquet",
        data_card_path=out / "data_card.json",
        bins_sha256=card["bins_sha256"],
        counts={
            k: card["cohort"][k]
            for k in ("icustays_rows", "stays_kept", "stays_excluded", "subjects_kept")
        }
        | {"bins": card["bins"]["total"]},
        rows_read={name: s.rows_read for name, s in stats.items()},
        seconds=elapsed,
    )
