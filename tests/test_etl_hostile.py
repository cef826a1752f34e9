"""Hostile input for the ETL, property-based: small generated MIMIC-III folders with duplicated
rows, shuffled columns, extreme values and times, broken encodings and truncated files. Each
ends as a one-line error (exit 2) naming what was wrong, or as output whose data card accounts
for what changed; never a traceback, and the input folder is never modified. Prints the counts
tried."""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from etl_support import COLUMNS, tables
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main

pytestmark = pytest.mark.slow

TABLES = list(COLUMNS)
TOKEN = "@@BROKEN@@"
NUMBER_COLUMNS = {
    "valuenum", "value", "amount", "rate", "patientweight", "originalamount", "los", "error",
}  # fmt: skip
TIME_COLUMNS = {"intime", "outtime", "charttime", "starttime", "endtime", "storetime"}
ID_COLUMNS = {"subject_id", "hadm_id", "icustay_id", "itemid"}
EXTREME_NUMBERS = [
    "1e308", "-1e308", "1e400", "-1e400", "inf", "-inf", "Infinity", "nan", "NaN", "-0",
    "99999999999999999999999", "4.9e-324", "1,5", "abc", "", " ", "0x10",
]  # fmt: skip
EXTREME_TIMES = [
    "0001-01-01 00:00:00", "9999-12-31 23:59:59", "1677-09-21 00:12:43", "2262-04-11 23:47:17",
    "1900-01-01 00:00:00", "3000-01-01 00:00:00", "2100-02-30 00:00:00", "2100-13-01 00:00:00",
    "2100-01-01 25:00:00", "2100-01-01T00:00:00Z", "2100-01-01", "yesterday", "", "0",
    "-292277022657-01-27 08:29:52",
]  # fmt: skip
EXTREME_IDS = ["-1", "0", "9223372036854775807", "9223372036854775808", "1.5", "1e3", "x", ""]
# Infinite or negative measurements and doses: never plausible, so never silently absorbed.
# (NaN and empty read as missing; a huge finite rate is a rate, as charted.)
MUST_COUNT = {"-1e308", "1e400", "-1e400", "inf", "-inf", "Infinity"}
MEASURED = {"valuenum", "amount", "rate"}
BROKEN_BYTES = [b"\xff\xfe", b"caf\xe9", b"\x00", b"\xc3", b"\xef\xbb\xbf", b"\r", b'"']
KINDS = [
    "duplicate",
    "implausible number",
    "number",
    "time",
    "id",
    "shuffle",
    "encoding",
    "truncate",
    "corrupt_gzip",
]


@st.composite
def hostile_folders(draw) -> tuple[list[tuple[str, str]], dict, dict]:
    """(mutations applied, rows per table, how to write each table)."""
    rows = tables()
    how: dict[str, dict] = {name: {} for name in TABLES}
    applied = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(KINDS))
        name = draw(st.sampled_from(TABLES))
        table = rows[name]
        if kind not in ("shuffle", "truncate", "corrupt_gzip") and not table:
            continue
        i = draw(st.integers(0, len(table) - 1)) if table else 0
        cols = COLUMNS[name]
        if kind == "duplicate":
            for _ in range(draw(st.integers(1, 3))):
                table.insert(draw(st.integers(0, len(table))), dict(table[i]))
        elif kind in ("number", "time", "id"):
            among, values = {
                "number": (NUMBER_COLUMNS, EXTREME_NUMBERS),
                "time": (TIME_COLUMNS, EXTREME_TIMES),
                "id": (ID_COLUMNS, EXTREME_IDS),
            }[kind]
            col = draw(st.sampled_from([c for c in cols if c in among]))
            table[i][col] = value = draw(st.sampled_from(values))
            if col in MEASURED and value in MUST_COUNT:
                kind = "implausible number"
        elif kind == "implausible number":
            measured = [c for c in cols if c in MEASURED]
            if not measured:
                continue
            table[i][draw(st.sampled_from(measured))] = draw(st.sampled_from(sorted(MUST_COUNT)))
        elif kind == "shuffle":
            how[name]["order"] = draw(st.permutations(cols))
        elif kind == "encoding":
            table[i][draw(st.sampled_from(cols))] = TOKEN
            how[name]["bytes"] = draw(st.sampled_from(BROKEN_BYTES))
        elif kind == "truncate":
            how[name]["truncate"] = draw(st.floats(0.0, 1.0))
        else:
            how[name]["corrupt_gzip"] = draw(st.floats(0.0, 1.0))
        applied.append((kind, name))
    return applied, rows, how


