"""Every preset in configs/ loads into its stage's config."""

from pathlib import Path

import pytest
import yaml

from mmed_rag.cli import PASSTHROUGH, STAGES
from mmed_rag.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
# Preset folders of pass-through stages (TrainingArguments configs, parsed by HfArgumentParser).
PASSTHROUGH_FOLDERS = {"dpo": "train-dpo"}
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name in STAGE_BY_NAME)
DPO_PRESETS = sorted((CONFIGS / "dpo").glob("*.yaml"))


def test_every_preset_folder_is_a_stage():
    folders = {p.parent.name for p in CONFIGS.rglob("*.yaml")}
    assert folders <= set(STAGE_BY_NAME) | set(PASSTHROUGH_FOLDERS), folders - set(STAGE_BY_NAME)
    assert set(PASSTHROUGH_FOLDERS.values()) <= set(PASSTHROUGH)
    assert PRESETS and DPO_PRESETS


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_preset_loads(preset):
    config = load_config(STAGE_BY_NAME[preset.parent.name].config(), preset)
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
