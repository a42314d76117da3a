#!/usr/bin/env bash
# Contrastive fine-tuning of one modality's CLIP retriever, with the original script's flags, e.g.
#   bash scripts/finetune_clip.sh --model hf-hub:thaottn/OpenCLIP-resnet50-CC12M --train-data TRAIN.json \
#       --val-data VAL.json --dataset-type radiology --img_root IMAGES --batch-size 512 --precision amp \
#       --workers 4 --lr 0.0001 --epochs 360 --val-frequency 10 --report-to tensorboard --logs CHECKPOINTS
# The hf-hub model must be a local copy (a directory path, or already in the Hugging Face cache): nothing is
# downloaded. Rerun the same command to resume an interrupted run.
# Environment (defaults in brackets): NPROC [1]: processes on this machine, one per GPU; above 1 the script
# launches them with torchrun, as the original did (`torchrun --nproc_per_node=2 -m training.main ...`), and
# --batch-size is then per process (the original's 512 on 2 GPUs: 1,024 pairs a step). MASTER_PORT [29500]: the
# rendezvous port of torchrun; give each concurrent run its own. PYTHON: the interpreter [the project's .venv when
# there is one, else python3].
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
nproc="${NPROC:-1}"
if [ "$nproc" -gt 1 ]; then
  # `--`: torchrun would take the original's --logs for an abbreviation of its own --logs-specs
  exec "$python" -m torch.distributed.run --nproc_per_node "$nproc" --master_port "${MASTER_PORT:-29500}" -- \
      "$here/../train/clip/finetune_clip.py" "$@"
fi
exec "$python" "$here/../train/clip/finetune_clip.py" "$@"
