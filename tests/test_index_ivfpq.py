"""IVF-PQ and IVF-RaBitQ report indexes, memory-mapped loading, reports read on demand, and old index directories."""

import json

import faiss
import numpy as np
import pytest

from mmed_rag.config import ConfigError, load_config
from mmed_rag.retrieval.exact_vectors import VECTORS_FILE
from mmed_rag.retrieval.index import (
    BuildIndexConfig,
    IndexBuildError,
    IndexCorruptError,
    IndexedReport,
    IndexMissingError,
    ReportIndex,
    RetrieverIdentity,
    build_index,
)
from mmed_rag.retrieval.index_kinds import default_pq_m
from mmed_rag.retrieval.report_rows import ReportRows, ReportRowsError

DIM = 32
IDENTITY = RetrieverIdentity(weights_sha256="0" * 64, embed_dim=DIM, model_name="synthetic")
CORPUS = {"path": "synthetic", "sha256": "0" * 64, "records": 3000}


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """Tiny k-means runs thousands of short parallel loops; on 2 shared cores OpenMP's waiting threads make them
    several times slower than one thread (measured: 8.3 s against 1.1 s to build this module's IVF-PQ)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 50 fixed topic centres (the same centres for every seed): queries are not corpus rows."""
    centres = np.random.default_rng(0).normal(size=(50, DIM))
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, 50, n)] + 0.7 * rng.normal(size=(n, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def entries(n: int) -> list[IndexedReport]:
    return [IndexedReport(row, f"Report {row}: {'no ' * (row % 3)}effusion.", (f"r{row}", row)) for row in range(n)]


@pytest.fixture(scope="module")
def data():
    corpus, queries = clustered(3000, 1), clustered(200, 2)
    flat = ReportIndex.from_embeddings(corpus, entries(3000), "radiology", IDENTITY, CORPUS, use_gpu=False)
    return corpus, queries, flat.search(queries, 10)[1]


@pytest.fixture(scope="module")
def ivfpq(data):
    corpus = data[0]
    return ReportIndex.from_embeddings(corpus, entries(3000), "radiology", IDENTITY, CORPUS, "ivfpq", use_gpu=False)


def recall_at_10(rows: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist(), strict=True)]))


def test_ivfpq_defaults_follow_the_corpus_and_find_most_exact_neighbours(ivfpq, data):
    _, queries, exact = data
    params = ivfpq.manifest["params"]
    assert (params["nlist"], params["pq_m"], params["pq_nbits"], params["factory"]) == (76, 8, 8, "OPQ8,IVF76,PQ8x8np")
    assert default_pq_m(DIM) == 8 and default_pq_m(100) == 25 and default_pq_m(7) == 1

    scores, rows = ivfpq.search(queries, 10)

    assert recall_at_10(rows, exact) >= 0.6  # 8 bytes per 32-dim report; measured 0.73
    assert (rows >= 0).all() and (np.diff(scores, axis=1) <= 1e-6).all()


def test_reranking_the_shortlist_recovers_the_exact_neighbours(data):
    corpus, queries, exact = data
    index = ReportIndex.from_embeddings(
        corpus, entries(3000), "radiology", IDENTITY, CORPUS, "ivfpq", rerank=10, nprobe=32, use_gpu=False
    )
    assert index.manifest["params"]["factory"] == "OPQ8,IVF76,PQ8x8np,Refine(SQ8)"
    assert recall_at_10(index.search(queries, 10)[1], exact) >= 0.9  # measured 0.98


def test_ivfrabitq_codes_estimate_more_precisely_with_more_bits(data):
    corpus, queries, exact = data

    def recall(bits: int) -> float:
        index = ReportIndex.from_embeddings(
            corpus, entries(3000), "radiology", IDENTITY, CORPUS, "ivfrabitq", rabitq_bits=bits, use_gpu=False
        )
        assert index.manifest["params"] == {
            "nlist": 76,
            "nprobe": 16,
            "rabitq_bits": bits,
            "factory": f"IVF76,RaBitQ{bits if bits > 1 else ''}",
            "exact_rerank": 0,
            "trained_on": 3000,
        }
        scores, rows = index.search(queries, 10)
        assert (rows >= 0).all() and (np.diff(scores, axis=1) <= 1e-6).all()
        return recall_at_10(rows, exact)

    one_bit, four_bits = recall(1), recall(4)
    assert four_bits >= 0.85 and one_bit < four_bits - 0.15  # measured 0.92 and 0.61


