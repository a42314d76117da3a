"""The conversations of DAMON's four fine-tuning stages, for films whose findings are known (the phantoms).

DAMON fine-tunes InternVL2 in four stages (``model/shell/internvl2.0/2nd_finetune``), each on its own data config:

- **MCA**, medical concept alignment: image-caption and VQA data sets (MedICaT, ROCO, PMC-VQA, ...): here one film
  and a short caption of its findings;
- **DCA**, domain concept alignment: MIMIC-CXR report generation and single-image questions: here one film and
  MIMIC-Diff-VQA's single-image questions (presence of each finding, abnormality, view) in one conversation;
- **DSL**, difference semantic learning: questions about two to four films of one patient: here the pair's
  questions of every type, the main image first, then the reference;
- **DPM**, diagnosis prompting: one binary question per condition ("If X is present, output 1; otherwise,
  output 0."): here for every condition the phantoms can draw, and "no finding".

Beside them, ``dsl_with_prior``: DSL's questions with the films' true preliminary diagnosis in the prompt, for a
model that is to be evaluated with a diagnosis in its prompt (DAMON's glue for that was not released).

Every function returns ``{"image": ..., "conversations": [...]}`` in the InternVL / LLaVA layout (``id`` is the
writer's). DAMON's stage data was not released; the wording of the captions and of the single-image conversations
is ours, the questions and answers follow MIMIC-Diff-VQA's generator, and the difference question is DAMON's prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmed_rag.damon.data import MultiImageRecord, listed
from mmed_rag.damon.diagnosis import condition_question
from mmed_rag.damon.prompts import record_prompt
from mmed_rag.data.records import IMAGE_TOKEN

STAGES = ("mca", "dca", "dsl", "dpm")
WITH_PRIOR = "dsl_with_prior"  # DSL's questions with the films' true diagnosis in the prompt (not a DAMON stage)
CAPTION_PROMPT = f"{IMAGE_TOKEN}\nDescribe the findings of this chest X-ray."
ABNORMALITY_QUESTION = "what abnormalities are seen in this image?"
VIEW_QUESTION = "which view is this image taken?"


def _turns(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [turn for human, gpt in pairs for turn in ({"from": "human", "value": human}, {"from": "gpt", "value": gpt})]


def caption(image: str, findings: Sequence[str]) -> dict:
    """MCA: the film and a one-sentence caption of its findings."""
    text = (
        f"A frontal chest X-ray showing {listed(findings)}." if findings else "A frontal chest X-ray with no finding."
    )
    return {"image": image, "conversations": _turns([(CAPTION_PROMPT, text)])}


def single_image_questions(image: str, findings: Sequence[str], drawable: Sequence[str]) -> dict:
    """DCA: "is there X?" for each finding the phantoms can draw, then the abnormalities and the view."""
    questions = [(f"is there {name}?", "yes" if name in findings else "no") for name in drawable]
    questions += [(ABNORMALITY_QUESTION, ", ".join(findings) or "no finding"), (VIEW_QUESTION, "PA view")]
    questions[0] = (f"{IMAGE_TOKEN}\n{questions[0][0]}", questions[0][1])
    return {"image": image, "conversations": _turns(questions)}


def pair_question(
    images: Sequence[str], kind: str, question: str, answer: str, difference_prompt: str, diagnosis: str | None = None
) -> dict:
    """DSL: one question about the main and the reference film; the difference question in DAMON's own prompt.

    With ``diagnosis`` (the films' preliminary diagnosis) the prompt carries it as ``damon-eval`` places it, so a
    model can learn to use one (``dsl_with_prior``).
    """
    record = MultiImageRecord(0, tuple(images), difference_prompt if kind == "difference" else question, answer)
    return {"image": list(images), "conversations": _turns([(record_prompt(record, diagnosis), answer)])}


def condition_questions(image: str, present: Sequence[str], asked: Sequence[str]) -> list[dict]:
    """DPM: one record per condition in ``asked``, answered "1" when it is in ``present``, else "0"."""
    return [
        {"image": image, "conversations": _turns([(condition_question(name), "1" if name in present else "0")])}
        for name in asked
    ]
