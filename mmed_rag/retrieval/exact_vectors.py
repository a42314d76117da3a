"""Exact re-scoring of an approximate shortlist against the float32 report embeddings kept on disk.

An index of compact codes (IVF-PQ, IVF-RaBitQ) ranks by estimated inner products: the codes are small because
they are imprecise, and recall@10 is what that imprecision costs. The true top 10 is nevertheless almost always
among the codes' best few tens (on 200,000 reports of the ``--scale`` benchmark's data, 1-bit RaBitQ codes held
0.78 of the top 10 in their own top 10 and 0.997 in their top 40). So an index built with ``exact_rerank`` keeps
the embeddings themselves in ``vectors.f32`` (row-major float32, ``size x embed_dim``, no header), and a search
asks the codes for ``exact_rerank x k`` candidates, reads those rows and ranks them by their exact inner products:
the scores it returns are the flat index's own, so adaptive k cuts where it would on the flat index.

The rows are read with ``pread``, not memory-mapped, for the reason :mod:`~mmed_rag.retrieval.report_rows`
gives: reads leave pages in the kernel's page cache, which is shared and dropped under memory pressure, where a
mapping's fault-around would make the file the process's own resident memory. RAM therefore holds the codes;
the vectors cost disk (4 x embed_dim bytes per report) and one small read per candidate, which is fast when the
page cache has them and bounded by the disk's random reads when it does not (the benchmark measures both).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from mmed_rag.atomic import atomic_path
from mmed_rag.errors import MMedRAGError

VECTORS_FILE = "vectors.f32"
# Bytes of candidate vectors gathered at once (queries per block x shortlist x dim x 4): what re-scoring adds to
# the process's memory, whatever the batch size and shortlist.
RESCORE_BYTES = 8 << 20


class ExactVectorsError(MMedRAGError, ValueError):
    """``vectors.f32`` does not fit its index: wrong size for its rows and width."""


class ExactVectors:
    """The float32 embedding of every index row, in memory (a fresh build) or in ``vectors.f32`` (read on demand).

    Thread-safe: each read is a ``pread`` at its own offset.
    """

    def __init__(self, rows: int, dim: int, array: np.ndarray | None = None, path: Path | None = None):
        self.rows, self.dim = rows, dim
        self._array = array
        self.path = path
        self._file = open(path, "rb") if path is not None else None  # noqa: SIM115 -- closed with the index

    @classmethod
    def in_memory(cls, embeddings: np.ndarray) -> ExactVectors:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        return cls(len(embeddings), embeddings.shape[1], array=embeddings)

    @classmethod
    def open(cls, path: Path, rows: int, dim: int) -> ExactVectors:
        """``path``'s vectors, refused unless it holds exactly ``rows`` x ``dim`` float32 values."""
        size = path.stat().st_size
        if size != rows * dim * 4:
            raise ExactVectorsError(
                f"{path} has {size} bytes, but {rows} rows of {dim} float32 values take {rows * dim * 4}; "
                f"rebuild the index."
            )
        return cls(rows, dim, path=path)

    def save(self, directory: Path) -> None:
        """Write ``vectors.f32`` into ``directory`` atomically (copied in blocks when read from another one)."""
        destination = directory / VECTORS_FILE
        if self.path is not None and self.path.resolve() == destination.resolve():
            return
        with atomic_path(destination) as tmp:
            if self._array is not None:
                self._array.tofile(tmp)
            else:
                with open(self.path, "rb") as source, open(tmp, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 24)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (1-d, any order, repeats allowed), as a ``[len(rows), dim]`` array."""
        if self._array is not None:
            return self._array[rows]
        unique, inverse = np.unique(rows, return_inverse=True)  # each row read once, in file order
        width = self.dim * 4
        out = np.empty((len(unique), self.dim), dtype=np.float32)
        buffer = out.reshape(-1).view(np.uint8)
        fd = self._file.fileno()
        for i, row in enumerate(unique.tolist()):
            read = os.preadv(fd, [buffer[i * width : (i + 1) * width]], row * width)
            if read != width:
                raise ExactVectorsError(f"{self.path}: row {row} is cut short ({read} of {width} bytes)")
        return out[inverse]

    def rescore(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of each query's ``candidates`` (rows, [n, m]) by exact inner product: ``(scores, rows)``.

        Candidates keep their order among equal scores (a stable sort), so ties fall as the codes ranked them.
        """
        n, m = candidates.shape
        scores = np.empty((n, min(k, m)), dtype=np.float32)
        rows = np.empty((n, min(k, m)), dtype=np.int64)
        per_block = max(1, RESCORE_BYTES // (m * self.dim * 4))
        for start in range(0, n, per_block):
            block = candidates[start : start + per_block]
            vectors = self.take(block.reshape(-1)).reshape(len(block), m, self.dim)
            exact = np.einsum("qmd,qd->qm", vectors, queries[start : start + per_block])
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            scores[start : start + len(block)] = np.take_along_axis(exact, order, axis=1)
            rows[start : start + len(block)] = np.take_along_axis(block, order, axis=1)
        return scores, rows

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()
