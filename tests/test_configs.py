"""Every preset in configs/ loads into its stage's config dataclass."""

from pathlib import Path

import pytest
import yaml

from mmed_rag.cli import STAGES
from mmed_rag.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name in STAGE_BY_NAME)


def test_every_preset_folder_is_a_stage():
    folders = {p.parent.name for p in CONFIGS.rglob("*.yaml")}
    assert folders <= set(STAGE_BY_NAME), folders - set(STAGE_BY_NAME)
    assert PRESETS


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_preset_loads(preset):
    config = load_config(STAGE_BY_NAME[preset.parent.name].config(), preset)
    for name, value in yaml.safe_load(preset.read_text()).items():
        assert getattr(config, name) == (tuple(value) if isinstance(value, list) else value)
