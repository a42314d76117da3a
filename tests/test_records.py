"""Reading and writing every MMed-RAG release format, on the real files and on broken ones."""

import json
import re
from pathlib import Path

import pytest

from mmed_rag.data.records import (
    FileFormatError,
    ImageReportRecord,
    PreferenceRecord,
    RecordError,
    RetrievalRecord,
    VQARecord,
    read_preference,
    read_records,
    read_retrieval,
    read_retriever_train,
    read_vqa,
    write_records,
)

# Record counts: the training files' are documented in ../shared/mmed-rag-release/README.md (checked below);
# the test sets' are not documented there and were counted from the files.
RELEASE_FILES = {
    "training/retriever/radiology/radiology_train.json": ("retriever", ImageReportRecord, 4034),
    "training/retriever/pathology/pathology_train.json": ("retriever", ImageReportRecord, 5000),
    "training/alignment/radiology/radiology_report.json": ("preference", PreferenceRecord, 701),
    "training/alignment/ophthalmology/harvard_vqa.json": ("preference", PreferenceRecord, 1854),
    "test/vqa/iuxray_test.jsonl": ("vqa", VQARecord, 2573),
    "test/vqa/pmc-oa_test.jsonl": ("vqa", VQARecord, 1994),
    "test/report/iuxray_test.json": ("report", ImageReportRecord, 590),
}


def load_json_any(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def test_readme_counts_match_the_table(release_dir):
    readme = (release_dir / "README.md").read_text()
    for name, (_kind, _type, count) in RELEASE_FILES.items():
        if name.startswith("training/"):
            assert f"{name}: " in readme and f"{count:,} records" in readme.split(name)[1].splitlines()[0]


@pytest.mark.parametrize("name", sorted(RELEASE_FILES))
def test_release_file_reads_and_round_trips(release_dir, name, tmp_path):
    kind, record_type, count = RELEASE_FILES[name]
    path = release_dir / name
    result = read_records(path, kind)
    assert len(result) == count
    assert result.errors == []
    assert all(isinstance(record, record_type) for record in result)
    written = write_records(tmp_path / path.name, result)
    assert load_json_any(written) == load_json_any(path)
    # Detection without a kind finds the same records.
    assert len(read_records(path)) == count


def test_release_field_types(release_dir):
    vqa = read_vqa(release_dir / "test/vqa/iuxray_test.jsonl")
    first = vqa.records[0]
    assert isinstance(first.question_id, int) and "<image>" in first.question
    assert first.text.endswith("Please choose from the following two options: [yes, no]\n<image>")
    assert first.answer == "Yes." and first.image == "CXR3030_IM-1405/0.png"
    # The one question released with an empty answer is readable, and flagged.
    assert [w.position for w in vqa.warnings] == ["line 124"]

    radiology = read_retriever_train(release_dir / "training/retriever/radiology/radiology_train.json")
    assert radiology.records[0].images == ["CXR940_IM-2437/0.png", "CXR940_IM-2437/1.png"]
    assert radiology.records[0].extra["image_root"].startswith("/")

    pathology = read_retriever_train(release_dir / "training/retriever/pathology/pathology_train.json")
    forms = {(record.image_key, record.report_key) for record in pathology}
    assert forms == {("image", "report"), ("image_path_str", "caption")}
    assert {type(record.id) for record in pathology} == {int, str}

    pairs = read_preference(release_dir / "training/alignment/radiology/radiology_report.json")
    noised = [record for record in pairs if record.rejected_noised == 1]
    assert len(noised) == 233 and all(record.chosen_noised is None for record in pairs)
    pair = pairs.records[0]
    assert pair.prompt.startswith("<image>\nYou are a professional radiologist.")
    assert pair.prompt == pair.rejected_conversations[0].value
    assert pair.chosen != pair.rejected


def test_retrieval_output_round_trip(tmp_path):
    lines = [
        {
            "question": "Is there an effusion?\n<image>",
            "answer": "No.",
            "image": "a/0.png",
            "question_id": 1,
            "report": "No effusion.",
            "reference_reports": ["Lungs clear.", "No effusion."],
            "retrieve_k": 2,
        },
        {"id": "r1", "report": "Normal.", "image_path": ["b/0.png"], "reference_reports": [], "retrieve_k": 0},
    ]
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = read_retrieval(path)
    assert isinstance(result.records[0].query, VQARecord) and isinstance(result.records[1].query, ImageReportRecord)
    assert [r.retrieve_k for r in result] == [2, 0]
    assert load_json_any(write_records(tmp_path / "again.jsonl", result)) == lines
    assert list(load_json_any(write_records(tmp_path / "again.jsonl", result))[0]) == list(lines[0])


def test_records_built_in_code_write_canonical_order(tmp_path):
    record = VQARecord(question_id=7, question="Is the heart enlarged?\n<image>", answer="Yes.", image="x.png")
    retrieved = RetrievalRecord(record, ["Cardiomegaly."], 1)
    written = load_json_any(write_records(tmp_path / "r.jsonl", [retrieved]))
    assert list(written[0]) == ["question_id", "question", "answer", "image", "reference_reports", "retrieve_k"]


# -- bad input ------------------------------------------------------------------------------------------------

GOOD_VQA = {
    "question_id": 1,
    "question": "Is there a nodule?\n<image>",
    "answer": "No.",
    "image": "a.png",
    "report": "No nodule.",
}
GOOD_REPORT = {"id": "s1", "report": "The lungs are clear.", "image_path": ["s1/0.png"]}
GOOD_PAIR = {
    "id": "p1",
    "image": "p1.png",
    "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Clear lungs."}],
    "rejected_conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Effusion."}],
    "rejected_noised": 1,
}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=4))
    return path


