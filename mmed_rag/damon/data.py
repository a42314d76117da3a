"""Multi-image questions (a current "main" study and prior "reference" ones) and DAMON's data files.

A :class:`MultiImageRecord` is one question about several images of one patient, the images in a fixed role order
(``main`` first, then ``reference``, then further priors, up to four as in DAMON's stage 3). Readers, each with the
error discipline of :mod:`mmed_rag.data.records` (file, line or record, field; ``on_error="skip"`` reports a bad
record and reads on):

- :func:`read_mimic_diff_vqa`: MIMIC-Diff-VQA's ``mimic_pair_questions.csv`` (``study_id, subject_id, ref_id,
  question_type, question, answer, split``), each study resolved to its image through ``mimic_all.csv``
  (``subject_id, study_id, dicom_id, view, split, ...``: the frontal image the dataset's generator chose), in the
  MIMIC-CXR-JPG tree (``files/p10/p10000032/s50414267/<dicom_id>.jpg``) or flat (``<dicom_id>.png``, as DAMON's
  PNG copy).
- :func:`read_damon_data_config`: DAMON's training data config (per dataset: ``root``, ``annotation``,
  ``data_augment``, ``max_dynamic_patch``, ``repeat_time``, ``length``), unchanged; its annotations are
  InternVL-style JSON Lines (``image`` a list, one ``<image>`` per image in the human turn), read as
  :class:`~mmed_rag.data.records.ConversationRecord` (:func:`read_damon_annotations`).
- :func:`read_damon_eval`: DAMON's evaluation files: difference captions (``id``, ``image`` list, ``prompt``,
  ``caption``), diagnosis (``caption`` = comma-separated indices into :data:`DAMON_CONDITIONS`), and SLAKE /
  VQA-RAD (``prompt``, ``type`` OPEN or CLOSED, ``caption``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmed_rag.data.images import resolve_image_path
from mmed_rag.data.records import IMAGE_TOKEN, RecordError, read_conversations
from mmed_rag.errors import MMedRAGError, relative_base

ROLES = ("main", "reference", "prior-2", "prior-3")  # the order images take in a prompt; at most four
QUESTION_TYPES = ("difference", "presence", "abnormality", "view", "location", "level", "type")
# DAMON's 13 conditions, by index (their diagnosis stage and mimic_test_diagnosis.json): CheXpert's observations
# less "support devices", in their order and wording.
DAMON_CONDITIONS = (
    "enlarged cardiomediastinum",
    "cardiomegaly",
    "lung opacity",
    "lung lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural effusion",
    "pleural other",
    "fracture",
    "no finding",
)
ImageLayout = Literal["tree", "flat"]
EvalLayout = Literal["difference", "diagnosis", "vqa"]


def listed(names: Sequence[str]) -> str:
    """Findings as the answers and prompts name them: "a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class DamonDataError(MMedRAGError, ValueError):
    """A DAMON data file or config that cannot be read as it is; the message names the file and the entry."""


@dataclass(frozen=True)
class MultiImageRecord:
    """One question about several images of one patient, ``images[i]`` playing ``ROLES[i]``."""

    id: str | int
    images: tuple[str, ...]
    question: str
    answer: str
    question_type: str | None = None
    split: str | None = None
    subject_id: str | None = None
    labels: tuple[int, ...] | None = None  # diagnosis: indices into the label set
    closed: bool | None = None  # SLAKE / VQA-RAD: a CLOSED (yes/no, choice) question
    where: str = field(default="", compare=False)

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES[: len(self.images)]


@dataclass
class MultiImageSet:
    records: list[MultiImageRecord]
    problems: list[str] = field(default_factory=list)


def _collect(on_error: str):
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    problems: list[str] = []

    def fail(error: RecordError) -> None:
        if on_error == "raise":
            raise DamonDataError(str(error)) from None
        problems.append(str(error))

    return problems, fail


def _check_images(
    images: Sequence[str], path: Path, position: str, field_name: str, img_root: str | os.PathLike | None = None
) -> RecordError | None:
    """A problem with a record's images: too many or none, one image in two roles, or (given ``img_root``) one
    that is not there."""
    if not 1 <= len(images) <= len(ROLES):
        return RecordError(path, position, field_name, f"expected 1 to {len(ROLES)} images, got {len(images)}")
    repeated = sorted({image for image in images if images.count(image) > 1})
    if repeated:
        return RecordError(
            path, position, field_name, f"the same image in two roles ({', '.join(repeated)}): a pair needs two studies"
        )
    if img_root is not None:
        for role, image in zip(ROLES, images, strict=False):
            try:
                resolved = resolve_image_path(img_root, image)
            except ValueError as error:
                return RecordError(path, position, field_name, f"{role} image: {error}")
            if not resolved.is_file():
                return RecordError(path, position, field_name, f"{role} image {image} is not in {img_root}")
    return None


# -- MIMIC-Diff-VQA ------------------------------------------------------------------------------------------------

