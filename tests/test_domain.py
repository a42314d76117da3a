"""The domain classifier: it routes held-out phantoms to their modality, calls what it cannot place 'unknown',
saves and loads exactly, and refuses a directory whose encoder changed."""

import argparse
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmed_rag.config import ConfigError, add_config_arguments, config_from_args
from mmed_rag.data.images import ImageLoadError
from mmed_rag.data.phantoms import PhantomConfig, make_phantoms
from mmed_rag.domain.classifier import (
    ClassifierMismatchError,
    DomainClassifier,
    PredictDomainConfig,
    TrainDomainConfig,
    predict_domain,
    train_domain,
)
from mmed_rag.domain.routing import UNKNOWN, DomainPrediction, route
from mmed_rag.testing import non_medical_images, tiny_clip

logger = logging.getLogger(__name__)

MODALITIES = ("radiology", "pathology", "ophthalmology")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """300 phantoms of 64 px: 70 training, 10 val and 20 test images per modality."""
    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(PhantomConfig(out=str(out), n=300, size=64))
    return out


def data_files(phantoms: Path, split: str) -> list[str]:
    """``modality=path`` entries, as on the command line: the retriever files, or the report test files."""
    if split == "test":
        return [f"{m}={phantoms}/test/report/{m}_test.json" for m in MODALITIES]
    return [f"{m}={phantoms}/training/retriever/{m}/{m}_{split}.json" for m in MODALITIES]


@pytest.fixture(scope="module")
def classifier_dir(phantoms, tmp_path_factory) -> Path:
    """A linear head on a frozen, randomly initialised tiny CLIP, trained on the phantoms' retriever files."""
    return train_domain(
        TrainDomainConfig(
            train_files=data_files(phantoms, "train"),
            val_files=data_files(phantoms, "val"),
            test_files=data_files(phantoms, "test"),
            img_root=str(phantoms / "images"),
            model="tiny-clip",
            out=str(tmp_path_factory.mktemp("domain") / "classifier"),
            device="cpu",
        )
    )


@pytest.fixture(scope="module")
def classifier(classifier_dir) -> DomainClassifier:
    return DomainClassifier.load(classifier_dir)


def test_held_out_phantoms_are_routed_to_their_modality(classifier_dir):
    manifest = json.loads((classifier_dir / "manifest.json").read_text())
    test = manifest["metrics"]["test"]
    assert test["images"] == 60
    assert test["accuracy"] >= 0.99, test
    assert test["routed_accuracy"] >= 0.95, test  # placed, not merely guessed right
    assert np.trace(test["confusion"]) == round(test["accuracy"] * 60)
    assert set(test["per_modality"]) == set(MODALITIES)
    assert manifest["modalities"] == list(MODALITIES)
    assert manifest["data"]["train"]["radiology"]["images"] == 70
    assert len(manifest["data"]["train"]["radiology"]["sha256"]) == 64
    for name in ("confusion_val.png", "confusion_test.png"):
        assert (classifier_dir / name).read_bytes().startswith(b"\x89PNG")
    assert (classifier_dir / "config.yaml").is_file() and (classifier_dir / "encoder" / "manifest.json").is_file()
    assert not classifier_dir.with_name("classifier.partial").exists()


def test_frozen_tower_is_saved_unchanged(classifier):
    untrained, _, _, _ = tiny_clip(seed=0)  # what train_domain created with seed 0
    for name, weights in untrained.visual.state_dict().items():
        assert torch.equal(classifier.encoder.visual.state_dict()[name], weights), name


def test_predict_domain_writes_one_line_per_image(classifier_dir, phantoms, tmp_path):
    # A VQA file names each image once per question; each image is predicted once.
    output = tmp_path / "domains.jsonl"
    predictions = predict_domain(
        PredictDomainConfig(
            classifier=str(classifier_dir),
            data=str(phantoms / "test/vqa/pathology_test.jsonl"),
            img_root=str(phantoms / "images"),
            output=str(output),
            device="cpu",
        )
    )
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == len(predictions) == 20
    assert len({line["image"] for line in lines}) == 20
    assert all(line["modality"] == "pathology" for line in lines)
    assert set(lines[0]) >= {"image", "modality", "probability", "probabilities"}
    assert lines[0]["probability"] == max(lines[0]["probabilities"].values())


