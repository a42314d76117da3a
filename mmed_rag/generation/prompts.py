"""MMed-RAG's prompts, built and parsed as pure functions: the human turn for one task, modality and reports.

The templates below reproduce the released RAG-PT preference files character for character (every human turn of
``radiology_report.json``, ``harvard_vqa.json`` and the original repository's ``harvard_report.json``), and the
``text`` field of the IU-Xray VQA test set. With ``image_token=True`` (the default) the string carries LLaVA's
``<image>`` marker where the release puts it; with ``False`` it is the bare text.

==========================  ===================================================================  ==============
form                        human turn (``{refs}`` = numbered reports, see below)                 source
==========================  ===================================================================  ==============
report, with reports        ``<image>\\n`` You are a professional {specialist}. You are provided  released
                            with {image} and {k} reference report(s): {refs}\\nPlease generate a
                            report based on the image. {CAUTION} {REPORT_ONLY}
report, no reports          ``<image>\\n`` You are a professional {specialist}. You are provided  ours
                            with {image}. Please generate a report based on the image.
                            {REPORT_ONLY}
VQA, with reports           ``<image>\\n`` You are provided with {image}, a image-related         released
                            question and {k} reference report(s): {refs}\\nPlease answer the
                            question based on the image and report and choose from the following
                            two options: [yes, no]. {CAUTION} Question: {question}
VQA, no reports             {question} Please choose from the following two options: [yes, no]   IU-Xray test
                            ``\\n<image>`` (the marker last, as in the test set)                  ``text``
==========================  ===================================================================  ==============

``{refs}`` numbers each report and ends each with one space: ``1. A 2. B 3. C `` (then ``\\n``). Reports are
inserted as given, not stripped: 50 of the ophthalmology VQA prompts carry a report ending in ``\\n`` (``...\\n
\\nPlease``). The radiology report file numbers its MIMIC-CXR records ``No.1: `` instead (412 of its 701 pairs;
IU-Xray's 289 use ``1. ``); pass ``numbering="No.1:"`` for that style. Every released prompt carries exactly one
report, so the several-report layout follows the authors' evaluation code (``f"{i + 1}. {report} "``
concatenated), and ``No.2: `` onwards is our extension of the MIMIC style.

Modality wording is data (:data:`MODALITIES`): radiology ("an X-ray image", radiologist) and ophthalmology ("a
fundus image", ophthalmologist) are attested by the released files; pathology ("a pathology image",
pathologist) is ours by analogy, since the original ``pathology_vqa.json`` is not stored in its repository.
:func:`register_modality` adds another one without code changes.

The no-report report prompt is ours: the release has none, so it drops the reference clause and the caution
sentence. The no-report VQA prompt names no modality, so :func:`parse_prompt` gives ``modality=None`` for it.

LLaVA's training code moves the ``<image>`` marker to the front of the turn anyway; its position matters only for
reproducing the files exactly.

``style="authors"`` gives the two no-report forms the authors' inference scripts used (their deleted
``inference/llava-med-1.5_{closed-vqa,report}_parellel.py``, read at commit f2023ea), so a run can match their
answer files; the forms with reports are the same in both styles:

==========================  ===================================================================================
form                        human turn, ``style="authors"``
==========================  ===================================================================================
VQA, no reports             ``<image>\n`` {question} Please answer the question based on the image and choose
                            from the following two options: [yes, no].
report, no reports          ``<image>\n`` You are a professional {specialist}. Please generate a report based
                            on the {image, without its article} and only include the content of the report in
                            your response.
==========================  ===================================================================================

:func:`parse_prompt` reads the ``mmed-rag`` style only.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from mmed_rag.data.records import IMAGE_TOKEN
from mmed_rag.errors import MMedRAGError

Task = Literal["vqa", "report"]
TASKS: tuple[str, ...] = ("vqa", "report")

CAUTION = (
    "It should be noted that the diagnostic information in the reference reports cannot be directly used as the "
    "basis for diagnosis, but should only be used for reference and comparison."
)
REPORT_ONLY = "Please only include the content of the report in your response."
YES_NO = "choose from the following two options: [yes, no]"

REPORT_WITH_REPORTS = (
    "You are a professional {specialist}. You are provided with {image} and {k} reference report(s): {references}"
    "\nPlease generate a report based on the image. " + CAUTION + " " + REPORT_ONLY
)
REPORT_WITHOUT_REPORTS = (
    "You are a professional {specialist}. You are provided with {image}. Please generate a report based on the "
    "image. " + REPORT_ONLY
)
VQA_WITH_REPORTS = (
    "You are provided with {image}, a image-related question and {k} reference report(s): {references}"
    "\nPlease answer the question based on the image and report and " + YES_NO + ". " + CAUTION + " Question: "
    "{question}"
)
VQA_WITHOUT_REPORTS = "{question} Please " + YES_NO
AUTHORS_VQA_WITHOUT_REPORTS = "{question} Please answer the question based on the image and " + YES_NO + "."
AUTHORS_REPORT_WITHOUT_REPORTS = (
    "You are a professional {specialist}. Please generate a report based on the {image} and only include the "
    "content of the report in your response."
)
PromptStyle = Literal["mmed-rag", "authors"]
PROMPT_STYLES: tuple[str, ...] = ("mmed-rag", "authors")

# How the i-th reference report (1-based) is labelled; each report is followed by one space.
NUMBERINGS: dict[str, str] = {"1.": "{i}. ", "No.1:": "No.{i}: "}


class UnknownModalityError(MMedRAGError, ValueError):
    """A modality name with no registered wording."""


class PromptParseError(MMedRAGError, ValueError):
    """A human turn that none of MMed-RAG's prompt forms (with the registered modalities) produces."""


