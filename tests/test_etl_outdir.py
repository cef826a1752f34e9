"""``--out`` safety: the ETL replaces only a folder it wrote itself, and never touches inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from etl_support import write_mimic

from features.atomic import atomic_dir
from pipeline.cli import main


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (``root`` included) with its bytes (None for folders)."""
    out: dict[str, bytes | None] = {}
    for p in [root, *sorted(root.rglob("*"))]:
        key = str(p.relative_to(root.parent))
        out[key] = None if p.is_dir() else p.read_bytes()
    return out


def run_cli(capsys, mimic: Path, out: Path | str, *extra: str) -> tuple[int, str]:
    code = main(["etl", "--mimic-dir", str(mimic), "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("icu-forecast etl: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def mimic(tmp_path: Path) -> Path:
    return write_mimic(tmp_path / "work" / "mimic")


def test_out_equal_to_the_input_folder_is_refused(tmp_path, mimic, capsys) -> None:
    before = snapshot(tmp_path / "work")
    for spelling in (mimic, mimic / ".." / "mimic"):
        code, err = run_cli(capsys, mimic, spelling)
        line = error_line(err)
        assert code == 2 and os.path.abspath(spelling) in line and "input folder" in line
    assert snapshot(tmp_path / "work") == before


def test_out_inside_the_input_folder_is_refused(tmp_path, mimic, capsys) -> None:
    before = snapshot(tmp_path / "work")
    code, err = run_cli(capsys, mimic, mimic / "processed")
    line = error_line(err)
    assert code == 2 and str(mimic / "processed") in line and "overlaps the input" in line
    assert snapshot(tmp_path / "work") == before  # nothing created inside the inputs either


def test_out_containing_the_input_folder_is_refused(tmp_path, mimic, capsys) -> None:
    before = snapshot(tmp_path / "work")
    code, err = run_cli(capsys, mimic, tmp_path / "work")
    assert code == 2 and "overlaps the input" in error_line(err)
    assert snapshot(tmp_path / "work") == before


def test_temp_dir_inside_the_input_folder_is_refused(tmp_path, mimic, capsys) -> None:
    before = snapshot(tmp_path / "work")
    code, err = run_cli(capsys, mimic, tmp_path / "out", "--temp-dir", str(mimic / "tmp"))
    assert code == 2 and "--temp-dir" in error_line(err)
    assert snapshot(tmp_path / "work") == before
    assert not (tmp_path / "out").exists()


def test_a_users_non_empty_folder_is_refused(tmp_path, mimic, capsys, monkeypatch) -> None:
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(mine)
    code, err = run_cli(capsys, mimic, mine)
    line = error_line(err)
    assert code == 2 and str(mine) in line and "not an earlier ETL output" in line
    assert snapshot(mine) == before
    # The same through `--out .` from inside the folder.
    monkeypatch.chdir(mine)
    code, err = run_cli(capsys, mimic, ".")
    assert code == 2 and "not an earlier ETL output" in error_line(err)
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "work"]  # no debris


def test_a_foreign_data_card_does_not_make_a_folder_ours(tmp_path, mimic, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "data_card.json").write_text(json.dumps({"format": 1, "owner": "someone else"}))
    (other / "results.parquet").write_bytes(b"PAR1")
    before = snapshot(other)
    code, err = run_cli(capsys, mimic, other)
    assert code == 2 and "not an earlier ETL output" in error_line(err)
    assert snapshot(other) == before


def test_an_existing_file_is_refused(tmp_path, mimic, capsys) -> None:
    target = tmp_path / "report.txt"
    target.write_text("important")
    code, err = run_cli(capsys, mimic, target)
    line = error_line(err)
    assert code == 2 and str(target) in line and "file" in line
    assert target.read_text() == "important"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt", "work"]


def test_user_files_inside_an_earlier_output_are_kept(tmp_path, mimic, capsys) -> None:
    out = tmp_path / "out"
    assert run_cli(capsys, mimic, out)[0] == 0
    (out / "my_analysis.ipynb").write_text("{}")
    before = snapshot(out)
    code, err = run_cli(capsys, mimic, out)
    line = error_line(err)
    assert code == 2 and "my_analysis.ipynb" in line
    assert snapshot(out) == before


def test_earlier_outputs_empty_folders_and_symlinks_are_replaced(tmp_path, mimic, capsys) -> None:
    out = tmp_path / "out"
    assert run_cli(capsys, mimic, out)[0] == 0
    first = (out / "bins.parquet").read_bytes()
    assert run_cli(capsys, mimic, out)[0] == 0  # our own output: replaced
    assert (out / "bins.parquet").read_bytes() == first

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, mimic, empty)[0] == 0
    assert (empty / "bins.parquet").read_bytes() == first

    # An output from before the data card named its producer (and with a preprocessor/).
    legacy = tmp_path / "legacy"
    (legacy / "preprocessor").mkdir(parents=True)
    (legacy / "preprocessor" / "preprocessor.json").write_text("{}")
    (legacy / "bins.parquet").write_bytes(b"old")
    card = {"format": 1, "catalog_version": "x", "bins_sha256": "0" * 64}
    (legacy / "data_card.json").write_text(json.dumps(card))
    assert run_cli(capsys, mimic, legacy)[0] == 0
    assert (legacy / "bins.parquet").read_bytes() == first

    # A symlink stays a symlink; the folder it points to is replaced.
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    assert run_cli(capsys, mimic, link)[0] == 0
    assert link.is_symlink() and (out / "bins.parquet").read_bytes() == first
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_dir_never_replaces_a_file(tmp_path) -> None:
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(FileExistsError), atomic_dir(target) as staging:
        (staging / "a").write_text("y")
    assert target.read_text() == "x"
    assert os.listdir(tmp_path) == ["f"]


@pytest.mark.slow
def test_the_dag_data_folder_gets_the_same_protection(tmp_path, mimic, capsys, mlflow_uri) -> None:
    data = tmp_path / "data"
    (data / "etl").mkdir(parents=True)
    (data / "etl" / "notes.txt").write_text("not the ETL's")
    before = snapshot(data / "etl")
    args = ["--data-dir", str(data), "--mimic-dir", str(mimic)]
    assert main(["dag", "run", "--until", "etl", *args]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "not an earlier ETL output" in out
    assert snapshot(data / "etl") == before
    # The inputs as the data folder: the ETL's folder would lie inside them.
    inputs = snapshot(mimic)
    assert (
        main(["dag", "run", "--until", "etl", "--data-dir", str(mimic), "--mimic-dir", str(mimic)])
        == 1
    )
    assert "overlaps the input folder" in capsys.readouterr().out
    after = snapshot(mimic)
    assert {k: v for k, v in after.items() if k in inputs} == inputs  # nothing lost or changed
    assert not (mimic / "etl").exists()
