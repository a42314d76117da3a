"""Report-generation metrics: BLEU-1..4, ROUGE-L, METEOR and CIDEr, scored as the coco-caption toolkit scores them.

Every metric is pycocoevalcap's own scorer (``Bleu(4)``, ``Rouge()``, ``Meteor()``, ``Cider()``), run on the
standard caption-evaluation tokenisation: Stanford PTBTokenizer (Java, from pycocoevalcap's jar, lower-cased)
followed by the removal of pycocoevalcap's punctuation tokens. Nothing is re-implemented; the tests check that
:func:`score_reports` equals the scorers called directly, and that the tokenisation equals pycocoevalcap's
``PTBTokenizer``. Scores are on a 0-1 scale, CIDEr on 0-10; nothing is multiplied by 100.

Which variant, and why numbers differ between toolkits
    MMed-RAG reports BLEU, ROUGE-L and METEOR for IU-Xray and MIMIC-CXR. Its scoring code was not released; the
    authors answered that they "used tools like NLTK and rouge_score" (richard-peng-xia/RULE#8, pointed to from
    MMed-RAG#10). The R2Gen line of report-generation papers that such tables are compared with scores with
    pycocoevalcap's scorers (R2Gen's ``modules/metrics.py``), on its own cleaned reports (lower-cased,
    punctuation stripped, " ." kept as a sentence token) rather than on PTBTokenizer output. So the same reports
    give different numbers depending on the toolkit:

    - BLEU here is corpus-level: n-gram counts are summed over the corpus, the brevity penalty uses the closest
      reference length per example, and every precision carries pycocoevalcap's epsilons (1e-15 / 1e-9), so a
      BLEU-4 with no matching 4-gram is tiny but not 0. nltk's ``corpus_bleu`` and sacrebleu use other
      tokenisation, casing and smoothing; the mean of per-example sentence BLEU is yet another number.
    - ROUGE-L here is the LCS F-measure with beta = 1.2 (recall weighted), precision and recall each the maximum
      over the references, averaged over examples. rouge-score's ``rougeL`` is F1 (beta = 1) with its own
      tokeniser (lower-cased, non-alphanumerics dropped).
    - METEOR is the METEOR 1.5 jar (``-l en -norm``: exact, stem, synonym and paraphrase matches). nltk's
      ``meteor_score`` is a re-implementation without paraphrases and needs WordNet data. The corpus METEOR is
      the jar's aggregate over all examples, not the mean of the per-example scores.
    - CIDEr is pycocoevalcap's ``Cider`` (CIDEr-D: clipped n-gram counts, Gaussian length penalty sigma = 6,
      times 10). Its idf is computed over the references of the scored corpus, so a score depends on the test
      set and its size; an n-gram found in every reference weighs 0, and a one-example corpus scores 0.

    A BLEU "near 0.008" for a baseline on the released IU-Xray test set was reported (MMed-RAG#43) without a
    diagnosis. Plausible causes, none confirmed: scoring un-tokenised text (punctuation glued to words, mixed
    case), averaging per-example sentence BLEU without smoothing (any report without a matching 4-gram scores
    0), or comparing a 0-1 score with a table on a 0-100 scale.

Text handling
    Before tokenising, every run of whitespace (line breaks, ``\\r``, form feeds, Unicode line separators)
    becomes one space. The tokenizer runs with ``-preserveLines``, one text per line; pycocoevalcap's wrapper
    replaces only ``\\n``, so a ``\\r`` there silently shifts every later text onto the wrong example. Stanford's
    tokenizer splits ``|`` into single tokens, so METEOR's ``|||`` field separator cannot occur in its input.
    Predictions and references are tokenised in one Java call.

Inputs
    One prediction per example and one or more references. A prediction that is empty (or only punctuation)
    is allowed: it scores 0 on every metric and the ids are logged as a warning. A missing (None) prediction,
    an empty reference list and an empty reference are errors naming the example. Java is required for every
    metric (the tokeniser is Java); without it :class:`MetricUnavailableError` is raised, never a 0.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from mmed_rag.errors import MMedRAGError

logger = logging.getLogger(__name__)

BLEU_METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
ALL_METRICS: tuple[str, ...] = (*BLEU_METRICS, "ROUGE-L", "METEOR", "CIDEr")
JAVA_INSTALL_HINT = "install a Java runtime: sudo apt-get install default-jre-headless (or `make java`)"
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"


class MetricUnavailableError(MMedRAGError, RuntimeError):
    """A metric could not be computed (Java missing or a Java process failed); raised instead of a 0."""


class ReportInputError(MMedRAGError, ValueError):
    """Predictions, references, ids or metric names that cannot be scored."""


@dataclass(frozen=True)
class ReportScores:
    """Corpus scores by metric name, and one row per example: ``{"id": ..., metric: score, ...}``."""

    corpus: dict[str, float]
    per_example: list[dict[str, Any]]
    #: 95% percentile bootstrap interval per metric (each resample's corpus score computed as the point's is);
    #: empty when no bootstrap was asked for.
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)


def require_java(metrics: Sequence[str] = ALL_METRICS) -> str:
    """The path of ``java``, or :class:`MetricUnavailableError` naming the metrics that cannot run without it."""
    java = shutil.which("java")
    if java is None:
        raise MetricUnavailableError(
            f"java not found on PATH; {', '.join(metrics)} need it (the coco-caption tokenisation runs Stanford "
            f"PTBTokenizer and METEOR 1.5 is a Java program). To score reports, {JAVA_INSTALL_HINT}."
        )
    return java


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The coco-caption tokenisation of each text: whitespace collapsed, PTBTokenizer, punctuation tokens removed.

    One Java process for all texts; output equals pycocoevalcap's ``PTBTokenizer`` on texts without line breaks.
    We run the jar ourselves, rather than through that class, to see its exit status and stderr and to avoid its
    temporary file inside the installed package.
    """
    if not texts:
        return []
    java = require_java()
    lines = [" ".join(text.split()) for text in texts]
    jar_dir = Path(ptbtokenizer.__file__).resolve().parent
    command = [java, "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR, _PTB_CLASS, "-preserveLines", "-lowerCase"]
    one_per_line = "".join(f"{line}\n" for line in lines).encode("utf-8")
    try:
        done = subprocess.run(command, cwd=jar_dir, input=one_per_line, capture_output=True)
    except OSError as exc:
        raise MetricUnavailableError(f"could not run the PTB tokenizer ({' '.join(command)}): {exc}") from exc
    stderr = done.stderr.decode("utf-8", errors="replace").strip()
    if done.returncode != 0:
        raise MetricUnavailableError(
            f"the PTB tokenizer (Java, {jar_dir / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR}) exited with status "
            f"{done.returncode}: {stderr or 'no stderr'}"
        )
    logger.debug("PTB tokenizer: %s", stderr)
    out = done.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines) or any(extra.strip() for extra in out[len(lines) :]):
        raise MetricUnavailableError(
            f"the PTB tokenizer returned {len(out)} lines for {len(lines)} texts, so tokens cannot be matched to "
            f"examples; stderr: {stderr or 'none'}"
        )
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(t for t in line.rstrip().split(" ") if t not in punctuation) for line in out[: len(lines)]]