@pytest.mark.parametrize(
    ("kind", "layers"), [("ivfpq", {"opq": False}), ("ivfpq", {"rerank": 5}), ("ivfrabitq", {"rabitq_bits": 2})]
)
def test_queries_short_of_k_rows_are_searched_again_through_every_cell(kind, layers, data):
    corpus = data[0][:1000]
    index = ReportIndex.from_embeddings(
        corpus, entries(1000), "radiology", IDENTITY, CORPUS, kind, nlist=25, nprobe=1, use_gpu=False, **layers
    )
    _, rows = index.search(corpus[:3], 1000)  # one cell holds about 40 reports
    assert all(sorted(query) == list(range(1000)) for query in rows.tolist())


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq", "ivfrabitq"])
def test_a_memory_mapped_index_searches_exactly_like_one_read_into_memory(kind, ivfpq, data, tmp_path):
    corpus, queries, _ = data
    built = (
        ivfpq
        if kind == "ivfpq"
        else ReportIndex.from_embeddings(corpus, entries(3000), "radiology", IDENTITY, CORPUS, kind, use_gpu=False)
    )
    directory = built.save(tmp_path / kind)
    mapped = ReportIndex.load(directory, use_gpu=False)
    read = ReportIndex.load(directory, use_gpu=False, mmap=False)

    searches = mapped.search(queries, 10), read.search(queries, 10), built.search(queries, 10)
    for got, in_memory, fresh in zip(*searches, strict=True):
        np.testing.assert_array_equal(got, in_memory)
        np.testing.assert_array_equal(got, fresh)
    assert mapped.manifest["params"] == built.manifest["params"]
    assert isinstance(mapped.entries, ReportRows) and mapped.entries == built.entries
    rows = mapped.search(queries[:3], 4)[1]
    assert mapped.lookup(rows) == [[built.entries[row] for row in query] for query in rows.tolist()]


def test_bad_code_parameters_are_refused_with_what_to_choose(data):
    corpus = data[0]

    def build(n=3000, **params):
        ReportIndex.from_embeddings(corpus[:n], entries(n), "radiology", IDENTITY, CORPUS, "ivfpq", **params)

    with pytest.raises(IndexBuildError, match=r"pq_m=5: .* must divide 32; choose one of 1, 2, 4, 8, 16, 32"):
        build(pq_m=5)
    with pytest.raises(IndexBuildError, match="trains 256 centroids per sub-quantiser, but the corpus has only 200"):
        build(n=200, nlist=4)
    with pytest.raises(IndexBuildError, match="OPQ rotation .* only 200 unique reports. Pass opq=False"):
        build(n=200, nlist=4, pq_nbits=4)
    with pytest.raises(IndexBuildError, match="pq_nbits=17: expected 1 to 16"):
        build(pq_nbits=17)
    with pytest.raises(IndexBuildError, match="nlist=5000 needs at least 5000 reports"):
        build(nlist=5000)
    with pytest.raises(IndexBuildError, match=r"rabitq_bits=0: expected 1 to 9 bits per dimension \(default 4"):
        ReportIndex.from_embeddings(corpus, entries(3000), "radiology", IDENTITY, CORPUS, "ivfrabitq", rabitq_bits=0)
    with pytest.raises(IndexBuildError, match="exact_rerank: only an index of codes .* a hnsw index already ranks"):
        ReportIndex.from_embeddings(corpus, entries(3000), "radiology", IDENTITY, CORPUS, "hnsw", exact_rerank=4)
    with pytest.raises(IndexBuildError, match="rerank and exact_rerank: choose one"):
        build(rerank=4, exact_rerank=4)
    with pytest.raises(IndexBuildError, match="exact_rerank=-1: expected 0"):
        build(exact_rerank=-1)
    for field, value, message in [
        ("pq_nbits", 0, "pq_nbits: expected 1 to 16"),
        ("rerank", -1, "rerank: expected 0"),
        ("pq_m", 0, "pq_m: expected at least 1"),
        ("nprobe", 0, "nprobe: expected at least 1"),
        ("rabitq_bits", 10, "rabitq_bits: expected 1 to 9"),
        ("exact_rerank", -1, "exact_rerank: expected 0"),
        ("exact_rerank", 4, "exact_rerank: only for kind ivfpq or ivfrabitq .* not flat"),
    ]:
        with pytest.raises(ConfigError, match=message):
            BuildIndexConfig(retriever="r", corpus="c", modality="radiology", out="o", **{field: value})
    with pytest.raises(ConfigError, match="rerank and exact_rerank: choose one"):
        BuildIndexConfig(
            retriever="r", corpus="c", modality="radiology", out="o", kind="ivfpq", rerank=2, exact_rerank=2
        )


