"""Longitudinal phantoms: a prior and a current chest film of one synthetic patient, with difference questions.

Each patient gets two studies drawn by :func:`mmed_rag.data.phantoms.render_phantom` from one generator seed, so the
two films share the patient's pose and build (the renderer draws them first), each then with its own exposure and
detector noise; the findings of the current study
follow the prior's with a chance to resolve each one and to acquire each absent one. Questions about a pair follow
MIMIC-Diff-VQA's types and answer wording (read from its generator, Holipori/MIMIC-Diff-VQA ``question_gen.py``):

- ``difference``: "what has changed compared to the reference image?" -> "the main image has an additional finding
  of X than the reference image. the main image is missing the finding of Y than the reference image." or
  "nothing has changed.";
- ``presence``: "is there X?" about the main image -> "yes" / "no" (half of them about an absent finding);
- ``abnormality``: "what abnormalities are seen in this image?" -> the main image's findings, or "no finding";
- ``view``: "which view is this image taken?" -> "PA view" (every phantom is a frontal film).

With ``severity`` each finding of a patient keeps its side on both films and has a level (mild, moderate, severe;
drawn to size by :class:`~mmed_rag.data.phantoms.Placement`) that a persisting finding may change by one: the
difference answers then add "the level of X has changed from A to B.", and each pair gets MIMIC-Diff-VQA's
``location`` ("is the X located on the left side or right side?" -> "left side", the patient's side) and ``level``
("what level is the X?" -> "moderate") questions. Without it (the default) a finding present on both films is
drawn afresh on each (its side may change), and the files are what they were before severity existed. There is no
``type`` question: the phantoms draw one kind of each finding.

Written twice, so both real loaders are exercised: in MIMIC-Diff-VQA's layout (``mimic_all.csv``,
``mimic_pair_questions.csv``, images in the MIMIC-CXR-JPG folder tree as PNG) and in DAMON's (InternVL-style JSONL
per split with a data config, and the evaluation files ``mimicdiff_test.json`` and ``mimic_test_diagnosis.json``, with
``mimic_train_diagnosis.json`` and ``mimic_val_diagnosis.json`` in its layout for training a finding classifier).
For DAMON's four fine-tuning stages (MCA, DCA, DSL, DPM; :mod:`mmed_rag.damon.stage_data`) each split also gets one
annotation file per stage, ``damon/{stage}_{split}.jsonl``, and a DAMON data config naming it,
``damon/data_config_{stage}_{split}.json`` (the images under ``../images/``): a caption per film, the single-image
questions per film, the pair's questions (those of ``mimic_pair_questions.csv``), and the condition questions per
film; and ``dsl_with_prior``, the pair's questions with the films' true diagnosis in the prompt. The same config
gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mmed_rag.atomic import atomic_write_text, publish_directory
from mmed_rag.config import ConfigError
from mmed_rag.damon import stage_data
from mmed_rag.damon.data import DAMON_CONDITIONS, listed
from mmed_rag.damon.diagnosis import diagnosis_text
from mmed_rag.data.phantoms import FINDINGS, Placement, render_phantom
from mmed_rag.outputs import claim_outputs

# The radiology phantom's findings as MIMIC-Diff-VQA names them, and their index in DAMON's condition list.
FINDING_NAMES = {
    "cardiomegaly": "cardiomegaly",
    "effusion": "pleural effusion",
    "pneumothorax": "pneumothorax",
    "nodule": "lung nodule",
}
DAMON_INDEX = {"cardiomegaly": 1, "effusion": 9, "pneumothorax": 8, "nodule": 3}
NO_FINDING = DAMON_CONDITIONS.index("no finding")
DIFFERENCE_QUESTION = "what has changed compared to the reference image?"
DAMON_DIFFERENCE_PROMPT = "What has changed between the main image<image>\n and the reference image<image>\n?"
SPLITS = ("train", "val", "test")
LEVELS = ("mild", "moderate", "severe")  # words of MIMIC-Diff-VQA's level library
# DPM asks about every condition the phantoms can draw, and "no finding".
DIAGNOSIS_ASKED = (*(DAMON_CONDITIONS[index] for index in DAMON_INDEX.values()), "no finding")


@dataclass
class LongitudinalConfig:
    """What :func:`make_longitudinal_phantoms` writes."""

    out: str = field(default="longitudinal", metadata={"help": "output directory"})
    patients: int = field(default=200, metadata={"help": "synthetic patients, two studies each"})
    size: int = field(default=64, metadata={"help": "image side in pixels"})
    seed: int = field(default=0, metadata={"help": "random seed; the same config gives byte-identical files"})
    finding_probability: float = field(default=0.3, metadata={"help": "chance of each finding on the prior film"})
    resolve_probability: float = field(default=0.35, metadata={"help": "chance that a prior finding is gone"})
    appear_probability: float = field(default=0.2, metadata={"help": "chance that an absent finding appears"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the patients in the val split"})
    test_fraction: float = field(default=0.2, metadata={"help": "share of the patients in the test split"})
    severity: bool = field(
        default=False,
        metadata={
            "help": "each finding keeps its side on both films and has a level (mild, moderate, severe) that may "
            "change between them: adds location and level questions and level changes to the difference answers"
        },
    )
    level_change_probability: float = field(
        default=0.4, metadata={"help": "with severity: chance that a persisting finding grows or shrinks a level"}
    )

    def __post_init__(self) -> None:
        if self.patients < 3 or self.size < 16:
            raise ConfigError("patients: at least 3 (one per split); size: at least 16 pixels")
        for name in ("finding_probability", "resolve_probability", "appear_probability", "level_change_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: expected a probability in [0, 1], got {getattr(self, name)}")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("val_fraction and test_fraction: each >= 0, together < 1")


@dataclass(frozen=True)
class PatientPair:
    """One synthetic patient: the findings of the prior (reference) and the current (main) study."""

    subject_id: str
    prior_study: str
    current_study: str
    prior: tuple[str, ...]
    current: tuple[str, ...]
    split: str
    # With severity: each finding's side (-1: the image's left, the patient's right; 1) and its level on each film
    # (0-2, LEVELS), as (finding, value) pairs; empty without.
    sides: tuple[tuple[str, int], ...] = ()
    prior_levels: tuple[tuple[str, int], ...] = ()
    current_levels: tuple[tuple[str, int], ...] = ()

    def placement(self, which: str) -> dict[str, Placement]:
        """The side and level of each finding on the ``"prior"`` or ``"current"`` film (empty without severity)."""
        sides, levels = dict(self.sides), dict(self.prior_levels if which == "prior" else self.current_levels)
        return {name: Placement(sides[name], level) for name, level in levels.items()}

    def level_changes(self) -> list[tuple[str, int, int]]:
        """(finding, prior level, current level) of each persisting finding whose level changed."""
        prior, current = dict(self.prior_levels), dict(self.current_levels)
        return [
            (name, prior[name], current[name]) for name in current if name in prior and prior[name] != current[name]
        ]


def difference_answer(
    current: Sequence[str], prior: Sequence[str], changes: Sequence[tuple[str, str, str]] = ()
) -> str:
    """MIMIC-Diff-VQA's difference answer for findings (their names) of the main and the reference study, and the
    level ``changes`` (name, reference level, main level) of findings on both."""
    added = [name for name in current if name not in prior]
    missing = [name for name in prior if name not in current]
    if not added and not missing and not changes:
        return "nothing has changed."
    parts = []
    for names, single, several in (
        (added, "the main image has an additional finding of", "the main image has additional findings of"),
        (missing, "the main image is missing the finding of", "the main image is missing the findings of"),
    ):
        if names:
            parts.append(f"{single if len(names) == 1 else several} {listed(names)} than the reference image. ")
    parts += [f"the level of {name} has changed from {before} to {after}. " for name, before, after in changes]
    return "".join(parts)


def draw_pairs(config: LongitudinalConfig) -> list[PatientPair]:
    """Every patient's prior and current findings and split (patients, not images, are split)."""
    rng = np.random.default_rng([config.seed, 1])
    names = FINDINGS["radiology"]
    order = rng.permutation(config.patients)
    n_test = max(1, round(config.test_fraction * config.patients))
    n_val = max(1, round(config.val_fraction * config.patients))
    split_of = {int(p): "test" for p in order[:n_test]} | {int(p): "val" for p in order[n_test : n_test + n_val]}
    pairs = []
    for patient in range(config.patients):
        prior = [name for name in names if rng.random() < config.finding_probability]
        current = [
            name
            for name in names
            if (
                rng.random() >= config.resolve_probability
                if name in prior
                else rng.random() < config.appear_probability
            )
        ]
        pairs.append(
            PatientPair(
                subject_id=str(10_000_000 + patient),
                prior_study=str(50_000_000 + 2 * patient),
                current_study=str(50_000_000 + 2 * patient + 1),
                prior=tuple(prior),
                current=tuple(current),
                split=split_of.get(patient, "train"),
                **(_severity(prior, current, config, patient) if config.severity else {}),
            )
        )
    return pairs


