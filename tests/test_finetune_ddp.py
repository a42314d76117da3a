"""Fine-tuning a retriever on 2 processes (torchrun, gloo on the CPU): what one process with the whole batch
trains, rank 0 alone writing the run directory, and a killed run that resumes to the same weights."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing
from test_finetune import MODALITY, SMALL_RUN, epochs_logged, phantoms, small_run, small_train, weights  # noqa: F401

from mmed_rag.data.records import read_retriever_train
from mmed_rag.retrieval import finetune
from mmed_rag.retrieval.clip import create_clip, load_clip
from mmed_rag.retrieval.distributed import RankBatches, World, contrastive_loss, joined_world
from mmed_rag.retrieval.encode import encode_images, encode_texts
from mmed_rag.retrieval.finetune import (
    FinetuneError,
    Pair,
    PairDataset,
    ResumeMismatchError,
    _synchronised_batch_norm,
    finetune_clip,
    image_report_pairs,
)
from mmed_rag.testing import free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
PROBE = Path(__file__).parent / "torchrun_probe"  # see its sitecustomize.py
RUN_TIMEOUT_S = 300  # one torchrun launch: 10 s on 2 quiet cores, 25 s on busy ones, mostly imports
# The 2-process runs: SMALL_RUN's 8 pairs a step as 4 per process, on the CPU (gloo); 3 epochs of 4 steps.
TWO_PROCESSES = SMALL_RUN | {"batch_size": 4, "device": "cpu", "epochs": 3}
# 2 processes against 1, after 12 steps (measured on 2 CPU cores): every weight but the attention key biases
# within 1.0e-5, the embeddings of the training images and reports within 4e-7 (float32 rounding: the gathered
# and averaged gradients are summed in another order than one process sums them). Tolerances: 10x and 25x that.
WEIGHT_TOLERANCE, EMBEDDING_TOLERANCE = 1e-4, 1e-5


def key_bias(name: str, value: torch.Tensor) -> slice | None:
    """The key part of an attention layer's input bias (q, k, v stacked): softmax over the keys ignores it, so
    its gradient is 0 but for float rounding (1e-9 to 1e-8 here, against 1e-2 for the query and value biases),
    which AdamW's normalised steps turn into steps of up to lr in either direction. Those weights differ between
    any two runs that round differently (measured: about 2e-3 after 12 steps at lr 1e-3) and change no output."""
    if name.endswith("attn.in_proj_bias"):
        width = len(value) // 3
        return slice(width, 2 * width)
    return None


def weight_differences(ours: dict, theirs: dict) -> tuple[float, float]:
    """The largest difference of any weight but the attention key biases, and the largest of those."""
    rest, keys = [0.0], [0.0]
    for name, value in ours.items():
        difference = (value - theirs[name]).abs()
        if (key_part := key_bias(name, value)) is not None:
            keys.append(difference[key_part].max().item())
            difference[key_part] = 0
        rest.append(difference.max().item())
    return max(rest), max(keys)


def embeddings(retriever_dir: Path, phantoms: Path, train_data: Path) -> tuple[np.ndarray, np.ndarray]:  # noqa: F811
    model, _, preprocess, tokenizer = load_clip(retriever_dir)
    pairs = image_report_pairs(read_retriever_train(train_data).records)
    images = encode_images(model, preprocess, phantoms / "images", [p.image for p in pairs], progress=False)
    return images, encode_texts(model, tokenizer, [p.report for p in pairs], progress=False)


def flags(phantoms, train_data, logs, **overrides) -> list[str]:  # noqa: F811
    """The finetune-clip command line of the 2-process runs, with ``overrides``."""
    values = TWO_PROCESSES | {
        "train_data": train_data,
        "img_root": phantoms / "images",
        "dataset_type": MODALITY,
        "logs": logs,
        **overrides,
    }
    return [item for name, value in values.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def environment(**probe) -> dict[str, str]:
    """This checkout's code (the workers' python starts elsewhere), the probe (tests/torchrun_probe), one thread
    per process."""
    path = os.pathsep.join(filter(None, [str(PROBE), str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **probe}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: torchrun starts each worker in a session of its own, so killing its process
    group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    """Stop every process of the job, then kill them: none sees another die and reacts first."""
    tree = process_tree(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for member in tree:
            try:
                os.kill(member, sig)
            except ProcessLookupError:
                pass


@contextmanager
def launched(command: list[str], log: Path, **env):
    """Start ``command``; whatever happens in the block, no process of it outlives the block."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=environment(**env), stdout=output, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            if process.poll() is None:
                kill_tree(process.pid)
            process.wait(timeout=30)


