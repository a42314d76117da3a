"""RAG-PT preference pairs from the model's own answers (MMed-RAG Sec. 3.3; the code was never published).

Every pair keeps the human turn *with* the retrieved reports on both sides and prefers the ground truth ``y``;
what is rejected depends on how the model failed (``M(image, prompt)`` is its answer, ``x_r`` the reports):

- **cross-modality** (stage 1): ``M(noise, x_t + x_r)`` is still judged correct, so the model answers from the
  reports alone. Chosen: ``y`` with the real image; rejected: that answer with the noise image
  (``rejected_noised: 1``). For yes/no questions both texts are often the same: only the image differs.
- **retrieval helps** (overall alignment): ``M(x_v, x_t + x_r)`` right, ``M(x_v, x_t)`` wrong: the model cannot
  solve it alone and must learn to use the reports. Rejected: the answer without retrieval.
- **retrieval misleads** (overall alignment): ``M(x_v, x_t)`` right, ``M(x_v, x_t + x_r)`` wrong: the copied
  homework was wrong. Rejected: the misled answer.

Stage 2 trains on all overall-alignment pairs plus a seeded sample of the cross-modality pairs (half of them by
default, ``cross_ratio``). Pairs are :class:`~mmed_rag.data.records.PreferenceRecord` objects, written in exactly
the released format (``id``, ``image``, ``conversations``, ``rejected_conversations``, ``rejected_noised``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mmed_rag.data.records import PreferenceRecord, Turn

CROSS_MODALITY = "cross_modality"
RETRIEVAL_HELPS = "retrieval_helps"
RETRIEVAL_MISLEADS = "retrieval_misleads"
PAIR_TYPES = (CROSS_MODALITY, RETRIEVAL_HELPS, RETRIEVAL_MISLEADS)
OVERALL_ALIGNMENT = "overall_alignment"  # what a released file can tell apart: noised or not


@dataclass(frozen=True)
class AnsweredItem:
    """One training question (or report) answered in the three modes pair construction compares."""

    key: str | int
    image: str
    gold: str
    prompt: str  # the human turn with the retrieved reports and the <image> marker
    with_retrieval: str
    without_retrieval: str
    noised: str  # with retrieval, the image replaced by noise
    modality: str | None = None


@dataclass(frozen=True)
class Verdicts:
    """Whether each of an item's answers was judged correct."""

    with_retrieval: bool
    without_retrieval: bool
    noised: bool


@dataclass(frozen=True)
class Pair:
    """A preference record and where it came from (the type and modality are not part of the released format)."""

    record: PreferenceRecord
    kind: str
    modality: str | None


def _pair(item: AnsweredItem, rejected: str, kind: str) -> Pair:
    record = PreferenceRecord(
        id=item.key,
        image=item.image,
        conversations=[Turn("human", item.prompt), Turn("gpt", item.gold)],
        rejected_conversations=[Turn("human", item.prompt), Turn("gpt", rejected)],
        rejected_noised=1 if kind == CROSS_MODALITY else 0,
    )
    return Pair(record, kind, item.modality)


def pair_of(item: AnsweredItem, verdicts: Verdicts) -> list[Pair]:
    """The pairs one item gives: a cross-modality pair and/or one overall-alignment pair, or none."""
    pairs = []
    if verdicts.noised:
        pairs.append(_pair(item, item.noised, CROSS_MODALITY))
    if verdicts.with_retrieval and not verdicts.without_retrieval:
        pairs.append(_pair(item, item.without_retrieval, RETRIEVAL_HELPS))
    elif verdicts.without_retrieval and not verdicts.with_retrieval:
        pairs.append(_pair(item, item.with_retrieval, RETRIEVAL_MISLEADS))
    return pairs


def build_pairs(items: Sequence[AnsweredItem], verdicts: Sequence[Verdicts]) -> list[Pair]:
    """All pairs of ``items`` (``verdicts[i]`` judges ``items[i]``), in item order."""
    if len(items) != len(verdicts):
        raise ValueError("one verdict per item")
    return [pair for item, verdict in zip(items, verdicts, strict=True) for pair in pair_of(item, verdict)]


@dataclass(frozen=True)
class Stages:
    stage1: list[Pair]
    stage2: list[Pair]


def split_stages(pairs: Sequence[Pair], cross_ratio: float = 0.5, seed: int = 0) -> Stages:
    """Stage 1: the cross-modality pairs. Stage 2: the overall-alignment pairs plus ``cross_ratio`` of the
    cross-modality ones, drawn with ``seed`` (kept in their original order)."""
    if not 0.0 <= cross_ratio <= 1.0:
        raise ValueError(f"cross_ratio must be in [0, 1], got {cross_ratio}")
    cross = [pair for pair in pairs if pair.kind == CROSS_MODALITY]
    alignment = [pair for pair in pairs if pair.kind != CROSS_MODALITY]
    chosen = set(random.Random(seed).sample(range(len(cross)), round(cross_ratio * len(cross))))
    return Stages(cross, alignment + [pair for index, pair in enumerate(cross) if index in chosen])


def released_type(record: PreferenceRecord) -> str:
    """The pair type a released record shows: cross-modality when one side's image is noised."""
    return CROSS_MODALITY if record.rejected_noised == 1 or record.chosen_noised == 1 else OVERALL_ALIGNMENT


def count_types(pairs: Iterable[Pair]) -> Counter:
    """Pairs per (modality, type), the summary table's cells."""
    return Counter((pair.modality or "unknown", pair.kind) for pair in pairs)


def summary_table(stages: Stages, pairs: Sequence[Pair]) -> str:
    """Markdown: pairs per modality and type, and per stage."""
    counts = count_types(pairs)
    modalities = sorted({modality for modality, _ in counts})
    lines = ["| modality | " + " | ".join(PAIR_TYPES) + " | total |", "|---" * (len(PAIR_TYPES) + 2) + "|"]
    for modality in [*modalities, "all"]:
        row = [
            sum(n for (m, kind), n in counts.items() if kind == pair_type and modality in (m, "all"))
            for pair_type in PAIR_TYPES
        ]
        lines.append(f"| {modality} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    lines += [
        "",
        "| stage | pairs | cross-modality | overall alignment |",
        "|---|---|---|---|",
    ]
    for name, stage in (("1", stages.stage1), ("2", stages.stage2)):
        cross = sum(pair.kind == CROSS_MODALITY for pair in stage)
        lines.append(f"| {name} | {len(stage)} | {cross} | {len(stage) - cross} |")
    return "\n".join(lines)
