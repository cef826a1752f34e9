"""train_model: fit one model, evaluate it on the test split, log everything to MLflow."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from math import inf
from pathlib import Path

import lightning as L
import numpy as np
import torch

from features.catalog import catalog_version
from training import tracking
from training.callbacks import History, PeakMemory
from training.config import TrainConfig
from training.conformal import Calibration, stay_windows
from training.data import BinsDataModule, StaySequences
from training.evaluate import Evaluation, evaluate, evaluate_direct, latency
from training.footprint import training_step_bytes
from training.forecaster import Forecaster
from training.intervals import coverage, coverage_metrics, held_out_coverage, interval_metrics
from training.lit import LitDynamics
from training.models import DynamicsModel, ModelConfig, build_model, count_parameters
from training.models.baselines import Linear
from training.models.direct import DirectRidge
from training.models.factory import BASELINES
from training.models.level import LevelMemory, start_from_ridge
from training.registry import registered_name
from training.rollout import state_bounds

log = logging.getLogger("icu_forecast.training")
# Coverage against nominal is plotted over these levels (the calibration serves any level).
PLOT_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class TrainResult:
    """What one run produced. On non-zero DDP ranks only ``model`` is set."""

    run_id: str | None
    model: str
    registered_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    label: str | None = None


def fit_baseline(model: DynamicsModel, seqs: StaySequences) -> dict[str, float]:
    """Fit a baseline in closed form on the training stays ``seqs``: the one-step ridge, or
    the level forecaster's gains and, for ``level-direct``, its direct ridge (persistence has
    nothing to fit)."""
    t0 = time.perf_counter()
    if isinstance(model, Linear):
        x = np.concatenate([x[:-1] for x in seqs.inputs]).astype(np.float64)
        model.fit_ridge(x, np.concatenate([s[1:] for s in seqs.state]).astype(np.float64))
    elif isinstance(model, LevelMemory):
        start_from_ridge(model, seqs.inputs, model.cfg.level_alpha)
        fit_direct(model, seqs)
    else:
        return {}
    dt = time.perf_counter() - t0
    return {"train_examples_per_s": seqs.n_transitions / dt, "train_seconds": dt}


_NOT_IN_CHECKPOINT_KEY = {
    "resume", "tracking_uri", "register_model", "plots", "checkpoint_dir", "epochs",
    "patience", "threads", "ks", "sigmas",
}  # fmt: skip


def _checkpoint_dir(cfg: TrainConfig, checksum: str) -> Path:
    key = json.dumps(
        {"cfg": cfg.model_dump(mode="json", exclude=_NOT_IN_CHECKPOINT_KEY), "data": checksum},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cfg.checkpoint_dir / f"{cfg.run_label}-seed{cfg.seed}-{digest}"


def _is_launcher_child() -> bool:
    """True in the processes Lightning's DDP launcher starts (they re-run this command)."""
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0


def data_module(cfg: TrainConfig) -> BinsDataModule:
    """The DataModule of ``cfg`` with its partition decided and preprocessing fitted."""
    keys = {"batch_size", "num_workers", "folds", "fold", "cv_seed", "cv_pool"}
    dm = BinsDataModule(cfg.data, **cfg.model_dump(include=keys))
    dm.setup("fit")
    return dm


def fit_direct(model: DynamicsModel, seqs: StaySequences) -> None:
    """Fit the model's direct ridge, if it has one, on the training stays ``seqs`` (their
    patients are the groups of its penalty search)."""
    if isinstance(getattr(model, "direct", None), DirectRidge):
        model.direct.fit(seqs.inputs, seqs.state, groups=seqs.subject_ids)


def build_lit(cfg: TrainConfig, dm: BinsDataModule) -> LitDynamics:
    lo, hi = state_bounds(dm.preprocessor, torch.float32)
    mcfg = cfg.model_cfg()
    keys = {"lr", "weight_decay", "objective", "rollout_k", "measured_only"}
    lit = LitDynamics(
        mcfg.to_dict(), bounds=(lo.tolist(), hi.tolist()), **cfg.model_dump(include=keys)
    )
    if mcfg.level_memory:
        start_from_ridge(lit.model, dm.sequences["train"].inputs, mcfg.level_alpha)
    fit_direct(lit.model, dm.sequences["train"])
    return lit


