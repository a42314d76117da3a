"""MMed-RAG end to end: route → retrieve (+ select k) → build the prompt → generate.

``MMedRAG.from_config(path)`` builds the pipeline from one YAML file (a :class:`PipelineConfig`); ``answer`` runs
one example, ``run_file`` a whole VQA (JSONL) or report (JSON) test file, writing each input record plus
``reference_reports``, ``retrieve_k``, ``modality`` and ``prediction`` as JSON lines. Files are processed like
batch retrieval: results go to ``OUTPUT.partial`` batch by batch, a killed run resumes there, and the output
appears only when complete.

Two switches produce the answers that preference-pair construction and the copy-reliance analyses compare:
``no_retrieval`` (the prompt without reference reports) and ``noised_image`` (the model sees MMed-RAG's noise
image instead of the real one; retrieval still uses the real image, so the reports are those the real image
retrieves, as in the paper's cross-modality pairs).
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from mmed_rag.config import ConfigError, load_config, save_config
from mmed_rag.data.images import image_plus_noise, load_image, noised_image
from mmed_rag.data.records import ImageReportRecord, VQARecord, read_or_skip
from mmed_rag.device import resolve_device
from mmed_rag.errors import MMedRAGError
from mmed_rag.fingerprint import file_sha256, path_fingerprint
from mmed_rag.generation.configs import PipelineConfig
from mmed_rag.generation.generator import Generator, load_generator
from mmed_rag.generation.prompts import build_prompt, clean_question
from mmed_rag.jsonl import read_jsonl, write_jsonl
from mmed_rag.outputs import claim_outputs
from mmed_rag.progress import progress_bar
from mmed_rag.resumable import ResumableOutput
from mmed_rag.retrieval.encode import embed_pixels
from mmed_rag.retrieval.router import Router
from mmed_rag.sharding import Shard, check_parts, merge_parts, unfinished_parts

logger = logging.getLogger(__name__)


class PipelineError(MMedRAGError, RuntimeError):
    """A record the pipeline cannot answer (no modality, bad image), or an unusable output path."""


@dataclass
class Prediction:
    text: str
    modality: str
    reference_reports: list[str]
    prompt: str


@dataclass
class RunSummary:
    output: Path
    written: int
    resumed: int
    skipped: list[str]
    pending_parts: tuple[int, ...] = ()  # a split run's parts still to finish before the merge (see sharding)


def _noise_for(image: Image.Image, key: object, seed: int, noise: str = "replace") -> Image.Image:
    """The noise image for one record: seeded by the config and the record's id, so reruns see the same one;
    ``noise`` "replace" draws pure noise, "add" adds it to the image."""
    rng = np.random.default_rng([seed, zlib.crc32(repr(key).encode())])
    return image_plus_noise(image, rng) if noise == "add" else noised_image(image.size, seed=rng)


class MMedRAG:
    """The pipeline: a generator, and (unless answering without retrieval) a router of modality retrievers."""

    def __init__(self, config: PipelineConfig, generator: Generator, router: Router | None, classifier=None):
        self.config = config
        self.generator = generator
        self.router = router
        self.classifier = classifier
        self.selection = config.selection()

    @classmethod
    def from_config(cls, config: str | os.PathLike | PipelineConfig, **overrides) -> MMedRAG:
        """Build from a YAML file (or a config), with keyword overrides of its fields."""
        if not isinstance(config, PipelineConfig):
            config = load_config(PipelineConfig, config, overrides)
        elif overrides:
            config = load_config(PipelineConfig, None, {**config.__dict__, **overrides})
        device = resolve_device(config.device)
        router = None if config.no_retrieval else Router.from_registry(config.registry, device=device)
        classifier = None
        if config.domain_classifier is not None:
            from mmed_rag.domain.classifier import DomainClassifier

            classifier = DomainClassifier.load(config.domain_classifier, device=device)
        return cls(config, load_generator(config.generator_config()), router, classifier)

    # -- one example ------------------------------------------------------------------------------------------

    def retrieve(self, image: Image.Image, modalities: list[str]) -> list[str]:
        """The selected reference reports for ``image`` from the indexes of ``modalities``, merged by similarity."""
        if self.router is None or not modalities:
            return []
        candidates: list[tuple[float, str]] = []
        for modality in modalities:
            retriever, index = self.router.get(modality)
            query = embed_pixels(retriever.model, retriever.preprocess(image).unsqueeze(0))
            scores, rows = index.search(query, self.selection.k)
            candidates += [
                (float(score), entry.report) for score, entry in zip(scores[0], index.lookup(rows)[0], strict=True)
            ]
        candidates.sort(key=lambda candidate: -candidate[0])
        kept = self.selection(np.array([score for score, _ in candidates]))
        return [report for _, report in candidates[:kept]]

    def route(self, image: Image.Image, record=None) -> tuple[str, list[str]]:
        """(modality named in the prompt, modalities to retrieve from) for one image.

        Priority: the config's ``modality``, then the domain classifier (an image it cannot place follows
        ``unknown_policy``; the prompt then names its best guess), then the record's own ``modality`` field.
        """
        if self.config.modality is not None:
            return self.config.modality, [self.config.modality]
        if self.classifier is not None:
            from mmed_rag.domain.routing import route

            prediction = self.classifier.predict([image])[0]
            known = self.router.modalities if self.router is not None else []
            targets = route(prediction, self.config.unknown_policy, self.config.default_modality, known)
            return prediction.best_guess, targets
        modality = record.extra.get("modality") if record is not None and hasattr(record, "extra") else None
        if modality is None:
            raise PipelineError(
                "no modality: give one (modality= in Python, --modality on the command line), a domain classifier "
                "(domain_classifier= / --domain-classifier), or records with a 'modality' field"
            )
        return modality, [modality]

    def prepare(self, image: Image.Image, question: str | None, modality: str, key: object = None, sources=None):
        """(prompt, image shown to the model, reports) for one example; ``sources``: modalities to retrieve from."""
        reports = self.retrieve(image, [modality] if sources is None else sources)
        task = "vqa" if question else "report"
        question = clean_question(question) if question else None
        prompt = build_prompt(task, modality, question, reports, style=self.config.prompt_style)
        shown = _noise_for(image, key, self.config.noise_seed, self.config.noise) if self.config.noised_image else image
        return prompt, shown, reports

    def answer(self, image: str | os.PathLike | Image.Image, question: str | None = None, modality: str | None = None):
        """Answer a question about an image (or, with no question, write its report)."""
        if not isinstance(image, Image.Image):
            path = Path(image)
            image = load_image(path.parent, path.name)
        sources = None
        if modality is None:
            modality, sources = self.route(image)
        prompt, shown, reports = self.prepare(image, question, modality, key=question, sources=sources)
        text = self.generator.generate([prompt], [[shown]])[0]
        return Prediction(text, modality, reports, prompt)

    # -- a whole file -----------------------------------------------------------------------------------------

    def _question_of(self, record) -> str | None:
        task = self.config.task
        if task == "report" or (task == "auto" and isinstance(record, ImageReportRecord)):
            return None
        if not isinstance(record, VQARecord):
            raise PipelineError(f"task 'vqa' needs questions, but record {record.key!r} has none")
        return record.question

    def run_file(
        self,
        input_path: str | os.PathLike,
        output_path: str | os.PathLike,
        read: tuple[list, list[str]] | None = None,
        shard: Shard | None = None,
    ) -> RunSummary:
        """Answer every record of a VQA or report test file; resumable; the output appears when complete.

        ``read``: the file's ``(records, skipped)`` when the caller has read it already (``generate`` reads the
        input before loading the model, so a bad file fails in a second, not after minutes of loading).
        ``shard``: answer only this part of the records (:mod:`mmed_rag.sharding`); the process that finishes
        the last part merges them into ``output_path``.
        """
        output = Path(output_path)
        shard = shard or Shard()
        target = shard.output(output)
        files = [target, *self.config.output_paths()] if shard.single else [target]
        with claim_outputs("generate", files=files, inputs=[input_path, *self.config.read_paths()]):
            check_parts(output, shard, self.config.fresh)
            records, skipped = read or read_or_skip(input_path, self.config.on_error)
            start, stop = shard.bounds(len(records), self.generator.config.batch_size)
            identity = {**self._identity(input_path), **shard.identity(len(records), self.generator.config.batch_size)}
            summary = self._run_file(input_path, target, (records[start:stop], skipped), identity, shard.single)
            if shard.single:
                self._write_answer_file(output)
                return summary
        merged = merge_parts(output, shard.count, [record.key for record in records])
        if merged is None:
            return replace(summary, pending_parts=tuple(unfinished_parts(output, shard.count)))
        logger.info("Merged the %d parts into %s (%d predictions)", shard.count, output, merged)
        with claim_outputs("generate", files=self.config.output_paths()):
            self._write_answer_file(output)
        return replace(summary, output=output, written=merged)

    def _write_answer_file(self, output: Path) -> None:
        """The authors' answer-file format beside our output, when asked for."""
        if self.config.authors_answer_file:
            from mmed_rag.generation.answer_file import authors_answer_lines

            lines = authors_answer_lines(read_jsonl(output), self.config.model, self.config.noised_image)
            write_jsonl(self.config.authors_answer_file, lines)

    def _run_file(self, input_path, output: Path, read: tuple[list, list[str]], identity: dict, single: bool):
        records, skipped = read[0], list(read[1])
        batch_size = self.generator.config.batch_size
        with ResumableOutput(output, identity, fresh=self.config.fresh, keep_identity=not single) as sink:
            done = sink.done
            todo = [record for record in records if record.key not in done]
            for start in progress_bar(range(0, len(todo), batch_size), desc="generating", unit="batch"):
                prepared = []
                for record in todo[start : start + batch_size]:
                    try:
                        image = load_image(self.config.img_root, record.image_paths[0])
                        modality, sources = self.route(image, record)
                        question = self._question_of(record)
                        prompt, shown, reports = self.prepare(image, question, modality, record.key, sources)
                    except (OSError, ValueError, KeyError, PipelineError) as error:
                        message = f"{record.unique_key} {record.key!r}: {error}"
                        if self.config.on_error == "raise":
                            raise PipelineError(f"{input_path}: record {message}") from error
                        logger.warning("skipping record %s", message)
                        skipped.append(message)
                        continue
                    prepared.append((record, modality, prompt, shown, reports, question is not None))
                if not prepared:
                    continue
                scores = self._yes_no_scores(prepared)
                free = [index for index, item in enumerate(prepared) if not (self.config.yes_no_answers and item[5])]
                texts = dict(
                    zip(
                        free,
                        self.generator.generate([prepared[i][2] for i in free], [[prepared[i][3]] for i in free]),
                        strict=True,
                    )
                )
                outputs = []
                for index, (record, modality, prompt, _, reports, _) in enumerate(prepared):
                    line = {
                        **record.to_dict(),
                        "reference_reports": reports,
                        "retrieve_k": len(reports),
                        "modality": modality,
                        "prompt": prompt,
                        "prediction": texts[index] if index in texts else ("Yes" if scores[index] >= 0.5 else "No"),
                    }
                    if self.config.yes_no_scores and index in scores:
                        line["yes_probability"] = scores[index]
                    outputs.append(line)
                sink.append(outputs)
            written = sink.finish()
        logger.info("Wrote %d prediction(s) to %s (%d skipped)", written, output, len(skipped))
        return RunSummary(output, written, len(done), skipped)

    def _identity(self, input_path) -> dict:
        """What decides this run's answers: a resumed run must match it (see :mod:`mmed_rag.resumable`)."""
        config = self.config
        sources = {}
        if self.router is not None:
            sources = {
                modality: [path_fingerprint(entry.retriever), path_fingerprint(entry.index)]
                for modality, entry in self.router.entries.items()
            }
        return {
            "stage": "generate",
            "input sha256": file_sha256(input_path),
            "model": path_fingerprint(config.model),
            "adapter": path_fingerprint(config.adapter),
            "retrievers and indexes": sources,
            "domain_classifier": path_fingerprint(config.domain_classifier),
            **config.result_options(),
        }

    def _yes_no_scores(self, prepared: list[tuple]) -> dict[int, float]:
        """P(yes) of the batch's questions by position, when asked for (report prompts have no yes/no)."""
        if not (self.config.yes_no_scores or self.config.yes_no_answers):
            return {}
        questions = [position for position, item in enumerate(prepared) if item[5]]
        if not questions:
            return {}
        scores = self.generator.yes_no_probability(
            [prepared[position][2] for position in questions], [[prepared[position][3]] for position in questions]
        )
        return dict(zip(questions, scores, strict=True))


def generate(config: PipelineConfig) -> RunSummary:
    """``mmed-rag generate``: answer ``config.input`` into ``config.output``, saving the config beside it."""
    if config.input is None or config.output is None:
        raise ConfigError("give --input (a VQA JSONL or report JSON) and --output")
    output = Path(config.output)
    shard = config.shard()
    with claim_outputs("generate", files=[shard.output(output)], inputs=config.read_paths()):
        check_parts(output, shard, config.fresh)  # before the model loads (run_file checks it again)
        read = read_or_skip(config.input, config.on_error)
        pipeline = MMedRAG.from_config(config, device=shard.device(config.device))
        summary = pipeline.run_file(config.input, output, read, shard)
    if not summary.pending_parts:
        save_config(config, output.parent, name=f"{output.stem}.config.yaml")
    return summary
