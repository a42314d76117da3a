"""parse_yes_no: hand-written answer variants, every released VQA test answer, and arbitrary strings."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from mmed_rag.eval.yesno import NO, YES, first_sentence, parse_yes_no, read_yes_no
from mmed_rag.testing import tiny_tokenizer

# Written for these tests; none is copied from the released data.
VARIANTS: list[tuple[str, str | None]] = [
    # bare labels, punctuation and case
    ("Yes", YES),
    ("yes.", YES),
    ("YES!", YES),
    ("No", NO),
    ("no.", NO),
    ("NO!!", NO),
    ("Yes  ", YES),
    ("  \n No \t", NO),
    ('"Yes."', YES),
    ("\u201cNo.\u201d", NO),
    # a bare label followed by a justification
    ("Yes, the heart is mildly enlarged.", YES),
    ("No, there is no effusion", NO),
    ("No (because the costophrenic angles are sharp).", NO),
    ("Yes (a small nodule projects over the left apex)", YES),
    ("No; the lungs are clear.", NO),
    ("No - not on this film.", NO),
    ("No it is not.", NO),
    ("No. (The mediastinum is within normal limits.)", NO),
    # list markers, an "Answer:" prefix, echoed questions, a leading parenthetical
    ("- Yes", YES),
    ("* No.", NO),
    ("3. Yes", YES),
    ("12. No, it is unchanged.", NO),
    ("Answer: no", NO),
    ("- Is the trachea midline? Yes", YES),
    ("7. Is a pneumothorax present? - No", NO),
    ("Is there pleural thickening?\nNo.", NO),
    ("3. Is the aorta tortuous?", None),
    ("(If the marker refers to the left side, the answer would be) No.", NO),
    ("(Cannot tell from the given text.)", None),
    # only the first sentence counts
    ("No. However yes in some cases.", NO),
    ("Yes. There is no effusion.", YES),
    ("There is no pneumothorax. Yes, the lungs are hyperinflated.", NO),
    ("No (e.g. no consolidation). Yes.", NO),
    # negated findings
    ("There is no evidence of effusion", NO),
    ("No pleural effusion is seen.", NO),
    ("The heart is not enlarged.", NO),
    ("Without consolidation.", NO),
    ("Not seen.", NO),
    ("The film does not show a fracture.", NO),
    ("Negative for pneumothorax.", NO),
    ("Nothing abnormal is seen.", NO),
    ("There isn't any free air.", NO),
    # asserted findings
    ("There is a small left effusion.", YES),
    ("The image shows cardiomegaly.", YES),
    ("Findings are consistent with pulmonary edema.", YES),
    ("A right-sided port is present.", YES),
    ("There is a nodule but no effusion.", YES),
    ("The image shows no cardiomegaly.", NO),
    # explicit answer clauses
    ("The film is clear, so the answer would be no.", NO),
    ("Given the stable silhouette, the answer is likely yes.", YES),
    ("Nothing is described there, so likely no.", NO),
    ("From the described findings, the likelihood is Yes.", YES),
    ('Sharp angles suggest clear bases, resulting in a "No."', NO),
    ("Based on the report, no.", NO),
    ("Nothing is documented; therefore, the answer is no.", NO),
    ("No data on the hila is given, but it is implied that no adenopathy is present.", NO),
    ("It is not stated, but it can be considered normal since the lungs are clear.", YES),
    # hedges and missing information
    ("Cannot be determined from the image alone.", None),
    ("The report does not mention the ribs.", None),
    ("Not mentioned in the report.", None),
    ("No answer can be given without the prior film.", None),
    ("No information about the spine is available.", None),
    ("It depends on the patient's age.", None),
    ("Inconclusive.", None),
    ("It is unclear what the marker refers to.", None),
    ("I cannot provide a yes or no answer here.", None),
    ("Yes or no cannot be decided from this view.", None),
    ("Not sure.", None),
    ("Possibly.", None),
    # empty, off-vocabulary and look-alike words
    ("", None),
    ("   \n\t ", None),
    ("Normal.", None),
    ("Nope.", None),
    ("Yeah, it is.", None),
    ("Yesterday's film was similar.", None),
    ("Knowledge of prior films would help.", None),
    ("Nonetheless.", None),
]


@pytest.mark.parametrize(("answer", "label"), VARIANTS)
def test_hand_written_variants(answer: str, label: str | None) -> None:
    assert parse_yes_no(answer) == label


def test_first_sentence_boundaries() -> None:
    assert first_sentence("No. Yes.") == "No."
    assert first_sentence("Yes (see above. It is fine). No.") == "Yes (see above. It is fine)."
    assert first_sentence('It ends in a "Yes." Then more.') == 'It ends in a "Yes."'
    assert first_sentence("A 2.0 cm nodule, e.g. a granuloma. Next.") == "A 2.0 cm nodule, e.g. a granuloma."
    assert first_sentence("No; the rest") == "No;"
    assert first_sentence("Nothing; so no. More.") == "Nothing; so no."
    assert first_sentence("First line\nsecond line") == "First line"
    assert first_sentence("  no end mark  ") == "no end mark"


# --- every released VQA test answer parses to its gold label ---------------------------------------------------

# The gold label of an answer that opens with a bare "yes"/"no" word ("No.", "- Yes", "No (based on ...)") is
# that word; answers that do not were labelled by reading them with their question (None: the answer declines).
BARE_FIRST_WORD = re.compile(r"^\s*(?:[-*]\s*)?(yes|no)(?=\s*(?:$|[^\w\s]))", re.IGNORECASE)

IUXRAY_HAND_LABELS: dict[int, str | None] = {
    18: None,  # no information provided
    22: NO,  # "would be no" per report
    39: None,  # cannot give yes/no
    41: NO,  # not mentioned, so no
    74: None,  # not provided, cannot answer
    124: None,  # empty answer
    163: YES,  # leans yes, then caveat
    172: None,  # cannot be determined
    203: NO,  # so likely no
    261: NO,  # likely no, not definitive
    285: NO,  # answer is no
    291: None,  # information not provided
    479: None,  # cannot be determined
    499: None,  # echoed question only
    532: NO,  # answer would be no
    533: NO,  # answer would be no
    536: NO,  # would likely be no
    543: YES,  # interpreted as normal
    567: None,  # unclear placeholder, declines
    645: None,  # cannot be determined
    658: NO,  # answer would be no
    757: YES,  # echoed question, then yes
    758: NO,  # echoed question, then no
    759: YES,  # echoed question, then yes
    760: NO,  # echoed question, then no
    761: NO,  # echoed question, then no
    771: None,  # depends on context
    834: None,  # not clear
    835: None,  # cannot be answered
    953: NO,  # would likely be no
    954: NO,  # answer would be no
    995: YES,  # echoed question, then yes
    996: NO,  # echoed question, then no
    997: NO,  # echoed question, then no
    998: NO,  # echoed question, then no
    999: YES,  # echoed question, then yes
    1012: None,  # no answer possible
    1013: None,  # no answer possible
    1140: None,  # cannot be determined
    1158: None,  # cannot be derived
    1221: None,  # cannot be determined
    1222: NO,  # answer would be no
    1247: YES,  # echoed question, then yes
    1248: YES,  # echoed question, then yes
    1249: NO,  # echoed question, then no
    1250: YES,  # echoed question, then yes
    1298: NO,  # therefore likely no
    1425: None,  # cannot answer (parenthesised)
    1543: None,  # no information provided
    1571: NO,  # echoed question, then no
    1572: NO,  # echoed question, then no
    1620: None,  # cannot be determined
    1627: NO,  # no indication
    1753: NO,  # echoed question, then no
    1754: NO,  # echoed question, then no
    1755: NO,  # echoed question, then no
    1756: NO,  # echoed question, then no
    1757: YES,  # echoed question, then yes
    1761: None,  # cannot determine
    1840: NO,  # answer is no
    1844: None,  # not confirmed
    1845: None,  # no information
    1849: NO,  # answer should be no
    1880: None,  # not mentioned
    1882: NO,  # no abnormality, caveat
    1887: None,  # cannot determine
    1917: None,  # cannot determine
    1931: None,  # cannot answer
    2006: NO,  # likelihood is no
    2020: NO,  # answer would be no
    2067: NO,  # no indication
    2090: None,  # definitive answer impossible
    2102: NO,  # answer should be no
    2175: NO,  # does not indicate it
    2224: NO,  # implied not visible
    2352: None,  # inconclusive
    2357: NO,  # answer is no
    2358: YES,  # answer is yes
    2408: NO,  # assumption is no
    2490: None,  # cannot be determined
    2538: NO,  # answer would be no
    2555: YES,  # parenthetical, then yes
}

# Every PMC-OA answer opens with a bare "Yes" or "No".
PMC_OA_HAND_LABELS: dict[int, str | None] = {}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("filename", "hand_labels"),
    [("iuxray_test.jsonl", IUXRAY_HAND_LABELS), ("pmc-oa_test.jsonl", PMC_OA_HAND_LABELS)],
)
def test_released_answers_parse_to_gold(release_dir: Path, filename: str, hand_labels: dict[int, str | None]) -> None:
    records = _read_jsonl(release_dir / "test" / "vqa" / filename)
    assert records, f"{filename} has no records"

    not_bare = {record["question_id"] for record in records if not BARE_FIRST_WORD.match(record["answer"])}
    assert not_bare == set(hand_labels), (
        f"{filename}: hand labels are stale; unlabelled non-bare answers {sorted(not_bare - set(hand_labels))}, "
        f"labels for bare or missing answers {sorted(set(hand_labels) - not_bare)}"
    )

    disagreeing = []
    for record in records:
        question_id, answer = record["question_id"], record["answer"]
        bare = BARE_FIRST_WORD.match(answer)
        gold = bare.group(1).lower() if bare else hand_labels[question_id]
        if parse_yes_no(answer) != gold:
            disagreeing.append(question_id)
    assert not disagreeing, f"{filename}: parse_yes_no disagrees with the gold label for question_ids {disagreeing}"
    # Real answers have answer structure: the strict rule reads every one as the standard rule does.
    strict_differs = [
        r["question_id"] for r in records if parse_yes_no(r["answer"], "strict") != parse_yes_no(r["answer"])
    ]
    assert not strict_differs, f"{filename}: the strict rule differs on question_ids {strict_differs}"


# --- the strict rule: answer structure ---------------------------------------------------------------------------

# (answer, how the rule reads it, standard label, strict label). Written for these tests.
STRUCTURE: list[tuple[str, str, str | None, str | None]] = [
    ("Yes.", "bare", YES, YES),
    ("The answer is no.", "explicit", NO, NO),
    ("It cannot be determined from the image.", "uncertain", None, None),
    ("Cardiomegaly is present.", "finding", YES, YES),  # the cue within the first three words
    ("The heart is not enlarged.", "finding", NO, NO),  # a determiner opens it
    ("According to the image, there is a small effusion.", "finding", YES, YES),
    ("no pneumothorax", "finding", NO, NO),  # short: needs no closing mark
    ("Pleural effusion is seen", "finding", YES, YES),
    ("There is no effusion", "finding", NO, NO),
    # word salad: a finding word, but no sentence around it
    ("consolidation changed bony vascularity shows being soft.", "unstructured", YES, None),
    ("typical cell diabetes patient evaluation gallbladder atelectasis without infiltration", "unstructured", NO, None),
    ("the mass heart shows lobe lung effusion opacity normal left right apex pleural base", "unstructured", YES, None),
    ("rat important overall mass conditions mediastinum visually abnormalities", "nothing", None, None),
    ("", "nothing", None, None),
]


@pytest.mark.parametrize(("answer", "how", "standard", "strict"), STRUCTURE)
def test_the_strict_rule_reads_only_answers_with_structure(answer, how, standard, strict) -> None:
    reading, strict_reading = read_yes_no(answer), read_yes_no(answer, "strict")
    assert (reading.label, reading.how) == (standard, how)
    assert (strict_reading.label, strict_reading.how) == (strict, how)
    assert parse_yes_no(answer) == standard and parse_yes_no(answer, "strict") == strict


def test_word_salad_is_read_by_the_standard_rule_and_mostly_not_by_the_strict_one() -> None:
    # What an untrained model writes: random words of its vocabulary (the tiny tokenizer's), 3 to 30 of them.
    words = sorted(word for word in tiny_tokenizer().get_vocab() if not word.startswith("<"))
    rng = random.Random(0)
    salad = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(2000)]
    standard = sum(parse_yes_no(text) is not None for text in salad)
    strict = sum(parse_yes_no(text, "strict") is not None for text in salad)
    assert standard > 0.10 * len(salad), standard  # the problem is real...
    assert strict < 0.015 * len(salad), strict  # ...and the strict rule removes nearly all of it
    with pytest.raises(ValueError, match="standard, strict"):
        parse_yes_no("Yes.", "lenient")


# --- arbitrary strings ----------------------------------------------------------------------------------------

_FRAGMENTS = [
    "yes", "no", "not", "there is", "answer", "so", "(", ")", '"', "'", ".", ";", "?", "!", ",", "-", "1.",
    "\n", " ", "  ", "e.g.", "cannot", "without", "\u201c", "\u2019", "\u00e9", "\u2022", "shows", "implied that",
]  # fmt: skip


def _random_strings(count: int, seed: int = 20240601) -> list[str]:
    rng = random.Random(seed)
    alphabet = [chr(code) for code in range(32, 127)] + ["\n", "\t", "\u00a0", "\u201d", "\u2018", "\u4e2d"]
    strings = []
    for _ in range(count):
        pieces = [
            rng.choice(_FRAGMENTS) if rng.random() < 0.5 else "".join(rng.choices(alphabet, k=rng.randint(0, 8)))
            for _ in range(rng.randint(0, 30))
        ]
        strings.append("".join(pieces))
    return strings


def test_never_raises_and_returns_only_labels() -> None:
    for text in _random_strings(400):
        assert parse_yes_no(text) in (YES, NO, None), repr(text)
        assert isinstance(first_sentence(text), str)
