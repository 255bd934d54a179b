#!/usr/bin/env bash
# Creates the virtual environments of the two transcription benchmark peers, under the repo root:
#
#   .venv-peers/     basic-pitch 0.4.0 on its bundled ONNX model (onnxruntime; no TensorFlow)
#   .venv-transkun/  transkun 2.0.1 with its bundled weights, on CPU
#
# musefm.transcription.peers.run_peer runs each in its own subprocess. Nothing is downloaded at
# run time: the models ship inside the wheels.
#
# Idempotent: an environment whose stamp matches this script's pins (and that still loads its
# model) is left alone; otherwise it is rebuilt from scratch. Every package is pinned exactly and
# installed with --no-deps, so nothing beyond these lists comes in.
#
# Environment:
#   PEERS_PYTHON=python3        the interpreter for the venvs (pins tested on CPython 3.11)
#   MUSEFM_TRANSKUN_TORCH=cpu   (default) torch 2.13.0+cpu, the same CPU build as .venv (~1 GB), and
#                               torchaudio 2.11.0 without its CUDA-linked C++ extension (see below)
#   MUSEFM_TRANSKUN_TORCH=2.14.1  PyPI's torch 2.14.1 + torchaudio 2.11.0 as published, with the
#                               NVIDIA libraries torch links against (~5.5 GB; same MIDI output)
#   FORCE=1                     rebuild both environments
#
# Why torchaudio loses its extension in the default variant: PyPI's torchaudio 2.11.0 wheel links
# libc10_cuda.so/libtorch_cuda.so, which only a CUDA torch has, so `import torchaudio` fails on a
# CPU torch. torchaudio imports without its extension when the library files are absent
# (torchaudio/_extension/utils.py: _load_lib returns False), and transkun only calls the pure-Python
# torchaudio.functional.melscale_fbanks. And torch 2.14.1 from PyPI cannot just be installed with
# --no-deps: libtorch.so itself needs libcudnn, libcublas, libnccl, ... at import.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PEERS_PYTHON=${PEERS_PYTHON:-python3}
VARIANT=${MUSEFM_TRANSKUN_TORCH:-cpu}
FORCE=${FORCE:-0}
STAMP=.musefm-peer-stamp

BASIC_PITCH_PINS=(
  basic-pitch==0.4.0
  # ONNX inference
  onnxruntime==1.32.0 flatbuffers==25.12.19 protobuf==7.36.2 packaging==26.4
  numpy==2.4.6 scipy==1.17.1
  # librosa (audio loading, CQT) and everything its import chain touches (found by trying):
  librosa==0.11.0 numba==0.68.1 llvmlite==0.50.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  soxr==1.1.0 lazy-loader==0.6 decorator==5.3.1 typing_extensions==4.16.0 audioread==3.1.0
  msgpack==1.2.4 joblib==1.6.0 cloudpickle==3.1.3
  pooch==1.9.0 platformdirs==4.14.8 requests==2.34.2 charset-normalizer==3.5.3 idna==3.20
  urllib3==2.8.0 certifi==2026.10.19.post1
  # note creation
  resampy==0.4.2 pretty_midi==0.2.11.post0 mido==1.3.3 six==1.17.0 importlib_resources==7.1.0
  mir_eval==0.8.2
  # resampy 0.4.2 imports pkg_resources, which setuptools 81 removed
  setuptools==80.9.0
)
# Not needed for ONNX inference, though basic-pitch declares them: tensorflow, scikit-learn.

TRANSKUN_PINS=(
  transkun==2.0.1
  # what transkun's transcription path imports (train/plot-only deps are left out: seaborn,
  # matplotlib, tensorboard, torch-optimizer, sox, ncls; pydub is replaced by soundfile)
  moduleconf==0.1.4 numpy==2.4.6 scipy==1.17.1 pretty_midi==0.2.11.post0 mido==1.3.3 six==1.17.0
  importlib_resources==7.1.0 mir_eval==0.8.2 decorator==5.3.1 soxr==1.1.0 packaging==26.4
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  # torch's own pure-Python requirements
  filelock==4.3.1 typing_extensions==4.16.0 sympy==1.14.0 mpmath==1.3.0 networkx==3.6.1
  Jinja2==3.1.6 MarkupSafe==3.0.4 fsspec==2026.9.0 setuptools==80.9.0
)
case "$VARIANT" in
  cpu) TORCH_PINS=(torch==2.13.0+cpu torchaudio==2.11.0) ;;
  2.14.1) TORCH_PINS=() ;;  # installed with its dependencies below
  *) echo "setup_peers: MUSEFM_TRANSKUN_TORCH must be cpu or 2.14.1, not '$VARIANT'" >&2; exit 2 ;;
esac

say() { echo "setup_peers: $*"; }

pins_hash() {  # $@: everything that defines an environment
  printf '%s\n' "$@" | sha256sum | cut -c1-16
}

