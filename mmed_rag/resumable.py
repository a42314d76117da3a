"""Resumable JSON Lines outputs for long jobs (batch retrieval, generation).

Results go to ``OUTPUT.partial``, one line per record, flushed and fsynced after each batch. A rerun reads the
keys already there (cutting off a line torn by a kill) and skips those records; when the job is complete the
file is renamed to ``OUTPUT``. So ``OUTPUT`` is never half-written, and no record is lost or written twice.

The partial file is created with the first result, so a run that fails before it (a missing model, a bad
first image) leaves nothing behind. Only one run may write an output at a time: the stage claims it first
(:func:`mmed_rag.outputs.claim_outputs`), or two runs would interleave their lines in the same partial file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from mmed_rag.atomic import atomic_write_bytes

PARTIAL_SUFFIX = ".partial"


def partial_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + PARTIAL_SUFFIX)


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


class ResumableOutput:
    """``OUTPUT.partial`` of one run: the keys an earlier run finished, appends, and the final rename.

    Use it as a context manager; the partial file is opened at the first :meth:`append` and closed on exit.
    """

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        self.partial = partial_path(output)
        self.done = completed_keys(self.partial)
        self._sink: IO[str] | None = None

    def __enter__(self) -> ResumableOutput:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def append(self, lines: Iterable[dict]) -> None:
        """Write one batch of results durably (the partial file is created here, at the first one)."""
        lines = list(lines)
        if not lines:
            return
        if self._sink is None:
            self._sink = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        append_lines(self._sink, lines)

    def finish(self) -> int:
        """Rename the complete partial file to the output (an empty output if nothing was written); its lines."""
        self.__exit__()
        if not self.partial.exists():
            atomic_write_bytes(self.output, b"")
            return 0
        with open(self.partial, encoding="utf-8") as finished:
            written = sum(1 for _ in finished)
        os.replace(self.partial, self.output)
        return written
