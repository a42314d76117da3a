"""The FAISS index behind each :class:`~mmed_rag.retrieval.index.ReportIndex` kind: how it is built, its default
parameters and their checks, its search settings, its GPU copy and how it is read back (memory-mapped).

Kinds, all inner product on L2-normalised embeddings (cosine):

- ``flat``: exact; 4 x dim bytes per report. Right up to a few hundred thousand reports.
- ``ivf``: ``nlist`` k-means cells of full vectors, ``nprobe`` searched. Faster, as big as flat.
- ``hnsw``: a graph over full vectors. Faster, bigger than flat.
- ``ivfpq``: ``nlist`` cells of product-quantised residuals, ``pq_m`` codes of ``pq_nbits`` bits per report,
  after an OPQ rotation unless ``opq=False`` (on a million 512-dim reports it raised recall@10 from 0.68 to 0.73
  for 4x the build time), ``nprobe`` cells searched. For a million reports and more: a fraction of
  flat's memory and many times its speed, at a recall that the code size limits. With ``rerank`` > 0 the best
  ``rerank x k`` codes are re-scored against 8-bit scalar-quantised copies of the vectors (near-exact inner
  products), which costs 1 byte per dimension and report (a quarter of flat's memory) on top of the codes;
  re-scoring with the float32 vectors themselves would cost more than the flat index. Measured trade-offs:
  ``benchmarks/retrieval.py --scale`` and the README's "A million-report index".
- ``ivfrabitq``: ``nlist`` cells of RaBitQ codes (Gao & Long, SIGMOD 2024; multi-bit as extended RaBitQ):
  each residual is randomly rotated and quantised to ``rabitq_bits`` bits per dimension, with per-vector
  correction factors that make the inner-product estimate unbiased. Nothing to learn but the cells, so it builds
  several times faster than OPQ + IVF-PQ, and per byte it estimates inner products more precisely than PQ codes
  (on the million-report benchmark 3 bits per dimension, 1/9 of flat's memory, found 0.91 of the exact top 10
  where IVF-PQ's 1/14 found 0.73).

Either kind of codes takes ``exact_rerank`` > 0: the codes shortlist ``exact_rerank x k`` rows, which are ranked
again by their exact inner products with the float32 vectors kept on disk (:mod:`~mmed_rag.retrieval.exact_vectors`):
memory holds only the codes, and recall is the share of the true top k in the shortlist.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from mmed_rag.errors import MMedRAGError
from mmed_rag.retrieval.configs import CODED_KINDS, DEFAULT_RABITQ_BITS, RABITQ_MAX_BITS

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq", "ivfrabitq")
# The kinds whose search probes nprobe of nlist cells.
IVF_KINDS: tuple[str, ...] = ("ivf", "ivfpq", "ivfrabitq")
# k-means wants this many points per centroid (faiss's own min_points_per_centroid); below it IVF still builds,
# with a warning, because its centroids are then poorly placed.
MIN_POINTS_PER_CENTROID = 39
# IVF-PQ and IVF-RaBitQ train their cells (and PQ codebooks) on a sample of this many reports per centroid (see
# _train_on_a_sample).
TRAIN_POINTS_PER_CENTROID = 40
# Dimensions per PQ sub-quantiser by default: 4 dims in 8 bits, 1/16 of the float32 vector.
DIMS_PER_SUBQUANTIZER = 4
IVF_NPROBE = 16
# faiss's OPQMatrix learns its rotation with 8-bit codebooks, whatever the index's own code size.
OPQ_CENTROIDS = 256
# faiss-gpu's k-selection handles at most this many neighbours (and cells probed); beyond, the CPU copy searches.
GPU_MAX_K = 2048


class IndexBuildError(MMedRAGError, ValueError):
    """An index cannot be built as asked: empty corpus, too few reports for IVF or PQ, bad parameters."""


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) IVF cells, but never fewer than 39 reports per cell (and at least one cell)."""
    return max(1, min(round(4 * n**0.5), n // MIN_POINTS_PER_CENTROID))


def default_pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` up to ``dim / 4``: about 4 dimensions per sub-quantiser."""
    return max(m for m in range(1, max(1, dim // DIMS_PER_SUBQUANTIZER) + 1) if dim % m == 0)


def default_coded_nprobe(nlist: int) -> int:
    """Cells searched by default in an index of codes (IVF-PQ, IVF-RaBitQ): 1/64 of them, at least 16. Generous
    where neighbours share a cell (on the --scale benchmark 4 of 4,000 gave IVF-PQ the same recall), kept for
    corpora whose neighbours spread wider."""
    return min(nlist, max(IVF_NPROBE, nlist // 64))


def new_faiss_index(
    kind: str,
    embeddings: np.ndarray,
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int = 40,
    ef_search: int = 64,
    pq_m: int | None = None,
    pq_nbits: int = 8,
    opq: bool = True,
    rerank: int = 0,
    rabitq_bits: int = DEFAULT_RABITQ_BITS,
    exact_rerank: int = 0,
) -> tuple[faiss.Index, dict]:
    """An empty (IVF kinds: trained) inner-product index of ``kind`` for ``embeddings``, and its params."""
    n, dim = embeddings.shape
    if kind not in KINDS:
        raise IndexBuildError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    _check_exact_rerank(kind, exact_rerank, rerank)
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        apply_search_params(index, kind, params)
        return index, params
    nlist = nlist or default_nlist(n)
    _check_nlist(n, nlist)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        _cluster_on_the_sphere(index)
        index.train(embeddings)
        params = {"nlist": nlist, "nprobe": min(nprobe or IVF_NPROBE, nlist)}
        apply_search_params(index, kind, params)
        return index, params
    nprobe = min(nprobe or default_coded_nprobe(nlist), nlist)
    if kind == "ivfrabitq":
        _check_rabitq(rabitq_bits)
        factory = f"IVF{nlist},RaBitQ{rabitq_bits if rabitq_bits > 1 else ''}"
        params = {"nlist": nlist, "nprobe": nprobe, "rabitq_bits": rabitq_bits, "factory": factory}
        params["exact_rerank"] = exact_rerank
        centroids = nlist
    else:
        pq_m = pq_m or default_pq_m(dim)
        _check_pq(n, dim, pq_m, pq_nbits, opq, rerank)
        factory = f"{f'OPQ{pq_m},' if opq else ''}IVF{nlist},PQ{pq_m}x{pq_nbits}np{',Refine(SQ8)' if rerank else ''}"
        params = {"nlist": nlist, "nprobe": nprobe, "pq_m": pq_m, "pq_nbits": pq_nbits, "opq": opq}
        params |= {"rerank": rerank, "exact_rerank": exact_rerank, "factory": factory}
        centroids = max(nlist, 2**pq_nbits)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(ivf_of(index))
    _cluster_on_the_sphere(ivf)
    if kind == "ivfpq":
        ivf.pq.cp.min_points_per_centroid = 1  # too few points is warned about in our words (_check_pq)
    params["trained_on"] = _train_on_a_sample(index, embeddings, TRAIN_POINTS_PER_CENTROID * centroids)
    apply_search_params(index, kind, params)
    return index, params


def _train_on_a_sample(index: faiss.Index, embeddings: np.ndarray, sample: int) -> int:
    """Train ``index`` on ``sample`` reports drawn with a fixed seed (all of them if there are fewer): k-means
    costs sample x nlist x dim per iteration, and more points per centroid barely move the centroids."""
    n = len(embeddings)
    sample = min(n, sample)
    rows = np.sort(np.random.default_rng(0).choice(n, sample, replace=False)) if sample < n else slice(None)
    index.train(np.ascontiguousarray(embeddings[rows]))
    return sample


def _cluster_on_the_sphere(index: faiss.IndexIVF) -> None:
    index.cp.spherical = True  # unit-norm centroids: the cells of cosine similarity
    index.cp.min_points_per_centroid = 1  # too few points is warned about in our words (_check_nlist)


def _check_nlist(n: int, nlist: int) -> None:
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


def _check_pq(n: int, dim: int, pq_m: int, pq_nbits: int, opq: bool, rerank: int) -> None:
    if pq_m < 1 or dim % pq_m:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0]
        raise IndexBuildError(
            f"pq_m={pq_m}: product quantisation splits each {dim}-dim embedding into pq_m equal parts, so pq_m must "
            f"divide {dim}; choose one of {', '.join(map(str, divisors))} (default {default_pq_m(dim)})."
        )
    if not 1 <= pq_nbits <= 16:
        raise IndexBuildError(f"pq_nbits={pq_nbits}: expected 1 to 16 bits per sub-quantiser code (default 8).")
    if n < 2**pq_nbits:
        raise IndexBuildError(
            f"IVF-PQ with pq_nbits={pq_nbits} trains {2**pq_nbits} centroids per sub-quantiser, but the corpus has "
            f"only {n} unique reports. Use kind='flat' (exact, and fast at this size) or pq_nbits <= "
            f"{max(1, n.bit_length() - 1)}."
        )
    if opq and n < OPQ_CENTROIDS:
        raise IndexBuildError(
            f"IVF-PQ with an OPQ rotation learns it with {OPQ_CENTROIDS}-centroid codebooks whatever pq_nbits, but the "
            f"corpus has only {n} unique reports. Pass opq=False (--no-opq) or use kind='flat' at this size."
        )
    if n < MIN_POINTS_PER_CENTROID * 2**pq_nbits:
        logger.warning(
            "IVF-PQ: %d reports for %d centroids per sub-quantiser is fewer than %d per centroid; the codebooks "
            "will be poorly placed (recall suffers). Consider kind='flat' or a smaller pq_nbits.",
            n,
            2**pq_nbits,
            MIN_POINTS_PER_CENTROID,
        )
    if rerank < 0:
        raise IndexBuildError(f"rerank={rerank}: expected 0 (off) or the shortlist size as a multiple of k")


def _check_exact_rerank(kind: str, exact_rerank: int, rerank: int) -> None:
    if exact_rerank < 0:
        raise IndexBuildError(f"exact_rerank={exact_rerank}: expected 0 (off) or the shortlist size as a multiple of k")
    if exact_rerank and kind not in CODED_KINDS:
        raise IndexBuildError(
            f"exact_rerank: only an index of codes ({', '.join(CODED_KINDS)}) has approximate scores to re-score; "
            f"a {kind} index already ranks by the exact vectors"
        )
    if exact_rerank and rerank:
        raise IndexBuildError(
            "rerank and exact_rerank: choose one re-scoring (8-bit vectors in memory, or float32 vectors from disk)"
        )


def _check_rabitq(bits: int) -> None:
    if not 1 <= bits <= RABITQ_MAX_BITS:
        raise IndexBuildError(
            f"rabitq_bits={bits}: expected 1 to {RABITQ_MAX_BITS} bits per dimension (default {DEFAULT_RABITQ_BITS}; "
            f"each bit costs dim/8 bytes per report)"
        )


def ivf_of(index: faiss.Index) -> faiss.IndexIVF:
    """The IVF part of an IVF index, under an OPQ rotation or a re-ranking layer if there is one."""
    return faiss.extract_index_ivf(index)


def apply_search_params(index: faiss.Index, kind: str, params: dict) -> None:
    """Put the manifest's search settings on ``index``: faiss.write_index does not keep HNSW's efSearch, nor
    a re-ranking layer's k_factor, so the manifest is the record of search settings."""
    if kind in IVF_KINDS:
        ivf_of(index).nprobe = params["nprobe"]
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    if kind == "ivfpq" and params.get("rerank"):
        faiss.downcast_index(index).k_factor = params["rerank"]


def exhaustive_params(index: faiss.Index, kind: str, size: int) -> faiss.SearchParameters | None:
    """Search settings under which ``index`` returns ``min(k, size)`` real rows for every query."""
    if kind in IVF_KINDS:
        return _every_cell(faiss.downcast_index(index))
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=size)
    return None


def _every_cell(index: faiss.Index) -> faiss.SearchParameters:
    """IVF search parameters probing all cells, nested as the layers over the IVF index (re-ranking, rotation)."""
    if isinstance(index, faiss.IndexRefine):
        base = _every_cell(faiss.downcast_index(index.base_index))
        return faiss.IndexRefineSearchParameters(base_index_params=base, k_factor=index.k_factor)
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=_every_cell(faiss.downcast_index(index.index)))
    return faiss.SearchParametersIVF(nprobe=index.nlist)


def read_faiss_index(path: str, mmap: bool) -> faiss.Index:
    """``faiss.read_index``; with ``mmap``, the index's vectors, codes and inverted lists stay in the file
    (faiss's IO_FLAG_MMAP_IFC, which maps flat codes, IVF lists and HNSW links of every kind here) and pages
    are read as searches touch them."""
    return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC if mmap else 0)


def gpu_copy(index: faiss.Index, kind: str) -> faiss.Index | None:
    """A copy of ``index`` on every GPU faiss can use (faiss-gpu with a GPU present), else None.

    faiss-gpu takes flat, IVF-flat and IVF-PQ indexes (an OPQ rotation stays on the CPU in front of them); it has
    no HNSW, and IVF-PQ only for some code sizes (``pq_m`` in 1-4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96,
    8 bits; float16 look-up tables from 56 sub-quantisers) and without the re-ranking layer: where the copy is
    refused, the index is searched on the CPU and the reason is logged. IVF-RaBitQ is searched on the CPU: its
    GPU path is neither built here nor tested (no GPU was available).
    """
    if kind in ("hnsw", "ivfrabitq") or faiss.get_num_gpus() == 0:
        return None
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16LookupTables = True  # IVF-PQ: larger pq_m fit in the GPU's shared memory
    try:
        copy = faiss.index_cpu_to_all_gpus(index, options)
    except RuntimeError as error:
        logger.warning("faiss-gpu cannot take this %s index (%s); searching it on the CPU", kind, error)
        return None
    logger.info("Searching the %s report index on %d GPU(s)", kind, faiss.get_num_gpus())
    return copy
