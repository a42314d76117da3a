"""The one base class of every error the library raises on bad input or a bad artefact.

A user can tell two kinds of failure apart: something they gave us is wrong (a record, an image, a config, an
index, a model directory, an output path that is taken or is an input), or mmed-rag has a bug. The first kind
derives from :class:`MMedRAGError`, with a message that names the file and, where there is one, the record and
field; ``mmed-rag`` prints it as one line and exits with :data:`EXIT_BAD_INPUT`. Anything else is a bug and keeps
its traceback.

Each specific error keeps a built-in base as well (``RecordError`` is a ``ValueError``, ``ImageLoadError`` an
``OSError``, ...), so code that caught those before still does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

#: Exit code of a stage stopped by bad input (argparse uses 2 for a bad command line too).
EXIT_BAD_INPUT = 2


class MMedRAGError(Exception):
    """Bad input or a bad artefact: the user can act on the message; not a bug."""


def first_few(items: Sequence[str], count: int, separator: str = "; ") -> str:
    """The first ``count`` items joined, then how many more there are: a message names a few, not thousands."""
    more = f"{separator}and {len(items) - count} more" if len(items) > count else ""
    return separator.join(items[:count]) + more


def relative_base(path: str | os.PathLike) -> str:
    """ " (relative paths are read from the current directory, /x)" for a relative path, "" for an absolute one.

    Config presets name paths relative to where the command runs (the README's commands run in one folder), so a
    path that is not found says which folder it was looked up in.
    """
    return "" if os.path.isabs(path) else f" (relative paths are read from the current directory, {os.getcwd()})"


def model_directory_problem(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` is not a model directory (no ``config.json``), or None when it is one.

    A ``train-sft`` or ``train-dpo`` output holds one folder per stage; the message names the ones that hold a
    model, since passing the output itself is the usual slip.
    """
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return None
    if not os.path.isdir(directory):
        return f"{directory} is not a model directory (no such directory{relative_base(directory)})"
    inside = sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "config.json"))
    )
    hint = f"; its folders {', '.join(inside)} hold models: give one of them" if inside else ""
    return f"{directory} is not a model directory (no config.json){hint}"
