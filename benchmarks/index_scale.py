"""A million-report index: flat exact search against IVF-PQ and IVF-RaBitQ, built, saved, loaded and searched
side by side.

Run through ``python benchmarks/retrieval.py --scale [--scale-n N]`` (default N = 1,000,000).

Data. No retriever of a realistic width was trained on a real report corpus here (the project's trained
retrievers are 64-dim test models, and nothing can be downloaded), and encoding a million reports with a
512-wide text tower would take hours on 2 cores. So the embeddings are synthetic, with the properties that decide
how hard approximate search is: ``--scale-dim`` (512, CLIP ViT-B's width; the original RN50 retriever's is 1024)
dimensions, a Gaussian mixture of 2,000 topics whose centres and within-topic spread share one covariance with a
power-law spectrum (the i-th of 512 eigenvalues proportional to 1/i, randomly rotated), plus a common offset
(the anisotropy of CLIP embeddings), L2-normalised. The script prints what that gives: mean cosine of random
pairs, effective dimension (participation ratio of the covariance spectrum), cosine of each query's 1st and 10th
neighbour. Queries come from the same mixture with another seed: none is a corpus point. Every row has a report
text (phantom chest reports, ~200 characters) so that loading and looking up reports is measured too.

Each index is measured in a fresh subprocess (:func:`probe`), so that no index's pages or allocations count
against another: resident memory (RSS) before loading, after loading, and after searching and looking up the
top 10 of every query twice; queries/s of the second pass; recall@10 against exact search (the flat index).
An index with ``exact_rerank`` reads its shortlist's float32 vectors from ``vectors.f32`` with ``pread``: those
pages sit in the kernel's page cache, not in the process's RSS, so its rows are measured twice, with the file
cached (after the first pass) and evicted from the page cache before the timed pass (``cold_vectors``: every
candidate a read from the disk).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from mmed_rag.data.phantoms import FINDINGS, compose_report
from mmed_rag.retrieval.index import IndexedReport, ReportIndex, RetrieverIdentity

TOPICS = 2000
SPREAD = 0.6  # within-topic spread relative to the spread of topic centres
K = 10


def mixture(n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """``n`` unit vectors from the benchmark's Gaussian mixture (fixed by ``dim``; ``seed`` draws the points)."""
    shape = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(shape.normal(size=(dim, dim)))
    basis = (rotation * np.arange(1, dim + 1) ** -0.5).T.astype(np.float32)  # z @ basis: covariance spectrum 1/i
    offset = shape.normal(size=dim).astype(np.float32)
    offset *= np.sqrt(np.sum(1.0 / np.arange(1, dim + 1))) / np.linalg.norm(offset)
    centres = shape.normal(size=(TOPICS, dim)).astype(np.float32) @ basis + offset
    draw = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        points = centres[draw.integers(0, TOPICS, stop - start)]
        points += SPREAD * (draw.normal(size=(stop - start, dim)).astype(np.float32) @ basis)
        out[start:stop] = points / np.linalg.norm(points, axis=1, keepdims=True)
    return out


def reports(n: int) -> list[IndexedReport]:
    rng = np.random.default_rng(0)
    findings = FINDINGS["radiology"]
    return [
        IndexedReport(
            row,
            f"{compose_report('radiology', [f for f in findings if rng.random() < 0.3][:2], rng)} Study {row}.",
            (f"scale_{row}",),
        )
        for row in range(n)
    ]


def statistics(corpus: np.ndarray, queries: np.ndarray, exact_scores: np.ndarray) -> dict:
    sample = corpus[np.random.default_rng(1).choice(len(corpus), 2000, replace=False)]
    pairs = sample @ sample.T
    eigen = np.linalg.eigvalsh(np.cov(corpus[:50_000].T))
    return {
        "mean_pair_cosine": float(pairs[np.triu_indices(len(sample), 1)].mean()),
        "effective_dim": float(eigen.sum() ** 2 / (eigen**2).sum()),
        "query_top1_cosine": float(exact_scores[:, 0].mean()),
        "query_top10_cosine": float(exact_scores[:, K - 1].mean()),
    }


