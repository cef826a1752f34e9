"""Artifact plots: RMSE vs K, noise degradation, training curves, predicted vs true stays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from features.catalog import STATE_BY_NAME, STATE_NAMES  # noqa: E402

TRAJECTORY_VARIABLES = ("heart_rate", "mbp", "spo2", "creatinine")


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
    ax.set_xlabel("rollout step K (12-hour bins ahead)")
    ax.set_ylabel("RMSE (scaled, min-max units)")
    ax.set_xticks(sorted({k for c in curves.values() for k in c}))
    ax.set_title(title)
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
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (scaled)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def trajectories(
    stays: list[dict], path: Path, title: str, variables: tuple[str, ...] = TRAJECTORY_VARIABLES
) -> Path:
    """Rows: stays; columns: variables. Truth, one-step predictions and a K-step rollout.

    Each stay dict: ``truth`` (n, 18) physical, ``observed`` (n, 18) mask, ``one_step`` (n-1, 18)
    predictions of bins 1..n-1, ``rollout_start`` s and ``rollout`` (K, 18) for bins s+1..s+K.
    """
    cols = [STATE_NAMES.index(v) for v in variables]
    fig, axes = plt.subplots(
        len(stays), len(cols), figsize=(3.2 * len(cols), 2.4 * len(stays)), squeeze=False
    )
    for r, stay in enumerate(stays):
        n = len(stay["truth"])
        t = np.arange(n) * 12 / 24  # days since ICU admission
        for c, j in enumerate(cols):
            ax = axes[r, c]
            ax.plot(t, stay["truth"][:, j], color="black", lw=1.2, label="true (imputed)")
            obs = stay["observed"][:, j] > 0
            ax.plot(t[obs], stay["truth"][obs, j], "k.", ms=5, label="measured")
            ax.plot(t[1:], stay["one_step"][:, j], color="tab:blue", lw=1.2, label="1-step")
            s = stay["rollout_start"]
            k = len(stay["rollout"])
            ax.plot(
                t[s : s + k + 1],
                np.r_[stay["truth"][s, j], stay["rollout"][:, j]],
                color="tab:red",
                lw=1.5,
                marker="o",
                ms=3,
                label=f"{k}-step rollout",
            )
            ax.axvline(t[s], color="tab:red", alpha=0.3, ls=":")
            unit = STATE_BY_NAME[variables[c]].unit
            if r == 0:
                ax.set_title(f"{variables[c]} [{unit}]")
            if r == len(stays) - 1:
                ax.set_xlabel("days since ICU admission")
            if c == 0:
                ax.set_ylabel(stay.get("label", f"stay {r + 1}"))
            ax.grid(alpha=0.3)
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
    ax.set_ylabel("skill vs persistence (%), measured values")
    ax.set_title(title)
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
    ax.set_xlim(lo - 0.05, 1.0)
    ax.set_ylim(lo - 0.05, 1.0)
    ax.set_xlabel("nominal level")
    ax.set_ylabel("empirical coverage (measured test values)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def fan_charts(stays: list[dict], path: Path, title: str) -> Path:
    """Per stay (row) and variable (column): the truth, the rollout from bin ``start`` and its
    bands (widest first, lighter), measured values as dots."""
    names = TRAJECTORY_VARIABLES
    fig, axes = plt.subplots(
        len(stays), len(names), figsize=(3.6 * len(names), 2.6 * len(stays)), squeeze=False
    )
    for r, st in enumerate(stays):
        n = len(st["truth"])
        s = st["start"]
        h = len(st["forecast"])
        steps = np.arange(s + 1, s + 1 + h)
        for c, name in enumerate(names):
            j = STATE_NAMES.index(name)
            ax = axes[r, c]
            ax.plot(np.arange(n), st["truth"][:, j], color="black", lw=1, label="truth (filled)")
            m = st["observed"][:, j]
            ax.plot(np.flatnonzero(m), st["truth"][m, j], "k.", ms=5, label="measured")
            for i, (lv, (lo, hi)) in enumerate(sorted(st["bands"].items(), reverse=True)):
                ax.fill_between(
                    steps, lo[:, j], hi[:, j], color="tab:blue", alpha=0.15 + 0.15 * i,
                    label=f"{lv:g} band",
                )  # fmt: skip
            ax.plot(steps, st["forecast"][:, j], color="tab:blue", marker="o", ms=3,
                    label="forecast")  # fmt: skip
            ax.axvline(s, color="grey", lw=0.8, ls=":")
            if r == 0:
                ax.set_title(f"{name} ({STATE_BY_NAME[name].unit})", fontsize=9)
            if c == 0:
                ax.set_ylabel(st["label"], fontsize=9)
            ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("bin (12 h)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title)
    return _save(fig, path, dpi=110, rect=(0, 0.05, 1, 1))