def test_save_and_load_give_identical_probabilities(classifier, phantoms, tmp_path):
    images = [f"{m}/{prefix}_00000.png" for m, prefix in zip(MODALITIES, ("rad", "path", "oph"), strict=True)]
    before = classifier.predict(images, image_root=phantoms / "images")
    reloaded = DomainClassifier.load(classifier.save(tmp_path / "copy"))
    after = reloaded.predict(images, image_root=phantoms / "images")
    assert [p.probabilities for p in after] == [p.probabilities for p in before]
    assert [p.modality for p in after] == list(MODALITIES)
    assert reloaded.threshold == classifier.threshold and reloaded.max_distance == classifier.max_distance


def test_an_image_it_cannot_place_is_unknown_and_the_caller_routes_it(classifier):
    black = Image.new("RGB", (64, 64))
    (prediction,) = classifier.predict(black, threshold=0.99)
    assert prediction.modality == UNKNOWN
    assert prediction.best_guess in MODALITIES  # the guess and the probabilities are kept
    assert math.isclose(sum(prediction.probabilities.values()), 1, rel_tol=1e-5)
    # The softmax alone may be confident about a black frame; its distance from every modality's training
    # images is what gives it away.
    assert prediction.distance > classifier.max_distance

    retrievers = ("radiology", "pathology")  # the modalities this caller can retrieve from
    assert route(prediction, "default", "radiology", retrievers) == ["radiology"]
    assert route(prediction, "all", "radiology", retrievers) == ["radiology", "pathology"]
    assert route(prediction, "none", None, retrievers) == []
    placed = DomainPrediction("pathology", 0.97, {"radiology": 0.02, "pathology": 0.97}, "pathology", 0.6)
    assert all(route(placed, policy, "radiology", retrievers) == ["pathology"] for policy in ("default", "all"))
    no_retriever = DomainPrediction("ophthalmology", 0.9, {"ophthalmology": 0.9}, "ophthalmology", 0.5)
    assert route(no_retriever, "default", "radiology", retrievers) == ["radiology"]
    with pytest.raises(ValueError, match="default_modality"):
        route(placed, "default", "ophthalmology", retrievers)
    with pytest.raises(ValueError, match="policy"):
        route(placed, "first", "radiology", retrievers)


def test_at_the_defaults_non_medical_images_are_unknown_and_new_phantoms_are_placed(tmp_path):
    # The distance limit is calibrated on the training images themselves, so it needs a few hundred of them per
    # modality (the README's retriever phantoms: 467); the module's 70 per modality are too few to hold 99%.
    data = tmp_path / "phantoms"
    make_phantoms(PhantomConfig(out=str(data), n=2000, size=64))
    classifier = DomainClassifier.load(
        train_domain(
            TrainDomainConfig(
                train_files=data_files(data, "train"),
                val_files=data_files(data, "val"),
                img_root=str(data / "images"),
                model="tiny-clip",
                out=str(tmp_path / "classifier"),
                device="cpu",
            )
        )
    )
    for name, image in non_medical_images().items():
        (prediction,) = classifier.predict(image)
        assert prediction.modality == UNKNOWN, (name, prediction)
        assert prediction.distance > classifier.max_distance, (name, prediction)
    # 300 phantoms the classifier has never seen (another seed of the generator): at least 99% placed, and right.
    fresh = tmp_path / "fresh"
    make_phantoms(PhantomConfig(out=str(fresh), n=300, size=64, seed=1))
    images = sorted((fresh / "images").glob("*/*.png"))
    predictions = classifier.predict(images)
    placed = [p for p in predictions if not p.is_unknown]
    assert len(images) == 300 and len(placed) >= 0.99 * len(images), [p for p in predictions if p.is_unknown]
    assert all(Path(p.image).parent.name == p.modality for p in placed)


