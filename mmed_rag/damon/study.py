"""``damon-study``: DAMON on longitudinal phantoms end to end, and what a preliminary diagnosis in the prompt adds.

A recipe of the public stage functions, each step skipped when its inputs are unchanged (the demo's
:class:`~mmed_rag.demo.steps.StepRunner`):

1. longitudinal phantoms (:func:`~mmed_rag.damon.phantoms.make_longitudinal_phantoms`), 64 px;
2. the stand-in model: the demo's small LLaVA built from config, its tokenizer taught the phantoms' wording, its
   vision encoder pretrained on the training films' finding labels (:func:`~mmed_rag.demo.standin.pretrain_vision`;
   a model this small never learns to read the films through the language model alone);
3. DAMON's four stages on the shared SFT runner, each stage's val loss before and after: MCA (captions), DCA
   (single-film questions), DSL (pair questions, half of them with the films' true diagnosis in the prompt, so the
   model can learn to use one), DPM (condition questions, with DSL's data rehearsed: a last stage of condition
   questions alone made the model forget the pair questions);
4. the two preliminary diagnoses of every test film: the finding classifier (``train-findings`` with
   ``findings_preset``) and the stand-in itself asked per condition (``damon-diagnose --by vlm``), both scored
   against the true labels;
5. ``damon-eval`` four times: no prior, the classifier's, the VLM's, and the true labels (what a perfect
   diagnosis would add); difference questions from DAMON's ``mimicdiff_test.json`` (its prompt, as DSL trained),
   the other question types from ``mimic_pair_questions.csv``.

``REPORT.md`` holds the table; ``study.json`` the numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmed_rag.atomic import atomic_write_text
from mmed_rag.config import ConfigError, load_config, save_config
from mmed_rag.damon.configs import DamonEvalConfig, DamonStudyConfig, DiagnoseConfig, TrainFindingsConfig
from mmed_rag.damon.data import DAMON_CONDITIONS
from mmed_rag.damon.phantoms import DIAGNOSIS_ASKED, LongitudinalConfig
from mmed_rag.demo.steps import StepRunner
from mmed_rag.outputs import claim_outputs

logger = logging.getLogger(__name__)

PRIORS = ("none", "classifier", "vlm", "truth")
PRIOR_NAMES = {
    "none": "none",
    "classifier": "finding classifier",
    "vlm": "the VLM, per condition",
    "truth": "true labels (upper bound)",
}


def run_study(config: DamonStudyConfig) -> dict:
    """Run (or finish) the study in ``config.out``; return its numbers (also in ``study.json``)."""
    with claim_outputs("damon-study", directories=[config.out], inputs=[config.findings_preset]):
        return Study(config).run()


class Study:
    def __init__(self, config: DamonStudyConfig):
        self.config = config
        self.out = Path(config.out)
        self.steps = StepRunner(self.out, fresh=config.fresh)
        self.phantoms = self.out / "longitudinal"
        self.damon = self.phantoms / "damon"
        self.images = self.phantoms / "images"

    def run(self) -> dict:
        if not Path(self.config.findings_preset).is_file():
            raise ConfigError(
                f"findings_preset: {self.config.findings_preset}: the finding classifier's preset is not there "
                "(run from the repository's folder, or give --findings-preset)"
            )
        self.make_phantoms()
        model, stages = self.train_model()
        classifier = self.train_classifier()
        diagnoses = {
            "classifier": self.diagnose("classifier", classifier=str(classifier)),
            "vlm": self.diagnose("vlm", model=str(model), conditions=DIAGNOSIS_ASKED, max_new_tokens=3),
            "truth": self.truth(),
        }
        evaluations = {prior: self.evaluate(model, prior, diagnoses.get(prior)) for prior in PRIORS}
        results = {
            "stages": stages,
            "diagnosis": {prior: diagnoses[prior]["metrics"] for prior in ("classifier", "vlm")},
            "evaluation": evaluations,
        }
        atomic_write_text(self.out / "study.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(self.out / "REPORT.md", report(results, self.config))
        save_config(self.config, self.out, name="study_config.yaml")
        return results

    # -- steps --

    def make_phantoms(self) -> None:
        from mmed_rag.damon.phantoms import make_longitudinal_phantoms

        phantoms = LongitudinalConfig(out=str(self.phantoms), patients=self.config.patients, size=64,
                                      seed=self.config.seed)  # fmt: skip
        self.steps.run("phantoms", lambda: str(make_longitudinal_phantoms(phantoms)), params=vars(phantoms),
                       outputs=[self.phantoms])  # fmt: skip

    def _films(self, split: str) -> list[tuple[str, set[str]]]:
        records = json.loads((self.damon / f"mimic_{split}_diagnosis.json").read_text(encoding="utf-8"))
        return [(r["image"], {DAMON_CONDITIONS[int(i)] for i in r["caption"].split(",")}) for r in records]

    def _wording(self) -> tuple[str, ...]:
        """Every line of the stage data, so that the stand-in's tokenizer has a token for each word."""
        lines = []
        for path in sorted(self.damon.glob("*_train.jsonl")):
            for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
                lines += [turn["value"].replace("<image>", " ") for turn in row["conversations"]]
        return tuple(dict.fromkeys(lines))

    def train_model(self) -> tuple[Path, dict]:
        from mmed_rag.demo.standin import STANDIN_TEXT, STANDIN_VISION, pretrain_vision
        from mmed_rag.testing import save_tiny_llava
        from mmed_rag.training.sft import train_sft
        from mmed_rag.training.sft_config import SFTConfig

        seed, models = self.config.seed, self.out / "models"
        base, vision = models / "base", models / "vision"
        self.steps.run(
            "base-model",
            lambda: str(
                save_tiny_llava(base, seed=seed, vision=STANDIN_VISION, text=STANDIN_TEXT, extra_corpus=self._wording())
            ),  # fmt: skip
            params={"seed": seed, "vision": STANDIN_VISION, "text": STANDIN_TEXT},
            inputs=[self.phantoms],
            outputs=[base],
        )
        self.steps.run(
            "pretrain-vision",
            lambda: pretrain_vision(
                base,
                self._films("train"),
                self._films("val"),
                DIAGNOSIS_ASKED,
                self.images,
                vision,
                epochs=self.config.vision_epochs,
                seed=seed,
            )["val_auc"],  # fmt: skip
            params={"epochs": self.config.vision_epochs, "seed": seed, "labels": DIAGNOSIS_ASKED},
            inputs=[base, self.phantoms],
            outputs=[vision],
        )
        data = {split: self._stage_configs(split) for split in ("train", "val")}
        c = self.config
        steps = {"mca": c.mca_steps, "dca": c.dca_steps, "dsl": c.dsl_steps, "dpm": c.dpm_steps}
        sft = SFTConfig(
            model=str(vision),
            image_folder=str(self.images),
            output_dir=str(models / "stages"),
            stages=tuple(
                {
                    "name": stage,
                    "damon_data": data["train"][stage],
                    "damon_val_data": data["val"][stage],
                    "max_steps": count,
                    "learning_rate": c.learning_rate,
                    "trainable": "language_model",
                }
                for stage, count in steps.items()
            ),
            batch_size=c.batch_size,
            warmup_ratio=0.05,
            save_steps=100,
            logging_steps=10,
            max_length=1024,
            seed=seed,
        )
        summaries = self.steps.run(
            "damon-train",
            lambda: {
                name: {key: summary[key] for key in ("global_step", "rows", "val_loss_before", "val_loss_after")}
                for name, summary in train_sft(sft)["summaries"].items()
            },
            params={"sft": vars(sft)},
            inputs=[vision, self.phantoms],
            outputs=[models / "stages"],
        )
        return models / "stages" / "dpm", summaries

    def _stage_configs(self, split: str) -> dict[str, str]:
        """One DAMON data config per stage: the phantoms' own, DSL's with its prior variant, DPM's with DSL's."""
        mixes = {"mca": ["mca"], "dca": ["dca"], "dsl": ["dsl", "dsl_with_prior"]}
        mixes["dpm"] = ["dpm", *mixes["dsl"]] if split == "train" else ["dpm"]
        written = {}
        for stage, parts in mixes.items():
            entries = {}
            for part in parts:
                own = json.loads((self.damon / f"data_config_{part}_{split}.json").read_text(encoding="utf-8"))
                for name, entry in own.items():
                    entries[name] = {**entry, "root": str(self.images.resolve()),
                                     "annotation": str((self.damon / entry["annotation"]).resolve())}  # fmt: skip
            path = self.out / "stage-data" / f"{stage}_{split}.json"
            atomic_write_text(path, json.dumps(entries, indent=2) + "\n")
            written[stage] = str(path)
        return written

    def train_classifier(self) -> Path:
        from mmed_rag.damon.findings import train_findings

        out = self.out / "models" / "finding-classifier"
        findings = load_config(
            TrainFindingsConfig,
            self.config.findings_preset,
            {
                "train_file": str(self.damon / "mimic_train_diagnosis.json"),
                "val_file": str(self.damon / "mimic_val_diagnosis.json"),
                "test_file": str(self.damon / "mimic_test_diagnosis.json"),
                "img_root": str(self.images),
                "out": str(out),
                "seed": self.config.seed,
            },
        )
        self.steps.run("train-findings", lambda: str(train_findings(findings)), params=vars(findings),
                       inputs=[self.phantoms], outputs=[out])  # fmt: skip
        return out

    def diagnose(self, by: str, **settings) -> dict:
        from mmed_rag.damon.findings import diagnose

        out = self.out / "runs" / f"diagnosis-{by}"
        config = DiagnoseConfig(
            data=str(self.damon / "mimic_test_diagnosis.json"), img_root=str(self.images), out=str(out), by=by,
            **settings,
        )  # fmt: skip
        inputs = [self.phantoms, settings.get("classifier") or settings["model"]]
        metrics = self.steps.run(f"diagnose-{by}", lambda: diagnose(config), params=vars(config), inputs=inputs,
                                 outputs=[out])  # fmt: skip
        return {"predictions": str(out / "predictions.jsonl"), "metrics": metrics}

    def truth(self) -> dict:
        """The films' true labels as a damon-diagnose predictions file: the prior a perfect diagnosis gives."""
        path = self.out / "runs" / "diagnosis-truth" / "predictions.jsonl"
        lines = [{"id": image, "names": sorted(names)} for image, names in self._films("test")]
        atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
        return {"predictions": str(path), "metrics": None}

    def evaluate(self, model: Path, prior: str, diagnosis: dict | None) -> dict:
        from mmed_rag.damon.evaluate import evaluate

        found = {}
        questions = {
            "difference": {"data": str(self.damon / "mimicdiff_test.json"), "layout": "difference"},
            "single": {
                "data": str(self.phantoms / "mimic_pair_questions.csv"),
                "mimic_all": str(self.phantoms / "mimic_all.csv"),
                "image_extension": ".png",
                "question_types": ("presence", "abnormality", "view"),
            },
        }
        for part, settings in questions.items():
            out = self.out / "runs" / f"eval-{prior}-{part}"
            config = DamonEvalConfig(
                model=str(model), img_root=str(self.images), out=str(out), limit=self.config.limit,
                diagnosis=diagnosis["predictions"] if diagnosis else "", batch_size=16,
                **settings,
            )  # fmt: skip
            inputs = [model, self.phantoms, *([diagnosis["predictions"]] if diagnosis else [])]
            found[part] = self.steps.run(f"eval-{prior}-{part}", lambda config=config: evaluate(config),
                                         params=vars(config), inputs=inputs, outputs=[out])  # fmt: skip
        return found