def finished(command: list[str], log: Path, **env) -> None:
    with launched(command, log, **env) as process:
        try:
            returncode = process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command[0]} ran past {RUN_TIMEOUT_S} s; its output:\n{log.read_text()[-4000:]}")
    assert returncode == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def two_processes(phantoms, small_train, tmp_path_factory):  # noqa: F811
    """A 2-process run with the documented command, 4 pairs a process; every write under logs/ recorded."""
    logs = tmp_path_factory.mktemp("ddp") / "logs"
    # `--` ends torchrun's options: it would take finetune-clip's --logs for its own --logs-specs.
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master-port", str(free_port()), "-m", "--", "mmed_rag.cli"]
    command += ["finetune-clip", *flags(phantoms, small_train, logs, name="two", report_to="tensorboard")]
    finished(command, logs.parent / "log.txt", PROBE_RECORD_WRITES=str(logs))
    return logs / "two"


def test_two_processes_train_the_weights_of_one_process_with_the_whole_batch(
    two_processes,
    phantoms,  # noqa: F811
    small_train,  # noqa: F811
    tmp_path,
):
    run_dir = two_processes
    one = small_run(phantoms, small_train, tmp_path, name="one", batch_size=8, epochs=3, device="cpu")
    finetune_clip(one)
    difference, key_biases = weight_differences(weights(run_dir / "last"), weights(one.run_dir / "last"))
    ours, theirs = (
        embeddings(run_dir / "last", phantoms, small_train),
        embeddings(one.run_dir / "last", phantoms, small_train),
    )
    embedded = max(np.abs(a - b).max() for a, b in zip(ours, theirs, strict=True))
    print(f"2 processes against 1: weights {difference:.2g} (key biases {key_biases:.2g}), embeddings {embedded:.2g}")
    assert difference < WEIGHT_TOLERANCE and embedded < EMBEDDING_TOLERANCE
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (one.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line["split"]) for line in lines] == [(line["epoch"], line["split"]) for line in single]
    for line, alone in zip(lines, single, strict=True):  # the step's loss over both processes is one's loss
        assert line["loss"] == pytest.approx(alone["loss"], abs=1e-5)
    manifest = json.loads((run_dir / "best/manifest.json").read_text())
    assert manifest["trained_on"] == {"device": "cpu", "precision": "fp32", "processes": 2, "batch": 8}


def test_only_rank_0_writes_the_run_directory(two_processes):
    run_dir = two_processes
    written = {rank: json.loads(Path(f"{run_dir.parent}.writes.{rank}.json").read_text()) for rank in (0, 1)}
    assert written[1] == []
    assert f"os.rename {run_dir.resolve()}/last.partial" in written[0]  # the probe does see the checkpoints written
    assert epochs_logged(run_dir, "train") == [1, 2, 3]  # one line per epoch, not one per process
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert {path.name for path in run_dir.iterdir()} == {
        "best",
        "last",
        "config.yaml",
        "metrics.jsonl",
        "curves.png",
        "tensorboard",
    }


