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
    manifest.json   format_version, modality, kind and its params, size, embed_dim, the retriever (its own
                    manifest, model name, path, sha256 of its weights), the corpus (path, sha256 of its bytes,
                    record count), sha256 of index.faiss and reports.jsonl, library versions
    config.yaml     the BuildIndexConfig it was made with (only when built by :func:`build_index`)
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
from mmed_rag.retrieval.ranking import NonFiniteScoresError, check_finite

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
REPORTS_FILE = "reports.jsonl"
KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
# k-means wants this many points per centroid (faiss's own min_points_per_centroid); below it IVF still builds,
# with a warning, because its centroids are then poorly placed.
MIN_POINTS_PER_CENTROID = 39
# faiss-gpu's k-selection handles at most this many neighbours; larger k is searched on the CPU copy.
GPU_MAX_K = 2048


class IndexBuildError(MMedRAGError, ValueError):
    """An index cannot be built as asked: empty corpus, too few reports for IVF, unknown kind."""


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


@dataclass(frozen=True)
class IndexedReport:
    """One index row: a unique report text and the ids of every corpus record that has it."""

    row: int
    report: str
    ids: tuple[str | int, ...]


def unique_reports(records: Iterable[ImageReportRecord]) -> list[IndexedReport]:
    """One row per exact report text, in order of first appearance, with the ids of all records sharing it."""
    ids_by_report: dict[str, list[str | int]] = {}
    for record in records:
        ids_by_report.setdefault(record.report, []).append(record.id)
    return [IndexedReport(row, report, tuple(ids)) for row, (report, ids) in enumerate(ids_by_report.items())]


# -- the index -------------------------------------------------------------------------------------------------


