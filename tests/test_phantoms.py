"""The phantom data set: release-format files, reports and questions that agree with the pixels, determinism,
and images whose modality and findings a classifier really learns."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmed_rag.config import ConfigError
from mmed_rag.data.phantom_probe import probe_phantoms
from mmed_rag.data.phantoms import (
    FINDINGS,
    PhantomConfig,
    findings_in_report,
    image_of,
    make_phantoms,
    render_phantom,
    write_grid,
)

MODALITIES = ("radiology", "pathology", "ophthalmology")
# Words by which a report sentence or a question refers to each finding.
KEYWORDS = {
    "cardiomegaly": ("heart", "cardiac", "cardiomegaly"),
    "effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodul",),
    "carcinoma": ("atypi", "carcinoma", "malignan"),
    "inflammation": ("inflamm", "lymphocyt"),
    "necrosis": ("necro",),
    "glaucoma": ("cup", "glaucom"),
    "haemorrhage": ("haemorrhag",),
    "drusen": ("drusen",),
}
NEGATION = re.compile(r"\b(no|not|normal|without)\b", re.IGNORECASE)
# Questions whose "yes" means the finding is absent ("Is the macula free of drusen?").
ASKS_FOR_ABSENCE = re.compile(r"\b(normal|free|sharp|clear|fully expanded|uniform)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(PhantomConfig(out=str(out), n=60, size=64))
    return out


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_records(out: Path, modality: str) -> list[dict]:
    retriever = out / "training" / "retriever" / modality
    return (
        read_json(retriever / f"{modality}_train.json")
        + read_json(retriever / f"{modality}_val.json")
        + read_json(out / "test" / "report" / f"{modality}_test.json")
    )


def states(report: str, finding: str) -> set[str]:
    """'present' / 'absent' for each sentence of ``report`` that refers to ``finding``."""
    sentences = [s for s in re.split(r"(?<=\.)\s+", report) if any(k in s.lower() for k in KEYWORDS[finding])]
    return {"absent" if NEGATION.search(s) else "present" for s in sentences}


def test_layout_and_release_formats(phantoms):
    manifest = read_json(phantoms / "manifest.json")
    assert manifest["generator"] == "mmed_rag.data.phantoms"
    assert manifest["counts"] == {m: {"train": 14, "val": 2, "test": 4} for m in MODALITIES}
    assert manifest["findings"] == {m: list(FINDINGS[m]) for m in MODALITIES}
    assert manifest["config"]["n"] == 60

    radiology = read_json(phantoms / "training/retriever/radiology/radiology_train.json")
    assert radiology[0]["id"] == "rad_00000" and radiology[0]["image_path"] == ["radiology/rad_00000.png"]
    assert {"id", "report", "image_path", "split"} <= set(radiology[0])
    pathology = read_json(phantoms / "training/retriever/pathology/pathology_val.json")
    assert isinstance(pathology[0]["id"], int) and pathology[0]["image"].startswith("pathology/path_")
    ophthalmology = read_json(phantoms / "training/retriever/ophthalmology/ophthalmology_train.json")
    assert ophthalmology[0]["image_path"] == "ophthalmology/oph_00000.png"

    for modality in MODALITIES:
        records = all_records(phantoms, modality)
        assert len(records) == 20 and len({image_of(r) for r in records}) == 20
        assert [r["split"] for r in records] == ["train"] * 14 + ["val"] * 2 + ["test"] * 4
        for record in records:
            with Image.open(phantoms / "images" / image_of(record)) as image:
                assert image.size == (64, 64)
                assert image.mode == ("L" if modality == "radiology" else "RGB")
        for record in read_json(phantoms / "test" / "report" / f"{modality}_test.json"):
            assert isinstance(record["image_path"], list) and record["split"] == "test"


def test_reports_state_every_finding(phantoms):
    seen = set()
    for modality in MODALITIES:
        for record in all_records(phantoms, modality):
            for finding in FINDINGS[modality]:
                if finding in record["findings"]:
                    assert "present" in states(record["report"], finding), (finding, record["report"])
                    seen.add(finding)
                else:
                    assert states(record["report"], finding) <= {"absent"}, (finding, record["report"])
    assert len(seen) >= 8, f"too few findings drawn to test the reports: {sorted(seen)}"


def test_vqa_questions_are_balanced_and_answered_by_the_findings(phantoms):
    for modality in MODALITIES:
        lines = read_jsonl(phantoms / "test" / "vqa" / f"{modality}_test.jsonl")
        tests = {image_of(r): r for r in read_json(phantoms / "test" / "report" / f"{modality}_test.json")}
        assert [line["question_id"] for line in lines] == list(range(1, 2 * len(tests) + 1))
        # PMC-OA style for pathology, IU-Xray style for the others
        yes, no, suffix = ("Yes", "No", "?\n<image>") if modality == "pathology" else ("Yes.", "No.", "? \n<image>")
        assert sorted({line["answer"] for line in lines}) == [no, yes]
        assert sum(line["answer"] == yes for line in lines) == len(lines) // 2
        for line in lines:
            record = tests[line["image"]]
            assert line["report"] == record["report"]
            assert line["question"].endswith(suffix)
            assert line["text"].endswith("Please choose from the following two options: [yes, no]\n<image>")
            question = line["question"].removesuffix(suffix)
            present = line["finding"] in record["findings"]
            assert (line["answer"] == yes) == (present != bool(ASKS_FOR_ABSENCE.search(question))), line


def test_contact_sheet(phantoms, tmp_path):
    records = {m: read_json(phantoms / "test" / "report" / f"{m}_test.json") for m in MODALITIES}
    sheet = write_grid(tmp_path / "grid.png", phantoms / "images", records, per_modality=4)
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width > 4 * 64


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first, second, other = (tmp_path / name for name in ("first", "second", "other"))
    make_phantoms(PhantomConfig(out=str(first), n=30))
    make_phantoms(PhantomConfig(out=str(second), n=30))
    make_phantoms(PhantomConfig(out=str(other), n=30, seed=1))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        if relative.name != "manifest.json":  # it records the output directory
            assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    manifests = [read_json(d / "manifest.json") for d in (first, second)]
    for manifest in manifests:
        manifest["config"].pop("out")
    assert manifests[0] == manifests[1]
    image = Path("images/radiology/rad_00000.png")
    assert (first / image).read_bytes() != (other / image).read_bytes()


def test_a_classifier_learns_modality_and_findings_from_pixels(tmp_path):
    """The phantoms are not noise: a linear probe on pixels tells modalities and findings apart (train -> test)."""
    make_phantoms(PhantomConfig(out=str(tmp_path), n=600, size=32, finding_probability=0.5))
    scores = {score.task: score for score in probe_phantoms(tmp_path)}
    assert scores["modality"].accuracy >= 0.95  # chance: 1/3
    for task in ("radiology:cardiomegaly", "radiology:effusion", "pathology:carcinoma", "ophthalmology:drusen"):
        score = scores[task]
        assert score.n_test == 40
        assert score.accuracy >= 0.8 and score.accuracy > score.majority + 0.15, score


def test_render_phantom_is_pure_and_checks_its_arguments():
    image = render_phantom("pathology", ["carcinoma"], 48, np.random.default_rng(3))
    again = render_phantom("pathology", ["carcinoma"], 48, np.random.default_rng(3))
    assert image.size == (48, 48) and image.mode == "RGB" and image.tobytes() == again.tobytes()
    with pytest.raises(ValueError, match="unknown radiology finding"):
        render_phantom("radiology", ["glaucoma"], 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown modality"):
        render_phantom("dermatology", [], 64, np.random.default_rng(0))


def test_findings_in_report_reads_every_report_back(phantoms):
    for modality in MODALITIES:
        for record in all_records(phantoms, modality):
            said = findings_in_report(modality, record["report"])
            assert said == {finding: finding in record["findings"] for finding in FINDINGS[modality]}
            # A lower-casing tokenizer's model writes the same sentences in lower case: read the same.
            assert findings_in_report(modality, record["report"].lower()) == said


def test_fixed_wording_presence_questions_and_training_questions(tmp_path):
    config = PhantomConfig(
        out=str(tmp_path), n=60, report_wording="fixed", question_style="presence", train_questions_per_image=2
    )
    make_phantoms(config)
    for modality in MODALITIES:
        records = all_records(tmp_path, modality)
        # The findings' sentences are a function of the findings: same findings, same opening, fillers after.
        openings = {}
        for record in records:
            said = findings_in_report(modality, record["report"])
            assert said == {finding: finding in record["findings"] for finding in FINDINGS[modality]}
            opening = " ".join(record["report"].split(". ")[: len(FINDINGS[modality])])
            assert openings.setdefault(tuple(record["findings"]), opening) == opening
        questions = read_jsonl(tmp_path / "training" / "vqa" / f"{modality}_train.jsonl")
        questions += read_jsonl(tmp_path / "training" / "vqa" / f"{modality}_val.jsonl")
        findings = {image_of(record): record["findings"] for record in records}
        assert len(questions) == 2 * 16
        for line in questions:
            # presence: "yes" exactly when the finding asked of is there; never asked as "free of ...?"
            assert (parse_answer(line["answer"])) == (line["finding"] in findings[line["image"]]), line
            assert not ASKS_FOR_ABSENCE.search(line["question"]), line["question"]


def parse_answer(answer: str) -> bool:
    return answer.lower().startswith("yes")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n": 8}, "n >= 9"),
        ({"size": 16}, "size"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "no training image"),
        ({"modalities": ("radiology", "dermatology")}, "modalities"),
        ({"modalities": ()}, "modalities"),
        ({"questions_per_image": 0}, "questions_per_image"),
        ({"finding_probability": 1.5}, "finding_probability"),
        ({"report_wording": "terse"}, "report_wording"),
        ({"question_style": "open"}, "question_style"),
    ],
)
def test_config_errors_say_which_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PhantomConfig(**overrides)
    assert issubclass(ConfigError, ValueError)
