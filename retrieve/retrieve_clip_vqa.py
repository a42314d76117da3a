"""The original `retrieve_clip_VQA.py` command line, on mmed-rag's batch retrieval.

Accepts the original flags (--img_root --train_json --eval_json/--eval_jsonl --model_name_or_path
--checkpoint_path --output_path --fixed_k --clip_threshold --eval_type) and every option of
`mmed-rag retrieve`; all logic lives in mmed_rag.retrieval.batch.
"""

import sys

from mmed_rag.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrieve", *sys.argv[1:]]))
