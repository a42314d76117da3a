"""Steps that run once: a step whose outputs exist and whose inputs are unchanged is skipped.

A step is named, has parameters (the config values it reads) and input paths; its identity is a hash of both
(inputs by content, :func:`mmed_rag.fingerprint.path_fingerprint`). After a step succeeds, ``OUT/.steps/NAME.json``
records that identity, the step's wall time and its JSON result (a step that starts records its identity first).
A second run skips a step whose record matches and whose outputs all exist, and returns the recorded result; any
change upstream changes the input fingerprints downstream, so exactly the affected steps rerun. A step whose
identity changed (its parameters, inputs or the outputs it claims) has its old outputs removed first, with the
``OUTPUT.partial`` resume file of an output file (the stages refuse to overwrite a finished output or to resume
another run's checkpoints); a step interrupted with the same identity keeps them, and its stage resumes from its
own partial files and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmed_rag.atomic import atomic_write_text
from mmed_rag.fingerprint import path_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    name: str
    seconds: float
    skipped: bool
    result: Any = None


@dataclass
class StepRunner:
    """Runs the demo's steps in order, skipping unchanged ones, and keeps their wall times for the report."""

    out: Path
    fresh: bool = False
    records: list[StepRecord] = field(default_factory=list)

    def _record_path(self, name: str) -> Path:
        return self.out / ".steps" / f"{name}.json"

    @staticmethod
    def _write(path: Path, record: dict) -> None:
        atomic_write_text(path, json.dumps(record, indent=1, default=str))

    def run(
        self,
        name: str,
        action: Callable[[], Any],
        *,
        params: dict | None = None,
        inputs: Sequence[str | Path] = (),
        outputs: Sequence[str | Path] = (),
    ) -> Any:
        """``action()`` unless a finished run with the same identity left every output; its (recorded) result."""
        identity = {
            "params": params or {},
            "inputs": {str(path): path_fingerprint(path) for path in inputs},
            "outputs": [str(path) for path in outputs],  # a step that now claims other paths starts clean
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        record_path = self._record_path(name)
        previous = json.loads(record_path.read_text()) if record_path.is_file() else None
        same = previous is not None and previous["identity"] == digest and not self.fresh
        if same and previous.get("finished") and all(Path(path).exists() for path in outputs):
            logger.info("step %s: unchanged, skipped (took %.0f s when it ran)", name, previous["seconds"])
            self.records.append(StepRecord(name, previous["seconds"], True, previous["result"]))
            return previous["result"]
        if not same:
            for path in map(Path, outputs):
                if path.is_dir():
                    shutil.rmtree(path)
                else:  # a file, and the resume file generate and retrieve keep beside it
                    path.unlink(missing_ok=True)
                    path.with_name(path.name + ".partial").unlink(missing_ok=True)
        logger.info("step %s: running", name)
        self._write(record_path, {"identity": digest, "finished": False, "identity_of": identity})
        started = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - started
        self._write(
            record_path,
            {"identity": digest, "finished": True, "seconds": seconds, "result": result, "identity_of": identity},
        )
        self.records.append(StepRecord(name, seconds, False, result))
        logger.info("step %s: done in %.1f s", name, seconds)
        return result
