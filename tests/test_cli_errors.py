"""One error policy for every stage, as a table: bad input in, one line and exit code 2 out, nothing lost.

Every case runs ``mmed-rag STAGE ...`` (in process) on a small world of phantoms and tiny models plus one bad
input, and checks what a user would: exit code 2; a single line ``mmed-rag STAGE: ...`` on stderr naming the
file (and the record and field, where there is one); no traceback; no output written; every file that was
there before byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmed_rag.cli import main

# -- bad inputs -------------------------------------------------------------------------------------------------


def vqa_lines(world) -> list[dict]:
    return [json.loads(line) for line in world.vqa.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def vqa_with(world, tmp: Path, name: str = "bad.jsonl", **first) -> Path:
    """The radiology VQA test file with its first record changed."""
    rows = vqa_lines(world)
    rows[0] = {**rows[0], **first}
    return write_jsonl(tmp / name, rows)


def text_png(world, tmp: Path) -> tuple[Path, str]:
    """An image root holding the phantoms plus a text file named .png."""
    root = tmp / "images"
    root.mkdir()
    (root / "radiology").symlink_to(world.images / "radiology", target_is_directory=True)
    (root / "fake.png").write_text("this is not a PNG")
    return root, "fake.png"


def model_without_config(tmp: Path) -> Path:
    model = tmp / "model"
    model.mkdir()
    (model / "README.md").write_text("weights went missing")
    return model


def index_without_manifest(world, tmp: Path) -> Path:
    index = tmp / "index"
    index.mkdir()
    for path in world.index.iterdir():
        if path.name != "manifest.json":
            (index / path.name).write_bytes(path.read_bytes())
    return index


def retriever_train_with(world, tmp: Path, **first) -> Path:
    records = json.loads(world.corpus.read_text())
    records[0] = {**records[0], **first}
    path = tmp / "train.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def cut_json(world, tmp: Path) -> Path:
    path = tmp / "cut.json"
    path.write_text(world.corpus.read_text()[:700])
    return path


def gen(world, *more: str) -> list[str]:
    """A generate command line without retrieval on the tiny LLaVA."""
    return ["generate", "--model", str(world.llava), "--no-retrieval", "--modality", "radiology", *more]


def gen_io(world, tmp: Path, input_path, *more: str, img_root=None) -> list[str]:
    return gen(
        world,
        "--input",
        str(input_path),
        "--output",
        str(tmp / "out.jsonl"),
        "--img-root",
        str(img_root or world.images),
        "--max-new-tokens",
        "2",
        *more,
    )


def retrieve_args(world, tmp: Path, eval_json, *more: str, index=None, output=None) -> list[str]:
    return [
        "retrieve",
        "--eval_json",
        str(eval_json),
        "--output_path",
        str(output or tmp / "out.jsonl"),
        "--img_root",
        str(world.images),
        "--index",
        str(index or world.index),
        "--model_name_or_path",
        str(world.clip),
        "--device",
        "cpu",
        *more,
    ]


def staged_output(world, tmp: Path) -> Path:
    """A folder like train-sft's output: the model is one level down, in the stage's folder."""
    (tmp / "staged").mkdir()
    (tmp / "staged" / "standin").symlink_to(world.llava, target_is_directory=True)
    return tmp / "staged"


def dpo_args(world, tmp: Path, *more: str, data=None, output=None, model=None) -> list[str]:
    return [
        "train-dpo",
        "--model_name_or_path",
        str(model or world.llava),
        "--data_path",
        str(data or world.pairs),
        "--image_folder",
        str(world.images),
        "--output_dir",
        str(output or tmp / "dpo"),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--bf16",
        "False",
        "--gradient_checkpointing",
        "False",
        "--report_to",
        "none",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        *more,
    ]


def domain_args(world, tmp: Path, train: str, *more: str, out=None) -> list[str]:
    return [
        "train-domain",
        "--train-files",
        train,
        f"pathology={world.data}/training/retriever/pathology/pathology_train.json",
        "--img-root",
        str(world.images),
        "--model",
        "tiny-clip",
        "--epochs",
        "1",
        "--out",
        str(out or tmp / "domain"),
        "--device",
        "cpu",
        *more,
    ]


def finetune_args(world, tmp: Path, train, *more: str) -> list[str]:
    return [
        "finetune-clip",
        "--model",
        "tiny-clip",
        "--train-data",
        str(train),
        "--dataset-type",
        "radiology",
        "--img-root",
        str(world.images),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--logs",
        str(tmp / "logs"),
        "--device",
        "cpu",
        *more,
    ]


def eval_args(tmp: Path, pred, *more: str, out=None) -> list[str]:
    return ["eval", "--task", "vqa", "--pred", str(pred), "--out", str(out or tmp / "eval"), "--bootstrap", "0", *more]


def pairs_args(world, tmp: Path, *more: str, runs=None, out=None) -> list[str]:
    runs = runs or (world.pred, world.pred, world.pred)
    return [
        "make-pairs",
        "--with-retrieval",
        str(runs[0]),
        "--without-retrieval",
        str(runs[1]),
        "--noised",
        str(runs[2]),
        "--out",
        str(out or tmp / "pairs"),
        *more,
    ]


# -- the table --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One stage and one bad input: ``argv(world, tmp)`` builds the command line (and any bad files)."""

    name: str
    argv: Callable[[SimpleNamespace, Path], list[str]]
    says: tuple[str, ...]  # substrings of the one-line message: the file, the record, the field
    hold: Callable[[SimpleNamespace, Path], Path] | None = None  # an output another process is writing
    outputs: tuple[str, ...] = field(default=())  # paths under tmp that must not exist afterwards