def rss() -> dict[str, int]:
    """This process's resident memory in bytes: total, anonymous, and file-backed (mapped files)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def probe(directory: str, queries_path: str, settings_json: str, out_path: str) -> None:
    """In a fresh process: load the index, search and look up twice per setting, report memory and speed."""
    queries = np.load(queries_path)
    settings = json.loads(settings_json)
    before = rss()
    started = time.perf_counter()
    index = ReportIndex.load(directory, mmap=settings.pop("mmap", True))
    load_seconds = time.perf_counter() - started
    after_load = rss()
    if settings.pop("materialise_reports", False):  # what loading did before reports were read on demand
        index.entries = tuple(index.entries)
    results, built = [], dict(index.manifest["params"])
    for setting in settings.get("sweep") or [{}]:
        # Each setting is a change from the built parameters, not from the setting before it.
        index.manifest["params"] = built | {name: value for name, value in setting.items() if name != "cold_vectors"}
        from mmed_rag.retrieval.index_kinds import apply_search_params

        apply_search_params(index.index, index.kind, index.manifest["params"])
        index.search(queries, K)  # first pass: pages in what this setting touches
        if setting.get("cold_vectors"):
            evict_from_page_cache(index.exact_vectors.path)
        started = time.perf_counter()
        _, rows = index.search(queries, K)
        seconds = time.perf_counter() - started
        index.lookup(rows)
        results.append({"setting": setting, "qps": len(queries) / seconds, "rows": rows.tolist()})
    after = rss()
    Path(out_path).write_text(
        json.dumps(
            {"load_seconds": load_seconds, "before": before, "after_load": after_load, "after": after, "runs": results}
        )
    )


def evict_from_page_cache(path: Path) -> None:
    """Drop ``path``'s pages from the kernel's page cache (clean pages of a file nobody maps), so that the next
    reads go to the disk."""
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure(directory: Path, queries_path: Path, settings: dict, work: Path) -> dict:
    out = work / "probe.json"
    command = [sys.executable, __file__, "--probe", str(directory), str(queries_path), json.dumps(settings), str(out)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def recall(rows: list[list[int]], exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows, exact.tolist(), strict=True)]))


def directory_bytes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in directory.iterdir()}


def run_scale(
    work: Path, n: int, dim: int, n_queries: int, configs: list[tuple[str, str | None, dict, dict]]
) -> list[dict]:
    """Build, save and probe each ``(label, kind, build params, probe settings)``; kind None probes the index
    before it again (with other settings). Ratios are against the first row."""
    started = time.perf_counter()
    corpus = mixture(n, dim, seed=1)
    queries = mixture(n_queries, dim, seed=2)
    queries_path = work / "queries.npy"
    np.save(queries_path, queries)
    entries = reports(n)
    print(f"data: {n:,} x {dim} embeddings and reports in {time.perf_counter() - started:.0f} s", flush=True)
    exact, exact_scores = _exact(corpus, queries)
    stats = statistics(corpus, queries, exact_scores)
    print("data statistics:", json.dumps({k: round(v, 3) for k, v in stats.items()}), flush=True)
    identity = RetrieverIdentity(weights_sha256="synthetic", embed_dim=dim, model_name="synthetic-mixture")
    corpus_info = {"path": "synthetic", "sha256": "synthetic", "records": n}
    table = []
    for label, kind, params, settings in configs:
        if kind is None:
            kind = table[-1]["kind"]
        else:
            started = time.perf_counter()
            index = ReportIndex.from_embeddings(corpus, entries, "radiology", identity, corpus_info, kind, **params)
            build = time.perf_counter() - started
            directory = index.save(work / f"index-{len(table)}")
            manifest_params = dict(index.manifest["params"])
            del index
        probed = measure(directory, queries_path, settings, work)
        sizes = directory_bytes(directory)
        for run in probed["runs"]:
            row = {
                "label": label,
                "kind": kind,
                "params": manifest_params | run["setting"],
                "build_s": build,
                "index_bytes": sizes["index.faiss"],
                "vectors_bytes": sizes.get("vectors.f32", 0),
                "reports_bytes": sizes["reports.jsonl"] + sizes.get("reports.offsets", 0),
                "load_s": probed["load_seconds"],
                "rss_load": probed["after_load"]["VmRSS"] - probed["before"]["VmRSS"],
                "rss_search": probed["after"]["VmRSS"] - probed["before"]["VmRSS"],
                "anon_search": probed["after"]["RssAnon"] - probed["before"]["RssAnon"],
                "qps": run["qps"],
                "recall": recall(run["rows"], exact),
            }
            table.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "params"} | {"params": row["params"]}), flush=True)
    return table


def _exact(corpus: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-10 rows and scores of every query: the reference of recall."""
    flat = faiss.IndexFlatIP(corpus.shape[1])
    flat.add(corpus)
    scores, rows = flat.search(queries, K)
    return rows, scores


def print_table(table: list[dict], n: int) -> None:
    flat = table[0]
    mib = 1 << 20
    print()
    print(
        f"| index ({n:,} reports) | build s | index.faiss MiB (+ vectors.f32 on disk) | RSS after load MiB "
        "| RSS after search MiB "
        "| queries/s | recall@10 |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in table:
        params = {k: v for k, v in row["params"].items() if k not in ("factory", "trained_on")}
        label = f"{row['label']} {params}" if params else row["label"]
        vectors = f" + {row['vectors_bytes'] / mib:.0f}" if row["vectors_bytes"] else ""
        print(
            f"| {label} | {row['build_s']:.0f} | {row['index_bytes'] / mib:.0f} "
            f"(1/{flat['index_bytes'] / row['index_bytes']:.1f}){vectors} | {row['rss_load'] / mib:.0f} "
            f"| {row['rss_search'] / mib:.0f} (1/{flat['rss_search'] / max(row['rss_search'], 1):.1f}) "
            f"| {row['qps']:.0f} ({row['qps'] / flat['qps']:.1f}x) | {row['recall']:.3f} |"
        )


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    probe(*sys.argv[2:6])
