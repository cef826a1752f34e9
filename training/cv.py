"""Patient-grouped k-fold cross-validation of models and baselines on exactly the same windows
(protocol: docs/training.md, "Cross-validation").

Per seed the folds cover every patient once; per-patient error sums are averaged over seeds,
and intervals come from a paired bootstrap over seeds and patients (:mod:`training.skill`;
conformal coverage: over patients). Conformal
bands are calibrated per fold as training calibrates (:func:`training.intervals.held_out_coverage`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.compare import markdown_table
from training.config import TrainConfig
from training.conformal import DEFAULT_LEVELS, level_label
from training.skill import (
    PatientCounts,
    PatientErrors,
    mean_over_runs,
    pool,
    rate_ci,
    rmse_ci,
    rmse_ratio,
    skill,
)

if TYPE_CHECKING:  # the intervals module imports torch; the report needs none of it
    from training.intervals import Coverage

log = logging.getLogger("icu_forecast.cv")

BASELINE_LABELS = ("persistence", "linear", "level", "direct", "level-direct")
REFERENCE = "persistence"
# Training statistics of a report row: the mean over folds and seeds.
STAT_FIELDS = ("n_params", "train_examples_per_s", "train_seconds", "train_mem_mb", "epochs_run")

# Named variants for the case-study table: label -> TrainConfig overrides.
VARIANTS: dict[str, dict[str, object]] = {
    # the defaults (training.models.base.ModelConfig): 1 x 8, a deep ensemble of 5
    "cfc": {"model": "cfc"},
    "gru": {"model": "gru"},
    # the case study's architectures, single networks, trained with the default objective
    "cfc-2x128": {"model": "cfc", "layers": 2, "units": 128, "backbone_units": 128, "ensemble": 1},
    "gru-2x128": {"model": "gru", "layers": 2, "units": 128, "ensemble": 1},
    "lstm-2x128": {"model": "lstm", "layers": 2, "units": 128, "ensemble": 1},
    "ltc-2x128": {"model": "ltc", "layers": 2, "units": 128, "ensemble": 1},
    "cfc-ncp": {"model": "cfc-ncp", "units": 128, "backbone_units": 128, "ensemble": 1},
    # About the paper's 0.011M-parameter CfC: 2 x 32 with a 32-unit backbone, 13,426
    # parameters (GRU 2 x 128 has 166,290).
    "cfc-small": {"model": "cfc", "layers": 2, "units": 32, "backbone_units": 32, "ensemble": 1},
    # Zong et al.'s recipe: teacher-forced one-step MSE, 30 epochs, batch 64, 2 x 128
    "cfc-paper": {"model": "cfc", "preset": "paper"},
    "gru-paper": {"model": "gru", "preset": "paper"},
}


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
    """``cfc`` / ``cfc-small`` (named) or ``label=model:key=value,key=value``, where ``model``
    may also be a named variant (``tiny=cfc-small:units=8``)."""
    if "=" not in spec.split(":")[0]:
        if spec not in VARIANTS:
            raise ValueError(f"unknown model {spec!r}; named ones: {', '.join(VARIANTS)}")
        return spec, dict(VARIANTS[spec])
    label, rest = spec.split("=", 1)
    model, _, opts = rest.partition(":")
    overrides: dict[str, object] = dict(VARIANTS.get(model, {"model": model}))
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        overrides[key.replace("-", "_")] = value
    return label, overrides


@dataclass
class CvResult:
    """Per-patient measured errors per (label, k) and seed, plus per-run statistics."""

    folds: int
    seeds: tuple[int, ...]
    ks: tuple[int, ...]
    errors: dict[tuple[str, int], list[PatientErrors]] = field(default_factory=dict)
    rmse_all: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    n_windows: dict[tuple[str, int], int] = field(default_factory=dict)
    stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: float = 0.0
    # (label, k, level) -> [values inside the band, sum of band widths (scaled), values]
    # summed over every fold and seed: each measured value weighs the same, as in the RMSE.
    bands: dict[tuple[str, int, float], np.ndarray] = field(default_factory=dict)
    # The same inside / measured counts per patient, summed over folds and seeds (a seed's
    # folds hold each patient once): what the coverage's patient bootstrap resamples.
    band_patients: dict[tuple[str, int, float], PatientCounts] = field(default_factory=dict)
    levels: tuple[float, ...] = DEFAULT_LEVELS

    def add_bands(self, label: str, cov: Coverage) -> None:
        """Add one fold's band scores (:class:`training.intervals.Coverage`) to the pool."""
        for (k, level), m in cov.summary.items():
            n = m["n"]
            part = np.array([m["coverage"] * n, m["width"] * n, n]) if n else np.zeros(3)
            key = (label, k, level)
            self.bands[key] = self.bands.get(key, np.zeros(3)) + part
            if (k, level) in cov.patients:
                counts = cov.patients[(k, level)]
                pooled = self.band_patients.get(key)
                self.band_patients[key] = counts if pooled is None else pooled + counts


