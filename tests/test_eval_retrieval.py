"""eval-retrieval: recall@k against ground-truth reports, chance, and the similarity plot."""

import json

import numpy as np
import pytest
from PIL import Image

from mmed_rag.cli import main
from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.retrieval.clip import save_clip
from mmed_rag.retrieval.encode import encode_texts
from mmed_rag.retrieval.evaluate import score_retrieval
from mmed_rag.retrieval.index import ReportIndex, Retriever
from mmed_rag.testing import tiny_clip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_phantoms(PhantomConfig(out=str(root / "data"), n=60, size=64, modalities=("radiology",)))
    model, _, preprocess, tokenizer = tiny_clip(0)
    save_clip(model, root / "clip", "tiny-clip")
    corpus = root / "data/training/retriever/radiology/radiology_train.json"
    index = ReportIndex.build(Retriever.from_model(model, tokenizer, "tiny-clip", preprocess), corpus, "radiology")
    return {"root": root, "corpus": corpus, "index": index, "tokenizer": tokenizer, "model": model}


def test_a_query_that_is_its_own_report_is_found_first(setup):
    index = setup["index"]
    reports = [entry.report for entry in index.entries]
    queries = encode_texts(setup["model"], setup["tokenizer"], reports)
    scores = score_retrieval(index, queries, [(text, None) for text in reports], ks=(1, 5))
    assert scores.recall == {1: 1.0, 5: 1.0}
    assert scores.chance == {1: 1 / len(reports), 5: 5 / len(reports)}
    assert len(scores.hit_scores) == len(reports) and min(scores.hit_scores) > max(scores.miss_scores) - 1e-6


def test_recall_matches_a_hand_count(setup):
    index = setup["index"]
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(10, index.embed_dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truths = [(index.entries[i % index.size].report, None) for i in range(10)]
    _, rows = index.search(queries, 5)
    expected = np.mean([i % index.size in row for i, row in enumerate(rows.tolist())])
    assert score_retrieval(index, queries, truths, ks=(5,)).recall[5] == pytest.approx(expected)


def test_cli_writes_metrics_and_plot(setup, tmp_path, capsys):
    root = setup["root"]
    out = tmp_path / "eval"
    code = main(
        [
            "eval-retrieval",
            "--eval-json",
            str(setup["corpus"]),
            "--img-root",
            str(root / "data/images"),
            "--out",
            str(out),
            "--model-name-or-path",
            str(root / "clip"),
            "--train-json",
            str(setup["corpus"]),
            "--ks",
            "1",
            "5",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["queries"] == 42 and set(metrics["recall"]) == {"1", "5"}
    assert metrics["chance"]["5"] == pytest.approx(5 / metrics["index_size"])
    with Image.open(out / "similarity.png") as plot:
        assert plot.size == (600, 350)
    out = capsys.readouterr().out
    assert "recall@5" in out and "42 have their ground truth in the index" in out
    assert metrics["queries_with_ground_truth_in_index"] == 42


def test_queries_whose_ground_truth_is_not_indexed_are_set_apart_or_refused(setup, tmp_path, capsys):
    from mmed_rag.retrieval.evaluate import GroundTruthAbsentError

    index = setup["index"]
    reports = [entry.report for entry in index.entries]
    queries = encode_texts(setup["model"], setup["tokenizer"], reports[:4] + ["A report no corpus holds."] * 2)
    truths = [(text, None) for text in reports[:4]] + [("A report no corpus holds.", None)] * 2
    scores = score_retrieval(index, queries, truths, ks=(1,))
    assert (scores.queries, scores.answerable) == (6, 4) and scores.recall == {1: 1.0}  # not 4/6
    with pytest.raises(GroundTruthAbsentError, match="none of the 2 queries' ground-truth reports is in the index"):
        score_retrieval(index, queries[4:], truths[4:], ks=(1,))
    # The phantom test reports never occur in the training corpus: a clear error, not recall 0 beside chance.
    root = setup["root"]
    argv = ["eval-retrieval", "--eval-json", str(root / "data/test/report/radiology_test.json")]
    argv += ["--img-root", str(root / "data/images"), "--out", str(tmp_path / "ev"), "--model-name-or-path"]
    argv += [str(root / "clip"), "--train-json", str(setup["corpus"])]
    assert main(argv) == 2
    assert "recall cannot be measured" in capsys.readouterr().err and not (tmp_path / "ev/metrics.json").exists()
