"""The report index: built once from a saved retriever, searched exactly, and refused when it no longer fits."""

import hashlib
import json
import shutil

import numpy as np
import open_clip
import pytest

from mmed_rag.config import load_config
from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.data.records import read_report_test, read_retriever_train
from mmed_rag.retrieval.clip import register_model_configs, save_clip
from mmed_rag.retrieval.encode import encode_images, encode_texts
from mmed_rag.retrieval.index import (
    BuildIndexConfig,
    IndexBuildError,
    IndexCorruptError,
    IndexMismatchError,
    IndexMissingError,
    ReportIndex,
    Retriever,
    build_index,
    unique_reports,
)
from mmed_rag.testing import tiny_clip

INDEX_FILES = {"index.faiss", "reports.jsonl", "reports.offsets", "manifest.json"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(PhantomConfig(out=str(out), n=60, size=32, modalities=("radiology",)))
    return out


@pytest.fixture(scope="module")
def corpus(phantoms):
    return phantoms / "training/retriever/radiology/radiology_train.json"


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(0)


@pytest.fixture(scope="module")
def retriever_dir(clip, tmp_path_factory):
    return save_clip(clip[0], tmp_path_factory.mktemp("retriever") / "tiny-clip-0", "tiny-clip")


@pytest.fixture(scope="module")
def index(retriever_dir, corpus):
    return ReportIndex.build(retriever_dir, corpus, "radiology", progress=False)


@pytest.fixture(scope="module")
def image_queries(clip, phantoms):
    """Test-split images of the phantom set, encoded like batch retrieval encodes its queries."""
    model, _, preprocess, _ = clip
    paths = [record.images[0] for record in read_report_test(phantoms / "test/report/radiology_test.json")]
    return encode_images(model, preprocess, phantoms / "images", paths, progress=False)


def test_exact_search_is_the_brute_force_matmul(index, clip, corpus, image_queries):
    model, _, _, tokenizer = clip
    records = read_retriever_train(corpus).records
    reports = encode_texts(model, tokenizer, [record.report for record in records], progress=False)
    similarity = image_queries @ reports.T
    expected_rows = np.argsort(-similarity, axis=1, kind="stable")[:, :5]

    scores, rows = index.search(image_queries, k=5)

    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (len(image_queries), 5)
    hits = index.lookup(rows)
    assert [[hit.ids for hit in query] for query in hits] == [[(records[r].id,) for r in q] for q in expected_rows]
    np.testing.assert_allclose(scores, np.take_along_axis(similarity, expected_rows, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_identical_reports_are_one_row_that_keeps_every_id(retriever_dir, tmp_path):
    corpus = tmp_path / "train.json"
    corpus.write_text(
        json.dumps(
            [
                {"id": "a", "report": "No acute cardiopulmonary process.", "image_path": ["a.png"]},
                {"id": "b", "report": "Moderate cardiomegaly.", "image_path": ["b.png"]},
                {"id": "c", "report": "No acute cardiopulmonary process.", "image_path": ["c.png"]},
            ]
        )
    )
    index = ReportIndex.build(retriever_dir, corpus, "radiology", progress=False)

    assert [(entry.report, entry.ids) for entry in index.entries] == [
        ("No acute cardiopulmonary process.", ("a", "c")),
        ("Moderate cardiomegaly.", ("b",)),
    ]
    assert index.manifest["corpus"]["records"] == 3 and index.manifest["size"] == 2
    assert unique_reports(read_retriever_train(corpus).records) == list(index.entries)


def test_saved_index_loads_with_its_retriever_and_corpus_and_searches_the_same(
    index, retriever_dir, corpus, image_queries, tmp_path
):
    directory = index.save(tmp_path / "radiology-index")
    loaded = ReportIndex.load(directory, retriever=retriever_dir, corpus=corpus, modality="radiology")

    assert {path.name for path in directory.iterdir()} == INDEX_FILES  # no temporary files left behind
    for got, expected in zip(loaded.search(image_queries, 7), index.search(image_queries, 7), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert loaded.entries == index.entries
    manifest = json.loads((directory / "manifest.json").read_text())
    weights = retriever_dir / "open_clip_model.safetensors"
    assert manifest["retriever"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["retriever"]["manifest"]["model_name"] == "tiny-clip"
    assert manifest["corpus"]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert (manifest["kind"], manifest["size"], manifest["embed_dim"]) == ("flat", 42, 64)
    assert set(manifest["versions"]) == {"faiss", "torch", "open_clip_torch", "mmed-rag"}


def test_index_built_from_a_model_in_memory_loads_against_the_same_model_saved(clip, retriever_dir, corpus, tmp_path):
    model, _, _, tokenizer = clip
    in_memory = ReportIndex.build(
        Retriever.from_model(model, tokenizer, "tiny-clip"), corpus, "radiology", progress=False
    )
    ReportIndex.load(in_memory.save(tmp_path / "index"), retriever=retriever_dir)


def test_another_retriever_is_refused(index, tmp_path):
    other = save_clip(tiny_clip(1)[0], tmp_path / "tiny-clip-1", "tiny-clip")
    directory = index.save(tmp_path / "index")
    with pytest.raises(IndexMismatchError, match="built with another retriever"):
        ReportIndex.load(directory, retriever=other)


def test_another_embedding_width_is_refused(index, clip, image_queries, tmp_path):
    register_model_configs()
    narrow = open_clip.create_model("tiny-clip", embed_dim=32, load_weights=False, pretrained_text=False)
    directory = index.save(tmp_path / "index")
    with pytest.raises(IndexMismatchError, match="embeds in 32 dims"):
        ReportIndex.load(directory, retriever=Retriever.from_model(narrow, clip[3], "tiny-clip-32"))
    with pytest.raises(ValueError, match="expected an array"):
        index.search(image_queries[:, :32], k=3)

    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, "embed_dim": 32}))
    with pytest.raises(IndexCorruptError, match="64-dim index"):
        ReportIndex.load(directory)


def test_a_corpus_changed_since_indexing_is_refused(retriever_dir, corpus, tmp_path):
    copy = shutil.copy(corpus, tmp_path / "train.json")
    directory = ReportIndex.build(retriever_dir, copy, "radiology", progress=False).save(tmp_path / "index")
    records = json.loads(copy.read_text())
    copy.write_text(json.dumps(records[:-1], indent=4))
    with pytest.raises(IndexMismatchError, match="changed since indexing"):
        ReportIndex.load(directory, corpus=copy)


def test_missing_or_edited_files_are_refused(index, tmp_path):
    directory = index.save(tmp_path / "index")
    reports = directory / "reports.jsonl"
    reports.write_text("".join(reports.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(IndexCorruptError, match="changed or replaced"):
        ReportIndex.load(directory)
    reports.unlink()
    with pytest.raises(IndexMissingError, match="no reports.jsonl"):
        ReportIndex.load(directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(IndexMissingError, match="interrupted"):
        ReportIndex.load(directory)
    with pytest.raises(IndexMissingError, match="no such index directory"):
        ReportIndex.load(tmp_path / "nowhere")


def test_an_empty_corpus_is_refused(retriever_dir, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(IndexBuildError, match="holds no records"):
        ReportIndex.build(retriever_dir, tmp_path / "empty.json", "radiology", progress=False)


def test_k_beyond_the_corpus_returns_every_report_once(index, image_queries):
    scores, rows = index.search(image_queries, k=1000)
    assert rows.shape == scores.shape == (len(image_queries), index.size)
    assert all(sorted(query) == list(range(index.size)) for query in rows.tolist())


@pytest.mark.parametrize("kind, options", [("ivf", {"nlist": 4, "nprobe": 1}), ("hnsw", {"hnsw_m": 8})])
def test_approximate_indexes_find_each_report_first_for_itself(kind, options, clip, retriever_dir, corpus, tmp_path):
    model, _, _, tokenizer = clip
    index = ReportIndex.build(retriever_dir, corpus, "radiology", kind, progress=False, **options)
    own_embeddings = encode_texts(model, tokenizer, [entry.report for entry in index.entries], progress=False)

    scores, rows = index.search(own_embeddings, k=index.size)  # more than one IVF cell holds: searched again

    assert (rows[:, 0] == np.arange(index.size)).all()
    assert (rows >= 0).all() and (np.diff(scores, axis=1) <= 1e-6).all()
    loaded = ReportIndex.load(index.save(tmp_path / kind), retriever=retriever_dir, corpus=corpus)
    assert loaded.manifest["params"] == index.manifest["params"]
    np.testing.assert_array_equal(loaded.search(own_embeddings, 3)[1], index.search(own_embeddings, 3)[1])


def test_ivf_refuses_more_cells_than_reports(retriever_dir, corpus):
    with pytest.raises(IndexBuildError, match="needs at least 100 reports"):
        ReportIndex.build(retriever_dir, corpus, "radiology", "ivf", nlist=100, progress=False)


def test_build_index_stage_writes_the_index_and_its_config(retriever_dir, corpus, tmp_path):
    out = tmp_path / "indexes/radiology"
    config = BuildIndexConfig(
        retriever=str(retriever_dir), corpus=str(corpus), modality="radiology", out=str(out), batch_size=16
    )
    build_index(config)

    assert {path.name for path in out.iterdir()} == INDEX_FILES | {"config.yaml"}
    assert load_config(BuildIndexConfig, out / "config.yaml") == config
    assert len(ReportIndex.load(out, retriever=retriever_dir, corpus=corpus, modality="radiology")) == 42
    with pytest.raises(IndexMismatchError, match="indexes radiology reports, not pathology"):
        ReportIndex.load(out, modality="pathology")
