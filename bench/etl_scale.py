"""ETL scale benchmark: synthesize N-times copies of the MIMIC-III demo and time the ETL.

For each scale N the demo's tables are copied N times with fresh ids (subject, admission,
stay, row), times shifted per copied patient (plus seconds of jitter per event) and numeric
values jittered by up to +-2 %, written as upper-case ``.csv.gz`` like the full release. With
``--quoted`` the text and timestamp fields are written in double quotes, as MIMIC-III v1.4
ships them (``"2134-05-12 12:00:00"``, ``"L/min"``; numbers and empty fields bare). The ETL
then runs in a fresh process (``--runs`` times), which reports its own wall time and peak RSS.

    .venv/bin/python bench/etl_scale.py --scales 1 10 50 --quoted --runs 3

Prints one line per scale (the median run): CHARTEVENTS rows, wall seconds, rows per second,
CPU seconds, peak RSS. The demo is read from ``MIMIC_DIR``, and the ETL takes its other settings
(``ICU_ETL_THREADS``, ``ICU_ETL_MEMORY_LIMIT``, ...) from the environment as ``icu-forecast etl``
does. The synthesized data lives under ``--work-dir`` (default: a temporary folder in /tmp)
and is deleted afterwards unless ``--keep``; ``--reuse`` times a kept copy again. Targets:
>= 2M CHARTEVENTS rows/s at 50x (1.5M on ``--quoted`` copies), peak RSS < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.etl.run import TABLE_ORDER as TABLES  # noqa: E402  (the tables the ETL reads)

ID_OFFSETS = {"subject_id": 1_000_000, "hadm_id": 1_000_000, "icustay_id": 1_000_000,
              "row_id": 10**8, "orderid": 10**8, "linkorderid": 10**8}  # fmt: skip
TIME_COLUMNS = {"intime", "outtime", "charttime", "storetime", "starttime", "endtime",
                "comments_date"}  # fmt: skip
EVENT_TIMES = {"charttime", "storetime"}  # jittered per row on top of the patient's shift
VALUE_COLUMNS = {"valuenum", "amount", "rate", "originalamount", "originalrate", "totalamount",
                 "los", "patientweight"}  # fmt: skip
QUOTED_TYPES = {"VARCHAR", "TIMESTAMP", "DATE", "TIME"}


def synthesize(
    demo: Path, dest: Path, scale: int, threads: int = 2, quoted: bool = False
) -> dict[str, int]:
    """Write the scaled copy; return rows per table."""
    import duckdb
    from isal import igzip_threaded

    from pipeline.etl.tables import find_table, read_header

    dest.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"threads": threads})
    con.execute("SET enable_progress_bar = false")  # a session option, refused in config=
    rows = {}
    for name in TABLES:
        src = find_table(demo, name)
        header = read_header(src)
        exprs = []
        for col in header:
            c = col.lower()
            q = f'"{col}"'
            if c in ID_OFFSETS:
                e = f"CAST(TRY_CAST({q} AS BIGINT) + k * {ID_OFFSETS[c]} AS VARCHAR)"
            elif c in TIME_COLUMNS:
                shift = "to_minutes((hash(TRY_CAST(subject_id AS BIGINT), k) % 525600)::BIGINT)"
                jitter = (
                    f" + to_seconds((hash(row_id, k, '{c}') % 61)::BIGINT - 30)"
                    if c in EVENT_TIMES
                    else ""
                )
                e = (
                    f"strftime(TRY_CAST({q} AS TIMESTAMP) + "
                    f"CASE WHEN k = 0 THEN INTERVAL 0 SECOND ELSE {shift}{jitter} END, "
                    "'%Y-%m-%d %H:%M:%S')"
                )
            elif c in VALUE_COLUMNS:
                noise = f"((hash(row_id, k, '{c}') % 2001)::DOUBLE - 1000) / 50000"
                e = (
                    f"CAST(round(TRY_CAST({q} AS DOUBLE) * "
                    f"CASE WHEN k = 0 THEN 1 ELSE 1 + {noise} END, 4) AS VARCHAR)"
                )
            else:
                e = q
            exprs.append(f"{e} AS {col.upper()}")
        con.execute(
            f"""CREATE OR REPLACE TABLE src AS SELECT * FROM read_csv('{src}', header = true,
                all_varchar = true, quote = '"', escape = '"', delim = ',')"""
        )
        force_quote = ""
        if quoted:
            # The release quotes what its schema types as text or time, whatever the value
            # looks like (a numeric VALUE is still "15"); DuckDB's sniffer stands in for it.
            typed = con.execute(f"DESCRIBE SELECT * FROM read_csv('{src}')").fetchall()
            text = [col.upper() for col, kind, *_ in typed if kind in QUOTED_TYPES]
            if text:
                force_quote = f", FORCE_QUOTE ({', '.join(text)})"
        # DuckDB writes plain CSV in parallel; ISA-L gzips it several times faster than zlib.
        plain = dest / f"{name}.csv"
        [rows[name]] = con.execute(
            f"""COPY (SELECT {", ".join(exprs)} FROM src, range({scale}) AS r(k))
                TO '{plain}' (FORMAT csv, HEADER{force_quote})"""
        ).fetchone()
        with (
            open(plain, "rb") as fin,
            igzip_threaded.open(
                dest / f"{name}.csv.gz", "wb", compresslevel=2, threads=threads
            ) as fout,
        ):
            shutil.copyfileobj(fin, fout, 1 << 22)
        plain.unlink()
    con.close()
    return rows


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pipeline.etl import EtlSettings, run_etl
r = run_etl(EtlSettings(mimic_dir=sys.argv[1], out=sys.argv[2], progress=False))
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process.
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "peak_rss_mb": hwm_kb / 1024, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "chartevents": r.rows_read["CHARTEVENTS"], **r.counts}))
"""


