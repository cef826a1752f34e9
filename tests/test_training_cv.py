"""``icu-forecast cv`` and the overall champion, end to end on tiny synthetic bins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import write_synthetic_etl_output

pytestmark = pytest.mark.slow

TINY = ["--units", "8", "--layers", "1", "--backbone-units", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_etl_output(
        tmp_path_factory.mktemp("cv") / "data", n_stays=24, n_bins=9, seed=1
    )


def test_cv_scores_every_model_on_the_same_windows(
    data: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow import MlflowClient

    from pipeline.cli import main

    out = tmp_path / "cv"
    argv = ["cv", "--data", str(data), "--folds", "3", "--seeds", "2", "--epochs", "2"]
    # lr written as on a command line: the fold runs log it as Lightning does, no conflict
    argv += ["--models", "gru", "small=cfc:units=4,backbone_units=4,lr=2e-3", "--out", str(out)]
    argv += ["--checkpoint-dir", str(tmp_path / "ckpt"), *TINY]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and (out / "skill_vs_k.png").stat().st_size > 0
    rows = report["rows"]
    labels = {r["model"] for r in rows}
    assert labels == {"gru", "small", "persistence", "linear", "level", "direct", "level-direct"}
    for k in (1, 2, 3, 5):
        at_k = [r for r in rows if r["k"] == k]
        assert len({r["n_windows"] for r in at_k}) == 1, "same windows for every model"
        assert len({r["n_patients"] for r in at_k}) == 1
        for r in at_k:
            assert set(r) >= {"model", "k", "rmse_measured", "skill", "skill_ci", "n_windows"}
            lo, hi = r["skill_ci"]
            if r["model"] == "persistence":
                assert r["skill"] == 0 and lo == hi == 0
            else:
                assert lo <= r["skill"] <= hi
            assert np.isfinite(r["rmse_measured"]) and r["rmse_measured"] > 0
    # every patient with a window is tested once per seed: the pooled count is the cohort's
    import pandas as pd

    bins = pd.read_parquet(data / "bins.parquet")
    sizes = bins.groupby(["subject_id", "icustay_id"]).size()
    with_window = sizes[sizes >= 2].index.get_level_values("subject_id").nunique()
    assert rows[0]["n_patients"] == with_window
    # Conformal bands: every network model, persistence and level, on the same measured
    # values; the ridge baselines have none.
    assert report["interval_levels"] == ["0.8", "0.95"]
    for r in rows:
        if r["model"] in ("linear", "direct"):
            assert r["coverage"] is None and r["width"] is None
            continue
        assert set(r["coverage"]) == set(r["width"]) == {"0.8", "0.95"}
        assert 0 <= r["coverage"]["0.8"] <= r["coverage"]["0.95"] <= 1
        for lv in ("0.8", "0.95"):
            lo, hi = r["coverage_ci"][lv]
            assert 0 <= lo <= r["coverage"][lv] <= hi <= 1
        assert 0 < r["width"]["0.8"] < r["width"]["0.95"]
        ref = next(p for p in rows if p["model"] == "persistence" and p["k"] == r["k"])
        assert r["n_interval_values"] == ref["n_interval_values"] > 0
        for lv in ("0.8", "0.95"):
            ratio = r["width"][lv] / ref["width"][lv]
            assert r["width_vs_persistence"][lv] == pytest.approx(ratio)
    md = (out / "report.md").read_text()
    assert "| gru | 5 |" in md and "vs persistence 0.95" in md
    ratios = report["ratios"]
    pairs = {(r["a"], r["b"]) for r in ratios}
    assert pairs == {("gru", "small")} | {
        (m, b) for m in ("gru", "small") for b in ("level", "direct", "level-direct")
    }
    assert all(r["ci"][0] <= r["rmse_ratio"] <= r["ci"][1] for r in ratios)
    # MLflow: one parent run, the folds nested under it (3 folds x 2 seeds x 2 models)
    client = MlflowClient()
    exp = client.get_experiment_by_name("icu-forecast")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "cv"]
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(nested) == 12
    assert all(r.info.status == "FINISHED" for r in nested)
    assert any("epoch" in r.data.metrics or "val_rollout_mse" in r.data.metrics for r in nested)
    assert all("fold_test/coverage_k5_l0.8" in r.data.metrics for r in nested)
    assert "cv/gru/coverage_k5_l0.95" in parents[0].data.metrics


def test_cv_with_its_tracking_store_inside_out(data: Path, tmp_path: Path) -> None:
    """The report's files go to MLflow, not the whole --out folder: with the store's
    artifacts inside --out, copying the folder into them would never end."""
    from mlflow import MlflowClient

    from pipeline.cli import main

    out = tmp_path / "cv"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    argv = ["cv", "--data", str(data), "--folds", "2", "--seeds", "1", "--epochs", "1"]
    argv += ["--models", "small=gru:units=4,ensemble=1", "--out", str(out), "--tracking-uri", uri]
    assert main([*argv, "--checkpoint-dir", str(tmp_path / "ckpt"), *TINY]) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("icu-forecast")
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'cv'")
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "cv")}
    assert logged == {"cv/report.json", "cv/report.md", "cv/skill_vs_k.png"}


def test_bands_pool_every_measured_value_alike() -> None:
    """Two folds of different sizes: pooled coverage and width are value-weighted means, and
    the width ratio compares with persistence's band on the same values."""
    from training.cv import CvResult, band_fields
    from training.intervals import Coverage

    res = CvResult(folds=2, seeds=(0,), ks=(1,))

    def fold(cov80: float, w80: float, n: int) -> Coverage:
        cells = {"coverage": cov80, "width": w80, "n": float(n)}
        return Coverage({(1, 0.8): cells, (1, 0.95): {**cells, "width": 2 * w80}}, [])

    res.add_bands("gru", fold(0.9, 0.2, 10))
    res.add_bands("gru", fold(0.6, 0.5, 30))
    res.add_bands("persistence", fold(0.8, 0.4, 10))
    res.add_bands("persistence", fold(0.8, 0.4, 30))
    got = band_fields(res, "gru", 1)
    assert got["n_interval_values"] == 40
    assert got["coverage"]["0.8"] == pytest.approx((0.9 * 10 + 0.6 * 30) / 40)
    assert got["width"]["0.8"] == pytest.approx((0.2 * 10 + 0.5 * 30) / 40)
    assert got["width_vs_persistence"]["0.95"] == pytest.approx(got["width"]["0.8"] / 0.4)
    assert band_fields(res, "linear", 1)["coverage"] is None


