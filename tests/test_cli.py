"""The `mmed-rag` command: stages, validate-data on real and broken files, make-phantoms."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from mmed_rag.cli import STAGES, main

RELEASE_COUNTS = {
    "training/retriever/radiology/radiology_train.json": 4034,
    "training/retriever/pathology/pathology_train.json": 5000,
    "training/alignment/radiology/radiology_report.json": 701,
    "training/alignment/ophthalmology/harvard_vqa.json": 1854,
    "test/vqa/iuxray_test.jsonl": 2573,
    "test/vqa/pmc-oa_test.jsonl": 1994,
    "test/report/iuxray_test.json": 590,
}


def test_help_lists_the_working_stages():
    result = subprocess.run(
        [sys.executable, "-m", "mmed_rag.cli", "--help"], capture_output=True, text=True, check=True
    )
    for stage in ("validate-data", "make-phantoms", "demo"):
        assert stage in result.stdout


def test_validate_data_on_every_release_file(release_dir, capsys):
    files = sorted(str(p) for p in release_dir.rglob("*.json*"))
    assert len(files) == len(RELEASE_COUNTS)
    assert main(["validate-data", *files]) == 0
    out = capsys.readouterr().out
    for name, count in RELEASE_COUNTS.items():
        assert f"{release_dir / name}: {count} " in out
    total = sum(RELEASE_COUNTS.values())
    assert f"OK: 7 file(s), {total} record(s), 0 error(s), 1 warning(s), 0 image problem(s)" in out


def test_validate_data_reports_errors_with_positions_and_fails(tmp_path, capsys):
    good = {"question_id": 1, "question": "Q?\n<image>", "answer": "No.", "image": "a.png"}
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps(good) + "\n{oops\n" + json.dumps({**good, "question_id": 2, "image": "../x.png"}) + "\n")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "a.png")
    assert main(["validate-data", str(path), "--image-root", str(tmp_path / "images")]) == 1
    out = capsys.readouterr().out
    assert f"{path}, line 2: invalid JSON" in out
    assert f"{path}, line 3: image path '../x.png' leads outside the image root" in out
    assert "FAILED: 1 file(s), 2 record(s), 1 error(s), 0 warning(s), 1 image problem(s)" in out


def test_validate_data_reports_missing_images(tmp_path, capsys):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"id": "a", "report": "Clear.", "image_path": ["a/0.png", "a/1.png"]}]))
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "images" / "a" / "0.png")
    assert main(["validate-data", str(path), "--image-root", str(tmp_path / "images"), "--kind", "retriever"]) == 1
    out = capsys.readouterr().out
    assert "images: 2 checked, 1 problem(s)" in out and "image not found" in out and "a/1.png" in out


def test_validate_data_unreadable_file(tmp_path, capsys):
    assert main(["validate-data", str(tmp_path / "missing.json")]) == 1
    assert "unreadable" in capsys.readouterr().out


def test_make_phantoms_from_yaml_with_override(tmp_path, capsys):
    preset = tmp_path / "phantoms.yaml"
    preset.write_text(f"out: {tmp_path / 'from-yaml'}\nn: 300\nsize: 32\n")
    assert main(["make-phantoms", "--config", str(preset), "--n", "30", "--seed", "3"]) == 0
    manifest = json.loads((tmp_path / "from-yaml" / "manifest.json").read_text())
    assert manifest["config"]["n"] == 30 and manifest["config"]["size"] == 32 and manifest["config"]["seed"] == 3
    assert "wrote phantom data set" in capsys.readouterr().out


def test_bad_config_key_exits_with_a_message(tmp_path, capsys):
    preset = tmp_path / "phantoms.yaml"
    preset.write_text("images: 10\n")
    assert main(["make-phantoms", "--config", str(preset)]) == 2
    assert "unknown field(s) images" in capsys.readouterr().err


def test_train_dpo_passes_its_options_to_hf_argument_parsing(capsys):
    """`mmed-rag train-dpo` hands everything after the stage name to the DPO config parser (original flags too)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train-dpo", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: mmed-rag train-dpo [--config YAML]") and len(lines) < 120
    assert any(line.lstrip().startswith("--stage2_data_path") for line in lines)
    assert any(line.lstrip().startswith("--help-all") for line in lines)
    with pytest.raises(SystemExit):
        main(["train-dpo", "--help-all"])  # every TrainingArguments option, under our stage's name
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: mmed-rag train-dpo") and len(lines) > 500


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == "mmed-rag 0.1.0"


def test_a_warning_repeated_across_catch_warnings_blocks_is_shown_once(recwarn):
    import warnings

    from mmed_rag.cli import show_each_warning_once

    saved = warnings.showwarning
    try:
        show_each_warning_once()
        for _ in range(3):
            with warnings.catch_warnings():  # what the Trainer does at each checkpoint; it resets the registry
                pass
            warnings.warn("`old_api` is deprecated", FutureWarning, stacklevel=1)
    finally:
        warnings.showwarning = saved
    assert sum("old_api" in str(warning.message) for warning in recwarn) == 1  # 3 without it


def test_make_tiny_model_writes_a_model_generate_can_load(tmp_path, capsys):
    from mmed_rag.generation.generator import Generator, GeneratorConfig

    assert main(["make-tiny-model", "--out", str(tmp_path / "llava"), "--seed", "1"]) == 0
    assert "random weights" in capsys.readouterr().out
    generator = Generator.load(GeneratorConfig(model=str(tmp_path / "llava"), max_new_tokens=3))
    assert generator.model.config.model_type == "llava" and not (tmp_path / "llava.partial").exists()


def test_the_tools_help_imports_no_stage():
    """`mmed-rag --help` lists the stages without importing torch (seconds); a stage's options import only it."""
    code = (
        "import sys\n"
        "from mmed_rag.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "usage: mmed-rag [-h] [-v] [--version] STAGE ..." and lines[-1] == "False False"
    assert "train-sft" in result.stdout and "make-tiny-model" in result.stdout


HEAVY = ("torch", "transformers", "open_clip", "faiss", "trl", "peft")
# train-dpo's options are transformers' TrainingArguments (through trl's DPOConfig): its help must import them.
HELP_IMPORTS_TRANSFORMERS = {"train-dpo"}


def test_a_stages_help_imports_no_heavy_library():
    """Each stage's config lives apart from its code, so `mmed-rag STAGE --help` starts in a fraction of a second
    (timed in benchmarks/cli_startup.py): one process checks every stage's help, and what each imported."""
    stages = [stage.name for stage in STAGES if stage.name not in HELP_IMPORTS_TRANSFORMERS]
    code = (
        "import contextlib, io, sys\n"
        "from mmed_rag.cli import main\n"
        f"for stage in {stages!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):\n"
        "        main([stage, '--help'])\n"
        "    first = shown.getvalue().splitlines()[0]\n"
        f"    print(stage, first.startswith('usage: mmed-rag ' + stage), *[m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [f"{stage} True" for stage in stages], result.stdout
