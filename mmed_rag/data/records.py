"""Typed records for every file format of the MMed-RAG release, read and written back unchanged.

The release uses five formats (see data/README.md for an example of each):

========================  ====================  ======================================================
kind                      container             record
========================  ====================  ======================================================
``retriever``             JSON list             :class:`ImageReportRecord` (retriever training pairs)
``report``                JSON list             :class:`ImageReportRecord` (report-generation test set)
``vqa``                   JSON Lines            :class:`VQARecord`
``preference``            JSON list             :class:`PreferenceRecord` (RAG-PT / DPO pairs)
``retrieval``             JSON Lines            :class:`RetrievalRecord` (a query record + reports)
========================  ====================  ======================================================

Real files vary (``image_path`` as a list or a string, ``image`` instead of it, ``caption`` instead of
``report``, int or str ids, extra per-dataset fields), so every record keeps the fields it does not model in
``extra`` and remembers its original key order and spelling: ``write_records(read_records(f))`` gives the same
JSON back. A record that breaks the format raises :class:`RecordError` naming the file, the line or list index,
the field and what was expected; with ``on_error="skip"`` it is reported in :attr:`ReadResult.errors` instead,
so one bad record does not end a long job.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from mmed_rag.atomic import atomic_write_text
from mmed_rag.errors import MMedRAGError, relative_base

logger = logging.getLogger(__name__)

RecordKind = Literal["retriever", "report", "vqa", "preference", "retrieval", "conversation"]
KINDS: tuple[str, ...] = ("retriever", "report", "vqa", "preference", "retrieval", "conversation")
IMAGE_TOKEN = "<image>"
# A single record larger than this is almost certainly a broken file (a missing newline, a binary blob), and
# reading it whole could exhaust memory.
DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
# Bytes that were not UTF-8, as decoded with errors="surrogateescape".
_UNDECODABLE_BYTE = re.compile("[\udc80-\udcff]")


class RecordError(MMedRAGError, ValueError):
    """A record (or a whole file) that does not follow its format.

    ``position`` is ``"line N"`` for JSON Lines and ``"record I (line N)"`` for JSON lists (0-based index, as
    Python and ``jq`` count list items; 1-based line, as editors count lines).
    """

    def __init__(self, path: str | Path, position: str | None, field_name: str | None, problem: str):
        self.path = str(path)
        self.position = position
        self.field = field_name
        self.problem = problem
        where = ", ".join(part for part in (self.path, position) if part)
        what = f"field '{field_name}': {problem}" if field_name else problem
        super().__init__(f"{where}: {what}")


class FileFormatError(RecordError):
    """The file as a whole cannot be read on (wrong top-level type, broken JSON list): not skippable."""


class _FieldProblem(Exception):
    """Raised while parsing one record; the reader adds the file and position."""

    def __init__(self, field_name: str | None, problem: str):
        super().__init__(problem)
        self.field = field_name
        self.problem = problem


# -- field checks --------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _require(raw: dict, name: str) -> Any:
    if name not in raw:
        raise _FieldProblem(name, "missing (required)")
    return raw[name]


def _string(raw: dict, name: str, *, allow_empty: bool = False) -> str:
    value = _require(raw, name)
    if not isinstance(value, str):
        raise _FieldProblem(name, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _FieldProblem(name, "expected a non-empty string, got an empty one")
    return value


def _identifier(raw: dict, name: str) -> str | int:
    value = _require(raw, name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FieldProblem(name, f"expected a string or an integer, got {_type_name(value)}")
    return value


def _check_values(value: Any, path: str) -> None:
    """Reject what JSON cannot hold (NaN, Infinity) and text that was not valid UTF-8, anywhere in a record."""
    if isinstance(value, str):
        if _UNDECODABLE_BYTE.search(value):
            raise _FieldProblem(path or None, "contains bytes that are not valid UTF-8")
    elif isinstance(value, _NonFinite):
        raise _FieldProblem(path or None, f"{value.literal} is not valid JSON (use null or a number)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, f"{path}[{index}]")


@dataclass(frozen=True)
class _NonFinite:
    """Stands in for NaN/Infinity while parsing, so the record that holds one can be named and skipped."""

    literal: str


def _ordered(values: dict, key_order: tuple[str, ...]) -> dict:
    order = [k for k in key_order if k in values] + [k for k in values if k not in key_order]
    return {k: values[k] for k in order}


# -- records -------------------------------------------------------------------------------------------------


@dataclass
class ImageReportRecord:
    """An image (or several views) and its report: retriever training pairs and the report test set.

    ``images`` is always a list; ``image_key`` remembers how the file spelled it (``image_path`` list,
    ``image_path`` string as in Harvard-FairVLMed, or ``image`` string as in PMC-OA). PMC-OA/Quilt records carry
    ``caption`` instead of ``report`` (the original loader reads ``caption`` then ``report``); ``report_key``
    remembers which one was read.
    """

    id: str | int
    report: str
    images: list[str]
    extra: dict = field(default_factory=dict)
    image_key: Literal["image_path", "image_path_str", "image"] = "image_path"
    report_key: Literal["report", "caption"] = "report"
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    unique_key: ClassVar[str] = "id"

    @property
    def key(self) -> str | int:
        return self.id

    @property
    def image_paths(self) -> list[str]:
        return list(self.images)

    @classmethod
    def from_dict(cls, raw: dict) -> ImageReportRecord:
        identifier = _identifier(raw, "id")
        report_key = "report" if "report" in raw or "caption" not in raw else "caption"
        report = _string(raw, report_key)
        if "image_path" in raw:
            value = raw["image_path"]
            if isinstance(value, str):
                images, image_key = [value], "image_path_str"
            elif isinstance(value, list):
                if not value:
                    raise _FieldProblem("image_path", "expected a non-empty list of image paths, got []")
                for index, item in enumerate(value):
                    if not isinstance(item, str) or not item.strip():
                        raise _FieldProblem(
                            f"image_path[{index}]", f"expected a non-empty string, got {_type_name(item)}"
                        )
                images, image_key = list(value), "image_path"
            else:
                raise _FieldProblem("image_path", f"expected a list of strings or a string, got {_type_name(value)}")
            if not all(images):
                raise _FieldProblem("image_path", "expected a non-empty image path")
        elif "image" in raw:
            images, image_key = [_string(raw, "image")], "image"
        else:
            raise _FieldProblem("image_path", "missing (required: 'image_path' list/string or 'image' string)")
        known = {"id", report_key, "image" if image_key == "image" else "image_path"}
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(identifier, report, images, extra, image_key, report_key, tuple(raw))

    def to_dict(self) -> dict:
        if self.image_key == "image_path":
            image_fields = {"image_path": list(self.images)}
        else:
            if len(self.images) != 1:
                raise ValueError(f"record {self.id!r}: '{self.image_key}' holds one image, got {len(self.images)}")
            image_fields = {"image" if self.image_key == "image" else "image_path": self.images[0]}
        values = {"id": self.id, self.report_key: self.report, **image_fields, **self.extra}
        return _ordered(values, self.key_order or ("id", self.report_key, *image_fields))


@dataclass
class VQARecord:
    """One yes/no (or free-text) question about one image, with its gold answer and, usually, the report.

    ``question`` carries the ``<image>`` marker as released; ``text`` (IU-Xray, MIMIC) is the same question with
    the answer options spelled out.
    """

    question_id: str | int
    question: str
    answer: str
    image: str
    report: str | None = None
    text: str | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    unique_key: ClassVar[str] = "question_id"

    @property
    def key(self) -> str | int:
        return self.question_id

    @property
    def image_paths(self) -> list[str]:
        return [self.image]

    def warnings(self) -> list[tuple[str, str]]:
        """Readable but suspicious: the released IU-Xray VQA set has one question with an empty answer."""
        return [("answer", "empty gold answer: this question cannot be scored")] if not self.answer.strip() else []

    @classmethod
    def from_dict(cls, raw: dict) -> VQARecord:
        record = cls(
            question_id=_identifier(raw, "question_id"),
            question=_string(raw, "question"),
            answer=_string(raw, "answer", allow_empty=True),
            image=_string(raw, "image"),
            report=_string(raw, "report") if "report" in raw else None,
            text=_string(raw, "text") if "text" in raw else None,
            extra={k: v for k, v in raw.items() if k not in _VQA_FIELDS},
            key_order=tuple(raw),
        )
        return record

    def to_dict(self) -> dict:
        values = {
            "question_id": self.question_id,
            "question": self.question,
            "answer": self.answer,
            "image": self.image,
            **({"report": self.report} if self.report is not None else {}),
            **({"text": self.text} if self.text is not None else {}),
            **self.extra,
        }
        return _ordered(values, self.key_order or _VQA_FIELDS)


_VQA_FIELDS = ("question_id", "question", "answer", "image", "report", "text")


@dataclass
class Turn:
    """One conversation turn, LLaVA style: ``{"from": "human"|"gpt", "value": ...}``."""

    speaker: Literal["human", "gpt"]
    value: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"from": self.speaker, "value": self.value, **self.extra}


def _conversation(raw: dict, name: str) -> list[Turn]:
    value = _require(raw, name)
    if not isinstance(value, list) or not value:
        raise _FieldProblem(name, f"expected a non-empty list of turns, got {_type_name(value)}")
    turns = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise _FieldProblem(where, f"expected an object with 'from' and 'value', got {_type_name(item)}")
        speaker = item.get("from")
        if speaker not in ("human", "gpt"):
            raise _FieldProblem(f"{where}.from", f"expected 'human' or 'gpt', got {speaker!r}")
        text = item.get("value")
        if not isinstance(text, str):
            raise _FieldProblem(f"{where}.value", f"expected a string, got {_type_name(text)}")
        if speaker == "gpt" and not text.strip():
            raise _FieldProblem(f"{where}.value", "expected a non-empty answer, got an empty one")
        turns.append(Turn(speaker, text, {k: v for k, v in item.items() if k not in ("from", "value")}))
    if turns[0].speaker != "human":
        raise _FieldProblem(f"{name}[0].from", "expected the conversation to start with a 'human' turn")
    if IMAGE_TOKEN not in turns[0].value:
        raise _FieldProblem(f"{name}[0].value", f"expected the {IMAGE_TOKEN} marker in the first human turn")
    if not any(turn.speaker == "gpt" for turn in turns):
        raise _FieldProblem(name, "expected at least one 'gpt' turn (the answer)")
    return turns


def _flag(raw: dict, name: str) -> int | None:
    if name not in raw:
        return None
    value = raw[name]
    if isinstance(value, bool) or value not in (0, 1):
        raise _FieldProblem(name, f"expected 0 or 1, got {value!r}")
    return value


@dataclass
class PreferenceRecord:
    """A RAG-PT preference pair: the same prompt, a chosen and a rejected answer, possibly a noised image.

    ``rejected_noised == 1``: the rejected answer is paired with a noised image (cross-modality alignment);
    ``chosen_noised == 1``: the chosen side's image is noised. Ids are not unique in the release (hundreds of
    pairs share ``""``), so they are not checked for duplicates.
    """

    id: str | int
    image: str
    conversations: list[Turn]
    rejected_conversations: list[Turn]
    rejected_noised: int | None = None
    chosen_noised: int | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    unique_key: ClassVar[str | None] = None

    @property
    def key(self) -> None:
        return None

    @property
    def image_paths(self) -> list[str]:
        return [self.image]

    @property
    def prompt(self) -> str:
        """The first human turn (it carries the ``<image>`` marker and the retrieved reports)."""
        return self.conversations[0].value

    @property
    def chosen(self) -> str:
        return next(turn.value for turn in self.conversations if turn.speaker == "gpt")

    @property
    def rejected(self) -> str:
        return next(turn.value for turn in self.rejected_conversations if turn.speaker == "gpt")

    @classmethod
    def from_dict(cls, raw: dict) -> PreferenceRecord:
        rejected_noised, chosen_noised = _flag(raw, "rejected_noised"), _flag(raw, "chosen_noised")
        if rejected_noised == 1 and chosen_noised == 1:
            raise _FieldProblem("chosen_noised", "only one side can be noised, but rejected_noised is 1 too")
        return cls(
            id=_identifier(raw, "id"),
            image=_string(raw, "image"),
            conversations=_conversation(raw, "conversations"),
            rejected_conversations=_conversation(raw, "rejected_conversations"),
            rejected_noised=rejected_noised,
            chosen_noised=chosen_noised,
            extra={k: v for k, v in raw.items() if k not in _PREFERENCE_FIELDS},
            key_order=tuple(raw),
        )

    def to_dict(self) -> dict:
        values = {
            "id": self.id,
            "image": self.image,
            "conversations": [turn.to_dict() for turn in self.conversations],
            "rejected_conversations": [turn.to_dict() for turn in self.rejected_conversations],
            **({"rejected_noised": self.rejected_noised} if self.rejected_noised is not None else {}),
            **({"chosen_noised": self.chosen_noised} if self.chosen_noised is not None else {}),
            **self.extra,
        }
        return _ordered(values, self.key_order or _PREFERENCE_FIELDS)


_PREFERENCE_FIELDS = ("id", "image", "conversations", "rejected_conversations", "rejected_noised", "chosen_noised")


@dataclass
class ConversationRecord:
    """A LLaVA-style instruction sample (LLaVA-Med instruct, SFT data): images and a human/gpt conversation.

    ``image`` is one path or a list of paths; the human turns carry exactly one ``<image>`` marker per image.
    """

    id: str | int
    images: list[str]
    conversations: list[Turn]
    image_is_list: bool = False
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    unique_key: ClassVar[str | None] = None  # instruction sets reuse ids (one per image, several questions)

    @property
    def key(self) -> None:
        return None

    @property
    def image_paths(self) -> list[str]:
        return self.images

    @classmethod
    def from_dict(cls, raw: dict) -> ConversationRecord:
        value = _require(raw, "image")
        if isinstance(value, list):
            if not value or not all(isinstance(item, str) and item.strip() for item in value):
                raise _FieldProblem("image", f"expected a non-empty list of image paths, got {value!r}")
            images, is_list = list(value), True
        else:
            images, is_list = [_string(raw, "image")], False
        turns = _conversation(raw, "conversations")
        markers = sum(turn.value.count(IMAGE_TOKEN) for turn in turns if turn.speaker == "human")
        if markers != len(images):
            raise _FieldProblem(
                "conversations",
                f"the human turns hold {markers} {IMAGE_TOKEN} marker(s) for {len(images)} image(s): one per image",
            )
        extra = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations")}
        return cls(_identifier(raw, "id"), images, turns, is_list, extra, tuple(raw))

    def to_dict(self) -> dict:
        values = {
            "id": self.id,
            "image": list(self.images) if self.image_is_list else self.images[0],
            "conversations": [turn.to_dict() for turn in self.conversations],
            **self.extra,
        }
        return _ordered(values, self.key_order or ("id", "image", "conversations"))


@dataclass
class RetrievalRecord:
    """The output of batch retrieval: the input record unchanged, plus the reports retrieved for it.

    ``retrieve_k`` is the number of reports actually kept (after adaptive selection), so it always equals
    ``len(reference_reports)``.
    """

    query: VQARecord | ImageReportRecord
    reference_reports: list[str]
    retrieve_k: int

    @property
    def unique_key(self) -> str:
        return self.query.unique_key

    @property
    def key(self) -> str | int:
        return self.query.key

    @property
    def image_paths(self) -> list[str]:
        return self.query.image_paths

    def warnings(self) -> list[tuple[str, str]]:
        return self.query.warnings() if isinstance(self.query, VQARecord) else []

    @classmethod
    def from_dict(cls, raw: dict) -> RetrievalRecord:
        reports = _require(raw, "reference_reports")
        if not isinstance(reports, list):
            raise _FieldProblem("reference_reports", f"expected a list of strings, got {_type_name(reports)}")
        for index, report in enumerate(reports):
            if not isinstance(report, str):
                raise _FieldProblem(f"reference_reports[{index}]", f"expected a string, got {_type_name(report)}")
        k = _require(raw, "retrieve_k")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise _FieldProblem("retrieve_k", f"expected a non-negative integer, got {k!r}")
        if k != len(reports):
            raise _FieldProblem("retrieve_k", f"is {k} but reference_reports holds {len(reports)} report(s)")
        query_fields = {key: value for key, value in raw.items() if key not in ("reference_reports", "retrieve_k")}
        query_type = VQARecord if "question_id" in raw or "question" in raw else ImageReportRecord
        return cls(query_type.from_dict(query_fields), list(reports), k)

    def to_dict(self) -> dict:
        return {
            **self.query.to_dict(),
            "reference_reports": list(self.reference_reports),
            "retrieve_k": self.retrieve_k,
        }


Record = ImageReportRecord | VQARecord | PreferenceRecord | RetrievalRecord | ConversationRecord
RECORD_TYPES: dict[str, Callable[[dict], Record]] = {
    "retriever": ImageReportRecord.from_dict,
    "report": ImageReportRecord.from_dict,
    "vqa": VQARecord.from_dict,
    "preference": PreferenceRecord.from_dict,
    "retrieval": RetrievalRecord.from_dict,
    "conversation": ConversationRecord.from_dict,
}
DEFAULT_CONTAINER: dict[str, Literal["json", "jsonl"]] = {
    "retriever": "json",
    "report": "json",
    "vqa": "jsonl",
    "preference": "json",
    "retrieval": "jsonl",
    "conversation": "json",
}


def detect_kind(raw: dict) -> RecordKind:
    """Guess a record's format from its fields (``report`` and ``retriever`` look alike; ``retriever`` wins)."""
    if "reference_reports" in raw or "retrieve_k" in raw:
        return "retrieval"
    if "rejected_conversations" in raw:
        return "preference"
    if "conversations" in raw:
        return "conversation"
    if "question_id" in raw or "question" in raw:
        return "vqa"
    return "retriever"


