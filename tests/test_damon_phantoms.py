"""Longitudinal phantoms: patient pairs written in MIMIC-Diff-VQA's and DAMON's layouts, read back by the real
readers, with MIMIC-Diff-VQA's answer wording, and the data of DAMON's four fine-tuning stages."""

import hashlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmed_rag.damon.data import (
    DAMON_CONDITIONS,
    read_damon_annotations,
    read_damon_data_config,
    read_damon_eval,
    read_mimic_diff_vqa,
)
from mmed_rag.damon.diagnosis import condition_question, diagnosis_text
from mmed_rag.damon.metrics import parse_difference
from mmed_rag.damon.phantoms import (
    DAMON_DIFFERENCE_PROMPT,
    DAMON_INDEX,
    FINDING_NAMES,
    LEVELS,
    NO_FINDING,
    LongitudinalConfig,
    difference_answer,
    draw_pairs,
    image_path,
    make_longitudinal_phantoms,
    pair_questions,
)
from mmed_rag.damon.prompts import record_prompt
from mmed_rag.data.phantoms import Placement, render_phantom


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    config = LongitudinalConfig(out=str(tmp_path_factory.mktemp("long") / "pairs"), patients=30, size=32)
    return config, make_longitudinal_phantoms(config)


def test_the_answer_wording_of_mimic_diff_vqa():
    assert difference_answer(["pleural effusion"], []) == (
        "the main image has an additional finding of pleural effusion than the reference image. "
    )
    assert difference_answer(["a", "b", "c"], ["d", "e"]) == (
        "the main image has additional findings of a, b and c than the reference image. "
        "the main image is missing the findings of d and e than the reference image. "
    )
    assert difference_answer(["a"], ["a"]) == "nothing has changed."


def test_both_layouts_read_back_with_the_real_readers(written):
    config, out = written
    pairs = draw_pairs(config)
    read = read_mimic_diff_vqa(
        out / "mimic_pair_questions.csv", out / "mimic_all.csv", extension=".png", img_root=out / "images"
    )
    assert not read.problems and {r.subject_id for r in read.records} == {p.subject_id for p in pairs}
    kinds = Counter(r.question_type for r in read.records)
    assert kinds["difference"] == kinds["abnormality"] == kinds["view"] == 30 and kinds["presence"] >= 30
    for record in read.records:
        pair = next(p for p in pairs if p.subject_id == record.subject_id)
        assert record.images == (
            image_path(pair.subject_id, pair.current_study),
            image_path(pair.subject_id, pair.prior_study),
        )
    entries = read_damon_data_config(out / "damon/data_config.json")
    assert [e.name for e in entries] == ["two_image_train", "two_image_val", "two_image_test"]
    assert sum(len(read_damon_annotations(e).records) for e in entries) == 30
    test = read_damon_eval(out / "damon/mimicdiff_test.json", "difference", img_root=out / "images").records
    assert len(test) == sum(p.split == "test" for p in pairs) > 0
    for split in ("train", "val", "test"):
        file = out / f"damon/mimic_{split}_diagnosis.json"
        diagnosis = read_damon_eval(file, "diagnosis", img_root=out / "images").records
        expected = [
            tuple(sorted(DAMON_INDEX[f] for f in findings)) or (NO_FINDING,)
            for p in pairs
            if p.split == split
            for findings in (p.prior, p.current)
        ]
        assert [r.labels for r in diagnosis] == expected
        assert len(diagnosis) == 2 * sum(p.split == split for p in pairs) > 0


def test_a_patients_two_films_share_the_pose_but_differ(written):
    config, out = written
    pair = next(p for p in draw_pairs(config) if p.prior == p.current)  # an unchanged patient
    prior, current = (
        np.asarray(Image.open(out / "images" / image_path(pair.subject_id, study)), dtype=float)
        for study in (pair.prior_study, pair.current_study)
    )
    assert 0 < np.abs(prior - current).mean() < 12  # exposure and noise differ; anatomy does not
    other = next(p for p in draw_pairs(config) if p.subject_id != pair.subject_id)
    stranger = np.asarray(Image.open(out / "images" / image_path(other.subject_id, other.prior_study)), dtype=float)
    assert np.abs(prior - stranger).mean() > np.abs(prior - current).mean()


