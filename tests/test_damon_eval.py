"""damon-eval: multi-image questions answered with and without a preliminary diagnosis, scored per question type;
and the short-answer scores it shares with LLaVA-Med's and DAMON's evaluations."""

from __future__ import annotations

import json

import pytest

import mmed_rag.damon.evaluate as evaluate_module
from mmed_rag.damon.configs import DamonEvalConfig
from mmed_rag.damon.data import DAMON_CONDITIONS, QUESTION_TYPES
from mmed_rag.damon.evaluate import evaluate, score
from mmed_rag.damon.phantoms import LongitudinalConfig, make_longitudinal_phantoms
from mmed_rag.eval.short_answers import closed_hit, exact_match, token_recall, vqa_normalise
from mmed_rag.resumable import ResumeError
from mmed_rag.testing import save_tiny_llava


def test_vqa_normalisation_and_the_short_answer_scores():
    assert vqa_normalise("The Left Lung.") == "left lung"
    assert vqa_normalise("Two nodules, one large") == "2 nodules 1 large"
    assert vqa_normalise("it dont show (mild) edema") == "it don't show mild edema"
    assert vqa_normalise("1,000 cells") == "1000 cells"
    assert vqa_normalise("x-ray") == "x ray"
    assert vqa_normalise("3.5 cm.") == "3.5 cm"
    # LLaVA-Med's closed rule: a yes/no somewhere, and the gold answer inside the prediction (substrings).
    assert closed_hit("Yes, there is an effusion.", "yes") == 1
    assert closed_hit("No.", "Yes") == 0
    assert closed_hit("A nodule is present.", "no") == 1  # "no" is inside "nodule", as in the original
    assert closed_hit("Effusion.", "yes") == 0  # neither yes nor no
    assert token_recall("the left lower lung", "Left lung") == 1.0
    assert token_recall("right lung", "left lung") == pytest.approx(0.5)
    assert token_recall("", "left lung") == 0.0
    assert exact_match("Left Lung", "left lung") == 1 and exact_match("left lung.", "left lung") == 0


