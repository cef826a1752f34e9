"""The code base stays ruff-clean (lint and format), checked like any other test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _ruff(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_check_is_clean(repo_root: Path) -> None:
    result = _ruff(repo_root, "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean(repo_root: Path) -> None:
    result = _ruff(repo_root, "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
