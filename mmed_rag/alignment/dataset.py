"""RAG-PT preference pairs (the release's JSON format) as the rows trl's vision DPO trainer reads.

A pair has the same human turn on both sides (the ``<image>`` marker, the retrieved reports and the question) and
differs in the answer and, for cross-modality pairs, in the image: ``rejected_noised: 1`` pairs the rejected answer
with MMed-RAG's noise image, ``chosen_noised: 1`` the chosen one. One row per pair::

    prompt           [{"role": "user", "content": <human turn without its <image> marker>}]
    chosen           [{"role": "assistant", "content": <chosen answer>}]
    rejected         [{"role": "assistant", "content": <rejected answer>}]
    images           [<resolved image path>]   decoded by the collator, batch by batch, never held in memory
    rejected_noised  0 / 1
    chosen_noised    0 / 1
    pair_index       the record's index in its file: seeds the pair's noise image
    id               the record's id, as text

The marker is removed and the text stripped, as LLaVA's ``preprocess_multimodal`` does; trl puts the image part
first, which the LLaVA-Med template renders as ``<image>\\n``, so the model sees the turn it sees at inference.

Every pair is checked before training starts, so a bad record fails the run in seconds, not hours in: no answer on
a side, human turns that differ between the sides, a marker count other than the number of images, an image path
outside the image folder or missing, and, given the processor, a pair longer than ``max_length`` tokens. The last
check matters: trl's vision collator cuts long rows silently, and a cut answer scores log-prob 0 on both sides, so
the pair teaches nothing and no error is raised. Errors name the file, the record and the field
(:class:`~mmed_rag.data.records.RecordError`); ``on_error="skip"`` drops such pairs and reports them instead.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmed_rag.data.images import ImagePathError, resolve_image_path
from mmed_rag.data.records import IMAGE_TOKEN, PreferenceRecord, RecordError, read_preference
from mmed_rag.errors import MMedRAGError

logger = logging.getLogger(__name__)

#: Columns the collator needs besides trl's own (``prompt``, ``chosen``, ``rejected``, ``images``).
PAIR_COLUMNS = ("rejected_noised", "chosen_noised", "pair_index")
_RECORD_INDEX = re.compile(r"record (\d+)")


class PairSetError(MMedRAGError, ValueError):
    """A preference file that gives no pair to train on."""


@dataclass
class PairSet:
    """The trainable rows of one preference file and the pairs left out (``on_error="skip"``)."""

    path: Path
    rows: list[dict[str, Any]]
    errors: list[RecordError] = field(default_factory=list)

    @property
    def noised(self) -> int:
        return sum(row["rejected_noised"] or row["chosen_noised"] for row in self.rows)


def user_text(human_turn: str) -> str:
    """The human turn as trl's user content: every ``<image>`` marker removed, outer whitespace stripped."""
    return human_turn.replace(IMAGE_TOKEN, "").strip()


def _pair_problems(record: PreferenceRecord) -> list[tuple[str, str]]:
    """(field, problem) for what the reader accepts but a DPO pair cannot be built from."""
    problems = []
    for side in ("conversations", "rejected_conversations"):
        turns = getattr(record, side)
        if [turn.speaker for turn in turns] != ["human", "gpt"]:
            speakers = ", ".join(turn.speaker for turn in turns)
            problems.append((side, f"expected one human turn then one gpt turn (the answer), got [{speakers}]"))
    if problems:
        return problems
    if record.rejected_conversations[0].value != record.prompt:
        problems.append(
            (
                "rejected_conversations[0].value",
                "differs from conversations[0].value: both sides of a pair must share the human turn",
            )
        )
    markers = record.prompt.count(IMAGE_TOKEN)
    if markers != len(record.image_paths):
        problems.append(
            (
                "conversations[0].value",
                f"has {markers} {IMAGE_TOKEN} markers but the record has {len(record.image_paths)} image "
                f"('image': {record.image!r}); put exactly one marker per image",
            )
        )
    return problems


def _row(record: PreferenceRecord, pair_index: int, image: Path) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": user_text(record.prompt)}],
        "chosen": [{"role": "assistant", "content": record.chosen}],
        "rejected": [{"role": "assistant", "content": record.rejected}],
        "images": [str(image)],
        "rejected_noised": int(record.rejected_noised or 0),
        "chosen_noised": int(record.chosen_noised or 0),
        "pair_index": pair_index,
        "id": str(record.id),
    }


def tokens_per_image(processor) -> int:
    """How many tokens one image takes in the model's input (LLaVA: patches, +CLS unless dropped)."""
    from PIL import Image

    image_token = processor.image_token
    size = getattr(processor.image_processor, "crop_size", None) or {"height": 32, "width": 32}
    blank = Image.new("RGB", (size.get("width", 32), size.get("height", 32)))
    ids = processor(text=[image_token], images=[blank], add_special_tokens=False)["input_ids"][0]
    return sum(1 for token in ids if token == processor.tokenizer.convert_tokens_to_ids(image_token))