# -- reading -------------------------------------------------------------------------------------------------


@dataclass
class ReadResult:
    """What a read produced: the records, and the problems skipped over (``on_error="skip"``)."""

    path: Path
    kind: str
    container: Literal["json", "jsonl"]
    records: list = field(default_factory=list)
    positions: list[str] = field(default_factory=list)  # where each record sits in the file, for messages
    errors: list[RecordError] = field(default_factory=list)
    warnings: list[RecordError] = field(default_factory=list)
    had_bom: bool = False

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = f"{self.path}: {len(self.records)} {self.kind} record(s) ({self.container})"
        if self.errors:
            head += f", {len(self.errors)} error(s)"
        if self.warnings:
            head += f", {len(self.warnings)} warning(s)"
        lines = [head]
        lines += [f"  error: {error}" for error in self.errors]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def _decode(data: bytes) -> str:
    # surrogateescape keeps undecodable bytes as lone surrogates, so the one record that holds them is reported
    # (by _check_values) instead of the whole file failing to decode.
    return data.decode("utf-8", errors="surrogateescape")


def _parse_constant(literal: str) -> _NonFinite:
    return _NonFinite(literal)


_DECODER = json.JSONDecoder(parse_constant=_parse_constant)


def _iter_jsonl(path: Path, data: bytes, max_record_bytes: int) -> Iterator[tuple[str, Any]]:
    """Yield ``(position, parsed object or RecordError)`` per non-blank line."""
    for number, line in enumerate(data.split(b"\n"), start=1):
        position = f"line {number}"
        if not line.strip():
            continue
        if len(line) > max_record_bytes:
            yield (
                position,
                RecordError(
                    path,
                    position,
                    None,
                    f"line is {len(line):,} bytes, over the limit of {max_record_bytes:,} "
                    "(max_record_bytes): a missing newline or a binary file?",
                ),
            )
            continue
        try:
            yield position, _DECODER.decode(_decode(line))
        except json.JSONDecodeError as error:
            yield position, RecordError(path, position, None, f"invalid JSON: {error.msg} (column {error.colno})")


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _iter_json_list(path: Path, text: str, max_record_bytes: int) -> Iterator[tuple[str, Any]]:
    """Yield ``(position, parsed object)`` per list item, decoding one item at a time.

    Item-by-item decoding gives every record its index and line, and keeps every record before a point where
    the file breaks (a truncated download keeps all its complete records).
    """
    index = _skip_whitespace(text, 0)
    if index == len(text):
        raise FileFormatError(path, None, None, "the file is empty: expected a JSON list of records")
    if text[index] != "[":
        kind = "an object" if text[index] == "{" else f"{text[index]!r}"
        raise FileFormatError(
            path, "line 1", None, f"wrong top-level type: expected a JSON list of records, got {kind}"
        )
    line, scanned = 1, 0
    index = _skip_whitespace(text, index + 1)
    if index < len(text) and text[index] == "]":
        return
    item = 0
    while True:
        line += text.count("\n", scanned, index)
        scanned = index
        position = f"record {item} (line {line})"
        try:
            value, end = _DECODER.raw_decode(text, index)
        except json.JSONDecodeError as error:
            problem = "the file ends inside this record (truncated?)" if error.pos >= len(text) else error.msg
            raise FileFormatError(path, position, None, f"invalid JSON at line {error.lineno}: {problem}") from None
        if len(text[index:end].encode("utf-8", errors="surrogateescape")) > max_record_bytes:
            value = RecordError(path, position, None, f"record is over the limit of {max_record_bytes:,} bytes")
        yield position, value
        index = _skip_whitespace(text, end)
        if index < len(text) and text[index] == ",":
            index = _skip_whitespace(text, index + 1)
            item += 1
            continue
        if index < len(text) and text[index] == "]":
            if _skip_whitespace(text, index + 1) != len(text):
                raise FileFormatError(path, None, None, "unexpected content after the closing ']'")
            return
        what = "the file ends (truncated?)" if index >= len(text) else f"found {text[index]!r}"
        line += text.count("\n", scanned, index)
        raise FileFormatError(path, f"after record {item} (line {line})", None, f"expected ',' or ']', {what}")


