"""Batched CLIP encoding: normalised, independent of the batch size, clear about missing images."""

import numpy as np
import pytest
from PIL import Image

from mmed_rag.data.images import ImageLoadError
from mmed_rag.retrieval.encode import embedding_dim, encode_images, encode_texts
from mmed_rag.testing import tiny_clip


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(0)


@pytest.fixture()
def image_root(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    return tmp_path


def test_reports_are_normalised_and_batch_size_does_not_matter(clip):
    model, _, _, tokenizer = clip
    reports = ["The heart is enlarged.", "No pleural effusion.", "Clear lungs. " * 40, "Small nodule."]
    one_by_one = encode_texts(model, tokenizer, reports, batch_size=1)
    together = encode_texts(model, tokenizer, reports, batch_size=64)
    assert one_by_one.shape == (4, embedding_dim(model)) and one_by_one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
    assert encode_texts(model, tokenizer, []).shape == (0, embedding_dim(model))


def test_images_are_normalised_and_batch_size_does_not_matter(clip, image_root):
    model, _, preprocess, _ = clip
    paths = [f"{index}.png" for index in range(5)]
    small = encode_images(model, preprocess, image_root, paths, batch_size=2)
    large = encode_images(model, preprocess, image_root, paths, batch_size=5)
    np.testing.assert_allclose(small, large, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)


def test_a_missing_image_is_named(clip, image_root):
    model, _, preprocess, _ = clip
    with pytest.raises(ImageLoadError, match="missing.png"):
        encode_images(model, preprocess, image_root, ["0.png", "missing.png"], batch_size=2)
