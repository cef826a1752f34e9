"""Lightning callbacks measuring what the paper compares: losses, throughput, peak memory."""

from __future__ import annotations

import threading
import time

import lightning as L
import psutil
import torch


class History(L.Callback):
    """Per-epoch train / val loss, and the time spent in training batches only."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.batch_seconds = 0.0
        self.examples = 0
        self.steps = 0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.batch_seconds += time.perf_counter() - self._t0
        self.examples += int((batch["lengths"] - 1).sum())  # start bins, not padded bins
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        m = trainer.callback_metrics
        row = {k: float(m[k]) for k in ("train_loss", "val_loss", "val_rollout_mse") if k in m}
        self.epochs.append({"epoch": trainer.current_epoch, **row})


class PeakMemory:
    """Peak resident memory of this process while active (sampled), and GPU max allocated."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.proc = psutil.Process()
        self.start_rss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.start_rss = self.peak_rss = self.proc.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)

    def metrics(self, on_gpu: bool = False) -> dict[str, float]:
        """Peak memory in MB: on a GPU the device's (the process's as ``peak_rss_mb``)."""
        out = {
            "peak_mem_mb": self.peak_rss / 2**20,
            "peak_mem_delta_mb": (self.peak_rss - self.start_rss) / 2**20,
        }
        if on_gpu:
            out["peak_rss_mb"] = out["peak_mem_mb"]
            out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out
