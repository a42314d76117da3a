"""The CLIP factory: every way of naming a retriever gives the same model, offline, with the weights asked for."""

import argparse
import json
import socket

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmed_rag.retrieval.clip import (
    ClipCheckpointError,
    ClipNotFoundError,
    create_clip,
    load_clip,
    register_model_configs,
    save_clip,
)
from mmed_rag.testing import tiny_clip

REPORTS = ["The lungs are clear.", "Small right pleural effusion.", "Heart size is enlarged."]


def images(preprocess, n=3):
    rng = np.random.default_rng(0)
    return torch.stack(
        [preprocess(Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8))) for _ in range(n)]
    )


def embeddings(model, preprocess, tokenizer):
    with torch.no_grad():
        return model.encode_image(images(preprocess)), model.encode_text(tokenizer(REPORTS))


def assert_same_embeddings(first, second):
    for a, b in zip(embeddings(*first), embeddings(*second), strict=True):
        assert torch.equal(a, b)


def state_dicts_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def trained():
    """A tiny retriever standing in for a fine-tuned one: its weights differ from any fresh initialisation."""
    model, _, preprocess, tokenizer = tiny_clip(seed=7)
    return model, preprocess, tokenizer


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-clip-rn"])
def test_tiny_clip_is_created_from_the_registered_config(name):
    model, preprocess_train, preprocess_val, tokenizer = create_clip(name)
    assert name in open_clip.list_models()
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000  # mostly the 49408-word embedding
    assert not model.training
    image_features, text_features = embeddings(model, preprocess_val, tokenizer)
    assert image_features.shape == (3, 64) and text_features.shape == (3, 64)
    assert preprocess_train(Image.new("RGB", (90, 70))).shape == (3, 64, 64)


def test_registering_the_configs_twice_changes_nothing():
    register_model_configs()
    models = open_clip.list_models()
    register_model_configs()
    assert open_clip.list_models() == models


def test_open_clip_tokenizer_of_the_tiny_model_works_offline(no_network):
    register_model_configs()
    tokens = open_clip.get_tokenizer("tiny-clip")(REPORTS)
    assert tokens.shape == (3, 77)
    assert torch.equal(tokens, create_clip("tiny-clip")[3](REPORTS))


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-clip-rn"])
def test_save_and_load_round_trip_exactly(tmp_path, name):
    model, _, preprocess, tokenizer = tiny_clip(seed=1, model=name)
    directory = save_clip(model, tmp_path / "retriever", name, extra_manifest={"modality": "radiology"})

    assert sorted(p.name for p in directory.iterdir()) == [
        "manifest.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]  # no temporary files left
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["model_name"] == name and manifest["modality"] == "radiology"
    assert manifest["embed_dim"] == 64 and manifest["image_size"] == [64, 64] and manifest["context_length"] == 77
    assert set(manifest["versions"]) == {"torch", "open_clip_torch", "mmed-rag"}

    reloaded, _, reloaded_preprocess, reloaded_tokenizer = load_clip(directory)
    assert state_dicts_equal(model, reloaded)
    assert_same_embeddings((model, preprocess, tokenizer), (reloaded, reloaded_preprocess, reloaded_tokenizer))


def test_saving_a_loaded_retriever_keeps_the_original_name(tmp_path, trained):
    first = save_clip(trained[0], tmp_path / "first", "tiny-clip")
    second = save_clip(load_clip(first)[0], tmp_path / "second", str(first))
    assert json.loads((second / "manifest.json").read_text())["model_name"] == "tiny-clip"


def test_open_clip_training_checkpoint_loads_with_its_ddp_prefix(tmp_path, trained):
    model, preprocess, tokenizer = trained
    checkpoint = tmp_path / "epoch_3.pt"
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "radiology-ft", "state_dict": state}, checkpoint)

    loaded, _, loaded_preprocess, loaded_tokenizer = create_clip("tiny-clip", checkpoint=checkpoint)
    assert state_dicts_equal(model, loaded)
    assert_same_embeddings((model, preprocess, tokenizer), (loaded, loaded_preprocess, loaded_tokenizer))


