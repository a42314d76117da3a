"""generate and retrieve split over processes (torchrun ranks, --num-chunks jobs) write what one process writes.

The torchrun runs are real: two CPU processes launched by torchrun; the kill is a real SIGKILL of one rank at
its n-th batch, after which torchrun stops the other, as a scheduler's job dies. The merged output is compared
byte for byte with a one-process run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmed_rag.cli import main
from mmed_rag.config import ConfigError
from mmed_rag.sharding import Shard, resolve_shard
from mmed_rag.testing import free_port

TORCHRUN = Path(sys.executable).parent / "torchrun"

# One rank SIGKILLs itself at its n-th written batch; the others run on (until torchrun stops them).
RANK_KILLER = """
import os, signal, sys
from mmed_rag import resumable
rank, calls = sys.argv[1], [int(sys.argv[2])]
original = resumable.ResumableOutput.append
def append(self, lines):
    if os.environ["RANK"] == rank:
        calls[0] -= 1
        if calls[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    return original(self, lines)
resumable.ResumableOutput.append = append
from mmed_rag.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_parts_cover_every_record_once_in_whole_batches():
    for n, count, batch in [(24, 2, 4), (25, 3, 4), (3, 4, 2), (0, 2, 8), (100, 7, 1)]:
        bounds = [Shard(index, count).bounds(n, batch) for index in range(count)]
        assert [record for start, stop in bounds for record in range(start, stop)] == list(range(n))
        assert all(start % batch == 0 for start, stop in bounds if stop > start)


def test_the_split_comes_from_the_flags_or_torchrun():
    assert resolve_shard(1, 0, {}) == Shard()
    assert resolve_shard(3, 2, {}) == Shard(2, 3)
    assert resolve_shard(1, 0, {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == Shard(1, 2, 1)
    with pytest.raises(ConfigError, match="not both"):
        resolve_shard(2, 0, {"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ConfigError, match="chunk_idx"):
        resolve_shard(2, 2, {})


def questions(world, tmp: Path, copies: int = 6) -> Path:
    """The radiology VQA test file repeated under new ids: 24 questions, six batches of four."""
    rows = [json.loads(line) for line in world.vqa.read_text().splitlines()] * copies
    path = tmp / "questions.jsonl"
    path.write_text("".join(json.dumps({**row, "question_id": index}) + "\n" for index, row in enumerate(rows)))
    return path


def generate_argv(world, source: Path, output: Path, *extra: str) -> list[str]:
    return [
        *("generate", "--model", str(world.llava), "--no-retrieval", "--modality", "radiology"),
        *("--input", str(source), "--output", str(output), "--img-root", str(world.images)),
        *("--batch-size", "4", "--max-new-tokens", "3", "--device", "cpu", *extra),
    ]


def retrieve_argv(world, source: Path, output: Path, *extra: str) -> list[str]:
    return [
        *("retrieve", "--eval_json", str(source), "--output_path", str(output), "--img_root", str(world.images)),
        *("--index", str(world.index), "--model_name_or_path", str(world.clip), "--batch_size", "4"),
        *("--device", "cpu", *extra),
    ]


def torchrun(script: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 SCRIPT...`` on CPU; the whole process group is killed if it overruns."""
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), *script]
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, output)


def leftovers(output: Path) -> list[str]:
    """Files named after ``output`` (parts, partial files, identity records, locks) that are still there."""
    return sorted(path.name for path in output.parent.glob(f"{output.name}.*"))


def test_generate_under_torchrun_writes_the_one_process_output_and_survives_a_killed_rank(world, tmp_path):
    source = questions(world, tmp_path)
    straight = tmp_path / "straight.jsonl"
    assert main(generate_argv(world, source, straight)) == 0

    killed = tmp_path / "killed.jsonl"
    (tmp_path / "killer.py").write_text(RANK_KILLER)
    run = torchrun(["killer.py", "1", "2", *generate_argv(world, source, killed)], tmp_path)
    assert run.returncode != 0 and not killed.exists()
    rank1 = Path(f"{killed}.part-1-of-2.partial")
    assert len(rank1.read_text().splitlines()) == 4  # its first batch made it, its second did not
    run = torchrun(["-m", "mmed_rag.cli", *generate_argv(world, source, killed)], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    assert killed.read_bytes() == straight.read_bytes()  # nothing lost, nothing twice, in input order
    assert leftovers(killed) == [] and (tmp_path / "killed.config.yaml").is_file()


def test_chunks_launched_as_separate_jobs_merge_when_the_last_one_finishes(world, tmp_path, capsys):
    source = questions(world, tmp_path)
    straight, split = tmp_path / "straight.jsonl", tmp_path / "split.jsonl"
    assert main(generate_argv(world, source, straight)) == 0
    assert main(generate_argv(world, source, split, "--num-chunks", "3", "--chunk-idx", "2")) == 0
    assert "parts 0, 1 are not finished yet" in capsys.readouterr().out and not split.exists()
    assert main(generate_argv(world, source, split, "--num-chunks", "3", "--chunk-idx", "0")) == 0
    assert main(generate_argv(world, source, split, "--num-chunks", "3", "--chunk-idx", "1")) == 0
    assert f"prediction(s) to {split} " in capsys.readouterr().out
    assert split.read_bytes() == straight.read_bytes()
    assert leftovers(split) == [] and (tmp_path / "split.config.yaml").is_file()


def refusal(argv: list[str], capsys) -> str:
    """The error ``mmed-rag argv`` stops with (it must stop with one)."""
    assert main(argv) != 0
    return " ".join(capsys.readouterr().err.split())


def test_parts_of_different_runs_or_splits_are_never_merged(world, tmp_path, capsys):
    source = questions(world, tmp_path)
    output = tmp_path / "out.jsonl"

    def argv(*extra: str) -> list[str]:
        return generate_argv(world, source, output, *extra)

    assert main(argv("--num-chunks", "2", "--chunk-idx", "1")) == 0
    # A finished part rerun with other settings is refused like any resume.
    error = refusal(argv("--num-chunks", "2", "--chunk-idx", "1", "--max-new-tokens", "2"), capsys)
    assert (
        "out.jsonl.part-1-of-2 holds results of a run with other" in error and "max_new_tokens: 3 then, 2 now" in error
    )
    # A one-process run, or another split, would answer everything again and leave the part behind.
    assert "split 2 ways" in refusal(argv(), capsys)
    assert "split 2 ways" in refusal(argv("--num-chunks", "3", "--chunk-idx", "0"), capsys)
    # The other part made with other settings: the merge names the difference and merges nothing.
    error = refusal(argv("--num-chunks", "2", "--chunk-idx", "0", "--max-new-tokens", "2"), capsys)
    assert "part-1-of-2 and" in error and "part-0-of-2 were written by runs with other inputs or settings" in error
    assert "max_new_tokens: 2 in part 0, 3 in part 1" in error and not output.exists()
    # --fresh on a one-process run clears every part and answers everything.
    assert main(argv("--fresh")) == 0
    assert leftovers(output) == [] and len(output.read_text().splitlines()) == 24
    assert "exists and is complete" in refusal(argv("--num-chunks", "2", "--chunk-idx", "0"), capsys)


def test_retrieve_under_torchrun_builds_the_index_once_and_writes_the_one_process_output(world, tmp_path):
    source = questions(world, tmp_path)
    straight, split = tmp_path / "straight.jsonl", tmp_path / "split" / "split.jsonl"
    split.parent.mkdir()
    assert main(retrieve_argv(world, source, straight, "--train_json", str(world.corpus))) == 0
    # No --index: both ranks need the corpus index; one builds and caches it, the other waits and loads it.
    argv = [arg for arg in retrieve_argv(world, source, split) if arg not in ("--index", str(world.index))]
    # -v: every rank logs (rank 1 otherwise shows only warnings), so both the build and the reuse are seen.
    run = torchrun(["-m", "mmed_rag.cli", "-v", *argv, "--train_json", str(world.corpus)], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.stdout.count("Reusing the cached report index") == 1, run.stdout[-3000:]
    assert run.stdout.count("Saved ReportIndex") == 1, run.stdout[-3000:]
    assert split.read_bytes() == straight.read_bytes()
    assert leftovers(split) == []