def fit_lightning(
    cfg: TrainConfig,
    dm: BinsDataModule,
    run_id: str | None = None,
) -> tuple[L.Trainer, LitDynamics, History, dict[str, float]]:
    """Train ``cfg``'s network on ``dm``; with ``run_id`` Lightning's MLFlowLogger writes the
    per-epoch curves into that MLflow run."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    ckpt_dir = _checkpoint_dir(cfg, f"{dm.checksum}-{dm.partition.name}")
    last = ckpt_dir / "last.ckpt"
    if not cfg.resume and ckpt_dir.exists() and not _is_launcher_child():
        shutil.rmtree(ckpt_dir)  # a fresh run must not mix with an old one's checkpoints
    logger = False
    if run_id is not None:
        # The store the config names (as tracking.setup resolved it), not MLflow's global.
        uri = tracking.tracking_uri(cfg.tracking_uri)
        logger = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=uri, run_id=run_id)
    history = History()
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=cfg.monitor, save_top_k=1, save_last=True
    )
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=int(cfg.devices) if cfg.devices.isdigit() else cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
        num_nodes=cfg.num_nodes,
        gradient_clip_val=cfg.grad_clip or None,
        callbacks=[history, checkpoint, EarlyStopping(cfg.monitor, patience=cfg.patience)],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=False,
    )
    lit = build_lit(cfg, dm)
    first = next(iter(dm.train_dataloader()))
    footprint = training_step_bytes(lambda: lit._loss(first)[0], list(lit.parameters()))
    resuming = cfg.resume and last.exists()
    with PeakMemory() as mem, warnings.catch_warnings():
        # Tiny data: Lightning's "few batches / num_workers" advice does not apply.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        # The model training starts from (persistence, or the level gains' ridge fit) is a
        # candidate too: if no epoch beats it on validation, it is what training returns.
        start = start_score = None
        if not resuming:
            start = copy.deepcopy(lit.state_dict())
            start_score = float(trainer.validate(lit, datamodule=dm, verbose=False)[0][cfg.monitor])
        trainer.fit(lit, datamodule=dm, ckpt_path=str(last) if resuming else None)
        on_gpu = trainer.strategy.root_device.type == "cuda"
    stats = mem.metrics(on_gpu) | footprint
    if history.batch_seconds > 0:
        stats["train_examples_per_s"] = history.examples / history.batch_seconds
        stats["train_steps_per_s"] = history.steps / history.batch_seconds
    stats["train_seconds"] = history.batch_seconds
    stats["train_steps"] = float(history.steps)  # in this process (a resumed run: the rest)
    stats["epochs_run"] = float(trainer.current_epoch)
    stats["world_size"] = float(trainer.world_size)
    best_key, stats["kept_start"] = "best_" + cfg.monitor, 0.0
    if trainer.is_global_zero and checkpoint.best_model_path:
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
        lit.load_state_dict(best["state_dict"])
        stats[best_key] = float(checkpoint.best_model_score)
    if trainer.is_global_zero and start is not None and start_score <= stats.get(best_key, inf):
        lit.load_state_dict(start)
        stats[best_key], stats["kept_start"] = start_score, 1.0
    return trainer, lit, history, stats


def train_model(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.model``, evaluate it and the baselines on the same windows, log one run.

    The MLflow run is open while Lightning trains (its MLFlowLogger writes the per-epoch
    curves into it), so a crash leaves a FAILED run holding what was logged so far.
    """
    import mlflow

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = data_module(cfg)
    mcfg = cfg.model_cfg()
    if _is_launcher_child():
        # A DDP worker started by Lightning's launcher: it trains its share; rank 0 (the
        # original process) owns the MLflow run, evaluates and logs.
        fit_lightning(cfg, dm)
        return TrainResult(None, cfg.model, label=cfg.run_label)
    tracking.setup(cfg.tracking_uri, cfg.experiment)
    tags = {
        "code_version": tracking.code_version(),
        "data_checksum": dm.checksum,
        "model": cfg.model,
        "label": cfg.run_label,
        "partition": dm.partition.name,
    }
    with mlflow.start_run(run_name=f"{cfg.run_label}-seed{cfg.seed}", tags=tags) as run:
        history: list[dict] = []
        if cfg.model in BASELINES:
            model = build_model(mcfg)
            train_stats = fit_baseline(model, dm.sequences["train"])
        else:
            trainer, lit, hist, train_stats = fit_lightning(cfg, dm, run.info.run_id)
            if not trainer.is_global_zero:
                return TrainResult(None, cfg.model, label=cfg.run_label)
            model, history = lit.model, hist.epochs
        model = model.cpu().float().eval()
        return _evaluate_and_log(cfg, model, dm, history, train_stats, run.info.run_id)