def test_checkpoint_with_a_missing_or_extra_key_is_refused(tmp_path, trained):
    state = {key: value.contiguous() for key, value in trained[0].state_dict().items()}
    missing, extra = dict(state), dict(state, **{"text_projection_v2": torch.zeros(1)})
    del missing["logit_scale"]
    save_file(missing, tmp_path / "missing.safetensors")
    torch.save(extra, tmp_path / "extra.bin")

    with pytest.raises(ClipCheckpointError, match=r"missing keys \['logit_scale'\]"):
        create_clip("tiny-clip", checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(ClipCheckpointError, match=r"unexpected keys \['text_projection_v2'\]"):
        create_clip("tiny-clip", checkpoint=tmp_path / "extra.bin")


def test_checkpoint_of_another_architecture_is_refused(tmp_path, trained):
    save_clip(trained[0], tmp_path / "vit", "tiny-clip")
    with pytest.raises(ClipCheckpointError, match="does not fit"):
        create_clip("tiny-clip-rn", checkpoint=tmp_path / "vit" / "open_clip_model.safetensors")


def test_checkpoint_with_pickled_objects_is_not_unpickled(tmp_path, trained):
    checkpoint = tmp_path / "with_args.pt"
    torch.save({"state_dict": trained[0].state_dict(), "args": argparse.Namespace(lr=1e-4)}, checkpoint)
    with pytest.raises(ClipCheckpointError, match="weights_only"):
        create_clip("tiny-clip", checkpoint=checkpoint)


def test_hf_hub_name_without_a_local_copy_says_to_pass_a_path(tmp_path, no_network):
    with pytest.raises(ClipNotFoundError, match="pass its path instead of the hf-hub name"):
        create_clip("hf-hub:thaottn/OpenCLIP-resnet50-CC12M", cache_dir=tmp_path / "empty-cache")


def test_hf_hub_name_loads_from_the_local_cache_and_a_checkpoint_overrides_its_weights(tmp_path, trained, no_network):
    # The original MMed-RAG passed its fine-tuned checkpoint as pretrained= with an hf-hub: name, which open_clip
    # ignores: it retrieved with the base model. Here the checkpoint wins.
    base, _, base_preprocess, base_tokenizer = tiny_clip(seed=0)
    snapshot = tmp_path / "hub" / "models--org--tiny-clip" / "snapshots" / "0123abcd"
    save_clip(base, snapshot, "tiny-clip")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")

    from_cache = create_clip("hf-hub:org/tiny-clip", cache_dir=tmp_path / "hub")
    assert_same_embeddings((base, base_preprocess, base_tokenizer), (from_cache[0], from_cache[2], from_cache[3]))

    fine_tuned = tmp_path / "fine_tuned.pt"
    torch.save({"epoch": 1, "state_dict": trained[0].state_dict()}, fine_tuned)
    model = create_clip("hf-hub:org/tiny-clip", checkpoint=fine_tuned, cache_dir=tmp_path / "hub")[0]
    assert state_dicts_equal(model, trained[0])


def test_missing_models_and_weights_are_named_in_the_error(tmp_path):
    with pytest.raises(ClipNotFoundError, match="Unknown CLIP model 'no-such-clip'"):
        create_clip("no-such-clip")
    with pytest.raises(ClipNotFoundError, match="does not exist"):
        create_clip("tiny-clip", checkpoint=tmp_path / "absent.pt")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip.get_model_config("tiny-clip")})
    )
    with pytest.raises(ClipNotFoundError, match="no weights"):
        create_clip(str(tmp_path / "config-only"))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("hello world, these are notes, not weights")
    with pytest.raises(ClipCheckpointError, match=r"notes\.(pt|bin|safetensors) is not a"):
        create_clip("tiny-clip", checkpoint=path)


def test_a_relative_model_path_that_is_not_there_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClipNotFoundError, match=f"read from the current directory, {tmp_path}"):
        create_clip("runs/radiology/best")  # a preset's path, run from another folder
