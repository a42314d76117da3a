"""Content fingerprints of files: what manifests and caches pin an artefact to (weights, corpora, indexes)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (weights files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Files above this size are fingerprinted by size and modification time, not content: hashing a 7B model's
#: 14 GB of weights at every run start would cost more than the check is worth.
HASHED_FILE_LIMIT = 64 << 20


def path_fingerprint(path: str | os.PathLike | None) -> str | None:
    """A short fingerprint of a file or a directory tree (names, then content or size + mtime per file).

    What a resumed run compares to tell "the same model / index / input" from "another one": it changes when a
    file is added, removed, edited or replaced. ``None`` for ``None``; a path that does not exist gives
    ``"missing"``.
    """
    if path is None:
        return None
    root = os.fspath(path)
    if not os.path.exists(root):
        return "missing"
    files = (
        [root]
        if os.path.isfile(root)
        else sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)
    )
    digest = hashlib.sha256()
    for name in files:
        stat = os.stat(name)
        if stat.st_size <= HASHED_FILE_LIMIT:
            content = file_sha256(name)
        else:
            content = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{os.path.relpath(name, root)}\0{content}\n".encode())
    return digest.hexdigest()[:16]