def baseline_evaluations(
    cfg: TrainConfig, dm: BinsDataModule, splits: tuple[str, ...]
) -> tuple[dict[str, DynamicsModel], dict[str, dict[str, Evaluation]]]:
    """Persistence, the one-step ridge, the level forecaster and the level forecaster combined
    with the direct ridge as the networks' forecasts are (the models returned), and the direct
    K-step ridge alone, fitted on the training patients, on the windows of each of
    ``splits``: ``{split: {name: Evaluation}}``."""
    pre, train, ks = dm.preprocessor, dm.sequences["train"], tuple(cfg.ks)
    fields = {"ridge_alpha": cfg.ridge_alpha, "level_alpha": cfg.level_alpha}
    # level-direct's ridge covers every evaluated K, so it is also the direct baseline.
    fields["direct_horizon"] = max(*ks, cfg.direct_horizon)
    models = {name: build_model(ModelConfig(model=name, **fields)) for name in BASELINES}
    for model in models.values():
        fit_baseline(model, train)
    direct = models["level-direct"].direct
    out: dict[str, dict[str, Evaluation]] = {}
    for split in splits:
        seqs = dm.sequences[split]
        out[split] = {name: evaluate(b, seqs, pre, ks) for name, b in models.items()}
        out[split]["direct"] = evaluate_direct(direct, seqs, pre, ks)
    return models, out