@dataclass(frozen=True)
class ModalityWording:
    """How a prompt names one modality's images and who writes its reports."""

    image: str  # with its article, as the prompt says it: "an X-ray image"
    specialist: str  # "You are a professional {specialist}." in report prompts


MODALITIES: dict[str, ModalityWording] = {
    "radiology": ModalityWording("an X-ray image", "radiologist"),  # radiology_report.json
    "ophthalmology": ModalityWording("a fundus image", "ophthalmologist"),  # harvard_vqa.json, harvard_report.json
    "pathology": ModalityWording("a pathology image", "pathologist"),  # ours: no released pathology prompt
}


def register_modality(name: str, image: str, specialist: str) -> None:
    """Add a modality's wording, e.g. ``register_modality("dermatology", "a skin image", "dermatologist")``.

    Registering the same wording twice is a no-op. A name already registered with other wording, or an image
    phrase another modality uses (:func:`parse_prompt` could not tell them apart), raises ``ValueError``.
    """
    wording = ModalityWording(image, specialist)
    if name in MODALITIES and MODALITIES[name] != wording:
        raise ValueError(f"modality {name!r} is already registered as {MODALITIES[name]}")
    for other, known in MODALITIES.items():
        if other != name and known.image == image:
            raise ValueError(f"image phrase {image!r} is already used by modality {other!r}")
    MODALITIES[name] = wording


def modality_wording(modality: str) -> ModalityWording:
    """The registered wording of ``modality``; an unknown name raises :class:`UnknownModalityError`."""
    if modality not in MODALITIES:
        raise UnknownModalityError(
            f"unknown modality {modality!r}; known: {', '.join(sorted(MODALITIES))} "
            "(add one with mmed_rag.generation.prompts.register_modality)"
        )
    return MODALITIES[modality]


def clean_question(question: str) -> str:
    """The question without LLaVA's ``<image>`` marker: every marker removed, then surrounding whitespace stripped.

    The VQA test sets write ``"Is there ...? \\n<image>"``; this gives ``"Is there ...?"``, as the original
    evaluation code does (``question.replace("<image>", "").strip()``).
    """
    return question.replace(IMAGE_TOKEN, "").strip()


def format_references(reports: Sequence[str], numbering: str = "1.") -> str:
    """``1. A 2. B `` for ``["A", "B"]``: each report labelled and followed by one space, not stripped."""
    _check_reports(reports)
    label = _numbering(numbering)
    return "".join(label.format(i=i) + report + " " for i, report in enumerate(reports, 1))