def assert_error(error: RecordError, path: Path, position: str | None, field: str | None, expected: str):
    assert error.path == str(path)
    assert error.position == position
    assert error.field == field
    assert re.search(expected, error.problem), error.problem
    assert str(path) in str(error)


def test_malformed_jsonl_line_names_the_line_and_can_be_skipped(tmp_path):
    path = write_jsonl(
        tmp_path / "vqa.jsonl", [GOOD_VQA, '{"question_id": 2, "question": ', {**GOOD_VQA, "question_id": 3}]
    )
    with pytest.raises(RecordError) as caught:
        read_vqa(path)
    assert_error(caught.value, path, "line 2", None, "invalid JSON")
    result = read_vqa(path, on_error="skip")
    assert [r.question_id for r in result] == [1, 3]
    assert len(result.errors) == 1 and "line 2" in result.summary()


def test_truncated_json_list_keeps_the_complete_records(tmp_path):
    full = json.dumps([GOOD_REPORT, {**GOOD_REPORT, "id": "s2"}, {**GOOD_REPORT, "id": "s3"}], indent=4)
    path = tmp_path / "train.json"
    path.write_text(full[: full.index('"s3"') + 10])
    with pytest.raises(FileFormatError) as caught:
        read_retriever_train(path)
    assert caught.value.position.startswith("record 2 (line ")
    assert "truncated" in caught.value.problem
    result = read_retriever_train(path, on_error="skip")
    assert [r.id for r in result] == ["s1", "s2"] and len(result.errors) == 1