PAIR_COLUMNS = ("study_id", "subject_id", "ref_id", "question_type", "question", "answer")


def _unreadable(path: Path, error: OSError) -> DamonDataError:
    return DamonDataError(f"{path}: cannot read the file: {error.strerror or error}{relative_base(path)}")


def _load_json(path: Path):
    """A whole JSON file (DAMON's configs and evaluation files are single documents), errors naming file and line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise _unreadable(path, error) from None
    except json.JSONDecodeError as error:
        raise DamonDataError(f"{path}: line {error.lineno}: invalid JSON: {error.msg}") from None


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or ()
            missing = [name for name in required if name not in columns]
            if missing:
                raise DamonDataError(
                    f"{path}: line 1: missing column(s) {', '.join(missing)} (has: {', '.join(columns)})"
                )
            return list(reader)
    except OSError as error:
        raise _unreadable(path, error) from None


def _study_images(mimic_all: Path, layout: ImageLayout, extension: str) -> dict[str, str]:
    """Each study's image path (relative to the image root) from ``mimic_all.csv``."""
    images = {}
    for number, row in enumerate(_read_csv(mimic_all, ("subject_id", "study_id", "dicom_id")), start=2):
        study, subject, dicom = (str(row[name]).strip() for name in ("study_id", "subject_id", "dicom_id"))
        if not (study and subject and dicom):
            raise DamonDataError(f"{mimic_all}: line {number}: empty study_id, subject_id or dicom_id")
        study, subject = _integer_id(study), _integer_id(subject)
        if layout == "tree":
            images[study] = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}{extension}"
        else:
            images[study] = f"{dicom}{extension}"
    return images


def _integer_id(value: str) -> str:
    """An id as MIMIC writes it in paths: "50414267" (pandas may have written "50414267.0")."""
    return value[:-2] if value.endswith(".0") else value


