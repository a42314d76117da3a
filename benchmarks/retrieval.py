"""Retrieval speed and approximate-search quality, measured side by side in one run; prints one table.

    python benchmarks/retrieval.py [--quick] [--model tiny-clip|RN50] [--reports N] [--queries N]
    python benchmarks/retrieval.py --scale [--scale-n 1000000] [--scale-dim 512] [--scale-queries 1000]

1. Repeat-run batch retrieval: ``retrieve`` with its persisted index (a second run: load the index, encode the
   queries, search, write) against the original approach on every run (encode the whole report corpus, encode
   the queries, matmul + top-k, write); same retriever, same data, retrieved reports compared one by one.
2. Search alone: FAISS exact inner product against torch matmul + top-k, ``--search-size`` x ``--search-dim``.
3. Encoding throughput: the index build against a bare ``model.encode_text`` loop over pre-tokenised tensors.
4. Approximate indexes (IVF, HNSW): recall@10 against exact search and speed-up, on report embeddings of a tiny
   retriever fine-tuned on phantoms for a few epochs (queries: phantom test images).

Report corpora: the released pathology retriever file (../shared, 4,602 distinct captions) when present, and
distinct phantom chest reports (5,000, and 50,000 or 20,000 with --quick); queries are phantom radiographs.
The original approach pays for the corpus on every run, so the ratio grows with corpus size / query count.

``--scale`` runs only the million-report comparison instead (flat against IVF-PQ; see benchmarks/index_scale.py
for its data and what it measures).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import open_clip
import torch

from mmed_rag.data.phantoms import FINDINGS, PhantomConfig, compose_report, make_phantoms
from mmed_rag.data.records import read_retriever_train, read_vqa, write_records
from mmed_rag.retrieval.batch import RetrieveConfig, load_retriever, retrieve
from mmed_rag.retrieval.clip import create_clip, save_clip
from mmed_rag.retrieval.encode import encode_images, encode_texts
from mmed_rag.retrieval.finetune import FinetuneConfig, finetune_clip
from mmed_rag.retrieval.index import ReportIndex, Retriever, unique_reports

RELEASE_CORPUS = (
    Path(__file__).resolve().parents[2] / "shared/mmed-rag-release/training/retriever/pathology/pathology_train.json"
)
ROWS: list[tuple[str, str, str, str]] = []


def text_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """A retriever JSON of ``n`` distinct phantom chest reports (text only: indexing never opens the images)."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(n):
        findings = [f for f in FINDINGS["radiology"] if rng.random() < 0.3][:2]
        report = f"{compose_report('radiology', findings, rng)} Study {index} compared with the prior film."
        records.append({"id": f"bench_{index}", "report": report, "image_path": [f"bench/{index}.png"]})
    path.write_text(json.dumps(records))
    return path


def row(what: str, ours: str, baseline: str, ratio: str) -> None:
    ROWS.append((what, ours, baseline, ratio))
    print(f"  {what}: {ours} vs {baseline} ({ratio})", flush=True)


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def original_approach(model_dir: Path, corpus: Path, vqa: Path, images: Path, k: int, output: Path) -> list[list[str]]:
    """What the released retrieve_clip_VQA.py does on every run (minus its encoding of every corpus image)."""
    retriever = load_retriever(str(model_dir), None)
    reports = [entry.report for entry in unique_reports(read_retriever_train(corpus).records)]
    records = read_vqa(vqa).records
    texts = torch.from_numpy(encode_texts(retriever.model, retriever.tokenizer, reports, progress=False))
    queries = torch.from_numpy(
        encode_images(retriever.model, retriever.preprocess, images, [r.image for r in records], progress=False)
    )
    top = (queries @ texts.T).topk(k, dim=1).indices.tolist()
    retrieved = [[reports[i] for i in row] for row in top]
    with open(output, "w", encoding="utf-8") as sink:
        for record, chosen in zip(records, retrieved, strict=True):
            line = {**record.to_dict(), "reference_reports": chosen, "retrieve_k": len(chosen)}
            sink.write(json.dumps(line) + "\n")
    return retrieved


def query_set(work: Path, n_queries: int) -> tuple[Path, Path]:
    """``n_queries`` phantom radiographs with one VQA question each: (VQA JSONL, image root)."""
    data = work / "queries"
    make_phantoms(
        PhantomConfig(
            out=str(data), n=int(n_queries / 0.2) + 3, size=64, modalities=("radiology",), questions_per_image=1
        )
    )
    return data / "test/vqa/radiology_test.jsonl", data / "images"


