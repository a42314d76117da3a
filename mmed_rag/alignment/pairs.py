"""RAG-PT preference pairs from the model's own answers: the paper's recipe (MMed-RAG Sec. 3.3) and the authors'.

The paper's recipe (the default) follows the paper's description. The authors' own pair builder
(``dpo/gen_dpo_data_2stages_{vqa,report}.py``) was published in their repository and later deleted; it is
readable in its history at commit f2023ea and differs in several places: see the comment that opens "the authors'
recipe" below (four runs instead of three, the model's own answer chosen for VQA, sub-stages 2a/2b/2c).

The paper's recipe. Every pair keeps the human turn *with* the retrieved reports on both sides and prefers the
ground truth ``y``; what is rejected depends on how the model failed (``M(image, prompt)`` is its answer, ``x_r``
the reports):

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


def _kinds_table(pairs: Iterable[Pair], kinds: Sequence[str], total: bool) -> list[str]:
    """Markdown rows: pairs per modality (then "all") and kind, with a total column when asked."""
    counts = count_types(pairs)
    modalities = sorted({modality for modality, _ in counts})
    extra = " total |" if total else ""
    lines = ["| modality | " + " | ".join(kinds) + " |" + extra, "|---" * (len(kinds) + 1 + total) + "|"]
    for modality in [*modalities, "all"]:
        row = [
            sum(n for (m, kind), n in counts.items() if kind == wanted and modality in (m, "all")) for wanted in kinds
        ]
        lines.append(f"| {modality} | " + " | ".join(map(str, row)) + " |" + (f" {sum(row)} |" if total else ""))
    return lines


def summary_table(stages: Stages, pairs: Sequence[Pair]) -> str:
    """Markdown: pairs per modality and type, and per stage."""
    lines = _kinds_table(pairs, PAIR_TYPES, total=True)
    lines += [
        "",
        "| stage | pairs | cross-modality | overall alignment |",
        "|---|---|---|---|",
    ]
    for name, stage in (("1", stages.stage1), ("2", stages.stage2)):
        cross = sum(pair.kind == CROSS_MODALITY for pair in stage)
        lines.append(f"| {name} | {len(stage)} | {cross} | {len(stage) - cross} |")
    return "\n".join(lines)


# -- the authors' recipe -----------------------------------------------------------------------------------------
#
# What their deleted pair builder did (read at commit f2023ea; none of its code is used here). Four generate runs of
# the training questions: without reports on the real image and on the noise image, with reports on the real image
# and on the noise image.
#
# - Stage 1: without reports, right on the real image and wrong on the noise image: chosen the real-image answer,
#   rejected the noise-image answer (rejected_noised 1); the prompt without reports.
# - Stage 2a: with reports, right on both images (the model copies): chosen the real-image answer, rejected the
#   noise-image answer (rejected_noised 1); kept: a seeded sample (random.Random(42)) of int(0.5 x (|2b| + |2c|)).
# - Stage 2b: right without reports, wrong with them (misled): chosen the answer without reports.
# - Stage 2c: wrong without reports, right with them (helped): chosen the answer with reports.
#   2b and 2c carry the prompt with reports on both sides.
# - Stage 2 = the 2a sample, then 2b, then 2c. The chosen text is the model's own right answer for VQA and the gold
#   report for report generation. Ids: the question id for 1 and 2a; the record's image_id for 2b and 2c (most
#   records have none, hence the released files' many "" ids).
# - Right or wrong: VQA by their yes/no rule (mmed_rag.eval.yesno.authors_yes_no) on answer and gold; reports by
#   their judge (mmed_rag.eval.correctness, metric "authors"), the bar being the mean over the two runs compared:
#   stage 1 the two runs without reports, 2a the two with reports, 2b/2c the two on the real image.

AUTHORS_RUNS = ("without_retrieval", "without_retrieval_noised", "with_retrieval", "with_retrieval_noised")
AUTHORS_STAGES = ("1", "2a", "2b", "2c")
AUTHORS_SEED = 42  # their script's random.seed(42)


@dataclass(frozen=True)
class FourRunItem:
    """One training question (or report) answered in the four runs of the authors' recipe."""

    key: str | int
    image: str
    gold: str
    prompt_without: str  # the human turn without reports, <image> marker included
    prompt_with: str  # the human turn with the retrieved reports
    without_retrieval: str
    without_retrieval_noised: str
    with_retrieval: str
    with_retrieval_noised: str
    image_id: str | int = ""  # the record's image_id: the id of its 2b/2c pairs ("" when it has none)
    modality: str | None = None


@dataclass(frozen=True)
class Judged:
    """Two answers of one item judged against one bar: is the first right, is the second right."""

    first: bool
    second: bool