@pytest.mark.parametrize(("kind", "codes"), [("ivfrabitq", {"rabitq_bits": 1}), ("ivfpq", {"pq_m": 4})])
def test_exact_reranking_returns_the_flat_index_neighbours_and_scores_from_coarse_codes(kind, codes, data):
    corpus, queries, exact = data
    coarse = ReportIndex.from_embeddings(
        corpus, entries(3000), "radiology", IDENTITY, CORPUS, kind, use_gpu=False, **codes
    )
    reranked = ReportIndex.from_embeddings(
        corpus, entries(3000), "radiology", IDENTITY, CORPUS, kind, exact_rerank=4, use_gpu=False, **codes
    )

    scores, rows = reranked.search(queries, 10)

    assert recall_at_10(coarse.search(queries, 10)[1], exact) < 0.75  # measured 0.61 (1 bit) and 0.54 (4 bytes)
    assert recall_at_10(rows, exact) >= 0.95  # measured 0.98 and 0.98
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", corpus[rows], queries), rtol=0, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_exact_vectors_are_saved_read_from_disk_and_checked(data, tmp_path):
    corpus, queries, _ = data
    built = ReportIndex.from_embeddings(
        corpus, entries(3000), "radiology", IDENTITY, CORPUS, "ivfrabitq", rabitq_bits=1, exact_rerank=4, use_gpu=False
    )
    directory = built.save(tmp_path / "index")
    assert (directory / VECTORS_FILE).stat().st_size == 3000 * DIM * 4
    mapped, read = ReportIndex.load(directory, use_gpu=False), ReportIndex.load(directory, use_gpu=False, mmap=False)
    assert mapped.exact_vectors.path == directory / VECTORS_FILE
    np.testing.assert_array_equal(mapped.exact_vectors.take(np.array([7, 2, 7, 2999])), corpus[[7, 2, 7, 2999]])
    for got in (mapped.search(queries, 10), read.search(queries, 10)):
        for part, fresh in zip(got, built.search(queries, 10), strict=True):
            np.testing.assert_array_equal(part, fresh)

    copied = ReportIndex.load(mapped.save(tmp_path / "copy"), use_gpu=False)  # a loaded index saves its vectors too
    np.testing.assert_array_equal(copied.search(queries, 5)[1], built.search(queries, 5)[1])

    vectors = (directory / VECTORS_FILE).read_bytes()
    (directory / VECTORS_FILE).write_bytes(vectors[:-4] + b"\0\0\0\0")
    with pytest.raises(IndexCorruptError, match="vectors.f32 was changed or replaced after the index was written"):
        ReportIndex.load(directory)
    (directory / VECTORS_FILE).unlink()
    with pytest.raises(IndexMissingError, match="has a manifest but no vectors.f32"):
        ReportIndex.load(directory)

    plain = ReportIndex.from_embeddings(
        corpus, entries(3000), "radiology", IDENTITY, CORPUS, "ivfrabitq", use_gpu=False
    )
    (directory / VECTORS_FILE).write_bytes(vectors)
    plain.save(directory)  # overwriting: no stale vectors left beside an index that does not use them
    assert not (directory / VECTORS_FILE).exists()
    plain.manifest["params"]["exact_rerank"] = 4
    with pytest.raises(IndexCorruptError, match="exact_rerank=4 needs the index's float32 vectors"):
        plain.search(queries, 10)


