"""Claiming a stage's outputs before any work: one writer per output, and never an input overwritten.

Two runs writing the same output interleave their results (a scheduler retries a job, a user starts it twice),
and an output path that is also an input replaces the user's data. So every stage that writes calls
:func:`claim_outputs` first:

- an output that resolves (through symlinks) to an input, or a directory output that would replace a directory
  holding an input, is refused;
- each output gets an exclusive lock, ``OUTPUT.lock`` beside it, held until the stage ends. The lock is an
  ``flock`` through `filelock`: the kernel drops it when its process dies, however it dies, so a killed run never
  leaves a stale lock behind. The lock file holds the holder's pid, host, stage and start time, which a second
  run names in its error. On a filesystem without ``flock`` filelock's soft lock takes over; it records pid and
  host too and breaks a lock whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import filelock

from mmed_rag.errors import MMedRAGError

LOCK_SUFFIX = ".lock"
# How long a refused run waits for the lock holder to write who it is (see _describe_holder).
HOLDER_NOTE_WAIT_S = 2.0

# Locks this process holds, by lock path: a stage function that claims its output and then calls another public
# function that claims the same output (``generate`` → ``MMedRAG.run_file``) holds it once; the outer claim
# releases it.
_HELD: set[Path] = set()

PathLike = str | os.PathLike


class OutputError(MMedRAGError):
    """An output that cannot be written: it is an input, a directory where a file goes, or unwritable."""


class OutputBusyError(OutputError):
    """Another run is writing the same output."""


def lock_path(output: PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


def _resolved(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_apart(outputs: Iterable[PathLike], inputs: Iterable[PathLike], replaced: Iterable[PathLike] = ()) -> None:
    """Refuse an output that is an input, or a ``replaced`` directory (one published whole) that holds an input."""
    inputs = [(path, _resolved(path)) for path in inputs if path]
    replaced = {_resolved(path) for path in replaced if path}
    for output in filter(None, outputs):
        target = _resolved(output)
        for given, source in inputs:
            if target == source:
                how = "" if os.path.abspath(output) == os.path.abspath(given) else f" (both resolve to {target})"
                raise OutputError(f"output {output} is also the input {given}{how}: writing it would destroy it")
            if target in replaced and target in source.parents:
                raise OutputError(
                    f"output directory {output} holds the input {given}: it is replaced as a whole when the run ends"
                )


def _holder_note(stage: str) -> bytes:
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return f"{os.getpid()}\n{socket.gethostname()}\nmmed-rag {stage} since {started}\n".encode()


def _describe_holder(path: Path, wait_s: float = HOLDER_NOTE_WAIT_S) -> str:
    """'pid N on host H, mmed-rag STAGE since T' from a lock file, or what can be said without it.

    The holder writes its note just after it takes the lock, so a run refused in between finds the file empty:
    it waits up to ``wait_s`` for the note rather than name nobody (two runs started together did hit this)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        if len(lines) >= 2 and lines[0].strip().isdigit():
            rest = f", {lines[2]}" if len(lines) >= 3 and lines[2].startswith("mmed-rag") else ""
            return f"pid {lines[0].strip()} on host {lines[1]}{rest}"
        if time.monotonic() >= deadline:
            return "a process that has not written its name yet"
        time.sleep(0.05)


@contextlib.contextmanager
def output_lock(output: PathLike, stage: str) -> Iterator[Path]:
    """Hold ``OUTPUT.lock`` for the block; another holder makes this raise :class:`OutputBusyError` at once."""
    path = lock_path(output)
    key = _resolved(path)
    if key in _HELD:
        yield path
        return
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder of the output {output}: {error.strerror or error}") from None
    try:
        with _locked(path, stage, output):
            _HELD.add(key)
            try:
                yield path
            finally:
                _HELD.discard(key)
    finally:
        for folder in created:  # innermost first; a run that wrote nothing leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def _locked(path: Path, stage: str, output: PathLike) -> Iterator[None]:
    note = _holder_note(stage)

    def write_note(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)

    lock: filelock.BaseFileLock = filelock.FileLock(path, timeout=0, on_acquired=write_note)
    try:
        try:
            lock.acquire()
        except OSError as error:
            if error.errno != errno.ENOSYS:
                raise
            lock = filelock.SoftFileLock(path, timeout=0)  # no flock here: pid/host marker, stale ones broken
            lock.acquire()
    except filelock.Timeout:
        raise OutputBusyError(
            f"output {output} is being written by another run ({_describe_holder(path)}; lock {path}); "
            "wait for it to finish, or choose another output"
        ) from None
    except OSError as error:
        raise OutputError(f"cannot write the output {output}: {error.strerror or error} ({path})") from None
    try:
        yield
    finally:
        # Unlinked while still held: a run that opened this inode meanwhile sees it unlinked after its flock and
        # does not count itself the holder (filelock checks), a later run creates a fresh one.
        if not isinstance(lock, filelock.SoftFileLock):
            path.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def claim_outputs(
    stage: str,
    *,
    files: Iterable[PathLike] = (),
    directories: Iterable[PathLike] = (),
    replaced: Iterable[PathLike] = (),
    inputs: Iterable[PathLike] = (),
    lock: bool = True,
) -> Iterator[None]:
    """Check and lock a stage's outputs for the block, before any work.

    ``files``: output files; ``directories``: output directories the stage writes files into; ``replaced``:
    output directories published whole (built aside, then renamed over the old one); ``inputs``: every path the
    stage reads (files or directories; ``None`` entries are ignored). ``lock=False`` checks without locking: the
    other processes of a distributed run, whose main process holds the locks.
    """
    files, directories, replaced = [list(filter(None, group)) for group in (files, directories, replaced)]
    outputs = files + directories + replaced
    check_apart(outputs, list(inputs), replaced)
    for output in files:
        if Path(output).is_dir():
            raise OutputError(f"output {output} is a directory; give a file path")
    for output in directories + replaced:
        if Path(output).exists() and not Path(output).is_dir():
            raise OutputError(f"output {output} is a file; give a directory path")
    with contextlib.ExitStack() as locks:
        for output in outputs if lock else ():
            locks.enter_context(output_lock(output, stage))
        yield
