"""Helpers for tests that start real servers on loopback."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest


def wait_until_ok(
    proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path, what: str
) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not become ready:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
