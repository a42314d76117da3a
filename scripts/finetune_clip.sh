#!/usr/bin/env bash
# Contrastive fine-tuning of one modality's CLIP retriever, with the original script's flags, e.g.
#   bash scripts/finetune_clip.sh --model hf-hub:thaottn/OpenCLIP-resnet50-CC12M --train-data TRAIN.json \
#       --val-data VAL.json --dataset-type radiology --img_root IMAGES --batch-size 512 --precision amp \
#       --workers 4 --lr 0.0001 --epochs 360 --val-frequency 10 --report-to tensorboard --logs CHECKPOINTS
# The hf-hub model must be a local copy (a directory path, or already in the Hugging Face cache): nothing is
# downloaded. Rerun the same command to resume an interrupted run. Uses the project's .venv when there is one
# (override with PYTHON=...).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$here/../train/clip/finetune_clip.py" "$@"
