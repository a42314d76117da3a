"""MMed-RAG on the phantoms, as a recipe of the public stage functions (copy it for your own data).

The splits and their roles (the phantom generator's train / val / test; see data/README.md):

- train: the retrievers' image-report pairs, the report corpora indexed for retrieval, the domain classifier's
  images, and the stand-in model's SFT questions, with retrieved reports (never the image's own: it is dropped)
  and without;
- val (the "tuning" split), its images halved: one half more SFT questions (their reports are not in the corpus,
  as at test time), the other half the questions RAG-PT's preference pairs are built from (answers the model was
  never trained on);
- test: every number in the report.

The stand-in Med-LVLM is a small LLaVA (CLIP vision + Mistral text, built from config) that supervised
fine-tuning teaches to answer yes/no questions with and without reference reports in the prompt: it learns to
use reports and, like a real Med-LVLM, can learn to over-trust them, which is what RAG-PT targets.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from mmed_rag.atomic import atomic_write_text
from mmed_rag.config import save_config
from mmed_rag.demo.config import DemoConfig
from mmed_rag.demo.standin import STANDIN_TEXT, STANDIN_VISION
from mmed_rag.demo.steps import StepRunner
from mmed_rag.jsonl import read_jsonl, write_jsonl
from mmed_rag.outputs import claim_outputs

logger = logging.getLogger(__name__)

MODALITIES = ("radiology", "pathology", "ophthalmology")
PREFIX = {"radiology": "rad", "pathology": "path", "ophthalmology": "oph"}
#: Test-split runs. "no RAG" and the noised runs feed the copy-reliance analysis; rag_fixed is MMed-RAG as deployed
#: here (fixed k), rag_adaptive uses the original's ratio rule.
TEST_MODES = {
    "no_rag": {"no_retrieval": True},
    "rag_fixed": {},
    "rag_adaptive": {"adaptive": True},
    "rag_noised": {"noised_image": True},
    "no_rag_noised": {"no_retrieval": True, "noised_image": True},
}
#: Report-writing runs on the test images (a report is some 30 tokens; 96 leaves room for a rambling one).
REPORT_MODES = {
    "no_rag": {"no_retrieval": True, "max_new_tokens": 96},
    "rag_fixed": {"max_new_tokens": 96},
}
#: The three runs on the tuning split that make-pairs compares.
PAIR_MODES = {"with_retrieval": {}, "without_retrieval": {"no_retrieval": True}, "noised": {"noised_image": True}}


class Demo:
    """The recipe's state: the config, the output folder's layout, the step runner."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.out = Path(config.out)
        self.data = self.out / "data"
        self.images = self.data / "images"
        self.work = self.out / "work"
        self.steps = StepRunner(self.out, fresh=config.fresh)

    # -- 1. data ------------------------------------------------------------------------------------------------

    def make_data(self) -> dict:
        from mmed_rag.data.phantoms import PhantomConfig, make_phantoms

        config = self.config
        phantoms = PhantomConfig(
            out=str(self.data),
            n=config.n,
            size=config.size,
            seed=config.seed,
            val_fraction=0.3,
            test_fraction=0.2,
            questions_per_image=config.questions_per_image,
            train_questions_per_image=config.questions_per_image,
            question_style="presence",
            report_wording="fixed",
        )
        params = {"phantoms": vars(phantoms)}
        manifest = self.steps.run("phantoms", lambda: make_phantoms(phantoms), params=params, outputs=[self.data])
        self.steps.run(
            "questions", self._questions, params={"version": 3}, inputs=[self.data], outputs=[self.work / "questions"]
        )
        return manifest

    def _questions(self) -> dict:
        """Combined question files with ids unique across modalities, the tuning split halved by image, and the
        test reports of all modalities in one file (their ids are unique already)."""
        folder = self.work / "questions"
        test, train, tune_sft, tune_pt = [], [], {}, []
        for modality in MODALITIES:
            prefix = PREFIX[modality]

            def renamed(rows: list[dict], prefix: str = prefix) -> list[dict]:
                return [{**row, "question_id": f"{prefix}-{row['question_id']}"} for row in rows]

            test += renamed(read_jsonl(self.data / f"test/vqa/{modality}_test.jsonl"))
            train_modality = renamed(read_jsonl(self.data / f"training/vqa/{modality}_train.jsonl"))
            write_jsonl(folder / f"train_{modality}.jsonl", train_modality)
            train += train_modality
            tuning = renamed(read_jsonl(self.data / f"training/vqa/{modality}_val.jsonl"))
            images = sorted({row["image"] for row in tuning})
            sft_images = set(images[0::2])
            tune_sft[modality] = [row for row in tuning if row["image"] in sft_images]
            tune_pt += [row for row in tuning if row["image"] not in sft_images]
        write_jsonl(folder / "test_vqa.jsonl", test)
        reports = [record for modality in MODALITIES for record in json.loads(self._test_reports(modality).read_text())]
        atomic_write_text(folder / "test_report.json", json.dumps(reports, indent=1, ensure_ascii=False))
        write_jsonl(folder / "train_vqa.jsonl", train)
        write_jsonl(folder / "tune_pt_vqa.jsonl", tune_pt)
        for modality, rows in tune_sft.items():
            write_jsonl(folder / f"tune_sft_{modality}.jsonl", rows)
        counts = {"test": len(test), "test_reports": len(reports), "train": len(train)}
        counts["tune_sft"] = sum(map(len, tune_sft.values()))
        counts["tune_pt"] = len(tune_pt)
        return counts

    # -- 2. retrieval and routing -------------------------------------------------------------------------------

    def retrieval(self) -> None:
        from mmed_rag.retrieval.finetune import FinetuneConfig, finetune_clip
        from mmed_rag.retrieval.index import BuildIndexConfig

        config = self.config
        registry = {"modalities": {}}
        for modality in MODALITIES:
            corpus = self._retriever_records(modality, "train")
            finetune = FinetuneConfig(
                train_data=str(corpus),
                val_data=str(self._retriever_records(modality, "val")),
                img_root=str(self.images),
                dataset_type=modality,
                model=config.retriever_model,
                batch_size=config.retriever_batch_size,
                lr=config.retriever_learning_rate,
                workers=0,
                warmup=20,
                epochs=config.retriever_epochs,
                logs=str(self.out / "retrievers"),
                name=modality,
                seed=config.seed,
            )
            run_dir = self.out / "retrievers" / modality
            self.steps.run(
                f"retriever-{modality}",
                lambda finetune=finetune: str(finetune_clip(finetune)),
                params={"finetune": vars(finetune)},
                inputs=[corpus, self.images],
                outputs=[run_dir],
            )
            best = run_dir / "best"
            # The corpus index serves generation; the test-report index only measures recall on held-out pairs.
            for folder, reports in (("indexes", corpus), ("indexes-test", self._test_reports(modality))):
                index = BuildIndexConfig(
                    retriever=str(best), corpus=str(reports), modality=modality, out=str(self.out / folder / modality)
                )
                self.steps.run(
                    f"{folder}-{modality}",
                    lambda index=index: self._build_index(index),
                    params={"index": vars(index), "shuffled": config.shuffle_index, "seed": config.seed},
                    inputs=[best, reports],
                    outputs=[index.out],
                )
            registry["modalities"][modality] = {
                "retriever": str(best.resolve()),
                "index": str((self.out / "indexes" / modality).resolve()),
            }
        atomic_write_text(self.out / "registry.yaml", yaml.safe_dump(registry))

    def _retriever_records(self, modality: str, split: str) -> Path:
        """The phantom generator's image-report pairs of ``modality`` for ``split`` (train or val)."""
        return self.data / f"training/retriever/{modality}/{modality}_{split}.json"

    def _test_reports(self, modality: str) -> Path:
        return self.data / f"test/report/{modality}_test.json"

    def _build_index(self, index) -> str:
        from mmed_rag.retrieval.index import build_index

        built = build_index(index)
        if self.config.shuffle_index:
            shuffle_rows(Path(index.out), self.config.seed)
        return str(built)

    def domain(self) -> dict:
        from mmed_rag.domain.classifier import FORMAT_VERSION, TrainDomainConfig, train_domain

        config = self.config
        files = {split: [] for split in ("train", "val", "test")}
        for modality in MODALITIES:
            files["train"].append(f"{modality}={self._retriever_records(modality, 'train')}")
            files["val"].append(f"{modality}={self._retriever_records(modality, 'val')}")
            files["test"].append(f"{modality}={self.data}/test/report/{modality}_test.json")
        domain = TrainDomainConfig(
            train_files=tuple(files["train"]),
            val_files=tuple(files["val"]),
            test_files=tuple(files["test"]),
            img_root=str(self.images),
            model="tiny-clip",
            epochs=config.domain_epochs,
            out=str(self.out / "domain"),
            seed=config.seed,
        )
        self.steps.run(
            "domain",
            lambda: str(train_domain(domain)),
            params={"domain": vars(domain), "format_version": FORMAT_VERSION},  # a new format retrains it
            inputs=[self.data],
            outputs=[domain.out],
        )
        return json.loads((Path(domain.out) / "manifest.json").read_text())

    def retrieval_recall(self) -> None:
        """Recall@1/5/10 per modality on the test split: each test image against the test reports (held out)."""
        from mmed_rag.retrieval.evaluate import EvalRetrievalConfig, eval_retrieval

        for modality in MODALITIES:
            evaluation = EvalRetrievalConfig(
                eval_json=str(self._test_reports(modality)),
                img_root=str(self.images),
                out=str(self.out / "eval" / "retrieval" / modality),
                model_name_or_path=str(self.out / "retrievers" / modality / "best"),
                index=str(self.out / "indexes-test" / modality),
            )
            self.steps.run(
                f"recall-{modality}",
                lambda evaluation=evaluation: str(eval_retrieval(evaluation)),
                params={"eval": vars(evaluation)},
                inputs=[self._test_reports(modality), evaluation.index, evaluation.model_name_or_path],
                outputs=[evaluation.out],
            )

    # -- 3. the stand-in Med-LVLM ---------------------------------------------------------------------------------

    def sft_data(self) -> dict:
        """Conversations: every training and tuning-half question, and its image's report, with retrieved reports
        and without."""
        from mmed_rag.retrieval.batch import RetrieveConfig, retrieve

        retrieved = []
        for modality in MODALITIES:
            for split in ("train", "tune_sft"):
                source = self.work / "questions" / f"{split}_{modality}.jsonl"
                retrieval = RetrieveConfig(
                    eval_json=str(source),
                    output_path=str(self.work / "retrieved" / f"{split}_{modality}.jsonl"),
                    img_root=str(self.images),
                    index=str(self.out / "indexes" / modality),
                    model_name_or_path=str(self.out / "retrievers" / modality / "best"),
                    # A training image's own report is in the corpus: two spare reports to drop it (and any
                    # report worded the same) and still keep fixed_k; the tuning half's never is.
                    fixed_k=self.config.fixed_k + (2 if split == "train" else 0),
                )
                self.steps.run(
                    f"retrieve-sft-{split}-{modality}",
                    lambda retrieval=retrieval: str(retrieve(retrieval)),
                    params={"retrieve": vars(retrieval)},
                    inputs=[source, self.out / "indexes" / modality, self.out / "retrievers" / modality / "best"],
                    outputs=[retrieval.output_path],
                )
                retrieved.append(Path(retrieval.output_path))
        folder = self.work / "sft"
        return self.steps.run(
            "sft-data",
            lambda: _conversations(retrieved, folder, self.config.fixed_k),
            params={"version": 4, "fixed_k": self.config.fixed_k},
            inputs=retrieved,
            outputs=[folder / name for name in SFT_FILES.values()],
        )

    def standin(self, seed: int) -> Path:
        """A small LLaVA from config, its vision encoder pretrained, then SFT on the conversations: the Med-LVLM
        the rest of the demo uses."""
        from mmed_rag.data.phantoms import wording
        from mmed_rag.demo.standin import phantom_label_names, phantom_labels, pretrain_vision
        from mmed_rag.testing import save_tiny_llava
        from mmed_rag.training.sft import SFTConfig, train_sft

        config = self.config
        base = self.out / "models" / f"base-seed{seed}"
        self.steps.run(
            f"base-model-seed{seed}",
            lambda: str(
                save_tiny_llava(base, seed=seed, vision=STANDIN_VISION, text=STANDIN_TEXT, extra_corpus=wording())
            ),
            params={"seed": seed, "vision": STANDIN_VISION, "text": STANDIN_TEXT, "vocabulary": wording()},
            outputs=[base],
        )
        vision = self.out / "models" / f"vision-seed{seed}"
        train_records = [self._retriever_records(modality, "train") for modality in MODALITIES]
        val_records = [self._retriever_records(modality, "val") for modality in MODALITIES]
        self.steps.run(
            f"pretrain-vision-seed{seed}",
            lambda: pretrain_vision(
                base,
                phantom_labels(train_records),
                phantom_labels(val_records),
                phantom_label_names(),
                self.images,
                vision,
                epochs=config.vision_epochs,
                seed=seed,
            )["val_auc"],
            params={"epochs": config.vision_epochs, "seed": seed},
            inputs=[base, *train_records, *val_records, self.images],
            outputs=[vision],
        )
        sft_files = {key: self.work / "sft" / name for key, name in SFT_FILES.items()}
        vqa_with, vqa_plain = sft_files["vqa", True], sft_files["vqa", False]
        output = self.out / "models" / f"sft-seed{seed}"
        # Three stages, the vision encoder frozen throughout (as LLaVA's SFT keeps it). A model this small that
        # meets questions with and without reports from the start learns only the prior answer (measured: 900
        # steps on a mix with a fifth of the rows carrying reports left every answer "No"). So: first answer from
        # the image alone ("image"); then read one retrieved report, to answer and to write a report ("reports":
        # on question rows alone reading emerged slowly, no better than the prior after 400 steps; a stage of
        # report writing alone after it cost 4 points of accuracy with RAG and the reports stayed generic); then
        # everything a Med-LVLM used with RAG meets: questions with and without reports, reports to write with
        # and without a reference.
        sft = SFTConfig(
            model=str(vision),
            image_folder=str(self.images),
            output_dir=str(output),
            stages=(
                {
                    "name": "image",
                    "data": [str(vqa_plain)],
                    "max_steps": config.sft_image_steps,
                    "learning_rate": config.sft_learning_rate,
                    "trainable": "language_model",
                },
                {
                    "name": "reports",
                    "data": [str(vqa_with), str(sft_files["report", True])],
                    "mix": [1.0, config.sft_report_share],
                    "max_steps": config.sft_reports_steps,
                    "learning_rate": config.sft_learning_rate,
                    "trainable": "language_model",
                },
                {
                    "name": "standin",
                    "data": [
                        str(vqa_with),
                        str(vqa_plain),
                        str(sft_files["report", True]),
                        str(sft_files["report", False]),
                    ],
                    "mix": [1.0, config.sft_plain_share, config.sft_mix_report_share, config.sft_mix_report_share],
                    "max_steps": config.sft_steps,
                    "learning_rate": config.sft_learning_rate / 2,
                    "trainable": "language_model",
                },
            ),
            batch_size=config.sft_batch_size,
            warmup_ratio=0.05,
            save_steps=max(50, config.sft_reports_steps // 4),
            logging_steps=max(1, config.sft_reports_steps // 60),
            seed=seed,
        )
        self.steps.run(
            f"sft-seed{seed}",
            lambda: str(train_sft(sft)["final"]),
            params={"sft": vars(sft)},
            inputs=[vision, *sft_files.values(), self.images],
            outputs=[output],  # every stage: changed inputs redo them all
        )
        return output / "standin"

    # -- 4. generation and evaluation ----------------------------------------------------------------------------

    def generate(self, name: str, model: Path, source: Path, output: Path, mode: dict, adapter: Path | None = None):
        from mmed_rag.pipeline import MMedRAG, PipelineConfig

        config = self.config
        options = {key: value for key, value in mode.items() if key != "adaptive"}
        if mode.get("adaptive"):
            options.update(fixed_k=config.adaptive_cap, select_rule="ratio", select_threshold=config.adaptive_ratio)
        else:
            options.setdefault("fixed_k", config.fixed_k)
        pipeline = PipelineConfig(
            model=str(model),
            registry=str(self.out / "registry.yaml"),
            img_root=str(self.images),
            domain_classifier=str(self.out / "domain"),
            adapter=None if adapter is None else str(adapter),
            yes_no_answers=True,
            yes_no_scores=True,
            batch_size=32,
            noise_seed=config.seed,
            **options,
        )
        inputs = [source, model, self.out / "registry.yaml", self.out / "domain", self.out / "indexes"]
        self.steps.run(
            name,
            lambda: MMedRAG.from_config(pipeline).run_file(source, output).written,
            params={"pipeline": vars(pipeline)},
            inputs=inputs + ([adapter] if adapter else []),
            outputs=[output],
        )

    def evaluate(self, name: str, runs: dict[str, Path], out: Path) -> None:
        """VQA metrics of each run, and the copy-reliance analysis of the four runs it needs."""
        from mmed_rag.eval.run import EvalConfig, evaluate

        for mode, path in runs.items():
            evaluation = EvalConfig(task="vqa", pred=(str(path),), out=str(out / mode), bootstrap=self.config.bootstrap)
            self.steps.run(
                f"{name}-{mode}",
                lambda evaluation=evaluation: evaluate(evaluation).metrics["overall"]["accuracy"],
                params={"eval": vars(evaluation)},
                inputs=[path],
                outputs=[out / mode],
            )
        copying = EvalConfig(
            task="copying",
            copying_task="vqa",
            pred=(str(runs["rag_fixed"]),),
            pred_no_retrieval=str(runs["no_rag"]),
            pred_noised=str(runs["rag_noised"]),
            pred_no_retrieval_noised=str(runs["no_rag_noised"]),
            out=str(out / "copying"),
            bootstrap=self.config.bootstrap,
        )
        self.steps.run(
            f"{name}-copying",
            lambda: evaluate(copying).metrics["copy_reliance"],
            params={"eval": vars(copying)},
            inputs=[runs["rag_fixed"], runs["no_rag"], runs["rag_noised"], runs["no_rag_noised"]],
            outputs=[out / "copying"],
        )

    def evaluate_reports(self, name: str, runs: dict[str, Path], out: Path) -> None:
        """Report metrics (BLEU, ROUGE-L, METEOR, CIDEr) of each report run; they need Java (``make java``)."""
        from mmed_rag.eval.report import MetricUnavailableError, require_java
        from mmed_rag.eval.run import EvalConfig, evaluate

        try:
            require_java()
        except MetricUnavailableError as error:
            logger.warning("report metrics skipped: %s", error)
            return
        for mode, path in runs.items():
            evaluation = EvalConfig(
                task="report",
                pred=(str(path),),
                out=str(out / mode),
                clinical_f1=False,
                report_bootstrap=self.config.report_bootstrap,
            )
            self.steps.run(
                f"{name}-{mode}",
                lambda evaluation=evaluation: evaluate(evaluation).metrics["overall"],
                params={"eval": vars(evaluation)},
                inputs=[path],
                outputs=[out / mode],
            )

    def test_runs(self, seed: int, model: Path, phase: str, adapter: Path | None = None) -> dict[str, Path]:
        source = self.work / "questions" / "test_vqa.jsonl"
        folder = self.out / f"seed{seed}"
        runs = {}
        for mode, options in TEST_MODES.items():
            runs[mode] = folder / "runs" / phase / f"{mode}.jsonl"
            self.generate(f"generate-{phase}-{mode}-seed{seed}", model, source, runs[mode], options, adapter)
        self.evaluate(f"eval-{phase}-seed{seed}", runs, folder / "eval" / phase)
        reports = {}
        # After RAG-PT only the reports with RAG are compared (the adapter is trained on prompts with reports).
        for mode, options in REPORT_MODES.items() if phase == "before" else [("rag_fixed", REPORT_MODES["rag_fixed"])]:
            reports[mode] = folder / "runs" / phase / f"report_{mode}.jsonl"
            self.generate(
                f"generate-{phase}-report_{mode}-seed{seed}",
                model,
                self.work / "questions" / "test_report.json",
                reports[mode],
                options,
                adapter,
            )
        self.evaluate_reports(f"eval-{phase}-seed{seed}-report", reports, folder / "eval" / phase / "report")
        return runs

    # -- 5. RAG-PT -----------------------------------------------------------------------------------------------

    def rag_pt(self, seed: int, model: Path) -> Path | None:
        """Answer the RAG-PT half of the tuning split three ways, build the pairs, train both DPO stages."""
        from mmed_rag.alignment.dpo import parse_dpo_args, train_dpo_2stages
        from mmed_rag.alignment.make_pairs import MakePairsConfig, make_pairs

        config = self.config
        folder = self.out / f"seed{seed}" / "rag-pt"
        source = self.work / "questions" / "tune_pt_vqa.jsonl"
        runs = {}
        for mode, options in PAIR_MODES.items():
            runs[mode] = folder / "runs" / f"{mode}.jsonl"
            self.generate(f"generate-pairs-{mode}-seed{seed}", model, source, runs[mode], options)
        pairs = MakePairsConfig(
            with_retrieval=str(runs["with_retrieval"]),
            without_retrieval=str(runs["without_retrieval"]),
            noised=str(runs["noised"]),
            out=str(folder / "pairs"),
            seed=seed,
        )
        summary = self.steps.run(
            f"make-pairs-seed{seed}",
            lambda: {key: value for key, value in make_pairs(pairs).summary.items() if key != "table"},
            params={"pairs": vars(pairs)},
            inputs=list(runs.values()),
            outputs=[folder / "pairs"],
        )
        if not summary.get("stage1") or not summary.get("stage2"):
            logger.warning("RAG-PT: a stage has no pairs (%s); no preference tuning for seed %d", summary, seed)
            return None
        arguments = [
            "--model_name_or_path", str(model),
            "--data_path", str(folder / "pairs" / "stage1.json"),
            "--stage2_data_path", str(folder / "pairs" / "stage2.json"),
            "--image_folder", str(self.images),
            "--output_dir", str(folder / "adapter"),
            "--lora_r", str(config.lora_r), "--lora_alpha", str(2 * config.lora_r),
            "--learning_rate", str(config.dpo_learning_rate), "--mm_projector_lr", str(config.dpo_learning_rate),
            "--stage2_learning_rate", str(config.dpo_learning_rate),
            "--beta", str(config.dpo_beta),
            "--max_steps", str(config.dpo_steps),
            "--per_device_train_batch_size", str(config.dpo_batch_size),
            "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1",
            "--logging_steps", "1", "--save_strategy", "no",
            "--bf16", "False", "--gradient_checkpointing", "False", "--dataloader_num_workers", "0",
            "--report_to", "none", "--seed", str(seed), "--model_max_length", "1024",
        ]  # fmt: skip
        self.steps.run(
            f"train-dpo-seed{seed}",
            lambda: {
                stage: str(path)
                for stage, path in train_dpo_2stages(parse_dpo_args(arguments)).items()
                if stage != "metrics"
            },
            params={"arguments": arguments},
            inputs=[model, folder / "pairs", self.images],
            outputs=[folder / "adapter"],
        )
        return folder / "adapter" / "stage2"

    # -- the whole ---------------------------------------------------------------------------------------------------

    def run(self) -> Path:
        from mmed_rag.demo.report import write_report

        started = time.perf_counter()
        self.make_data()
        self.retrieval()
        self.domain()
        self.retrieval_recall()
        self.sft_data()
        for offset in range(self.config.seeds):
            seed = self.config.seed + offset
            model = self.standin(seed)
            self.test_runs(seed, model, "before")
            adapter = self.rag_pt(seed, model)
            if adapter is not None:
                self.test_runs(seed, model, "after", adapter)
        return write_report(self, time.perf_counter() - started)


def shuffle_rows(directory: Path, seed: int) -> None:
    """Break an index on purpose: permute which report each row (vector) returns, keeping the files consistent."""
    import random

    from mmed_rag.fingerprint import file_sha256
    from mmed_rag.retrieval.report_rows import OFFSETS_FILE, REPORTS_FILE, IndexedReport, write_report_rows

    rows = read_jsonl(directory / REPORTS_FILE)
    contents = [(row["report"], tuple(row["ids"])) for row in rows]
    random.Random(seed).shuffle(contents)
    write_report_rows(
        directory, [IndexedReport(row["row"], report, ids) for row, (report, ids) in zip(rows, contents, strict=True)]
    )
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in (REPORTS_FILE, OFFSETS_FILE):
        manifest["files"][name] = file_sha256(directory / name)
    manifest["shuffled_rows_seed"] = seed
    atomic_write_text(directory / "manifest.json", json.dumps(manifest, indent=2))


#: SFT conversation files the sft-data step writes: (task, with retrieved reports) -> file name in work/sft.
SFT_FILES = {
    ("vqa", True): "with_reports.json",
    ("vqa", False): "without_reports.json",
    ("report", True): "reports_with_reports.json",
    ("report", False): "reports_without_reports.json",
}


def _conversations(retrieved: list[Path], folder: Path, k: int) -> dict:
    """LLaVA conversations in MMed-RAG's prompt formats (the same human turns ``generate`` builds), one file per
    entry of :data:`SFT_FILES`: each question, and each image's report (written once per image), with ``k``
    retrieved reports other than the image's own, and without reports."""
    from mmed_rag.generation.prompts import build_prompt

    def conversation(row: dict, task: str, reports: list[str], tag: str) -> dict:
        question = row["question"] if task == "vqa" else None
        answer = row["answer"] if task == "vqa" else row["report"]
        key = row["question_id"] if task == "vqa" else f"{row['image']}-report"
        return {
            "id": f"{key}-{tag}",
            "image": row["image"],
            "conversations": [
                {"from": "human", "value": build_prompt(task, row["modality"], question, reports)},
                {"from": "gpt", "value": answer},
            ],
        }

    rows = {key: [] for key in SFT_FILES}
    own_dropped, images = 0, set()
    for path in retrieved:
        for row in read_jsonl(path):
            others = [report for report in row["reference_reports"] if report != row["report"]]
            own_dropped += len(others) < len(row["reference_reports"])
            others = others[:k]
            tasks = ("vqa",) if row["image"] in images else ("vqa", "report")
            images.add(row["image"])
            for task in tasks:
                rows[task, True].append(conversation(row, task, others, "rag"))
                rows[task, False].append(conversation(row, task, [], "plain"))
    for key, name in SFT_FILES.items():
        atomic_write_text(folder / name, json.dumps(rows[key], indent=1, ensure_ascii=False))
    return {
        "rows": sum(map(len, rows.values())),
        "with_reports": len(rows["vqa", True]),
        "report_rows": len(rows["report", True]) + len(rows["report", False]),
        "own_report_dropped": own_dropped,
    }


def run_demo(config: DemoConfig) -> int:
    """``mmed-rag demo``: the recipe, then REPORT.md; returns 0."""
    with claim_outputs("demo", directories=[config.out]):
        Path(config.out).mkdir(parents=True, exist_ok=True)
        save_config(config, config.out)
        report = Demo(config).run()
    print(f"report: {report}")
    return 0
