"""MMed-RAG's prompts: every released human turn parses and rebuilds to the same string; examples of each form."""

import dataclasses
from collections import Counter

import pytest

from mmed_rag.data.records import read_preference, read_vqa
from mmed_rag.generation import prompts
from mmed_rag.generation.prompts import (
    PromptParseError,
    UnknownModalityError,
    build_prompt,
    clean_question,
    parse_prompt,
    register_modality,
    report_prompt,
    vqa_prompt,
)

# file -> (task, modality) every human turn of it must parse to.
ALIGNMENT_FILES = {
    "training/alignment/radiology/radiology_report.json": ("report", "radiology"),
    "training/alignment/ophthalmology/harvard_vqa.json": ("vqa", "ophthalmology"),
}

CAUTION = (
    "It should be noted that the diagnostic information in the reference reports cannot be directly used as the "
    "basis for diagnosis, but should only be used for reference and comparison."
)


def rebuild(parsed):
    return build_prompt(**dataclasses.asdict(parsed))


@pytest.mark.parametrize("name", sorted(ALIGNMENT_FILES))
def test_every_released_human_turn_parses_and_rebuilds_identically(release_dir, name):
    task, modality = ALIGNMENT_FILES[name]
    records = read_preference(release_dir / name).records
    turns = [
        turn.value
        for record in records
        for turn in record.conversations + record.rejected_conversations
        if turn.speaker == "human"
    ]
    assert len(turns) == 2 * len(records)  # one human turn on each side of each pair

    parsed = [parse_prompt(turn) for turn in turns]
    mismatches = [turn for turn, p in zip(turns, parsed, strict=True) if rebuild(p) != turn]
    assert not mismatches, f"{len(mismatches)} of {len(turns)} human turns rebuild differently: {mismatches[0]!r}"
    assert {(p.task, p.modality, p.image_token, len(p.reports)) for p in parsed} == {(task, modality, True, 1)}
    if task == "vqa":
        assert all(p.question and p.question.endswith("?") for p in parsed)


def test_radiology_numbers_mimic_reports_differently(release_dir):
    """MIMIC-CXR pairs say 'No.1: <report>', IU-Xray pairs '1. <report>' (the only layout difference found)."""
    records = read_preference(release_dir / "training/alignment/radiology/radiology_report.json").records
    styles = Counter(
        (parse_prompt(record.prompt).numbering, "mimic-cxr" in record.extra["image_root"]) for record in records
    )
    assert styles == {("No.1:", True): 412, ("1.", False): 289}


def test_released_reports_are_kept_unstripped(release_dir):
    records = read_preference(release_dir / "training/alignment/ophthalmology/harvard_vqa.json").records
    reports = [parse_prompt(record.prompt).reports[0] for record in records]
    assert sum(report != report.strip() for report in reports) == 52  # 50 end in "\n", 2 in " "
    assert any(record.prompt.count("\n \nPlease answer") == 1 for record in records)


def test_no_report_vqa_prompt_is_the_iuxray_test_text(release_dir):
    """The test set's `text` is the released no-retrieval VQA prompt: cleaned question, options, marker last."""
    records = [r for r in read_vqa(release_dir / "test/vqa/iuxray_test.jsonl").records if r.text is not None]
    assert len(records) == 2573
    assert all(vqa_prompt("radiology", r.question, []) == r.text for r in records)
    assert all(vqa_prompt(None, r.question, []) == r.text for r in records)
    parsed = parse_prompt(records[0].text)
    assert (parsed.task, parsed.modality, parsed.reports, parsed.image_token) == ("vqa", None, (), True)
    assert parsed.question == clean_question(records[0].question)


def test_three_reports_are_numbered_and_each_followed_by_a_space():
    prompt = report_prompt("radiology", ["Heart is normal.", "No effusion.", "Clear lungs."])
    assert prompt == (
        "<image>\nYou are a professional radiologist. You are provided with an X-ray image and 3 reference "
        "report(s): 1. Heart is normal. 2. No effusion. 3. Clear lungs. \nPlease generate a report based on the "
        "image. " + CAUTION + " Please only include the content of the report in your response."
    )
    vqa = vqa_prompt("ophthalmology", "Is there glaucoma?", ["A.", "B.", "C."], image_token=False)
    assert vqa == (
        "You are provided with a fundus image, a image-related question and 3 reference report(s): 1. A. 2. B. 3. C. "
        "\nPlease answer the question based on the image and report and choose from the following two options: "
        "[yes, no]. " + CAUTION + " Question: Is there glaucoma?"
    )


def test_no_report_prompts():
    assert report_prompt("ophthalmology", []) == (
        "<image>\nYou are a professional ophthalmologist. You are provided with a fundus image. Please generate a "
        "report based on the image. Please only include the content of the report in your response."
    )
    assert vqa_prompt("pathology", "Is it benign?", [], image_token=False) == (
        "Is it benign? Please choose from the following two options: [yes, no]"
    )


