"""Images from data files, loaded safely, and MMed-RAG's noised image.

Image paths come from JSON files that users download from elsewhere, so a path is only followed when it stays
inside the image root: absolute paths, ``..`` escapes and symlinks that lead out of the root are refused. Every
failure names the file. A pixel limit guards against decompression bombs (a tiny PNG that expands to gigabytes).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmed_rag.errors import MMedRAGError

# Far above any radiograph or fundus photograph (a 9,000 x 9,000 scan is 81 M pixels); whole-slide pathology
# images are read tile by tile by other tools, not through here.
DEFAULT_MAX_PIXELS = 100_000_000


class ImagePathError(MMedRAGError, ValueError):
    """An image path from a data file that is unsafe (absolute, escaping the root) or malformed."""


class ImageLoadError(MMedRAGError, OSError):
    """An image that is missing, unreadable, truncated, not an image, or too large."""


def resolve_image_path(image_root: str | os.PathLike, relative_path: str) -> Path:
    """The real path of ``relative_path`` under ``image_root``, refusing anything that leaves the root.

    The check runs on the resolved path, so ``a/../b.png`` inside the root is fine while ``../x.png`` or a
    symlink pointing outside is not. The file itself need not exist yet.
    """
    if not isinstance(relative_path, str) or not relative_path.strip():
        raise ImagePathError(f"image path must be a non-empty string, got {relative_path!r}")
    if "\x00" in relative_path:
        raise ImagePathError(f"image path {relative_path!r} contains a NUL byte")
    if os.path.isabs(relative_path) or relative_path.startswith(("/", "\\")):
        raise ImagePathError(
            f"image path {relative_path!r} is absolute; data files must give paths relative to the image root"
        )
    root = Path(image_root).resolve()
    candidate = (root / relative_path).resolve()
    if not candidate.is_relative_to(root):
        raise ImagePathError(f"image path {relative_path!r} leads outside the image root {root} (to {candidate})")
    return candidate


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, keeping the look a viewer would show.

    16-bit and float grayscale (DICOM exports, 16-bit PNG radiographs) are scaled by their own min-max range:
    a plain ``convert("L")`` clips 16-bit values to 255 and gives a white image. Transparency is composited on
    black, the background of radiographs and fundus photographs.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = np.zeros_like(pixels) if high <= low else (pixels - low) / (high - low) * 255.0
        image = Image.fromarray(np.round(scaled).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def open_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file fully into memory as RGB, with errors that name the file.

    EXIF orientation is applied, so a rotated photograph is seen as a person sees it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                width, height = handle.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        f"image {path} is {width}x{height} = {width * height:,} pixels, over the limit of "
                        f"{max_pixels:,} (max_pixels): a decompression bomb or an image that needs tiling"
                    )
                handle.load()
                image = ImageOps.exif_transpose(handle)
                return to_rgb(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"not an image (or a format PIL cannot read): {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(f"image {path} refused as a decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"cannot read image {path} (truncated or corrupt?): {error}") from None


def load_image(
    image_root: str | os.PathLike, relative_path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Resolve a data file's image path safely inside ``image_root`` and open it as RGB."""
    return open_image(resolve_image_path(image_root, relative_path), max_pixels=max_pixels)


def image_plus_noise(image: Image.Image, seed: int | np.random.Generator | None = None) -> Image.Image:
    """The image with N(0, 1) noise added to every channel on a 0-1 scale, clipped and scaled back to 0-255.

    What the MMed-RAG authors' report inference showed the model for its noise run (``add_gaussian_noise(image,
    0, 1)`` in their deleted ``inference/llava-med-1.5_report_parellel.py``, read at commit f2023ea), where their
    VQA inference and DPO training replaced the image (:func:`noised_image`). A pixel keeps its value only where
    the draw lands near zero: little of the image survives, but not nothing.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    noisy = np.clip(pixels + rng.normal(0.0, 1.0, pixels.shape), 0.0, 1.0)
    return Image.fromarray((noisy * 255).astype(np.uint8))


def noised_image(size: tuple[int, int], seed: int | np.random.Generator | None = None) -> Image.Image:
    """MMed-RAG's noised image: pure Gaussian noise replacing the image entirely.

    Reproduces the original ``generate_gaussian_noise(image, mean=0.0, stddev=1)`` from its DPO training code:
    an RGB array of the image's size drawn from N(0, 1), clipped to [0, 1] and scaled to 0-255 (truncated to
    uint8). So about half the pixels are black (the negative draws) and the rest uniform-ish grey levels: no
    trace of the original image remains, which is the point of the cross-modality preference pairs (an answer
    that is still "right" on this image was copied from the retrieved reports). ``size`` is PIL's
    ``(width, height)``. The original drew from NumPy's global RNG; here the generator is explicit and seeded.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    width, height = size
    noise = rng.normal(0.0, 1.0, (height, width, 3)).astype(np.float32)
    return Image.fromarray((np.clip(noise, 0.0, 1.0) * 255).astype(np.uint8))