def test_wrong_top_level_type(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": [GOOD_REPORT]}))
    with pytest.raises(FileFormatError, match="wrong top-level type: expected a JSON list of records, got an object"):
        read_retriever_train(path)


def test_record_that_is_not_an_object(tmp_path):
    path = write_json(tmp_path / "train.json", [GOOD_REPORT, ["s2", "report"]])
    with pytest.raises(RecordError) as caught:
        read_retriever_train(path)
    assert_error(caught.value, path, "record 1 (line 9)", None, "expected a JSON object .* got a list")


@pytest.mark.parametrize(
    ("record", "field", "expected"),
    [
        ({k: v for k, v in GOOD_REPORT.items() if k != "report"}, "report", "missing"),
        ({k: v for k, v in GOOD_REPORT.items() if k != "image_path"}, "image_path", "missing .*'image'"),
        ({**GOOD_REPORT, "report": "   "}, "report", "non-empty string, got an empty one"),
        ({**GOOD_REPORT, "report": 42}, "report", "expected a string, got int"),
        ({**GOOD_REPORT, "image_path": []}, "image_path", r"non-empty list .* got \[\]"),
        ({**GOOD_REPORT, "image_path": ["ok.png", 3]}, "image_path[1]", "expected a non-empty string"),
        ({**GOOD_REPORT, "id": None}, "id", "expected a string or an integer, got null"),
        ({**GOOD_REPORT, "id": 1.5}, "id", "expected a string or an integer, got float"),
    ],
    ids=[
        "missing-report",
        "missing-image",
        "empty-report",
        "non-string-report",
        "empty-image-list",
        "non-string-image",
        "null-id",
        "float-id",
    ],
)
def test_bad_report_fields(tmp_path, record, field, expected):
    path = write_json(tmp_path / "train.json", [GOOD_REPORT, record])
    with pytest.raises(RecordError) as caught:
        read_retriever_train(path)
    assert caught.value.position.startswith("record 1 (line ")
    assert_error(caught.value, path, caught.value.position, field, expected)


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"question": None}, "question", "expected a string, got null"),
        ({"image": ""}, "image", "non-empty"),
        ({"answer": ["yes"]}, "answer", "expected a string, got a list"),
    ],
    ids=["null-question", "empty-image", "list-answer"],
)
def test_bad_vqa_fields(tmp_path, change, field, expected):
    path = write_jsonl(tmp_path / "vqa.jsonl", [GOOD_VQA, {**GOOD_VQA, "question_id": 2, **change}])
    with pytest.raises(RecordError) as caught:
        read_vqa(path)
    assert_error(caught.value, path, "line 2", field, expected)


def test_missing_question(tmp_path):
    record = {k: v for k, v in GOOD_VQA.items() if k != "question"}
    path = write_jsonl(tmp_path / "vqa.jsonl", [record])
    with pytest.raises(RecordError) as caught:
        read_vqa(path)
    assert_error(caught.value, path, "line 1", "question", "missing")


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "vqa.jsonl", [GOOD_VQA, {**GOOD_VQA, "question": "Other?\n<image>"}])
    with pytest.raises(RecordError) as caught:
        read_vqa(path)
    assert_error(caught.value, path, "line 2", "question_id", "duplicate 1, first seen at line 1")
    # 1 and "1" are different ids (JSON keeps the type).
    path = write_jsonl(tmp_path / "vqa2.jsonl", [GOOD_VQA, {**GOOD_VQA, "question_id": "1"}])
    assert len(read_vqa(path)) == 2


def test_image_marker_missing_from_human_turn(tmp_path):
    pair = json.loads(json.dumps(GOOD_PAIR))
    pair["rejected_conversations"][0]["value"] = "Describe."
    path = write_json(tmp_path / "pairs.json", [pair])
    with pytest.raises(RecordError) as caught:
        read_preference(path)
    assert_error(caught.value, path, "record 0 (line 2)", "rejected_conversations[0].value", "<image> marker")


def test_conversation_without_gpt_turn(tmp_path):
    pair = {**GOOD_PAIR, "conversations": [{"from": "human", "value": "<image>\nDescribe."}]}
    path = write_json(tmp_path / "pairs.json", [pair])
    with pytest.raises(RecordError) as caught:
        read_preference(path)
    assert_error(caught.value, path, "record 0 (line 2)", "conversations", "at least one 'gpt' turn")


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"rejected_noised": 2}, "rejected_noised", "expected 0 or 1"),
        ({"chosen_noised": 1}, "chosen_noised", "only one side can be noised"),
        ({"conversations": [{"from": "user", "value": "<image>\nx"}]}, "conversations[0].from", "'human' or 'gpt'"),
        ({"conversations": "hi"}, "conversations", "non-empty list of turns, got a string"),
    ],
    ids=["bad-flag", "both-noised", "bad-speaker", "string-conversation"],
)
def test_bad_preference_fields(tmp_path, change, field, expected):
    path = write_json(tmp_path / "pairs.json", [{**GOOD_PAIR, **change}])
    with pytest.raises(RecordError) as caught:
        read_preference(path)
    assert_error(caught.value, path, "record 0 (line 2)", field, expected)


