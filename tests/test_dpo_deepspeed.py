"""The original RAG-PT command line under DeepSpeed on a CPU: ZeRO-3 through the launcher with the original flags,
ZeRO-2 through scripts/train_dpo_2stages.sh; both stages, one adapter.

The two runs start together (each is mostly imports and process start-up) and are checked by one test each. The
first DeepSpeed run on a machine compiles a communication extension (~35 s, cached in ~/.cache/torch_extensions).
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(original_dpo, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-deepspeed")
    started = {
        "zero3": subprocess.Popen(
            original_dpo.launch(["--num_gpus", "1"], original_dpo.flags(root / "zero3")),
            cwd=REPO,
            env=original_dpo.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ),
        "zero2": subprocess.Popen(
            ["bash", "scripts/train_dpo_2stages.sh", *original_dpo.tiny],
            cwd=REPO,
            env=original_dpo.script_env(root / "zero2", "configs/deepspeed/zero2.json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ),
    }
    finished = {}
    for name, process in started.items():
        output, _ = process.communicate(timeout=540)
        finished[name] = (process.returncode, output.decode(errors="replace"), root / name)
    finished["base"] = original_dpo.base
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
