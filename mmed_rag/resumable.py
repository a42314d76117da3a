"""Resumable JSON Lines outputs for long jobs (batch retrieval, generation).

Results go to ``OUTPUT.partial``, one line per record, flushed and fsynced after each batch. A rerun reads the
keys already there (cutting off a line torn by a kill) and skips those records; when the job is complete the
file is renamed to ``OUTPUT``. So ``OUTPUT`` is never half-written, and no record is lost or written twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

PARTIAL_SUFFIX = ".partial"


def partial_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + PARTIAL_SUFFIX)


def open_partial(output: str | os.PathLike) -> Path:
    """Create the output's folder and partial file (an unwritable path fails here, before any work)."""
    partial = partial_path(output)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "ab"):
        pass
    return partial


def completed_keys(partial: str | os.PathLike) -> set:
    """``question_id`` / ``id`` of every complete line; a torn last line is cut off the file."""
    partial = Path(partial)
    if not partial.is_file():
        return set()
    data = partial.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(partial, "r+b") as handle:
            handle.truncate(len(complete))
    keys = set()
    for line in complete.decode("utf-8").splitlines():
        record = json.loads(line)
        keys.add(record.get("question_id", record.get("id")))
    return keys


def append_lines(sink: IO[str], lines: Iterable[dict]) -> None:
    """Write one batch of results durably."""
    for line in lines:
        sink.write(json.dumps(line, ensure_ascii=False) + "\n")
    sink.flush()
    os.fsync(sink.fileno())


def finish(output: str | os.PathLike) -> int:
    """Rename the complete partial file to ``output``; return its number of lines."""
    partial = partial_path(output)
    with open(partial, encoding="utf-8") as finished:
        written = sum(1 for _ in finished)
    os.replace(partial, output)
    return written
