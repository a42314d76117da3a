"""Batch retrieval: for every record of a VQA or report test file, the reports of its nearest corpus neighbours.

The output is the original release's: each input record unchanged, plus ``reference_reports`` (best first) and
``retrieve_k`` (how many were kept by the selection rule), one JSON line per record. What differs from the
original scripts:

- the report corpus is encoded once into a :class:`ReportIndex` (``--index DIR``), or, given only the corpus
  (``--train_json``), built once and cached beside the output under a key of retriever weights + corpus bytes,
  so a second run encodes only the queries;
- a killed run resumes: results go to ``OUTPUT.partial`` batch by batch (flushed and fsynced), a rerun skips the
  records already there, and the finished file is renamed into place, so ``OUTPUT`` is never half-written;
- a record whose image is missing or unreadable stops the run with its id and file, or, with
  ``on_error="skip"``, is reported and left out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import filelock
import torch
from torch.utils.data import DataLoader, Dataset

from mmed_rag.data.images import ImageLoadError, ImagePathError, load_image
from mmed_rag.data.records import RetrievalRecord, read_or_skip
from mmed_rag.device import resolve_device
from mmed_rag.errors import MMedRAGError
from mmed_rag.fingerprint import file_sha256, path_fingerprint
from mmed_rag.outputs import claim_outputs
from mmed_rag.progress import progress_bar
from mmed_rag.resumable import ResumableOutput
from mmed_rag.retrieval.clip import create_clip, resolve_clip
from mmed_rag.retrieval.configs import RetrieveConfig
from mmed_rag.retrieval.encode import embed_pixels
from mmed_rag.retrieval.index import IndexMissingError, ReportIndex, Retriever, RetrieverIdentity
from mmed_rag.sharding import Shard, check_parts, merge_parts, unfinished_parts

logger = logging.getLogger(__name__)

INDEX_CACHE_DIR = ".mmed-rag-index"


class RetrievalError(MMedRAGError, RuntimeError):
    """A record that cannot be retrieved for (its image is missing or unreadable), or an unusable output path."""


@dataclass
class RetrievalSummary:
    output_path: Path
    written: int  # records in the output, including those of an earlier, interrupted run
    resumed: int  # records found already done in OUTPUT.partial
    skipped: list[str]  # "id: problem" for records left out (on_error="skip")
    index_dir: Path | None  # where the index came from (None: built in memory)
    pending_parts: tuple[int, ...] = ()  # a split run's parts still to finish before the merge (see sharding)


def load_retriever(model_name_or_path: str, checkpoint_path: str | None, device: str = "cpu") -> Retriever:
    """The retriever of the original flags: a saved directory, or a model name plus fine-tuned weights."""
    model, _, preprocess, tokenizer = create_clip(model_name_or_path, checkpoint=checkpoint_path, device=device)
    if checkpoint_path is None and resolve_clip(model_name_or_path).weights is not None:
        identity = RetrieverIdentity.of_saved(model_name_or_path)
    else:
        identity = RetrieverIdentity.of_model(model, model_name_or_path)
    return Retriever(model, tokenizer, identity, preprocess)


def cached_index(
    retriever: Retriever, corpus: Path, cache_root: Path, batch_size: int = 256
) -> tuple[ReportIndex, Path]:
    """The corpus index for ``retriever``, from ``cache_root`` if built before, else built and cached there.

    The processes of a split run (:mod:`mmed_rag.sharding`) build it once: the first holds a lock while it
    builds, the others wait for it and load what it saved (the lock is an flock, dropped if the builder dies).
    """
    key = f"{retriever.identity.weights_sha256[:16]}-{file_sha256(corpus)[:16]}"
    directory = cache_root / key
    cache_root.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(cache_root / f"{key}.lock"):
        try:
            index = ReportIndex.load(directory, retriever=retriever.identity, corpus=corpus)
            logger.info("Reusing the cached report index %s", directory)
        except IndexMissingError:
            index = ReportIndex.build(retriever, corpus, modality=corpus.parent.name, batch_size=batch_size)
            index.save(directory)
    return index, directory


class _QueryImages(Dataset):
    """One query image per record (the first view), loaded safely; a failure is returned, not raised."""

    def __init__(self, records, image_root: str, preprocess):
        self.records, self.image_root, self.preprocess = records, image_root, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            return index, self.preprocess(load_image(self.image_root, record.image_paths[0])), None
        except (ImageLoadError, ImagePathError) as error:
            return index, None, str(error)


def _collate(items):
    return items


def _identity(config: RetrieveConfig, retriever: Retriever) -> dict:
    """What decides this run's results: a resumed run must match it (see :mod:`mmed_rag.resumable`)."""
    return {
        "stage": "retrieve",
        "eval_json sha256": file_sha256(config.eval_json),
        "img_root": os.path.abspath(config.img_root),
        "retriever weights sha256": retriever.identity.weights_sha256,
        "index": path_fingerprint(config.index),
        "train_json sha256": file_sha256(config.train_json) if config.index is None else None,
        **{name: getattr(config, name) for name in ("fixed_k", "clip_threshold", "select_rule", "select_threshold")},
    }