def test_the_same_config_gives_the_same_bytes(written, tmp_path):
    config, out = written
    again = make_longitudinal_phantoms(LongitudinalConfig(out=str(tmp_path / "again"), patients=30, size=32))

    def digest(root):
        return {
            p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert digest(out) == digest(again)


def test_each_of_damons_four_stages_has_a_data_config_per_split(written):
    config, out = written
    pairs = draw_pairs(config)
    csv_questions = read_mimic_diff_vqa(out / "mimic_pair_questions.csv", out / "mimic_all.csv", extension=".png")
    for split in ("train", "val", "test"):
        patients = [p for p in pairs if p.split == split]
        records = {}
        for stage in ("mca", "dca", "dsl", "dpm", "dsl_with_prior"):
            (entry,) = read_damon_data_config(out / f"damon/data_config_{stage}_{split}.json")
            assert entry.name == f"{stage}_{split}" and Path(entry.root).resolve() == (out / "images").resolve()
            records[stage] = read_damon_annotations(entry).records
            assert entry.length == len(records[stage])
            for record in records[stage]:
                assert all((Path(entry.root) / image).is_file() for image in record.images)
        films = [image_path(p.subject_id, study) for p in patients for study in (p.prior_study, p.current_study)]
        assert [r.images for r in records["mca"]] == [r.images for r in records["dca"]] == [[f] for f in films]
        assert all(len(r.conversations) == 12 for r in records["dca"])  # 4 presence, abnormality, view
        questions = [r for r in csv_questions.records if r.split == split]
        assert [(r.images, r.conversations[-1].value.strip()) for r in records["dsl"]] == [
            (list(q.images), q.answer) for q in questions
        ]  # main image first, then the reference; the answers of mimic_pair_questions.csv
        # The same questions with the two films' true diagnosis, placed as damon-eval places a prior.
        assert [r.conversations[-1].value for r in records["dsl_with_prior"]] == [
            r.conversations[-1].value for r in records["dsl"]
        ]
        for with_prior, question in zip(records["dsl_with_prior"], questions, strict=True):
            patient = next(p for p in patients if p.subject_id == question.subject_id)
            truth = [
                sorted(DAMON_INDEX[f] for f in films) or [NO_FINDING] for films in (patient.current, patient.prior)
            ]
            assert with_prior.conversations[0].value == record_prompt(
                question
                if question.question_type != "difference"
                else replace(question, question=DAMON_DIFFERENCE_PROMPT),
                diagnosis_text(truth),
            )
        diagnosis = read_damon_eval(out / f"damon/mimic_{split}_diagnosis.json", "diagnosis").records
        answers = {(r.images[0], r.conversations[0].value): r.conversations[1].value for r in records["dpm"]}
        assert len(answers) == 5 * len(films)
        for film in diagnosis:
            for index in (1, 3, 8, 9, NO_FINDING):  # the conditions the phantoms draw, and "no finding"
                asked = condition_question(DAMON_CONDITIONS[index])
                assert answers[(film.images[0], asked)] == ("1" if index in film.labels else "0")
    first = read_damon_annotations(read_damon_data_config(out / "damon/data_config_mca_train.json")[0]).records[0]
    assert first.conversations[0].value == "<image>\nDescribe the findings of this chest X-ray."
    assert first.conversations[1].value.startswith("A frontal chest X-ray")


def test_with_severity_findings_keep_their_side_and_change_level():
    config = LongitudinalConfig(out="unused", patients=60, size=32, severity=True)
    plain = draw_pairs(LongitudinalConfig(out="unused", patients=60, size=32))
    pairs = draw_pairs(config)
    assert [(p.prior, p.current, p.split) for p in pairs] == [(p.prior, p.current, p.split) for p in plain]
    changed = [p for p in pairs if p.level_changes()]
    assert changed, "some persisting finding grows or shrinks"
    for pair in pairs:
        assert set(dict(pair.sides)) == set(pair.prior) | set(pair.current)
        for _, before, after in pair.level_changes():
            assert abs(before - after) == 1
        questions = pair_questions(pair, np.random.default_rng(0))
        kinds = [kind for kind, _, _ in questions]
        assert kinds[:2] == ["difference", "presence"]  # the plain questions first, as without severity
        assert ("level" in kinds) == bool(pair.current)
        answer = dict((kind, a) for kind, _, a in questions)
        items = parse_difference(answer["difference"]).items
        expected = {("changed", FINDING_NAMES[name]) for name, _, _ in pair.level_changes()}
        assert {item for item in items if item[0] == "changed"} == expected
        for kind, question, reply in questions:
            name = next((n for n in FINDING_NAMES if FINDING_NAMES[n] in question), None)
            if kind == "location":
                assert reply == ("right side" if dict(pair.sides)[name] < 0 else "left side")
            if kind == "level":
                assert reply == LEVELS[dict(pair.current_levels)[name]]
    # Apart from the level changes in the difference answer, a pair's plain questions are those without severity.
    plain_pair = plain[pairs.index(changed[0])]
    with_severity = pair_questions(changed[0], np.random.default_rng(0))
    assert with_severity[1:4] == pair_questions(plain_pair, np.random.default_rng(0))[1:4]


@pytest.mark.parametrize("finding", ["effusion", "nodule", "cardiomegaly", "pneumothorax"])
def test_a_placed_finding_grows_with_its_level(finding):
    """Same patient, same draws: a severe finding changes more of the film than a mild one, on the side asked."""

    def film(placement):
        rng = np.random.default_rng(7)
        return np.asarray(render_phantom("radiology", [finding], 64, rng, placement), dtype=float)

    mild, severe = (film({finding: Placement(side=1, level=level)}) for level in (0, 2))
    if finding == "pneumothorax":  # more of the lung collapsed: more air without markings on its side, darker
        assert severe[:, 32:].mean() < mild[:, 32:].mean()
    else:  # fluid, nodule or heart: more of the film changed from a normal one
        normal = np.asarray(render_phantom("radiology", [], 64, np.random.default_rng(7)), dtype=float)
        assert np.abs(severe - normal).sum() > np.abs(mild - normal).sum()
    if finding != "cardiomegaly":
        left, right = film({finding: Placement(side=-1, level=2)}), film({finding: Placement(side=1, level=2)})
        assert not np.array_equal(left, right)
    with pytest.raises(ValueError, match="does not show"):
        render_phantom("radiology", [], 64, np.random.default_rng(0), {finding: Placement(side=1)})