def run_etl_child(mimic: Path, out: Path) -> dict:
    """One ETL run in a fresh process: its wall and CPU seconds, peak RSS and counts."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(mimic), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    if proc.returncode != 0:
        raise SystemExit(f"ETL failed at {mimic}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from pipeline.etl import EtlSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--work-dir", type=Path, default=None, help="default: a new folder in /tmp")
    p.add_argument("--keep", action="store_true", help="keep the synthesized data")
    p.add_argument(
        "--quoted", action="store_true", help="quote text and time fields, as MIMIC-III v1.4 does"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="use the data a --keep run left in --work-dir instead of synthesizing it again",
    )
    p.add_argument("--runs", type=int, default=1, help="ETL runs per scale; the median is shown")
    args = p.parse_args(argv)

    settings = EtlSettings()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="icu-etl-bench-", dir="/tmp"))
    try:
        for scale in args.scales:
            data = work / f"x{scale}"
            marker = data / "rows.json"
            if args.reuse and marker.exists():
                rows = json.loads(marker.read_text())
            else:
                rows = synthesize(settings.mimic_dir, data, scale, settings.threads, args.quoted)
                marker.write_text(json.dumps(rows))
            size = sum(f.stat().st_size for f in data.glob("*.csv.gz")) / 2**20
            runs = []
            for i in range(max(1, args.runs)):
                runs.append(run_etl_child(data, work / f"out{scale}-{i}"))
                shutil.rmtree(work / f"out{scale}-{i}", ignore_errors=True)
            runs.sort(key=lambda r: r["wall_s"])
            r = runs[len(runs) // 2]
            chart = r["chartevents"]
            assert chart == rows["CHARTEVENTS"], (chart, rows["CHARTEVENTS"])
            print(
                f"{scale:>4}x  CHARTEVENTS {chart:>12,} rows  wall {r['wall_s']:>7.2f} s  "
                f"{chart / r['wall_s']:>12,.0f} rows/s  peak RSS {r['peak_rss_mb']:>6,.0f} MB  "
                f"CPU {r['cpu_s']:.1f} s ({chart / r['cpu_s']:,.0f} rows/CPU-s; "
                f"{r['stays_kept']:,} stays, {r['bins']:,} bins; input {size:.1f} MB gz; "
                f"runs {[round(run['wall_s'], 2) for run in runs]} s)",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
