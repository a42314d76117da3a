"""``mmed-rag eval``: files in, metrics.json + metrics.md + plots out; bad input named by file and id."""

import json

import pytest

from mmed_rag.cli import main
from mmed_rag.eval.examples import EvalInputError, read_examples
from mmed_rag.eval.run import EvalConfig, evaluate


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def vqa_row(question_id, answer, prediction, modality="radiology", **extra):
    return {
        "question_id": question_id,
        "question": "Is there an effusion?\n<image>",
        "answer": answer,
        "image": f"img{question_id}.png",
        "modality": modality,
        "prediction": prediction,
        **extra,
    }


@pytest.fixture
def predictions(tmp_path):
    chest = write_jsonl(
        tmp_path / "chest.jsonl",
        [
            vqa_row(1, "Yes.", "Yes, there is.", yes_probability=0.9),
            vqa_row(2, "No", "No.", yes_probability=0.2),
            vqa_row(3, "No", "There is a small effusion.", yes_probability=0.6),
            vqa_row(4, "Yes", "I cannot tell from this image.", yes_probability=0.5),
        ],
    )
    tissue = write_jsonl(
        tmp_path / "tissue.jsonl",
        [
            vqa_row(1, "Yes", "yes", "pathology", yes_probability=0.7),
            vqa_row(2, "No", "no", "pathology", yes_probability=0.4),
        ],
    )
    return chest, tissue


