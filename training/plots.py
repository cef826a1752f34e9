"""Artifact plots: RMSE vs K, noise degradation, training curves, predicted vs true stays."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from features.catalog import STATE_BY_NAME, STATE_NAMES  # noqa: E402

TRAJECTORY_VARIABLES = ("heart_rate", "mbp", "spo2", "creatinine")
Draw = Callable[[plt.Axes, dict, np.ndarray, int], None]  # one panel of a stay grid


def _save(fig, path: Path, dpi: int = 120, rect: tuple | None = None) -> Path:  # noqa: ANN001
    fig.tight_layout(**({"rect": rect} if rect else {}))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def rmse_vs_k(curves: dict[str, dict[int, float]], path: Path, title: str) -> Path:
    """One line per model: test RMSE (scaled) of the K-th rollout step against K."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, by_k) in enumerate(curves.items()):
        ks = sorted(by_k)
        ax.plot(
            ks,
            [by_k[k] for k in ks],
            marker="o",
            lw=2.5 if i == 0 else 1.5,
            ls="-" if i == 0 else "--",
            label=name,
        )
    ax.set(xlabel="rollout step K (12-hour bins ahead)", ylabel="RMSE (scaled, min-max units)")
    ax.set(xticks=sorted({k for c in curves.values() for k in c}), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def noise_curves(noise: dict[tuple[int, float], float], path: Path, title: str) -> Path:
    """RMSE against input-noise sigma, one line per K, with relative degradation annotated."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ks = sorted({k for k, _ in noise})
    sigmas = sorted({s for _, s in noise})
    for k in ks:
        r = np.array([noise[(k, s)] for s in sigmas])
        axes[0].plot(sigmas, r, marker="o", label=f"K={k}")
        axes[1].plot(sigmas, 100 * (r / r[0] - 1), marker="o", label=f"K={k}")
    axes[0].set_ylabel("RMSE (scaled)")
    axes[1].set_ylabel("RMSE increase vs sigma=0 (%)")
    for ax in axes:
        ax.set_xlabel("noise sigma (fraction of min-max range)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right")
    fig.suptitle(title)
    return _save(fig, path, rect=(0, 0, 0.92, 1))


def training_curves(history: list[dict], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "val_loss"):
        vals = [h.get(key, np.nan) for h in history]
        ax.plot(epochs, vals, marker=".", label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="MSE (scaled)", yscale="log", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def _stay_grid(
    stays: list[dict], variables: tuple[str, ...], cell: tuple[float, float], draw: Draw
) -> tuple[plt.Figure, np.ndarray]:
    """Rows: stays; columns: variables. Each panel: the (filled) truth against the bin's time
    ``x`` and its measured values as dots, then ``draw(ax, stay, x, j)`` for variable j."""
    fig, axes = plt.subplots(
        len(stays),
        len(variables),
        figsize=(cell[0] * len(variables), cell[1] * len(stays)),
        squeeze=False,
    )
    for r, stay in enumerate(stays):
        x = np.arange(len(stay["truth"])) * 12 / 24  # days since ICU admission
        for c, name in enumerate(variables):
            ax, j = axes[r, c], STATE_NAMES.index(name)
            ax.plot(x, stay["truth"][:, j], color="black", lw=1.2, label="truth (filled)")
            obs = stay["observed"][:, j] > 0
            ax.plot(x[obs], stay["truth"][obs, j], "k.", ms=5, label="measured")
            draw(ax, stay, x, j)
            if r == 0:
                ax.set_title(f"{name} [{STATE_BY_NAME[name].unit}]", fontsize=9)
            if c == 0:
                ax.set_ylabel(stay.get("label", f"stay {r + 1}"), fontsize=9)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("days since ICU admission")
    return fig, axes


def trajectories(
    stays: list[dict], path: Path, title: str, variables: tuple[str, ...] = TRAJECTORY_VARIABLES
) -> Path:
    """Rows: stays; columns: variables. Truth, one-step predictions and a K-step rollout.

    Each stay dict: ``truth`` (n, 18) physical, ``observed`` (n, 18) mask, ``one_step`` (n-1, 18)
    predictions of bins 1..n-1, ``rollout_start`` s and ``rollout`` (K, 18) for bins s+1..s+K.
    """

    def draw(ax: plt.Axes, stay: dict, t: np.ndarray, j: int) -> None:
        ax.plot(t[1:], stay["one_step"][:, j], color="tab:blue", lw=1.2, label="1-step")
        s, k = stay["rollout_start"], len(stay["rollout"])
        rollout = np.r_[stay["truth"][s, j], stay["rollout"][:, j]]
        ax.plot(t[s : s + k + 1], rollout, "o-", color="tab:red", ms=3, label=f"{k}-step rollout")
        ax.axvline(t[s], color="tab:red", alpha=0.3, ls=":")

    fig, axes = _stay_grid(stays, variables, (3.2, 2.4), draw)
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path, dpi=110)


def skill_vs_k(rows: list[dict], path: Path, title: str) -> Path:
    """Skill against persistence (1 - RMSE ratio) per model against K, with 95% CI bars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        mine = sorted((r for r in rows if r["model"] == label), key=lambda r: r["k"])
        x = np.arange(len(mine)) + (i - (len(labels) - 1) / 2) * width
        y = np.array([100 * r["skill"] for r in mine])
        err = np.array([[y[j] - 100 * r["skill_ci"][0], 100 * r["skill_ci"][1] - y[j]]
                        for j, r in enumerate(mine)]).T  # fmt: skip
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=label)
    ks = sorted({r["k"] for r in rows})
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(np.arange(len(ks)), [f"K={k}" for k in ks])
    ax.set(ylabel="skill vs persistence (%), measured values", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def coverage_vs_nominal(by_k: dict[int, dict[float, float]], path: Path, title: str) -> Path:
    """Empirical coverage against the nominal level, one line per K; the diagonal is ideal."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="nominal")
    for k in sorted(by_k):
        levels = sorted(by_k[k])
        ax.plot(levels, [by_k[k][lv] for lv in levels], marker="o", label=f"K={k}")
    lo = min(min(c) for c in by_k.values()) if by_k else 0.5
    ax.set(xlim=(lo - 0.05, 1.0), ylim=(lo - 0.05, 1.0), xlabel="nominal level")
    ax.set_ylabel("empirical coverage (measured test values)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def fan_charts(stays: list[dict], path: Path, title: str) -> Path:
    """Per stay (row) and variable (column): the truth, the rollout from bin ``rollout_start``
    and its ``bands`` (widest first, lighter), measured values as dots."""

    def draw(ax: plt.Axes, st: dict, t: np.ndarray, j: int) -> None:
        s = st["rollout_start"]
        steps = t[s + 1 : s + 1 + len(st["rollout"])]
        for i, (lv, (lo, hi)) in enumerate(sorted(st["bands"].items(), reverse=True)):
            ax.fill_between(
                steps, lo[:, j], hi[:, j], color="tab:blue", alpha=0.15 + 0.15 * i,
                label=f"{lv:g} band",
            )  # fmt: skip
        ax.plot(steps, st["rollout"][:, j], "o-", color="tab:blue", ms=3, label="forecast")
        ax.axvline(t[s], color="grey", lw=0.8, ls=":")
        ax.tick_params(labelsize=7)

    fig, axes = _stay_grid(stays, TRAJECTORY_VARIABLES, (3.6, 2.6), draw)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title)
    return _save(fig, path, dpi=110, rect=(0, 0.05, 1, 1))
