"""``mmed-rag eval-retrieval``: does the retriever find each image's own report, and at what similarity?

A query (an image of the evaluation file) is a hit at k when its ground-truth report is among the k reports
retrieved for it: the same report text (exact match), or, when the evaluation file is the indexed corpus itself,
the same record id. Chance is about k / (number of indexed reports). Besides recall@k, the similarity scores
of the retrieved candidates are split into ground truth and the rest and drawn as two histograms
(``similarity.png``): where they separate is where an absolute threshold, or the ratio rule, should cut.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmed_rag.atomic import atomic_path, atomic_write_text
from mmed_rag.config import ConfigError, save_config
from mmed_rag.data.records import read_records
from mmed_rag.device import resolve_device
from mmed_rag.errors import MMedRAGError
from mmed_rag.fingerprint import file_sha256
from mmed_rag.outputs import claim_outputs
from mmed_rag.retrieval.batch import INDEX_CACHE_DIR, cached_index, load_retriever
from mmed_rag.retrieval.configs import EvalRetrievalConfig
from mmed_rag.retrieval.encode import encode_images
from mmed_rag.retrieval.index import ReportIndex

logger = logging.getLogger(__name__)


class GroundTruthAbsentError(MMedRAGError):
    """No query's ground-truth report is in the index: recall cannot be measured."""


@dataclass
class RetrievalScores:
    recall: dict[int, float]  # k -> share of the answerable queries whose ground truth is in the top k
    chance: dict[int, float]  # k -> what random ranking would give
    queries: int
    answerable: int  # queries whose ground truth is in the index at all (recall is over these)
    index_size: int
    hit_scores: list[float]  # similarity of the ground truth, where it was retrieved
    miss_scores: list[float]  # similarity of the other retrieved candidates


def _hit_matrix(index: ReportIndex, rows: np.ndarray, truths: list[tuple[str, object]]) -> np.ndarray:
    """hits[q, j]: candidate j of query q is query q's ground truth (same text, or same record id if given)."""
    entries = index.lookup(rows)
    return np.array(
        [
            [entry.report == text or (key is not None and key in entry.ids) for entry in candidates]
            for candidates, (text, key) in zip(entries, truths, strict=True)
        ],
        dtype=bool,
    ).reshape(rows.shape)


def in_index(index: ReportIndex, truths: list[tuple[str, object]]) -> np.ndarray:
    """Per query: whether its ground truth is in the index at all (by text, or by record id when given)."""
    texts = {entry.report for entry in index.entries}
    ids = {key for entry in index.entries for key in entry.ids}
    return np.array([text in texts or (key is not None and key in ids) for text, key in truths], dtype=bool)


def score_retrieval(index: ReportIndex, queries: np.ndarray, truths: list[tuple[str, object]], ks) -> RetrievalScores:
    """Recall@k of encoded ``queries`` whose ground truths are ``(report text, record id)`` pairs.

    A query whose ground truth is not in the index can never retrieve it: counting it as a miss would report a
    retriever's recall as 0 when the corpus, not the retriever, is at fault. Recall is over the queries whose
    ground truth is indexed (``answerable``); when there is none, :class:`GroundTruthAbsentError`.
    """
    answerable = in_index(index, truths)
    if not answerable.any():
        raise GroundTruthAbsentError(
            f"none of the {len(truths)} queries' ground-truth reports is in the index ({index.size} reports), so "
            "recall cannot be measured: evaluate records whose reports were indexed (e.g. the corpus itself), or "
            "index a corpus that holds the test reports"
        )
    scores, rows = index.search(queries[answerable], max(ks))
    hits = _hit_matrix(index, rows, [truth for truth, kept in zip(truths, answerable, strict=True) if kept])
    recall = {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}
    chance = {k: min(1.0, k / index.size) for k in ks}
    return RetrievalScores(
        recall, chance, len(truths), int(answerable.sum()), index.size, scores[hits].tolist(), scores[~hits].tolist()
    )


def _plot(scores: RetrievalScores, out_png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    values = scores.hit_scores + scores.miss_scores
    samples = (
        (scores.miss_scores, "other retrieved reports", "bar"),
        (scores.hit_scores, "ground-truth report", "step"),
    )
    for sample, label, kind in samples:
        if sample:  # an empty sample has no density (and no legend entry)
            # Bins by sample size (about 2 sqrt(n), 5 to 40), so a handful of hits is not forty spikes.
            edges = np.linspace(min(values), max(values), min(40, max(5, 2 * int(np.sqrt(len(sample))))) + 1)
            axis.hist(
                sample, bins=edges, alpha=0.6 if kind == "bar" else 1.0, density=True, histtype=kind,
                linewidth=2, label=f"{label} (n={len(sample)})",
            )  # fmt: skip
    if not scores.hit_scores:
        axis.text(0.5, 0.9, "no ground-truth report was retrieved", transform=axis.transAxes, ha="center", fontsize=8)
    axis.set_xlabel("cosine similarity (image, report)")
    axis.set_ylabel("density")
    recall = ", ".join(f"R@{k} {value:.2f}" for k, value in scores.recall.items())
    title = f"{scores.answerable} of {scores.queries} queries answerable, {scores.index_size} reports: {recall}"
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png")


def eval_retrieval(config: EvalRetrievalConfig) -> RetrievalScores:
    """Score the retriever on ``config.eval_json``; write ``metrics.json``, ``similarity.png`` and the config."""
    inputs = [config.eval_json, config.index, config.train_json, config.model_name_or_path, config.checkpoint_path]
    with claim_outputs("eval-retrieval", directories=[config.out], inputs=[*inputs, config.img_root]):
        return _eval_retrieval(config)


def _eval_retrieval(config: EvalRetrievalConfig) -> RetrievalScores:
    out = Path(config.out)
    device = resolve_device(config.device)
    retriever = load_retriever(config.model_name_or_path, config.checkpoint_path, device)
    if config.index is not None:
        index = ReportIndex.load(config.index, retriever=retriever.identity, corpus=config.train_json)
    else:
        index, _ = cached_index(retriever, Path(config.train_json), out / INDEX_CACHE_DIR)
    records = [record for record in read_records(config.eval_json).records if getattr(record, "report", None)]
    if not records:
        raise ConfigError(f"{config.eval_json}: no record has a ground-truth 'report' to evaluate against")
    queries = encode_images(
        retriever.model,
        retriever.preprocess,
        config.img_root,
        [record.image_paths[0] for record in records],
        batch_size=config.batch_size,
    )
    # Record ids identify the ground truth only when the evaluation file is the indexed corpus itself (ids of
    # different files can collide: PMC-OA uses 0, 1, 2, ...).
    same_file = file_sha256(Path(config.eval_json)) == index.manifest["corpus"]["sha256"]
    truths = [(record.report, record.key if same_file else None) for record in records]
    scores = score_retrieval(index, queries, truths, config.ks)
    save_config(config, out)
    if scores.answerable < scores.queries:
        logger.warning(
            "%d of %d queries have no ground truth in the index: recall is over the other %d",
            scores.queries - scores.answerable,
            scores.queries,
            scores.answerable,
        )
    metrics = {
        "recall": scores.recall,
        "chance": scores.chance,
        "queries": scores.queries,
        "queries_with_ground_truth_in_index": scores.answerable,
        "index_size": index.size,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _plot(scores, out / "similarity.png")
    logger.info("Recall %s (chance %s) over %d queries", scores.recall, scores.chance, scores.queries)
    return scores
