"""The rule-based CheXpert-style labeller on hand-written reports, and clinical F1 against scikit-learn."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from mmed_rag.eval.chexpert import OBSERVATIONS, LabelInputError, clinical_f1, label_report

# (report, the labels it should get; every observation not listed is None)
CASES = [
    # Negation, and its scope over "or" lists.
    ("No pneumothorax or pleural effusion.", {"Pneumothorax": 0, "Pleural Effusion": 0, "No Finding": 1}),
    (
        "No pneumonia, effusions, edema, pneumothorax, nodules or masses.",
        {"Pneumonia": 0, "Pleural Effusion": 0, "Edema": 0, "Pneumothorax": 0, "Lung Lesion": 0, "No Finding": 1},
    ),
    (
        "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.",
        {"Lung Opacity": 0, "Pneumothorax": 0, "Pleural Effusion": 0, "No Finding": 1},
    ),
    ("Without evidence of consolidation.", {"Consolidation": 0, "No Finding": 1}),
    (
        "Pleural effusion is not seen. Pneumothorax has resolved.",
        {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1},
    ),
    (
        "No focal consolidation, pleural effusion, pneumothorax.",
        {"Consolidation": 0, "Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1},
    ),
    # A comma ends the negation when the next item says something of its own; so do "but" and a new sentence.
    (
        "Heart size normal, no pneumothorax, small left pleural effusion.",
        {"Cardiomegaly": 0, "Pneumothorax": 0, "Pleural Effusion": 1},
    ),
    ("No pneumothorax, but there is a large right effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("No pneumothorax. Right lower lobe consolidation.", {"Pneumothorax": 0, "Consolidation": 1}),
    # Pseudo-negation: "no change" does not negate what follows.
    ("No change in the small left pleural effusion.", {"Pleural Effusion": 1}),
    # Negation wins over the uncertainty cue "suggest" ("no X to suggest Y" negates Y, as CheXpert does).
    (
        "There is no focal air space opacity to suggest a pneumonia.",
        {"Lung Opacity": 0, "Pneumonia": 0, "No Finding": 1},
    ),
    # Uncertainty.
    ("Mild cardiomegaly. Possible right lower lobe pneumonia.", {"Cardiomegaly": 1, "Pneumonia": -1}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
    ("Right basilar opacity, concerning for pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1}),
    ("Atelectasis versus pneumonia in the left base.", {"Atelectasis": -1, "Pneumonia": -1}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": -1}),
    ("Left basilar atelectasis and possible pneumonia.", {"Atelectasis": 1, "Pneumonia": -1}),
    ("The heart may be enlarged.", {"Cardiomegaly": -1}),
    # Normal phrasings of IU-Xray reports.
    ("Heart size is normal. The lungs are clear.", {"Cardiomegaly": 0, "No Finding": 1}),
    ("Normal cardiomediastinal silhouette.", {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1}),
    (
        "The heart, pulmonary XXXX and mediastinum are within normal limits.",
        {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0, "No Finding": 1},
    ),
    ("The heart is not enlarged.", {"Cardiomegaly": 0, "No Finding": 1}),
    # "Lungs are clear" is no explicit mention of opacity, consolidation, pneumonia or edema.
    ("Lungs are clear.", {"No Finding": 1}),
    # Enlargement of anatomy is a finding; anatomy with neither a normal nor an enlarged word is no mention.
    ("The heart is enlarged. Mediastinum widened.", {"Cardiomegaly": 1, "Enlarged Cardiomediastinum": 1}),
    ("Enlarged cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": 1}),
    ("Heart size is stable.", {"No Finding": 1}),
    # No Finding: support devices do not block it; other abnormalities do, also outside the 14 labels.
    ("Left chest pacemaker. No acute cardiopulmonary abnormality.", {"Support Devices": 1, "No Finding": 1}),
    ("Calcified granuloma in the right upper lobe.", {}),
    ("Mild degenerative changes of the thoracic spine.", {}),
    ("Healed left rib fractures.", {"Fracture": 1}),
    ("History of pneumonia. Lungs are clear.", {"Pneumonia": 0, "No Finding": 1}),
    # Exclusions and special cases.
    ("Right apical pleural thickening and scarring.", {"Pleural Other": 1, "Lung Opacity": 1}),
    ("Mild pulmonary vascular congestion, compatible with heart failure.", {"Edema": 1, "Cardiomegaly": -1}),
    ("Small pericardial effusion.", {"No Finding": 1}),
]


@pytest.mark.parametrize(("report", "expected"), CASES, ids=[case[0][:40] for case in CASES])
def test_labels_of_hand_written_reports(report, expected):
    assert label_report(report) == {name: expected.get(name) for name in OBSERVATIONS}


def test_label_set_is_chexperts_fourteen_observations():
    assert len(OBSERVATIONS) == 14 and OBSERVATIONS[0] == "No Finding" and OBSERVATIONS[-1] == "Support Devices"


def test_an_empty_report_gets_no_labels_not_a_normal_one():
    assert label_report("  ") == dict.fromkeys(OBSERVATIONS)


def _random_labels(rng: np.random.Generator, n: int) -> list[dict]:
    values = np.array([1, 0, -1, None], dtype=object)
    labels = [
        dict(zip(OBSERVATIONS, rng.choice(values, size=len(OBSERVATIONS), p=[0.25, 0.3, 0.1, 0.35]), strict=True))
        for _ in range(n)
    ]
    for row in labels:  # observations absent from the whole set must not count in the macro average
        row["Fracture"] = row["Pleural Other"] = None
    return labels


def _matrix(labels: list[dict], uncertain_as: int) -> np.ndarray:
    positive = (1, -1) if uncertain_as else (1,)
    return np.array([[row[name] in positive for name in OBSERVATIONS] for row in labels], dtype=int)


@pytest.mark.parametrize("uncertain_as", [1, 0])
def test_micro_macro_and_per_observation_f1_equal_scikit_learn(uncertain_as):
    rng = np.random.default_rng(0)
    predictions, references = _random_labels(rng, 80), _random_labels(rng, 80)
    scores = clinical_f1(predictions, references, uncertain_as=uncertain_as)
    y_pred, y_true = _matrix(predictions, uncertain_as), _matrix(references, uncertain_as)

    assert scores["micro"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0), abs=1e-9)
    present = [j for j in range(len(OBSERVATIONS)) if y_true[:, j].any() or y_pred[:, j].any()]
    assert scores["macro_observations"] == [OBSERVATIONS[j] for j in present]
    assert "Fracture" not in scores["macro_observations"]
    assert scores["macro_f1"] == pytest.approx(
        f1_score(y_true[:, present], y_pred[:, present], average="macro", zero_division=0), abs=1e-9
    )
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    for j, name in enumerate(OBSERVATIONS):
        row = scores["per_observation"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[j], recall[j], f1[j]), abs=1e-9)
        assert row["support"] == support[j] and row["predicted"] == y_pred[:, j].sum()


def test_f1_of_report_texts_equals_scikit_learn_on_their_labels():
    reports = [report for report, _ in CASES]
    predictions = reports[3:] + reports[:3]
    scores = clinical_f1(predictions, reports)
    y_pred = _matrix([label_report(r) for r in predictions], 1)
    y_true = _matrix([label_report(r) for r in reports], 1)
    assert scores["micro"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0), abs=1e-9)
    present = [j for j in range(len(OBSERVATIONS)) if y_true[:, j].any() or y_pred[:, j].any()]
    assert scores["macro_f1"] == pytest.approx(
        f1_score(y_true[:, present], y_pred[:, present], average="macro", zero_division=0), abs=1e-9
    )
    assert 0 < scores["micro"]["f1"] < 1


def test_identical_reports_score_one():
    reports = [report for report, _ in CASES]
    scores = clinical_f1(reports, reports)
    assert scores["micro"]["f1"] == 1.0 and scores["macro_f1"] == 1.0
    assert scores["per_observation"]["No Finding"]["support"] > 0


def test_uncertain_as_decides_whether_a_hedged_finding_counts():
    predictions, references = ["Possible right lower lobe pneumonia."], ["Right lower lobe pneumonia."]
    assert clinical_f1(predictions, references, uncertain_as=1)["per_observation"]["Pneumonia"]["f1"] == 1.0
    assert clinical_f1(predictions, references, uncertain_as=0)["per_observation"]["Pneumonia"]["recall"] == 0.0


def test_labels_from_a_chexpert_csv_may_use_nan_for_blank():
    scores = clinical_f1([{"Edema": float("nan"), "Cardiomegaly": 1.0}], [{"Cardiomegaly": 1}])
    assert scores["micro"]["f1"] == 1.0 and scores["macro_observations"] == ["Cardiomegaly"]


@pytest.mark.parametrize(
    ("predictions", "references", "kwargs", "message"),
    [
        (["No effusion."], ["No effusion.", "Cardiomegaly."], {}, "1 predictions but 2 references"),
        (["No effusion."], ["No effusion."], {"uncertain_as": -1}, "uncertain_as must be 1"),
        ([{"Edema": 2}], ["Edema."], {}, "prediction 0: unknown observations [] or labels {'Edema': 2}"),
        (["Edema."], [{"Oedema": 1}], {}, "reference 0: unknown observations ['Oedema']"),
        ([None], ["Edema."], {}, "prediction 0 is NoneType"),
    ],
)
def test_bad_input_is_an_error_naming_the_report(predictions, references, kwargs, message):
    with pytest.raises(LabelInputError, match=re.escape(message)):
        clinical_f1(predictions, references, **kwargs)


def test_released_iuxray_reports_are_labelled_sensibly(release_dir):
    records = json.loads((release_dir / "test" / "report" / "iuxray_test.json").read_text(encoding="utf-8"))
    labels = [label_report(record["report"]) for record in records]
    assert len(labels) == len(records) == 590

    def share(phrase: str, name: str, wanted: tuple[int, ...]) -> float:
        chosen = [row for record, row in zip(records, labels, strict=True) if phrase in record["report"].lower()]
        assert len(chosen) >= 10
        return sum(row[name] in wanted for row in chosen) / len(chosen)

    assert share("no pneumothorax", "Pneumothorax", (0,)) > 0.95
    assert share("no pleural effusion", "Pleural Effusion", (0,)) > 0.95
    assert share("heart size is normal", "Cardiomegaly", (0,)) > 0.95
    assert share("cardiomegaly", "Cardiomegaly", (1, -1)) > 0.9  # every one in this set is stable/mild/borderline
    # IU-Xray is mostly normal studies, but far from all.
    no_finding = sum(row["No Finding"] == 1 for row in labels) / len(labels)
    assert 0.4 < no_finding < 0.85
