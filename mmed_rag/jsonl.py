"""JSON Lines files the library writes and reads back itself (metrics logs, prediction runs, demo work files).

User data goes through :mod:`mmed_rag.data.records`, which validates every field and names the bad record; these
two helpers are for files this library wrote, so they only skip blank lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from mmed_rag.atomic import atomic_write_text


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of ``path``, blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def jsonl_text(records: Iterable[dict]) -> str:
    """``records`` as JSON Lines text (UTF-8 kept as is, one record a line)."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write ``records`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    atomic_write_text(path, jsonl_text(records))