CASES = [
    # validate-data
    Case(
        "validate-data/unknown-kind",
        lambda w, t: ["validate-data", str(w.vqa), "--kind", "nonsense"],
        ("kind", "nonsense"),
    ),
    Case(
        "validate-data/unknown-option-in-config",
        lambda w, t: ["validate-data", str(w.vqa), "--config", str(bad_yaml(t))],
        ("bad.yaml", "colour"),
    ),
    # make-phantoms
    Case(
        "make-phantoms/out-is-a-file",
        lambda w, t: ["make-phantoms", "--out", str(w.pred), "--n", "9"],
        ("pred.jsonl", "is a file"),
    ),
    Case(
        "make-phantoms/missing-config", lambda w, t: ["make-phantoms", "--config", str(t / "nope.yaml")], ("nope.yaml",)
    ),
    Case(
        "make-phantoms/not-yaml",
        lambda w, t: ["make-phantoms", "--config", str(write(t / "c.yaml", "n: [1, 2"))],
        ("c.yaml", "not valid YAML"),
    ),
    Case(
        "make-phantoms/wrong-type",
        lambda w, t: ["make-phantoms", "--config", str(write(t / "c.yaml", "n: many"))],
        ("c.yaml", "n", "int"),
    ),
    # make-longitudinal-phantoms
    Case(
        "make-longitudinal-phantoms/out-is-a-file",
        lambda w, t: ["make-longitudinal-phantoms", "--out", str(w.pred), "--patients", "3"],
        ("pred.jsonl", "is a file"),
    ),
    Case(
        "make-longitudinal-phantoms/not-a-probability",
        lambda w, t: ["make-longitudinal-phantoms", "--out", str(t / "pairs"), "--appear-probability", "1.5"],
        ("appear_probability", "probability"),
        outputs=("pairs",),
    ),
    # train-domain
    Case(
        "train-domain/missing-train-file",
        lambda w, t: domain_args(w, t, f"radiology={t}/absent.json"),
        ("absent.json",),
        outputs=("domain",),
    ),
    Case(
        "train-domain/image-outside-root",
        lambda w, t: domain_args(w, t, f"radiology={retriever_train_with(w, t, image_path=['../../secret.png'])}"),
        ("train.json", "rad_00000", "secret.png"),
        outputs=("domain",),
    ),
    Case(
        "train-domain/out-is-the-train-file",
        lambda w, t: domain_args(w, t, f"radiology={w.corpus}", out=w.corpus),
        ("radiology_train.json", "input"),
    ),
    Case(
        "train-domain/out-holds-the-images",
        lambda w, t: domain_args(w, t, f"radiology={w.corpus}", out=w.data),
        ("holds the input",),
    ),
    # train-findings
    Case(
        "train-findings/label-outside-the-label-set",
        lambda w, t: [
            *("train-findings", "--train-file", str(diagnosis_file(w, t, "1, 99")), "--img-root", str(w.images)),
            *("--model", "tiny-clip", "--epochs", "1", "--out", str(t / "findings"), "--device", "cpu"),
        ],
        ("diagnosis.json", "record 1", "caption", "'99'"),
        outputs=("findings",),
    ),
    # damon-diagnose
    Case(
        "damon-diagnose/a-domain-classifier",
        lambda w, t: [
            *("damon-diagnose", "--data", str(diagnosis_file(w, t, "1")), "--img-root", str(w.images)),
            *("--classifier", str(w.domain), "--out", str(t / "diagnosed"), "--device", "cpu"),
        ],
        ("domain", "not a finding classifier", "train-findings"),
        outputs=("diagnosed",),
    ),
    # damon-eval
    Case(
        "damon-eval/diagnosis-misses-an-image",
        lambda w, t: [
            *("damon-eval", "--model", str(w.llava), "--data", str(pair_questions(w, t)), "--layout", "difference"),
            *("--img-root", str(w.images), "--out", str(t / "evaluated"), "--device", "cpu"),
            *("--diagnosis", str(write(t / "diagnosed.jsonl", json.dumps({"id": "x.png", "names": []}) + "\n"))),
        ],
        ("diagnosed.jsonl", "no diagnosis of", "record 0"),
        outputs=("evaluated",),
    ),
    # damon-study
    Case(
        "damon-study/no-findings-preset",
        lambda w, t: ["damon-study", "--out", str(t / "study"), "--findings-preset", str(t / "absent.yaml")],
        ("findings_preset", "absent.yaml"),
        outputs=("study",),
    ),
    # predict-domain
    Case(
        "predict-domain/no-classifier",
        lambda w, t: ["predict-domain", "--classifier", str(t / "none"), "--images", "x.png"],
        ("none",),
    ),
    Case(
        "predict-domain/missing-image",
        lambda w, t: [
            "predict-domain",
            "--classifier",
            str(w.domain),
            "--img-root",
            str(w.images),
            "--images",
            "radiology/absent.png",
        ],
        ("absent.png",),
    ),
    Case(
        "predict-domain/output-is-the-data",
        lambda w, t: [
            "predict-domain",
            "--classifier",
            str(w.domain),
            "--img-root",
            str(w.images),
            "--data",
            str(w.vqa),
            "--output",
            str(w.vqa),
        ],
        ("radiology_test.jsonl", "input"),
    ),
    # finetune-clip
    Case(
        "finetune-clip/missing-train-data",
        lambda w, t: finetune_args(w, t, t / "absent.json"),
        ("absent.json",),
        outputs=("logs",),
    ),
    Case(
        "finetune-clip/cut-json",
        lambda w, t: finetune_args(w, t, cut_json(w, t)),
        ("cut.json", "line"),
        outputs=("logs",),
    ),
    Case(
        "finetune-clip/missing-image",
        lambda w, t: finetune_args(w, t, retriever_train_with(w, t, image_path=["radiology/absent.png"])),
        ("absent.png", "rad_00000"),
        outputs=("logs",),
    ),
    Case(
        "finetune-clip/record-without-report",
        lambda w, t: finetune_args(w, t, retriever_train_with(w, t, report=None)),
        ("train.json", "report"),
        outputs=("logs",),
    ),
    Case(
        "finetune-clip/run-dir-is-the-image-root",
        lambda w, t: [*finetune_args(w, t, w.corpus), "--logs", str(w.data), "--name", "images"],
        ("images", "input"),
    ),
    # build-index
    Case(
        "build-index/retriever-without-manifest",
        lambda w, t: [
            "build-index",
            "--retriever",
            str(t),
            "--corpus",
            str(w.corpus),
            "--modality",
            "radiology",
            "--out",
            str(t / "idx"),
        ],
        ("open_clip_config.json",),
        outputs=("idx",),
    ),
    Case(
        "build-index/missing-corpus",
        lambda w, t: [
            "build-index",
            "--retriever",
            str(w.clip),
            "--corpus",
            str(t / "absent.json"),
            "--modality",
            "radiology",
            "--out",
            str(t / "idx"),
        ],
        ("absent.json",),
        outputs=("idx",),
    ),
    Case(
        "build-index/out-is-the-retriever",
        lambda w, t: [
            "build-index",
            "--retriever",
            str(w.clip),
            "--corpus",
            str(w.corpus),
            "--modality",
            "radiology",
            "--out",
            str(w.clip),
        ],
        ("clip", "input"),
    ),
    Case(
        "build-index/record-without-report",
        lambda w, t: [
            "build-index",
            "--retriever",
            str(w.clip),
            "--corpus",
            str(retriever_train_with(w, t, report=7)),
            "--modality",
            "radiology",
            "--out",
            str(t / "idx"),
        ],
        ("train.json", "report"),
        outputs=("idx",),
    ),
    # retrieve
    Case(
        "retrieve/index-without-manifest",
        lambda w, t: retrieve_args(w, t, w.vqa, index=index_without_manifest(w, t)),
        ("index", "manifest"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "retrieve/missing-input",
        lambda w, t: retrieve_args(w, t, t / "absent.jsonl"),
        ("absent.jsonl",),
        outputs=("out.jsonl",),
    ),
    Case(
        "retrieve/image-outside-root",
        lambda w, t: retrieve_args(w, t, vqa_with(w, t, image="../../etc/passwd")),
        ("bad.jsonl", "question_id", "passwd"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "retrieve/output-is-the-input",
        lambda w, t: retrieve_args(w, t, w.vqa, output=w.vqa),
        ("radiology_test.jsonl", "input"),
    ),
    Case(
        "retrieve/output-is-the-input-through-a-symlink",
        lambda w, t: retrieve_args(w, t, w.vqa, output=symlink(t / "link.jsonl", w.vqa)),
        ("link.jsonl", "resolve"),
    ),
    Case("retrieve/output-is-a-directory", lambda w, t: retrieve_args(w, t, w.vqa, output=t), ("is a directory",)),
    Case(
        "retrieve/output-being-written",
        lambda w, t: retrieve_args(w, t, w.vqa),
        ("out.jsonl", "another run", "pid"),
        hold=lambda w, t: t / "out.jsonl",
        outputs=("out.jsonl",),
    ),
    # eval-retrieval
    Case(
        "eval-retrieval/missing-input",
        lambda w, t: [
            "eval-retrieval",
            "--eval-json",
            str(t / "absent.json"),
            "--img-root",
            str(w.images),
            "--out",
            str(t / "ev"),
            "--model-name-or-path",
            str(w.clip),
            "--index",
            str(w.index),
            "--device",
            "cpu",
        ],
        ("absent.json",),
        outputs=("ev",),
    ),
    Case(
        "eval-retrieval/out-is-the-index",
        lambda w, t: [
            "eval-retrieval",
            "--eval-json",
            str(w.report),
            "--img-root",
            str(w.images),
            "--out",
            str(w.index),
            "--model-name-or-path",
            str(w.clip),
            "--index",
            str(w.index),
        ],
        ("index", "input"),
    ),
    # convert-llava-med
    Case(
        "convert-llava-med/missing-source",
        lambda w, t: ["convert-llava-med", str(t / "absent"), str(t / "dst")],
        ("absent",),
        outputs=("dst",),
    ),
    Case(
        "convert-llava-med/destination-is-the-source",
        lambda w, t: ["convert-llava-med", str(w.llava), str(w.llava), "--overwrite"],
        ("llava", "input"),
    ),
    # generate
    Case(
        "generate/image-outside-root",
        lambda w, t: gen_io(w, t, vqa_with(w, t, image="../../../etc/passwd")),
        ("bad.jsonl", "question_id", "passwd"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "generate/missing-image",
        lambda w, t: gen_io(w, t, vqa_with(w, t, image="radiology/absent.png")),
        ("bad.jsonl", "question_id", "absent.png"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "generate/text-file-named-png",
        lambda w, t: gen_io(w, t, vqa_with(w, t, image="fake.png"), img_root=text_png(w, t)[0]),
        ("bad.jsonl", "question_id", "fake.png"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "generate/duplicate-question-id",
        lambda w, t: gen_io(w, t, vqa_with(w, t, question_id=vqa_lines(w)[1]["question_id"])),
        ("bad.jsonl", "question_id", "duplicate"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "generate/record-without-question-field",
        lambda w, t: gen_io(w, t, vqa_with(w, t, question=None, text=None)),
        ("bad.jsonl", "line 1"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "generate/model-without-config",
        lambda w, t: [*gen_io(w, t, w.vqa), "--model", str(model_without_config(t))],
        ("model", "config.json"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "generate/output-is-the-input",
        lambda w, t: [*gen_io(w, t, w.vqa), "--output", str(w.vqa)],
        ("radiology_test.jsonl", "input"),
    ),
    Case(
        "generate/output-being-written",
        lambda w, t: gen_io(w, t, w.vqa),
        ("out.jsonl", "another run", "pid"),
        hold=lambda w, t: t / "out.jsonl",
        outputs=("out.jsonl",),
    ),
    Case(
        "generate/missing-registry",
        lambda w, t: [
            "generate",
            "--model",
            str(w.llava),
            "--registry",
            str(t / "absent.yaml"),
            "--modality",
            "radiology",
            "--input",
            str(w.vqa),
            "--output",
            str(t / "out.jsonl"),
            "--img-root",
            str(w.images),
        ],
        ("absent.yaml",),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    Case(
        "generate/adapter-that-is-no-adapter",
        lambda w, t: [*gen_io(w, t, w.vqa), "--adapter", str(model_without_config(t))],
        ("model", "adapter"),
        outputs=("out.jsonl", "out.jsonl.partial"),
    ),
    # eval
    Case(
        "eval/missing-predictions", lambda w, t: eval_args(t, t / "absent.jsonl"), ("absent.jsonl",), outputs=("eval",)
    ),
    Case(
        "eval/line-without-prediction",
        lambda w, t: eval_args(t, write_jsonl(t / "p.jsonl", [{k: v for k, v in vqa_lines(w)[0].items()}])),
        ("p.jsonl", "prediction"),
        outputs=("eval",),
    ),
    Case("eval/out-is-the-predictions", lambda w, t: eval_args(t, w.pred, out=w.pred), ("pred.jsonl", "input")),
    # make-pairs
    Case(
        "make-pairs/missing-run",
        lambda w, t: pairs_args(w, t, runs=(w.pred, t / "absent.jsonl", w.pred)),
        ("absent.jsonl",),
        outputs=("pairs",),
    ),
    Case("make-pairs/out-is-a-run", lambda w, t: pairs_args(w, t, out=w.pred), ("pred.jsonl", "input")),
    # merge-lora
    Case(
        "merge-lora/adapter-missing",
        lambda w, t: ["merge-lora", "--base", str(w.llava), "--adapter", str(t / "absent"), "--out", str(t / "merged")],
        ("absent",),
        outputs=("merged",),
    ),
    Case(
        "merge-lora/out-is-the-base",
        lambda w, t: ["merge-lora", "--base", str(w.llava), "--adapter", str(t), "--out", str(w.llava)],
        ("llava", "input"),
    ),
    # train-dpo
    Case(
        "train-dpo/missing-pairs",
        lambda w, t: dpo_args(w, t, data=t / "absent.json"),
        ("absent.json",),
        outputs=("dpo",),
    ),
    Case(
        "train-dpo/pair-without-rejected-side",
        lambda w, t: dpo_args(w, t, data=pairs_without_rejected(w, t)),
        ("pairs.json", "record 0", "rejected_conversations"),
        outputs=("dpo",),
    ),
    Case("train-dpo/output-is-the-model", lambda w, t: dpo_args(w, t, output=w.llava), ("llava", "input")),
    Case(
        "train-dpo/model-is-a-staged-output",  # a train-sft output holds one model per stage
        lambda w, t: dpo_args(w, t, model=staged_output(w, t)),
        ("staged", "no config.json", "its folders standin hold models"),
        outputs=("dpo",),
    ),
    # train-sft
    Case(
        "train-sft/missing-data",
        lambda w, t: [*sft_args(w, t), "--data", str(t / "absent.json")],
        ("absent.json",),
        outputs=("sft",),
    ),
    Case(
        "train-sft/marker-count-off",
        lambda w, t: [*sft_args(w, t), "--data", str(sft_data(w, t, "<image>\n<image>\nIs it normal?"))],
        ("sft.json", "record 0", "conversations", "2 <image> marker(s) for 1 image(s)"),
        outputs=("sft",),
    ),
    Case("train-sft/output-is-the-model", lambda w, t: [*sft_args(w, t, output=w.llava)], ("llava", "input")),
    # damon-train
    Case(
        "damon-train/image-missing-under-its-root",
        lambda w, t: damon_args(w, t, damon_config(w, t)),
        ("pairs.jsonl", "line 1", "field 'image'", "absent.png", "dataset 'pairs' of", "config.json"),
        outputs=("damon",),
    ),
    Case(
        "damon-train/annotation-missing",
        lambda w, t: damon_args(w, t, damon_config(w, t, annotation="absent.jsonl")),
        ("config.json", "dataset 'pairs'", "annotation", "absent.jsonl"),
        outputs=("damon",),
    ),
    # make-tiny-model
    Case(
        "make-tiny-model/out-is-a-file", lambda w, t: ["make-tiny-model", "--out", str(w.pred)], ("pred.jsonl", "file")
    ),
    # demo
    Case("demo/out-is-a-file", lambda w, t: ["demo", "--out", str(w.pred)], ("pred.jsonl", "is a file")),
]


def diagnosis_file(world, tmp: Path, second_caption: str) -> Path:
    """A DAMON diagnosis file of two images whose second record's labels are ``second_caption``."""
    first, second = list(dict.fromkeys(line["image"] for line in vqa_lines(world)))[:2]
    records = [{"id": 0, "image": first, "caption": "1, 9"}, {"id": 1, "image": second, "caption": second_caption}]
    return write(tmp / "diagnosis.json", json.dumps(records))


def pair_questions(world, tmp: Path) -> Path:
    """A DAMON difference file of one question about two of the world's images."""
    first, second = list(dict.fromkeys(line["image"] for line in vqa_lines(world)))[:2]
    prompt = "What has changed between the main image<image>\n and the reference image<image>\n?"
    record = {"id": 0, "image": [first, second], "prompt": prompt, "caption": "nothing has changed."}
    return write(tmp / "pairs.json", json.dumps([record]))


def sft_data(world, tmp: Path, human: str = "<image>\nIs the heart enlarged?") -> Path:
    record = {
        "id": "s0",
        "image": world.first_image,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "No."}],
    }
    return write(tmp / "sft.json", json.dumps([record, {**record, "id": "s1"}]))


def sft_args(world, tmp: Path, output=None) -> list[str]:
    return [
        *("train-sft", "--model", str(world.llava), "--data", str(sft_data(world, tmp))),
        *("--image-folder", str(world.images), "--output-dir", str(output or tmp / "sft"), "--max-steps", "1"),
    ]


def damon_config(world, tmp: Path, annotation: str = "pairs.jsonl") -> Path:
    """A DAMON data config of one dataset ("pairs", images under the phantoms' root): a main image and a reference
    image that is not there."""
    images = [world.first_image, "radiology/absent.png"]
    human = "What has changed between the main image<image>\n and the reference image<image>\n?"
    record = {
        "id": 0,
        "image": images,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "nothing has changed."}],
    }
    write(tmp / "pairs.jsonl", json.dumps(record) + "\n")
    entry = {"root": str(world.images), "annotation": annotation, "repeat_time": 1, "data_augment": False}
    return write(tmp / "config.json", json.dumps({"pairs": entry}))


def damon_args(world, tmp: Path, config: Path) -> list[str]:
    return [
        *("damon-train", "--model", str(world.llava), "--damon-data", str(config)),
        *("--output-dir", str(tmp / "damon"), "--max-steps", "1"),
    ]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def bad_yaml(tmp: Path) -> Path:
    return write(tmp / "bad.yaml", "files: [a.json]\ncolour: blue\n")


def symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def pairs_without_rejected(world, tmp: Path) -> Path:
    records = json.loads(world.pairs.read_text())
    del records[0]["rejected_conversations"]
    return write(tmp / "pairs.json", json.dumps(records))


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (symlinks as their target path)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                found[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def hold_output(output: Path) -> subprocess.Popen:
    """Another process writing ``output``: it claims it and waits until killed."""
    code = (
        "import sys, time\n"
        "from mmed_rag.outputs import claim_outputs\n"
        f"with claim_outputs('generate', files=[{str(output)!r}]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_table_covers_every_stage():
    from mmed_rag.cli import PASSTHROUGH, STAGES

    covered = {case.name.split("/")[0] for case in CASES}
    assert covered == {stage.name for stage in STAGES} | set(PASSTHROUGH)
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gives_one_line_and_exit_code_2(case, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = case.argv(world, tmp_path)
    holder = hold_output(case.hold(world, tmp_path)) if case.hold else None
    before = snapshot(world.root, tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    err = capsys.readouterr().err
    stage = argv[0]
    lines = [line for line in err.splitlines() if line.startswith("mmed-rag ")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"mmed-rag {stage}: "), err
    for part in case.says:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    if holder is not None:
        assert f"pid {holder.pid}" in lines[0]
    for name in case.outputs:
        assert not (tmp_path / name).exists(), f"{name} was written"
    after = snapshot(world.root, tmp_path)
    assert {path: digest for path, digest in after.items() if path in before} == before, "an input changed"
    new = sorted(set(after) - set(before))
    assert not new, f"written despite the error: {new}"


def test_verbose_adds_the_traceback(world, tmp_path, capsys):
    code = main(["-v", *retrieve_args(world, tmp_path, tmp_path / "absent.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("mmed-rag retrieve: ")


def test_a_bug_keeps_its_traceback(world, tmp_path, monkeypatch):
    import mmed_rag.retrieval.batch as batch

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(batch, "load_retriever", broken)
    with pytest.raises(ZeroDivisionError):
        main(retrieve_args(world, tmp_path, world.vqa))
    assert not (tmp_path / "out.jsonl.lock").exists()  # the lock went with the failed run


def test_two_generate_runs_on_one_output_cannot_corrupt_it(world, tmp_path):
    """The reported case: two `mmed-rag generate` started together with the same --output (a retried job).

    Whichever claims the output first answers every question; the other stops at once, before loading a model,
    naming the first. Before the lock, the output held 71 lines for 40 ids.
    """
    rows = [{**row, "question_id": index} for index, row in enumerate(vqa_lines(world) * 60)]
    source = write_jsonl(tmp_path / "questions.jsonl", rows)
    argv = [sys.executable, "-m", "mmed_rag.cli", *gen_io(world, tmp_path, source, "--batch-size", "1")]
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    results = [(run.pid, run.returncode, out, err) for run, (out, err) in zip(runs, outputs, strict=True)]
    codes = sorted(code for _, code, _, _ in results)
    assert codes == [0, 2], results
    (winner, *_), (_, _, _, refused) = sorted(results, key=lambda result: result[1])
    assert f"another run (pid {winner} " in refused and "Traceback" not in refused
    assert [line for line in refused.splitlines() if line.startswith("mmed-rag")] == refused.strip().splitlines()[-1:]
    written = [json.loads(line)["question_id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == list(range(len(rows)))
    assert not (tmp_path / "out.jsonl.partial").exists() and not (tmp_path / "out.jsonl.lock").exists()