def test_a_classifier_whose_encoder_changed_is_refused(classifier_dir, tmp_path):
    copy = Path(shutil.copytree(classifier_dir, tmp_path / "classifier"))
    weights_file = copy / "encoder" / "open_clip_model.safetensors"
    weights = load_file(weights_file)
    weights["visual.proj"] = weights["visual.proj"] * 1.01  # e.g. the retriever was retrained in place
    save_file(weights, weights_file)
    with pytest.raises(ClassifierMismatchError, match="encoder/open_clip_model.safetensors changed"):
        DomainClassifier.load(copy)


def test_a_missing_image_is_named(classifier, phantoms, tmp_path):
    with pytest.raises(ImageLoadError, match="no_such_scan.png"):
        classifier.predict([phantoms / "images/radiology/rad_00000.png", tmp_path / "no_such_scan.png"])


def test_mlp_head_on_a_trained_tower(phantoms, tmp_path):
    # No val_files: 10% of each modality's training records are held out, seeded.
    out = train_domain(
        TrainDomainConfig(
            train_files=dict(item.split("=") for item in data_files(phantoms, "train")),
            test_files=data_files(phantoms, "test"),
            img_root=str(phantoms / "images"),
            model="tiny-clip",
            head="mlp",
            hidden=32,
            finetune_tower=True,
            tower_lr=1e-4,
            epochs=2,
            out=str(tmp_path / "tuned"),
            device="cpu",
        )
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["accuracy"] >= 0.99
    assert manifest["data"]["val"]["pathology"] == {"held_out_from_train": 0.1, "records": 7, "images": 7}
    classifier = DomainClassifier.load(out)
    assert classifier.hidden == 32 and classifier.finetuned_tower
    untrained, _, _, _ = tiny_clip(seed=0)
    assert not torch.equal(classifier.encoder.visual.proj, untrained.visual.proj)


def test_command_line_entries_and_their_errors():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainDomainConfig)
    args = parser.parse_args(
        ["--train-files", "radiology=rad.json", "pathology=path.json", "--img-root", "images", "--max-distance", "inf"]
    )
    config = config_from_args(TrainDomainConfig, args)
    assert config.train_paths == {"radiology": "rad.json", "pathology": "path.json"}
    assert config.max_distance == math.inf
    for entries, problem in [
        (["radiology:rad.json", "pathology=path.json"], "modality=path"),
        (["radiology=rad.json"], "at least 2 modalities"),
        (["radiology=rad.json", "unknown=other.json"], "reserved"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            TrainDomainConfig(train_files=entries, img_root="images")
    with pytest.raises(ConfigError, match="not in train_files"):
        TrainDomainConfig(train_files=["a=a.json", "b=b.json"], val_files=["c=c.json"], img_root="images")
    with pytest.raises(ConfigError, match="either images or data"):
        PredictDomainConfig(classifier="classifier")


def test_share_of_real_chest_xrays_routed_to_radiology(classifier_dir, real_xrays, tmp_path, record_property):
    """Trained on phantoms only: how many real X-rays (PneumoniaMNIST test split) go to radiology? Reported in
    the README; measured, not tuned for."""
    images = np.load(real_xrays)["test_images"]
    (tmp_path / "xrays").mkdir()
    names = []
    for index, pixels in enumerate(images):
        names.append(f"{index:03d}.png")
        Image.fromarray(pixels).save(tmp_path / "xrays" / names[-1])
    predictions = predict_domain(
        PredictDomainConfig(
            classifier=str(classifier_dir), images=tuple(names), img_root=str(tmp_path / "xrays"), device="cpu"
        )
    )
    share = float(np.mean([p.modality == "radiology" for p in predictions]))
    best_guess = float(np.mean([p.best_guess == "radiology" for p in predictions]))
    record_property("real_xrays_routed_to_radiology", share)
    logger.info(
        "%d real chest X-rays: %.1f%% routed to radiology (%.1f%% best guess radiology, %.1f%% unknown)",
        len(predictions),
        100 * share,
        100 * best_guess,
        100 * np.mean([p.is_unknown for p in predictions]),
    )
    assert len(predictions) == len(images) == 468
    assert 0 <= share <= best_guess <= 1