class ReportIndex:
    """Report embeddings of one modality in a FAISS inner-product index, with the texts and ids of its rows."""

    def __init__(self, index: faiss.Index, entries: Sequence[IndexedReport], manifest: dict, use_gpu: bool = True):
        self.index = index
        self.entries = tuple(entries)
        self.manifest = manifest
        self._gpu_index = _gpu_copy(index) if use_gpu and self.kind == "flat" else None

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
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        device: str | torch.device = "cpu",
        progress: bool = True,
        use_gpu: bool = True,
    ) -> ReportIndex:
        """Encode the unique reports of ``corpus`` (a retriever training JSON) with ``retriever`` and index them.

        ``retriever`` is a directory written by :func:`save_clip` (loaded on ``device``) or a :class:`Retriever`.
        ``kind``: ``"flat"`` exact search (the default; exact and fast up to a few hundred thousand reports),
        ``"ivf"`` ``nlist`` k-means cells of which ``nprobe`` are searched (``nlist=None``: about 4 sqrt(n),
        at most n / 39), ``"hnsw"`` a graph with ``hnsw_m`` links per node, ``ef_construction`` and
        ``ef_search`` candidate lists. Nothing is written; call :meth:`save`.
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
        started = time.perf_counter()
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
        index, params = _new_faiss_index(
            kind,
            embeddings,
            nlist=nlist,
            nprobe=nprobe,
            hnsw_m=hnsw_m,
            ef_construction=ef_construction,
            ef_search=ef_search,
        )
        index.add(embeddings)
        logger.info(
            "Indexed %d unique reports of %d %s records (%s, %d dims) in %.1f s",
            len(entries),
            len(records),
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
            "retriever": retriever.identity.to_manifest(),
            "corpus": {"path": str(corpus), "sha256": corpus_sha256, "records": len(records)},
            "versions": _versions(),
        }
        return cls(index, entries, manifest, use_gpu=use_gpu)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``reports.jsonl`` and, last, ``manifest.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_FILE).unlink(missing_ok=True)
        with atomic_path(directory / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        lines = (
            json.dumps({"row": e.row, "report": e.report, "ids": list(e.ids)}, ensure_ascii=False) + "\n"
            for e in self.entries
        )
        atomic_write_text(directory / REPORTS_FILE, "".join(lines))
        self.manifest["files"] = {name: file_sha256(directory / name) for name in (INDEX_FILE, REPORTS_FILE)}
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
    ) -> ReportIndex:
        """Load an index written by :meth:`save`, refusing one that does not fit what it is to be used with.

        Given ``retriever`` (a saved retriever directory, a :class:`Retriever` or its identity), the index must
        have been built with exactly those weights; given ``corpus``, the file must be byte-identical to the one
        indexed; given ``modality``, it must match. Left out, those checks are skipped: only the directory's own
        consistency is checked (files unchanged since the manifest, row counts, embedding width).
        """
        directory = Path(directory)
        manifest = cls.validate(directory, retriever, corpus, modality)
        entries = _read_entries(directory / REPORTS_FILE)
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
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
        _apply_search_params(index, manifest["kind"], manifest["params"])
        return cls(index, entries, manifest, use_gpu=use_gpu)

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
        columns): there is never a ``-1`` placeholder. Where an approximate index (IVF, HNSW) finds fewer than
        ``k`` rows for a query, that query is searched again exhaustively, so every row is a real one.
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
        searcher = self._gpu_index if self._gpu_index is not None and k <= GPU_MAX_K else self.index
        scores, rows = searcher.search(queries, k)
        incomplete = (rows < 0).any(axis=1)
        if incomplete.any():
            scores[incomplete], rows[incomplete] = self.index.search(
                queries[incomplete], k, params=_exhaustive_params(self.index, self.kind, self.size)
            )
        return scores, rows.astype(np.int64, copy=False)

    def lookup(self, rows: np.ndarray) -> list[list[IndexedReport]]:
        """The index rows of a :meth:`search` result, as reports with their record ids."""
        rows = np.asarray(rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.size):
            raise ValueError(f"rows: expected values in [0, {self.size}), got {rows.min()}..{rows.max()}")
        return [[self.entries[row] for row in query_rows] for query_rows in rows.tolist()]


# -- FAISS -----------------------------------------------------------------------------------------------------


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) IVF cells, but never fewer than 39 reports per cell (and at least one cell)."""
    return max(1, min(round(4 * n**0.5), n // MIN_POINTS_PER_CENTROID))


def _new_faiss_index(
    kind: str,
    embeddings: np.ndarray,
    *,
    nlist: int | None,
    nprobe: int,
    hnsw_m: int,
    ef_construction: int,
    ef_search: int,
) -> tuple[faiss.Index, dict]:
    """An empty (IVF: trained) inner-product index of ``kind`` for ``embeddings``, and its params."""
    n, dim = embeddings.shape
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        _apply_search_params(index, kind, params)
        return index, params
    nlist = nlist or default_nlist(n)
    if n < nlist:
        raise IndexBuildError(
            f"IVF with nlist={nlist} needs at least {nlist} reports to train its centroids, but the corpus has "
            f"{n} unique reports. Use kind='flat' (exact, and fast at this size) or a smaller nlist."
        )
    if n < MIN_POINTS_PER_CENTROID * nlist:
        logger.warning(
            "IVF: %d reports for nlist=%d cells is fewer than %d per cell; the cells will be poorly "
            "placed (recall suffers). Consider kind='flat' or nlist <= %d.",
            n,
            nlist,
            MIN_POINTS_PER_CENTROID,
            max(1, n // MIN_POINTS_PER_CENTROID),
        )
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # unit-norm centroids: the cells of cosine similarity
    index.cp.min_points_per_centroid = 1  # too few points is warned about above, in our words
    index.train(embeddings)
    params = {"nlist": nlist, "nprobe": min(nprobe, nlist)}
    _apply_search_params(index, kind, params)
    return index, params


def _apply_search_params(index: faiss.Index, kind: str, params: dict) -> None:
    # faiss.write_index does not keep HNSW's efSearch, so the manifest is the record of search settings.
    if kind == "ivf":
        index.nprobe = params["nprobe"]
    elif kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]


def _exhaustive_params(index: faiss.Index, kind: str, size: int) -> faiss.SearchParameters | None:
    if kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=index.nlist)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=size)
    return None


def _gpu_copy(index: faiss.Index) -> faiss.Index | None:
    """A copy of a flat index on every GPU faiss can use (faiss-gpu with a GPU present), else None."""
    if faiss.get_num_gpus() == 0:
        return None
    logger.info("Searching the report index on %d GPU(s)", faiss.get_num_gpus())
    return faiss.index_cpu_to_all_gpus(index)


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
    if version != FORMAT_VERSION:
        raise IndexCorruptError(
            f"{path}: format_version {version!r}, but this mmed-rag reads version {FORMAT_VERSION}; rebuild the index."
        )
    for name in (INDEX_FILE, REPORTS_FILE):
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


def _read_entries(path: Path) -> list[IndexedReport]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            entry = IndexedReport(int(raw["row"]), str(raw["report"]), tuple(raw["ids"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise IndexCorruptError(f"{path}, line {number}: not a {{row, report, ids}} record ({error})") from None
        if entry.row != len(entries):
            raise IndexCorruptError(f"{path}, line {number}: row {entry.row}, expected {len(entries)}")
        entries.append(entry)
    return entries


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
        nlist=config.nlist,
        nprobe=config.nprobe,
        hnsw_m=config.hnsw_m,
        ef_construction=config.ef_construction,
        ef_search=config.ef_search,
        device=device,
    )
    save_config(config, config.out)
    index.save(config.out)
    return index