def _checked_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [name for name in metrics if name not in ALL_METRICS]
    if unknown or not metrics:
        raise ReportInputError(f"metrics: unknown {unknown or 'none given'}; choose from {', '.join(ALL_METRICS)}")
    return tuple(dict.fromkeys(metrics))


def _label(position: int, ids: Sequence[Hashable]) -> str:
    return f"example {position} (id {ids[position]!r})"


def _checked_inputs(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], ids: Sequence[Hashable] | None
) -> tuple[list[list[str]], list[Hashable]]:
    """References as a list per example and the ids, or :class:`ReportInputError` naming the bad example."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ReportInputError("predictions and references must be sequences with one entry per example, not a str")
    if len(predictions) != len(references):
        raise ReportInputError(f"{len(predictions)} predictions but {len(references)} references; one entry each")
    if not predictions:
        raise ReportInputError("no predictions to score")
    ids = list(range(len(predictions))) if ids is None else list(ids)
    if len(ids) != len(predictions):
        raise ReportInputError(f"{len(ids)} ids for {len(predictions)} predictions")
    duplicates = [i for i, count in Counter(ids).items() if count > 1]
    if duplicates:
        raise ReportInputError(f"duplicate ids: {duplicates[:10]}")
    reference_lists = []
    for position, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(prediction, str):
            got = "None" if prediction is None else type(prediction).__name__
            raise ReportInputError(f"{_label(position, ids)}: prediction is {got}, expected a str")
        refs = [reference] if isinstance(reference, str) else reference
        if refs is None or not isinstance(refs, Sequence):
            raise ReportInputError(f"{_label(position, ids)}: references are {refs!r}, expected a str or list of str")
        if len(refs) == 0:
            raise ReportInputError(f"{_label(position, ids)}: empty reference list; every example needs one")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str) or not ref.strip():
                raise ReportInputError(f"{_label(position, ids)}: reference {j} is {ref!r}, expected non-empty text")
        reference_lists.append(list(refs))
    return reference_lists, ids


class ReportScorer:
    """Scores report corpora, keeping one METEOR Java process across calls (it takes seconds to start).

    Use as a context manager, or call :meth:`close`; :func:`score_reports` does both for a single corpus.
    """

    def __init__(self, metrics: Sequence[str] = ALL_METRICS) -> None:
        self.metrics = _checked_metrics(metrics)
        self._meteor: Meteor | None = None

    def __enter__(self) -> ReportScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> str:
        """Stop the METEOR process (if started); returns what it wrote to stderr."""
        meteor, self._meteor = self._meteor, None
        if meteor is None:
            return ""
        # pycocoevalcap's Meteor holds its lock when a read fails, and its __del__ waits on that lock: release it,
        # then stop the process here so __del__ finds nothing left to do.
        if meteor.lock.locked():
            meteor.lock.release()
        process = meteor.meteor_p
        try:
            process.stdin.close()
        except OSError:
            pass
        process.kill()
        process.wait()
        stderr = process.stderr.read().decode("utf-8", errors="replace").strip()
        process.stdout.close()
        process.stderr.close()
        return stderr

    def _meteor_call(self, work):
        """Run ``work(meteor)`` under pycocoevalcap's lock, turning a dead or failing Java process into
        :class:`MetricUnavailableError` with its stderr."""
        if self._meteor is None:
            try:
                self._meteor = Meteor()
            except OSError as exc:
                raise MetricUnavailableError(f"METEOR could not start Java: {exc}; {JAVA_INSTALL_HINT}") from exc
        meteor = self._meteor
        try:
            with meteor.lock:
                return work(meteor)
        except (OSError, ValueError) as exc:
            stderr = self.close()
            raise MetricUnavailableError(
                f"METEOR (Java, meteor-1.5.jar) failed: {exc!r}; its stderr: {stderr or 'none'}"
            ) from exc

    def _meteor_stats(self, gts: dict, res: dict) -> list[str]:
        """METEOR's sufficient statistics of each example (one SCORE round trip each: the alignment, the slow
        part), exactly as pycocoevalcap's ``compute_score`` collects them."""
        return self._meteor_call(lambda meteor: [meteor._stat(res[key][0], gts[key]) for key in res])

    def _meteor_eval(self, stats: Sequence[str]) -> tuple[float, list[float]]:
        """Corpus and per-example METEOR of examples given by their statistics (one EVAL round trip), as
        pycocoevalcap's ``compute_score`` ends; a bootstrap resample reuses the statistics instead of realigning."""

        def evaluate(meteor) -> tuple[float, list[float]]:
            meteor.meteor_p.stdin.write(("EVAL" + "".join(f" ||| {stat}" for stat in stats) + "\n").encode())
            meteor.meteor_p.stdin.flush()
            scores = [float(meteor.meteor_p.stdout.readline().strip()) for _ in stats]
            return float(meteor.meteor_p.stdout.readline().strip()), scores

        return self._meteor_call(evaluate)

    def score(
        self,
        predictions: Sequence[str],
        references: Sequence[str | Sequence[str]],
        ids: Sequence[Hashable] | None = None,
        *,
        bootstrap: int = 0,
        seed: int = 0,
    ) -> ReportScores:
        """Corpus and per-example scores of ``predictions`` against ``references`` (a str or a list per example);
        with ``bootstrap``, 95% intervals from that many resamples of the examples, each scored as a corpus
        (CIDEr's document frequencies and BLEU's length penalty from the resample; see :meth:`_bootstrap`)."""
        reference_lists, ids = _checked_inputs(predictions, references, ids)
        require_java(self.metrics)
        tokens = ptb_tokenize([*predictions, *(ref for refs in reference_lists for ref in refs)])
        res = {position: [tokens[position]] for position in range(len(predictions))}
        gts, cursor = {}, len(predictions)
        for position, refs in enumerate(reference_lists):
            gts[position] = tokens[cursor : cursor + len(refs)]
            cursor += len(refs)
            blank = [j for j, ref in enumerate(gts[position]) if not ref]
            if blank:
                raise ReportInputError(
                    f"{_label(position, ids)}: reference {blank[0]} has no tokens left after tokenisation "
                    f"({refs[blank[0]]!r}); it cannot be scored against"
                )
        empty = [ids[position] for position, (hypothesis,) in res.items() if not hypothesis]
        if empty:
            logger.warning(
                "%d of %d predictions are empty after tokenisation and score 0 on every metric; ids: %s",
                len(empty),
                len(res),
                ", ".join(map(repr, empty[:20])) + (", ..." if len(empty) > 20 else ""),
            )

        meteor_stats = self._meteor_stats(gts, res) if "METEOR" in self.metrics else None
        corpus, per_example = self._scores(gts, res, meteor_stats)
        intervals = {}
        if bootstrap:
            intervals = self._bootstrap(gts, res, per_example, meteor_stats, bootstrap, seed)
        return ReportScores(
            corpus={name: corpus[name] for name in self.metrics},
            per_example=[
                {"id": ids[position], **{name: per_example[name][position] for name in self.metrics}}
                for position in range(len(ids))
            ],
            intervals=intervals,
        )

    def _bootstrap(
        self, gts: dict, res: dict, per_example: dict, meteor_stats: list[str] | None, bootstrap: int, seed: int
    ) -> dict[str, tuple[float, float]]:
        """Percentile 95% intervals over ``bootstrap`` resamples, each scored as :meth:`_scores` scores a corpus
        (an example drawn twice counts twice). The per-example work is done once: BLEU's n-gram counts are cooked
        once and reused by pycocoevalcap's own ``BleuScorer``; ROUGE-L's corpus score is the mean of the
        per-example ones; METEOR reuses each example's statistics. CIDEr's document frequencies depend on the
        resample, so CIDEr is rescored in full, the slow part."""
        cooked = BleuScorer(n=4)
        for key in res:
            cooked.cook_append(res[key][0], gts[key])
        rouge = np.array(per_example.get("ROUGE-L", []))
        resampled: dict[str, list[float]] = {name: [] for name in self.metrics}
        for rows in np.random.default_rng(seed).integers(0, len(res), size=(bootstrap, len(res))):
            scores: dict[str, float] = {}
            if any(name in BLEU_METRICS for name in self.metrics):
                bleu = BleuScorer(n=4)
                bleu.crefs, bleu.ctest = [cooked.crefs[row] for row in rows], [cooked.ctest[row] for row in rows]
                values, _ = bleu.compute_score(option="closest", verbose=0)
                scores.update(zip(BLEU_METRICS, map(float, values), strict=True))
            if "ROUGE-L" in self.metrics:
                scores["ROUGE-L"] = float(np.mean(rouge[rows]))
            if "METEOR" in self.metrics:
                scores["METEOR"] = self._meteor_eval([meteor_stats[row] for row in rows])[0]
            if "CIDEr" in self.metrics:
                scores["CIDEr"] = float(
                    Cider().compute_score(
                        {j: gts[row] for j, row in enumerate(rows)}, {j: res[row] for j, row in enumerate(rows)}
                    )[0]
                )
            for name in self.metrics:
                resampled[name].append(scores[name])
        return {
            name: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
            for name, values in resampled.items()
        }

    def _scores(
        self, gts: dict, res: dict, meteor_stats: list[str] | None
    ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Corpus and per-example scores of tokenised hypotheses ``res`` against references ``gts`` (METEOR from
        the examples' statistics, in ``res``'s order)."""
        corpus: dict[str, float] = {}
        per_example: dict[str, list[float]] = {}
        if any(name in BLEU_METRICS for name in self.metrics):
            bleu, bleu_rows = Bleu(4).compute_score(gts, res, verbose=0)
            for n, name in enumerate(BLEU_METRICS):
                corpus[name], per_example[name] = float(bleu[n]), [float(s) for s in bleu_rows[n]]
        if "ROUGE-L" in self.metrics:
            rouge, rouge_rows = Rouge().compute_score(gts, res)
            corpus["ROUGE-L"], per_example["ROUGE-L"] = float(rouge), [float(s) for s in rouge_rows]
        if "METEOR" in self.metrics:
            corpus["METEOR"], per_example["METEOR"] = self._meteor_eval(meteor_stats)
        if "CIDEr" in self.metrics:
            cider, cider_rows = Cider().compute_score(gts, res)
            corpus["CIDEr"], per_example["CIDEr"] = float(cider), [float(s) for s in cider_rows]
        return corpus, per_example


def score_reports(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    metrics: Sequence[str] = ALL_METRICS,
    ids: Sequence[Hashable] | None = None,
) -> ReportScores:
    """Score one corpus of generated reports; see the module docstring for the variant and the input rules."""
    with ReportScorer(metrics) as scorer:
        return scorer.score(predictions, references, ids=ids)
