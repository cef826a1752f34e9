"""ETL settings: defaults < environment < flags."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import build_parser
from pipeline.etl.command import settings_from_args


def parse(*argv: str):
    return settings_from_args(build_parser(only="etl").parse_args(["etl", *argv]))


def test_defaults(monkeypatch) -> None:
    for var in ("MIMIC_DIR", "ICU_ETL_OUT", "ICU_ETL_SEED"):
        monkeypatch.delenv(var, raising=False)
    s = parse()
    assert s.out == Path("data/processed") and s.seed == 0 and s.mimic_dir.name == "mimic-iii-demo"
    assert (s.train_frac, s.val_frac) == (0.70, 0.15)


def test_environment_then_flags(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MIMIC_DIR", str(tmp_path / "env-mimic"))
    monkeypatch.setenv("ICU_ETL_SEED", "5")
    monkeypatch.setenv("ICU_ETL_OUT", str(tmp_path / "env-out"))
    s = parse()
    assert (s.mimic_dir, s.seed, s.out) == (tmp_path / "env-mimic", 5, tmp_path / "env-out")
    s = parse("--mimic-dir", str(tmp_path / "flag"), "--seed", "7")
    assert (s.mimic_dir, s.seed, s.out) == (tmp_path / "flag", 7, tmp_path / "env-out")
