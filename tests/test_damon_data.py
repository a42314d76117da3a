"""DAMON's data in its three layouts (MIMIC-Diff-VQA CSVs, DAMON's data config + InternVL JSONL, DAMON's evaluation
files), read into multi-image records, and bad input named by file, line or record, and field."""

import csv
import json

import pytest

from mmed_rag.damon.data import (
    DAMON_CONDITIONS,
    DamonDataError,
    read_damon_annotations,
    read_damon_data_config,
    read_damon_eval,
    read_mimic_diff_vqa,
)
from mmed_rag.data.records import RecordError

MIMIC_ALL = [
    {"subject_id": "10000032", "study_id": "50414267", "dicom_id": "02aa804e", "view": "postero-anterior"},
    {"subject_id": "10000032", "study_id": "53189527", "dicom_id": "2a2277a9", "view": "antero-posterior"},
    {"subject_id": "10000032", "study_id": "56699142", "dicom_id": "ea030e7a", "view": "postero-anterior"},
]
DIFFERENCE = "the main image has an additional finding of pleural effusion than the reference image. "


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def pair(
    study="53189527", ref="50414267", kind="difference", question="what has changed compared to the reference image?"
):
    answer = DIFFERENCE if kind == "difference" else "yes"
    return {
        "study_id": study,
        "subject_id": "10000032",
        "ref_id": ref,
        "question_type": kind,
        "question": question,
        "answer": answer,
        "split": "train",
    }


@pytest.fixture
def mimic(tmp_path):
    return write_csv(tmp_path / "mimic_all.csv", MIMIC_ALL)


def test_mimic_diff_vqa_pairs_resolve_to_images_in_both_layouts(tmp_path, mimic):
    questions = write_csv(
        tmp_path / "mimic_pair_questions.csv", [pair(), pair(kind="presence", question="is there edema?")]
    )
    jpg = read_mimic_diff_vqa(questions, mimic).records
    assert [r.images for r in jpg] == [
        ("files/p10/p10000032/s53189527/2a2277a9.jpg", "files/p10/p10000032/s50414267/02aa804e.jpg")
    ] * 2
    first = jpg[0]
    assert (first.roles, first.question_type, first.answer, first.split) == (
        ("main", "reference"),
        "difference",
        DIFFERENCE.strip(),
        "train",
    )
    flat = read_mimic_diff_vqa(questions, mimic, layout="flat", extension=".png").records
    assert flat[0].images == ("2a2277a9.png", "02aa804e.png")  # DAMON's PNG copy: one folder
    assert read_mimic_diff_vqa(questions, mimic, split="test").records == []


def test_damon_data_config_and_its_annotations(tmp_path):
    rows = [
        {
            "id": 0,
            "image": ["a.png", "b.png"],
            "conversations": [
                {
                    "from": "human",
                    "value": "What has changed between the main image<image>\n and the reference image<image>\n?",
                },
                {"from": "gpt", "value": DIFFERENCE},
            ],
        }
    ]
    (tmp_path / "two_image.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "two_image_100k": {
            "root": "images/",
            "annotation": "two_image.jsonl",
            "data_augment": True,
            "max_dynamic_patch": 6,
            "repeat_time": 1,
            "length": 1,
        }
    }
    (tmp_path / "stage_3.json").write_text(json.dumps(config))
    (entry,) = read_damon_data_config(tmp_path / "stage_3.json")
    assert (entry.name, entry.repeat_time, entry.length, entry.max_dynamic_patch) == ("two_image_100k", 1.0, 1, 6)
    assert entry.annotation == str(tmp_path / "two_image.jsonl")  # relative to the config's folder
    (record,) = read_damon_annotations(entry).records
    assert record.images == ["a.png", "b.png"] and record.conversations[1].value == DIFFERENCE


