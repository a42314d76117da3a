"""Batch retrieval with the original flags: output format, index caching, resume, bad records, mismatches."""

import json

import numpy as np
import pytest

from mmed_rag.config import ConfigError
from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.data.records import read_retrieval, read_retriever_train, read_vqa
from mmed_rag.outputs import OutputError
from mmed_rag.retrieval.batch import RetrievalError, RetrieveConfig, retrieve
from mmed_rag.retrieval.clip import save_clip
from mmed_rag.retrieval.encode import encode_images, encode_texts
from mmed_rag.retrieval.index import IndexMismatchError, ReportIndex
from mmed_rag.testing import tiny_clip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    make_phantoms(PhantomConfig(out=str(root / "data"), n=60, size=64, modalities=("radiology",)))
    model, _, preprocess, tokenizer = tiny_clip(0)
    save_clip(model, root / "clip", "tiny-clip")
    other, *_ = tiny_clip(1)
    save_clip(other, root / "other-clip", "tiny-clip")
    return {
        "root": root,
        "corpus": root / "data/training/retriever/radiology/radiology_train.json",
        "vqa": root / "data/test/vqa/radiology_test.jsonl",
        "images": root / "data/images",
        "clip": root / "clip",
        "other": root / "other-clip",
        "model": (model, preprocess, tokenizer),
    }


def config(setup, output, **overrides):
    values = dict(
        eval_json=str(setup["vqa"]),
        output_path=str(output),
        img_root=str(setup["images"]),
        train_json=str(setup["corpus"]),
        model_name_or_path=str(setup["clip"]),
        fixed_k=3,
        batch_size=4,
    )
    return RetrieveConfig(**{**values, **overrides})


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_output_is_the_input_plus_reports_and_k_and_matches_brute_force(setup, tmp_path):
    summary = retrieve(config(setup, tmp_path / "out.jsonl"))
    inputs = [json.loads(line) for line in setup["vqa"].read_text().splitlines()]
    outputs = read_lines(summary.output_path)
    assert summary.written == len(outputs) == len(inputs) and summary.skipped == []
    for source, result in zip(inputs, outputs, strict=True):
        assert {k: v for k, v in result.items() if k not in ("reference_reports", "retrieve_k")} == source
        assert result["retrieve_k"] == len(result["reference_reports"]) == 3
    assert len(read_retrieval(summary.output_path)) == len(inputs)

    # The original approach: encode the whole corpus, matmul, top-k. Same reports, same order.
    model, preprocess, tokenizer = setup["model"]
    reports = list(dict.fromkeys(record.report for record in read_retriever_train(setup["corpus"])))
    texts = encode_texts(model, tokenizer, reports)
    queries = encode_images(model, preprocess, setup["images"], [r.image for r in read_vqa(setup["vqa"])])
    top = np.argsort(-(queries @ texts.T), axis=1, kind="stable")[:, :3]
    assert [line["reference_reports"] for line in outputs] == [[reports[i] for i in row] for row in top]


def test_second_run_reuses_the_cached_index(setup, tmp_path, monkeypatch):
    first = retrieve(config(setup, tmp_path / "a.jsonl"))
    assert first.index_dir.parent.name == ".mmed-rag-index"

    def no_build(*args, **kwargs):
        raise AssertionError("the corpus was encoded again")

    monkeypatch.setattr(ReportIndex, "build", no_build)
    second = retrieve(config(setup, tmp_path / "b.jsonl"))
    assert second.index_dir == first.index_dir
    assert read_lines(second.output_path) == read_lines(first.output_path)


def test_a_built_index_skips_corpus_encoding(setup, tmp_path, monkeypatch):
    index = ReportIndex.build(setup["clip"], setup["corpus"], "radiology")
    index.save(tmp_path / "index")
    expected = retrieve(config(setup, tmp_path / "expected.jsonl"))
    monkeypatch.setattr(ReportIndex, "build", lambda *a, **k: pytest.fail("encoded the corpus"))
    result = retrieve(config(setup, tmp_path / "out.jsonl", index=str(tmp_path / "index"), train_json=None))
    assert read_lines(result.output_path) == read_lines(expected.output_path)


def test_killed_run_resumes_without_losing_or_repeating_records(setup, tmp_path, monkeypatch):
    expected = read_lines(retrieve(config(setup, tmp_path / "expected.jsonl")).output_path)
    output = tmp_path / "out.jsonl"
    real_search, calls = ReportIndex.search, []

    def dies_on_third_batch(self, queries, k):
        calls.append(len(queries))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_search(self, queries, k)

    monkeypatch.setattr(ReportIndex, "search", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        retrieve(config(setup, output))
    partial = tmp_path / "out.jsonl.partial"
    assert not output.exists() and len(read_lines(partial)) == 8  # two batches of 4 were written
    with open(partial, "a") as handle:
        handle.write('{"question_id": 99, "quest')  # a line torn by the kill
    monkeypatch.setattr(ReportIndex, "search", real_search)
    summary = retrieve(config(setup, output))
    assert summary.resumed == 8 and read_lines(output) == expected and not partial.exists()


def test_missing_image_stops_with_its_id_or_is_skipped(setup, tmp_path):
    broken = tmp_path / "vqa.jsonl"
    lines = setup["vqa"].read_text().splitlines()
    record = json.loads(lines[5])
    record["image"] = "radiology/missing.png"
    lines[5] = json.dumps(record)
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(RetrievalError, match=r"question_id 6: image not found: .*missing.png"):
        retrieve(config(setup, tmp_path / "out.jsonl", eval_json=str(broken)))
    summary = retrieve(config(setup, tmp_path / "out.jsonl", eval_json=str(broken), on_error="skip"))
    assert len(summary.skipped) == 1 and "missing.png" in summary.skipped[0]
    assert 6 not in [line["question_id"] for line in read_lines(summary.output_path)]
    assert len(read_lines(summary.output_path)) == len(lines) - 1


def test_unwritable_output_is_refused_before_any_work(setup, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="cannot create the folder of the output .*out.jsonl"):
        retrieve(config(setup, blocker / "out.jsonl"))


def test_index_of_another_retriever_is_refused(setup, tmp_path):
    index = ReportIndex.build(setup["other"], setup["corpus"], "radiology")
    index.save(tmp_path / "index")
    with pytest.raises(IndexMismatchError):
        retrieve(config(setup, tmp_path / "out.jsonl", index=str(tmp_path / "index")))


def test_adaptive_rules_write_the_number_kept(setup, tmp_path):
    summary = retrieve(config(setup, tmp_path / "out.jsonl", fixed_k=5, select_rule="absolute", select_threshold=1.0))
    assert {line["retrieve_k"] for line in read_lines(summary.output_path)} == {0}
    summary = retrieve(config(setup, tmp_path / "ratio.jsonl", fixed_k=5, clip_threshold=1.0001))
    for line in read_lines(summary.output_path):
        assert 1 <= line["retrieve_k"] == len(line["reference_reports"]) <= 5


def test_config_needs_an_index_or_a_corpus_and_a_valid_rule(setup, tmp_path):
    with pytest.raises(ConfigError, match="--index DIR"):
        config(setup, tmp_path / "o.jsonl", train_json=None)
    with pytest.raises(ValueError, match="needs a threshold"):
        config(setup, tmp_path / "o.jsonl", select_rule="gap")
