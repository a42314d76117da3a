#!/usr/bin/env bash
# Batch retrieval for a report test set (JSON), with the original script's flags, e.g.
#   bash scripts/retrieve_clip_report.sh --img_root IMAGES --train_json CORPUS.json --eval_json TEST.json \
#       --model_name_or_path RETRIEVER_DIR --output_path OUT.jsonl --fixed_k 5 [--clip_threshold 1.5]
# Uses the project's .venv when there is one (override with PYTHON=...).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$here/../retrieve/retrieve_clip_report.py" "$@"
