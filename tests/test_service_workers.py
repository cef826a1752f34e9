"""The run folder that spans `serve --workers N`: the reload generation and its watcher."""

from __future__ import annotations

import asyncio
import threading

from service.workers import bump_generation, read_generation, watch_generation


def test_generation_starts_at_zero_and_bumps_never_merge(tmp_path):
    assert read_generation(tmp_path) == 0
    threads = [threading.Thread(target=bump_generation, args=(tmp_path,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert read_generation(tmp_path) == 8
    assert bump_generation(tmp_path) == 9


def test_watcher_reloads_once_per_new_generation(tmp_path):
    seen = {"g": read_generation(tmp_path)}
    calls: list[int] = []

    async def reload(g: int) -> None:
        seen["g"] = g
        calls.append(g)

    async def scenario() -> None:
        task = asyncio.create_task(watch_generation(tmp_path, lambda: seen["g"], reload, 0.01))
        await asyncio.sleep(0.05)
        assert calls == []  # nothing asked yet
        bump_generation(tmp_path)
        await asyncio.sleep(0.05)
        # A generation this worker produced itself (endpoint reload) is not reloaded again.
        seen["g"] = bump_generation(tmp_path)
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(scenario())
    assert calls == [1]
