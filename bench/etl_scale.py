"""ETL scale benchmark: synthesize N-times copies of the MIMIC-III demo and time the ETL.

For each scale N the demo's tables are copied N times with fresh ids (subject, admission,
stay, row), times shifted per copied patient (plus seconds of jitter per event) and numeric
values jittered by up to +-2 %, written as upper-case ``.csv.gz`` like the full release. With
``--quoted`` the text and timestamp fields are written in double quotes, as MIMIC-III v1.4
ships them (``"2134-05-12 12:00:00"``, ``"L/min"``; numbers and empty fields bare). The ETL
then runs in a fresh process (``--runs`` times), which reports its own wall time and peak RSS.

    .venv/bin/python bench/etl_scale.py --scales 1 10 50 --quoted --runs 3

Prints one line per scale (the median run): CHARTEVENTS rows, wall seconds, rows per second,
peak RSS. The synthesized data lives under ``--work-dir`` (default: a temporary folder in /tmp)
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
import time
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
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET enable_progress_bar = false")
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
r = run_etl(EtlSettings(mimic_dir=sys.argv[1], out=sys.argv[2], progress=False,
                        threads=int(sys.argv[3]), memory_limit=sys.argv[4]))
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process.
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "etl_s": r.seconds, "peak_rss_mb": hwm_kb / 1024,
                  "cpu_s": ru.ru_utime + ru.ru_stime,
                  "rows_read": r.rows_read, "counts": r.counts}))
"""


def run_etl_child(mimic: Path, out: Path, threads: int, memory_limit: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(mimic), str(out), str(threads), memory_limit],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    if proc.returncode != 0:
        raise SystemExit(f"ETL failed at {mimic}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from pipeline.etl.settings import DEFAULT_MIMIC_DIR

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--demo", type=Path, default=Path(os.environ.get("MIMIC_DIR", DEFAULT_MIMIC_DIR))
    )
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--work-dir", type=Path, default=None, help="default: a new folder in /tmp")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit", default="3GB")
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

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="icu-etl-bench-", dir="/tmp"))
    results = []
    try:
        for scale in args.scales:
            data = work / f"x{scale}"
            t = time.perf_counter()
            marker = data / "rows.json"
            if args.reuse and marker.exists():
                rows = json.loads(marker.read_text())
            else:
                rows = synthesize(args.demo, data, scale, args.threads, args.quoted)
                marker.write_text(json.dumps(rows))
            synth_s = time.perf_counter() - t
            size = sum(f.stat().st_size for f in data.glob("*.csv.gz"))
            runs = []
            for i in range(max(1, args.runs)):
                out = work / f"out{scale}-{i}"
                runs.append(run_etl_child(data, out, args.threads, args.memory_limit))
                shutil.rmtree(out, ignore_errors=True)
            runs.sort(key=lambda r: r["wall_s"])
            res = runs[len(runs) // 2]
            chart = res["rows_read"]["CHARTEVENTS"]
            assert chart == rows["CHARTEVENTS"], (chart, rows["CHARTEVENTS"])
            line = {
                "scale": scale,
                "chartevents_rows": chart,
                "input_gz_mb": round(size / 2**20, 1),
                "wall_s": round(res["wall_s"], 2),
                "etl_s": round(res["etl_s"], 2),
                "rows_per_s": round(chart / res["wall_s"]),
                "peak_rss_mb": round(res["peak_rss_mb"]),
                "cpu_s": round(res["cpu_s"], 2),
                "rows_per_cpu_s": round(chart / res["cpu_s"]),
                "stays_kept": res["counts"]["stays_kept"],
                "bins": res["counts"]["bins"],
                "synth_s": round(synth_s, 1),
                "quoted": args.quoted,
                "runs_wall_s": [round(r["wall_s"], 2) for r in runs],
            }
            results.append(line)
            print(
                f"{scale:>4}x  CHARTEVENTS {chart:>12,} rows  wall {line['wall_s']:>7.2f} s  "
                f"{line['rows_per_s']:>12,} rows/s  peak RSS {line['peak_rss_mb']:>6,} MB  "
                f"CPU {line['cpu_s']:.1f} s "
                f"({line['stays_kept']:,} stays, {line['bins']:,} bins; "
                f"input {line['input_gz_mb']} MB gz; runs {line['runs_wall_s']} s)",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