def run_cv(
    base: TrainConfig,
    variants: dict[str, dict[str, object]],
    folds: int = 5,
    seeds: tuple[int, ...] = (0, 1, 2),
    parent_run: str | None = None,
) -> CvResult:
    """Train and score every variant on every fold of every seed (nested MLflow runs)."""
    import lightning as L
    import mlflow
    import torch

    from training.evaluate import evaluate
    from training.intervals import coverage_metrics, held_out_coverage
    from training.models import count_parameters
    from training.train import baseline_evaluations, data_module, fit_lightning

    if base.threads:
        torch.set_num_threads(base.threads)
    # Dozens of fits: Lightning's per-fit banner (accelerators, tips) would bury the progress.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    ks = tuple(base.ks)
    res = CvResult(folds, tuple(seeds), ks)
    # (label, k) -> seed -> per fold: patient errors, sum of squared errors over all values, n
    parts: dict[tuple[str, int], dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for seed in seeds:
        for fold in range(folds):
            common = {"folds": folds, "fold": fold, "cv_seed": seed, "seed": seed}
            dm = data_module(base.model_copy(update=common))
            val, test, pre = dm.sequences["val"], dm.sequences["test"], dm.preprocessor
            baselines, evals = baseline_evaluations(base, dm, ("test",))
            evals = evals["test"]
            # The naive band, the level forecaster's (the networks' starting point) and
            # level-direct's (their forecast with no network).
            for name in (REFERENCE, "level", "level-direct"):
                res.add_bands(
                    name,
                    held_out_coverage(
                        baselines[name], val, test, evals[name].windows, pre, res.levels
                    ),
                )
            for label, overrides in variants.items():
                cfg = TrainConfig(
                    **{
                        **base.model_dump(exclude={"preset", *overrides}, exclude_unset=True),
                        **overrides,
                        **common,
                        "label": label,
                    }
                )
                dm.batch_size = cfg.batch_size  # partition and preprocessing are the fold's
                L.seed_everything(seed, workers=True, verbose=False)
                with mlflow.start_run(
                    run_name=f"{label}-seed{seed}-fold{fold}",
                    nested=parent_run is not None,
                    tags={"label": label, "fold": str(fold), "cv_seed": str(seed)},
                ) as run:
                    _, lit, _, stats = fit_lightning(cfg, dm, run.info.run_id)
                    model = lit.model.cpu().float().eval()
                    ev = evaluate(model, test, pre, ks)
                    fold_metrics = ev.metrics("fold_test")
                    fold_metrics |= ev.skill_metrics(evals[REFERENCE], "fold_test")
                    cov = held_out_coverage(model, val, test, ev.windows, pre, res.levels)
                    fold_metrics |= coverage_metrics(cov, "fold_test/")
                    res.add_bands(label, cov)
                    stats["n_params"] = float(count_parameters(model))
                    mlflow.log_metrics(
                        {k: v for k, v in (fold_metrics | stats).items() if np.isfinite(v)}
                    )
                    # The parsed values, as Lightning's logger wrote the same hyperparameters
                    # ("lr=3e-4" from the command line is 0.0003 there; MLflow refuses a change).
                    mlflow.log_params({k: str(getattr(cfg, k)) for k in overrides} | common)
                evals[label] = ev
                for key, value in stats.items():
                    res.stats.setdefault(label, {}).setdefault(key, []).append(float(value))
                skills = {
                    k: round(fold_metrics.get(f"fold_test/skill_k{k}", np.nan), 3) for k in ks
                }
                log.info("seed %d fold %d %s: skill %s", seed, fold, label, skills)
            for label, ev in evals.items():
                for k in ks:
                    if k in ev.errors:
                        n = ev.n_windows.get(k, 0)
                        sse = ev.scaled[k]["rmse"] ** 2 * n
                        parts[(label, k)][seed].append((ev.errors[k], sse, n))
    for key, by_seed in parts.items():
        runs = list(by_seed.values())
        res.errors[key] = [pool([e for e, _, _ in v]) for v in runs]
        counts = [sum(n for _, _, n in v) for v in runs]
        res.n_windows[key] = int(np.mean(counts))
        res.rmse_all[key] = [
            float(np.sqrt(sum(s for _, s, _ in v) / max(n, 1)))
            for v, n in zip(runs, counts, strict=True)
        ]
    res.seconds = time.perf_counter() - t0
    return res


def report_rows(res: CvResult, n_boot: int = 2000) -> list[dict]:
    """One row per (label, k): measured RMSE / MAE with CIs, skill against persistence with CI."""
    rows = []
    # Models first, then the baselines.
    labels = sorted({label for label, _ in res.errors}, key=lambda m: (m in BASELINE_LABELS, m))
    for label in labels:
        for k in res.ks:
            if (label, k) not in res.errors:
                continue
            runs = res.errors[(label, k)]
            e = mean_over_runs(runs)
            # Intervals over patients and seeds: each replicate resamples both.
            s, s_lo, s_hi = skill(runs, res.errors[(REFERENCE, k)], n_boot)
            lo, hi = rmse_ci(runs, n_boot)
            per_seed = [r.rmse for r in runs]
            stats = res.stats.get(label, {})
            rows.append(
                {
                    "model": label,
                    "k": k,
                    "rmse_measured": e.rmse,
                    "rmse_ci": [lo, hi],
                    "rmse_measured_seed_sd": float(np.std(per_seed, ddof=1))
                    if len(per_seed) > 1
                    else 0.0,
                    "mae_measured": e.mae,
                    "rmse_all_values": float(np.mean(res.rmse_all[(label, k)])),
                    "skill": s,
                    "skill_ci": [s_lo, s_hi],
                    "n_windows": res.n_windows[(label, k)],
                    "n_patients": len(e.patients),
                    **{
                        key: float(np.mean(stats[key])) if stats.get(key) else None
                        for key in STAT_FIELDS
                    },
                    **band_fields(res, label, k, n_boot),
                }
            )
    return rows


def band_fields(res: CvResult, label: str, k: int, n_boot: int = 2000) -> dict[str, object]:
    """The row's conformal band, keyed by level (``"0.8"``): pooled ``coverage`` with its 95%
    patient-bootstrap interval ``coverage_ci`` ([lo, hi]; None without per-patient counts),
    mean ``width`` (scaled units), ``width_vs_persistence`` (width / the conformal persistence
    band's width on the same values) and ``n_interval_values``; None where the model has no
    band (the ridge baselines)."""
    out: dict = {"coverage": {}, "coverage_ci": {}, "width": {}, "width_vs_persistence": {}}
    if (label, k, res.levels[0]) not in res.bands:
        return dict.fromkeys([*out, "n_interval_values"])
    for level in res.levels:
        inside, wsum, n = res.bands[(label, k, level)]
        ref = res.bands.get((REFERENCE, k, level))
        counts = res.band_patients.get((label, k, level))
        key = level_label(level)
        out["coverage"][key] = float(inside / n) if n else None
        ci = list(rate_ci(counts, n_boot)) if counts is not None and n else None
        out["coverage_ci"][key] = ci
        out["width"][key] = float(wsum / n) if n else None
        # Same windows and measured values for every model, so the ratio of means is the
        # ratio of summed widths.
        ratio = float(wsum / ref[1]) if ref is not None and ref[1] > 0 else None
        out["width_vs_persistence"][key] = ratio
    return out | {"n_interval_values": int(n)}


def ratio_rows(res: CvResult, pairs: list[tuple[str, str]], n_boot: int = 2000) -> list[dict]:
    """RMSE_a / RMSE_b per k on the same windows, with paired bootstrap CIs (patients and
    seeds)."""
    out = []
    for a, b in pairs:
        for k in res.ks:
            if (a, k) in res.errors and (b, k) in res.errors:
                r, lo, hi = rmse_ratio(res.errors[(a, k)], res.errors[(b, k)], n_boot)
                out.append({"a": a, "b": b, "k": k, "rmse_ratio": r, "ci": [lo, hi]})
    return out


def _fmt_ci(v: float, ci: list[float], pct: bool = False) -> str:
    if pct:
        return f"{100 * v:+.1f}% [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
    return f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def to_markdown(res: CvResult, rows: list[dict], ratios: list[dict]) -> str:
    ks = res.ks
    n_patients = rows[0]["n_patients"] if rows else 0
    lines = [
        f"Patient-grouped {res.folds}-fold cross-validation, seeds {list(res.seeds)}: every model "
        "and baseline scored on the same held-out windows. RMSE over **measured** target values "
        "at the K-th step of closed-loop K-step rollouts (true interventions fed), scaled "
        "(min-max, fitted per fold on its training patients). Skill = 1 - RMSE / RMSE of "
        "persistence on the same windows (errors averaged over seeds). Brackets: 95% paired "
        f"bootstrap over {n_patients} patients"
        + (
            " and the seeds: each replicate draws the seeds, then the patients, with replacement."
            if len(res.seeds) > 1
            else " (one seed: the interval does not see how training's initialisation varies)."
        ),
        "",
    ]
    header = ["model", "params", *(f"skill K={k}" for k in ks), *(f"RMSE K={k}" for k in ks)]
    table = []
    by = {(r["model"], r["k"]): r for r in rows}

    def stat(row: dict, key: str, spec: str) -> str:
        return format(row[key], spec) if row[key] else "-"

    for label in dict.fromkeys(r["model"] for r in rows):
        first = by[(label, ks[0])]
        skills = [
            _fmt_ci(by[(label, k)]["skill"], by[(label, k)]["skill_ci"], pct=True)
            if label != REFERENCE
            else "0 (reference)"
            for k in ks
        ]
        rmses = [_fmt_ci(by[(label, k)]["rmse_measured"], by[(label, k)]["rmse_ci"]) for k in ks]
        params, mem = stat(first, "n_params", ",.0f"), stat(first, "train_mem_mb", ".1f")
        tput = stat(first, "train_examples_per_s", ",.0f")
        table.append([label, params, *skills, *rmses, mem, tput])
    lines += markdown_table([*header, "train mem (MB)", "train ex/s"], table)
    if ratios:
        lines += ["", "RMSE ratios on the same windows (95% paired bootstrap, as above):", ""]
        by_pair = {(r["a"], r["b"], r["k"]): _fmt_ci(r["rmse_ratio"], r["ci"]) for r in ratios}
        pairs = dict.fromkeys((r["a"], r["b"]) for r in ratios)
        table = [[f"{a} / {b}", *(by_pair.get((a, b, k), "-") for k in ks)] for a, b in pairs]
        lines += markdown_table(["ratio", *(f"K={k}" for k in ks)], table)
    lines += band_markdown(res, rows)
    lines += [
        "",
        "params: the model's parameters (trained, or fitted in closed form like the level "
        "gains and the direct ridge of the networks' forecast). level-direct: the level "
        "forecaster combined with the direct ridge as the networks' forecasts are, no network. "
        "train mem: one optimisation step of one training batch as the model needs it "
        "(weights, gradients and Adam's two moments, plus every tensor autograd saves for "
        "backward; training.footprint), not a process's RSS. train ex/s: "
        "start bins per second of training-batch time, all models measured in this one run.",
        "",
        f"Wall time: {res.seconds / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def band_markdown(res: CvResult, rows: list[dict]) -> list[str]:
    """The conformal-band table: coverage, width and width against persistence's band."""
    rows = [r for r in rows if r.get("coverage")]
    if not rows:
        return []
    labels = [level_label(lv) for lv in res.levels]
    lines = [
        "",
        "Conformal prediction intervals: in each fold and seed, every network model, level and "
        "persistence is calibrated on that fold's validation patients' closed-loop rollouts "
        "exactly as training calibrates (split conformal per step and variable, stay-weighted, "
        "adaptive where it pays; docs/intervals.md) and scored on the held-out fold's "
        "**measured** values at the K-th step. Coverage and mean width (scaled min-max units) "
        "are pooled over folds and seeds, every measured value weighing the same (as in the "
        "RMSE); brackets: the coverage's 95% bootstrap interval over patients (their counts "
        "summed over folds and seeds). vs persistence: width / the conformal persistence "
        "band's width on the same values (< 1: narrower). values: measured values scored, all "
        "folds and seeds.",
        "",
    ]
    header = ["model", "K", "values"]
    header += [f"{name} {lv}" for lv in labels for name in ("coverage", "width", "vs persistence")]
    table = []
    for r in rows:
        cells = []
        for lv in labels:
            c, w, q = r["coverage"][lv], r["width"][lv], r["width_vs_persistence"][lv]
            ci = (r.get("coverage_ci") or {}).get(lv)
            cell = f"{100 * c:.1f}%" if c is not None else "-"
            if c is not None and ci is not None and np.isfinite(ci).all():
                cell += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
            cells.append(cell)
            cells.append(f"{w:.3f}" if w is not None else "-")
            if r["model"] == REFERENCE or q is None:
                cells.append("-" if q is None else "1 (reference)")
            else:
                cells.append(f"{q:.3f} ({'narrower' if q < 1 else 'not narrower'})")
        table.append([r["model"], r["k"], f"{r['n_interval_values']:,}", *cells])
    return lines + markdown_table(header, table)


REPORT_FILES = ("report.json", "report.md", "skill_vs_k.png")


def write_report(res: CvResult, out: Path, pairs: list[tuple[str, str]]) -> dict:
    """``out/report.json``, ``out/report.md`` and ``out/skill_vs_k.png`` (REPORT_FILES),
    written atomically."""
    from features.atomic import atomic_write_text
    from training import plots

    rows = report_rows(res)
    ratios = ratio_rows(res, pairs)
    report = {
        "folds": res.folds,
        "seeds": list(res.seeds),
        "ks": list(res.ks),
        "reference": REFERENCE,
        "metric": "RMSE over measured target values, scaled, K-th rollout step",
        "interval_levels": [level_label(lv) for lv in res.levels],
        "rows": rows,
        "ratios": ratios,
        "seconds": res.seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "report.md", to_markdown(res, rows, ratios))
    plots.skill_vs_k(
        [r for r in rows if r["model"] != REFERENCE],
        out / "skill_vs_k.png",
        f"Skill against persistence ({res.folds}-fold CV, {len(res.seeds)} seeds, 95% CI)",
    )
    return report


def replace_section(path: Path, title: str, body: str) -> None:
    """Write ``## title`` with ``body`` into the Markdown file ``path`` (atomically), replacing
    that section if it is there and keeping every other section as it was."""
    from features.atomic import atomic_write_text

    path = Path(path)
    text = path.read_text() if path.is_file() else "# Results\n"
    block = f"## {title}\n\n{body.rstrip()}\n\n"
    # The section runs from its heading line to the next "## " heading or the end.
    section = re.compile(rf"^## {re.escape(title)}[ \t\r]*$.*?(?=^## |\Z)", re.M | re.S)
    new, found = section.subn(lambda _: block, text, count=1)
    atomic_write_text(path, (new if found else text.rstrip() + "\n\n" + block).rstrip() + "\n")