def test_a_version_1_directory_still_loads_and_looks_up_its_reports(ivfpq, data, tmp_path):
    """Version 1 had no reports.offsets: its offsets come from one scan of reports.jsonl."""
    _, queries, _ = data
    directory = ivfpq.save(tmp_path / "v1")
    (directory / "reports.offsets").unlink()
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["files"]["reports.offsets"]
    (directory / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))

    loaded = ReportIndex.load(directory, use_gpu=False)

    rows = loaded.search(queries, 5)[1]
    np.testing.assert_array_equal(rows, ivfpq.search(queries, 5)[1])
    assert loaded.lookup(rows[:2]) == [[ivfpq.entries[r] for r in query] for query in rows[:2].tolist()]
    assert len(loaded) == 3000 and list(loaded.entries) == list(ivfpq.entries)
    (directory / "manifest.json").write_text(json.dumps({**manifest, "format_version": 4}))
    with pytest.raises(IndexCorruptError, match="reads versions 1, 2, 3"):
        ReportIndex.load(directory)


def test_a_report_line_that_is_not_its_row_is_named_when_read(tmp_path):
    path = tmp_path / "reports.jsonl"
    path.write_text('{"row": 0, "report": "a", "ids": [1]}\n{"row": 5, "report": "b", "ids": [2]}\n')
    rows = ReportRows.open(path)
    assert rows[0] == IndexedReport(0, "a", (1,)) and len(rows) == 2
    with pytest.raises(ReportRowsError, match=r"reports.jsonl, line 2: row 5, expected 1"):
        rows[1]


@pytest.mark.parametrize(
    ("kind", "params", "factory"),
    [
        ("ivfpq", {"pq_m": 16, "pq_nbits": 4, "opq": False}, "IVF2,PQ16x4np"),
        ("ivfrabitq", {"rabitq_bits": 3}, "IVF2,RaBitQ3"),
        ("ivfrabitq", {"rabitq_bits": 1, "exact_rerank": 3}, "IVF2,RaBitQ"),
    ],
)
def test_build_index_stage_writes_an_index_of_codes(kind, params, factory, tmp_path):
    from mmed_rag.retrieval.clip import save_clip
    from mmed_rag.testing import tiny_clip

    retriever = save_clip(tiny_clip(0)[0], tmp_path / "clip", "tiny-clip")
    corpus = tmp_path / "train.json"
    records = [
        {"id": f"r{i}", "report": f"Finding number {i} of the study.", "image_path": ["x.png"]} for i in range(80)
    ]
    corpus.write_text(json.dumps(records))
    config = BuildIndexConfig(
        retriever=str(retriever),
        corpus=str(corpus),
        modality="radiology",
        out=str(tmp_path / "index"),
        kind=kind,
        nlist=2,
        **params,
    )
    build_index(config)

    loaded = ReportIndex.load(tmp_path / "index", retriever=retriever, corpus=corpus, use_gpu=False)
    assert loaded.manifest["params"]["factory"] == factory and len(loaded) == 80
    assert (loaded.exact_vectors is not None) == bool(params.get("exact_rerank"))
    assert load_config(BuildIndexConfig, tmp_path / "index/config.yaml") == config


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="no GPU visible to faiss (faiss-gpu and a GPU needed)")
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_flat_and_ivf_indexes_search_on_the_gpu_like_on_the_cpu(kind, data):
    corpus, queries, exact = data
    params = {"pq_m": 8} if kind == "ivfpq" else {}
    on_gpu = ReportIndex.from_embeddings(corpus, entries(3000), "radiology", IDENTITY, CORPUS, kind, **params)
    on_cpu = ReportIndex(on_gpu.index, on_gpu.entries, on_gpu.manifest, use_gpu=False)
    assert on_gpu._gpu_index is not None
    gpu_rows, cpu_rows = on_gpu.search(queries, 10)[1], on_cpu.search(queries, 10)[1]
    assert recall_at_10(gpu_rows, cpu_rows) >= 0.95  # GPU float arithmetic may swap near-ties
