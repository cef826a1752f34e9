#!/usr/bin/env bash
# Quick start: install into .venv, then run the whole pipeline (fetch -> ETL -> train CfC, GRU
# and two baselines -> compare -> promote the champion) on the MIMIC-III demo, with embedded
# defaults: a SQLite MLflow store ./mlflow.db, local files under ./data, no servers.
#
#   bash scripts/quickstart.sh                 # the paper's settings (30 epochs)
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
if [ -z "${MIMIC_DIR:-}" ]; then
  if [ -d ../shared/data/mimic-iii-demo ]; then
    MIMIC_DIR="$(cd ../shared/data/mimic-iii-demo && pwd)"
  else
    MIMIC_DIR=data/raw/mimic-iii-demo
  fi
fi
export MIMIC_DIR
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
echo "MIMIC-III tables: $MIMIC_DIR"
echo "MLflow store:     $MLFLOW_TRACKING_URI"

.venv/bin/icu-forecast dag run "$@"

table="${ICU_DAG_DATA_DIR:-data}/dag/comparison.md"
if [ -f "$table" ]; then
  echo
  echo "Model comparison ($table):"
  cat "$table"
fi

elapsed=$(( $(date +%s) - start ))
cat <<MSG

Done in ${elapsed}s.

Browse and compare the runs in the MLflow UI:
    .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI
    then open http://127.0.0.1:5000, experiment "icu-forecast" -> Training runs (one run per
    model; Columns adds metrics such as test/rmse_k5; select runs and press Compare), and
    "icu-forecast-dag" for each DAG run with its steps nested under it

Serve forecasts from the champion model:
    .venv/bin/icu-forecast serve
    then open http://127.0.0.1:8000/docs

Re-running \`bash scripts/quickstart.sh\` skips every step whose inputs, parameters and code
are unchanged; \`.venv/bin/icu-forecast dag status\` shows why each step is done or stale.
MSG