def test_damon_evaluation_files(tmp_path):
    difference = [{"id": 0, "image": ["m.png", "r.png"], "prompt": "What has changed?", "caption": DIFFERENCE}]
    diagnosis = [{"id": 0, "image": "m.png", "caption": "4, 7"}, {"id": 1, "image": "r.png", "caption": "12"}]
    vqa = [
        {
            "id": 0,
            "prompt": "<image>\n What modality is used?",
            "type": "OPEN",
            "image": "x/source.jpg",
            "caption": "CT",
        },
        {
            "id": 1,
            "prompt": "<image>\n Does it contain liver?",
            "type": "CLOSED",
            "image": "x/source.jpg",
            "caption": "No",
        },
    ]
    for name, rows in (("diff", difference), ("diag", diagnosis), ("vqa", vqa)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    (record,) = read_damon_eval(tmp_path / "diff.json", "difference").records
    assert record.images == ("m.png", "r.png") and record.answer == DIFFERENCE
    labels = [r.labels for r in read_damon_eval(tmp_path / "diag.json", "diagnosis").records]
    assert labels == [(4, 7), (12,)] and DAMON_CONDITIONS[4] == "edema" and DAMON_CONDITIONS[12] == "no finding"
    closed = [r.closed for r in read_damon_eval(tmp_path / "vqa.json", "vqa").records]
    assert closed == [False, True]


# -- bad input: named, never crashing a long job (on_error="skip" reads on) ----------------------------------------


def test_a_pair_whose_images_are_the_same_file(tmp_path, mimic):
    questions = write_csv(tmp_path / "q.csv", [pair(ref="53189527")])
    with pytest.raises(DamonDataError, match=r"q.csv, line 2: field 'ref_id': the same image in two roles"):
        read_mimic_diff_vqa(questions, mimic)


def test_a_missing_reference_image(tmp_path, mimic):
    questions = write_csv(tmp_path / "q.csv", [pair()])
    root = tmp_path / "images"
    (root / "files/p10/p10000032/s53189527").mkdir(parents=True)
    (root / "files/p10/p10000032/s53189527/2a2277a9.jpg").write_bytes(b"")  # the main image only
    with pytest.raises(
        DamonDataError, match=r"line 2: field 'ref_id': reference image files/.*/02aa804e.jpg is not in"
    ):
        read_mimic_diff_vqa(questions, mimic, img_root=root)


def test_more_image_markers_than_images(tmp_path):
    rows = [{"id": 0, "image": ["m.png"], "prompt": "<image> and <image>?", "caption": "x"}]
    (tmp_path / "diff.json").write_text(json.dumps(rows))
    with pytest.raises(DamonDataError, match=r"diff.json, record 0: field 'prompt': 2 <image> markers for 1 image"):
        read_damon_eval(tmp_path / "diff.json", "difference")
    turns = [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]
    conversation = {"id": 0, "image": ["a.png"], "conversations": turns}
    (tmp_path / "a.jsonl").write_text(json.dumps(conversation) + "\n")
    (tmp_path / "c.json").write_text(json.dumps({"d": {"root": ".", "annotation": "a.jsonl"}}))
    (entry,) = read_damon_data_config(tmp_path / "c.json")
    with pytest.raises(RecordError, match=r"a.jsonl, line 1: field 'conversations': the human turns hold 2 <image>"):
        read_damon_annotations(entry)


def test_a_study_that_is_not_in_mimic_all(tmp_path, mimic):
    questions = write_csv(tmp_path / "q.csv", [pair(), pair(ref="59999999")])
    with pytest.raises(
        DamonDataError, match=r"q.csv, line 3: field 'ref_id': study 59999999 is not in .*mimic_all.csv"
    ):
        read_mimic_diff_vqa(questions, mimic)
    read = read_mimic_diff_vqa(questions, mimic, on_error="skip")  # reported, and the rest read
    assert len(read.records) == 1 and "line 3" in read.problems[0]


def test_an_unknown_question_type(tmp_path, mimic):
    questions = write_csv(tmp_path / "q.csv", [pair(kind="severity")])
    with pytest.raises(DamonDataError, match=r"line 2: field 'question_type': unknown 'severity'; known: difference"):
        read_mimic_diff_vqa(questions, mimic)


def test_a_data_config_entry_without_its_annotation(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"four_image_90k": {"root": "png/", "annotation": "four.jsonl"}}))
    with pytest.raises(
        DamonDataError, match=r"c.json: dataset 'four_image_90k': field 'annotation': .*four.jsonl does not"
    ):
        read_damon_data_config(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"x": {"root": "png/", "annotation": "a.jsonl", "repeat": 2}}))
    with pytest.raises(DamonDataError, match="unknown field"):
        read_damon_data_config(tmp_path / "d.json", check_files=False)


def test_a_diagnosis_label_outside_the_label_set(tmp_path):
    (tmp_path / "diag.json").write_text(json.dumps([{"id": 0, "image": "m.png", "caption": "4, 13"}]))
    with pytest.raises(DamonDataError, match=r"record 0: field 'caption': '13' is not a label index \(0 to 12\)"):
        read_damon_eval(tmp_path / "diag.json", "diagnosis")
    assert read_damon_eval(tmp_path / "diag.json", "diagnosis", labels=[str(i) for i in range(14)]).records[
        0
    ].labels == (4, 13)


def test_a_csv_without_its_columns(tmp_path, mimic):
    questions = write_csv(tmp_path / "q.csv", [{"study_id": "1", "question": "q"}])
    with pytest.raises(DamonDataError, match=r"q.csv: line 1: missing column\(s\) subject_id, ref_id"):
        read_mimic_diff_vqa(questions, mimic)
