"""Report-generation metrics: equal to pycocoevalcap's scorers called directly, and errors instead of zeros.

Java starts a METEOR process in seconds, so the module scores with one shared ReportScorer and one directly
called pycocoevalcap Meteor, both started once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from rouge_score.rouge_scorer import RougeScorer

from mmed_rag.eval.report import (
    ALL_METRICS,
    MetricUnavailableError,
    ReportInputError,
    ReportScorer,
    ptb_tokenize,
    score_reports,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="report metrics need Java (make java)")

# Hand-written chest X-ray reports in the IU-Xray style; the fourth example has two references, the fifth
# prediction a line break and the '|||' that separates METEOR's fields.
REFERENCES = [
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Cardiomegaly. Small bilateral pleural effusions. No pneumothorax.",
    "Lungs are hyperexpanded. No focal consolidation. Heart size within normal limits.",
    [
        "Mild cardiomegaly with pulmonary vascular congestion, consistent with edema.",
        "The heart is enlarged. Interstitial edema is present.",
    ],
    "Right lower lobe opacity, concerning for pneumonia. No pleural effusion.",
    "Calcified granuloma in the left upper lobe. Otherwise the lungs are clear. T-spine degenerative changes.",
]
PREDICTIONS = [
    "Heart size is normal. The lungs are clear. No pleural effusion.",
    "The heart is enlarged. Bilateral pleural effusions, small. No pneumothorax.",
    "The lungs are clear.\nHeart size normal. No focal consolidation.",
    "Cardiomegaly with mild pulmonary edema.",
    "Opacity in the right lower lobe ||| may represent pneumonia.\nNo effusion.",
    "No acute cardiopulmonary abnormality. Degenerative changes of the spine.",
]
IDS = ["cxr-1", "cxr-2", "cxr-3", "cxr-4", "cxr-5", "cxr-6"]


def _as_lists(references):
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _stop(meteor: Meteor) -> None:
    """Stop a directly created pycocoevalcap Meteor now, rather than whenever its __del__ runs."""
    meteor.meteor_p.stdin.close()
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    meteor.meteor_p.stdout.close()
    meteor.meteor_p.stderr.close()


@pytest.fixture(scope="module")
def direct_meteor():
    meteor = Meteor()  # returns at once: the jar loads while the module's other fixtures run
    yield meteor
    _stop(meteor)


@pytest.fixture(scope="module")
def scorer():
    with ReportScorer() as shared:
        yield shared


def _direct(predictions, references, meteor: Meteor) -> tuple[dict, dict]:
    """pycocoevalcap as its own example uses it: PTBTokenizer, then each scorer; corpus and per-example scores."""
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(_as_lists(references))})
    bleu, bleu_rows = Bleu(4).compute_score(gts, res, verbose=0)
    corpus = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    rows = {f"BLEU-{n + 1}": bleu_rows[n] for n in range(4)}
    for name, metric in (("ROUGE-L", Rouge()), ("METEOR", meteor), ("CIDEr", Cider())):
        corpus[name], rows[name] = metric.compute_score(gts, res)
    return corpus, rows


@pytest.fixture(scope="module")
def handwritten(scorer, direct_meteor):
    ours = scorer.score(PREDICTIONS, REFERENCES, ids=IDS)
    return ours, _direct(PREDICTIONS, REFERENCES, direct_meteor)


@needs_java
def test_corpus_scores_equal_pycocoevalcap_called_directly(handwritten):
    ours, (direct, _) = handwritten
    assert list(ours.corpus) == list(ALL_METRICS)
    for name in ALL_METRICS:
        assert ours.corpus[name] == pytest.approx(direct[name], abs=1e-12, rel=0), name
    assert 0 < ours.corpus["BLEU-4"] < ours.corpus["BLEU-1"] < 1


@needs_java
def test_bootstrap_intervals_are_percentiles_of_each_resample_scored_as_a_corpus(scorer, direct_meteor):
    import numpy as np

    bootstrap, seed = 7, 3
    ours = scorer.score(PREDICTIONS, REFERENCES, ids=IDS, bootstrap=bootstrap, seed=seed)
    assert ours.corpus == scorer.score(PREDICTIONS, REFERENCES, ids=IDS).corpus  # the point is unchanged
    resampled = {name: [] for name in ALL_METRICS}
    for rows in np.random.default_rng(seed).integers(0, len(PREDICTIONS), size=(bootstrap, len(PREDICTIONS))):
        corpus, _ = _direct([PREDICTIONS[r] for r in rows], [REFERENCES[r] for r in rows], direct_meteor)
        for name in ALL_METRICS:
            resampled[name].append(corpus[name])
    assert list(ours.intervals) == list(ALL_METRICS)
    for name, values in resampled.items():
        expected = (np.percentile(values, 2.5), np.percentile(values, 97.5))
        assert ours.intervals[name] == pytest.approx(expected, abs=1e-12, rel=0), name
        assert ours.intervals[name][0] < ours.intervals[name][1]
    assert scorer.score(PREDICTIONS, REFERENCES, ids=IDS).intervals == {}


@needs_java
def test_per_example_rows_carry_the_ids_and_pycocoevalcap_per_example_scores(handwritten):
    ours, (_, direct_rows) = handwritten
    assert [row["id"] for row in ours.per_example] == IDS
    for name in ALL_METRICS:
        assert [row[name] for row in ours.per_example] == pytest.approx(list(direct_rows[name]), abs=1e-12, rel=0)
    # ROUGE-L and CIDEr are means over examples; BLEU and METEOR pool counts over the corpus instead.
    for name in ("ROUGE-L", "CIDEr"):
        assert ours.corpus[name] == pytest.approx(sum(r[name] for r in ours.per_example) / len(IDS), abs=1e-12)


class _Whitespace:
    """The PTB output is already tokenised: rouge-score must only split it."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@needs_java
