"""The copy-reliance analyses on hand-made correctness tables, where every share can be counted by eye."""

import pytest

from mmed_rag.eval.copying import Share, copy_reliance

# question: (right with reports, right without, right with reports + noise image)
TABLE = {
    1: (True, False, True),  # retrieval fixed it ... and noise still "answers" it: copied
    2: (True, False, True),  # copied
    3: (True, False, False),  # fixed, and needs the image: genuine use of the reports
    4: (False, True, False),  # misled by the reports
    5: (True, True, True),
    6: (True, True, False),
    7: (False, False, False),
}


def runs(table):
    names = ("retrieval", "no_retrieval", "retrieval_noised")
    return {name: {key: row[column] for key, row in table.items()} for column, name in enumerate(names)}


def test_shares_count_questions_compared_with_themselves():
    report = copy_reliance(runs(TABLE))
    assert (report.copy_reliance.count, report.copy_reliance.total) == (2, 3)
    assert (report.misled.count, report.misled.total) == (1, 3)
    assert (report.noised_still_correct.count, report.noised_still_correct.total) == (3, 5)
    assert report.accuracy["retrieval"].value == pytest.approx(5 / 7)
    assert report.accuracy["no_retrieval"].value == pytest.approx(3 / 7)
    assert report.questions == 7
    document = report.to_dict()
    assert document["copy_reliance"]["value"] == pytest.approx(2 / 3)
    low, high = document["copy_reliance"]["ci95"]
    assert 0 < low < 2 / 3 < high < 1


def test_without_the_noised_run_only_misled_is_defined():
    partial = runs(TABLE)
    del partial["retrieval_noised"]
    report = copy_reliance(partial)
    assert report.copy_reliance is None and report.noised_still_correct is None
    assert report.misled.value == pytest.approx(1 / 3)


def test_an_empty_condition_is_undefined_not_zero():
    share = copy_reliance(runs({1: (True, True, True)})).copy_reliance
    assert share.total == 0 and share.value is None and share.interval() == (None, None)


def test_wilson_interval_matches_the_textbook_value():
    low, high = Share(8, 10).interval()
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)


def test_runs_must_answer_the_same_questions():
    mismatched = runs(TABLE)
    del mismatched["retrieval_noised"][3]
    with pytest.raises(ValueError, match="retrieval_noised.*same questions"):
        copy_reliance(mismatched)
    with pytest.raises(ValueError, match="need the 'no_retrieval' run"):
        copy_reliance({"retrieval": {1: True}})


def test_reports_of_all_runs_are_judged_against_one_cutoff():
    from mmed_rag.eval.correctness import ReportJudge, judge_runs

    golds = ["the heart is enlarged and there is a small left pleural effusion .", "the lungs are clear ."]
    runs = {
        "retrieval": (golds, golds),  # perfect: BLEU-4 about 1
        "no_retrieval": (["no acute disease of any kind seen today", "normal chest radiograph at this time"], golds),
    }
    verdicts = judge_runs("report", runs, ReportJudge("BLEU-4", "mean"))
    assert verdicts == {"retrieval": [True, True], "no_retrieval": [False, False]}
    assert judge_runs("vqa", {"r": (["Yes.", "no"], ["Yes", "Yes"])}) == {"r": [True, False]}
    with pytest.raises(ValueError, match="number or 'mean'"):
        ReportJudge.from_options("BLEU-4", "median")