# Loads the model through benchmarks/peer_driver.py (no files); with "true", also transcribes a
# 2 s clip through the whole pipeline.
smoke() {  # $1 venv, $2 peer, $3 warmup (true/false)
  local out rc=0
  out=$(echo "{\"peer\": \"$2\", \"jobs\": [], \"warmup\": $3, \"threads\": 2}" \
        | "$1/bin/python" benchmarks/peer_driver.py 2>"$1/smoke.log") || rc=$?
  if [ "$rc" != 0 ] || ! grep -q '"event": "load"' <<<"$out" || ! grep -q '"warmup_error": null' <<<"$out"; then
    say "$2 smoke test failed (exit $rc); see $1/smoke.log" >&2
    echo "$out" >&2
    return 1
  fi
  grep '"event": "load"' <<<"$out" | sed 's/^@@musefm-peer /  /'
}

fresh_venv() {  # $1 venv
  rm -rf "$1"
  "$PEERS_PYTHON" -m venv "$1"
}

pip_in() {  # $1 venv, rest: pip install arguments
  local venv=$1
  shift
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

check_disk() {  # $1 MiB needed
  local free
  free=$(df -Pm "$ROOT" | awk 'NR==2 {print $4}')
  if [ "$free" -lt "$1" ]; then
    say "needs about $1 MiB free under $ROOT, has $free MiB" >&2
    exit 1
  fi
}

"$PEERS_PYTHON" - <<'EOF' || say "warning: the pins were tested on CPython 3.11; $PEERS_PYTHON is not it"
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)
EOF

# ------------------------------------------------------------------------------------------------
# basic-pitch
# ------------------------------------------------------------------------------------------------
VENV=.venv-peers
WANT=$(pins_hash basic-pitch "${BASIC_PITCH_PINS[@]}")
if [ "$FORCE" != 1 ] && [ "$(cat "$VENV/$STAMP" 2>/dev/null)" = "$WANT" ] && smoke "$VENV" basic-pitch false >/dev/null 2>&1; then
  say "$VENV is up to date"
else
  check_disk 1500
  say "building $VENV (basic-pitch, ONNX)"
  fresh_venv "$VENV"
  pip_in "$VENV" --no-deps "${BASIC_PITCH_PINS[@]}"
  # Also compiles and caches librosa/resampy's numba kernels (~15 s once; later loads take ~1 s).
  smoke "$VENV" basic-pitch true
  echo "$WANT" >"$VENV/$STAMP"
  say "$VENV ready ($(du -sh "$VENV" | cut -f1))"
fi

# ------------------------------------------------------------------------------------------------
# transkun
# ------------------------------------------------------------------------------------------------
VENV=.venv-transkun
WANT=$(pins_hash transkun "$VARIANT" "${TRANSKUN_PINS[@]}" "${TORCH_PINS[@]}")
if [ "$FORCE" != 1 ] && [ "$(cat "$VENV/$STAMP" 2>/dev/null)" = "$WANT" ] && smoke "$VENV" transkun false >/dev/null 2>&1; then
  say "$VENV is up to date"
else
  say "building $VENV (transkun, torch variant: $VARIANT)"
  fresh_venv "$VENV"
  if [ "$VARIANT" = cpu ]; then
    check_disk 2500
    # torch 2.13.0+cpu is not on PyPI: it comes from pip's find-links here, else from PyTorch's
    # CPU index. Never a bare `torch==2.13.0`: PyPI's is the multi-GB CUDA build.
    if ! pip_in "$VENV" --no-deps "${TORCH_PINS[@]}"; then
      say "torch==2.13.0+cpu not found via pip's configured indexes; trying download.pytorch.org/whl/cpu"
      pip_in "$VENV" --no-deps torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu
      pip_in "$VENV" --no-deps torchaudio==2.11.0
    fi
    # torchaudio's C++ extension is linked against CUDA torch libraries: drop it (see the header).
    rm -f "$VENV"/lib/python3*/site-packages/torchaudio/lib/*.so
  else
    check_disk 8000
    # With dependencies: torch's NVIDIA libraries (~4.5 GB) are needed just to import it.
    pip_in "$VENV" torch==2.14.1
    pip_in "$VENV" --no-deps torchaudio==2.11.0
  fi
  pip_in "$VENV" --no-deps "${TRANSKUN_PINS[@]}"
  "$VENV/bin/python" - <<'EOF'
import torch, torchaudio
from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE
fb = torchaudio.functional.melscale_fbanks(2049, 30.0, 8000.0, 229, 44100)
assert fb.shape == (2049, 229), fb.shape
print(f"  torch {torch.__version__} (cuda build: {torch.version.cuda}), torchaudio {torchaudio.__version__}"
      f" (C++ extension: {_IS_TORCHAUDIO_EXT_AVAILABLE})")
EOF
  # A 2 s clip through the whole model: ~30 s on 2 CPU cores (transkun pads to 16 s segments).
  smoke "$VENV" transkun true
  echo "$WANT" >"$VENV/$STAMP"
  say "$VENV ready ($(du -sh "$VENV" | cut -f1))"
fi

say "done. Run a peer: .venv/bin/python -m musefm.transcription.peers {basic-pitch|transkun} OUT_DIR AUDIO..."