def repeat_run(work: Path, model_name: str, corpus: Path, queries: tuple[Path, Path], label: str) -> None:
    vqa, images = queries
    retriever_dir = work / f"retriever-{model_name}"
    if not retriever_dir.is_dir():
        model, *_ = create_clip(model_name)
        save_clip(model, retriever_dir, model_name)
    output = work / f"ours-{label}.jsonl"
    config = RetrieveConfig(
        eval_json=str(vqa),
        output_path=str(output),
        img_root=str(images),
        train_json=str(corpus),
        model_name_or_path=str(retriever_dir),
        fixed_k=5,
        batch_size=64,
    )
    _, first = timed(retrieve, config)  # builds and caches the index
    summary, ours = timed(retrieve, config)
    original, baseline = timed(original_approach, retriever_dir, corpus, vqa, images, 5, work / "orig.jsonl")
    mine = [json.loads(line)["reference_reports"] for line in open(summary.output_path, encoding="utf-8")]
    same = sum(a == b for a, b in zip(mine, original, strict=True))
    size = len(ReportIndex.load(summary.index_dir).entries)
    row(
        f"repeat-run retrieval, {model_name}, {size:,} {label} reports x {len(mine)} queries (s)",
        f"{ours:.2f}",
        f"{baseline:.2f} original approach",
        f"{baseline / ours:.1f}x faster; identical top-5: {same}/{len(mine)}",
    )
    row("  first run on it (builds + caches the index) (s)", f"{first:.2f}", "-", "-")


