"""The original RAG-PT command line under DeepSpeed on a CPU: ZeRO-3 through the launcher with the original flags,
ZeRO-2 through scripts/train_dpo_2stages.sh; both stages, one adapter.

The two runs start together (each is mostly imports and process start-up) and are checked by one test each. The
first DeepSpeed run on a machine compiles a communication extension (~35 s, cached in ~/.cache/torch_extensions).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from mmed_rag.testing import free_port, save_tiny_llava

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HUMAN = (
    "<image>\nYou are provided with an X-ray image and 1 reference report(s): 1. The heart is normal. \n"
    "Question: Is there an effusion?"
)
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}
# The tiny values that replace the original's sizes (the rest of the original command is kept as it is).
TINY = ["--lora_r", "8", "--lora_alpha", "16", "--num_train_epochs", "1", "--per_device_train_batch_size", "2"]
TINY += ["--learning_rate", "1e-3", "--warmup_ratio", "0", "--dataloader_num_workers", "1"]


def pairs(path, noised_every):
    records = []
    for index in range(4):
        turns = [{"from": "human", "value": HUMAN}, {"from": "gpt", "value": "Yes"}]
        rejected = [{"from": "human", "value": HUMAN}, {"from": "gpt", "value": "No"}]
        records.append(
            {
                "id": index,
                "image": f"{index}.png",
                "conversations": turns,
                "rejected_conversations": rejected,
                "rejected_noised": int(index % noised_every == 0),
            }
        )
    path.write_text(json.dumps(records, indent=4))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-deepspeed")
    base = save_tiny_llava(root / "base")
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(root / f"{index}.png")
    stage1, stage2 = pairs(root / "stage1.json", 2), pairs(root / "stage2.json", 5)
    environment = {**os.environ, **ENV}
    original = [
        str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
        "train/dpo/train_dpo_2stages.py",
        "--model_name_or_path", str(base), "--deepspeed", "configs/deepspeed/zero3.json", "--version", "v1",
        "--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256", "--mm_projector_lr", "2e-5",
        "--data_path", str(stage1), "--image_folder", str(root),
        "--vision_tower", "openai/clip-vit-large-patch14-336", "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--group_by_modality_length", "True", "--bf16", "False",
        "--output_dir", str(root / "zero3"), "--num_train_epochs", "3", "--per_device_train_batch_size", "1",
        "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "200", "--save_total_limit", "1", "--learning_rate", "1e-7",
        "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--report_to", "none", "--tf32", "True", "--model_max_length", "1024", "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "4", "--lazy_preprocess", "True",
        "--stage2_data_path", str(stage2), "--merge", "True", *TINY,
    ]  # fmt: skip
    script = {
        "MODEL": str(base),
        "DATA_STAGE1": str(stage1),
        "DATA_STAGE2": str(stage2),
        "IMAGE_FOLDER": str(root),
        "OUTPUT_DIR": str(root / "zero2"),
        "DEEPSPEED_CONFIG": "configs/deepspeed/zero2.json",
        "INCLUDE": "localhost:0",
        "MASTER_PORT": str(free_port()),
        "BF16": "False",
    }
    started = {
        "zero3": subprocess.Popen(
            original, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ),
        "zero2": subprocess.Popen(
            ["bash", "scripts/train_dpo_2stages.sh", *TINY],
            cwd=REPO,
            env={**environment, **script},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ),
    }
    finished = {}
    for name, process in started.items():
        output, _ = process.communicate(timeout=540)
        finished[name] = (process.returncode, output.decode(errors="replace"), root / name)
    finished["base"] = base
    return finished


def check_run(returncode, output, out_dir, zero_stage):
    assert returncode == 0, output[-4000:]
    stage1 = load_file(out_dir / "stage1/adapter_model.safetensors")
    stage2 = load_file(out_dir / "stage2/adapter_model.safetensors")
    lora_b = [value for key, value in stage1.items() if "lora_B" in key]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)  # trained away from the zero init
    assert stage1.keys() == stage2.keys() and any((stage1[k] != stage2[k]).any() for k in stage1)
    summary = json.loads((out_dir / "stage2/stage.json").read_text())
    assert summary["start_adapter"] == str(out_dir / "stage1") and summary["global_step"] == 2
    saved = json.loads((out_dir / "stage2/dpo_config.json").read_text())
    assert saved["deepspeed"].endswith(f"zero{zero_stage}.json") and saved["eval_strategy"] == "no"
    assert saved["lora_r"] == 8 and saved["warmup_steps"] == 0.0 and saved["max_length"] == 1024
    # The original's flags that do not fit the tiny model are checked and reported, not silently ignored.
    for warning in (
        "--tf32 True needs an Ampere",
        "--vision_tower openai/clip-vit-large-patch14-336 disagrees",
        "--version v1 asks for the vicuna_v1",
        "--group_by_modality_length True has no effect",
    ):
        assert warning in output, warning
    assert f"DeepSpeed ZeRO-{zero_stage} on cpu" in output and "Stage 2 done" in output
    # A third-party deprecation warning is shown once per process, not at every step.
    warned = re.findall(r"^\S+:\d+: (\w*Warning: .*)$", output, flags=re.MULTILINE)
    repeated = {line: warned.count(line) for line in set(warned) if warned.count(line) > 1}
    assert not repeated, repeated


def test_zero3_through_the_launcher_with_the_original_flags(runs):
    check_run(*runs["zero3"], zero_stage=3)
    # The merged model (written after ZeRO-3 let go of the weights) is whole and equals base + adapter.
    out_dir = runs["zero3"][2]
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    base = AutoModelForImageTextToText.from_pretrained(runs["base"])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, out_dir / "stage2").eval()(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(out_dir / "merged")(**inputs).logits
    assert (merged - expected).abs().max() <= 1e-5


def test_zero2_through_the_script(runs):
    check_run(*runs["zero2"], zero_stage=2)
