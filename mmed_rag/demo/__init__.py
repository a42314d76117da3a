"""``mmed-rag demo``: MMed-RAG end to end on the bundled phantoms, and a REPORT.md of what held.

:mod:`.config` holds the arguments (light: ``mmed-rag demo --help`` imports nothing heavy), :mod:`.steps` the
skip-if-unchanged step runner, :mod:`.recipe` the method as a sequence of the public stage functions (the calls a
user makes on real data) and :mod:`.report` the report, built only from files the run wrote.
"""

from mmed_rag.demo.config import DemoConfig

__all__ = ["DemoConfig", "run_demo"]


def run_demo(config: DemoConfig) -> int:
    """Run the demo; return a process exit code."""
    from mmed_rag.demo.recipe import run_demo as run

    return run(config)