def test_rouge_l_equals_rouge_score_lcs_with_cocos_beta(handwritten):
    ours, _ = handwritten
    reference_lists = _as_lists(REFERENCES)
    tokens = iter(ptb_tokenize([*PREDICTIONS, *(ref for refs in reference_lists for ref in refs)]))
    predictions = [next(tokens) for _ in PREDICTIONS]
    references = [[next(tokens) for _ in refs] for refs in reference_lists]
    lcs = RougeScorer(["rougeL"], tokenizer=_Whitespace())
    beta2 = 1.2**2
    expected = []
    for prediction, refs in zip(predictions, references, strict=True):
        scores = [lcs.score(ref, prediction)["rougeL"] for ref in refs]
        # pycocoevalcap takes the best precision and the best recall over the references, each on its own.
        p, r = max(s.precision for s in scores), max(s.recall for s in scores)
        expected.append((1 + beta2) * p * r / (r + beta2 * p) if p and r else 0.0)
    assert [row["ROUGE-L"] for row in ours.per_example] == pytest.approx(expected, abs=1e-6)
    assert ours.corpus["ROUGE-L"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)


@needs_java
def test_references_scored_against_themselves_are_perfect(scorer):
    references = [refs if isinstance(refs, str) else refs[0] for refs in REFERENCES]
    scores = scorer.score(references, references)
    # pycocoevalcap's BLEU divides (matches + 1e-15) by (n-grams + 1e-9): 1 to within 1e-9, not exactly.
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert scores.corpus[name] == pytest.approx(1.0, abs=1e-9)
    assert scores.corpus["ROUGE-L"] == 1.0
    # METEOR 1.5 drops the fragmentation penalty for a perfect match, so identical strings give exactly 1.
    assert scores.corpus["METEOR"] == 1.0
    # CIDEr: per n-gram order the cosine of identical tf-idf vectors is 1, the length penalty is exp(0) = 1, and
    # the mean over n = 1..4 is multiplied by 10. It needs every report to have 4+ tokens and, for each n, an
    # n-gram not found in every reference (those weigh idf = 0): true of these distinct reports.
    assert scores.corpus["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    assert all(row["CIDEr"] == pytest.approx(10.0, abs=1e-9) for row in scores.per_example)


@needs_java
def test_cider_of_a_one_example_corpus_is_zero_by_its_definition():
    """idf = log(1 / 1) for every n-gram: the score says nothing, which is why CIDEr needs a whole test set."""
    scores = score_reports(PREDICTIONS[:1], REFERENCES[:1], metrics=["CIDEr", "BLEU-1"])
    assert scores.corpus["CIDEr"] == 0.0
    assert list(scores.corpus) == ["CIDEr", "BLEU-1"]


@needs_java
def test_tokenisation_equals_pycocoevalcap_and_keeps_rows_aligned_on_carriage_returns():
    texts = [*PREDICTIONS, "Heart size 12x14 cm; aorta: tortuous (mild).", 'Don\'t see "any" -- effusion!', "..."]
    coco = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert ptb_tokenize(texts) == [coco[i][0] for i in range(len(texts))]
    # pycocoevalcap's wrapper replaces only '\n'; Java also breaks lines at '\r' and would shift later rows.
    assert ptb_tokenize(["No effusion.\r\nNo pneumothorax.", "Lungs clear."]) == [
        "no effusion no pneumothorax",
        "lungs clear",
    ]


@needs_java
def test_released_iuxray_reports_score_as_pycocoevalcap_does(release_dir, scorer, direct_meteor):
    records = json.loads((release_dir / "test" / "report" / "iuxray_test.json").read_text(encoding="utf-8"))[:200]
    references = [r["report"] for r in records]
    predictions = references[1:] + references[:1]  # fluent, plausible, and about another patient
    coco = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(references)})
    assert ptb_tokenize(references) == [coco[i][0] for i in range(len(references))]
    ours = scorer.score(predictions, references, ids=[r["id"] for r in records])
    direct, _ = _direct(predictions, references, direct_meteor)
    for name in ALL_METRICS:
        assert ours.corpus[name] == pytest.approx(direct[name], abs=1e-12, rel=0), name
    assert 0.1 < ours.corpus["BLEU-1"] < 0.9