def report_prompt(
    modality: str,
    reports: Sequence[str],
    *,
    image_token: bool = True,
    numbering: str = "1.",
    style: PromptStyle = "mmed-rag",
) -> str:
    """The report-generation human turn; no reports gives our no-retrieval variant (or the authors', by ``style``)."""
    wording = modality_wording(modality)
    if not reports and style == "authors":
        _check_reports(reports)
        image = wording.image.split(" ", 1)[1]  # "a fundus image" -> "fundus image": "based on the fundus image"
        text = AUTHORS_REPORT_WITHOUT_REPORTS.format(specialist=wording.specialist, image=image)
        return IMAGE_TOKEN + "\n" + text if image_token else text
    if reports:
        text = REPORT_WITH_REPORTS.format(
            specialist=wording.specialist,
            image=wording.image,
            k=len(reports),
            references=format_references(reports, numbering),
        )
    else:
        _check_reports(reports)
        text = REPORT_WITHOUT_REPORTS.format(specialist=wording.specialist, image=wording.image)
    return IMAGE_TOKEN + "\n" + text if image_token else text


def vqa_prompt(
    modality: str | None,
    question: str,
    reports: Sequence[str],
    *,
    image_token: bool = True,
    numbering: str = "1.",
    style: PromptStyle = "mmed-rag",
) -> str:
    """The yes/no VQA human turn; the question is cleaned with :func:`clean_question` first.

    Without reports this is the IU-Xray test set's ``text`` form (``style="authors"``: their inference script's
    form, the marker first), which names no modality: ``modality`` may then be ``None`` (a given one is still
    checked).
    """
    question = clean_question(question)
    if reports:
        wording = modality_wording(_required(modality, "a VQA prompt with reports"))
        text = VQA_WITH_REPORTS.format(
            image=wording.image,
            k=len(reports),
            references=format_references(reports, numbering),
            question=question,
        )
        return IMAGE_TOKEN + "\n" + text if image_token else text
    _check_reports(reports)
    if modality is not None:
        modality_wording(modality)  # checked, though this form does not name it
    if style == "authors":
        text = AUTHORS_VQA_WITHOUT_REPORTS.format(question=question)
        return IMAGE_TOKEN + "\n" + text if image_token else text
    text = VQA_WITHOUT_REPORTS.format(question=question)
    return text + "\n" + IMAGE_TOKEN if image_token else text


def build_prompt(
    task: Task,
    modality: str | None,
    question: str | None = None,
    reports: Sequence[str] = (),
    *,
    image_token: bool = True,
    numbering: str = "1.",
    style: PromptStyle = "mmed-rag",
) -> str:
    """The human turn for ``task``: :func:`vqa_prompt` (needs ``question``) or :func:`report_prompt` (takes none)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
    if task == "vqa":
        if question is None:
            raise ValueError("a VQA prompt needs a question")
        return vqa_prompt(modality, question, reports, image_token=image_token, numbering=numbering, style=style)
    if task == "report":
        if question is not None:
            raise ValueError(f"a report prompt takes no question, got {question!r}")
        return report_prompt(
            _required(modality, "a report prompt"), reports, image_token=image_token, numbering=numbering, style=style
        )
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


@dataclass(frozen=True)
class ParsedPrompt:
    """What :func:`parse_prompt` read; ``build_prompt(**dataclasses.asdict(parsed))`` gives the prompt back."""

    task: Task
    modality: str | None  # None only for the no-report VQA form, which names no modality
    question: str | None  # None for report prompts
    reports: tuple[str, ...]
    image_token: bool
    numbering: str = "1."  # "1." where there are no reports to tell


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Read task, modality, question and reports back from a human turn that :func:`build_prompt` could write.

    The ``<image>`` marker is accepted only where the form puts it. Several reports are split at the labels
    (`` 2. ``, `` 3. `` ...), searching from the end: a report that itself contains a numbered list (MIMIC
    impressions do; the ``No.1:`` style avoids this) can be split differently from how it was built, although
    rebuilding still gives the same string.
    """
    for form in _FORMS:
        text, marked = _unmarked(prompt, form.marker_first)
        match = form.pattern.fullmatch(text)
        if match is None:
            continue
        fields = match.groupdict()
        question = fields.get("question")
        if question is not None and question != clean_question(question):
            raise PromptParseError(f"the question is not clean (an <image> marker or outer spaces): {question!r}")
        numbering, reports = "1.", ()
        if "references" in fields:
            numbering, reports = _split_references(fields["references"], int(fields["k"]), prompt)
        modality = _detect_modality(fields["image"], fields.get("specialist"), prompt) if "image" in fields else None
        return ParsedPrompt(form.task, modality, question, reports, marked, numbering)
    raise PromptParseError(f"not an MMed-RAG {' or '.join(TASKS)} prompt: {_snippet(prompt)}")


