#!/usr/bin/env bash
# Idempotent install of fedspeech into ./.venv (CPU torch, torchaudio without its CUDA extension).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# 1. CPU torch first: an unpinned or ranged torch request would pull a multi-GB CUDA build.
#    TORCH_INDEX lets users elsewhere point pip at a CPU wheel index (--extra-index-url URL).
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || "${PIP[@]}" ${TORCH_INDEX:-} "torch==2.13.0"

# 2. The project and its pinned dependencies: editable with dev tools, or a built wheel when
#    FEDSPEECH_WHEEL names one (tests/test_wheel.py installs the wheel into a fresh venv).
if [ -n "${FEDSPEECH_WHEEL:-}" ]; then
  "${PIP[@]}" "$FEDSPEECH_WHEEL"
else
  "${PIP[@]}" -e ".[dev]"
fi

# 3. PyPI's torchaudio 2.11 wheel is linked against CUDA; with CPU torch its compiled extension
#    fails to load and `import torchaudio` raises. The parts we use (transforms, ctc_decoder) are
#    pure Python, so drop the extension libraries when (and only when) they cannot load.
if ! "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "install: torchaudio's CUDA extension cannot load with CPU torch; removing $site/torchaudio/lib/*.so"
  rm -f "$site"/torchaudio/lib/*.so
  "$VENV/bin/python" -c "import torchaudio"
fi
echo "install: ok ($("$VENV/bin/python" -c 'import torch, torchaudio, flwr, opacus, mlflow; print(f"torch {torch.__version__}, torchaudio {torchaudio.__version__}, flwr {flwr.__version__}, opacus {opacus.__version__}, mlflow {mlflow.__version__}")'))"