def read_mimic_diff_vqa(
    questions: str | os.PathLike,
    mimic_all: str | os.PathLike,
    *,
    layout: ImageLayout = "tree",
    extension: str = ".jpg",
    split: str | None = None,
    img_root: str | os.PathLike | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> MultiImageSet:
    """Every question of ``mimic_pair_questions.csv`` (of one ``split`` when given) as a main/reference pair.

    ``layout="tree"``: images in the MIMIC-CXR-JPG folder tree; ``"flat"``: ``<dicom_id><extension>`` in one folder.
    With ``img_root``, every image must be there (inside it).
    """
    questions, mimic_all = Path(questions), Path(mimic_all)
    problems, fail = _collect(on_error)
    study_image = _study_images(mimic_all, layout, extension)
    records = []
    for number, row in enumerate(_read_csv(questions, PAIR_COLUMNS), start=2):
        position = f"line {number}"
        if split is not None and row.get("split") != split:
            continue
        kind = row["question_type"].strip()
        if kind not in QUESTION_TYPES:
            fail(
                RecordError(
                    questions, position, "question_type", f"unknown {kind!r}; known: {', '.join(QUESTION_TYPES)}"
                )
            )
            continue
        studies = [_integer_id(row["study_id"].strip()), _integer_id(row["ref_id"].strip())]
        unknown = [study for study in studies if study not in study_image]
        if unknown:
            name = "study_id" if unknown[0] == studies[0] else "ref_id"
            fail(RecordError(questions, position, name, f"study {unknown[0]} is not in {mimic_all}"))
            continue
        images = [study_image[study] for study in studies]
        problem = _check_images(images, questions, position, "ref_id", img_root)
        if problem is not None:
            fail(problem)
            continue
        if not row["question"].strip() or not row["answer"].strip():
            fail(RecordError(questions, position, "question" if not row["question"].strip() else "answer", "empty"))
            continue
        records.append(
            MultiImageRecord(
                id=row.get("id") or f"{studies[0]}-{studies[1]}-{number}",
                images=tuple(images),
                question=row["question"].strip(),
                answer=row["answer"].strip(),
                question_type=kind,
                split=row.get("split") or None,
                subject_id=_integer_id(row["subject_id"].strip()),
                where=f"{questions}, {position}",
            )
        )
    return MultiImageSet(records, problems)


# -- DAMON's training data config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DamonDataEntry:
    """One dataset of a DAMON data config: its annotation JSONL, image root and how often it is repeated."""

    name: str
    root: str
    annotation: str
    repeat_time: float = 1.0
    length: int | None = None
    data_augment: bool = False
    max_dynamic_patch: int | None = None


def read_damon_data_config(path: str | os.PathLike, *, check_files: bool = True) -> list[DamonDataEntry]:
    """The datasets of a DAMON data config (``model/shell/data/*.json``), in file order.

    Relative ``root`` and ``annotation`` paths are read from the config's own folder. With ``check_files``, an
    annotation that is not there is an error naming the entry.
    """
    path = Path(path)
    raw = _load_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DamonDataError(f"{path}: expected an object of datasets (name: {{root, annotation, ...}})")
    entries = []
    for name, values in raw.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(values, dict):
            raise DamonDataError(f"{where}: expected an object, got {type(values).__name__}")
        missing = [key for key in ("root", "annotation") if not isinstance(values.get(key), str) or not values[key]]
        if missing:
            raise DamonDataError(f"{where}: field '{missing[0]}': missing (a path)")
        unknown = sorted(
            set(values) - {"root", "annotation", "repeat_time", "length", "data_augment", "max_dynamic_patch"}
        )
        if unknown:
            raise DamonDataError(f"{where}: unknown field(s) {', '.join(unknown)}")
        root, annotation = (str(path.parent / values[key]) for key in ("root", "annotation"))
        if check_files and not Path(annotation).is_file():
            raise DamonDataError(f"{where}: field 'annotation': {annotation} does not exist")
        repeat = values.get("repeat_time", 1)
        if not isinstance(repeat, int | float) or isinstance(repeat, bool) or repeat <= 0:
            raise DamonDataError(f"{where}: field 'repeat_time': expected a positive number, got {repeat!r}")
        entries.append(
            DamonDataEntry(
                name=name,
                root=root,
                annotation=annotation,
                repeat_time=float(repeat),
                length=values.get("length"),
                data_augment=bool(values.get("data_augment", False)),
                max_dynamic_patch=values.get("max_dynamic_patch"),
            )
        )
    return entries


def read_damon_annotations(entry: DamonDataEntry, *, on_error: Literal["raise", "skip"] = "raise"):
    """The conversations of one data-config entry: one ``<image>`` per image, at most four images each."""
    result = read_conversations(entry.annotation, on_error=on_error)
    for record, position in zip(result.records, result.positions, strict=True):
        problem = _check_images(record.images, Path(entry.annotation), position, "image")
        if problem is not None:
            raise DamonDataError(str(problem))
    return result


# -- DAMON's evaluation files --------------------------------------------------------------------------------------


def _labels(caption: str, labels: Sequence[str]) -> tuple[int, ...]:
    indices = []
    for part in caption.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 <= int(part) < len(labels):
            raise ValueError(f"{part!r} is not a label index (0 to {len(labels) - 1})")
        indices.append(int(part))
    return tuple(sorted(set(indices)))


def read_damon_eval(
    path: str | os.PathLike,
    layout: EvalLayout,
    *,
    labels: Sequence[str] = DAMON_CONDITIONS,
    img_root: str | os.PathLike | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> MultiImageSet:
    """A DAMON evaluation file: ``difference`` (mimicdiff_test.json), ``diagnosis`` (mimic_test_diagnosis.json:
    ``caption`` holds label indices into ``labels``) or ``vqa`` (SLAKE / VQA-RAD: ``type`` OPEN or CLOSED)."""
    path = Path(path)
    problems, fail = _collect(on_error)
    items = _load_json(path)
    if not isinstance(items, list):
        raise DamonDataError(f"{path}: expected a JSON list of records")
    records = []
    for index, raw in enumerate(items):
        position = f"record {index}"
        if not isinstance(raw, dict):
            fail(RecordError(path, position, None, "expected a JSON object"))
            continue
        missing = [name for name in ("id", "image", "caption") if name not in raw]
        if layout != "diagnosis" and "prompt" not in raw:
            missing.append("prompt")
        if missing:
            fail(RecordError(path, position, missing[0], "missing (required)"))
            continue
        images = raw["image"] if isinstance(raw["image"], list) else [raw["image"]]
        if not all(isinstance(image, str) and image for image in images):
            fail(RecordError(path, position, "image", f"expected image paths, got {raw['image']!r}"))
            continue
        problem = _check_images(images, path, position, "image", img_root)
        if problem is not None:
            fail(problem)
            continue
        prompt = str(raw.get("prompt", ""))
        markers = prompt.count(IMAGE_TOKEN)
        if layout != "diagnosis" and markers > len(images):
            fail(
                RecordError(
                    path,
                    position,
                    "prompt",
                    f"{markers} {IMAGE_TOKEN} markers for {len(images)} image(s): one per image",
                )
            )
            continue
        caption = str(raw["caption"])
        record = {
            "id": raw["id"],
            "images": tuple(images),
            "question": prompt,
            "answer": caption,
            "where": f"{path}, {position}",
        }
        if layout == "diagnosis":
            try:
                record["labels"] = _labels(caption, labels)
            except ValueError as error:
                fail(RecordError(path, position, "caption", str(error)))
                continue
        elif layout == "vqa":
            kind = str(raw.get("type", "")).upper()
            if kind not in ("OPEN", "CLOSED"):
                fail(RecordError(path, position, "type", f"expected OPEN or CLOSED, got {raw.get('type')!r}"))
                continue
            record["closed"] = kind == "CLOSED"
        elif layout != "difference":
            raise ValueError(f"layout must be difference, diagnosis or vqa, got {layout!r}")
        records.append(MultiImageRecord(**record))
    return MultiImageSet(records, problems)
