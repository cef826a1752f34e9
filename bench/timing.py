"""Alternatives timed in turn in one run, so that other tenants' load falls on each alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved(
    names: list[str], repeats: int, run: Callable[[str], object]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of each ``run(name)`` per repeat, the order rotating."""
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            run(name)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu
