"""Test probe for torchrun's worker processes, loaded by Python at start-up when this folder is on PYTHONPATH.

Acts only in a process that torchrun started (``RANK`` set) and only as the environment asks:

- ``PROBE_RECORD_WRITES=DIR``: record every write under ``DIR`` (a file opened for writing, a rename, a folder
  made or removed) through Python's audit hooks, and save the list to ``DIR.writes.<rank>.json`` at exit;
- ``PROBE_FREEZE_AFTER=PATH``: rank 0 stops itself (SIGSTOP) as soon as a rename onto ``PATH`` has completed,
  e.g. the run's ``last`` checkpoint directory, so a test can kill the job at exactly that point.
"""

import atexit
import json
import os
import signal
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink", "os.link"}


def _real(path) -> str | None:
    if isinstance(path, str | bytes | os.PathLike):
        return os.fsdecode(os.path.realpath(path))
    return None


def _record_writes(watched: str, rank: str) -> None:
    writes, recording = {}, [True]  # a dict: each write once, in order

    def hook(event, args):
        if not recording[0]:
            return
        if event == "open":
            _path, mode, flags = args
            writing = set(mode) & set("wax+") if isinstance(mode, str) else mode is None and flags & WRITE_FLAGS
            if not writing:
                return
        elif event not in PATH_EVENTS:
            return
        path = _real(args[0])
        if path is not None and (path == watched or path.startswith(watched + os.sep)):
            writes[f"{event} {path}"] = None

    def save():
        recording[0] = False
        with open(f"{watched}.writes.{rank}.json", "w", encoding="utf-8") as out:
            json.dump(list(writes), out)

    sys.addaudithook(hook)
    atexit.register(save)


def _freeze_after(target: str) -> None:
    renamed = [False]

    def hook(event, args):
        if renamed[0]:  # the first event after the rename: the rename has returned
            os.kill(os.getpid(), signal.SIGSTOP)
        elif event == "os.rename" and _real(args[1]) == target:
            renamed[0] = True

    sys.addaudithook(hook)


if "RANK" in os.environ:
    if os.environ.get("PROBE_RECORD_WRITES"):
        _record_writes(os.path.realpath(os.environ["PROBE_RECORD_WRITES"]), os.environ["RANK"])
    if os.environ.get("PROBE_FREEZE_AFTER") and os.environ["RANK"] == "0":
        _freeze_after(os.path.realpath(os.environ["PROBE_FREEZE_AFTER"]))