def write(folder: Path, rows: dict, how: dict) -> None:
    folder.mkdir(parents=True)
    for name, cols in COLUMNS.items():
        order = how[name].get("order", cols)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([c.upper() for c in order])
        for i, r in enumerate(rows[name]):
            full = {c: "" for c in cols} | {"row_id": i + 1}
            full.update({k: ("" if v is None else v) for k, v in r.items()})
            writer.writerow([full[c] for c in order])
        data = buf.getvalue().encode()
        data = data.replace(TOKEN.encode(), how[name].get("bytes", b""))
        if "truncate" in how[name]:
            data = data[: int(len(data) * how[name]["truncate"])]
        packed = gzip.compress(data, mtime=0)
        if "corrupt_gzip" in how[name]:
            packed = packed[: int(len(packed) * how[name]["corrupt_gzip"])]
        (folder / f"{name}.csv.gz").write_bytes(packed)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def run_etl(mimic: Path, out: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["etl", "--mimic-dir", str(mimic), "--out", str(out), "--no-progress"])
    return code, err.getvalue()


def counters(card: dict) -> dict:
    """What the card says about the input beyond the data itself (counts, exclusions, drops)."""
    return {k: card[k] for k in ("cohort", "values", "interventions", "input_problems", "tables")}


def test_hostile_tables_end_as_one_line_errors_or_counted(tmp_path_factory) -> None:
    base = tmp_path_factory.mktemp("baseline")
    write(base / "mimic", tables(), {n: {} for n in TABLES})
    assert run_etl(base / "mimic", base / "out")[0] == 0
    base_bins = pd.read_parquet(base / "out" / "bins.parquet")
    base_card = json.loads((base / "out" / "data_card.json").read_text())
    tried: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    errors: set[str] = set()

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hostile_folders())
    def check(case) -> None:
        applied, rows, how = case
        root = tmp_path_factory.mktemp("case")
        mimic, out = root / "mimic", root / "out"
        write(mimic, rows, how)
        before = digest(mimic)
        code, err = run_etl(mimic, out)
        tried.update(kind for kind, _ in applied)
        assert "Traceback" not in err
        assert digest(mimic) == before, "the input folder was modified"
        assert sorted(p.name for p in root.iterdir()) == (
            ["mimic", "out"] if code == 0 else ["mimic"]
        ), "scratch or staging left behind"
        if code != 0:
            # One error line (the other stderr line is where the command looked).
            lines = [ln for ln in err.splitlines() if ln.startswith("icu-forecast etl: error: ")]
            assert code == 2 and len(lines) == 1, err
            assert len(err.strip().splitlines()) <= 2, err
            # It names where the problem is: a table, or the input folder.
            assert any(t in lines[0].upper() for t in TABLES) or str(mimic) in lines[0], err
            outcomes["one-line error (exit 2)"] += 1
            errors.add(lines[0].removeprefix("icu-forecast etl: error: ").replace(str(root), "~"))
            return
        card = json.loads((out / "data_card.json").read_text())
        bins = pd.read_parquet(out / "bins.parquet")
        assert (
            card["bins_sha256"] == hashlib.sha256((out / "bins.parquet").read_bytes()).hexdigest()
        )
        kinds = {kind for kind, _ in applied}
        if kinds <= {"duplicate", "shuffle"}:
            # Column order and exact repeats change nothing; repeats are counted.
            pd.testing.assert_frame_equal(bins, base_bins)
            if "duplicate" in kinds and card["input_problems"]["duplicate_rows"]["count"] == 0:
                outcomes["duplicates of rows the ETL does not read"] += 1
            else:
                outcomes["output unchanged"] += 1
        elif bins.equals(base_bins):
            outcomes["output unchanged"] += 1
        elif "implausible number" in kinds:
            # An infinite or negative value that changed the output must be accounted for in
            # the card (a drop, an exclusion, a clamp, a count).
            assert counters(card) != counters(base_card), applied
            outcomes["output changed, counted in data_card.json"] += 1
        else:
            outcomes["output changed (a plausible value or time)"] += 1

    check()
    total = sum(outcomes.values())
    print(
        f"\nETL hostile-input suite: {total} generated folders, mutations tried {dict(tried)}; "
        f"outcomes {dict(outcomes)} ({len(errors)} distinct error lines); no traceback, input "
        "never modified"
    )
    for line in sorted(errors)[:: max(1, len(errors) // 8)]:
        print(f"  e.g. {line[:160]}")
    assert total >= 90