def test_a_killed_two_process_run_resumes_to_the_same_weights(
    two_processes,
    phantoms,  # noqa: F811
    small_train,  # noqa: F811
    tmp_path,
):
    command = ["bash", str(REPO / "scripts/finetune_clip.sh"), *flags(phantoms, small_train, tmp_path, name="two")]
    run_dir = tmp_path / "two"
    # Rank 0 freezes the moment epoch 1's checkpoint is in place; then the whole job is killed.
    killed = tmp_path / "killed.txt"
    freeze = {"PROBE_FREEZE_AFTER": str(run_dir / "last")}
    with launched(command, killed, NPROC="2", MASTER_PORT=str(free_port()), **freeze) as process:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (run_dir / "last").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (run_dir / "last").is_dir(), killed.read_text()[-4000:]
    assert json.loads((run_dir / "last/trainer_state.json").read_text())["epochs_done"] == 1

    resumed = tmp_path / "resumed.txt"
    finished(command, resumed, NPROC="2", MASTER_PORT=str(free_port()))  # the same command
    assert f"Resuming {run_dir} after epoch 1 of 3" in resumed.read_text()
    assert epochs_logged(run_dir, "train") == [1, 2, 3]
    expected = weights(two_processes / "last")
    for name, value in weights(run_dir / "last").items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_a_run_resumes_on_another_number_of_processes_with_the_same_pairs_a_step(
    two_processes,
    phantoms,  # noqa: F811
    small_train,  # noqa: F811
    tmp_path,
):
    shutil.copytree(two_processes, tmp_path / "two", ignore=shutil.ignore_patterns("best", "tensorboard"))
    with pytest.raises(ResumeMismatchError, match=r"pairs per step \(batch_size x processes\): 4 x 2 -> 4 x 1"):
        finetune_clip(small_run(phantoms, small_train, tmp_path, name="two", batch_size=4, epochs=4))
    finetune_clip(small_run(phantoms, small_train, tmp_path, name="two", batch_size=8, epochs=4))
    assert epochs_logged(tmp_path / "two", "train") == [1, 2, 3, 4]


# -- the pieces, on plain data -------------------------------------------------------------------------------


