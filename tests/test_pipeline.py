"""The pipeline end to end on phantoms with tiny models: route, retrieve, prompt, generate, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmed_rag.cli import main
from mmed_rag.data.images import load_image
from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.generation.generator import Generator
from mmed_rag.pipeline import MMedRAG, PipelineConfig, PipelineError
from mmed_rag.retrieval.clip import save_clip
from mmed_rag.retrieval.index import ReportIndex
from mmed_rag.testing import free_port, save_tiny_llava, tiny_clip

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    make_phantoms(PhantomConfig(out=str(root / "data"), n=60, size=64, modalities=("radiology", "pathology")))
    registry = {"modalities": {}}
    for seed, modality in enumerate(("radiology", "pathology")):
        save_clip(tiny_clip(seed)[0], root / f"clip-{modality}", "tiny-clip")
        corpus = root / f"data/training/retriever/{modality}/{modality}_train.json"
        ReportIndex.build(root / f"clip-{modality}", corpus, modality, progress=False).save(root / f"index-{modality}")
        registry["modalities"][modality] = {"retriever": f"clip-{modality}", "index": f"index-{modality}"}
    (root / "registry.yaml").write_text(yaml.safe_dump(registry))
    save_tiny_llava(root / "llava")
    config = {
        "model": str(root / "llava"),
        "registry": str(root / "registry.yaml"),
        "img_root": str(root / "data/images"),
        "fixed_k": 2,
        "max_new_tokens": 4,
        "batch_size": 4,
    }
    (root / "generate.yaml").write_text(yaml.safe_dump(config))
    return root


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_three_lines_of_python(setup):
    rag = MMedRAG.from_config(setup / "generate.yaml")
    prediction = rag.answer(setup / "data/images/radiology/rad_00000.png", "Is the heart enlarged?", "radiology")
    assert isinstance(prediction.text, str) and len(prediction.reference_reports) == 2
    assert prediction.prompt.startswith("<image>\nYou are provided with an X-ray image, a image-related question")
    assert prediction.prompt.endswith("Question: Is the heart enlarged?")
    assert all(report in prediction.prompt for report in prediction.reference_reports)


def test_vqa_and_report_files(setup, tmp_path):
    rag = MMedRAG.from_config(setup / "generate.yaml")
    vqa = setup / "data/test/vqa/pathology_test.jsonl"
    summary = rag.run_file(vqa, tmp_path / "vqa.jsonl")
    inputs = [json.loads(line) for line in vqa.read_text().splitlines()]
    outputs = lines(summary.output)
    assert summary.written == len(inputs) == len(outputs)
    for source, result in zip(inputs, outputs, strict=True):
        assert {k: result[k] for k in source} == source  # the input record, unchanged
        assert result["modality"] == "pathology" and isinstance(result["prediction"], str)
        assert result["retrieve_k"] == len(result["reference_reports"]) == 2
    reports = rag.run_file(setup / "data/test/report/radiology_test.json", tmp_path / "report.jsonl")
    assert {line["modality"] for line in lines(reports.output)} == {"radiology"}
    assert not any("yes_probability" in line for line in outputs)  # only when asked


def test_yes_no_scores_are_written_for_questions_only(setup, tmp_path):
    rag = MMedRAG.from_config(setup / "generate.yaml", yes_no_scores=True)
    vqa = rag.run_file(setup / "data/test/vqa/pathology_test.jsonl", tmp_path / "vqa.jsonl")
    assert all(0.0 <= line["yes_probability"] <= 1.0 for line in lines(vqa.output))
    reports = rag.run_file(setup / "data/test/report/radiology_test.json", tmp_path / "report.jsonl")
    assert not any("yes_probability" in line for line in lines(reports.output))


def test_without_retrieval_and_with_the_noised_image(setup):
    plain = MMedRAG.from_config(setup / "generate.yaml", no_retrieval=True)
    assert plain.router is None
    xray = load_image(setup / "data/images", "radiology/rad_00000.png")
    prompt, shown, reports = plain.prepare(xray, "Is there an effusion?\n<image>", "radiology", key=1)
    assert (
        reports == []
        and prompt == "Is there an effusion? Please choose from the following two options: [yes, no]\n<image>"
    )
    assert shown is xray
    noised = MMedRAG.from_config(setup / "generate.yaml", noised_image=True, noise_seed=5)
    _, first, reports = noised.prepare(xray, "Is there an effusion?", "radiology", key=1)
    _, again, _ = noised.prepare(xray, "Is there an effusion?", "radiology", key=1)
    _, other, _ = noised.prepare(xray, "Is there an effusion?", "radiology", key=2)
    assert len(reports) == 2  # retrieval still uses the real image
    assert first.size == xray.size and np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other)) and not np.array_equal(
        np.asarray(first), np.asarray(xray)
    )


def test_killed_run_resumes(setup, tmp_path, monkeypatch):
    vqa = setup / "data/test/vqa/radiology_test.jsonl"
    expected = lines(MMedRAG.from_config(setup / "generate.yaml").run_file(vqa, tmp_path / "expected.jsonl").output)
    real, calls = Generator.generate, []

    def dies_on_second_batch(self, prompts, images):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, prompts, images)

    monkeypatch.setattr(Generator, "generate", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        MMedRAG.from_config(setup / "generate.yaml").run_file(vqa, tmp_path / "out.jsonl")
    monkeypatch.setattr(Generator, "generate", real)
    summary = MMedRAG.from_config(setup / "generate.yaml").run_file(vqa, tmp_path / "out.jsonl")
    assert summary.resumed == 4 and lines(summary.output) == expected


def test_a_modality_with_no_index_is_named_or_skipped(setup, tmp_path):
    records = [json.loads(line) for line in (setup / "data/test/vqa/radiology_test.jsonl").read_text().splitlines()]
    records[1]["modality"] = "ophthalmology"
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(
        PipelineError, match="question_id 2: .*no retriever and index registered for modality 'ophthalmology'"
    ):
        MMedRAG.from_config(setup / "generate.yaml").run_file(path, tmp_path / "out.jsonl")
    summary = MMedRAG.from_config(setup / "generate.yaml", on_error="skip").run_file(path, tmp_path / "out2.jsonl")
    assert len(summary.skipped) == 1 and summary.written == len(records) - 1


def test_generate_command(setup, tmp_path, capsys):
    output = tmp_path / "predictions.jsonl"
    code = main(
        [
            "generate",
            "--config",
            str(setup / "generate.yaml"),
            "--input",
            str(setup / "data/test/vqa/radiology_test.jsonl"),
            "--output",
            str(output),
            "--no-retrieval",
        ]
    )
    assert code == 0 and all(line["retrieve_k"] == 0 for line in lines(output))
    assert (tmp_path / "predictions.config.yaml").is_file()
    assert "wrote" in capsys.readouterr().out


def test_the_authors_preset_and_answer_file(setup, tmp_path):
    """configs/generate/authors.yaml (their prompts, sampling at 0.2, 1024 tokens) completed on the command line,
    and their answer-file layout written beside ours."""
    preset = REPO / "configs/generate/authors.yaml"
    common = ["--model", str(setup / "llava"), "--img-root", str(setup / "data/images"), "--batch-size", "4"]
    runs = {
        "plain": ["--no-retrieval", "--max-new-tokens", "4"],
        "rag": ["--registry", str(setup / "registry.yaml"), "--fixed-k", "2", "--max-new-tokens", "4"],
    }
    vqa = setup / "data/test/vqa/radiology_test.jsonl"
    for name, options in runs.items():
        output, answers = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.authors.jsonl"
        argv = ["generate", "--config", str(preset), *common, *options, "--input", str(vqa), "--output", str(output)]
        assert main([*argv, "--authors-answer-file", str(answers)]) == 0
        saved = yaml.safe_load((tmp_path / f"{name}.config.yaml").read_text())
        assert (saved["prompt_style"], saved["do_sample"], saved["temperature"]) == ("authors", True, 0.2)
        ours, theirs = lines(output), lines(answers)
        assert len(ours) == len(theirs) > 0
        for line, answer in zip(ours, theirs, strict=True):
            fields = ["question_id", "image", "prompt", "answer", "gt_answer", "gt_report"]
            fields += ["reference_report"] if name == "rag" else []
            assert list(answer) == [*fields, "noised_image", "model_id", "metadata"]
            assert answer["answer"] == line["prediction"] and answer["gt_answer"] == line["answer"]
            assert answer["prompt"] == line["prompt"].replace("<image>", "").strip()
            assert (answer["question_id"], answer["noised_image"], answer["model_id"]) == (
                line["question_id"],
                0,
                "llava",
            )
        if name == "plain":
            question = ours[0]["question"].replace("<image>", "").strip()
            assert ours[0]["prompt"] == (
                f"<image>\n{question} Please answer the question based on the image and choose from the following two "
                "options: [yes, no]."
            )
        else:
            assert theirs[0]["reference_report"] == ours[0]["reference_reports"]


def test_config_needs_a_registry_or_no_retrieval():
    with pytest.raises(ValueError, match="--registry"):
        PipelineConfig(model="x")


def test_the_domain_classifier_routes_records_without_a_modality(setup, tmp_path):
    from mmed_rag.domain.classifier import TrainDomainConfig, train_domain

    data = setup / "data"
    classifier = train_domain(
        TrainDomainConfig(
            train_files=tuple(f"{m}={data}/training/retriever/{m}/{m}_train.json" for m in ("radiology", "pathology")),
            img_root=str(data / "images"),
            model="tiny-clip",
            out=str(tmp_path / "domain"),
        )
    )
    records = []
    for modality in ("radiology", "pathology"):
        for line in (data / f"test/vqa/{modality}_test.jsonl").read_text().splitlines()[:3]:
            record = json.loads(line)
            record["question_id"] = f"{modality}-{record['question_id']}"
            record["truth"] = record.pop("modality")
            records.append(record)
    path = tmp_path / "unlabelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rag = MMedRAG.from_config(setup / "generate.yaml", domain_classifier=str(classifier))
    outputs = lines(rag.run_file(path, tmp_path / "out.jsonl").output)
    assert [line["modality"] for line in outputs] == [line["truth"] for line in outputs]
    assert all(line["retrieve_k"] == 2 for line in outputs)


def test_eval_reads_the_pipelines_outputs(setup, tmp_path):
    """generate in the three modes of the copy-reliance analyses, then score each output as it was written."""
    vqa = setup / "data/test/vqa/radiology_test.jsonl"
    runs = {
        "rag": {"yes_no_scores": True},
        "plain": {"no_retrieval": True},
        "noised": {"noised_image": True},
    }
    outputs = {}
    for name, overrides in runs.items():
        outputs[name] = MMedRAG.from_config(setup / "generate.yaml", **overrides).run_file(
            vqa, tmp_path / f"{name}.jsonl"
        )
    questions = len(vqa.read_text().splitlines())
    assert main(["eval", "--task", "vqa", "--pred", str(outputs["rag"].output), "--out", str(tmp_path / "vqa")]) == 0
    metrics = json.loads((tmp_path / "vqa/metrics.json").read_text())
    assert metrics["overall"]["counts"]["n"] == questions
    assert 0.0 <= metrics["overall"]["accuracy"]["value"] <= 1.0 and "auc" in metrics["overall"]
    assert set(metrics["by_modality"]) == {"radiology"}
    copying = [
        "eval", "--task", "copying", "--pred", str(outputs["rag"].output),
        "--pred-no-retrieval", str(outputs["plain"].output), "--pred-noised", str(outputs["noised"].output),
        "--out", str(tmp_path / "copying"),
    ]  # fmt: skip
    assert main(copying) == 0
    figures = json.loads((tmp_path / "copying/metrics.json").read_text())
    assert figures["questions"] == questions and set(figures["accuracy"]) == {
        "retrieval",
        "no_retrieval",
        "retrieval_noised",
    }
    reports = MMedRAG.from_config(setup / "generate.yaml").run_file(
        setup / "data/test/report/radiology_test.json", tmp_path / "reports.jsonl"
    )
    assert main(["eval", "--task", "report", "--pred", str(reports.output), "--out", str(tmp_path / "report")]) == 0
    scores = json.loads((tmp_path / "report/metrics.json").read_text())["overall"]
    assert all(0.0 <= scores[name] for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr"))
    assert 0.0 <= scores["clinical_f1"]["micro"]["f1"] <= 1.0


def test_rag_pt_from_generate_to_make_pairs_to_train_dpo(setup, tmp_path):
    """The RAG-PT loop on phantoms: answer in three modes, build the pairs, train both DPO stages on them."""
    vqa = setup / "data/test/vqa/radiology_test.jsonl"
    modes = {"with-retrieval": {}, "without-retrieval": {"no_retrieval": True}, "noised": {"noised_image": True}}
    runs = {}
    for mode, overrides in modes.items():
        pipeline = MMedRAG.from_config(setup / "generate.yaml", yes_no_answers=True, **overrides)
        runs[mode] = pipeline.run_file(vqa, tmp_path / f"{mode}.jsonl").output
        assert {line["prediction"] for line in lines(runs[mode])} <= {"Yes", "No"}  # constrained decoding
    pairs = tmp_path / "pairs"
    assert main(["make-pairs", "--out", str(pairs), *(a for m, p in runs.items() for a in (f"--{m}", str(p)))]) == 0
    summary = json.loads((pairs / "summary.json").read_text())
    assert summary["stage1"] > 0 and summary["stage2"] > 0
    # Training: the original command line (scripts/train_dpo_2stages.sh) under the deepspeed launcher, ZeRO-2.
    script = {
        "MODEL": str(setup / "llava"),
        "DATA_STAGE1": str(pairs / "stage1.json"),
        "DATA_STAGE2": str(pairs / "stage2.json"),
        "IMAGE_FOLDER": str(setup / "data/images"),
        "OUTPUT_DIR": str(tmp_path / "rag-pt"),
        "DEEPSPEED_CONFIG": "configs/deepspeed/zero2.json",
        "INCLUDE": "localhost:0",
        "MASTER_PORT": str(free_port()),
        "BF16": "False",
        "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed"),
    }
    tiny = ["--lora_r", "8", "--lora_alpha", "16", "--max_steps", "2", "--per_device_train_batch_size", "2"]
    tiny += ["--learning_rate", "1e-3", "--save_strategy", "no", "--dataloader_num_workers", "0"]
    trained = subprocess.run(
        ["bash", "scripts/train_dpo_2stages.sh", *tiny],
        cwd=REPO,
        env={**os.environ, "DS_ACCELERATOR": "cpu", **script},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-4000:]
    for stage in ("stage1", "stage2"):
        assert (tmp_path / "rag-pt" / stage / "adapter_model.safetensors").is_file()
        assert (tmp_path / "rag-pt" / stage / "curves.png").is_file()
    tuned = MMedRAG.from_config(setup / "generate.yaml", adapter=str(tmp_path / "rag-pt/stage2"), yes_no_answers=True)
    assert tuned.run_file(vqa, tmp_path / "tuned.jsonl").written == len(lines(runs["noised"]))
