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

from collections.abc import Sequence

#: Exit code of a stage stopped by bad input (argparse uses 2 for a bad command line too).
EXIT_BAD_INPUT = 2


class MMedRAGError(Exception):
    """Bad input or a bad artefact: the user can act on the message; not a bug."""


def first_few(items: Sequence[str], count: int, separator: str = "; ") -> str:
    """The first ``count`` items joined, then how many more there are: a message names a few, not thousands."""
    more = f"{separator}and {len(items) - count} more" if len(items) > count else ""
    return separator.join(items[:count]) + more