def test_retrieve_k_must_match_the_reports(tmp_path):
    path = write_jsonl(tmp_path / "out.jsonl", [{**GOOD_VQA, "reference_reports": ["a"], "retrieve_k": 3}])
    with pytest.raises(RecordError) as caught:
        read_retrieval(path)
    assert_error(caught.value, path, "line 1", "retrieve_k", "is 3 but reference_reports holds 1")


def test_byte_order_mark_is_read_past_and_not_written_back(tmp_path):
    path = tmp_path / "vqa.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD_VQA) + "\n").encode())
    result = read_vqa(path)
    assert result.had_bom and len(result) == 1
    assert not write_records(tmp_path / "out.jsonl", result).read_bytes().startswith(b"\xef\xbb\xbf")


def test_non_utf8_bytes_name_the_record_and_field(tmp_path):
    good = (json.dumps(GOOD_VQA) + "\n").encode()
    bad = json.dumps({**GOOD_VQA, "question_id": 2, "report": "Pleural XX"}).encode().replace(b"XX", b"\xff\xfe")
    path = tmp_path / "vqa.jsonl"
    path.write_bytes(good + bad + b"\n" + good.replace(b'"question_id": 1', b'"question_id": 3'))
    with pytest.raises(RecordError) as caught:
        read_vqa(path)
    assert_error(caught.value, path, "line 2", "report", "not valid UTF-8")
    assert [r.question_id for r in read_vqa(path, on_error="skip")] == [1, 3]


def test_nan_is_rejected_with_its_field_path(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"id": "s1", "report": "Clear.", "image_path": ["a.png"], "meta": {"age": NaN}}]')
    with pytest.raises(RecordError) as caught:
        read_retriever_train(path)
    assert_error(caught.value, path, "record 0 (line 1)", "meta.age", "NaN is not valid JSON")


def test_huge_line_is_refused_without_reading_the_rest_wrong(tmp_path):
    huge = {**GOOD_VQA, "question_id": 2, "report": "x" * 5000}
    path = write_jsonl(tmp_path / "vqa.jsonl", [GOOD_VQA, huge, {**GOOD_VQA, "question_id": 3}])
    with pytest.raises(RecordError) as caught:
        read_vqa(path, max_record_bytes=1000)
    assert_error(caught.value, path, "line 2", None, "over the limit of 1,000")
    assert [r.question_id for r in read_vqa(path, on_error="skip", max_record_bytes=1000)] == [1, 3]
    assert len(read_vqa(path)) == 3  # the default limit (8 MiB) takes it


def test_trailing_garbage_after_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD_REPORT]) + "\n]")
    with pytest.raises(FileFormatError, match="after the closing"):
        read_retriever_train(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "train.json"
    empty.write_text("  \n")
    with pytest.raises(FileFormatError, match="empty"):
        read_retriever_train(empty)
    with pytest.raises(FileFormatError, match="cannot read"):
        read_retriever_train(tmp_path / "missing.json")
    blank = tmp_path / "vqa.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(FileFormatError, match="empty"):  # as an empty .json: not an empty result
        read_vqa(blank)


def test_skip_mode_summary_lists_every_problem(tmp_path):
    path = write_jsonl(
        tmp_path / "vqa.jsonl",
        [GOOD_VQA, "not json", {**GOOD_VQA, "question_id": 2, "image": 5}, {**GOOD_VQA, "question_id": 3}],
    )
    result = read_vqa(path, on_error="skip")
    assert len(result) == 2 and len(result.errors) == 2
    summary = result.summary()
    assert "2 vqa record(s)" in summary and "2 error(s)" in summary
    assert "line 2" in summary and "line 3: field 'image'" in summary