def search_alone(size: int, dim: int, n_queries: int) -> None:
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(size, dim)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[rng.choice(size, n_queries, replace=False)] + 0.1 * rng.normal(size=(n_queries, dim)).astype(
        np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(corpus)
    index.search(queries[:10], 10)  # warm-up
    (_, faiss_ids), faiss_time = timed(index.search, queries, 10)
    corpus_t, queries_t = torch.from_numpy(corpus), torch.from_numpy(queries)
    (queries_t[:10] @ corpus_t.T).topk(10)
    torch_result, torch_time = timed(lambda: (queries_t @ corpus_t.T).topk(10, dim=1))
    same = float(np.mean(faiss_ids == torch_result.indices.numpy()))
    row(
        f"search alone, {size:,} x {dim}, {n_queries} queries, top-10 (s)",
        f"{faiss_time:.3f} faiss exact",
        f"{torch_time:.3f} torch matmul+topk",
        f"{torch_time / faiss_time:.2f}x; same ids {same:.4f}",
    )


def encoding_throughput(work: Path, model_name: str, corpus: Path, limit: int | None = None) -> None:
    records = read_retriever_train(corpus).records
    if limit is not None:  # a large text encoder on CPU: a slice of the corpus
        records = records[:limit]
        corpus = write_records(work / f"slice-{limit}.json", records)
    model, _, preprocess, tokenizer = create_clip(model_name)
    reports = [entry.report for entry in unique_reports(records)]
    tokens = [tokenizer(reports[i : i + 256]) for i in range(0, len(reports), 256)]

    def bare():
        with torch.no_grad():
            for batch in tokens:
                model.encode_text(batch, normalize=True)

    bare()  # warm-up
    _, bare_time = timed(bare)
    # The build starts from text with a fresh tokenizer (open_clip caches tokenised words): the whole pipeline.
    retriever = Retriever.from_model(model, open_clip.get_tokenizer(model_name), model_name, preprocess)
    _, build_time = timed(ReportIndex.build, retriever, corpus, "bench", batch_size=256, progress=False)
    row(
        f"encode {len(reports):,} reports, {model_name} (s)",
        f"{build_time:.2f} index build from text",
        f"{bare_time:.2f} bare encode_text on tokens",
        f"{build_time / bare_time:.2f}x the bare loop",
    )


def approximate(work: Path, n_phantoms: int, epochs: int) -> None:
    data = work / "trained"
    make_phantoms(PhantomConfig(out=str(data), n=n_phantoms, size=64, modalities=("radiology",)))
    corpus = data / "training/retriever/radiology/radiology_train.json"
    retriever_dir = finetune_clip(
        FinetuneConfig(
            train_data=str(corpus),
            val_data=str(data / "training/retriever/radiology/radiology_val.json"),
            img_root=str(data / "images"),
            dataset_type="radiology",
            model="tiny-clip",
            batch_size=32,
            lr=1e-3,
            warmup=10,
            epochs=epochs,
            workers=0,
            logs=str(work / "logs"),
            precision="fp32",
        )
    )
    exact = ReportIndex.build(retriever_dir, corpus, "radiology", progress=False)
    retriever = load_retriever(str(retriever_dir), None)
    records = read_vqa(data / "test/vqa/radiology_test.jsonl").records
    queries = encode_images(
        retriever.model, retriever.preprocess, data / "images", [r.image for r in records], progress=False
    )
    queries = np.repeat(queries, max(1, 2000 // len(queries)), axis=0)
    (_, exact_rows), exact_time = timed(exact.search, queries, 10)
    for kind in ("ivf", "hnsw"):
        approx = ReportIndex.build(retriever_dir, corpus, "radiology", kind, progress=False)
        (_, rows), approx_time = timed(approx.search, queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact_rows.tolist(), strict=True)])
        row(
            f"{kind} vs exact, {exact.size:,} trained-retriever reports, {len(queries)} queries (s)",
            f"{approx_time:.4f} {kind}",
            f"{exact_time:.4f} exact",
            f"recall@10 {recall:.3f}, {exact_time / approx_time:.1f}x",
        )


def scale(args: argparse.Namespace) -> None:
    """Flat exact search against IVF-PQ and IVF-RaBitQ (default parameters, then swept) on ``--scale-n``
    reports."""
    from index_scale import print_table, run_scale

    configs = [
        ("flat", "flat", {}, {}),
        ("flat, read as before", None, {}, {"mmap": False, "materialise_reports": True}),
        ("ivfpq", "ivfpq", {}, {"sweep": [{}, *({"nprobe": p} for p in (4, 8, 16, 128))]}),
        (
            "ivfpq",
            "ivfpq",
            {"pq_m": args.scale_dim // 8, "rerank": 10},
            {"sweep": [{}, {"rerank": 4}, {"rerank": 20}, {"nprobe": 16, "rerank": 20}]},
        ),
    ]
    configs += [
        ("ivfrabitq", "ivfrabitq", {}, {"sweep": [{}, {"nprobe": 16}]}),
        ("ivfrabitq", "ivfrabitq", {"rabitq_bits": 3}, {"sweep": [{}, {"nprobe": 16}]}),
        (
            "ivfrabitq, exact re-ranking",
            "ivfrabitq",
            {"rabitq_bits": 1, "exact_rerank": 4},
            {
                "sweep": [
                    {},
                    {"nprobe": 16},
                    {"nprobe": 16, "exact_rerank": 2},
                    {"nprobe": 16, "exact_rerank": 10},
                    {"nprobe": 16, "cold_vectors": True},
                ]
            },
        ),
        ("ivfrabitq, exact re-ranking", "ivfrabitq", {"rabitq_bits": 2, "exact_rerank": 4}, {"sweep": [{}]}),
    ]
    if args.scale_no_opq:
        configs.append(("ivfpq, no OPQ", "ivfpq", {"opq": False}, {}))
    with tempfile.TemporaryDirectory(dir=args.scale_dir) as work:
        table = run_scale(Path(work), args.scale_n, args.scale_dim, args.scale_queries, configs)
    print_table(table, args.scale_n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller settings, under 3 minutes on 2 cores")
    parser.add_argument("--model", default=None, help="retriever architecture for 1 and 3 (default: tiny-clip)")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--search-size", type=int, default=None)
    parser.add_argument("--search-dim", type=int, default=512)
    parser.add_argument(
        "--scale", action="store_true", help="only the million-report index: flat against IVF-PQ and IVF-RaBitQ"
    )
    parser.add_argument("--scale-n", type=int, default=1_000_000, help="--scale: reports in the index")
    parser.add_argument("--scale-dim", type=int, default=512, help="--scale: embedding width")
    parser.add_argument("--scale-queries", type=int, default=1000, help="--scale: queries (not corpus points)")
    parser.add_argument("--scale-no-opq", action="store_true", help="--scale: also IVF-PQ without OPQ rotation")
    parser.add_argument("--scale-dir", default=None, help="--scale: work directory (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.scale:
        scale(args)
        return
    model = args.model or "tiny-clip"
    queries = args.queries or 500
    search_size = args.search_size or 100_000
    large = 20_000 if args.quick else 50_000
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        query_files = query_set(work, queries)
        release = RELEASE_CORPUS if RELEASE_CORPUS.is_file() else None
        if release is not None:
            repeat_run(work, model, release, query_files, "released pathology")
        repeat_run(work, model, text_corpus(work / "corpus-5k.json", 5_000), query_files, "phantom")
        repeat_run(work, model, text_corpus(work / "corpus-large.json", large), query_files, "phantom")
        search_alone(search_size, args.search_dim, 1000)
        encoding_throughput(work, model, release or work / "corpus-5k.json")
        # The original's architecture (RN50, random weights): a real-size text encoder, where the tokenizer's
        # share of the pipeline is what it would be in use.
        encoding_throughput(work, "RN50", release or work / "corpus-5k.json", limit=128 if args.quick else 512)
        approximate(work, 1500 if args.quick else 6000, 3 if args.quick else 6)
    width = max(len(r[0]) for r in ROWS)
    print()
    print(f"| {'measure':<{width}} | mmed-rag | baseline | ratio |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for what, ours, baseline, ratio in ROWS:
        print(f"| {what:<{width}} | {ours} | {baseline} | {ratio} |")


if __name__ == "__main__":
    main()
