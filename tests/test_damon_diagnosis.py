"""The preliminary diagnosis: questions and their answers, the prompt text, and DAMON's diagnosis metrics."""

import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from mmed_rag.damon.data import DAMON_CONDITIONS
from mmed_rag.damon.diagnosis import condition_question, diagnosis_metrics, diagnosis_text, parse_condition_answer


def test_the_question_and_its_answers():
    assert condition_question("cardiomegaly").startswith("<image>\nDoes this chest X-ray show cardiomegaly?")
    assert condition_question("edema", image_token=False).endswith(
        "If edema is present, output 1; otherwise, output 0."
    )
    answers = {"1": 1, "0.": 0, " 1, present": 1, "Yes, there is.": 1, "no": 0, "10": None, "maybe": None, "": None}
    assert {text: parse_condition_answer(text) for text in answers} == answers


def test_the_prompt_text_names_each_roles_findings():
    assert diagnosis_text([[1, 9], [1]]) == (
        "The main image shows signs of cardiomegaly and pleural effusion. The reference image shows signs of "
        "cardiomegaly."
    )
    assert diagnosis_text([[12], []]) == (
        "The main image shows no sign of these conditions. The reference image shows no sign of these conditions."
    )
    assert (
        diagnosis_text([[0, 2, 4]])
        == "The main image shows signs of enlarged cardiomediastinum, lung opacity and edema."
    )
    with pytest.raises(ValueError, match="outside the 13 conditions"):
        diagnosis_text([[13]])


def test_metrics_equal_scikit_learn_per_condition():
    gold = [[1, 9], [12], [1], [9, 4], [12]]
    predicted = [[1], [12], [1, 9], None, [4]]
    metrics = diagnosis_metrics(gold, predicted)
    for index, condition in enumerate(DAMON_CONDITIONS):
        truth = [int(index in labels) for labels in gold]
        guess = [int(labels is not None and index in labels) for labels in predicted]
        scores = metrics["per_condition"][condition]
        assert scores["accuracy"] == pytest.approx(accuracy_score(truth, guess))
        for name, function in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            expected = function(truth, guess, labels=[0, 1], average="macro", zero_division=0)
            assert scores[name] == pytest.approx(expected), (condition, name)
    cardiomegaly = metrics["per_condition"]["cardiomegaly"]
    assert cardiomegaly["accuracy"] == pytest.approx(1.0) and cardiomegaly["present"] == 2
    assert metrics["mean"]["accuracy"] == pytest.approx(
        sum(s["accuracy"] for s in metrics["per_condition"].values()) / 13
    )