def test_scores_per_question_type():
    lines = [
        {"id": "0", "question_type": "presence", "prediction": "Yes.", "answer": "yes"},
        {"id": "1", "question_type": "presence", "prediction": "no", "answer": "yes"},
        {"id": "2", "question_type": "view", "prediction": "PA view", "answer": "PA view"},
        {"id": "3", "question_type": "view", "prediction": "AP", "answer": "PA view"},
        {
            "id": "4",
            "question_type": "difference",
            "prediction": "the main image has an additional finding of edema than the reference image.",
            "answer": "the main image has additional findings of edema and pneumothorax than the reference image.",
        },
        {
            "id": "5",
            "question_type": "difference",
            "prediction": "nothing has changed.",
            "answer": "nothing has changed.",
        },
    ]
    metrics = score(lines)
    presence, view, difference = (metrics["by_type"][kind] for kind in ("presence", "view", "difference"))
    assert presence["closed_accuracy"] == 0.5 and presence["exact_match"] == 0.0  # "Yes." is not "yes"
    assert view["recall"] == pytest.approx(0.5) and view["exact_match"] == 0.5
    assert difference["difference"]["precision"] == 1.0 and difference["difference"]["recall"] == 0.5
    assert difference["difference"]["exact"] == 0.5
    assert metrics["all"]["n"] == 6 and "closed_accuracy" not in metrics["all"]
    for scores in (presence, view, difference, metrics["all"]):
        assert {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(scores)
    assert view["BLEU-1"] > 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("damon-eval")
    pairs = make_longitudinal_phantoms(LongitudinalConfig(out=str(root / "pairs"), patients=10, size=32))
    return pairs, save_tiny_llava(root / "llava")


def eval_config(world, out, **overrides) -> DamonEvalConfig:
    pairs, model = world
    settings = dict(
        model=str(model),
        data=str(pairs / "mimic_pair_questions.csv"),
        mimic_all=str(pairs / "mimic_all.csv"),
        image_extension=".png",
        img_root=str(pairs / "images"),
        out=str(out),
        max_new_tokens=6,
        batch_size=4,
        device="cpu",
    )
    return DamonEvalConfig(**{**settings, **overrides})


def gold_diagnosis(pairs, path):
    """A damon-diagnose predictions file holding the phantoms' true labels (the prior at its best)."""
    lines = []
    for split in ("train", "val", "test"):
        for record in json.loads((pairs / f"damon/mimic_{split}_diagnosis.json").read_text()):
            labels = [int(label) for label in record["caption"].split(",")]
            lines.append({"id": record["image"], "names": [DAMON_CONDITIONS[label] for label in labels]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_damon_eval_answers_every_test_question_with_and_without_the_prior(world, tmp_path):
    pairs, _ = world
    without = evaluate(eval_config(world, tmp_path / "none"))
    lines = [json.loads(line) for line in (tmp_path / "none/predictions.jsonl").read_text().splitlines()]
    questions = (pairs / "mimic_pair_questions.csv").read_text().splitlines()
    assert len(lines) == sum(line.endswith(",test") for line in questions[1:]) == without["all"]["n"]
    assert set(without["by_type"]) <= set(QUESTION_TYPES)
    assert "closed_accuracy" in without["by_type"]["presence"]
    assert "difference" in without["by_type"]["difference"]
    assert all(line["diagnosis"] is None and "Preliminary" not in line["prompt"] for line in lines)
    assert lines[0]["prompt"].startswith("The main image: <image>\nThe reference image: <image>\nQuestion: ")

    diagnosis = gold_diagnosis(pairs, tmp_path / "diagnosis.jsonl")
    with_prior = evaluate(eval_config(world, tmp_path / "gold", diagnosis=str(diagnosis)))
    assert with_prior["prior"] == "diagnosis" and with_prior["all"]["n"] == without["all"]["n"]
    lines = [json.loads(line) for line in (tmp_path / "gold/predictions.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["prompt"].count("<image>") == 2
        assert f"Preliminary diagnosis: {line['diagnosis']}\nQuestion:" in line["prompt"]
        assert line["diagnosis"].startswith("The main image ") and " The reference image " in line["diagnosis"]
    assert "| difference |" in (tmp_path / "gold/metrics.md").read_text()


def test_damon_eval_on_damons_own_difference_file_resumes_after_a_kill(world, tmp_path, monkeypatch):
    pairs, _ = world
    config = eval_config(world, tmp_path / "own", data=str(pairs / "damon/mimicdiff_test.json"), layout="difference")
    config.batch_size = 1
    real = evaluate_module._generator
    calls = []

    def dies_on_the_second_batch(cfg):
        generator = real(cfg)
        generate = generator.generate

        def counted(prompts, images):
            calls.append(len(prompts))
            if len(calls) == 2:
                raise InterruptedError("killed")
            return generate(prompts, images)

        generator.generate = counted
        return generator

    monkeypatch.setattr(evaluate_module, "_generator", dies_on_the_second_batch)
    with pytest.raises(InterruptedError):
        evaluate(config)
    assert len((tmp_path / "own/predictions.jsonl.partial").read_text().splitlines()) == 1
    monkeypatch.setattr(evaluate_module, "_generator", real)
    metrics = evaluate(config)
    lines = [json.loads(line) for line in (tmp_path / "own/predictions.jsonl").read_text().splitlines()]
    records = json.loads((pairs / "damon/mimicdiff_test.json").read_text())
    assert [line["id"] for line in lines] == [str(record["id"]) for record in records]
    assert set(metrics["by_type"]) == {"difference"}
    assert lines[0]["prompt"] == records[0]["prompt"]  # DAMON's own prompt, its markers in place
    with pytest.raises(ResumeError, match="complete"):
        evaluate(config)


def test_a_run_with_another_prior_does_not_resume_this_one(world, tmp_path, monkeypatch):
    pairs, _ = world
    config = eval_config(world, tmp_path / "run", limit=3, batch_size=1)
    real = evaluate_module._generator

    def dies_at_once(cfg):
        generator = real(cfg)
        calls = []

        def counted(prompts, images):
            calls.append(1)
            if len(calls) == 2:
                raise InterruptedError("killed")
            return generator.__class__.generate(generator, prompts, images)

        generator.generate = counted
        return generator

    monkeypatch.setattr(evaluate_module, "_generator", dies_at_once)
    with pytest.raises(InterruptedError):
        evaluate(config)
    monkeypatch.setattr(evaluate_module, "_generator", real)
    config.diagnosis = str(gold_diagnosis(pairs, tmp_path / "diagnosis.jsonl"))
    with pytest.raises(ResumeError, match="diagnosis"):
        evaluate(config)


def test_slake_style_files_get_closed_accuracy_and_open_recall(world, tmp_path):
    pairs, _ = world
    films = [record["image"] for record in json.loads((pairs / "damon/mimic_test_diagnosis.json").read_text())[:3]]
    records = [
        {"id": 0, "image": films[0], "prompt": "<image>\nIs the heart enlarged?", "caption": "Yes", "type": "CLOSED"},
        {"id": 1, "image": films[1], "prompt": "<image>\nWhich side is abnormal?", "caption": "Left", "type": "CLOSED"},
        {
            "id": 2,
            "image": films[2],
            "prompt": "<image>\nWhat is abnormal?",
            "caption": "pleural effusion",
            "type": "OPEN",
        },
    ]
    data = tmp_path / "slake_test.json"
    data.write_text(json.dumps(records))
    metrics = evaluate(eval_config(world, tmp_path / "slake", data=str(data), layout="vqa"))
    assert set(metrics["by_type"]) == {"closed", "open"}
    assert metrics["by_type"]["closed"]["n"] == 2 and "closed_accuracy" in metrics["by_type"]["closed"]
    assert "recall" in metrics["by_type"]["open"] and "closed_accuracy" not in metrics["by_type"]["open"]
    lines = [json.loads(line) for line in (tmp_path / "slake/predictions.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [record["prompt"] for record in records]  # one image, own marker
