"""Output claims (locks, inputs never overwritten) and progress lines for logs."""

from __future__ import annotations

import errno
import io
import os
import signal
import socket
import subprocess
import sys
import threading

import filelock
import pytest

from mmed_rag import outputs
from mmed_rag.outputs import OutputBusyError, OutputError, claim_outputs, lock_path
from mmed_rag.progress import progress_bar


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    output = tmp_path / "out.jsonl"
    code = (
        "import os, signal\n"
        "from mmed_rag.outputs import claim_outputs\n"
        f"with claim_outputs('generate', files=[{str(output)!r}]):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL
    dead_holder = lock_path(output).read_text().splitlines()[0]  # the file stays; its flock died with it
    assert dead_holder.isdigit() and int(dead_holder) != os.getpid()
    with claim_outputs("generate", files=[output]):  # the kernel dropped the dead process's flock
        assert lock_path(output).read_text().splitlines()[:2] == [str(os.getpid()), socket.gethostname()]
    assert not lock_path(output).exists()


def test_a_stage_may_claim_what_its_caller_claimed(tmp_path):
    output = tmp_path / "out.jsonl"
    with claim_outputs("generate", files=[output]):
        with claim_outputs("generate", files=[output]):  # generate() -> MMedRAG.run_file()
            pass
        assert lock_path(output).exists()
    assert not lock_path(output).exists()


def test_folders_made_for_a_run_that_wrote_nothing_are_removed(tmp_path):
    with claim_outputs("eval", directories=[tmp_path / "a/b/eval"]):
        assert (tmp_path / "a/b").is_dir()
    assert not (tmp_path / "a").exists()
    with claim_outputs("eval", directories=[tmp_path / "a/b/eval"]):
        (tmp_path / "a/b/eval").mkdir()
    assert (tmp_path / "a/b/eval").is_dir()


def test_outputs_that_are_inputs_are_refused(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub/x.json").write_text("[]")
    (tmp_path / "alias").symlink_to(data)
    with pytest.raises(OutputError, match="is also the input"):
        with claim_outputs("s", files=[tmp_path / "alias/sub/x.json"], inputs=[data / "sub/x.json"]):
            pass
    with pytest.raises(OutputError, match="holds the input"):
        with claim_outputs("s", replaced=[tmp_path / "alias"], inputs=[data / "sub/x.json"]):
            pass
    with claim_outputs("s", directories=[data], inputs=[data / "sub/x.json"]):  # files written beside inputs: fine
        pass


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock: filelock's native lock fails with ENOSYS, the soft lock takes over."""

    def native(*args, **kwargs):
        lock = filelock.UnixFileLock(*args, **kwargs)

        def acquire(*_args, **_kwargs):
            raise OSError(errno.ENOSYS, "flock not supported")

        lock.acquire = acquire
        return lock

    monkeypatch.setattr(outputs.filelock, "FileLock", native)


def test_a_run_refused_before_the_holder_wrote_its_name_waits_for_it(tmp_path):
    """Two runs started together: the loser can read the lock file between the winner's lock and its note."""
    path = tmp_path / "out.jsonl.lock"
    path.write_text("")
    writer = threading.Timer(0.2, lambda: path.write_text("123\nsomehost\nmmed-rag generate since 12:00\n"))
    writer.start()
    try:
        assert outputs._describe_holder(path) == "pid 123 on host somehost, mmed-rag generate since 12:00"
    finally:
        writer.join()
    path.write_text("")
    assert outputs._describe_holder(path, wait_s=0.1) == "a process that has not written its name yet"


def test_without_flock_a_soft_lock_names_a_live_holder_and_breaks_a_dead_ones(tmp_path, no_flock):
    output = tmp_path / "out.jsonl"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(output).write_text(f"{sleeper.pid}\n{socket.gethostname()}\n")
        with pytest.raises(OutputBusyError, match=f"pid {sleeper.pid} on host"):
            with claim_outputs("generate", files=[output]):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with claim_outputs("generate", files=[output]):  # its holder is gone: the stale marker is broken
        assert lock_path(output).exists()
    assert not lock_path(output).exists()


def test_progress_in_a_log_is_a_few_whole_lines():
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="generating", file=log, mininterval=0):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 2 <= len(lines) <= 22, lines  # the start, every 5%, the end
    assert lines[-1].startswith("generating: 100%") and "1000/1000" in lines[-1]
