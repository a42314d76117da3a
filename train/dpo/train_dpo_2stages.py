"""MMed-RAG's ``train/dpo/train_dpo_2stages.py`` command line, on mmed-rag's two-stage DPO.

Accepts the original script's flags unchanged (run it with ``python`` or under ``deepspeed``, which appends
``--local_rank=N``), plus ``--stage2_data_path``, ``--stage`` and ``--config FILE.yaml``; all logic lives in
mmed_rag.alignment.dpo. See docs/DPO.md.
"""

import sys

from mmed_rag.alignment.dpo import main

if __name__ == "__main__":
    sys.exit(main())
