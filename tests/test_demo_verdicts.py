"""The demo's verdicts on hand-built figures: which claim holds when, over one seed and over several.

The smoke demo (tests/test_demo.py) checks that REPORT.md shows what the run's files say; these check the rules
that turn those figures into "held", "did not hold" and "inconclusive", where the smoke run's noisy numbers
cannot be chosen.
"""

from __future__ import annotations

import pytest

from mmed_rag.demo.report import verdicts
from mmed_rag.eval.copying import Share

MODALITIES = ("radiology", "pathology", "ophthalmology")


def estimate(value: float, half: float = 0.03) -> dict:
    return {"value": value, "low": value - half, "high": value + half}


def vqa(accuracy: dict[str, float]) -> dict:
    return {
        group: {"accuracy": estimate(value), "f1": estimate(value), "auc": estimate(value)}
        for group, value in accuracy.items()
    }


def seed(copy_before: tuple[int, int], copy_after: tuple[int, int], rag: float = 0.82, rag_pt: float = 0.82):
    plain = {group: 0.6 for group in (*MODALITIES, "overall")}
    with_reports = {group: rag for group in (*MODALITIES, "overall")}
    after = {group: rag_pt for group in (*MODALITIES, "overall")}
    return {
        "vqa": {
            "no_rag": vqa(plain),
            "rag_fixed": vqa(with_reports),
            "rag_adaptive": vqa(with_reports),
            "rag_pt": vqa(after),
        },
        "copying": {
            "before": {"copy_reliance": Share(*copy_before).to_dict()},
            "after": {"copy_reliance": Share(*copy_after).to_dict()},
        },
        "reports": {},
    }


def figures(*seeds: dict) -> dict:
    return {
        "retrieval": {m: {"recall": {"5": 0.5}, "chance": {"5": 0.1}} for m in MODALITIES},
        "domain": {"accuracy": 1.0},
        "seeds": list(seeds),
    }


def rag_pt_row(rows: list[tuple[str, str, str]]) -> tuple[str, str, str]:
    (row,) = [row for row in rows if row[0].startswith("RAG-PT lowers the copy-reliance share")]
    return row


def test_one_seed_lower_within_noise_is_inconclusive_and_apart_holds():
    _, result, evidence = rag_pt_row(verdicts(figures(seed((90, 100), (85, 100)))))
    assert result == "inconclusive: lower, within noise" and "over" not in evidence
    _, result, _ = rag_pt_row(verdicts(figures(seed((90, 100), (40, 100)))))
    assert result == "held"
    _, result, _ = rag_pt_row(verdicts(figures(seed((80, 100), (85, 100)))))
    assert result == "did not hold"
    # Lower copy reliance bought with accuracy (intervals apart, lower) does not count.
    _, result, _ = rag_pt_row(verdicts(figures(seed((90, 100), (40, 100), rag=0.82, rag_pt=0.70))))
    assert result == "did not hold"


def test_three_seeds_report_the_t_interval_of_the_change():
    # Changes -0.05, -0.04, -0.06: mean -0.05, sd 0.01, t(0.975, 2) = 4.303 -> half width 0.0248.
    seeds = [seed((90, 100), (85, 100)), seed((90, 100), (86, 100)), seed((90, 100), (84, 100))]
    _, result, evidence = rag_pt_row(verdicts(figures(*seeds)))
    half = 4.302652729911275 * 0.01 / 3**0.5
    assert f"over 3 seeds the change is -0.050, 95% interval [{-0.05 - half:+.3f}, {-0.05 + half:+.3f}]" in evidence
    assert "(excludes zero)" in evidence and result == "held"


def test_three_seeds_whose_interval_holds_zero_are_inconclusive():
    # Changes -0.10, +0.02, -0.01: the first seed alone would be apart-ish, the spread says noise.
    seeds = [seed((90, 100), (80, 100)), seed((90, 100), (92, 100)), seed((90, 100), (89, 100))]
    _, result, evidence = rag_pt_row(verdicts(figures(*seeds)))
    assert "(does not exclude zero)" in evidence
    assert result == "inconclusive: lower, within noise"


@pytest.mark.parametrize("gains, expected", [(3, "held"), (2, "held"), (1, "did not hold")])
def test_rag_gain_needs_two_modalities_apart(gains, expected):
    block = seed((90, 100), (85, 100))
    for modality in MODALITIES[gains:]:
        block["vqa"]["rag_fixed"][modality]["accuracy"] = estimate(0.62)
    (row,) = [row for row in verdicts(figures(block)) if row[0].startswith("RAG raises VQA accuracy")]
    assert row[1] == expected


def test_written_reports_claim_needs_the_findings_intervals_apart():
    def with_reports(plain: tuple[int, int], rag: tuple[int, int]) -> dict:
        block = seed((90, 100), (85, 100))
        block["reports"] = {
            "no_rag": {"findings_right": {"overall": Share(*plain).to_dict()}},
            "rag_fixed": {"findings_right": {"overall": Share(*rag).to_dict()}},
        }
        return block

    def row(block: dict) -> tuple[str, str, str]:
        (found,) = [row for row in verdicts(figures(block)) if row[0].startswith("RAG makes the written reports")]
        return found

    assert row(with_reports((600, 1000), (800, 1000)))[1] == "held"
    assert row(with_reports((600, 1000), (620, 1000)))[1] == "did not hold"
    assert "(600/1000)" in row(with_reports((600, 1000), (620, 1000)))[2]
    # No report runs (an older demo folder): no claim about them.
    assert not [r for r in verdicts(figures(seed((90, 100), (85, 100)))) if r[0].startswith("RAG makes the written")]


def test_over_seeds_the_mean_change_decides_not_the_first_seed():
    # Seed 0 rises (+0.05), the others fall (-0.10, -0.08): lower on average, the interval holds zero.
    seeds = [seed((80, 100), (85, 100)), seed((90, 100), (80, 100)), seed((90, 100), (82, 100))]
    _, result, evidence = rag_pt_row(verdicts(figures(*seeds)))
    assert "over 3 seeds the change is -0.043" in evidence
    assert result == "inconclusive: lower, within noise"
