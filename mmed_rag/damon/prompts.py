"""The human turn of a multi-image question: each image in its role, the preliminary diagnosis, the question.

DAMON's prompts name the roles inline ("What has changed between the main image<image>\\n and the reference
image<image>\\n?"); its evaluation files carry such prompts, and :func:`record_prompt` keeps them as they are. A
question without markers (MIMIC-Diff-VQA's CSV) gets one line per image, "The main image: <image>", in role order.
The preliminary diagnosis (:func:`mmed_rag.damon.diagnosis.diagnosis_text`) goes before the question, or is left
out (``diagnosis=None``) to measure what it adds. The wording is ours.
"""

from __future__ import annotations

from mmed_rag.damon.data import ROLES, MultiImageRecord
from mmed_rag.data.records import IMAGE_TOKEN


def multi_image_prompt(question: str, images: int, diagnosis: str | None = None) -> str:
    """One line per image ("The main image: <image>", ...), the diagnosis when given, then the question."""
    if not 1 <= images <= len(ROLES):
        raise ValueError(f"1 to {len(ROLES)} images, got {images}")
    if IMAGE_TOKEN in question:
        raise ValueError(f"the question already holds {IMAGE_TOKEN} markers: use it as the prompt")
    lines = [f"The {role.replace('-', ' ')} image: {IMAGE_TOKEN}" for role in ROLES[:images]]
    if diagnosis:
        lines.append(f"Preliminary diagnosis: {diagnosis}")
    lines.append(f"Question: {question.strip()}")
    return "\n".join(lines)


def record_prompt(record: MultiImageRecord, diagnosis: str | None = None) -> str:
    """The prompt of a record: its own when it places the markers (DAMON's files), else :func:`multi_image_prompt`.

    A record's own prompt must hold one marker per image; the diagnosis goes before it.
    """
    markers = record.question.count(IMAGE_TOKEN)
    if markers == 0:
        return multi_image_prompt(record.question, len(record.images), diagnosis)
    if markers != len(record.images):
        raise ValueError(f"{record.where}: {markers} {IMAGE_TOKEN} markers for {len(record.images)} image(s)")
    return f"Preliminary diagnosis: {diagnosis}\n{record.question}" if diagnosis else record.question