def test_coverage_interval_resamples_the_patients_of_every_fold() -> None:
    """The coverage's 95% interval is the patient bootstrap of the counts of all folds and
    seeds together (a patient of two seeds counts twice), and brackets the pooled coverage."""
    from training.cv import CvResult, band_fields, band_markdown, report_rows
    from training.intervals import Coverage
    from training.skill import PatientErrors, patient_counts, pool, rate_ci

    res = CvResult(folds=2, seeds=(0, 1), ks=(1,))
    rng = np.random.default_rng(3)

    def fold(patients: np.ndarray) -> tuple[Coverage, object]:
        windows = np.repeat(patients, 4)
        n = rng.integers(1, 5, len(windows)).astype(float)
        counts = {
            lv: patient_counts(rng.binomial(n.astype(int), lv), n, windows) for lv in (0.8, 0.95)
        }
        summary = {
            (1, lv): {"coverage": c.rate, "width": 0.3, "n": float(c.n.sum())}
            for lv, c in counts.items()
        }
        return Coverage(summary, [], {(1, lv): c for lv, c in counts.items()}), counts[0.8]

    parts = []
    for _seed in (0, 1):
        for members in (np.arange(0, 12), np.arange(12, 30)):
            cov, c80 = fold(members)
            res.add_bands("gru", cov)
            parts.append(c80)
            res.add_bands("persistence", cov)
    got = band_fields(res, "gru", 1)
    lo, hi = got["coverage_ci"]["0.8"]
    assert lo < got["coverage"]["0.8"] < hi
    assert got["coverage"]["0.8"] == pytest.approx(pool(parts).rate)
    assert [lo, hi] == pytest.approx(list(rate_ci(pool(parts))))
    assert set(got["coverage_ci"]) == {"0.8", "0.95"}
    assert band_fields(res, "linear", 1)["coverage_ci"] is None
    # The markdown table shows the interval next to the coverage.
    res.errors = {
        (label, 1): [PatientErrors(np.arange(30), np.ones(30), np.ones(30), np.ones(30))]
        for label in ("gru", "persistence")
    }
    res.n_windows = {key: 120 for key in res.errors}
    res.rmse_all = {key: [1.0] for key in res.errors}
    md = "\n".join(band_markdown(res, report_rows(res, n_boot=200)))
    assert f"{100 * got['coverage']['0.8']:.1f}% [" in md
    # Folds scored without patient ids (older callers): coverage as before, no interval.
    bare = CvResult(folds=1, seeds=(0,), ks=(1,))
    cov, _ = fold(np.arange(5))
    bare.add_bands("gru", Coverage(cov.summary, []))
    assert band_fields(bare, "gru", 1)["coverage_ci"] == {"0.8": None, "0.95": None}


def test_bad_cv_arguments_are_one_line_errors(data: Path, tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    base = ["cv", "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*base, "--folds", "1"]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert main([*base, "--models", "nosuch"]) == 2
    assert "unknown model 'nosuch'" in capsys.readouterr().err


def test_overall_champion_is_the_best_family_on_validation(
    data: Path, tmp_path: Path, mlflow_uri: str
) -> None:
    from mlflow import MlflowClient

    from pipeline.dag.settings import DagSettings
    from pipeline.dag.training_api import train
    from training.registry import CHAMPION, OVERALL, SELECTION_METRIC, promote_overall

    s = DagSettings(tracking_uri=mlflow_uri, epochs=2, data_dir=data.parent)
    records = {
        m: train(s, m, data=data, plots=False, units=8, layers=1, threads=1)
        for m in ("persistence", "linear", "level", "gru")
    }
    champ = promote_overall(list(records))
    values = {m: r["metrics"][SELECTION_METRIC] for m, r in records.items()}
    assert champ.family == min(values, key=values.get)
    assert champ.metric == pytest.approx(min(values.values()))
    assert champ.persistence == pytest.approx(values["persistence"])
    client = MlflowClient()
    served = client.get_model_version_by_alias(OVERALL, CHAMPION)
    assert served.tags["family"] == champ.family
    assert served.run_id == records[champ.family]["run_id"]
    # The level forecaster is listed beside the networks, but it is not a network.
    assert f"level {values['level'] / values['persistence']:.3f}x" in champ.message
    if values["gru"] >= values["persistence"]:
        assert "NO network beats persistence" in champ.message
    else:
        assert "NO network" not in champ.message
