"""Every long stage, SIGKILLed mid-run and run again, ends with what an uninterrupted run writes.

The kill is real: the stage runs in a child process that sends itself SIGKILL at the n-th call of one of its
own functions (a batch being written, an optimizer step), so no ``finally`` and no atexit runs, exactly as
when a scheduler kills a job. The same command is then run again, and its output is compared with that of a
run that was never interrupted: the same ids in the same order for retrieval and generation, the same weights
(to the tolerance stated per stage) for training.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmed_rag.cli import main

KILLER = """
import importlib, os, signal, sys
module, _, attribute = sys.argv[1].partition(":")
owner = importlib.import_module(module)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls, left = getattr(owner, name), int(sys.argv[2]), [int(sys.argv[2])]
def counted(*args, **kwargs):
    left[0] -= 1
    if left[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, name, counted)
from mmed_rag.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_killed(argv: list[str], at: str, calls: int, cwd: Path) -> None:
    """``mmed-rag argv`` in a child that SIGKILLs itself at the ``calls``-th call of ``at`` (module:Class.name)."""
    child = subprocess.run(
        [sys.executable, "-c", KILLER, at, str(calls), *argv], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


def questions(world, tmp: Path, copies: int = 6) -> Path:
    """The radiology VQA test file repeated under new ids: enough batches to be killed between."""
    rows = [json.loads(line) for line in world.vqa.read_text().splitlines()] * copies
    path = tmp / "questions.jsonl"
    path.write_text("".join(json.dumps({**row, "question_id": index}) + "\n" for index, row in enumerate(rows)))
    return path


def ids(path: Path) -> list:
    return [json.loads(line)["question_id"] for line in path.read_text().splitlines()]


def assert_same_weights(resumed: Path, straight: Path, atol: float) -> None:
    expected, found = load_file(straight), load_file(resumed)
    assert found.keys() == expected.keys()
    for name, value in found.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("stage", ["retrieve", "generate"])
def test_file_stages_resume_without_losing_or_repeating_a_record(stage, world, tmp_path):
    source = questions(world, tmp_path)

    def argv(output: Path) -> list[str]:
        if stage == "retrieve":
            return [
                *("retrieve", "--eval_json", str(source), "--output_path", str(output)),
                *("--img_root", str(world.images), "--index", str(world.index), "--model_name_or_path"),
                *(str(world.clip), "--batch_size", "4", "--device", "cpu"),
            ]
        return [
            *("generate", "--model", str(world.llava), "--no-retrieval", "--modality", "radiology"),
            *("--input", str(source), "--output", str(output), "--img-root", str(world.images)),
            *("--batch-size", "4", "--max-new-tokens", "3", "--device", "cpu"),
        ]

    assert main(argv(tmp_path / "straight.jsonl")) == 0
    killed = tmp_path / "killed.jsonl"
    run_killed(argv(killed), "mmed_rag.resumable:ResumableOutput.append", 3, tmp_path)
    assert not killed.exists() and len(ids(Path(f"{killed}.partial"))) == 8  # two batches made it
    assert main(argv(killed)) == 0
    assert ids(killed) == ids(tmp_path / "straight.jsonl") == list(range(24))
    assert killed.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert not Path(f"{killed}.partial").exists() and not Path(f"{killed}.lock").exists()


def test_finetune_clip_resumes_to_the_same_weights(world, tmp_path):
    def argv(name: str) -> list[str]:
        return [
            *("finetune-clip", "--model", "tiny-clip", "--train-data", str(world.corpus), "--dataset-type"),
            *("radiology", "--img-root", str(world.images), "--epochs", "3", "--batch-size", "4", "--workers", "0"),
            *("--lr", "1e-3", "--warmup", "1", "--logs", str(tmp_path / "logs"), "--name", name, "--device", "cpu"),
        ]

    assert main(argv("straight")) == 0
    steps_per_epoch = 2  # 8 training pairs after the 10% validation hold-out, batches of 4
    run_killed(argv("killed"), "torch.optim:AdamW.step", steps_per_epoch + 2, tmp_path)  # mid-epoch 2
    assert json.loads((tmp_path / "logs/killed/last/trainer_state.json").read_text())["epochs_done"] == 1
    assert main(argv("killed")) == 0
    for kept in ("best", "last"):
        # Same seeds per epoch and restored optimizer state: equal to float32 rounding.
        assert_same_weights(
            tmp_path / f"logs/killed/{kept}/open_clip_model.safetensors",
            tmp_path / f"logs/straight/{kept}/open_clip_model.safetensors",
            atol=1e-6,
        )


def test_train_domain_reruns_to_the_same_classifier(world, tmp_path):
    def argv(out: Path) -> list[str]:
        files = [f"{m}={world.data}/training/retriever/{m}/{m}_train.json" for m in ("radiology", "pathology")]
        return [
            *("train-domain", "--train-files", *files, "--img-root", str(world.images), "--model", "tiny-clip"),
            *("--epochs", "6", "--out", str(out), "--device", "cpu"),
        ]

    assert main(argv(tmp_path / "straight")) == 0
    run_killed(argv(tmp_path / "killed"), "torch.optim:AdamW.step", 3, tmp_path)
    assert not (tmp_path / "killed").exists()  # published only when complete
    assert main(argv(tmp_path / "killed")) == 0  # the head trains in seconds: a rerun starts over, seeded
    assert_same_weights(tmp_path / "killed/head.safetensors", tmp_path / "straight/head.safetensors", atol=0)


def test_train_dpo_resumes_from_its_checkpoint_to_the_same_adapter(world, tmp_path):
    def argv(out: Path) -> list[str]:
        return [
            *("train-dpo", "--model_name_or_path", str(world.llava), "--data_path", str(world.pairs)),
            *("--image_folder", str(world.images), "--output_dir", str(out), "--max_steps", "3"),
            *("--per_device_train_batch_size", "1", "--learning_rate", "1e-3", "--lora_r", "4", "--lora_alpha", "8"),
            *("--save_strategy", "steps", "--save_steps", "1", "--bf16", "False", "--gradient_checkpointing"),
            *("False", "--report_to", "none", "--plot", "False", "--seed", "0"),
        ]

    assert main(argv(tmp_path / "straight")) == 0
    run_killed(argv(tmp_path / "killed"), "trl.trainer.dpo_trainer:DPOTrainer.training_step", 3, tmp_path)
    assert (tmp_path / "killed/checkpoints/stage1/checkpoint-2").is_dir()
    assert not (tmp_path / "killed/stage1").exists()
    assert main(argv(tmp_path / "killed")) == 0
    summary = json.loads((tmp_path / "killed/stage1/stage.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    assert_same_weights(
        tmp_path / "killed/stage1/adapter_model.safetensors",
        tmp_path / "straight/stage1/adapter_model.safetensors",
        atol=1e-6,
    )


def test_train_sft_resumes_from_its_checkpoint_to_the_same_weights(world, tmp_path):
    records = []
    for line in world.vqa.read_text().splitlines():
        row = json.loads(line)
        human = "<image>\n" + row["question"].replace("<image>", "").strip()
        conversation = [{"from": "human", "value": human}, {"from": "gpt", "value": row["answer"]}]
        records.append({"id": str(row["question_id"]), "image": row["image"], "conversations": conversation})
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(records * 2))

    def argv(out: Path) -> list[str]:
        return [
            *("train-sft", "--model", str(world.llava), "--data", str(data), "--image-folder", str(world.images)),
            *("--output-dir", str(out), "--max-steps", "5", "--batch-size", "2", "--learning-rate", "3e-3"),
            *("--save-steps", "1", "--logging-steps", "1", "--max-length", "256", "--no-plot"),
        ]

    assert main(argv(tmp_path / "straight")) == 0
    run_killed(argv(tmp_path / "killed"), "trl.trainer.sft_trainer:SFTTrainer.training_step", 4, tmp_path)
    assert (tmp_path / "killed/checkpoints/sft/checkpoint-3").is_dir() and not (tmp_path / "killed/sft").exists()
    assert main(argv(tmp_path / "killed")) == 0
    summary = json.loads((tmp_path / "killed/sft/stage.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["global_step"] == 5
    assert_same_weights(tmp_path / "killed/sft/model.safetensors", tmp_path / "straight/sft/model.safetensors", 1e-6)
