"""`mmed-rag demo --smoke`: the report's figures are the prediction files' figures, and a broken retriever shows.

The smoke demo runs the whole recipe (phantoms, retrievers, domain classifier, the stand-in's SFT, five test runs,
RAG-PT, five more) on a few hundred images. Its numbers are noisy, so nothing here asserts that MMed-RAG works;
what is asserted is that REPORT.md reports exactly what the run's files say, that a rerun skips every step, and
that shuffling the index rows (a retriever that returns unrelated reports) shows up where it must: recall at
chance and retrieved reports no better than random about the findings asked of.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmed_rag.cli import main
from mmed_rag.data.phantoms import findings_in_report
from mmed_rag.eval.yesno import parse_yes_no

MODALITIES = ("radiology", "pathology", "ophthalmology")
RUNS = {"no_rag": "before/no_rag", "rag_fixed": "before/rag_fixed", "rag_adaptive": "before/rag_adaptive"}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def correct(line: dict) -> bool:
    return parse_yes_no(line["prediction"]) == parse_yes_no(line["answer"])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "smoke"
    assert main(["demo", "--smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "shuffled"
    assert main(["demo", "--smoke", "--shuffle-index", "--out", str(out)]) == 0
    return out


def test_report_figures_equal_a_recomputation_from_the_prediction_files(smoke):
    figures = json.loads((smoke / "report.json").read_text())
    report = (smoke / "REPORT.md").read_text()
    seed = figures["seeds"][0]
    runs = dict(RUNS)
    if "rag_pt" in seed["vqa"]:
        runs["rag_pt"] = "after/rag_fixed"
    accuracy_section = report.split("## VQA accuracy", 1)[1].split("\n## ", 1)[0]
    table = {row.split("|")[1].strip(): row for row in accuracy_section.splitlines() if row.startswith("| ")}
    for condition, run in runs.items():
        predictions = lines(smoke / "seed0" / "runs" / f"{run}.jsonl")
        for modality in MODALITIES:
            mine = [correct(line) for line in predictions if line["modality"] == modality]
            accuracy = sum(mine) / len(mine)
            assert seed["vqa"][condition][modality]["accuracy"]["value"] == pytest.approx(accuracy, abs=1e-12)
            assert f"{accuracy:.3f}" in table[modality]
        overall = sum(map(correct, predictions)) / len(predictions)
        assert seed["vqa"][condition]["overall"]["accuracy"]["value"] == pytest.approx(overall, abs=1e-12)

    # Copy reliance: of the questions the reports turned right (wrong without them), the share still right with
    # the reports beside a noise image instead of the image.
    def answers(run: str) -> dict:
        return {line["question_id"]: correct(line) for line in lines(smoke / f"seed0/runs/before/{run}.jsonl")}

    rag, plain, noised = answers("rag_fixed"), answers("no_rag"), answers("rag_noised")
    helped = [key for key in rag if rag[key] and not plain[key]]
    share = seed["copying"]["before"]["copy_reliance"]
    assert (share["count"], share["total"]) == (sum(noised[key] for key in helped), len(helped))
    right = [key for key in rag if rag[key]]
    still = seed["copying"]["before"]["noised_still_correct"]
    assert (still["count"], still["total"]) == (sum(noised[key] for key in right), len(right))
    assert f"({still['count']}/{still['total']})" in report
    # Pair counts are the pair files' lengths.
    if seed["pairs"] is not None:
        for stage in ("stage1", "stage2"):
            pairs = json.loads((smoke / "seed0/rag-pt/pairs" / f"{stage}.json").read_text())
            assert seed["pairs"][stage] == len(pairs)
    for picture in ("data_grid.png", "vqa_accuracy.png", "copying.png", "domain/confusion_test.png"):
        assert (smoke / picture).stat().st_size > 1000
        assert f"]({picture})" in report


def test_written_reports_figures_equal_a_recomputation(smoke):
    from mmed_rag.data.phantoms import FINDINGS

    figures = json.loads((smoke / "report.json").read_text())
    reports = figures["seeds"][0]["reports"]
    report = (smoke / "REPORT.md").read_text()
    runs = {"no_rag": "before/report_no_rag", "rag_fixed": "before/report_rag_fixed"}
    if "rag_pt" in figures["seeds"][0]["vqa"]:
        runs["rag_pt"] = "after/report_rag_fixed"
    assert set(reports) == set(runs)
    for condition, run in runs.items():
        predictions = lines(smoke / "seed0" / "runs" / f"{run}.jsonl")
        assert len(predictions) == sum(figures["data"]["counts"][m]["test"] for m in MODALITIES)
        right = total = 0
        for line in predictions:
            truth = findings_in_report(line["modality"], line["report"])
            said = findings_in_report(line["modality"], line["prediction"])
            right += sum(said.get(finding) == truth[finding] for finding in FINDINGS[line["modality"]])
            total += len(FINDINGS[line["modality"]])
        share = reports[condition]["findings_right"]["overall"]
        assert (share["count"], share["total"]) == (right, total)
        assert f"({right}/{total})" in report
        # The text metrics are the eval stage's own (Java runs them; CI installs it with `make java`).
        phase, mode = run.split("/report_")
        metrics = json.loads((smoke / "seed0/eval" / phase / "report" / mode / "metrics.json").read_text())
        mine = reports[condition]["metrics"]["overall"]["BLEU-4"]
        assert [mine["value"], mine["low"], mine["high"]] == [
            metrics["overall"]["BLEU-4"],
            *metrics["overall"]["ci95"]["BLEU-4"],
        ]
        assert f"{metrics['overall']['METEOR']:.3f} [{metrics['overall']['ci95']['METEOR'][0]:.3f}, " in report


def test_reports_right_is_what_the_prompts_held(smoke):
    seed = json.loads((smoke / "report.json").read_text())["seeds"][0]
    for modality in MODALITIES:
        predictions = [
            line for line in lines(smoke / "seed0/runs/before/rag_fixed.jsonl") if line["modality"] == modality
        ]
        top = [
            findings_in_report(modality, line["reference_reports"][0])[line["finding"]]
            == findings_in_report(modality, line["report"])[line["finding"]]
            for line in predictions
        ]
        assert seed["reports_right"][modality]["top1"] == pytest.approx(sum(top) / len(top))


def test_a_second_run_skips_every_step_and_rewrites_the_same_report(smoke):
    before = json.loads((smoke / "report.json").read_text())
    assert main(["demo", "--smoke", "--out", str(smoke)]) == 0
    after = json.loads((smoke / "report.json").read_text())
    assert after["steps"] and all(step["skipped"] for step in after["steps"])
    assert after["seeds"] == before["seeds"] and after["retrieval"] == before["retrieval"]


def test_shuffled_index_rows_show_chance_recall_and_uninformative_reports(smoke, shuffled):
    honest = json.loads((smoke / "report.json").read_text())
    broken = json.loads((shuffled / "report.json").read_text())
    for modality in MODALITIES:
        bad = broken["retrieval"][modality]
        queries = bad["queries"]
        chance = bad["chance"]["5"]
        # A shuffled index ranks the reports at random: recall@5 within three binomial deviations of chance.
        assert abs(bad["recall"]["5"] - chance) <= 3 * (chance * (1 - chance) / queries) ** 0.5
    # The smoke retriever (60 pairs, 24 queries a modality) is noisy one modality at a time; over the three it
    # must beat the shuffled one.
    assert sum(honest["retrieval"][m]["recall"]["5"] for m in MODALITIES) > sum(
        broken["retrieval"][m]["recall"]["5"] for m in MODALITIES
    )
    honest_right = honest["seeds"][0]["reports_right"]
    broken_right = broken["seeds"][0]["reports_right"]
    assert sum(b["majority"] for b in broken_right.values()) < sum(h["majority"] for h in honest_right.values())
    # No retriever, no gain: with unrelated reports RAG is not better than no RAG beyond the intervals.
    vqa = broken["seeds"][0]["vqa"]
    assert vqa["rag_fixed"]["overall"]["accuracy"]["low"] <= vqa["no_rag"]["overall"]["accuracy"]["high"]


def test_demo_readme_replaces_only_its_section_and_copies_the_plots(smoke, tmp_path):
    from mmed_rag.demo.readme import BEGIN, END, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nold\n{END}\n\n## after\n")
    update_readme(smoke, readme, "docs/demo")
    text = readme.read_text()
    assert text.startswith("# title\n\n") and text.endswith("\n\n## after\n") and "\nold\n" not in text
    figures = json.loads((smoke / "report.json").read_text())
    overall = figures["seeds"][0]["vqa"]["no_rag"]["overall"]["accuracy"]["value"]
    assert f"{overall:.3f}" in text and "| claim | result | evidence |" in text
    for plot in ("vqa_accuracy.png", "copying.png"):
        assert (tmp_path / "docs/demo" / plot).read_bytes() == (smoke / plot).read_bytes()
        assert f"](docs/demo/{plot})" in text