def _evaluate_and_log(
    cfg: TrainConfig,
    model: torch.nn.Module,
    dm: BinsDataModule,
    history: list[dict],
    train_stats: dict[str, float],
    run_id: str,
) -> TrainResult:
    import mlflow
    import pandas as pd

    from training.pyfunc import log_pyfunc, save_model_dir

    ks, sigmas, mcfg = tuple(cfg.ks), tuple(cfg.sigmas), cfg.model_cfg()
    pre = dm.preprocessor
    test, val = dm.sequences["test"], dm.sequences["val"]
    ev_test = evaluate(model, test, pre, ks, sigmas, seed=cfg.seed)
    ev_val = evaluate(model, val, pre, ks)
    # Baselines on exactly the same windows: skill is only meaningful against them.
    base_models, base = baseline_evaluations(cfg, dm, ("test", "val"))
    base_test, base_val = base["test"], base["val"]

    # Conformal intervals: calibrated on val, scored on test (training/intervals.py), and the
    # same recipe applied to persistence: the naive reference band.
    calibration, cov, metrics = interval_metrics(model, val, test, pre, ev_test)
    persistence = base_models["persistence"]
    p_cov = held_out_coverage(persistence, val, test, base_test["persistence"].windows, pre)
    metrics |= coverage_metrics(p_cov, "baseline/persistence_")
    forecaster = Forecaster(
        model, pre, cfg.model, config=mcfg.to_dict(), data_checksum=dm.checksum,
        calibration=calibration,
    )  # fmt: skip
    metrics |= ev_test.metrics("test")
    metrics |= ev_val.metrics("val")
    metrics |= ev_test.skill_metrics(base_test["persistence"], "test")
    metrics |= ev_val.skill_metrics(base_val["persistence"], "val")
    for name, ev in base_test.items():
        for k, m in ev.scaled.items():
            metrics[f"baseline/{name}_rmse_k{k}"] = m["rmse"]
        for k, m in ev.observed.items():
            metrics[f"baseline/{name}_rmse_measured_k{k}"] = m["rmse"]
        if name != "persistence":
            metrics |= ev.skill_metrics(base_test["persistence"], "baseline", f"{name}_skill")
    metrics["n_params"] = float(count_parameters(model))
    metrics |= train_stats
    metrics |= latency(forecaster, test)
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}

    params = cfg.model_dump(
        mode="json", exclude={"tracking_uri", "register_model", "plots", "resume"}
    )
    params |= {
        "label": cfg.run_label,
        "data_checksum": dm.checksum,
        "catalog_version": catalog_version(),
        "partition": dm.partition.name,
    }
    # MLFlowLogger already logged the Trainer's hyperparameters under other names.
    mlflow.log_params(
        {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in params.items()}
    )
    mlflow.log_metrics(metrics)
    per_variable = pd.DataFrame(ev_test.per_variable)
    mlflow.log_table(per_variable, "per_variable_test.json")
    if cov.rows:
        mlflow.log_table(pd.DataFrame(cov.rows), "intervals_test.json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_variable.to_csv(tmp / "per_variable_test.csv", index=False)
        mlflow.log_artifact(str(tmp / "per_variable_test.csv"))
        if cfg.plots:
            _plots(cfg, ev_test, base_test, history, test, pre, calibration, tmp / "plots")
            mlflow.log_artifacts(str(tmp / "plots"), artifact_path="plots")
        meta = {k: params[k] for k in ("catalog_version", "data_checksum", "label", "seed")}
        meta["model_name"] = cfg.model
        validation = ("val/skill", "val/rmse_measured")
        meta["validation"] = {k: v for k, v in metrics.items() if k.startswith(validation)}
        model_dir = save_model_dir(tmp / "model_files", model, mcfg, pre, meta, calibration)
        mlflow.log_artifact(str(model_dir / "model.pt"), artifact_path="state_dict")
        info = log_pyfunc(
            model_dir, registered_name(cfg.model) if cfg.register_model else None, forecaster
        )
        version = info.registered_model_version
    log.info(
        "run %s: %s test RMSE (measured) %s, skill %s",
        run_id,
        cfg.run_label,
        {k: round(v["rmse"], 4) for k, v in ev_test.observed.items()},
        {k: round(metrics.get(f"test/skill_k{k}", float("nan")), 3) for k in ks},
    )
    return TrainResult(
        run_id, cfg.model, str(version) if version is not None else None, metrics, cfg.run_label
    )


def _plots(
    cfg: TrainConfig,
    ev: Evaluation,
    baselines: dict[str, Evaluation],
    history: list[dict],
    test: StaySequences,
    pre,  # noqa: ANN001
    cal: Calibration,
    out: Path,
) -> None:
    from training import plots

    out.mkdir(parents=True, exist_ok=True)
    title = f"{cfg.run_label}, seed {cfg.seed}"
    # Measured values only: imputed "truth" favours persistence by construction.
    models = {cfg.run_label: ev, **baselines}
    plots.rmse_vs_k(
        {n: {k: m["rmse"] for k, m in e.observed.items()} for n, e in models.items()},
        out / "rmse_vs_k.png",
        f"Test RMSE (measured values) vs rollout length ({title})",
    )
    if ev.noise:
        plots.noise_curves(
            {key: m["rmse"] for key, m in ev.noise.items()},
            out / "noise.png",
            f"Input-noise robustness ({title})",
        )
    if history:
        plots.training_curves(history, out / "training_curves.png", f"Training curves ({title})")
    grid = coverage(cal, ev.windows, test.raw_state, pre, PLOT_LEVELS).summary
    plots.coverage_vs_nominal(
        {
            k: {lv: grid[(k, lv)]["coverage"] for lv in PLOT_LEVELS}
            for k in ev.windows
            if (k, PLOT_LEVELS[0]) in grid
        },
        out / "interval_coverage.png",
        f"Test coverage of the conformal bands ({title})",
    )
    w1, wk = ev.windows[min(ev.windows)], ev.windows[max(ev.windows)]
    stays = []
    for n, j in enumerate(wk.middle_windows([len(s) for s in test.state])):
        i, s = wk.stay[j], int(wk.start[j])
        rollout = pre.unscale_state(wk.pred[j : j + 1])
        bands = cal.intervals(
            rollout, stay_windows(test.raw_state, [i], [s], cal.lookback), cal.levels
        )
        stays.append(
            {
                "truth": test.physical[i],
                "observed": ~np.isnan(test.raw_state[i]),
                "one_step": pre.unscale_state(w1.pred[w1.stay == i][:, 0]),
                "rollout_start": s,
                "rollout": rollout[0],
                "bands": {lv: (lo[0], hi[0]) for lv, (lo, hi) in bands.items()},
                "label": f"test stay {n + 1}",
            }
        )
    if stays:
        plots.trajectories(
            stays, out / "trajectories.png", f"Test stays: truth vs predictions ({title})"
        )
        plots.fan_charts(
            stays, out / "interval_fans.png", f"Test stays: {wk.k}-step bands ({title})"
        )
