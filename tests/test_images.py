"""Safe image loading inside an image root, mode conversion, and MMed-RAG's noised image."""

import os

import numpy as np
import pytest
from PIL import Image

from mmed_rag.data.images import (
    ImageLoadError,
    ImagePathError,
    load_image,
    noised_image,
    open_image,
    resolve_image_path,
    to_rgb,
)


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "study").mkdir(parents=True)
    Image.new("L", (8, 6), 128).save(root / "study" / "0.png")
    return root


def test_relative_paths_inside_the_root_resolve(image_root):
    assert resolve_image_path(image_root, "study/0.png") == (image_root / "study" / "0.png").resolve()
    assert resolve_image_path(image_root, "study/../study/0.png").name == "0.png"
    image = load_image(image_root, "study/0.png")
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.png", "study/../../outside.png", "", "a\x00b.png"])
def test_unsafe_paths_are_refused(image_root, path):
    with pytest.raises(ImagePathError):
        resolve_image_path(image_root, path)


def test_symlink_leaving_the_root_is_refused(image_root, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(outside)
    os.symlink(outside, image_root / "link.png")
    with pytest.raises(ImagePathError, match="outside the image root"):
        load_image(image_root, "link.png")
    os.symlink(image_root / "study" / "0.png", image_root / "inside.png")
    assert load_image(image_root, "inside.png").size == (8, 6)


def test_missing_truncated_and_non_image_files_name_the_file(image_root):
    with pytest.raises(ImageLoadError, match="not found: .*missing.png"):
        load_image(image_root, "missing.png")
    (image_root / "notes.png").write_text("not an image")
    with pytest.raises(ImageLoadError, match="not an image.*notes.png"):
        load_image(image_root, "notes.png")
    full = image_root / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    (image_root / "cut.png").write_bytes(full.read_bytes()[:400])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(image_root, "cut.png")


def test_pixel_limit_refuses_decompression_bombs(image_root):
    Image.new("L", (200, 200)).save(image_root / "big.png")
    with pytest.raises(ImageLoadError, match="40,000 pixels, over the limit of 10,000"):
        load_image(image_root, "big.png", max_pixels=10_000)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 4095, 16 * 16).reshape(16, 16).astype(np.uint16)  # 12-bit radiograph range
    path = tmp_path / "xray16.png"
    Image.fromarray(ramp).save(path)
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 100 < rgb[8, 0, 0] < 155


def test_transparency_is_composited_on_black():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (0, 0, 0)
    la = Image.new("LA", (2, 2), (200, 255))
    assert to_rgb(la).getpixel((0, 0)) == (200, 200, 200)
    palette = Image.new("P", (2, 2), 3)
    assert to_rgb(palette).mode == "RGB"


def test_noised_image_follows_the_original_recipe():
    image = noised_image((40, 30), seed=7)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == (40, 30)
    # Same draws as the original: N(0, 1) of the RGB array's shape, clipped to [0, 1], * 255, truncated to uint8.
    draws = np.random.default_rng(7).normal(0.0, 1.0, (30, 40, 3)).astype(np.float32)
    np.testing.assert_array_equal(pixels, (np.clip(draws, 0, 1) * 255).astype(np.uint8))
    # About half the values are negative draws, clipped to black; about 16% are >= 1, clipped to white.
    assert 0.45 < (pixels == 0).mean() < 0.55
    assert 0.12 < (pixels == 255).mean() < 0.20
    np.testing.assert_array_equal(np.asarray(noised_image((40, 30), seed=7)), pixels)
    assert not np.array_equal(np.asarray(noised_image((40, 30), seed=8)), pixels)


def test_real_chest_xrays_go_through_the_same_path(real_xrays, tmp_path):
    images = np.load(real_xrays)["test_images"][:8]
    root = tmp_path / "xrays"
    root.mkdir()
    for index, pixels in enumerate(images):
        Image.fromarray(pixels).save(root / f"{index}.png")
    for index, pixels in enumerate(images):
        loaded = np.asarray(load_image(root, f"{index}.png"))
        assert loaded.shape == (28, 28, 3)
        np.testing.assert_array_equal(loaded[..., 0], pixels)  # grayscale replicated, not rescaled
        noised = noised_image((28, 28), seed=index)
        assert noised.size == (28, 28) and not np.array_equal(np.asarray(noised)[..., 0], pixels)


def test_image_plus_noise_keeps_a_trace_of_the_image():
    from mmed_rag.data.images import image_plus_noise

    white, black = Image.new("L", (32, 32), 255), Image.new("RGB", (32, 32), (0, 0, 0))
    noisy_white, noisy_black = image_plus_noise(white, seed=1), image_plus_noise(black, seed=1)
    assert noisy_white.mode == "RGB" and noisy_white.size == (32, 32)
    assert np.array_equal(np.asarray(image_plus_noise(white, seed=1)), np.asarray(noisy_white))  # seeded
    # Same draws: the white image stays brighter everywhere (x + noise, clipped, is monotone in x) ...
    assert (np.asarray(noisy_white) >= np.asarray(noisy_black)).all()
    # ... and on black, what shows is the positive half of N(0, 1): about half the pixels stay black.
    assert 0.4 < (np.asarray(noisy_black) == 0).mean() < 0.6
