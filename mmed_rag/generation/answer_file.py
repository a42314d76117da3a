"""``generate``'s answers in the MMed-RAG authors' answer-file layout, for tools written against their files.

Their inference scripts (``inference/llava-med-1.5_{closed-vqa,report}_parellel.py``, deleted from their
repository; read at commit f2023ea) wrote one JSON line per question: ``question_id``, ``image``, ``prompt`` (the
human turn without the ``<image>`` marker), ``answer`` (the model's text), ``gt_answer`` (VQA) and ``gt_report``
(reports, and VQA records that carry one), ``reference_report`` (the retrieved reports, only when there were some),
``noised_image`` (1 or 0), ``answer_id`` (a random uuid), ``model_id`` (the model folder's name) and
``metadata``. The random ``answer_id`` is left out: nothing reads it, and it would make two runs differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mmed_rag.data.records import IMAGE_TOKEN


def authors_answer_line(line: dict, task: str, model_id: str, noised: bool) -> dict:
    """One ``generate`` output line (a test record plus ``prompt``, ``prediction``, ``reference_reports``) in
    the authors' layout; ``task`` is "vqa" or "report"."""
    image = line.get("image", line.get("image_path"))
    answer = {
        "question_id": line.get("question_id", line.get("id")),
        "image": image[0] if isinstance(image, list) else image,
        "prompt": line["prompt"].replace(IMAGE_TOKEN, "").strip(),
        "answer": line["prediction"],
    }
    if task == "vqa":
        answer["gt_answer"] = line["answer"]
    if "report" in line:
        answer["gt_report"] = line["report"]
    if line.get("reference_reports"):
        answer["reference_report"] = line["reference_reports"]
    return {**answer, "noised_image": 1 if noised else 0, "model_id": model_id, "metadata": {}}


def authors_answer_lines(lines: Iterable[dict], model: str, noised: bool) -> list[dict]:
    """Every line of a finished ``generate`` output, in input order (a line with a question is VQA)."""
    model_id = Path(model).name
    return [authors_answer_line(line, "vqa" if "question" in line else "report", model_id, noised) for line in lines]