def _severity(prior: Sequence[str], current: Sequence[str], config: LongitudinalConfig, patient: int) -> dict:
    """Sides and levels of one patient's findings (its own random stream: the findings' draws stay as they are)."""
    rng = np.random.default_rng([config.seed, 5, patient])
    shown = [name for name in FINDINGS["radiology"] if name in prior or name in current]
    sides = {name: int(rng.choice([-1, 1])) for name in shown}
    before = {name: int(rng.integers(len(LEVELS))) for name in prior}
    after = {}
    for name in current:
        if name not in before:
            after[name] = int(rng.integers(len(LEVELS)))
        elif rng.random() < config.level_change_probability:  # one level up or down, within mild..severe
            step = int(rng.choice([-1, 1]))
            after[name] = before[name] + step if 0 <= before[name] + step < len(LEVELS) else before[name] - step
        else:
            after[name] = before[name]
    return {
        "sides": tuple(sides.items()),
        "prior_levels": tuple(before.items()),
        "current_levels": tuple(after.items()),
    }


def _indices(findings: Sequence[str]) -> list[int]:
    """A film's labels in DAMON's condition list ("no finding" for none)."""
    return sorted(DAMON_INDEX[name] for name in findings) or [NO_FINDING]


def _dicom(study: str) -> str:
    return f"{int(study):08x}-phantom"


