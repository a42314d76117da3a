"""One ``generate`` or ``retrieve`` job split over several processes, merged into the output one process writes.

Two ways to split, as the original inference scripts did:

- ``torchrun --nproc_per_node K mmed-rag generate ...``: each process is one rank (``RANK`` / ``WORLD_SIZE``);
  with ``--device auto`` rank r runs on ``cuda:LOCAL_RANK``;
- ``--num-chunks K --chunk-idx I`` (LLaVA's convention), for schedulers that launch K independent jobs.

Part I of K answers one contiguous run of the input's records. The runs are cut at multiples of the batch size, so
every part's batches are exactly the batches a one-process run would make, padding included: greedy answers are
the one-process run's, byte for byte. Each part writes its own resumable file, ``OUTPUT.part-I-of-K`` (through
:class:`~mmed_rag.resumable.ResumableOutput`: ``.partial`` while running, a record of the run's identity beside
it), so a killed process loses at most a batch and its rerun continues. The process that finishes the last part
merges the parts into ``OUTPUT`` in input order, atomically, and removes them; the others end without waiting.
Parts of runs with other inputs or settings, or split another number of ways, are never merged together.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmed_rag.atomic import atomic_write_bytes
from mmed_rag.config import ConfigError
from mmed_rag.errors import MMedRAGError, first_few
from mmed_rag.outputs import OutputBusyError, output_lock
from mmed_rag.resumable import (
    IDENTITY_SUFFIX,
    ResumeError,
    finished_identity_path,
    partial_path,
    read_identity,
)

SHARD_KEY = "shard"  # the identity entry that differs between the parts of one run
MERGE_WAIT_S = 600.0  # how long a finished part waits for another process's merge (or unrelated run) to let go


class ShardError(MMedRAGError):
    """Parts that cannot be merged: another run's, split another way, or holding the same record twice."""


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count``; ``local_rank`` is torchrun's (None for independently launched chunks)."""

    index: int = 0
    count: int = 1
    local_rank: int | None = None

    @property
    def single(self) -> bool:
        return self.count == 1

    def bounds(self, n: int, batch_size: int) -> tuple[int, int]:
        """[start, stop) of this part's records among ``n``: whole batches, as even a split as batches allow."""
        batches = -(-n // batch_size)
        per_part = -(-batches // self.count)
        start = min(n, self.index * per_part * batch_size)
        return start, min(n, start + per_part * batch_size)

    def output(self, output: str | os.PathLike) -> Path:
        """The file this part writes: ``output`` itself when the job is not split."""
        output = Path(output)
        return output if self.single else output.with_name(f"{output.name}.part-{self.index}-of-{self.count}")

    def identity(self, n: int, batch_size: int) -> dict:
        """The identity entry of this part: which records it holds."""
        return {} if self.single else {SHARD_KEY: [self.index, self.count, *self.bounds(n, batch_size)]}

    def device(self, name: str) -> str:
        """``auto`` under torchrun with GPUs means this rank's own GPU."""
        if name == "auto" and self.local_rank is not None:
            import torch

            if torch.cuda.is_available():
                return f"cuda:{self.local_rank}"
        return name


@dataclass(kw_only=True)
class ShardOptions:
    """The options of a stage that splits its input over independently launched jobs (generate, retrieve)."""

    num_chunks: int = field(
        default=1, metadata={"help": "split the input into this many parts, one per job (LLaVA's convention)"}
    )
    chunk_idx: int = field(
        default=0, metadata={"help": "the part this job answers (0-based); the last part to finish merges them all"}
    )

    def shard(self, environ: Mapping[str, str] = os.environ) -> Shard:
        return resolve_shard(self.num_chunks, self.chunk_idx, environ)


def resolve_shard(num_chunks: int = 1, chunk_idx: int = 0, environ: Mapping[str, str] = os.environ) -> Shard:
    """The part this process answers: from ``--num-chunks/--chunk-idx``, else from torchrun's environment."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ConfigError(f"chunk_idx: expected 0 <= chunk_idx < num_chunks ({num_chunks}), got {chunk_idx}")
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_chunks > 1:
        raise ConfigError(
            f"num_chunks: split a job either with torchrun ({world} processes here) or with --num-chunks, not both"
        )
    if num_chunks > 1:
        return Shard(chunk_idx, num_chunks)
    if world > 1:
        return Shard(int(environ["RANK"]), world, int(environ.get("LOCAL_RANK", environ["RANK"])))
    return Shard()


_PART = re.compile(r"\.part-(\d+)-of-(\d+)(\..*)?$")


def _part_files(output: Path) -> list[tuple[Path, int]]:
    """Every file of any split of ``output`` (parts, partials, identity records), with the split's part count."""
    found = []
    for path in output.parent.glob(f"{glob.escape(output.name)}.part-*-of-*") if output.parent.is_dir() else ():
        match = _PART.fullmatch(path.name[len(output.name) :])
        if match and not path.name.endswith(".lock"):
            found.append((path, int(match.group(2))))
    return found


def check_parts(output: str | os.PathLike, shard: Shard, fresh: bool) -> None:
    """Before a run: refuse (or with ``fresh``, drop) parts of a split other than this run's.

    A one-process rerun of a split run, or a split rerun with another part count, would otherwise redo every
    record and leave the old parts to be merged later.
    """
    output = Path(output)
    others = sorted({count for _, count in _part_files(output) if count != shard.count})
    if not others:
        if not (shard.single or fresh) and output.exists() and not _part_files(output):
            raise ResumeError(
                f"{output} exists and is complete (an earlier run finished it): pass --fresh (or --overwrite) to "
                "write it again, or choose another output"
            )
        return
    if fresh:
        for path, count in _part_files(output):
            if count in others:
                path.unlink(missing_ok=True)
        return
    raise ShardError(
        f"{output} has parts of a run split {' and '.join(map(str, others))} ways "
        f"({output.name}.part-*-of-{others[0]}): rerun with that split (torchrun --nproc_per_node, or --num-chunks), "
        "or with --fresh to start over"
    )


def merge_parts(output: str | os.PathLike, count: int, order: Sequence, wait_s: float = MERGE_WAIT_S) -> int | None:
    """Merge the ``count`` finished parts of ``output`` in the input ``order`` of their keys; None while a part is
    unfinished, or when another process merged them first. Returns the merged file's number of lines."""
    output = Path(output)
    parts = [Shard(index, count).output(output) for index in range(count)]
    if not all(_finished(part) for part in parts):
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with output_lock(output, "merge"):
                if not all(_finished(part) for part in parts):
                    return None  # another process merged them while this one waited for the lock
                return _merge(output, parts, order)
        except OutputBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def unfinished_parts(output: str | os.PathLike, count: int) -> list[int]:
    """Indexes of the parts of ``output`` that are not finished yet."""
    return [index for index in range(count) if not _finished(Shard(index, count).output(Path(output)))]


def _finished(part: Path) -> bool:
    return part.is_file() and finished_identity_path(part).is_file()


def _merge(output: Path, parts: list[Path], order: Sequence) -> int:
    identities = [read_identity(finished_identity_path(part), part) for part in parts]
    common = {key: value for key, value in identities[0].items() if key != SHARD_KEY}
    for index, identity in enumerate(identities[1:], 1):
        identity = {key: value for key, value in identity.items() if key != SHARD_KEY}
        changed = [
            f"{key}: {common.get(key)!r} in part 0, {identity.get(key)!r} in part {index}"
            for key in sorted(set(common) | set(identity))
            if common.get(key) != identity.get(key)
        ]
        if changed:
            raise ResumeError(
                f"{parts[index]} and {parts[0]} were written by runs with other inputs or settings "
                f"({first_few(changed, 4)}): rerun the wrong part with --fresh and the right ones, then it merges"
            )
    position = {key: index for index, key in enumerate(order)}
    lines: list[tuple[int, bytes]] = []
    seen: dict = {}
    for part in parts:
        for number, line in enumerate(part.read_bytes().splitlines(keepends=True), 1):
            key = _key(line)
            if key in seen or key not in position:
                problem = f"also in {seen[key]}" if key in seen else "not in the input"
                raise ShardError(f"{part}, line {number}: record {key!r} is {problem}; rerun with --fresh")
            seen[key] = part
            lines.append((position[key], line))
    lines.sort(key=lambda item: item[0])
    atomic_write_bytes(output, b"".join(line for _, line in lines))
    for part in parts:  # the merged output is in place: its parts are now redundant
        stale_record = partial_path(part).with_name(partial_path(part).name + IDENTITY_SUFFIX)  # see ResumableOutput
        for path in (part, finished_identity_path(part), partial_path(part), stale_record):
            path.unlink(missing_ok=True)
    return len(lines)


def _key(line: bytes):
    record = json.loads(line)
    return record.get("question_id", record.get("id"))