def retrieve(config: RetrieveConfig) -> RetrievalSummary:
    """Retrieve reports for every record of ``config.eval_json`` and write the original output format.

    Under torchrun, or with ``num_chunks``, this process retrieves for its part of the records only, and the
    process that finishes the last part merges them into the output (:mod:`mmed_rag.sharding`).
    """
    output = Path(config.output_path)
    shard = config.shard()
    inputs = [config.eval_json, config.train_json, config.index, config.checkpoint_path, config.model_name_or_path]
    with claim_outputs("retrieve", files=[shard.output(output)], inputs=inputs):
        check_parts(output, shard, config.fresh)
        records, skipped = read_or_skip(config.eval_json, config.on_error)  # a bad input fails before any model
        summary = _retrieve(config, output, shard, records, skipped)
    if shard.single:
        return summary
    merged = merge_parts(output, shard.count, [record.key for record in records])
    if merged is None:
        return replace(summary, pending_parts=tuple(unfinished_parts(output, shard.count)))
    logger.info("Merged the %d parts into %s (%d records)", shard.count, output, merged)
    return replace(summary, output_path=output, written=merged)


def _retrieve(config: RetrieveConfig, output: Path, shard: Shard, records: list, skipped: list[str]):
    device = resolve_device(shard.device(config.device))
    retriever = load_retriever(config.model_name_or_path, config.checkpoint_path, device)
    if config.index is not None:
        corpus = config.train_json
        index, index_dir = (
            ReportIndex.load(config.index, retriever=retriever.identity, corpus=corpus),
            Path(config.index),
        )
    else:
        index, index_dir = cached_index(retriever, Path(config.train_json), output.parent / INDEX_CACHE_DIR)

    selection = config.selection()
    start, stop = shard.bounds(len(records), config.batch_size)
    identity = {**_identity(config, retriever), **shard.identity(len(records), config.batch_size)}
    target = shard.output(output)
    with (
        ResumableOutput(target, identity, fresh=config.fresh, keep_identity=not shard.single) as sink,
        torch.no_grad(),
    ):
        done = sink.done
        todo = [record for record in records[start:stop] if record.key not in done]
        if done:
            logger.info("Resuming %s: %d record(s) done, %d to go", target, len(done), len(todo))
        loader = DataLoader(
            _QueryImages(todo, config.img_root, retriever.preprocess),
            batch_size=config.batch_size,
            num_workers=config.workers,
            collate_fn=_collate,
        )
        for batch in progress_bar(loader, desc="retrieving", unit="batch"):
            good = []
            for position, pixels, problem in batch:
                record = todo[position]
                if problem is None:
                    good.append((record, pixels))
                    continue
                message = f"{record.unique_key} {record.key!r}: {problem}"
                if config.on_error == "raise":
                    raise RetrievalError(f"{config.eval_json}: record {message} (pass on_error='skip' to go on)")
                logger.warning("skipping record %s", message)
                skipped.append(message)
            if not good:
                continue
            queries = embed_pixels(retriever.model, torch.stack([p for _, p in good]))
            scores, rows = index.search(queries, selection.k)
            sink.append(
                RetrievalRecord(record, [entry.report for entry in entries[:kept]], kept).to_dict()
                for (record, _), kept, entries in zip(
                    good, (selection(row) for row in scores), index.lookup(rows), strict=True
                )
            )
        written = sink.finish()
    logger.info("Wrote %d record(s) to %s (%d skipped)", written, target, len(skipped))
    return RetrievalSummary(target, written, len(done), skipped, index_dir)