@needs_java
def test_empty_prediction_scores_zero_and_is_named_in_a_warning(scorer, caplog):
    with caplog.at_level(logging.WARNING, logger="mmed_rag.eval.report"):
        scores = scorer.score(["", *PREDICTIONS[1:], "..."], [*REFERENCES, "Lungs are clear."], ids=[*IDS, "dots"])
    assert "'cxr-1'" in caplog.text and "'dots'" in caplog.text
    for row in (scores.per_example[0], scores.per_example[-1]):
        assert all(row[name] == 0.0 for name in ALL_METRICS)


@pytest.mark.parametrize(
    ("predictions", "references", "ids", "message"),
    [
        (PREDICTIONS[:2], REFERENCES[:3], None, "2 predictions but 3 references"),
        (["ok", None], REFERENCES[:2], ["a", "b"], "example 1 (id 'b'): prediction is None"),
        (["ok", "ok"], [REFERENCES[0], []], None, "example 1 (id 1): empty reference list"),
        (["ok", "ok"], [REFERENCES[0], "  "], None, "example 1 (id 1): reference 0"),
        (["ok", "ok"], [REFERENCES[0], None], None, "example 1 (id 1): references are None"),
        (["ok", "ok"], REFERENCES[:2], ["a", "a"], "duplicate ids: ['a']"),
        ([], [], None, "no predictions"),
    ],
)
def test_bad_input_is_an_error_naming_the_example(predictions, references, ids, message):
    with pytest.raises(ReportInputError, match=re.escape(message)):
        score_reports(predictions, references, ids=ids, metrics=["BLEU-1"])


@needs_java
def test_a_reference_with_no_tokens_left_is_an_error():
    with pytest.raises(ReportInputError, match="id 'x'.*no tokens left"):
        score_reports(["Lungs clear."], ["..."], ids=["x"], metrics=["BLEU-1"])


def test_unknown_metric_names_the_choices():
    with pytest.raises(ReportInputError, match="unknown \\['BLEU'\\]; choose from BLEU-1"):
        ReportScorer(["BLEU"])


def test_missing_java_is_an_error_with_an_install_hint_not_a_zero(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MetricUnavailableError, match="java not found.*METEOR.*default-jre-headless"):
        score_reports(PREDICTIONS, REFERENCES)
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(MetricUnavailableError, match="BLEU-4 need it.*make java"):
        score_reports(PREDICTIONS, REFERENCES, metrics=["BLEU-4"])


def _fake_java(tmp_path, script: str) -> None:
    java = tmp_path / "java"
    java.write_text(f"#!/bin/sh\n{script}\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)


def test_a_failing_tokenizer_is_reported_with_its_stderr(monkeypatch, tmp_path):
    _fake_java(tmp_path, 'echo "Error: no JVM could be created" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(MetricUnavailableError, match="PTB tokenizer.*status 1: Error: no JVM could be created"):
        score_reports(PREDICTIONS, REFERENCES)


@needs_java
def test_a_failing_meteor_is_reported_with_its_stderr_and_stopped(monkeypatch, tmp_path):
    real_java = shutil.which("java")
    _fake_java(
        tmp_path,
        f'case "$*" in *meteor*) echo "Invalid maximum heap size: -Xmx2G" >&2; exit 1;; esac\nexec {real_java} "$@"',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    scorer = ReportScorer(["METEOR"])
    with pytest.raises(MetricUnavailableError, match="METEOR.*failed.*Invalid maximum heap size"):
        scorer.score(PREDICTIONS, REFERENCES)
    assert scorer.close() == ""  # already stopped when the error was raised