def sequence_lengths(
    rows: list[dict[str, Any]], processor, answers: tuple[str, ...] = ("chosen", "rejected")
) -> list[int]:
    """Tokens of each row as the collator builds it: BOS + prompt (images expanded) + the longest answer.

    ``answers`` names the row's answer columns: a preference row's two sides, or an SFT row's ``("completion",)``.
    The text is rendered by trl's own functions, so this counts what training will see, without opening an image.
    """
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    from mmed_rag.alignment.collator import adds_bos

    tokenizer = processor.tokenizer
    per_image = tokens_per_image(processor)
    prompts: list[str] = []
    answer_texts: dict[str, list[str]] = {answer: [] for answer in answers}
    for row in rows:
        messages = {"prompt": prepare_multimodal_messages(row["prompt"], images=row["images"])}
        messages |= {answer: prepare_multimodal_messages(row[answer]) for answer in answers}
        text = apply_chat_template(messages, processor)
        prompts.append(text["prompt"])
        for answer in answers:
            answer_texts[answer].append(text[answer])

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    bos = [int(adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]) for ids in prompt_ids]
    longest = [max(lengths) for lengths in zip(*(count(answer_texts[answer]) for answer in answers), strict=True)]
    return [
        added + len(prompt) + (per_image - 1) * len(row["images"]) + answer
        for row, added, prompt, answer in zip(rows, bos, prompt_ids, longest, strict=True)
    ]


def load_preference_pairs(
    path: str | os.PathLike,
    image_folder: str | os.PathLike,
    *,
    processor=None,
    max_length: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> PairSet:
    """Read and check a preference file; the rows of the pairs that can be trained on.

    With ``processor`` and ``max_length`` every pair's token count is checked against ``max_length``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    try:
        result = read_preference(path, on_error=on_error)
    except RecordError as error:
        raise _explain(error) from None
    pairs = PairSet(path, [], [_explain(error) for error in result.errors])

    def fail(position: str, field_name: str | None, problem: str) -> None:
        error = RecordError(path, position, field_name, problem)
        if on_error == "raise":
            raise error
        pairs.errors.append(error)

    positions = []
    for record, position in zip(result.records, result.positions, strict=True):
        problems = _pair_problems(record)
        for field_name, problem in problems[:1] if on_error == "raise" else problems:
            fail(position, field_name, problem)
        if problems:
            continue
        try:
            image = resolve_image_path(image_folder, record.image)
        except ImagePathError as error:
            fail(position, "image", str(error))
            continue
        if not image.is_file():
            fail(position, "image", f"image file not found: {image} (image_folder {image_folder})")
            continue
        match = _RECORD_INDEX.search(position)
        pairs.rows.append(_row(record, int(match.group(1)) if match else len(positions), image))
        positions.append(position)

    if processor is not None and max_length is not None and pairs.rows:
        lengths = sequence_lengths(pairs.rows, processor)
        kept = []
        for row, position, length in zip(pairs.rows, positions, lengths, strict=True):
            if length > max_length:
                fail(
                    position,
                    "conversations",
                    f"the pair is {length} tokens (with its image tokens and the longer answer), over max_length "
                    f"{max_length}: the collator would cut the answer and the pair would train on nothing. Raise "
                    f"--model_max_length (the model allows {_model_limit(processor)}) or shorten the reports",
                )
                continue
            kept.append(row)
        pairs.rows = kept

    if pairs.errors:
        listed = "; ".join(str(error) for error in pairs.errors[:3])
        more = " ..." if len(pairs.errors) > 3 else ""
        logger.warning("%s: skipped %d pair(s): %s%s", path, len(pairs.errors), listed, more)
    if not pairs.rows:
        raise PairSetError(f"{path}: no preference pair left to train on ({len(pairs.errors)} skipped).")
    return pairs


def _model_limit(processor) -> str:
    limit = getattr(processor.tokenizer, "model_max_length", None)
    return f"{limit} tokens" if isinstance(limit, int) and limit < 10**9 else "an unknown number of tokens"


def _explain(error: RecordError) -> RecordError:
    """The reader's error, with why RAG-PT needs the field where that is not obvious."""
    if error.field == "image" and error.problem.startswith("missing"):
        return RecordError(
            error.path,
            error.position,
            error.field,
            f"{error.problem}: every RAG-PT pair is multimodal (a text-only pair has nothing to pair with its "
            f"<image> marker, and rejected_noised/chosen_noised need the real image's size for the noise image)",
        )
    return error


def preference_dataset(
    path: str | os.PathLike,
    image_folder: str | os.PathLike,
    *,
    processor=None,
    max_length: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
):
    """A ``datasets.Dataset`` of the file's pairs in trl's conversational vision format (see the module doc)."""
    from datasets import Dataset

    return Dataset.from_list(
        load_preference_pairs(path, image_folder, processor=processor, max_length=max_length, on_error=on_error).rows
    )
