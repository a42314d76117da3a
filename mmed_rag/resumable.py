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

``keep_identity=True`` keeps the record beside the finished output (``OUTPUT.identity.json``), and a rerun with the
same identity finds it done instead of refusing it: the parts of a sharded run (:mod:`mmed_rag.sharding`), where
one rank's finished part waits for the others', and is merged only with parts of the same run.
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

    def __init__(
        self,
        output: str | os.PathLike,
        identity: dict | None = None,
        *,
        fresh: bool = False,
        keep_identity: bool = False,
    ):
        self.output = Path(output)
        self.partial = partial_path(output)
        self.identity_path = self.partial.with_name(self.partial.name + IDENTITY_SUFFIX)
        self.finished_identity_path = finished_identity_path(output)
        self.identity = json.loads(json.dumps(identity or {}))  # as it reads back from the file
        self.keep_identity = keep_identity
        self.finished = False  # the output was finished by an earlier run with this identity (keep_identity)
        if fresh:
            for path in (self.partial, self.identity_path, self.finished_identity_path):
                path.unlink(missing_ok=True)
        elif self.partial.exists():
            check_identity(self.identity_path, self.partial, self.identity)
        elif self.output.exists():
            if not (keep_identity and self.finished_identity_path.exists()):
                raise ResumeError(
                    f"{self.output} exists and is complete (an earlier run finished it): pass --fresh (or "
                    "--overwrite) to write it again, or choose another output"
                )
            check_identity(self.finished_identity_path, self.output, self.identity)
            self.finished = True
        self.done = completed_keys(self.output if self.finished else self.partial)
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
        if self.finished:
            raise ResumeError(f"{self.output} is finished: nothing more can be appended to it")
        if self._sink is None:
            if not self.partial.exists():  # the record goes first: a partial file never exists without it
                atomic_write_text(self.identity_path, json.dumps(self.identity, indent=1, sort_keys=True) + "\n")
            self._sink = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        append_lines(self._sink, lines)

    def finish(self) -> int:
        """Rename the complete partial file to the output (an empty output if nothing was written); its lines."""
        self.__exit__()
        if self.finished:
            return len(self.done)
        if self.keep_identity:  # first: a crash before the rename below leaves a resumable partial file
            atomic_write_text(self.finished_identity_path, json.dumps(self.identity, indent=1, sort_keys=True) + "\n")
        if not self.partial.exists():
            atomic_write_bytes(self.output, b"")
            return 0
        with open(self.partial, encoding="utf-8") as finished:
            written = sum(1 for _ in finished)
        os.replace(self.partial, self.output)
        self.identity_path.unlink(missing_ok=True)
        return written


def finished_identity_path(output: str | os.PathLike) -> Path:
    """Where a finished output keeps the record of the run that made it (``keep_identity``)."""
    output = Path(output)
    return output.with_name(output.name + IDENTITY_SUFFIX)


def read_identity(path: Path, holder: Path) -> dict:
    """The identity record at ``path`` of the results in ``holder``; refused when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ResumeError(
            f"{holder} holds results of a run that left no record of its inputs and settings "
            f"({path.name} is missing or unreadable): rerun with --fresh to start over"
        ) from None


def identity_differences(recorded: dict, current: dict) -> list[str]:
    """'key: then, now' for each entry that differs between two identity records."""
    return [
        f"{key}: {recorded.get(key)!r} then, {current.get(key)!r} now"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]


def check_identity(path: Path, holder: Path, identity: dict) -> None:
    """Refuse to resume ``holder`` unless the record at ``path`` equals this run's ``identity``."""
    changed = identity_differences(read_identity(path, holder), identity)
    if changed:
        raise ResumeError(
            f"{holder} holds results of a run with other inputs or settings ({first_few(changed, 4)}); resuming "
            "would mix the two in one output: rerun with the same ones, or with --fresh to start over"
        )
