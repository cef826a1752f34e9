#!/usr/bin/env bash
# Debian packages some tests drive: headless chromium + chromedriver (the MLflow UI browser
# test) and docker-compose (validates docker-compose.yml; no engine needed). Installed with
# apt-get only when one is missing and this runs as root; otherwise says what to install.
# ICU_SKIP_SYSTEM_PACKAGES=1 leaves the system alone.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if ! command -v docker-compose >/dev/null \
    && ! { command -v docker >/dev/null && docker compose version >/dev/null 2>&1; }; then
  missing+=(docker-compose)
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: chromium, chromedriver, docker-compose present"
  exit 0
fi
if [ "${ICU_SKIP_SYSTEM_PACKAGES:-0}" = 1 ]; then
  echo "system packages: missing ${missing[*]} (ICU_SKIP_SYSTEM_PACKAGES=1: not installed)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "system packages: installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  exit 0
else
  echo "system packages: missing ${missing[*]}; as root: apt-get install -y ${missing[*]}"
fi
# Without them the tests that need them are skipped, except under CI=true, where they fail.
if [ "${CI:-}" = true ]; then
  echo "CI=true: the tests need ${missing[*]}" >&2
  exit 1
fi
