"""Difference answers read back into findings, and the finding-level difference F1."""

import itertools

import pytest

from mmed_rag.damon.metrics import ADDED, CHANGED, REMOVED, difference_f1, parse_difference
from mmed_rag.damon.phantoms import difference_answer

NAMES = ["cardiomegaly", "pleural effusion", "pneumothorax", "lung nodule"]


def test_every_answer_the_phantoms_write_reads_back_to_its_findings():
    for current_mask, prior_mask in itertools.product(range(16), repeat=2):
        current = [name for bit, name in enumerate(NAMES) if current_mask >> bit & 1]
        prior = [name for bit, name in enumerate(NAMES) if prior_mask >> bit & 1]
        parsed = parse_difference(difference_answer(current, prior))
        expected = {(ADDED, n) for n in current if n not in prior} | {(REMOVED, n) for n in prior if n not in current}
        assert parsed.read and parsed.items == expected, (current, prior)


def test_level_changes_and_unreadable_answers():
    parsed = parse_difference("The level of edema has changed from mild to severe. ")
    assert parsed.items == {(CHANGED, "edema")}
    assert not parse_difference("The heart looks fine.").read
    assert parse_difference("Nothing has changed.").read and not parse_difference("nothing has changed.").items


def test_difference_f1_by_hand():
    references = [
        "the main image has additional findings of edema and pleural effusion than the reference image. ",
        "nothing has changed.",
        "the main image is missing the finding of pneumothorax than the reference image. ",
    ]
    predictions = [
        "the main image has an additional finding of edema than the reference image. ",  # 1 of 2 right
        "nothing has changed.",  # exactly right, no items
        "the main image is missing the finding of atelectasis than the reference image. ",  # wrong finding
    ]
    scores = difference_f1(predictions, references)
    # items: predicted {edema, atelectasis} = 2, expected {edema, effusion, pneumothorax} = 3, right 1
    assert scores["precision"] == pytest.approx(1 / 2) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert scores["exact"] == pytest.approx(1 / 3) and scores["unread"] == 0
    unread = difference_f1(["I am not sure."], references[:1])
    assert (unread["recall"], unread["exact"], unread["unread"]) == (0.0, 0.0, 1)
    with pytest.raises(ValueError, match="reference 0 is not a difference answer"):
        difference_f1(["x"], ["The heart is big."])
