"""Which process of a torchrun or deepspeed launch this is, read from the environment the launcher sets.

Kept apart from :mod:`mmed_rag.sharding` (which imports the output machinery) because the command line asks it at
every start-up, where each import costs every user.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def is_main_process(environ: Mapping[str, str] = os.environ) -> bool:
    """False in the other processes of a torchrun or deepspeed launch (``RANK`` > 0): they neither log progress
    nor hold an output's lock, which the main process holds for all of them."""
    return environ.get("RANK", "0") == "0"