def test_the_authors_no_report_prompts():
    # As their inference scripts wrote them (read at commit f2023ea): the marker first, then the text.
    assert vqa_prompt("radiology", "Is the heart enlarged? \n<image>", [], style="authors") == (
        "<image>\nIs the heart enlarged? Please answer the question based on the image and choose from the following "
        "two options: [yes, no]."
    )
    assert report_prompt("ophthalmology", [], style="authors") == (
        "<image>\nYou are a professional ophthalmologist. Please generate a report based on the fundus image and only "
        "include the content of the report in your response."
    )
    # With reports the two styles agree: the released prompts are the authors'.
    for task, question in (("vqa", "Is it?"), ("report", None)):
        same = [build_prompt(task, "radiology", question, ["A."], style=style) for style in ("mmed-rag", "authors")]
        assert same[0] == same[1]
    with pytest.raises(ValueError, match="prompt style"):
        build_prompt("vqa", "radiology", "Is it?", style="llava")


@pytest.mark.parametrize("modality", ["radiology", "ophthalmology", "pathology"])
@pytest.mark.parametrize("count", [0, 1, 3])
@pytest.mark.parametrize("task", ["report", "vqa"])
@pytest.mark.parametrize("image_token", [True, False])
def test_hand_written_prompts_round_trip(modality, count, task, image_token):
    reports = ["The lungs are clear.", "Cup-to-disc ratio 0.6.\n", "impression: 1. Stable. 2. No change."][:count]
    question = "Is the finding normal?" if task == "vqa" else None
    prompt = build_prompt(task, modality, question, reports, image_token=image_token)
    parsed = parse_prompt(prompt)
    assert parsed.task == task
    assert parsed.modality == (None if task == "vqa" and count == 0 else modality)
    assert parsed.reports == tuple(reports)  # the third report's own "2. " list does not split it
    assert parsed.question == question
    assert parsed.image_token is image_token
    assert rebuild(parsed) == prompt
    assert (prompts.IMAGE_TOKEN in prompt) is image_token


def test_mimic_numbering_round_trips_with_several_reports():
    reports = ["impression: 1. Effusion. 2. Edema.", "No acute process.", "impression: 1. Stable. 2. Clear."]
    prompt = report_prompt("radiology", reports, numbering="No.1:")
    assert "report(s): No.1: impression: 1. Effusion. 2. Edema. No.2: No acute process. No.3: " in prompt
    parsed = parse_prompt(prompt)
    assert (parsed.numbering, parsed.reports) == ("No.1:", tuple(reports))
    assert rebuild(parsed) == prompt


@pytest.mark.parametrize("raw", ["Is the heart enlarged? \n<image>", "Is the heart enlarged?\n<image>"])
def test_question_loses_its_image_marker(raw):
    assert clean_question(raw) == "Is the heart enlarged?"
    prompt = vqa_prompt("radiology", raw, ["Normal heart size."])
    assert prompt.endswith("Question: Is the heart enlarged?")
    assert prompt.count("<image>") == 1 and prompt.startswith("<image>\n")
    assert parse_prompt(prompt).question == "Is the heart enlarged?"


def test_unknown_modality_names_the_known_ones():
    with pytest.raises(UnknownModalityError, match="'dermatology'.*ophthalmology, pathology, radiology"):
        report_prompt("dermatology", ["A rash."])
    with pytest.raises(ValueError, match="known"):
        build_prompt("vqa", "ct", "Is it?", ["Report."])


def test_a_registered_modality_builds_and_is_detected(monkeypatch):
    monkeypatch.setattr(prompts, "MODALITIES", dict(prompts.MODALITIES))
    register_modality("dermatology", "a skin image", "dermatologist")
    prompt = report_prompt("dermatology", ["Erythematous plaque."])
    assert prompt.startswith("<image>\nYou are a professional dermatologist. You are provided with a skin image and")
    assert parse_prompt(prompt).modality == "dermatology"
    register_modality("dermatology", "a skin image", "dermatologist")  # same wording again: no-op
    with pytest.raises(ValueError, match="already used by modality 'radiology'"):
        register_modality("chest", "an X-ray image", "radiologist")
    with pytest.raises(ValueError, match="already registered"):
        register_modality("dermatology", "a photo", "dermatologist")


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="takes no question"):
        build_prompt("report", "radiology", "Is it?")
    with pytest.raises(ValueError, match="needs a question"):
        build_prompt("vqa", "radiology")
    with pytest.raises(ValueError, match="needs a modality"):
        build_prompt("vqa", None, "Is it?", ["Report."])
    with pytest.raises(TypeError, match="not one string"):
        report_prompt("radiology", "The lungs are clear.")
    with pytest.raises(ValueError, match="unknown numbering"):
        report_prompt("radiology", ["A."], numbering="(1)")


@pytest.mark.parametrize(
    "prompt, problem",
    [
        ("Describe the image.", "not an MMed-RAG"),
        (report_prompt("radiology", ["A."]).replace("X-ray image", "CT image"), "no registered modality"),
        (report_prompt("radiology", ["A."]).replace("radiologist", "pathologist"), "specialist"),
        (report_prompt("radiology", ["A.", "B."]).replace("2. B.", "B."), "no label ' 2. '"),
        ("<image>\nIs it? Please choose from the following two options: [yes, no]", "not clean"),
    ],
)
def test_unparseable_prompts_say_why(prompt, problem):
    with pytest.raises(PromptParseError, match=problem):
        parse_prompt(prompt)
