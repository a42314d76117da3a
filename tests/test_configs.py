"""Every preset in configs/ loads into its stage's config."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmed_rag.cli import PASSTHROUGH, STAGES
from mmed_rag.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
STAGE_BY_NAME["damon"] = STAGE_BY_NAME["damon-train"]  # configs/damon/: DAMON's presets, for damon-train
# Preset folders of pass-through stages (TrainingArguments configs, parsed by HfArgumentParser).
PASSTHROUGH_FOLDERS = {"dpo": "train-dpo"}
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name in STAGE_BY_NAME)
DPO_PRESETS = sorted((CONFIGS / "dpo").glob("*.yaml"))


def test_every_preset_folder_is_a_stage():
    folders = {p.parent.name for p in CONFIGS.rglob("*.yaml")}
    assert folders <= set(STAGE_BY_NAME) | set(PASSTHROUGH_FOLDERS), folders - set(STAGE_BY_NAME)
    assert set(PASSTHROUGH_FOLDERS.values()) <= set(PASSTHROUGH)
    assert PRESETS and DPO_PRESETS


# What a preset that sets conventions, not a run, leaves to the command line (the generate preset takes the
# registry, or --no-retrieval, with the model and data).
COMMAND_LINE = {"generate": {"no_retrieval": True}}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_preset_loads(preset):
    stage = preset.parent.name
    config = load_config(STAGE_BY_NAME[stage].config(), preset, COMMAND_LINE.get(stage))
    for name, value in yaml.safe_load(preset.read_text()).items():
        assert getattr(config, name) == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize("preset", DPO_PRESETS, ids=lambda p: p.name)
def test_dpo_preset_loads(preset, tmp_path):
    from mmed_rag.alignment.dpo import parse_dpo_args

    config = parse_dpo_args(["--config", str(preset), "--output_dir", str(tmp_path)])
    values = yaml.safe_load(preset.read_text())
    for name in ("lora_r", "lora_alpha", "mm_projector_lr", "learning_rate", "lr_scheduler_type", "bf16"):
        if name in values:
            assert getattr(config, name) == values[name], name


def test_a_preset_path_not_found_names_the_folder_it_was_looked_up_in(tmp_path, monkeypatch, capsys):
    from mmed_rag.cli import main

    monkeypatch.chdir(tmp_path)  # a working folder without the README's phantoms/ and runs/
    preset = CONFIGS / "train-domain" / "retrievers-tower.yaml"
    assert main(["train-domain", "--config", str(preset)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("mmed-rag train-domain: phantoms/training/retriever/radiology/radiology_train.json")
    assert message.endswith(f"(relative paths are read from the current directory, {tmp_path})")
    # With the data in place, the tower the preset names (the README's `--logs runs`) is looked up there too.
    (tmp_path / "phantoms/images").mkdir(parents=True)
    for modality in ("radiology", "pathology", "ophthalmology"):
        folder = tmp_path / f"phantoms/training/retriever/{modality}"
        folder.mkdir(parents=True)
        record = {"id": 0, "image": f"{modality}/0.png", "report": "Normal."}
        (folder / f"{modality}_train.json").write_text(json.dumps([record, {**record, "id": 1}]))
        (tmp_path / "phantoms/test/report").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"phantoms/test/report/{modality}_test.json").write_text(json.dumps([record]))
        (tmp_path / f"phantoms/images/{modality}").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / f"phantoms/images/{modality}/0.png")
    assert main(["train-domain", "--config", str(preset)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Unknown CLIP model 'runs/radiology/best'" in message and f"current directory, {tmp_path})" in message
