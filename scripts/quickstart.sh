#!/usr/bin/env bash
# Quick start: install into .venv, then run the whole pipeline (fetch -> ETL -> train CfC, GRU
# and two baselines -> compare -> promote the champion) on the MIMIC-III demo, with embedded
# defaults: a SQLite MLflow store ./mlflow.db, local files under ./data, no servers.
#
#   bash scripts/quickstart.sh                 # the defaults (closed-loop, early stopping)
#   bash scripts/quickstart.sh --epochs 5      # quicker, for a slow machine
#   MIMIC_DIR=/path/to/mimic-iii bash scripts/quickstart.sh
#
# Extra arguments go to `icu-forecast dag run`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

bash scripts/install.sh

# The demo copy next to the checkout when there is one; otherwise the DAG's fetch step
# downloads the open demo from PhysioNet into data/raw/mimic-iii-demo (checksum-verified).
# Every location is made absolute and printed with the closing advice, so `dag status` and
# `dag run` given below see the same tables, data folder and MLflow store from any folder.
root="$(pwd)"
if [ -z "${MIMIC_DIR:-}" ]; then
  if [ -d ../shared/data/mimic-iii-demo ]; then
    MIMIC_DIR="$(cd ../shared/data/mimic-iii-demo && pwd)"
  else
    MIMIC_DIR="$root/data/raw/mimic-iii-demo"
  fi
fi
export MIMIC_DIR
export ICU_DAG_DATA_DIR="${ICU_DAG_DATA_DIR:-$root/data}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$root/mlflow.db}"
echo "MIMIC-III tables: $MIMIC_DIR"
echo "Data folder:      $ICU_DAG_DATA_DIR"
echo "MLflow store:     $MLFLOW_TRACKING_URI"

.venv/bin/icu-forecast dag run "$@"

# The advice below carries the same settings: the variables above and this run's own flags
# (without --force / --until, which only `dag run` takes and which need not be repeated).
env_words="MIMIC_DIR=$(printf %q "$MIMIC_DIR") ICU_DAG_DATA_DIR=$(printf %q "$ICU_DAG_DATA_DIR")"
env_words+=" MLFLOW_TRACKING_URI=$(printf %q "$MLFLOW_TRACKING_URI")"
flags=""
skip=0
for arg in "$@"; do
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  case "$arg" in
    --force | --until) skip=1 ;;
    --force=* | --until=*) ;;
    *) flags+=" $(printf %q "$arg")" ;;
  esac
done
cli="$(printf %q "$root/.venv/bin/icu-forecast")"

table="$ICU_DAG_DATA_DIR/dag/comparison.md"
if [ -f "$table" ]; then
  echo
  echo "Model comparison ($table):"
  cat "$table"
fi

elapsed=$(( $(date +%s) - start ))
cat <<MSG

Done in ${elapsed}s.

Browse and compare the runs in the MLflow UI:
    $(printf %q "$root/.venv/bin/mlflow") ui --backend-store-uri $(printf %q "$MLFLOW_TRACKING_URI")
    then open http://127.0.0.1:5000, experiment "icu-forecast" -> Training runs (one run per
    model; Columns adds metrics such as test/rmse_k5; select runs and press Compare), and
    "icu-forecast-dag" for each DAG run with its steps nested under it

Serve forecasts from the champion model:
    MLFLOW_TRACKING_URI=$(printf %q "$MLFLOW_TRACKING_URI") $cli serve
    then open http://127.0.0.1:8000/docs

Why each step is done or stale, and a re-run that skips every step whose inputs, parameters
and code are unchanged (from any folder: these name the same data and MLflow store):
    $env_words $cli dag status$flags
    $env_words $cli dag run$flags
MSG
