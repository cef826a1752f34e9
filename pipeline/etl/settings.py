"""Typed ETL settings: embedded defaults < environment variables < CLI flags."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
MIN_MEMORY_BYTES = 64 * 10**6
"""Below this DuckDB cannot hold even the demo's working set (16 MB fails, 64 MB runs)."""
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b|b)", re.IGNORECASE)
DEFAULT_MIMIC_DIR = REPO_ROOT.parent / "shared" / "data" / "mimic-iii-demo"


class EtlSettings(BaseSettings):
    """Where the MIMIC-III tables are, where the output goes, and how the run is resourced.

    Environment variables: ``MIMIC_DIR`` for the tables; ``ICU_ETL_<FIELD>`` for the rest
    (``ICU_ETL_OUT``, ``ICU_ETL_SEED``, ``ICU_ETL_MEMORY_LIMIT``, ...).
    """

    model_config = SettingsConfigDict(
        env_prefix="ICU_ETL_", extra="forbid", populate_by_name=True, validate_default=True
    )

    mimic_dir: Path = Field(
        default=DEFAULT_MIMIC_DIR,
        validation_alias=AliasChoices("mimic_dir", "MIMIC_DIR", "ICU_ETL_MIMIC_DIR"),
        description="folder with the MIMIC-III tables (.csv or .csv.gz, any case)",
    )
    out: Path = Field(default=Path("data/processed"), description="output folder")
    seed: int = Field(
        default=0, ge=0, description="seed of the train / val / test split by patient"
    )
    train_frac: float = Field(default=0.70, gt=0, lt=1)
    val_frac: float = Field(default=0.15, ge=0, lt=1)
    max_stay_days: int = Field(
        default=60,
        ge=1,
        le=3650,
        description="stays longer than this are cut to their first max_stay_days (counted)",
    )
    threads: int = Field(default=2, ge=1, le=256, description="DuckDB / Arrow threads")
    memory_limit: str = Field(
        default="3GB", description="DuckDB memory limit; beyond it DuckDB spills to temp_dir"
    )
    temp_dir: Path | None = Field(
        default=None, description="scratch folder for DuckDB (default: beside the output)"
    )
    block_size_mb: int = Field(
        default=4, ge=1, le=256, description="CSV read block size; peak memory grows with it"
    )
    progress: bool = Field(default=True, description="show a progress display per table")

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str) -> str:
        m = _SIZE.fullmatch(v.strip())
        if m is None:
            raise ValueError(
                f"{v!r} is not a size: a number and a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, "
                "TiB), e.g. 3GB, or a share of the machine's memory, e.g. 50%"
            )
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise ValueError(f"{v!r}: a share of memory must lie in (0, 100]%")
            return v.strip()
        # B, KB .. TB in powers of 1000; KiB .. TiB in powers of 1024.
        size = number * (1024 if "i" in unit else 1000) ** "bkmgt".index(unit[0])
        if size < MIN_MEMORY_BYTES:
            raise ValueError(
                f"{v!r} is below the {MIN_MEMORY_BYTES // 10**6} MB the ETL needs to run at all"
            )
        return v.strip()

    @field_validator("mimic_dir", "out", "temp_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(v).expanduser()

    @model_validator(mode="after")
    def _fractions(self) -> EtlSettings:
        if self.train_frac + self.val_frac >= 1:
            raise ValueError(
                f"train_frac + val_frac must be < 1 (got {self.train_frac} + {self.val_frac})"
            )
        return self

    @property
    def test_frac(self) -> float:
        return 1.0 - self.train_frac - self.val_frac
