"""The original entry points keep working: bash scripts with the original flags, on phantom data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.retrieval.clip import save_clip
from mmed_rag.testing import tiny_clip

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    make_phantoms(PhantomConfig(out=str(root / "data"), n=45, size=64, modalities=("radiology",)))
    model, *_ = tiny_clip(0)
    save_clip(model, root / "clip", "tiny-clip")
    return root


def run_script(name, *args):
    environment = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("script", ["retrieve_clip_VQA.sh", "retrieve_clip_vqa.sh"])
def test_retrieve_clip_vqa_with_the_original_flags(data, script):
    out = data / f"{script}.jsonl"
    result = run_script(
        script,
        "--img_root",
        data / "data/images",
        "--train_json",
        data / "data/training/retriever/radiology/radiology_train.json",
        "--eval_jsonl",
        data / "data/test/vqa/radiology_test.jsonl",
        "--model_name_or_path",
        data / "clip",
        "--checkpoint_path",
        "",
        "--output_path",
        out,
        "--fixed_k",
        2,
        "--eval_type",
        "test",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = lines(out)
    assert len(written) == len(lines(data / "data/test/vqa/radiology_test.jsonl"))
    assert all(line["retrieve_k"] == 2 == len(line["reference_reports"]) for line in written)


def test_retrieve_clip_report_with_a_clip_threshold(data):
    out = data / "report.jsonl"
    result = run_script(
        "retrieve_clip_report.sh",
        "--img_root",
        data / "data/images",
        "--train_json",
        data / "data/training/retriever/radiology/radiology_train.json",
        "--eval_json",
        data / "data/test/report/radiology_test.json",
        "--model_name_or_path",
        data / "clip",
        "--output_path",
        out,
        "--fixed_k",
        4,
        "--clip_threshold",
        1.5,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = lines(out)
    assert written and all(1 <= line["retrieve_k"] <= 4 for line in written)
    assert all("image_path" in line and "reference_reports" in line for line in written)


def test_finetune_clip_with_the_original_flags_then_resume(data):
    arguments = [
        "--model",
        "tiny-clip-rn",
        "--train-data",
        data / "data/training/retriever/radiology/radiology_train.json",
        "--val-data",
        data / "data/training/retriever/radiology/radiology_val.json",
        "--dataset-type",
        "radiology",
        "--img_root",
        data / "data/images",
        "--batch-size",
        8,
        "--precision",
        "amp",
        "--workers",
        0,
        "--lr",
        0.001,
        "--val-frequency",
        1,
        "--report-to",
        "tensorboard",
        "--logs",
        data / "runs",
    ]
    first = run_script("finetune_clip.sh", *arguments, "--epochs", 1)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_script("finetune_clip.sh", *arguments, "--epochs", 2)
    assert second.returncode == 0, second.stderr[-2000:]
    epochs = [line["epoch"] for line in lines(data / "runs/radiology/metrics.jsonl") if line.get("split") == "val"]
    assert epochs == [1, 2]
    manifest = json.loads((data / "runs/radiology/best/manifest.json").read_text())
    assert manifest["modality"] == "radiology" and manifest["trained_on"]["precision"] == "fp32"
    assert any((data / "runs/radiology/tensorboard").iterdir())
