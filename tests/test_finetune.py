"""Fine-tuning a retriever: it learns (recall above chance), saves a loadable retriever, and resumes exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmed_rag.config import ConfigError
from mmed_rag.data.images import ImageLoadError, ImagePathError
from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.data.records import ImageReportRecord, read_retriever_train
from mmed_rag.retrieval import finetune
from mmed_rag.retrieval.clip import load_clip
from mmed_rag.retrieval.encode import embedding_dim, encode_images
from mmed_rag.retrieval.finetune import (
    FinetuneConfig,
    ResumeMismatchError,
    chance_recall,
    evaluate,
    finetune_clip,
    image_report_pairs,
    retrieval_recall,
)

MODALITY = "pathology"  # of the three phantom modalities, the one a tiny retriever learns fastest


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """300 training and 60 validation pathology pairs."""
    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(PhantomConfig(out=str(out), n=400, modalities=(MODALITY,), val_fraction=0.15, test_fraction=0.1))
    return out


@pytest.fixture(scope="module")
def small_train(phantoms) -> Path:
    """The first 48 training records, quick enough to train on many times."""
    records = json.loads((phantoms / f"training/retriever/{MODALITY}/{MODALITY}_train.json").read_text())
    path = phantoms / "small_train.json"
    path.write_text(json.dumps(records[:48], indent=4))
    return path


# A tiny ViT retriever on 48 records, 8 of them held out for validation: a few steps an epoch.
SMALL_RUN = dict(val_fraction=0.2, model="tiny-clip", batch_size=8, lr=1e-3, warmup=2, epochs=4, workers=0)


def small_run(phantoms, train_data, logs, **overrides) -> FinetuneConfig:
    return FinetuneConfig(
        train_data=str(train_data),
        img_root=str(phantoms / "images"),
        dataset_type=MODALITY,
        logs=str(logs),
        **(SMALL_RUN | overrides),
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epochs_logged(run_dir: Path, split: str) -> list[int]:
    return [line["epoch"] for line in read_metrics(run_dir) if line["split"] == split]


def weights(retriever_dir: Path) -> dict[str, torch.Tensor]:
    return load_clip(retriever_dir)[0].state_dict()


# -- the method, on plain data -------------------------------------------------------------------------------


def test_one_pair_per_view_of_a_record():
    records = [
        ImageReportRecord(id="a", report="Two views.", images=["a/front.png", "a/side.png"]),
        ImageReportRecord(id="b", report="One view.", images=["b/front.png"]),
    ]
    pairs = image_report_pairs(records)
    assert [(p.image, p.report, p.record_id) for p in pairs] == [
        ("a/front.png", "Two views.", "a"),
        ("a/side.png", "Two views.", "a"),
        ("b/front.png", "One view.", "b"),
    ]


def test_recall_counts_a_report_by_its_text():
    # Three images, two distinct reports: images 0 and 1 are two views of report 0, image 2 has report 1.
    reports = np.array([[1.0, 0.0], [0.0, 1.0]])
    images = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])  # image 0 looks more like report 1: a miss at R@1
    image_report = np.array([0, 0, 1])
    recall = retrieval_recall(images, reports, image_report, ks=(1, 2))
    assert recall["image_to_report_R@1"] == pytest.approx(2 / 3)
    assert recall["image_to_report_R@2"] == 1.0  # 2 distinct reports: the second view did not take a slot
    # Each report's top image is one of its own (report 0: image 1, its other view; report 1: image 2).
    assert recall["report_to_image_R@1"] == 1.0
    chance = chance_recall(image_report, ks=(1, 2))
    assert chance["image_to_report_R@1"] == 0.5 and chance["image_to_report_R@2"] == 1.0
    assert chance["report_to_image_R@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_config_rejects_unknown_trackers():
    with pytest.raises(ConfigError, match="report_to"):
        FinetuneConfig(report_to="tensorboard,mlflow")


# -- the stage -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> tuple[FinetuneConfig, Path]:
    """A ResNet retriever (the original's RN50 architecture, scaled down) trained 16 epochs: ~20 s on 2 cores."""
    config = FinetuneConfig(
        train_data=str(phantoms / f"training/retriever/{MODALITY}/{MODALITY}_train.json"),
        val_data=str(phantoms / f"training/retriever/{MODALITY}/{MODALITY}_val.json"),
        img_root=str(phantoms / "images"),
        dataset_type=MODALITY,
        model="tiny-clip-rn",
        batch_size=32,
        lr=1e-3,
        warmup=10,
        epochs=16,
        val_frequency=2,
        workers=0,
        logs=str(tmp_path_factory.mktemp("logs")),
    )
    return config, finetune_clip(config)


def test_training_lowers_the_loss_and_retrieves_well_above_chance(trained):
    config, best_dir = trained
    metrics = read_metrics(config.run_dir)
    train_loss = [line["loss"] for line in metrics if line["split"] == "train"]
    assert train_loss[-1] < 0.7 * train_loss[0]
    best = json.loads((best_dir / "manifest.json").read_text())["best"]
    val = next(line for line in metrics if line["split"] == "val" and line["epoch"] == best["epoch"])
    assert val["reports"] == 60
    # Chance is 5 / 60 = 0.083; seeds 0-3 on two phantom sets gave 0.25-0.42 here.
    assert best["recall"]["image_to_report_R@5"] > 2 * val["chance_image_to_report_R@5"]
    # A collapsed model would tie everywhere: chance under the tie rule, never 1.0 at every k.
    assert min(best["recall"][f"image_to_report_R@{k}"] for k in (1, 5, 10)) < 1.0
    # Nor are the embeddings collapsed: distinct val images are far from one point (measured: 0.75).
    model, _, preprocess, _ = load_clip(best_dir)
    images = [pair.image for pair in image_report_pairs(read_retriever_train(config.val_data).records)]
    features = encode_images(model, preprocess, config.img_root, images, batch_size=32, progress=False)
    cosine = features @ features.T
    spread = 1 - (cosine.sum() - np.trace(cosine)) / (len(images) * (len(images) - 1))
    assert spread > 0.05
    assert epochs_logged(config.run_dir, "val") == [2, 4, 6, 8, 10, 12, 14, 16]
    assert (config.run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert (config.run_dir / "config.yaml").is_file()


def test_best_dir_is_a_retriever_that_says_how_it_was_made(trained, phantoms):
    config, best_dir = trained
    model, _, preprocess, tokenizer = load_clip(best_dir)
    manifest = json.loads((best_dir / "manifest.json").read_text())
    assert manifest["model_name"] == "tiny-clip-rn" and manifest["modality"] == MODALITY
    assert manifest["embed_dim"] == embedding_dim(model) == 64
    assert manifest["data"]["train"]["records"] == 300 and len(manifest["data"]["train"]["sha256"]) == 64
    assert manifest["training"]["lr"] == 1e-3 and manifest["trained_on"]["precision"] == "fp32"
    assert set(manifest["versions"]) >= {"torch", "open_clip_torch"}
    # The weights are those of the best epoch: evaluating them again gives the recall the manifest records.
    val_pairs = image_report_pairs(read_retriever_train(config.val_data).records)
    again = evaluate(model, preprocess, tokenizer, config.img_root, val_pairs, batch_size=32, workers=0)
    assert {key: again[key] for key in manifest["best"]["recall"]} == pytest.approx(manifest["best"]["recall"])


class Killed(Exception):
    pass


def test_a_killed_run_resumes_without_repeating_an_epoch_and_ends_with_the_same_weights(
    phantoms, small_train, tmp_path, monkeypatch
):
    straight = finetune_clip(small_run(phantoms, small_train, tmp_path, name="straight"))

    # Kill the second run while it writes epoch 3's checkpoint: its weights are written, its marker is not.
    write_state = finetune.write_trainer_state

    def killed_in_epoch_3(directory, state, optimizer, scaler):
        if state["epochs_done"] == 3:
            raise Killed
        write_state(directory, state, optimizer, scaler)

    monkeypatch.setattr(finetune, "write_trainer_state", killed_in_epoch_3)
    config = small_run(phantoms, small_train, tmp_path, name="killed")
    with pytest.raises(Killed):
        finetune_clip(config)
    assert json.loads((config.run_dir / "last/trainer_state.json").read_text())["epochs_done"] == 2
    assert epochs_logged(config.run_dir, "train") == [1, 2, 3]  # epoch 3 was logged before the kill

    monkeypatch.undo()
    resumed = finetune_clip(config)  # the same command again
    assert epochs_logged(config.run_dir, "train") == [1, 2, 3, 4]
    assert epochs_logged(config.run_dir, "val") == [1, 2, 3, 4]
    expected = weights(straight)
    for name, value in weights(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_raising_epochs_trains_on_and_a_changed_config_is_refused(phantoms, small_train, tmp_path):
    config = small_run(phantoms, small_train, tmp_path, epochs=1)
    finetune_clip(config)
    finetune_clip(small_run(phantoms, small_train, tmp_path, epochs=2))
    assert epochs_logged(config.run_dir, "train") == [1, 2]
    finetune_clip(small_run(phantoms, small_train, tmp_path, epochs=2))  # already complete: nothing to do
    assert epochs_logged(config.run_dir, "train") == [1, 2]
    with pytest.raises(ResumeMismatchError, match=r"lr: 0\.001 -> 0\.01"):
        finetune_clip(small_run(phantoms, small_train, tmp_path, epochs=3, lr=1e-2))
    # Data files are compared by content, not by path: moved data resumes, edited data is another run.
    moved = tmp_path / "moved.json"
    moved.write_text(small_train.read_text())
    finetune_clip(small_run(phantoms, moved, tmp_path, epochs=3))
    assert epochs_logged(config.run_dir, "train") == [1, 2, 3]
    edited = tmp_path / "edited.json"
    edited.write_text(small_train.read_text().replace("necrosis", "debris", 1))
    with pytest.raises(ResumeMismatchError, match="train_data"):
        finetune_clip(small_run(phantoms, edited, tmp_path, epochs=4))


def test_trackers_log_when_asked(phantoms, small_train, tmp_path):
    config = small_run(phantoms, small_train, tmp_path, epochs=1, report_to="tensorboard,wandb")
    finetune_clip(config)  # wandb runs in WANDB_MODE=disabled (conftest)
    assert list((config.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_a_missing_image_is_named_before_training(phantoms, tmp_path):
    records = [
        {"id": "ok", "report": "Normal glands.", "image": "pathology/path_00000.png"},
        {"id": "bad", "report": "Necrosis is present.", "image": "pathology/not_there.png"},
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    config = FinetuneConfig(
        train_data=str(data),
        img_root=str(phantoms / "images"),
        dataset_type=MODALITY,
        model="tiny-clip",
        val_fraction=0,
        logs=str(tmp_path / "logs"),
    )
    with pytest.raises(ImageLoadError, match=r"train\.json: 1 image\(s\) not found .*'bad': pathology/not_there\.png"):
        finetune_clip(config)
    records[1]["image"] = "../outside.png"
    data.write_text(json.dumps(records))
    with pytest.raises(ImagePathError, match=r"train\.json, record 'bad': .*outside the image root"):
        finetune_clip(config)