# -- the report ------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    """The study's table: per prior, its own diagnosis F1, the difference scores and the single-film scores."""
    lines = [
        "| prior in the prompt | prior's macro F1 | difference F1 | exact | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr "
        "| presence acc. | abnormality recall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for prior in PRIORS:
        evaluation = results["evaluation"][prior]
        difference = evaluation["difference"]["by_type"]["difference"]
        single = evaluation["single"]["by_type"]
        diagnosis = results["diagnosis"].get(prior)
        own = {"none": "-", "truth": "1.000"}.get(prior) or f"{diagnosis['macro_f1']:.3f}"
        cells = [
            own,
            f"{difference['difference']['f1']:.3f}",
            f"{difference['difference']['exact']:.3f}",
            *(f"{difference[name]:.3f}" for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")),
            f"{single['presence']['closed_accuracy']:.3f}" if "presence" in single else "-",
            f"{single['abnormality']['recall']:.3f}" if "abnormality" in single else "-",
        ]
        lines.append(f"| {PRIOR_NAMES[prior]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(results: dict, config: DamonStudyConfig) -> str:
    stages = "\n".join(
        f"| {name} | {summary['global_step']} | {summary['rows']} | {summary['val_loss_before']:.3f} | "
        f"{summary['val_loss_after']:.3f} |"
        for name, summary in results["stages"].items()
    )
    diagnosis = results["diagnosis"]
    return f"""# DAMON on longitudinal phantoms

{config.patients} synthetic patients (a prior and a current 64-px film each), seed {config.seed}; the stand-in model
and the steps are described in `mmed_rag/damon/study.py`.

## Staged fine-tuning

| stage | steps | rows | val loss before | after |
|---|---|---|---|---|
{stages}

## The preliminary diagnosis of the test films

- finding classifier: macro F1 {diagnosis["classifier"]["macro_f1"]:.3f} (image-blind
  {diagnosis["classifier"]["macro_chance_f1"]:.3f});
- the fine-tuned model asked per condition: macro F1 {diagnosis["vlm"]["macro_f1"]:.3f} (image-blind
  {diagnosis["vlm"]["macro_chance_f1"]:.3f}; unreadable answers: {diagnosis["vlm"].get("unreadable_answers", 0)}).

## Answers with each prior in the prompt

Difference questions (DAMON's prompt): finding-level F1 and exact share, and the caption metrics; presence questions:
LLaVA-Med's closed accuracy; abnormality questions: LLaVA-Med's open recall.

{table(results)}"""
