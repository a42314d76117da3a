"""The rows of a report index on disk, read on demand: ``reports.jsonl`` and its ``reports.offsets``.

A million reports held as Python objects cost a quarter of the float32 index of their 512-dim embeddings
and twice that of 64-dim ones (measured: 0.5 GB for a million reports of about 250 bytes: the texts, the ids,
the objects around them), so a loaded index keeps none: :class:`ReportRows` reads and parses a line only when
:meth:`ReportIndex.lookup` asks for its row, with ``pread`` at its offset. ``reports.offsets`` (a ``.npy`` of
``size + 1`` int64 byte offsets, the start of each line and the file's end) finds a line without scanning; it is
memory-mapped. The reports file is read, not mapped: a mapping's read-ahead and fault-around made a million
reports' whole 250 MB resident after 10,000 random look-ups (measured), where reads leave only the kernel's
page cache, which is not the process's memory. Index directories written before the offsets file existed
(format version 1) get their offsets from one scan of ``reports.jsonl``.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmed_rag.atomic import atomic_path
from mmed_rag.errors import MMedRAGError

REPORTS_FILE = "reports.jsonl"
OFFSETS_FILE = "reports.offsets"


class ReportRowsError(MMedRAGError, ValueError):
    """``reports.jsonl`` or its offsets contradict themselves: a line that is not its row, offsets past the end."""


@dataclass(frozen=True)
class IndexedReport:
    """One index row: a unique report text and the ids of every corpus record that has it."""

    row: int
    report: str
    ids: tuple[str | int, ...]


def write_report_rows(directory: Path, entries: Iterable[IndexedReport]) -> None:
    """Write ``reports.jsonl`` (one JSON line per row, streamed) and then ``reports.offsets``, each atomically."""
    offsets = [0]
    with atomic_path(directory / REPORTS_FILE) as tmp, open(tmp, "wb") as sink:
        for entry in entries:
            line = json.dumps({"row": entry.row, "report": entry.report, "ids": list(entry.ids)}, ensure_ascii=False)
            offsets.append(offsets[-1] + sink.write((line + "\n").encode("utf-8")))
    with atomic_path(directory / OFFSETS_FILE) as tmp, open(tmp, "wb") as sink:
        np.save(sink, np.asarray(offsets, dtype=np.int64), allow_pickle=False)


class ReportRows(Sequence[IndexedReport]):
    """The rows of ``reports.jsonl`` as a read-only sequence of :class:`IndexedReport`, parsed when accessed.

    Compares equal to any sequence of the same reports (e.g. the tuple of a freshly built index). Thread-safe:
    each read is a ``pread`` at its own offset, never a shared file position.
    """

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path = path
        self._offsets = offsets
        size = path.stat().st_size
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != size:
            raise ReportRowsError(
                f"{path}: its offsets ({OFFSETS_FILE}) end at byte {offsets[-1] if len(offsets) else None}, but the "
                f"file has {size} bytes; rebuild the index."
            )
        self._file = open(path, "rb")  # noqa: SIM115 -- held for the index's lifetime, closed with it

    @classmethod
    def open(cls, path: Path, offsets_path: Path | None = None) -> ReportRows:
        """``path``'s rows, found through ``offsets_path`` (mapped), or by one scan of ``path`` when it is None."""
        if offsets_path is not None:
            try:
                offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as error:
                raise ReportRowsError(f"{offsets_path} is not an offsets array: {error}") from None
            if offsets.ndim != 1 or offsets.dtype != np.int64:
                raise ReportRowsError(
                    f"{offsets_path}: expected a 1-d int64 array, got {offsets.dtype} {offsets.shape}"
                )
            return cls(path, offsets)
        return cls(path, _scan_offsets(path))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} reports")
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        return _parse(self.path, row, os.pread(self._file.fileno(), end - start, start))

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def __iter__(self) -> Iterator[IndexedReport]:
        with open(self.path, "rb") as handle:
            for row, line in enumerate(handle):
                if row >= len(self):
                    break
                yield _parse(self.path, row, line)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # mutable-looking container semantics, like list

    def __repr__(self) -> str:
        return f"ReportRows({str(self.path)!r}, {len(self)} rows)"


def _parse(path: Path, row: int, line: bytes) -> IndexedReport:
    try:
        raw = json.loads(line)
        entry = IndexedReport(int(raw["row"]), str(raw["report"]), tuple(raw["ids"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise ReportRowsError(f"{path}, line {row + 1}: not a {{row, report, ids}} record ({error})") from None
    if entry.row != row:
        raise ReportRowsError(f"{path}, line {row + 1}: row {entry.row}, expected {row}")
    return entry


def _scan_offsets(path: Path) -> np.ndarray:
    """Line starts of ``path`` and its end, from one pass over its bytes (a last line may lack its newline)."""
    size = path.stat().st_size
    if size == 0:
        return np.zeros(1, dtype=np.int64)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1
    if len(ends) == 0 or ends[-1] != size:
        ends = np.append(ends, size)
    return np.concatenate([[0], ends]).astype(np.int64)