def test_vqa_metrics_overall_and_by_dataset_and_modality(predictions, tmp_path):
    result = evaluate(EvalConfig(task="vqa", pred=tuple(map(str, predictions)), out=str(tmp_path / "eval")))
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics == result.metrics
    overall = metrics["overall"]
    assert overall["accuracy"]["value"] == pytest.approx(4 / 6)
    assert overall["counts"] == {
        "n": 6,
        "gold_yes": 3,
        "gold_no": 3,
        "predicted_yes": 3,
        "predicted_no": 2,
        "unparseable": 1,
    }
    assert overall["auc"]["value"] == pytest.approx(8 / 9)  # one (yes, no) pair of nine is ranked wrongly
    assert set(metrics["by_dataset"]) == {"chest", "tissue"} and set(metrics["by_modality"]) == {
        "radiology",
        "pathology",
    }
    assert metrics["by_dataset"]["tissue"]["accuracy"]["value"] == 1.0
    assert metrics["by_modality"]["radiology"]["accuracy"]["value"] == 0.5
    for name in ("metrics.md", "per_example.jsonl", "accuracy.png", "confusion_matrix.png", "roc.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    table = (tmp_path / "eval/metrics.md").read_text()
    assert "| overall | 6 | 1 | 0.667" in table and "dataset tissue" in table
    rows = [json.loads(line) for line in (tmp_path / "eval/per_example.jsonl").read_text().splitlines()]
    unparseable = next(row for row in rows if row["predicted"] is None)  # the text shows why it was scored so
    assert unparseable["prediction"] == "I cannot tell from this image." and unparseable["correct"] is False


def test_the_command_prints_the_table(predictions, tmp_path, capsys):
    assert main(["eval", "--task", "vqa", "--pred", *map(str, predictions), "--out", str(tmp_path / "e")]) == 0
    assert "| overall | 6 |" in capsys.readouterr().out


def test_ids_missing_from_gold_are_named(predictions, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", [vqa_row(1, "Yes", ""), vqa_row(2, "No", ""), vqa_row(4, "No", "")])
    with pytest.raises(EvalInputError, match=r"chest.jsonl, line 3: id 3 is not in the gold file"):
        read_examples([predictions[0]], "vqa", [gold])
    examples = read_examples([predictions[0]], "vqa", [gold], on_error="skip")
    assert [example.key for example in examples] == [1, 2, 4]
    assert examples.examples[2].gold == "No"  # the gold file's answer wins
    assert any("id 3 is not in the gold file" in problem for problem in examples.problems)


def test_gold_ids_without_a_prediction_are_named(predictions, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", [vqa_row(k, "Yes", "") for k in (1, 2, 3, 4, 5)])
    with pytest.raises(EvalInputError, match=r"1 gold id\(s\) have no prediction in .*chest.jsonl: 5"):
        read_examples([predictions[0]], "vqa", [gold])


def test_duplicate_ids_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [vqa_row(1, "Yes", "Yes"), vqa_row(1, "No", "No")])
    with pytest.raises(EvalInputError, match=r"dup.jsonl, line 2: field 'question_id': duplicate 1"):
        read_examples([path], "vqa")


def test_empty_predictions_are_wrong_answers_and_listed(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [vqa_row(1, "Yes", ""), vqa_row(2, "No", "No")])
    result = evaluate(EvalConfig(task="vqa", pred=(str(path),), out=str(tmp_path / "e"), bootstrap=0))
    assert result.metrics["overall"]["accuracy"]["value"] == 0.5
    assert result.metrics["empty_predictions"] == [f"{path}, line 1: id 1"]
    assert "1 empty prediction(s)" in (tmp_path / "e/metrics.md").read_text()


def test_gold_without_answers(tmp_path):
    row = vqa_row(1, "Yes", "Yes")
    del row["answer"]
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(EvalInputError, match=r"p.jsonl, line 1: field 'answer': missing"):
        read_examples([path], "vqa")
    blank = write_jsonl(tmp_path / "b.jsonl", [vqa_row(1, "  ", "Yes")])
    with pytest.raises(EvalInputError, match="the gold answer of id 1 is empty"):
        read_examples([blank], "vqa")


def test_a_missing_prediction_field(tmp_path):
    row = vqa_row(1, "Yes", "Yes")
    del row["prediction"]
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(EvalInputError, match=r"line 1: field 'prediction': missing"):
        read_examples([path], "vqa")


def test_non_yes_no_gold_stops_or_is_left_out_and_listed(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [vqa_row(1, "The left lower lobe.", "Yes"), vqa_row(2, "No", "No"), vqa_row(3, "Yes", "No")],
    )
    config = EvalConfig(task="vqa", pred=(str(path),), out=str(tmp_path / "e"), bootstrap=0)
    with pytest.raises(EvalInputError, match=r"line 1: field 'answer': gold answer 'The left lower lobe.' of id 1"):
        evaluate(config)
    config.on_error = "skip"
    result = evaluate(config)
    assert result.metrics["overall"]["counts"]["n"] == 2
    assert len(result.metrics["skipped"]) == 1 and "id 1" in result.metrics["skipped"][0]


def test_copying_from_four_runs(tmp_path):
    gold = {1: "Yes", 2: "No", 3: "Yes", 4: "No"}
    answers = {
        "rag": {1: "Yes", 2: "No", 3: "Yes", 4: "Yes"},
        "plain": {1: "No", 2: "Yes", 3: "Yes", 4: "No"},
        "noised": {1: "Yes", 2: "Yes", 3: "No", 4: "Yes"},
    }
    files = {
        run: write_jsonl(tmp_path / f"{run}.jsonl", [vqa_row(k, gold[k], answers[run][k]) for k in gold])
        for run in answers
    }
    config = EvalConfig(
        task="copying",
        pred=(str(files["rag"]),),
        pred_no_retrieval=str(files["plain"]),
        pred_noised=str(files["noised"]),
        out=str(tmp_path / "e"),
    )
    metrics = evaluate(config).metrics
    # Fixed by retrieval: 1 and 2; with noise only 1 stays right.  Right without retrieval: 3 and 4; 4 misled.
    assert (metrics["copy_reliance"]["count"], metrics["copy_reliance"]["total"]) == (1, 2)
    assert (metrics["misled"]["count"], metrics["misled"]["total"]) == (1, 2)
    assert metrics["accuracy"]["retrieval"]["value"] == 0.75
    assert (tmp_path / "e/copying.png").stat().st_size > 0
    assert "| copy_reliance | 0.500 | 1 / 2 |" in (tmp_path / "e/metrics.md").read_text()


def test_released_vqa_answers_scored_against_themselves(release_dir, tmp_path):
    from mmed_rag.eval.yesno import parse_yes_no

    files = sorted((release_dir / "test/vqa").glob("*.jsonl"))
    config = EvalConfig(
        task="vqa",
        pred=tuple(map(str, files)),
        prediction_field="answer",
        on_error="skip",
        out=str(tmp_path / "e"),
        bootstrap=100,
    )
    metrics = evaluate(config).metrics
    answers = [json.loads(line)["answer"] for path in files for line in path.read_text().splitlines() if line.strip()]
    scorable = [answer for answer in answers if parse_yes_no(answer) is not None]
    assert metrics["overall"]["counts"]["n"] == len(scorable) and metrics["overall"]["counts"]["unparseable"] == 0
    assert all(metrics["overall"][name]["value"] == 1.0 for name in ("accuracy", "precision", "recall", "f1"))
    assert len(metrics["skipped"]) == len(answers) - len(scorable)  # hedged or empty gold, listed by id
    assert set(metrics["by_dataset"]) == {"iuxray_test", "pmc-oa_test"}


def test_released_reports_scored_against_themselves(release_dir, tmp_path):
    reports = json.loads((release_dir / "test/report/iuxray_test.json").read_text())[:60]
    subset = tmp_path / "iuxray_subset.json"
    subset.write_text(json.dumps(reports))
    config = EvalConfig(task="report", pred=(str(subset),), prediction_field="report", out=str(tmp_path / "e"))
    overall = evaluate(config).metrics["overall"]
    assert overall["n"] == 60
    assert all(overall[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-9) for n in range(1, 5))
    assert overall["ROUGE-L"] == 1.0 and overall["METEOR"] == 1.0 and overall["CIDEr"] == pytest.approx(10.0)
    assert overall["clinical_f1"]["micro"]["f1"] == 1.0
    assert (tmp_path / "e/report_metrics.png").stat().st_size > 0


def test_runs_of_one_test_set_given_together_are_flagged(predictions, tmp_path):
    chest, _ = predictions
    rerun = write_jsonl(tmp_path / "chest_again.jsonl", [json.loads(line) for line in chest.read_text().splitlines()])
    tissue = write_jsonl(  # another test set that reuses ids 1 and 2 (and even their answers): not flagged
        tmp_path / "tissue.jsonl",
        [
            vqa_row(1, "Yes.", "yes", "pathology", image="tissue/1.png"),
            vqa_row(2, "No", "no", "pathology", image="tissue/2.png"),
        ],
    )
    result = evaluate(EvalConfig(task="vqa", pred=(str(chest), str(tissue), str(rerun)), out=str(tmp_path / "e")))
    note = (result.out / "metrics.md").read_text().split("\n")[-2]
    assert note.startswith("Several prediction files answer the same questions (chest and chest_again: 4)")
    assert "tissue" not in note


def test_word_salad_is_named_and_the_strict_rule_counts_it_unparseable(tmp_path):
    salad = "consolidation changed bony vascularity shows being soft."  # a finding word, no sentence
    rows = [vqa_row(1, "Yes", salad), vqa_row(2, "No", "No."), vqa_row(3, "Yes", "There is a mass.")]
    predictions = write_jsonl(tmp_path / "p.jsonl", rows)
    standard = evaluate(EvalConfig(task="vqa", pred=(str(predictions),), out=str(tmp_path / "standard")))
    strict = evaluate(
        EvalConfig(task="vqa", pred=(str(predictions),), out=str(tmp_path / "strict"), yes_no_rule="strict")
    )
    assert standard.metrics["overall"]["counts"]["unparseable"] == 0
    assert standard.metrics["overall"]["accuracy"]["value"] == 1.0  # the salad happened to say "shows"
    assert strict.metrics["overall"]["counts"]["unparseable"] == 1
    assert strict.metrics["overall"]["accuracy"]["value"] == pytest.approx(2 / 3)
    assert standard.metrics["read_as"] == {"bare": 1, "finding": 1, "unstructured": 1}
    rows = [json.loads(line) for line in (tmp_path / "standard/per_example.jsonl").read_text().splitlines()]
    assert [(row["prediction"], row["read_as"]) for row in rows] == [
        (salad, "unstructured"),
        ("No.", "bare"),
        ("There is a mass.", "finding"),
    ]
    table = (tmp_path / "standard/metrics.md").read_text()
    assert "Yes/no read with the standard rule (3 predictions; read as: bare 1, finding 1, unstructured 1" in table
    assert "1 were read from a finding word in text without sentence structure" in table
    assert "--yes-no-rule strict counts them as unparseable" in table
    assert "1 without sentence structure were counted as unparseable" in (tmp_path / "strict/metrics.md").read_text()


def test_accuracy_chart_draws_each_group_once_with_its_baseline(predictions, tmp_path):
    from mmed_rag.eval.run import _majority_share, accuracy_bars

    chest, tissue = predictions
    one = evaluate(EvalConfig(task="vqa", pred=(str(chest),), out=str(tmp_path / "one")))
    # One file of one modality: its dataset and its modality are the overall set, drawn once.
    assert [label for label, _ in accuracy_bars(one.metrics)] == ["overall = dataset: chest = modality: radiology"]
    both = evaluate(EvalConfig(task="vqa", pred=(str(chest), str(tissue)), out=str(tmp_path / "both")))
    assert [label for label, _ in accuracy_bars(both.metrics)] == [
        "overall",
        "dataset: chest",
        "dataset: tissue",
        "modality: radiology",
        "modality: pathology",
    ]
    assert _majority_share(both.metrics["overall"]["counts"]) == 0.5  # 3 yes, 3 no
    assert _majority_share({"n": 4, "gold_yes": 1, "gold_no": 3}) == 0.75
    assert (tmp_path / "both/accuracy.png").read_bytes().startswith(b"\x89PNG")
