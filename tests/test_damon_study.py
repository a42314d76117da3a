"""damon-study end to end at toy sizes: every step runs, the report holds the table, a rerun redoes nothing."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmed_rag.damon.configs import DamonStudyConfig
from mmed_rag.damon.study import PRIOR_NAMES, run_study

PRESET = Path(__file__).resolve().parents[1] / "configs/train-findings/phantoms.yaml"


def test_the_study_runs_every_step_and_reports_each_prior(tmp_path, caplog):
    preset = tmp_path / "findings.yaml"  # the shipped preset, with a short schedule on a frozen tower
    short = {**yaml.safe_load(PRESET.read_text()), "finetune_tower": False, "epochs": 2, "min_positives": 1}
    preset.write_text(yaml.safe_dump(short))
    config = DamonStudyConfig(
        out=str(tmp_path / "study"),
        patients=16,
        findings_preset=str(preset),
        vision_epochs=1,
        mca_steps=2,
        dca_steps=2,
        dsl_steps=2,
        dpm_steps=2,
        batch_size=4,
        limit=3,
    )
    results = run_study(config)
    assert list(results["stages"]) == ["mca", "dca", "dsl", "dpm"]
    for summary in results["stages"].values():
        assert summary["global_step"] == 2 and summary["val_loss_before"] > 0
    assert set(results["evaluation"]) == set(PRIOR_NAMES)
    for prior, evaluation in results["evaluation"].items():
        assert evaluation["difference"]["all"]["n"] == 3, prior
        assert set(evaluation["single"]["by_type"]) <= {"presence", "abnormality", "view"}
    assert 0 <= results["diagnosis"]["classifier"]["macro_f1"] <= 1
    report = (tmp_path / "study/REPORT.md").read_text()
    for name in PRIOR_NAMES.values():
        assert f"| {name} |" in report
    # The prompts carried each prior: none, or the diagnosis of both films.
    truth = (tmp_path / "study/runs/eval-truth-difference/predictions.jsonl").read_text()
    assert "Preliminary diagnosis: The main image " in truth
    assert "Preliminary" not in (tmp_path / "study/runs/eval-none-difference/predictions.jsonl").read_text()
    caplog.clear()
    with caplog.at_level("INFO", logger="mmed_rag.demo.steps"):
        assert run_study(config) == results
    assert "running" not in caplog.text
