"""Atomic file output: a reader never sees a half-written artefact.

Every writer in mmed-rag goes through here. Data is written to a temporary file in the destination's own
directory (so the final ``os.replace`` is a same-filesystem rename, which POSIX makes atomic) and only renamed
over the destination once it is complete and flushed. A crash or a kill mid-write leaves the previous file, or
nothing, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp creates 0600 files; finished artefacts get the permissions a plain open() would have given them.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; on success it is renamed over it.

    For libraries that insist on writing to a path themselves (PIL, safetensors, faiss). On error the
    temporary file is removed and the destination is left untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(destination: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``destination`` atomically."""
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(destination: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``destination`` atomically (UTF-8 by default, no BOM, newlines untranslated)."""
    atomic_write_bytes(destination, text.encode(encoding))


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put a fully written directory in place of ``final``: two renames, the old copy removed only after.

    A crash between the renames leaves ``final.previous`` (the old copy, complete) for a reader to fall back on;
    at no point is a half-written directory named ``final``.
    """
    staging, final = Path(staging), Path(final)
    previous = final.with_name(final.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.rename(final, previous)
    os.rename(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
