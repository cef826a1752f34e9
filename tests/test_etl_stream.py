"""The chunked table reader: the same rows and types as one Arrow read of the whole file."""

from __future__ import annotations

import gzip
import random

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from etl_support import tables, write_mimic

from features import catalog as cat
from pipeline.cli import main
from pipeline.etl.tables import InputError, TableStats, stream_table

SPEC = {"icustay_id": pa.int64(), "itemid": pa.int64(), "charttime": pa.timestamp("s"),
        "value": pa.string(), "valuenum": pa.float64()}  # fmt: skip


def _rows(n: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    lines = [b"ROW_ID,ICUSTAY_ID,ITEMID,CHARTTIME,VALUE,VALUENUM,OTHER\n"]
    for i in range(n):
        value = rnd.choice([b"12.5", b"", b'"a, ""quoted"" value"', b'"two\nlines"', b"plain"])
        if i % 50:  # long quote-free runs, so both parse paths are taken
            value = b"plain"
        stay = b"" if i % 17 == 0 else b"%d" % (200000 + i % 9)
        minute = i % 60
        time = b"2101-03-04 05:%02d:00" % minute
        lines.append(b"%d,%s,%d,%s,%s,%d.25,x\n" % (i, stay, 211 + i % 3, time, value, i))
    return b"".join(lines)


def _expected(data: bytes) -> pa.Table:
    table = pcsv.read_csv(
        pa.py_buffer(data),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            include_columns=["ICUSTAY_ID", "ITEMID", "CHARTTIME", "VALUE", "VALUENUM"],
            column_types={"CHARTTIME": pa.timestamp("s"), "VALUE": pa.string()},
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    return table.rename_columns(list(SPEC))


@pytest.mark.parametrize("kind", ["gz", "gz-two-members", "csv"])
@pytest.mark.parametrize("block_size", [200, 4096, 1 << 20])
def test_chunked_read_equals_one_arrow_read(tmp_path, kind, block_size) -> None:
    data = _rows(3000)
    path = tmp_path / ("EVENTS.csv" if kind == "csv" else "EVENTS.csv.gz")
    if kind == "gz":
        path.write_bytes(gzip.compress(data))
    elif kind == "gz-two-members":
        half = data.index(b"\n", len(data) // 2) + 1
        path.write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]))
    else:
        path.write_bytes(data)
    stats = TableStats("EVENTS", path)
    got = pa.concat_tables(list(stream_table(path, SPEC, stats, block_size=block_size)))
    assert got.equals(_expected(data))
    assert stats.rows_read == 3000 and stats.bytes == path.stat().st_size


def test_timestamps_are_converted_after_the_filter(tmp_path) -> None:
    data = _rows(200).replace(b"2101-03-04 05:07:00", b"not a time")
    path = tmp_path / "EVENTS.csv.gz"
    path.write_bytes(gzip.compress(data))

    def drop_bad(t: pa.Table) -> pa.Table:
        return t.filter(pa.compute.not_equal(t.column("charttime"), "not a time"))

    stats = TableStats("EVENTS", path)
    got = pa.concat_tables(list(stream_table(path, SPEC, stats, transform=drop_bad)))
    assert got.schema.field("charttime").type == pa.timestamp("s")
    assert got.num_rows == 200 - data.count(b"not a time")
    with pytest.raises(InputError, match=r"EVENTS\.csv\.gz: column 'charttime':.*not a time"):
        list(stream_table(path, SPEC, TableStats("EVENTS", path)))


def test_bad_event_timestamp_names_file_and_column(tmp_path, capsys) -> None:
    rows = tables()
    chart_ids = set(cat.chart_itemids())
    i = next(i for i, r in enumerate(rows["CHARTEVENTS"]) if int(r["itemid"]) in chart_ids)
    rows["CHARTEVENTS"][i] = dict(rows["CHARTEVENTS"][i], charttime="yesterday")
    mimic = write_mimic(tmp_path / "m", rows)
    code = main(["etl", "--mimic-dir", str(mimic), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("icu-forecast etl: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "CHARTEVENTS.csv.gz" in lines[0] and "'charttime'" in lines[0]
    assert "yesterday" in lines[0]


def test_quoted_row_longer_than_a_block_keeps_its_line_breaks(tmp_path) -> None:
    # A quoted value with line breaks, far longer than a block: its chunk spans several reads
    # and must still be parsed as one row, not cut at a line break inside the quotes.
    long_value = b'"' + b"line,\n" * 2000 + b'"'
    data = _rows(400).replace(b",plain,", b"," + long_value + b",", 3)
    path = tmp_path / "EVENTS.csv.gz"
    path.write_bytes(gzip.compress(data))
    stats = TableStats("EVENTS", path)
    got = pa.concat_tables(list(stream_table(path, SPEC, stats, block_size=256)))
    assert got.equals(_expected(data))
    assert stats.rows_read == 400
    assert got.column("value").to_pylist().count(long_value[1:-1].decode()) == 3