def _container_of(path: Path, text: str) -> Literal["json", "jsonl"]:
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    first = text[_skip_whitespace(text, 0) : _skip_whitespace(text, 0) + 1]
    if first == "{":
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return "jsonl"  # several objects: JSON Lines under a .json name
    return "json"


def read_records(
    path: str | Path,
    kind: RecordKind | None = None,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> ReadResult:
    """Read a release file (JSON list or JSON Lines) into typed records.

    ``kind=None`` detects the format from the first record. ``on_error="raise"`` stops at the first problem
    with a :class:`RecordError`; ``"skip"`` collects problems in ``result.errors`` and keeps reading (a file that
    breaks mid-list keeps the records before the break). Duplicate ids (``id`` / ``question_id``) are errors.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if kind is not None and kind not in RECORD_TYPES:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        problem = f"cannot read the file: {error.strerror or error}"
        raise FileFormatError(path, None, None, problem + (relative_base(path) if not path.exists() else "")) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        raise FileFormatError(
            path,
            None,
            None,
            "the file is UTF-16 (or another wide encoding), expected UTF-8: convert it, e.g. "
            "with `iconv -f UTF-16 -t UTF-8`",
        )
    had_bom = data.startswith(_BOM)
    if had_bom:
        logger.warning("%s starts with a UTF-8 byte-order mark; reading past it (it is not written back)", path)
        data = data[len(_BOM) :]
    if not data.strip():  # .json and .jsonl alike: an empty input is a mistake, not an empty result
        raise FileFormatError(path, None, None, "the file is empty: expected records (a JSON list or JSON Lines)")
    text = _decode(data)
    container = _container_of(path, text)
    result = ReadResult(path, kind or "", container, had_bom=had_bom)

    def fail(error: RecordError) -> None:
        if on_error == "raise":
            raise error
        result.errors.append(error)

    items = (
        _iter_jsonl(path, data, max_record_bytes)
        if container == "jsonl"
        else _iter_json_list(path, text, max_record_bytes)
    )
    seen: dict[Any, str] = {}
    try:
        for position, value in items:
            if isinstance(value, RecordError):
                fail(value)
                continue
            if not isinstance(value, dict):
                fail(RecordError(path, position, None, f"expected a JSON object (a record), got {_type_name(value)}"))
                continue
            if not result.kind:
                result.kind = detect_kind(value)
            try:
                _check_values(value, "")
                record = RECORD_TYPES[result.kind](value)
            except _FieldProblem as problem:
                fail(RecordError(path, position, problem.field, problem.problem))
                continue
            if record.unique_key is not None:
                key = (type(record.key).__name__, record.key)
                if key in seen:
                    fail(
                        RecordError(
                            path, position, record.unique_key, f"duplicate {record.key!r}, first seen at {seen[key]}"
                        )
                    )
                    continue
                seen[key] = position
            for field_name, problem in getattr(record, "warnings", list)():
                result.warnings.append(RecordError(path, position, field_name, problem))
            result.records.append(record)
            result.positions.append(position)
    except FileFormatError as error:
        if on_error == "raise" or not result.records:
            raise
        # The records before the break are kept; how many came after it cannot be known.
        fail(FileFormatError(error.path, error.position, error.field, f"{error.problem}; reading stopped here"))
    if not result.kind or (kind is None and result.kind == "retriever"):
        # Retriever pairs and report test sets share one format; detection cannot tell them apart.
        result.kind = "retriever/report"
    return result


def read_or_skip(path: str | Path, on_error: Literal["raise", "skip"]) -> tuple[list, list[str]]:
    """The records of a stage's input, and (``on_error="skip"``) one message per record left out, logged.

    For stages that report what they skipped: a record the reader could not parse is counted and named like a
    record the stage itself could not use, never silently dropped.
    """
    result = read_records(path, on_error=on_error)
    skipped = [str(error) for error in result.errors]
    for message in skipped:
        logger.warning("skipping %s", message)
    return result.records, skipped


def read_retriever_train(path: str | Path, **options: Any) -> ReadResult:
    """Retriever training pairs: JSON list of ``{"id", "report", "image_path" | "image", ...}``."""
    return read_records(path, "retriever", **options)


def read_report_test(path: str | Path, **options: Any) -> ReadResult:
    """Report-generation test set: JSON list of ``{"id", "report", "image_path": [...]}``."""
    return read_records(path, "report", **options)


def read_vqa(path: str | Path, **options: Any) -> ReadResult:
    """VQA test set: JSON Lines of ``{"question_id", "question", "answer", "image", "report"[, "text"]}``."""
    return read_records(path, "vqa", **options)


def read_conversations(path: str | Path, **options: Any) -> ReadResult:
    """Instruction samples (SFT): JSON list of ``{"id", "image" (path or list), "conversations"}``."""
    return read_records(path, "conversation", **options)


def read_preference(path: str | Path, **options: Any) -> ReadResult:
    """RAG-PT preference pairs: JSON list of ``{"id", "image", "conversations", "rejected_conversations", ...}``."""
    return read_records(path, "preference", **options)


def read_retrieval(path: str | Path, **options: Any) -> ReadResult:
    """Batch-retrieval output: the input records plus ``reference_reports`` and ``retrieve_k``."""
    return read_records(path, "retrieval", **options)


# -- writing -------------------------------------------------------------------------------------------------


def write_records(
    path: str | Path,
    records: ReadResult | Iterable[Record],
    container: Literal["json", "jsonl"] | None = None,
) -> Path:
    """Write records atomically: a JSON list (indent 4, as released) or JSON Lines.

    ``container=None`` keeps the container of a :class:`ReadResult`, else follows the suffix (``.jsonl`` →
    JSON Lines). NaN and Infinity are refused rather than written as invalid JSON.
    """
    path = Path(path)
    if container is None:
        if isinstance(records, ReadResult):
            container = records.container
        else:
            container = "jsonl" if path.suffix.lower() == ".jsonl" else "json"
    dicts = [record.to_dict() for record in records]
    if container == "jsonl":
        text = "".join(json.dumps(item, ensure_ascii=False, allow_nan=False) + "\n" for item in dicts)
    else:
        text = json.dumps(dicts, ensure_ascii=False, allow_nan=False, indent=4) + "\n"
    atomic_write_text(path, text)
    return path
