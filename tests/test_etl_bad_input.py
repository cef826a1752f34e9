"""Bad input: one clear error naming the file and the problem, exit status 2, no traceback."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from etl_support import tables, write_mimic

from pipeline.cli import main


def run_cli(mimic, out, capsys, *flags: str) -> tuple[int, str]:
    code = main(["etl", "--mimic-dir", str(mimic), "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("icu-forecast etl: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_folder(tmp_path, capsys) -> None:
    code, err = run_cli(tmp_path / "nope", tmp_path / "out", capsys)
    assert code == 2
    assert "does not exist" in error_line(err)


def test_missing_table(tmp_path, capsys) -> None:
    mimic = write_mimic(tmp_path / "m")
    (mimic / "INPUTEVENTS_MV.csv.gz").unlink()
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "INPUTEVENTS_MV" in line and "not found" in line
    assert not (tmp_path / "out").exists()


def test_missing_column(tmp_path, capsys) -> None:
    mimic = write_mimic(tmp_path / "m")
    path = mimic / "CHARTEVENTS.csv.gz"
    text = gzip.decompress(path.read_bytes()).decode().replace("VALUENUM", "VALUE_NUM", 1)
    path.write_bytes(gzip.compress(text.encode()))
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "CHARTEVENTS.csv.gz" in line and "missing column(s) valuenum" in line


def _big_chart(tmp_path):
    """Enough CHARTEVENTS rows that a cut gzip stream still has a readable header."""
    rows = tables()
    extra = rows["CHARTEVENTS"][0]
    rows["CHARTEVENTS"] += [dict(extra, valuenum=80 + i % 7) for i in range(20000)]
    return write_mimic(tmp_path / "m", rows)


def test_truncated_gzip(tmp_path, capsys) -> None:
    mimic = _big_chart(tmp_path)
    path = mimic / "CHARTEVENTS.csv.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "CHARTEVENTS.csv.gz" in line and "truncated gzip" in line


def test_corrupt_gzip(tmp_path, capsys) -> None:
    mimic = write_mimic(tmp_path / "m")
    (mimic / "LABEVENTS.csv.gz").write_bytes(b"this is not gzip data\n" * 100)
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "LABEVENTS.csv.gz" in line and "gzip" in line


def test_corrupt_gzip_body(tmp_path, capsys) -> None:
    mimic = _big_chart(tmp_path)
    path = mimic / "CHARTEVENTS.csv.gz"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "CHARTEVENTS.csv.gz" in line


@pytest.mark.parametrize("content", ["header", "nothing"])
def test_empty_chartevents(tmp_path, capsys, content) -> None:
    rows = tables()
    rows["CHARTEVENTS"] = []
    mimic = write_mimic(tmp_path / "m", rows)
    if content == "nothing":
        (mimic / "CHARTEVENTS.csv.gz").write_bytes(gzip.compress(b""))
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "CHARTEVENTS.csv.gz" in line
    assert ("no data rows" if content == "header" else "empty") in line


def test_non_numeric_value(tmp_path, capsys) -> None:
    rows = tables()
    rows["CHARTEVENTS"][3] = dict(rows["CHARTEVENTS"][3], valuenum="abc")
    mimic = write_mimic(tmp_path / "m", rows)
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "CHARTEVENTS.csv.gz" in line and "'valuenum'" in line
    assert "abc" in line


def test_bad_timestamp(tmp_path, capsys) -> None:
    rows = tables()
    rows["ICUSTAYS"][0] = dict(rows["ICUSTAYS"][0], intime="yesterday")
    mimic = write_mimic(tmp_path / "m", rows)
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "ICUSTAYS.csv.gz" in line and "'intime'" in line


def test_bad_setting(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ICU_ETL_SEED", "not-a-number")
    code, err = run_cli(write_mimic(tmp_path / "m"), tmp_path / "out", capsys)
    assert code == 2 and "seed" in error_line(err)


def test_chunks_keep_quoted_line_breaks_whole() -> None:
    import io
    import queue

    from pipeline.etl.tables import _line_chunks

    rows = [b'1,"a\nb",x\n', b'2,"c ""q"" d",y\n', b"3,plain,z\n"] * 50
    data = b"".join(rows)
    for size in (1, 7, 20, 64, 1000):
        for free in (None, queue.SimpleQueue()):
            got = []
            for chunk in _line_chunks(io.BytesIO(data), size, free):
                got.append(bytes(chunk.view()))
                if free is not None:
                    free.put(chunk.buf)  # reused buffers must not leak old bytes
            assert b"".join(got) == data
            for chunk in got:
                assert chunk.count(b'"') % 2 == 0 and chunk.endswith(b"\n")


def test_chunks_flag_quotes_and_keep_an_unterminated_last_row() -> None:
    import io

    from pipeline.etl.tables import _line_chunks

    data = b"1,a\n2,b\n" * 30 + b'3,"c"\n' + b"4,d\n" * 30 + b"5,e"
    chunks = list(_line_chunks(io.BytesIO(data), 16))
    assert b"".join(bytes(c.view()) for c in chunks) == data
    # Only chunks holding a quote take Arrow's slower quote-aware path.
    for c in chunks:
        assert c.quoted == (b'"' in bytes(c.view()))
    assert any(c.quoted for c in chunks) and not all(c.quoted for c in chunks)


def test_error_rows_count_from_the_start_of_the_file(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ICU_ETL_BLOCK_SIZE_MB", "1")  # ~4 MB of rows: several blocks
    rows = tables()
    extra = rows["CHARTEVENTS"][0]
    rows["CHARTEVENTS"] += [dict(extra, valuenum=80 + i % 7) for i in range(60000)]
    bad = 45000  # 0-based among data rows: data row 45,001, far past the first block
    rows["CHARTEVENTS"][bad] = dict(extra, valuenum="abc")
    mimic = write_mimic(tmp_path / "m", rows)
    code, err = run_cli(mimic, tmp_path / "out", capsys, "--threads", "2")
    line = error_line(err)
    assert code == 2 and "data row 45,001" in line and "'abc'" in line, line

    rows["CHARTEVENTS"][bad] = dict(extra)
    mimic = write_mimic(tmp_path / "m", rows)
    path = mimic / "CHARTEVENTS.csv.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines(True)
    # Data row 52,001 is line 52,003 of the file: the header, and one earlier row holds a
    # quoted line break (rows are counted, not lines).
    lines[52002] = "1,2,3\n"
    path.write_bytes(gzip.compress("".join(lines).encode()))
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and "data row 52,001" in line and "Expected 15 columns" in line, line


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seed", "-1", "--seed=-1: Input should be greater than or equal to 0"),
        ("--memory-limit", "1KB", "below the 64 MB"),
        ("--memory-limit", "-1GB", "is not a size"),
        ("--memory-limit", "0%", "share of memory"),
        ("--threads", "0", "--threads=0: "),
        ("--max-stay-days", "0", "--max-stay-days=0: "),
    ],
)
def test_invalid_flags(tmp_path, capsys, flag, value, message) -> None:
    code, err = run_cli(write_mimic(tmp_path / "m"), tmp_path / "out", capsys, f"{flag}={value}")
    assert code == 2 and message in error_line(err)
    assert not (tmp_path / "out").exists()


def test_input_folder_that_is_a_file_or_unreadable(tmp_path, capsys, monkeypatch) -> None:
    afile = tmp_path / "tables.zip"
    afile.write_bytes(b"PK")
    code, err = run_cli(afile, tmp_path / "out", capsys)
    assert code == 2 and "is a file, not a folder" in error_line(err)

    mimic = write_mimic(tmp_path / "m")
    real_iterdir = Path.iterdir

    def denied(self):
        if self == mimic:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    # Run as root (CI containers), chmod 000 does not deny anything: inject the failure.
    monkeypatch.setattr(Path, "iterdir", denied)
    code, err = run_cli(mimic, tmp_path / "out", capsys)
    line = error_line(err)
    assert code == 2 and str(mimic) in line and "Permission denied" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the mode says")
def test_unreadable_input_folder_by_mode(tmp_path, capsys) -> None:
    mimic = write_mimic(tmp_path / "m")
    mimic.chmod(0o000)
    try:
        code, err = run_cli(mimic, tmp_path / "out", capsys)
    finally:
        mimic.chmod(0o755)
    assert code == 2 and "cannot be read" in error_line(err)


def test_unwritable_output_parent(tmp_path, capsys) -> None:
    mimic = write_mimic(tmp_path / "m")
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = run_cli(mimic, afile / "out", capsys)
    line = error_line(err)
    assert code == 2 and str(afile) in line and "is a file" in line
    assert afile.read_text() == "x"
    # A folder nobody may create (a kernel file system): refused in one line, even for root.
    code, err = run_cli(mimic, tmp_path / "out", capsys, "--temp-dir", "/proc/icu-etl-scratch")
    assert code == 2 and "--temp-dir" in error_line(err)
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, err = run_cli(mimic, ro / "out", capsys)
        assert code == 2 and "Permission denied" in error_line(err)
