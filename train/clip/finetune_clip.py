"""The original open_clip ``training.main`` command line for MMed-RAG's retriever, on mmed-rag's fine-tuning.

Accepts the original flags (--model --train-data --val-data --dataset-type --img_root --batch-size --precision
--workers --lr --epochs --val-frequency --report-to --logs) and every option of `mmed-rag finetune-clip`; all
logic lives in mmed_rag.retrieval.finetune. Under torchrun (`torchrun --nproc_per_node 2 train/clip/finetune_clip.py
...`, or `NPROC=2 bash scripts/finetune_clip.sh ...`) each process runs it and they train as one.
"""

import sys

from mmed_rag.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune-clip", *sys.argv[1:]]))
