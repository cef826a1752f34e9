"""Settings built from CLI flags: only given flags count; invalid values name flag and value."""

from __future__ import annotations

from argparse import Namespace

import pytest
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.errors import UserError
from features.settings import settings_from_namespace


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ICU_TEST_")

    memory_limit: str = "3GB"
    seed: int = 0


def test_only_given_flags_override_the_environment(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("ICU_TEST_SEED", "5")
    assert settings_from_namespace(_Settings, Namespace(seed=None, verbose=True), "test").seed == 5
    assert settings_from_namespace(_Settings, Namespace(seed=7), "test").seed == 7


def test_invalid_values_name_every_flag_and_value() -> None:
    with pytest.raises(UserError) as err:
        settings_from_namespace(_Settings, Namespace(seed="many", memory_limit=3), "test")
    msg = str(err.value)
    assert msg.startswith("invalid test settings: ")
    assert "--seed='many': " in msg and "--memory-limit=3: " in msg
