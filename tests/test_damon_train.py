"""DAMON's four fine-tuning stages on the shared SFT runner: configs/damon/stages.yaml on longitudinal phantoms and a
tiny LLaVA, each stage's val loss falling, each starting from the one before, a rerun skipping them all."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from mmed_rag.cli import main
from mmed_rag.damon.phantoms import LongitudinalConfig, make_longitudinal_phantoms
from mmed_rag.testing import save_tiny_llava

PRESET = Path(__file__).resolve().parents[1] / "configs" / "damon" / "stages.yaml"
STAGES = ["mca", "dca", "dsl", "dpm"]


def test_the_four_stages_chain_and_each_lowers_its_val_loss(tmp_path, capsys):
    make_longitudinal_phantoms(LongitudinalConfig(out=str(tmp_path / "longitudinal"), patients=20, size=32))
    save_tiny_llava(tmp_path / "tiny-llava")
    preset = yaml.safe_load(PRESET.read_text())
    assert [stage["name"] for stage in preset["stages"]] == STAGES
    for stage in preset["stages"]:  # the preset's relative paths, read from tmp_path as from a working folder
        for key in ("damon_data", "damon_val_data"):
            stage[key] = str(tmp_path / stage[key])
    preset |= {"model": str(tmp_path / "tiny-llava"), "output_dir": str(tmp_path / "out"), "plot": False}
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump(preset))

    assert main(["damon-train", "--config", str(config)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DAMON stage")]
    out = tmp_path / "out"
    summaries = {name: json.loads((out / name / "stage.json").read_text()) for name in STAGES}
    starts = [str(tmp_path / "tiny-llava"), *(str(out / name) for name in STAGES[:-1])]
    for name, start, line in zip(STAGES, starts, printed, strict=True):
        summary = summaries[name]
        assert summary["starts_from"] == start  # each stage from the one before
        assert summary["val_loss_after"] < summary["val_loss_before"], (name, summary)
        annotation = tmp_path / f"longitudinal/damon/{name}_train.jsonl"
        answers = sum(len(json.loads(record)["conversations"]) // 2 for record in annotation.read_text().splitlines())
        assert summary["data"] == [str(annotation)] and summary["rows"] == answers  # repeat_time 1: each answer once
        assert summary["val_rows"] > 0 and summary["global_step"] == preset["stages"][STAGES.index(name)]["max_steps"]
        shown = re.search(r"val loss ([\d.]+) -> ([\d.]+)\)$", line)
        assert line.startswith(f"DAMON stage {name}: ") and shown, line
        assert [float(value) for value in shown.groups()] == [
            round(summary[key], 4) for key in ("val_loss_before", "val_loss_after")
        ]

    assert main(["damon-train", "--config", str(config)]) == 0  # finished: every stage skipped, as it was
    assert {name: json.loads((out / name / "stage.json").read_text()) for name in STAGES} == summaries
    assert "skipped" not in capsys.readouterr().out and all(not (out / f"{name}.partial").exists() for name in STAGES)