@dataclass(frozen=True)
class FourRunVerdicts:
    """The three comparisons of the authors' recipe, each judged on its own (reports: against its own mean)."""

    stage1: Judged  # without reports: real image, noise image
    stage2a: Judged  # with reports: real image, noise image
    stage2bc: Judged  # real image: without reports, with reports


@dataclass(frozen=True)
class AuthorsStages:
    """Stage 1, stage 2 (the 2a sample, 2b, 2c in that order), and every 2a pair found before sampling."""

    stage1: list[Pair]
    stage2: list[Pair]
    found_2a: int
    shortfall: int  # 2a pairs the sample asked for beyond those found (their script would have stopped)


def _authors_pair(item: FourRunItem, prompt: str, chosen: str, rejected: str, kind: str, key) -> Pair:
    record = PreferenceRecord(
        id=key,
        image=item.image,
        conversations=[Turn("human", prompt), Turn("gpt", chosen)],
        rejected_conversations=[Turn("human", prompt), Turn("gpt", rejected)],
        rejected_noised=1 if kind in ("1", "2a") else 0,
    )
    return Pair(record, kind, item.modality)


def authors_pairs_of(item: FourRunItem, verdicts: FourRunVerdicts, task: str) -> list[Pair]:
    """The pairs one item gives under the authors' recipe (before the 2a sample), in the order 1, 2a, 2b/2c."""

    def chosen(answer: str) -> str:
        return answer if task == "vqa" else item.gold

    pairs = []
    if verdicts.stage1.first and not verdicts.stage1.second:
        pairs.append(
            _authors_pair(
                item, item.prompt_without, chosen(item.without_retrieval), item.without_retrieval_noised, "1", item.key
            )
        )
    if verdicts.stage2a.first and verdicts.stage2a.second:
        pairs.append(
            _authors_pair(
                item, item.prompt_with, chosen(item.with_retrieval), item.with_retrieval_noised, "2a", item.key
            )
        )
    if verdicts.stage2bc.first and not verdicts.stage2bc.second:
        pairs.append(
            _authors_pair(
                item, item.prompt_with, chosen(item.without_retrieval), item.with_retrieval, "2b", item.image_id
            )
        )
    elif verdicts.stage2bc.second and not verdicts.stage2bc.first:
        pairs.append(
            _authors_pair(
                item, item.prompt_with, chosen(item.with_retrieval), item.without_retrieval, "2c", item.image_id
            )
        )
    return pairs


def build_authors_stages(
    items: Sequence[FourRunItem],
    verdicts: Sequence[FourRunVerdicts],
    task: str,
    ratio: float = 0.5,
    seed: int = AUTHORS_SEED,
) -> AuthorsStages:
    """Both stages of the authors' recipe: stage 1's pairs, and stage 2 = a seeded sample of
    ``int(ratio x (|2b| + |2c|))`` of the 2a pairs (``random.Random(seed).sample``, their order), then 2b, 2c.

    Where fewer 2a pairs exist than the sample asks for, all are kept and ``shortfall`` says how many were missing
    (their script raised ValueError there).
    """
    if len(items) != len(verdicts):
        raise ValueError("one verdict per item")
    if task not in ("vqa", "report"):
        raise ValueError(f"task must be 'vqa' or 'report', got {task!r}")
    pairs = [
        pair for item, verdict in zip(items, verdicts, strict=True) for pair in authors_pairs_of(item, verdict, task)
    ]
    by_kind = {kind: [pair for pair in pairs if pair.kind == kind] for kind in AUTHORS_STAGES}
    wanted = int(ratio * (len(by_kind["2b"]) + len(by_kind["2c"])))
    found = by_kind["2a"]
    sample = random.Random(seed).sample(found, wanted) if wanted <= len(found) else list(found)
    return AuthorsStages(
        stage1=by_kind["1"],
        stage2=sample + by_kind["2b"] + by_kind["2c"],
        found_2a=len(found),
        shortfall=max(0, wanted - len(found)),
    )


def authors_summary_table(stages: AuthorsStages) -> str:
    """Markdown: pairs per modality and sub-stage (1, 2a as kept, 2b, 2c), and per stage."""
    lines = _kinds_table([*stages.stage1, *stages.stage2], AUTHORS_STAGES, total=False)
    kept = sum(pair.kind == "2a" for pair in stages.stage2)
    lines += [
        "",
        "| stage | pairs | made of |",
        "|---|---|---|",
        f"| 1 | {len(stages.stage1)} | 1 |",
        f"| 2 | {len(stages.stage2)} | 2a {kept} (sampled of {stages.found_2a} found), 2b, 2c |",
    ]
    if stages.shortfall:
        lines += ["", f"The 2a sample asked for {stages.shortfall} more pairs than were found: all were kept."]
    return "\n".join(lines)
