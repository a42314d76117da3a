"""Progress of long loops: a live bar on a terminal, a few plain lines in a log file.

tqdm redraws its bar with carriage returns several times a second. On a terminal that is what users want; in a
file (a scheduler's log, ``2> run.log``) it becomes thousands of updates glued into one line. So when stderr is
not a terminal, :func:`progress_bar` writes a full line only every :data:`LOG_STEP` of the total or every
:data:`LOG_SECONDS`, whichever comes first, plus the final line.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm as terminal_tqdm

LOG_STEP = 0.05  # of the total
LOG_SECONDS = 60.0


class _LinesOnly:
    """The stream under a log progress bar: tqdm's bare carriage returns and newlines are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class LogProgress(plain_tqdm):
    """tqdm that prints whole lines, at most every LOG_STEP of the total or LOG_SECONDS (for non-terminals)."""

    def __init__(self, *args, **kwargs):
        self._logged_n: float | None = None
        self._logged_at = time.monotonic()
        kwargs["file"] = _LinesOnly(kwargs.get("file") or sys.stderr)
        kwargs.setdefault("mininterval", 1.0)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "":  # a leave=False bar being cleared at close
            return True
        closing = self.disable  # close() disables the bar before its last display
        now, n = time.monotonic(), self.n
        due = (
            self._logged_n is None
            or (self.total and n - self._logged_n >= LOG_STEP * self.total)
            or now - self._logged_at >= LOG_SECONDS
            or (self.total is not None and n >= self.total)
            or closing
        )
        if due and n != self._logged_n:
            self.fp.write(self.format_meter(**self.format_dict).strip() + "\n")
            self.fp.flush()
            self._logged_n, self._logged_at = n, now
        return True


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar for ``iterable`` (same arguments): live on a terminal, line by line otherwise."""
    stream = kwargs.get("file") or sys.stderr
    interactive = getattr(stream, "isatty", lambda: False)()
    return (terminal_tqdm if interactive else LogProgress)(iterable, **kwargs)
