"""Resumable JSON Lines outputs for long jobs (batch retrieval, generation).

Results go to ``OUTPUT.partial``, one line per record, flushed and fsynced after each batch. A rerun reads the
keys already there (cutting off a line torn by a kill) and skips those records; when the job is complete the
file is renamed to ``OUTPUT``. So ``OUTPUT`` is never half-written, and no record is lost or written twice.

The partial file is created with the first result, so a run that fails before it (a missing model, a bad
first image) leaves nothing behind. Only one run may write an output at a time: the stage claims it first
(:func:`mmed_rag.outputs.claim_outputs`), or two runs would interleave their lines in the same partial file.

A rerun resumes only the run that made the partial file. Beside it, ``OUTPUT.partial.identity.json`` records
what decides the results (the input's sha256, fingerprints of the model, adapter, retriever and index, and the
options that change answers); a rerun whose identity differs is refused with the differences named, instead of
splicing two runs into one output. A finished output is not silently written again either. ``fresh=True``
(``--fresh``, ``--overwrite``) discards the partial file, or replaces the finished output, and starts over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from mmed_rag.atomic import atomic_write_bytes, atomic_write_text
from mmed_rag.errors import MMedRAGError, first_few

PARTIAL_SUFFIX = ".partial"
IDENTITY_SUFFIX = ".identity.json"


class ResumeError(MMedRAGError):
    """A partial output made by a run with other inputs or settings than this one."""


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

    def __init__(self, output: str | os.PathLike, identity: dict | None = None, *, fresh: bool = False):
        self.output = Path(output)
        self.partial = partial_path(output)
        self.identity_path = self.partial.with_name(self.partial.name + IDENTITY_SUFFIX)
        self.identity = json.loads(json.dumps(identity or {}))  # as it reads back from the file
        if fresh:
            self.partial.unlink(missing_ok=True)
            self.identity_path.unlink(missing_ok=True)
        elif self.partial.exists():
            self._check_identity()
        elif self.output.exists():
            raise ResumeError(
                f"{self.output} exists and is complete (an earlier run finished it): pass --fresh (or --overwrite) "
                "to write it again, or choose another output"
            )
        self.done = completed_keys(self.partial)
        self._sink: IO[str] | None = None

    def _check_identity(self) -> None:
        try:
            recorded = json.loads(self.identity_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ResumeError(
                f"{self.partial} holds results of a run that left no record of its inputs and settings "
                f"({self.identity_path.name} is missing or unreadable): rerun with --fresh to start over"
            ) from None
        changed = [
            key for key in sorted(set(recorded) | set(self.identity)) if recorded.get(key) != self.identity.get(key)
        ]
        if changed:
            shown = first_few(
                [f"{key}: {recorded.get(key)!r} then, {self.identity.get(key)!r} now" for key in changed], 4
            )
            raise ResumeError(
                f"{self.partial} holds results of a run with other inputs or settings ({shown}); resuming would "
                "mix the two in one output: rerun with the same ones, or with --fresh to start over"
            )

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
            if not self.partial.exists():  # the record goes first: a partial file never exists without it
                atomic_write_text(self.identity_path, json.dumps(self.identity, indent=1, sort_keys=True) + "\n")
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
        self.identity_path.unlink(missing_ok=True)
        return written