def test_the_processes_batches_together_are_the_one_process_batches():
    def batches(rank, size, per_rank, seed=7):
        return list(RankBatches(50, per_rank, rank, size, torch.Generator().manual_seed(seed)))

    one = batches(0, 1, 12)
    assert len(one) == 4 and all(len(batch) == 12 for batch in one)  # 50 // 12 steps; the tail is dropped
    assert len({index for batch in one for index in batch}) == 48
    for size in (2, 3, 4):
        shares = [batches(rank, size, 12 // size) for rank in range(size)]
        together = [sum((share[step] for share in shares), []) for step in range(len(one))]
        assert together == one
    assert batches(0, 1, 12, seed=8) != one  # the order is the seed's (finetune seeds it by (seed, epoch))


def test_a_pairs_augmentation_does_not_depend_on_who_loads_it_or_when(monkeypatch):
    monkeypatch.setattr(finetune, "load_image", lambda root, path: path)  # no files needed: the image is its path
    pairs = [Pair(f"{index}.png", f"report {index}", index) for index in range(4)]
    dataset = PairDataset("images", pairs, preprocess=lambda image: torch.rand(3), tokenizer=lambda texts: texts)

    def pixels(seed, order):
        epoch = dataset.reseeded(seed)
        return {index: epoch[index][0] for index in order}

    forward, backward = pixels(5, [0, 1, 2, 3]), pixels(5, [3, 2, 1, 0])
    assert all(torch.equal(forward[index], backward[index]) for index in range(4))
    assert not torch.equal(forward[0], forward[1])
    assert not torch.equal(forward[0], pixels(6, [0])[0])  # another epoch, another draw


def on_two_processes(function, results: Path) -> list:
    """``function(world, results)`` on 2 processes forked from this one (a process group over gloo, as torchrun
    sets it up, without its seconds of imports); returns what each rank saved to ``results.<rank>.pt``."""
    port = free_port()

    def joined(rank: int) -> None:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with joined_world("cpu", timeout_s=60) as world:
            torch.save(function(world), f"{results}.{rank}.pt")

    context = torch.multiprocessing.start_processes(joined, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the 2 processes did not finish within 120 s"
    finally:
        for process in context.processes:
            process.kill()
    return [torch.load(f"{results}.{rank}.pt") for rank in (0, 1)]


class Towers(torch.nn.Module):
    """Two linear encoders and a logit scale: CLIP's shape, small enough to compare gradients exactly."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, images, texts):
        normalize = torch.nn.functional.normalize
        return normalize(self.image(images), dim=-1), normalize(self.text(texts), dim=-1), self.logit_scale.exp()

    def gradients(self, loss_fn, images, texts, caller=None) -> dict[str, torch.Tensor]:
        self.zero_grad()
        loss_fn(*(caller or self)(images, texts)).backward()
        return {name: parameter.grad.clone() for name, parameter in self.named_parameters()}


def gradients_of_each_option(world: World) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's DDP gradients of open_clip's loss on its half of 8 pairs, for every option; and the gradients
    of one process on all 8."""
    torch.manual_seed(0)
    images, texts = torch.randn(8, 6), torch.randn(8, 5)
    model = Towers()
    found = {"one process": model.gradients(contrastive_loss(World(), False, False), images, texts)}
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    mine = slice(4 * world.rank, 4 * world.rank + 4)
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            loss = contrastive_loss(world, local_loss, gather_with_grad)
            found[f"local_loss={local_loss}, gather_with_grad={gather_with_grad}"] = model.gradients(
                loss, images[mine], texts[mine], ddp
            )
    return found


def test_gathering_with_grad_gives_each_process_the_one_process_gradients(tmp_path):
    for found in on_two_processes(gradients_of_each_option, tmp_path / "gradients"):
        one = found["one process"]
        for local_loss in (False, True):
            exact = found[f"local_loss={local_loss}, gather_with_grad=True"]
            for name in one:
                torch.testing.assert_close(exact[name], one[name], rtol=1e-5, atol=1e-6)
        # Without gather_with_grad (open_clip's default) the encoders get 1/N of the gradient, the scale all of it.
        constants = found["local_loss=False, gather_with_grad=False"]
        for name in ("image.weight", "image.bias", "text.weight", "text.bias"):
            torch.testing.assert_close(constants[name], one[name] / 2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(constants["logit_scale"], one["logit_scale"], rtol=1e-5, atol=1e-6)
        # ... and with local_loss too, the gradient through the other process's features is missing altogether.
        partial = found["local_loss=True, gather_with_grad=False"]
        assert not np.allclose(partial["image.weight"] * 2, one["image.weight"], rtol=0.05)


def fail_on_rank_0(world: World) -> str:
    """What each rank raises when rank 0 fails while saving (the others wait for it)."""
    try:
        with world.all_or_none("saving epoch 1"):
            if world.is_main:
                raise OSError("No space left on device")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_a_failure_on_rank_0_stops_the_other_processes_instead_of_leaving_them_waiting(tmp_path):
    assert on_two_processes(fail_on_rank_0, tmp_path / "outcome") == [
        "OSError: No space left on device",
        "PeerFailedError: saving epoch 1 failed on process 0; its error is above",
    ]


def test_batch_norm_on_several_cpu_processes_asks_to_opt_out_of_synchronising(tmp_path):
    model = create_clip("tiny-clip-rn")[0]
    config = small_run(tmp_path, tmp_path / "train.json", tmp_path, model="tiny-clip-rn")
    with pytest.raises(FinetuneError, match="--no-sync-bn"):
        _synchronised_batch_norm(model, config, World(rank=0, size=2))
    config.sync_bn = False
    assert _synchronised_batch_norm(model, config, World(rank=0, size=2)) is model