def image_path(subject: str, study: str) -> str:
    """Where a study's image lies under the image root: MIMIC-CXR-JPG's tree (``files/p10/p1000.../s5.../x.png``)."""
    return f"files/p{subject[:2]}/p{subject}/s{study}/{_dicom(study)}.png"


def pair_questions(pair: PatientPair, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(question_type, question, answer)`` for one pair: difference, two presence, abnormality, view; with
    severity also location and level (MIMIC-Diff-VQA's wording) about one finding of the main image each."""
    current = [FINDING_NAMES[name] for name in pair.current]
    prior = [FINDING_NAMES[name] for name in pair.prior]
    changes = [(FINDING_NAMES[name], LEVELS[a], LEVELS[b]) for name, a, b in pair.level_changes()]
    questions = [("difference", DIFFERENCE_QUESTION, difference_answer(current, prior, changes))]
    present = list(pair.current)
    absent = [name for name in FINDINGS["radiology"] if name not in pair.current]
    for pool, answer in ((present, "yes"), (absent, "no")):
        if pool:
            name = pool[int(rng.integers(len(pool)))]
            questions.append(("presence", f"is there {FINDING_NAMES[name]}?", answer))
    questions.append(("abnormality", "what abnormalities are seen in this image?", ", ".join(current) or "no finding"))
    questions.append(("view", "which view is this image taken?", "PA view"))
    if pair.sides and pair.current:  # drawn after the others, so a pair's other questions are as without severity
        sided = [name for name in pair.current if name != "cardiomegaly"]  # the heart has no side
        if sided:
            name = sided[int(rng.integers(len(sided)))]
            side = "right" if dict(pair.sides)[name] < 0 else "left"  # the image's left is the patient's right
            question = f"is the {FINDING_NAMES[name]} located on the left side or right side?"
            questions.append(("location", question, f"{side} side"))
        name = pair.current[int(rng.integers(len(pair.current)))]
        level = LEVELS[dict(pair.current_levels)[name]]
        questions.append(("level", f"what level is the {FINDING_NAMES[name]}?", level))
    return questions


def _acquire(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One acquisition of a film: exposure (a gamma of 0.9-1.1) and detector noise (sd 3 grey levels)."""
    film = (np.asarray(image, dtype=np.float64) / 255.0) ** rng.uniform(0.9, 1.1)
    film = film * 255.0 + rng.normal(0.0, 3.0, film.shape)
    return Image.fromarray(np.clip(np.round(film), 0, 255).astype(np.uint8), mode="L")


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_annotations(damon_dir: Path, name: str, rows: list[dict]) -> dict[str, dict]:
    """``name``.jsonl in ``damon_dir``, and its entry in a DAMON data config (images in ``../images/``)."""
    atomic_write_text(damon_dir / f"{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return {
        name: {
            "root": "../images/",
            "annotation": f"{name}.jsonl",
            "data_augment": False,
            "repeat_time": 1,
            "length": len(rows),
        }
    }


def make_longitudinal_phantoms(config: LongitudinalConfig) -> Path:
    """Write the pairs, images and questions to ``config.out`` in both layouts (replaced whole); return it."""
    with claim_outputs("make-longitudinal-phantoms", replaced=[config.out]):
        return _make_longitudinal_phantoms(config)


def _make_longitudinal_phantoms(config: LongitudinalConfig) -> Path:
    out = Path(config.out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pairs = draw_pairs(config)
    mimic_all, questions, damon = [], [], {split: [] for split in SPLITS}
    damon_test, diagnosis = [], {split: [] for split in SPLITS}
    staged = {stage: {split: [] for split in SPLITS} for stage in (*stage_data.STAGES, stage_data.WITH_PRIOR)}
    drawable = [FINDING_NAMES[name] for name in FINDINGS["radiology"]]
    for number, pair in enumerate(pairs):
        patient_seed = np.random.SeedSequence([config.seed, 2, number])
        for order, (study, findings) in enumerate(((pair.prior_study, pair.prior), (pair.current_study, pair.current))):
            # One seed per patient for both films (the renderer draws the pose and build first), then the
            # study's own exposure and noise, so two films of an unchanged patient still differ.
            placement = pair.placement("prior" if order == 0 else "current")
            image = render_phantom("radiology", findings, config.size, np.random.default_rng(patient_seed), placement)
            image = _acquire(image, np.random.default_rng([config.seed, 4, number, order]))
            target = staging / "images" / image_path(pair.subject_id, study)
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, format="PNG")
            mimic_all.append(
                {
                    "subject_id": pair.subject_id,
                    "study_id": study,
                    "dicom_id": _dicom(study),
                    "view": "postero-anterior",
                    "split": pair.split,
                    "study_order": order + 1,
                }
            )
            indices = _indices(findings)
            film, names = image_path(pair.subject_id, study), [FINDING_NAMES[name] for name in findings]
            staged["mca"][pair.split].append(stage_data.caption(film, names))
            staged["dca"][pair.split].append(stage_data.single_image_questions(film, names, drawable))
            conditions = [DAMON_CONDITIONS[index] for index in indices]
            staged["dpm"][pair.split] += stage_data.condition_questions(film, conditions, DIAGNOSIS_ASKED)
            diagnosis[pair.split].append(
                {
                    "id": len(diagnosis[pair.split]),
                    "image": image_path(pair.subject_id, study),
                    "caption": ", ".join(map(str, indices)),
                }
            )
        images = [image_path(pair.subject_id, pair.current_study), image_path(pair.subject_id, pair.prior_study)]
        question_rng = np.random.default_rng([config.seed, 3, number])
        prior = diagnosis_text([_indices(pair.current), _indices(pair.prior)])
        for kind, question, answer in pair_questions(pair, question_rng):
            staged["dsl"][pair.split].append(
                stage_data.pair_question(images, kind, question, answer, DAMON_DIFFERENCE_PROMPT)
            )
            staged[stage_data.WITH_PRIOR][pair.split].append(
                stage_data.pair_question(images, kind, question, answer, DAMON_DIFFERENCE_PROMPT, prior)
            )
            questions.append(
                {
                    "study_id": pair.current_study,
                    "subject_id": pair.subject_id,
                    "ref_id": pair.prior_study,
                    "question_type": kind,
                    "question": question,
                    "answer": answer,
                    "split": pair.split,
                }
            )
            if kind != "difference":
                continue
            damon[pair.split].append(
                {
                    "id": len(damon[pair.split]),
                    "image": images,
                    "conversations": [
                        {"from": "human", "value": DAMON_DIFFERENCE_PROMPT},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
            if pair.split == "test":
                damon_test.append(
                    {"id": len(damon_test), "image": images, "prompt": DAMON_DIFFERENCE_PROMPT, "caption": answer}
                )
    atomic_write_text(staging / "mimic_all.csv", _csv_text(mimic_all))
    atomic_write_text(staging / "mimic_pair_questions.csv", _csv_text(questions))
    damon_dir = staging / "damon"
    config_entries = {}
    for split, rows in damon.items():
        config_entries |= _write_annotations(damon_dir, f"two_image_{split}", rows)
    atomic_write_text(damon_dir / "data_config.json", json.dumps(config_entries, indent=2) + "\n")
    for stage, splits in staged.items():
        for split, rows in splits.items():
            entry = _write_annotations(damon_dir, f"{stage}_{split}", [{"id": n, **row} for n, row in enumerate(rows)])
            atomic_write_text(damon_dir / f"data_config_{stage}_{split}.json", json.dumps(entry, indent=2) + "\n")
    atomic_write_text(damon_dir / "mimicdiff_test.json", json.dumps(damon_test))
    for split, rows in diagnosis.items():  # DAMON ships the test one; train and val train the finding classifier
        atomic_write_text(damon_dir / f"mimic_{split}_diagnosis.json", json.dumps(rows))
    publish_directory(staging, out)
    return out