# -- parsing helpers ------------------------------------------------------------------------------------------

_FIELD_PATTERNS = {"specialist": r".+?", "image": r".+?", "k": r"[1-9][0-9]*", "references": r".*?", "question": r".*"}


def _pattern(template: str) -> re.Pattern:
    """The template as a regular expression: literal text escaped, each ``{field}`` a named group."""
    parts = []
    for literal, field_name, _spec, _conversion in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field_name is not None:
            parts.append(f"(?P<{field_name}>{_FIELD_PATTERNS[field_name]})")
    return re.compile("".join(parts), re.DOTALL)


class _Form(NamedTuple):
    task: Task
    marker_first: bool  # "<image>\n" opens the turn; otherwise "\n<image>" closes it
    pattern: re.Pattern


_FORMS = (
    _Form("report", True, _pattern(REPORT_WITH_REPORTS)),
    _Form("report", True, _pattern(REPORT_WITHOUT_REPORTS)),
    _Form("vqa", True, _pattern(VQA_WITH_REPORTS)),
    _Form("vqa", False, _pattern(VQA_WITHOUT_REPORTS)),
)


def _unmarked(prompt: str, marker_first: bool) -> tuple[str, bool]:
    if marker_first and prompt.startswith(IMAGE_TOKEN + "\n"):
        return prompt[len(IMAGE_TOKEN) + 1 :], True
    if not marker_first and prompt.endswith("\n" + IMAGE_TOKEN):
        return prompt[: -len(IMAGE_TOKEN) - 1], True
    return prompt, False


def _split_references(references: str, k: int, prompt: str) -> tuple[str, tuple[str, ...]]:
    for numbering, label in NUMBERINGS.items():
        first = label.format(i=1)
        if not (references.startswith(first) and references.endswith(" ")):
            continue
        body, reports, end = references[len(first) : -1], [], None
        for i in range(k, 1, -1):
            separator = " " + label.format(i=i)
            cut = body.rfind(separator, 0, end)
            if cut < 0:
                raise PromptParseError(
                    f"says {k} reference report(s) but has no label {separator!r}: {_snippet(prompt)}"
                )
            reports.append(body[cut + len(separator) : end])
            end = cut
        reports.append(body[:end])
        return numbering, tuple(reversed(reports))
    raise PromptParseError(
        f"reference reports are not numbered {' or '.join(repr(n) for n in NUMBERINGS)} and followed by a space: "
        f"{_snippet(prompt)}"
    )


def _detect_modality(image: str, specialist: str | None, prompt: str) -> str:
    for name, wording in MODALITIES.items():
        if wording.image == image:
            if specialist is not None and specialist != wording.specialist:
                raise PromptParseError(
                    f"{image!r} is modality {name!r}, whose specialist is {wording.specialist!r}, "
                    f"not {specialist!r}: {_snippet(prompt)}"
                )
            return name
    known = ", ".join(f"{name} ({wording.image!r})" for name, wording in sorted(MODALITIES.items()))
    raise PromptParseError(f"no registered modality names its images {image!r}; known: {known}")


def _check_reports(reports: Sequence[str]) -> None:
    if isinstance(reports, str):
        raise TypeError("reports must be a sequence of report strings, not one string")
    for index, report in enumerate(reports):
        if not isinstance(report, str):
            raise TypeError(f"report {index} is {type(report).__name__}, not a string")


def _numbering(numbering: str) -> str:
    if numbering not in NUMBERINGS:
        raise ValueError(f"unknown numbering {numbering!r}; known: {', '.join(repr(n) for n in NUMBERINGS)}")
    return NUMBERINGS[numbering]


def _required(modality: str | None, what: str) -> str:
    if modality is None:
        raise ValueError(f"{what} needs a modality; known: {', '.join(sorted(MODALITIES))}")
    return modality


def _snippet(prompt: str, width: int = 100) -> str:
    return repr(prompt if len(prompt) <= width else prompt[:width] + "...")
