#!/usr/bin/env bash
# The peer benchmark's own venv (.peers-venv/): NVIDIA kvpress, which needs transformers < 5.3 and so cannot
# share kvcat's .venv (transformers 5.19). Only benchmarks/kvpress_runner.py runs in it, as a subprocess
# of `kvcat bench peers`. Idempotent: a stamp of this script makes a second run finish in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.peers-venv
KVPRESS=0.5.5          # the newest kvpress; it asks for transformers >= 4.56, < 5.3
TRANSFORMERS=5.2.0     # the newest transformers that kvpress 0.5.5 accepts
TORCH=2.13.0           # the CPU build kvcat uses (pip takes the local wheel; never a CUDA one)

STAMP="$VENV/.peers-setup-$(sha256sum scripts/peers_venv.sh | cut -c1-16)"
if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
command -v "$PY" >/dev/null || { echo "peers_venv: $PY not found; install Python 3.11" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }  # local index folders this machine lacks
echo "peers_venv: installing kvpress $KVPRESS (transformers $TRANSFORMERS, torch $TORCH) into $VENV" \
     "(a few minutes the first time)" >&2
# torch first, alone: with it in place pip never resolves another (CUDA) torch for kvpress.
quiet "${PIP[@]}" "torch==$TORCH"
quiet "${PIP[@]}" "torch==$TORCH" "transformers==$TRANSFORMERS" "kvpress==$KVPRESS"
# kvpress needs none of these; pulled in by some dependency, they break imports beside the CPU torch build.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import kvpress, torch, transformers; assert torch.__version__.startswith('$TORCH'), torch.__version__" \
  || { echo "peers_venv: kvpress does not import in $VENV" >&2; exit 1; }
rm -f "$VENV"/.peers-setup-*
touch "$STAMP"
