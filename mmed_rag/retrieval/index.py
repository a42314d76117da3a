"""``ReportIndex``: one modality's report corpus, encoded once by its retriever and kept in a FAISS index on disk.

The original MMed-RAG re-encoded the whole report corpus and did a brute-force matmul against it on every
retrieval run. Here ``mmed-rag build-index`` encodes it once; batch retrieval loads the index and only encodes
its queries. Because a stored index is only meaningful for the exact retriever and corpus it was built from,
its ``manifest.json`` pins both, and :meth:`ReportIndex.load` refuses an index that does not fit them.

Rows are unique report texts. The original retrieves from its ``image_report_pairs``, one entry per image, so the
same report (IU-Xray and MIMIC repeat "normal" reports verbatim) could fill several of the top-k slots of one
prompt. Here reports are de-duplicated by exact text (no normalisation: texts that differ by a space stay two
rows); a row keeps the ids of every record that shares its text, in file order, and rows follow the order of
first appearance in the corpus file. Top-k therefore means k distinct reports.

Index directory (each file written atomically; ``manifest.json`` last, and removed first when a directory is
overwritten, so an interrupted build leaves no manifest and is refused instead of mixing old and new files)::

    index.faiss     faiss.write_index of the CPU index (inner product on L2-normalised embeddings = cosine)
    reports.jsonl   one line per index row: {"row": 0, "report": "...", "ids": ["rad_00001", ...]}
    reports.offsets byte offset of each row's line (numpy .npy, int64, size + 1): rows are read on demand
    vectors.f32     only with ``exact_rerank``: the float32 embeddings, re-scoring the codes' shortlist
                    (:mod:`mmed_rag.retrieval.exact_vectors`)
    manifest.json   format_version, modality, kind and its params, size, embed_dim, the retriever (its own
                    manifest, model name, path, sha256 of its weights), the corpus (path, sha256 of its bytes,
                    record count), sha256 of index.faiss, reports.jsonl, reports.offsets (and vectors.f32), library
                    versions
    config.yaml     the BuildIndexConfig it was made with (only when built by :func:`build_index`)

Format versions: 1 had no reports.offsets (a version-1 directory still loads: its offsets come from one scan of
reports.jsonl); 2 adds it; 3 may add vectors.f32 (a version-2 directory still loads; an older mmed-rag refuses a
version-3 one rather than search it without its re-scoring). A loaded index maps index.faiss (``mmap=True``, the
default) and reads the rows of reports.jsonl (and vectors.f32) only when looked up: a million-report index costs
the pages its searches touch, not a copy of everything (:mod:`mmed_rag.retrieval.report_rows`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from mmed_rag.atomic import atomic_path, atomic_write_text
from mmed_rag.config import save_config
from mmed_rag.data.records import ImageReportRecord, read_retriever_train
from mmed_rag.device import resolve_device
from mmed_rag.errors import MMedRAGError
from mmed_rag.fingerprint import file_sha256
from mmed_rag.outputs import claim_outputs
from mmed_rag.retrieval.clip import LOCAL_DIR_PREFIX, MANIFEST_FILE, create_clip, resolve_clip
from mmed_rag.retrieval.configs import BuildIndexConfig, IndexKind
from mmed_rag.retrieval.encode import embedding_dim, encode_texts
from mmed_rag.retrieval.exact_vectors import VECTORS_FILE, ExactVectors, ExactVectorsError
from mmed_rag.retrieval.index_kinds import (
    GPU_MAX_K,
    KINDS,
    IndexBuildError,
    apply_search_params,
    exhaustive_params,
    gpu_copy,
    new_faiss_index,
    read_faiss_index,
)
from mmed_rag.retrieval.ranking import NonFiniteScoresError, check_finite
from mmed_rag.retrieval.report_rows import (
    OFFSETS_FILE,
    REPORTS_FILE,
    IndexedReport,
    ReportRows,
    ReportRowsError,
    write_report_rows,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
INDEX_FILE = "index.faiss"


class IndexMissingError(MMedRAGError, FileNotFoundError):
    """The index directory, or one of its files, is not there."""


class IndexCorruptError(MMedRAGError, ValueError):
    """The index directory contradicts itself: files changed after the manifest, row counts or widths differ."""


class IndexMismatchError(MMedRAGError, ValueError):
    """The index was built from another retriever, another corpus (or another version of it), another modality."""


# -- what an index is pinned to --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrieverIdentity:
    """What pins a retriever: the sha256 of its weights, its embedding width, and its saved manifest."""

    weights_sha256: str
    embed_dim: int
    model_name: str
    manifest: dict = field(default_factory=dict)  # the retriever's manifest.json ({} if it has none)
    path: str | None = None

    @classmethod
    def of_saved(cls, retriever: str | os.PathLike) -> RetrieverIdentity:
        """Identify a saved retriever without loading it: a :func:`save_clip` directory (or a local hub copy)."""
        source = resolve_clip(str(retriever))
        if source.weights is None:
            raise IndexBuildError(
                f"{retriever} has no weights file, so an index built with it could not be pinned to a retriever; "
                f"pass a directory written by save_clip."
            )
        directory = Path(source.open_clip_name.removeprefix(LOCAL_DIR_PREFIX))
        manifest_path = directory / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
        return cls(
            weights_sha256=file_sha256(source.weights),
            embed_dim=int(source.model_cfg["embed_dim"]),
            model_name=manifest.get("model_name", str(retriever)),
            manifest=manifest,
            path=str(retriever),
        )

    @classmethod
    def of_model(cls, model: torch.nn.Module, model_name: str) -> RetrieverIdentity:
        """Identify an in-memory model by the sha256 of the bytes :func:`save_clip` would write for it.

        So an index built from a model in memory loads against the same model once saved, and vice versa.
        """
        state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        return cls(
            weights_sha256=hashlib.sha256(safetensors_bytes(state)).hexdigest(),
            embed_dim=embedding_dim(model),
            model_name=model_name,
        )

    def to_manifest(self) -> dict:
        return {
            "model_name": self.model_name,
            "path": self.path,
            "weights_sha256": self.weights_sha256,
            "embed_dim": self.embed_dim,
            "manifest": self.manifest,
        }


@dataclass(frozen=True)
class Retriever:
    """A loaded CLIP retriever and its identity: what builds an index, and what encodes queries against it."""

    model: torch.nn.Module
    tokenizer: Callable
    identity: RetrieverIdentity
    preprocess: Callable | None = None  # image preprocessing (eval), for encoding image queries

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> Retriever:
        identity = RetrieverIdentity.of_saved(directory)
        model, _, preprocess, tokenizer = create_clip(str(directory), device=device)
        return cls(model, tokenizer, identity, preprocess)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, tokenizer: Callable, model_name: str, preprocess: Callable | None = None
    ) -> Retriever:
        return cls(model, tokenizer, RetrieverIdentity.of_model(model, model_name), preprocess)


def unique_reports(records: Iterable[ImageReportRecord]) -> list[IndexedReport]:
    """One row per exact report text, in order of first appearance, with the ids of all records sharing it."""
    ids_by_report: dict[str, list[str | int]] = {}
    for record in records:
        ids_by_report.setdefault(record.report, []).append(record.id)
    return [IndexedReport(row, report, tuple(ids)) for row, (report, ids) in enumerate(ids_by_report.items())]


# -- the index -------------------------------------------------------------------------------------------------


class ReportIndex:
    """Report embeddings of one modality in a FAISS inner-product index, with the texts and ids of its rows."""

    def __init__(
        self,
        index: faiss.Index,
        entries: Sequence[IndexedReport],
        manifest: dict,
        use_gpu: bool = True,
        exact_vectors: ExactVectors | None = None,
    ):
        self.index = index
        self.entries = entries if isinstance(entries, ReportRows) else tuple(entries)
        self.manifest = manifest
        self.exact_vectors = exact_vectors  # only with exact_rerank: what re-scores the codes' shortlist
        self._gpu_index = gpu_copy(index, self.kind) if use_gpu else None

    @property
    def size(self) -> int:
        return len(self.entries)

    @property
    def embed_dim(self) -> int:
        return int(self.index.d)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ReportIndex({self.modality!r}, kind={self.kind!r}, size={self.size}, embed_dim={self.embed_dim})"

    @classmethod
    def build(
        cls,
        retriever: str | os.PathLike | Retriever,
        corpus: str | os.PathLike,
        modality: str,
        kind: IndexKind = "flat",
        *,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        progress: bool = True,
        use_gpu: bool = True,
        **params: Any,
    ) -> ReportIndex:
        """Encode the unique reports of ``corpus`` (a retriever training JSON) with ``retriever`` and index them.

        ``retriever`` is a directory written by :func:`save_clip` (loaded on ``device``) or a :class:`Retriever`.
        ``kind`` and ``params`` as in :meth:`from_embeddings`. Nothing is written; call :meth:`save`.
        """
        if kind not in KINDS:
            raise IndexBuildError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(retriever, Retriever):
            retriever = Retriever.load(retriever, device=device)
        corpus = Path(corpus)
        records = read_retriever_train(corpus).records  # first: a missing or bad file is named as such
        corpus_sha256 = file_sha256(corpus)
        entries = unique_reports(records)
        if not entries:
            raise IndexBuildError(f"{corpus} holds no records: there is nothing to index for {modality}.")
        embeddings = encode_texts(
            retriever.model,
            retriever.tokenizer,
            [entry.report for entry in entries],
            batch_size=batch_size,
            progress=progress,
        )
        try:
            check_finite(embeddings, f"report embeddings of {corpus} by {retriever.identity.model_name}")
        except NonFiniteScoresError as error:
            raise IndexBuildError(f"{error}: no index is built from them") from None
        return cls.from_embeddings(
            embeddings,
            entries,
            modality,
            retriever.identity,
            {"path": str(corpus), "sha256": corpus_sha256, "records": len(records)},
            kind,
            use_gpu=use_gpu,
            **params,
        )

    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        entries: Sequence[IndexedReport],
        modality: str,
        retriever: RetrieverIdentity,
        corpus: dict,
        kind: IndexKind = "flat",
        *,
        use_gpu: bool = True,
        **params: Any,
    ) -> ReportIndex:
        """Index report ``embeddings`` (one L2-normalised row per entry, encoded by ``retriever``).

        ``kind``: ``"flat"`` exact search (the default; exact and fast up to a few hundred thousand reports),
        ``"ivf"`` ``nlist`` k-means cells of which ``nprobe`` are searched (``nlist=None``: about 4 sqrt(n),
        at most n / 39), ``"hnsw"`` a graph with ``hnsw_m`` links per node, ``ef_construction`` and
        ``ef_search`` candidate lists, ``"ivfpq"`` IVF cells of product-quantised codes for a million reports
        and more (``pq_m`` sub-quantisers of ``pq_nbits`` bits, ``opq`` rotation, ``rerank`` shortlist factor),
        ``"ivfrabitq"`` IVF cells of RaBitQ codes (``rabitq_bits`` per dimension); either of the last two with
        ``exact_rerank`` re-scores its shortlist with the float32 vectors (kept on disk once saved); see
        :mod:`mmed_rag.retrieval.index_kinds`. ``corpus``: the manifest's record of the indexed file
        (path, sha256, records).
        """
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(entries):
            raise IndexBuildError(
                f"embeddings: expected one row per report ({len(entries)}), got an array of shape {embeddings.shape}"
            )
        started = time.perf_counter()
        index, params = new_faiss_index(kind, embeddings, **params)
        index.add(embeddings)
        logger.info(
            "Indexed %d unique %s reports (%s, %d dims) in %.1f s",
            len(entries),
            modality,
            kind,
            embeddings.shape[1],
            time.perf_counter() - started,
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "modality": modality,
            "kind": kind,
            "params": params,
            "metric": "inner_product",
            "size": len(entries),
            "embed_dim": int(embeddings.shape[1]),
            "dedup": "exact report text",
            "retriever": retriever.to_manifest(),
            "corpus": corpus,
            "versions": _versions(),
        }
        exact_vectors = ExactVectors.in_memory(embeddings) if params.get("exact_rerank") else None
        return cls(index, entries, manifest, use_gpu=use_gpu, exact_vectors=exact_vectors)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``reports.jsonl``, ``reports.offsets``, ``vectors.f32`` (with exact re-scoring)
        and, last, ``manifest.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_FILE).unlink(missing_ok=True)
        with atomic_path(directory / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        write_report_rows(directory, self.entries)
        files = (INDEX_FILE, REPORTS_FILE, OFFSETS_FILE)
        if self.exact_vectors is not None:
            self.exact_vectors.save(directory)
            files += (VECTORS_FILE,)
        else:
            (directory / VECTORS_FILE).unlink(missing_ok=True)
        self.manifest["format_version"] = FORMAT_VERSION
        self.manifest["files"] = {name: file_sha256(directory / name) for name in files}
        atomic_write_text(directory / MANIFEST_FILE, json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")
        logger.info("Saved %r to %s", self, directory)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        retriever: str | os.PathLike | Retriever | RetrieverIdentity | None = None,
        corpus: str | os.PathLike | None = None,
        modality: str | None = None,
        use_gpu: bool = True,
        mmap: bool = True,
    ) -> ReportIndex:
        """Load an index written by :meth:`save`, refusing one that does not fit what it is to be used with.

        Given ``retriever`` (a saved retriever directory, a :class:`Retriever` or its identity), the index must
        have been built with exactly those weights; given ``corpus``, the file must be byte-identical to the one
        indexed; given ``modality``, it must match. Left out, those checks are skipped: only the directory's own
        consistency is checked (files unchanged since the manifest, row counts, embedding width).

        ``mmap`` (the default) maps ``index.faiss`` instead of reading it: pages are read as searches touch them
        and shared by every process that loads the same index; results are identical. Report texts are always
        read on demand (:class:`~mmed_rag.retrieval.report_rows.ReportRows`).
        """
        directory = Path(directory)
        manifest = cls.validate(directory, retriever, corpus, modality)
        offsets = directory / OFFSETS_FILE if manifest["format_version"] >= 2 else None
        try:
            entries = ReportRows.open(directory / REPORTS_FILE, offsets)
        except ReportRowsError as error:
            raise IndexCorruptError(f"{error}") from None
        try:
            index = read_faiss_index(str(directory / INDEX_FILE), mmap)
        except RuntimeError as error:
            raise IndexCorruptError(f"{directory / INDEX_FILE} is not a readable FAISS index: {error}") from None
        if not index.ntotal == len(entries) == manifest["size"]:
            raise IndexCorruptError(
                f"{directory}: {INDEX_FILE} holds {index.ntotal} vectors, {REPORTS_FILE} {len(entries)} rows and the "
                f"manifest says {manifest['size']}; they must agree. Rebuild the index."
            )
        if index.d != manifest["embed_dim"] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexCorruptError(
                f"{directory}: {INDEX_FILE} is a {index.d}-dim index (metric {index.metric_type}), but the manifest "
                f"says {manifest['embed_dim']} dims, inner product. Rebuild the index."
            )
        apply_search_params(index, manifest["kind"], manifest["params"])
        exact_vectors = None
        if manifest["params"].get("exact_rerank"):
            try:
                exact_vectors = ExactVectors.open(directory / VECTORS_FILE, manifest["size"], manifest["embed_dim"])
            except ExactVectorsError as error:
                raise IndexCorruptError(f"{error}") from None
        return cls(index, entries, manifest, use_gpu=use_gpu, exact_vectors=exact_vectors)

    @staticmethod
    def validate(
        directory: str | os.PathLike,
        retriever: str | os.PathLike | Retriever | RetrieverIdentity | None = None,
        corpus: str | os.PathLike | None = None,
        modality: str | None = None,
    ) -> dict:
        """The checks of :meth:`load` that need only the manifest (cheap: no FAISS read); returns the manifest.

        For start-up checks of many indexes, e.g. by the modality router.
        """
        directory = Path(directory)
        manifest = _read_manifest(directory)
        if modality is not None and modality != manifest["modality"]:
            raise IndexMismatchError(f"{directory} indexes {manifest['modality']} reports, not {modality}.")
        if retriever is not None:
            _check_retriever(directory, manifest, retriever)
        if corpus is not None:
            _check_corpus(directory, manifest, Path(corpus))
        return manifest

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows for each query: ``(scores [n, k] float32, rows [n, k] int64)``, best first.

        Queries are L2-normalised embeddings from the index's retriever (see :mod:`mmed_rag.retrieval.encode`), so
        scores are cosine similarities. ``k`` larger than the index returns all ``size`` rows (``size``
        columns): there is never a ``-1`` placeholder. Where an approximate index (IVF, HNSW, IVF-PQ) finds fewer than
        ``k`` rows for a query, that query is searched again exhaustively, so every row is a real one. An index
        with ``exact_rerank`` asks its codes for ``exact_rerank x k`` rows and returns the best ``k`` of them by
        exact inner product (their scores are exact too).
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise ValueError(
                f"queries: expected an array [n, {self.embed_dim}] of {self.embed_dim}-dim embeddings, "
                f"got shape {queries.shape}; was it encoded by another retriever?"
            )
        if k < 1:
            raise ValueError(f"k: expected at least 1, got {k}")
        check_finite(queries, "query embeddings")  # FAISS would rank NaN queries as arbitrary rows
        k = min(k, self.size)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        shortlist = self._shortlist(k)
        searcher = self._gpu_index if self._gpu_index is not None and shortlist <= GPU_MAX_K else self.index
        scores, rows = searcher.search(queries, shortlist)
        incomplete = (rows < 0).any(axis=1)
        if incomplete.any():
            scores[incomplete], rows[incomplete] = self.index.search(
                queries[incomplete], shortlist, params=exhaustive_params(self.index, self.kind, self.size)
            )
        rows = rows.astype(np.int64, copy=False)
        if self.manifest["params"].get("exact_rerank"):  # _shortlist checked that the vectors are there
            return self.exact_vectors.rescore(queries, rows, k)
        return scores, rows

    def _shortlist(self, k: int) -> int:
        """How many rows to ask the FAISS index for: ``k``, or ``exact_rerank x k`` (at most all) to re-score."""
        factor = self.manifest["params"].get("exact_rerank") or 0
        if factor and self.exact_vectors is None:
            raise IndexCorruptError(
                f"{self!r}: exact_rerank={factor} needs the index's float32 vectors ({VECTORS_FILE}), and it was "
                f"built without them; rebuild it with exact_rerank."
            )
        return min(self.size, max(k, factor * k))

    def lookup(self, rows: np.ndarray) -> list[list[IndexedReport]]:
        """The index rows of a :meth:`search` result, as reports with their record ids (read on demand)."""
        rows = np.asarray(rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.size):
            raise ValueError(f"rows: expected values in [0, {self.size}), got {rows.min()}..{rows.max()}")
        try:
            return [[self.entries[row] for row in query_rows] for query_rows in rows.tolist()]
        except ReportRowsError as error:
            raise IndexCorruptError(f"{error}") from None


# -- reading and checking a stored index -----------------------------------------------------------------------


def _read_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise IndexMissingError(f"{directory}: no such index directory (build one with `mmed-rag build-index`).")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise IndexMissingError(
            f"{directory} has no {MANIFEST_FILE}: it is not a report index, or its build was interrupted (the "
            f"manifest is written last). Rebuild it with `mmed-rag build-index`."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise IndexCorruptError(f"{path} is not valid JSON: {error}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise IndexCorruptError(
            f"{path}: format_version {version!r}, but this mmed-rag reads versions {readable}; rebuild the index."
        )
    names = (INDEX_FILE, REPORTS_FILE) if version == 1 else (INDEX_FILE, REPORTS_FILE, OFFSETS_FILE)
    if (manifest.get("params") or {}).get("exact_rerank"):
        names += (VECTORS_FILE,)
    for name in names:
        file = directory / name
        if not file.is_file():
            raise IndexMissingError(f"{directory} has a manifest but no {name}; rebuild the index.")
        expected = manifest.get("files", {}).get(name)
        actual = file_sha256(file)
        if actual != expected:
            raise IndexCorruptError(
                f"{file} was changed or replaced after the index was written (sha256 {actual[:12]}..., manifest says "
                f"{str(expected)[:12]}...); rebuild the index."
            )
    return manifest


def _check_retriever(directory: Path, manifest: dict, retriever: Any) -> None:
    if isinstance(retriever, Retriever):
        identity = retriever.identity
    elif isinstance(retriever, RetrieverIdentity):
        identity = retriever
    else:
        identity = RetrieverIdentity.of_saved(retriever)
    built = manifest["retriever"]
    built_name = f"{built['model_name']} at {built['path']}" if built.get("path") else built["model_name"]
    given_name = f"{identity.model_name} at {identity.path}" if identity.path else identity.model_name
    if identity.embed_dim != manifest["embed_dim"]:
        raise IndexMismatchError(
            f"{directory} holds {manifest['embed_dim']}-dim embeddings of {built_name}, but the given retriever "
            f"({given_name}) embeds in {identity.embed_dim} dims. Rebuild the index with this retriever."
        )
    if identity.weights_sha256 != built["weights_sha256"]:
        raise IndexMismatchError(
            f"{directory} was built with another retriever: {built_name} (weights sha256 "
            f"{built['weights_sha256'][:12]}...), not {given_name} (sha256 {identity.weights_sha256[:12]}...). "
            f"Rebuild the index with this retriever, or retrieve with the one it was built with."
        )


def _check_corpus(directory: Path, manifest: dict, corpus: Path) -> None:
    indexed = manifest["corpus"]
    actual = file_sha256(corpus)
    if actual != indexed["sha256"]:
        raise IndexMismatchError(
            f"{corpus} is not the corpus {directory} was built from ({indexed['path']}, {indexed['records']} "
            f"records, sha256 {indexed['sha256'][:12]}...; this file has sha256 {actual[:12]}...): it changed since "
            f"indexing. Rebuild the index."
        )


def _versions() -> dict[str, str]:
    versions = {"faiss": faiss.__version__}
    for name in ("torch", "open_clip_torch", "mmed-rag"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


# -- stage -----------------------------------------------------------------------------------------------------


def build_index(config: BuildIndexConfig) -> ReportIndex:
    """Build the report index of ``config.modality`` and write it, with ``config.yaml``, to ``config.out``."""
    with claim_outputs("build-index", directories=[config.out], inputs=[config.retriever, config.corpus]):
        return _build_index(config)


def _build_index(config: BuildIndexConfig) -> ReportIndex:
    device = resolve_device(config.device)
    index = ReportIndex.build(
        config.retriever,
        config.corpus,
        config.modality,
        config.kind,
        batch_size=config.batch_size,
        device=device,
        **config.index_params(),
    )
    save_config(config, config.out)
    index.save(config.out)
    return index
