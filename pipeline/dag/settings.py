"""Typed settings of the DAG: embedded defaults, then ``ICU_DAG_*`` environment variables, then
CLI flags. The conventional names ``MIMIC_DIR`` and ``MLFLOW_TRACKING_URI`` are read unprefixed.

Defaults train the networks closed-loop (training.config's ``default`` preset, early stopping
on the validation K-step error); ``--paper`` re-measures Zong et al.'s recipe (30 epochs,
teacher-forced). ``--epochs N`` caps the epochs (e.g. on the full MIMIC-III without a GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.dag.fetch import DEMO_URL

PAPER_EPOCHS = 30
ALL_MODELS = ("cfc", "gru", "persistence", "linear", "level", "level-direct")


class DagSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ICU_DAG_", populate_by_name=True, extra="ignore", frozen=True
    )

    mimic_dir: Path = Field(
        Path("data/raw/mimic-iii-demo"),
        validation_alias=AliasChoices("MIMIC_DIR", "ICU_DAG_MIMIC_DIR", "mimic_dir"),
        description="MIMIC-III tables (.csv or .csv.gz); when empty, the demo is downloaded",
    )
    data_dir: Path = Field(
        Path("data"), description="ETL output (<data_dir>/etl) and DAG state (<data_dir>/dag)"
    )
    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        validation_alias=AliasChoices(
            "MLFLOW_TRACKING_URI", "ICU_DAG_TRACKING_URI", "tracking_uri"
        ),
        description="MLflow tracking and registry store",
    )
    experiment: str = Field("icu-forecast", description="MLflow experiment of the runs")
    # NoDecode: ICU_DAG_MODELS=cfc,gru is a comma list, not JSON.
    models: Annotated[tuple[str, ...], NoDecode] = Field(
        ALL_MODELS, description="models to train and compare"
    )
    preset: Literal["default", "paper"] = Field(
        "default", description="training recipe of the networks (training.config.PRESETS)"
    )
    epochs: int | None = Field(
        None, ge=1, description="maximum training epochs of the networks (default: the preset's)"
    )
    seed: int = Field(0, ge=0)
    cv: bool = Field(False, description="also run the cross-validated evaluation (cv step)")
    cv_folds: int = Field(5, ge=2, description="folds of the cv step")
    cv_seeds: int = Field(3, ge=1, description="seeds of the cv step")
    fetch_url: str = Field(DEMO_URL, description="where the fetch step downloads the demo zip")
    fetch_sha256: str | None = Field(
        None,
        description="expected SHA-256 of the zip (PhysioNet's SHA256SUMS.txt is always checked)",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in value if m not in ALL_MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {list(ALL_MODELS)}")
        if not value:
            raise ValueError("at least one model is needed")
        return tuple(dict.fromkeys(value))

    @property
    def etl_dir(self) -> Path:
        return self.data_dir / "etl"

    @property
    def dag_dir(self) -> Path:
        return self.data_dir / "dag"
