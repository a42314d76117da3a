"""Procedural medical "phantoms": the default data set mmed-rag ships, since no real medical image may.

Three modalities are drawn with numpy and saved with PIL, each in its own visual style:

- radiology: a grayscale chest film (saved as 8-bit ``L``): dark lung fields over soft tissue, a heart and
  mediastinum silhouette, diaphragm domes, ribs, clavicles and film noise;
- pathology: an H&E-stained section (``RGB``): pink eosin stroma with fibres, glands lined by purple
  hematoxylin nuclei around white lumens;
- ophthalmology: a fundus photograph (``RGB``): an orange-red vignetted disc on black, a bright optic disc with
  a paler cup, dark-red vessels branching from the disc, a darker macula.

Each image carries 0, 1 or 2 findings from :data:`FINDINGS` that really change its pixels (a larger heart, a
basal opacity, a crowded sheet of atypical nuclei, an enlarged cup, ...), so a model can learn them at 64 px,
a report whose sentences state every finding and the absence of the others, and yes/no questions about them.
:func:`make_phantoms` writes all of it in the MMed-RAG release formats (see ``data/README.md``), so every
stage can run end to end on a machine with no data at all.

Every image draws from its own generator seeded by (seed, modality, index): the output depends on nothing but
the config, not on the order of generation, and the same config gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import math
import re
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mmed_rag.atomic import atomic_path, atomic_write_text
from mmed_rag.config import ConfigError
from mmed_rag.data.images import load_image
from mmed_rag.jsonl import jsonl_text
from mmed_rag.outputs import claim_outputs
from mmed_rag.progress import progress_bar

logger = logging.getLogger(__name__)

# Bumped whenever a change to drawing or wording changes the output, so a stored set says how it was made.
PHANTOM_VERSION = 1

FINDINGS: dict[str, tuple[str, ...]] = {
    "radiology": ("cardiomegaly", "effusion", "pneumothorax", "nodule"),
    "pathology": ("carcinoma", "inflammation", "necrosis"),
    "ophthalmology": ("glaucoma", "haemorrhage", "drusen"),
}
SPLITS = ("train", "val", "test")
MAX_FINDINGS = 2
_PREFIX = {"radiology": "rad", "pathology": "path", "ophthalmology": "oph"}


@dataclass
class PhantomConfig:
    """What :func:`make_phantoms` writes; the defaults here are the only ones (YAML files override them)."""

    out: str = field(default="phantoms", metadata={"help": "output directory (images/, training/, test/, manifest)"})
    n: int = field(default=300, metadata={"help": "total number of images, shared evenly between the modalities"})
    size: int = field(default=64, metadata={"help": "image side in pixels"})
    seed: int = field(default=0, metadata={"help": "random seed; the same config gives byte-identical files"})
    modalities: tuple[str, ...] = field(
        default=("radiology", "pathology", "ophthalmology"), metadata={"help": "modalities to draw"}
    )
    val_fraction: float = field(default=0.1, metadata={"help": "share of each modality's images in the val split"})
    test_fraction: float = field(
        default=0.2, metadata={"help": "share of each modality's images in the test split (report and VQA tests)"}
    )
    questions_per_image: int = field(
        default=2, metadata={"help": "yes/no questions per test image; answers alternate yes/no within an image"}
    )
    question_style: str = field(
        default="balanced",
        metadata={
            "help": "balanced: yes/no alternate per image, absent findings asked as 'free of ...?'; presence: every "
            "question asks whether a finding is there (see compose_questions)"
        },
    )
    train_questions_per_image: int = field(
        default=0,
        metadata={
            "help": "yes/no questions per train and val image, written to training/vqa/ (0: none): the questions "
            "that supervised fine-tuning and RAG-PT's pair construction answer"
        },
    )
    report_wording: str = field(
        default="varied",
        metadata={
            "help": "varied: each finding said in one of several ways, with fillers, in random order; fixed: one "
            "sentence per finding and state, in a fixed order, so reports with the same findings are the same text"
        },
    )
    finding_probability: float = field(
        default=0.35,
        metadata={"help": f"chance of each finding, drawn independently (at most {MAX_FINDINGS} kept per image)"},
    )

    def __post_init__(self) -> None:
        # YAML gives lists; a tuple keeps the config hashable and its manifest entry stable.
        self.modalities = tuple(self.modalities)
        unknown = [m for m in self.modalities if m not in FINDINGS]
        if not self.modalities or unknown or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(
                f"modalities: expected distinct names among {', '.join(FINDINGS)}, got {list(self.modalities)}"
            )
        if self.n < 3 * len(self.modalities):
            raise ConfigError(
                f"n: need at least 3 images per modality (one per split), i.e. n >= {3 * len(self.modalities)} "
                f"for {len(self.modalities)} modalities, got {self.n}"
            )
        if self.size < 32:
            raise ConfigError(f"size: findings are drawn to be visible from 32 px up, got {self.size}")
        if not 0 <= self.val_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ConfigError(
                f"val_fraction and test_fraction: expected 0 <= val < 1 and 0 < test < 1, "
                f"got {self.val_fraction} and {self.test_fraction}"
            )
        if self.questions_per_image < 1:
            raise ConfigError(f"questions_per_image: expected at least 1, got {self.questions_per_image}")
        if self.question_style not in ("balanced", "presence"):
            raise ConfigError(f"question_style: expected balanced or presence, got {self.question_style!r}")
        if self.report_wording not in ("varied", "fixed"):
            raise ConfigError(f"report_wording: expected varied or fixed, got {self.report_wording!r}")
        if self.train_questions_per_image < 0:
            raise ConfigError(f"train_questions_per_image: expected 0 or more, got {self.train_questions_per_image}")
        if not 0 <= self.finding_probability <= 1:
            raise ConfigError(f"finding_probability: expected a probability in [0, 1], got {self.finding_probability}")
        for modality, counts in self.split_counts().items():
            if counts["train"] < 1:
                raise ConfigError(
                    f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves no training "
                    f"image of the {sum(counts.values())} {modality} images; lower the fractions or raise n"
                )

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Images per modality and split: n // modalities each (the remainder to the first), every split >= 1."""
        per_modality = self.n // len(self.modalities)
        counts = {}
        for position, modality in enumerate(self.modalities):
            total = per_modality + (self.n % len(self.modalities) if position == 0 else 0)
            test = max(1, round(total * self.test_fraction))
            val = max(1, round(total * self.val_fraction)) if self.val_fraction > 0 else 0
            counts[modality] = {"train": total - val - test, "val": val, "test": test}
        return counts


# -- drawing primitives --------------------------------------------------------------------------------------
# Shapes live in "anatomy units": [-1, 1] across the frame, y pointing down. A pose (rotation, scale, shift)
# maps them to pixels, so the same anatomy lands slightly differently in every image.


@dataclass(frozen=True)
class _Pose:
    size: int
    angle: float
    scale: float
    shift_x: float
    shift_y: float

    @property
    def px(self) -> float:
        """Pixels per anatomy unit."""
        return self.size * self.scale / 2

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy coordinates of every pixel centre."""
        centres = np.arange(self.size, dtype=np.float64) + 0.5 - self.size / 2
        rows, cols = np.meshgrid(centres - self.shift_y, centres - self.shift_x, indexing="ij")
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        return (cos * cols + sin * rows) / self.px, (-sin * cols + cos * rows) / self.px

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return (
            (cos * x - sin * y) * self.px + self.size / 2 + self.shift_x,
            (sin * x + cos * y) * self.px + self.size / 2 + self.shift_y,
        )


def _random_pose(
    rng: np.random.Generator, size: int, degrees: float, scale: tuple[float, float], shift: float
) -> _Pose:
    return _Pose(
        size,
        math.radians(rng.uniform(-degrees, degrees)),
        rng.uniform(*scale),
        rng.uniform(-shift, shift) * size,
        rng.uniform(-shift, shift) * size,
    )


def _inside(signed_distance: np.ndarray, px: float) -> np.ndarray:
    """Coverage of a shape given a signed distance (negative inside, anatomy units), anti-aliased over a pixel."""
    return np.clip(0.5 - signed_distance * px, 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry, px: float) -> np.ndarray:
    q = np.hypot((x - cx) / rx, (y - cy) / ry)
    return _inside((q - 1) * min(rx, ry), px)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float, stretch: float = 1.0, angle: float = 0.0):
    """Unit-variance Gaussian-filtered noise; sigma in anatomy units, ``stretch`` > 1 elongates it along ``angle``.

    Filtering in the Fourier domain costs the same for any sigma, and wraps around, which no one can see.
    """
    white = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    along = math.cos(angle) * fx + math.sin(angle) * fy
    across = -math.sin(angle) * fx + math.cos(angle) * fy
    sigma_px = sigma * size / 2
    kernel = np.exp(-2 * math.pi**2 * sigma_px**2 * ((stretch * along) ** 2 + across**2))
    smooth = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=white.shape)
    return smooth / (smooth.std() + 1e-12)


def _stamp(canvas: np.ndarray, cx, cy, rx, ry, angle=0.0, strength=1.0, wobble=0.0, phase=0.0) -> None:
    """Max-composite N soft ellipses into ``canvas`` in place; centres and radii in pixels.

    Each ellipse touches only a small window around its centre, so thousands of nuclei or vessel points cost
    less than one full-frame operation. ``wobble`` makes the outline irregular (three lobes, rotated by
    ``phase``), as in atypical nuclei; overlapping shapes keep the stronger value instead of adding up.
    """
    cx, cy, rx, ry, angle, strength, wobble, phase = (
        a.ravel()
        for a in np.broadcast_arrays(
            *(np.asarray(v, dtype=np.float64) for v in (cx, cy, rx, ry, angle, strength, wobble, phase))
        )
    )
    if cx.size == 0:
        return
    reach = int(math.ceil(float(np.max(np.maximum(rx, ry) * (1 + wobble))))) + 1
    offsets = np.arange(-reach, reach + 1)
    cols = np.floor(cx).astype(np.intp)[:, None, None] + offsets[None, None, :]
    rows = np.floor(cy).astype(np.intp)[:, None, None] + offsets[None, :, None]
    dx = cols + 0.5 - cx[:, None, None]
    dy = rows + 0.5 - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    q = np.hypot(u / rx[:, None, None], v / ry[:, None, None])
    if np.any(wobble):
        q = q / (1 + wobble[:, None, None] * np.cos(3 * np.arctan2(v, u) + phase[:, None, None]))
    alpha = np.clip((1 - q) * np.minimum(rx, ry)[:, None, None] + 0.5, 0, 1) * strength[:, None, None]
    rows, cols = np.broadcast_arrays(rows, cols)
    height, width = canvas.shape
    keep = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width) & (alpha > 0)
    np.maximum.at(canvas, (rows[keep], cols[keep]), alpha[keep])


def _sample_in(rng: np.random.Generator, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pixel positions (x, y) with density proportional to ``mask`` (which must not be all zero)."""
    weights = mask.ravel() / mask.sum()
    flat = rng.choice(mask.size, size=n, p=weights)
    y, x = np.divmod(flat, mask.shape[1])
    return x + rng.uniform(0, 1, n), y + rng.uniform(0, 1, n)


# -- radiology -----------------------------------------------------------------------------------------------
# X-ray brightness is 1 - exp(-attenuation): densities of overlapping structures add, as they do on film.


def _lung_markings(rng: np.random.Generator, pose: _Pose, side: int) -> np.ndarray:
    """Bronchovascular markings: vessels fanning out of the hilum, tapering towards the periphery."""
    canvas = np.zeros((pose.size, pose.size))
    count = 24
    heading = np.linspace(-0.6 * math.pi, 0.6 * math.pi, count) + rng.normal(0, 0.1, count)
    length = rng.uniform(0.25, 0.6, count)
    steps = int(0.6 * pose.px / 0.4) + 2
    s = np.linspace(0.02, 1.0, steps)[None, :] * length[:, None]
    bend = rng.uniform(-1.2, 1.2, (count, 1))
    # heading 0 points up; side decides whether the fan opens to the image's left or right
    angle = heading[:, None] + bend * s
    mark_x, mark_y = pose.to_pixels(side * 0.16 + side * np.sin(angle) * s, -0.05 - np.cos(angle) * s)
    radius = (0.018 * (1 - 0.7 * s / length[:, None])) * pose.px
    _stamp(canvas, mark_x, mark_y, radius, radius)
    return canvas


@dataclass(frozen=True)
class Placement:
    """Where a radiology finding is drawn and how large, for films that must agree (a patient's prior and current).

    ``side``: -1 (the image's left, the patient's right on a frontal film) or 1; ``level``: 0, 1 or 2 (mild,
    moderate, severe). ``None`` leaves either to the random draw. The draws are made either way, so a film drawn
    without placements is the same as before placements existed.
    """

    side: int | None = None
    level: int | None = None


# Each finding's size by level (mild, moderate, severe), in the renderer's anatomy units.
_HEART_WIDTH = (0.40, 0.46, 0.52)  # cardiomegaly: half-width of the heart (normal 0.27-0.31)
_MENISCUS = (0.2, 0.08, -0.06)  # effusion: height of the fluid's top (lower is more fluid)
_LUNG_LEFT = (0.62, 0.54, 0.44)  # pneumothorax: share of the lung's size left after its collapse
_NODULE_RADIUS = (0.055, 0.075, 0.095)


def _side(placement: Mapping[str, Placement], finding: str, drawn: int) -> int:
    """The drawn side of ``finding``, unless ``placement`` fixes it."""
    fixed = placement.get(finding)
    return drawn if fixed is None or fixed.side is None else fixed.side


def _size(placement: Mapping[str, Placement], finding: str, drawn: float, sizes: Sequence[float]) -> float:
    """The drawn size of ``finding``, unless ``placement`` fixes its level (``sizes``: by level)."""
    fixed = placement.get(finding)
    return drawn if fixed is None or fixed.level is None else sizes[fixed.level]


def _render_radiology(
    findings: Sequence[str], size: int, rng: np.random.Generator, placement: Mapping[str, Placement]
) -> Image.Image:
    pose = _random_pose(rng, size, degrees=4, scale=(0.92, 1.04), shift=0.04)
    x, y, px = *pose.grid(), pose.px
    # Trunk soft tissue, thickest mid-chest; the air outside the patient stays black.
    density = 0.5 * _ellipse(x, y, 0.0, 0.3, 0.98, 1.35, px) * (0.8 + 0.2 * np.clip(1 - x**2, 0, 1))

    # Each hemidiaphragm domes up mid-hemithorax and falls away to the costophrenic angle laterally and to
    # the heart medially; the left one sits a little lower.
    side_of = np.where(x < 0, -1, 1)
    from_dome = x - side_of * 0.3
    diaphragm = 0.4 + 0.05 * (side_of > 0) + np.where(side_of * from_dome > 0, 0.25, 0.3) * (from_dome / 0.4) ** 2
    abdomen = _inside(diaphragm - y, px)
    # Heart and mediastinum take the room of the lungs between them: their outline is where lung air stops.
    if "cardiomegaly" in findings:  # cardiothoracic ratio ~0.65 instead of ~0.42
        width = _size(placement, "cardiomegaly", rng.uniform(0.44, 0.5), _HEART_WIDTH)
        heart = _ellipse(x, y, 0.13, 0.36, width, rng.uniform(0.28, 0.32), px)
    else:
        heart = _ellipse(x, y, 0.1, 0.36, rng.uniform(0.27, 0.31), rng.uniform(0.22, 0.25), px)
    # The mediastinum widens from the trachea down to the heart.
    mediastinum = _inside(np.abs(x - 0.02) - 0.09 - 0.05 * np.clip((y + 0.3) / 0.5, 0, 1), px) * _inside(y - 0.3, px)
    solid = np.maximum(heart, mediastinum)
    # Heart, great vessels and liver are thicker than the chest wall, and alike: no edge where they meet.
    density += 0.18 * np.maximum(solid, abdomen)
    lungs = {side: _ellipse(x, y, side * 0.38, 0.0, 0.3, 0.76, px) * (1 - abdomen) * (1 - solid) for side in (-1, 1)}
    texture = _smooth_noise(rng, size, 0.02)
    markings = {side: 0.06 * _lung_markings(rng, pose, side) + 0.015 * texture for side in (-1, 1)}

    if "effusion" in findings:
        # Fluid fills the base up to a meniscus that rises laterally, hiding the dome and the costophrenic angle;
        # above it the lung is hazy where the fluid layer thins out.
        side = _side(placement, "effusion", rng.choice([-1, 1]))
        lateral = np.clip((side * x - 0.08) / 0.6, 0, 1)
        meniscus = _size(placement, "effusion", rng.uniform(0.0, 0.18), _MENISCUS) - 0.25 * lateral**2
        fluid = np.maximum(_inside(meniscus - y, px), 0.35 * np.exp(-np.clip(meniscus - y, 0, None) / 0.08))
        lungs[side] = lungs[side] * (1 - fluid)
    pneumothorax_side = _side(placement, "pneumothorax", rng.choice([-1, 1])) if "pneumothorax" in findings else 0
    for side, lung in lungs.items():
        density -= 0.36 * lung
        if side != pneumothorax_side:
            density += markings[side] * lung
            continue
        # The lung collapses towards its lower hilum: air without markings fills the apex and the lateral wall,
        # edged by the bright visceral pleural line; the collapsed lung is denser than an aerated one.
        shrink = _size(placement, "pneumothorax", rng.uniform(0.5, 0.62), _LUNG_LEFT)
        anchor_x, anchor_y = side * 0.2, 0.3
        qx, qy = anchor_x + (x - anchor_x) / shrink, anchor_y + (y - anchor_y) / shrink
        edge = (np.hypot((qx - side * 0.38) / 0.3, qy / 0.76) - 1) * 0.3 * shrink
        collapsed = lung * _inside(edge, px)
        pleural_line = lung * np.clip(1 - np.abs(edge) * px / 0.9, 0, 1)
        density += (markings[side] + 0.06) * collapsed + 0.2 * pleural_line - 0.04 * (lung - collapsed)

    ribs = np.clip((np.cos(2 * math.pi * (y + 0.45 * x**2) * 5.5 + rng.uniform(0, 6.3)) - 0.45) / 0.55, 0, 1)
    density += 0.05 * ribs * _ellipse(x, y, 0.0, -0.05, 0.72, 0.72, px) * (1 - abdomen) * (1 - solid)
    for side in (-1, 1):  # clavicles, rising from the sternum towards the shoulders
        along = np.clip(side * x, 0.1, 0.66)
        density += 0.14 * _inside(np.abs(y - (-0.66 - 0.3 * (along - 0.1))) - 0.035, px) * (np.abs(x) < 0.68)
    density += 0.06 * _inside(np.abs(x) - 0.065, px) * (1 + 0.3 * np.cos(2 * math.pi * y * 6))  # spine

    if "nodule" in findings:
        side = _side(placement, "nodule", rng.choice([-1, 1]))
        cx, cy = side * rng.uniform(0.3, 0.5), rng.uniform(-0.45, 0.1)
        r = _size(placement, "nodule", rng.uniform(0.065, 0.085), _NODULE_RADIUS)
        density += 0.4 * np.exp(-0.5 * np.hypot(x - cx, y - cy) ** 2 / (0.6 * r) ** 2)

    density += 0.02 * _smooth_noise(rng, size, 0.08) + 0.012 * rng.standard_normal((size, size))
    film = (1 - np.exp(-rng.uniform(2.2, 2.7) * np.clip(density, 0, None))) ** rng.uniform(0.85, 1.15)
    return Image.fromarray(np.round(np.clip(film, 0, 1) * 255).astype(np.uint8), mode="L")


# -- pathology -----------------------------------------------------------------------------------------------
# Stains mix in optical density (Beer-Lambert), as light through a slide does: rgb = exp(-sum of stain ODs).
_HEMATOXYLIN_OD = np.array([0.95, 1.10, 0.45])  # purple-blue nuclei
_EOSIN_OD = np.array([0.10, 0.75, 0.35])  # pink cytoplasm and stroma


def _irregular_region(rng: np.random.Generator, x, y, radius: tuple[float, float], px: float) -> np.ndarray:
    """A blob of tissue (tumour, necrosis) with a ragged outline, centred somewhere in the field."""
    cx, cy, r = rng.uniform(-0.45, 0.45), rng.uniform(-0.45, 0.45), rng.uniform(*radius)
    ragged = 1 + 0.18 * _smooth_noise(rng, x.shape[0], 0.12)
    return _inside(np.hypot(x - cx, y - cy) - r * ragged, px)


def _render_pathology(findings: Sequence[str], size: int, rng: np.random.Generator) -> Image.Image:
    pose = _Pose(size, 0.0, 1.0, 0.0, 0.0)  # tissue has no orientation worth jittering: positions are random
    x, y, px = *pose.grid(), pose.px
    fibre_angle = rng.uniform(0, math.pi)
    eosin = 0.55 + 0.1 * _smooth_noise(rng, size, 0.02, stretch=6, angle=fibre_angle)
    eosin += 0.05 * _smooth_noise(rng, size, 0.15)
    nuclei = np.zeros((size, size))
    stroma_cells = np.zeros((size, size))
    tumour = _irregular_region(rng, x, y, (0.55, 0.8), px) if "carcinoma" in findings else np.zeros((size, size))

    glands = np.zeros((size, size))
    lumens = np.zeros((size, size))
    centres: list[tuple[float, float]] = []
    for _ in range(40):  # rejection sampling keeps glands apart, like a regular normal mucosa
        if len(centres) == 5:
            break
        cx, cy = rng.uniform(-0.8, 0.8, 2)
        if all(math.hypot(cx - ox, cy - oy) > 0.62 for ox, oy in centres):
            centres.append((cx, cy))
    for cx, cy in centres:
        rx, ry, angle = rng.uniform(0.16, 0.26), rng.uniform(0.1, 0.16), rng.uniform(0, math.pi)
        cos, sin = math.cos(angle), math.sin(angle)
        u, v = cos * (x - cx) + sin * (y - cy), -sin * (x - cx) + cos * (y - cy)
        q = np.hypot(u / rx, v / ry)
        epithelium = _inside((q - 1) * min(rx, ry) - 0.1, px)
        lumen = _inside((q - 1) * min(rx, ry), px)
        glands, lumens = np.maximum(glands, epithelium), np.maximum(lumens, lumen)
        # Columnar cells: one row of nuclei on the basal side, elongated across the wall.
        count = int(2 * math.pi * math.sqrt(((rx + 0.07) ** 2 + (ry + 0.07) ** 2) / 2) / 0.05)
        t = np.linspace(0, 2 * math.pi, count, endpoint=False) + rng.uniform(-0.05, 0.05, count)
        gu, gv = (rx + 0.068) * np.cos(t), (ry + 0.068) * np.sin(t)
        nx, ny = pose.to_pixels(cx + cos * gu - sin * gv, cy + sin * gu + cos * gv)
        _stamp(nuclei, nx, ny, 0.032 * px, 0.02 * px, np.arctan2(gv, gu) + angle, rng.uniform(0.8, 1.0, count))
    eosin = eosin * (1 - glands) + 0.72 * glands
    count = rng.integers(12, 22)
    sx, sy = pose.to_pixels(rng.uniform(-1, 1, count), rng.uniform(-1, 1, count))
    _stamp(stroma_cells, sx, sy, 0.045 * px, 0.013 * px, fibre_angle + rng.normal(0, 0.2, count), 0.8)
    nuclei = np.maximum(nuclei, stroma_cells * (1 - glands))

    if "carcinoma" in findings:
        # Glands give way to a crowded sheet of large, dark, irregular nuclei with purple cytoplasm.
        nuclei *= 1 - tumour
        lumens *= 1 - tumour
        eosin = eosin * (1 - tumour) + (0.6 + 0.05 * _smooth_noise(rng, size, 0.05)) * tumour
        count = int(160 * tumour.sum() / px**2)
        tx, ty = _sample_in(rng, tumour, count)
        radius = rng.uniform(0.038, 0.058, count) * px
        _stamp(
            nuclei,
            tx,
            ty,
            radius,
            radius * rng.uniform(0.65, 1.0, count),
            rng.uniform(0, math.pi, count),
            rng.uniform(0.8, 1.2, count),
            rng.uniform(0.05, 0.18, count),
            rng.uniform(0, 6.3, count),
        )
    if "inflammation" in findings:
        # Lymphocytes: many small, round, very dark nuclei in one or two clusters.
        lymphocytes = np.zeros((size, size))
        for _ in range(rng.integers(1, 3)):
            count = rng.integers(80, 130)
            centre, spread = rng.uniform(-0.55, 0.55, 2), rng.uniform(0.18, 0.3)
            lx, ly = pose.to_pixels(*(centre[:, None] + rng.normal(0, spread, (2, count))))
            _stamp(
                lymphocytes,
                lx,
                ly,
                rng.uniform(0.018, 0.025, count) * px,
                rng.uniform(0.018, 0.025, count) * px,
                0.0,
                1.35,
            )
        nuclei = np.maximum(nuclei, lymphocytes * (1 - lumens))
    if "necrosis" in findings:
        # A pale, washed-out eosinophilic area: cells (and lumens) gone, only specks of nuclear debris left.
        dead = _irregular_region(rng, x, y, (0.35, 0.55), px)
        nuclei *= 1 - 0.95 * dead
        lumens *= 1 - dead
        eosin = eosin * (1 - dead) + (0.3 + 0.03 * _smooth_noise(rng, size, 0.1)) * dead
        count = rng.integers(40, 70)
        dx, dy = _sample_in(rng, dead, count)
        _stamp(
            nuclei,
            dx,
            dy,
            rng.uniform(0.012, 0.022, count) * px,
            rng.uniform(0.008, 0.014, count) * px,
            rng.uniform(0, math.pi, count),
            rng.uniform(0.5, 0.8, count),
            0.3,
            rng.uniform(0, 6.3, count),
        )
    eosin *= 1 - 0.95 * lumens

    haematoxylin = nuclei + 0.05 + 0.02 * _smooth_noise(rng, size, 0.04)
    stains = rng.uniform(0.85, 1.15, 2)  # staining strength varies from slide to slide
    density = (stains[0] * haematoxylin)[..., None] * _HEMATOXYLIN_OD + (stains[1] * eosin)[..., None] * _EOSIN_OD
    rgb = np.exp(-np.clip(density, 0, None)) + 0.012 * rng.standard_normal((size, size, 3))
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), mode="RGB")


# -- ophthalmology -------------------------------------------------------------------------------------------


def _blend(rgb: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    return rgb * (1 - alpha[..., None]) + np.asarray(colour) * alpha[..., None]


def _curve(points_x: np.ndarray, points_y: np.ndarray, r0: float, r1: float):
    """A vessel as (x, y, radius) samples tapering from r0 to r1."""
    return points_x, points_y, np.linspace(r0, r1, points_x.size)


def _vessel_tree(
    rng: np.random.Generator, disc: tuple[float, float], macula: tuple[float, float], eye: int, start: float, px: float
):
    """Vessel samples (anatomy units): two arcades curving round the macula, nasal vessels, side branches."""
    (disc_x, disc_y), (mac_x, mac_y) = disc, macula
    phi0 = math.atan2(disc_y - mac_y, disc_x - mac_x)
    arc_radius = math.hypot(disc_x - mac_x, disc_y - mac_y)
    pieces = []
    for up in (1, -1):  # superior, inferior
        for calibre, spread in ((rng.uniform(0.032, 0.038), 1.0), (rng.uniform(0.022, 0.027), 0.88)):  # vein, artery
            end = rng.uniform(2.0, 2.5)
            count = int(arc_radius * end * 1.2 * px / 0.4) + 2
            theta = np.linspace(start / arc_radius, end, count)
            # Both leave the disc, then the artery draws in to run inside the vein.
            radius = arc_radius * (1 + 0.15 * theta - (1 - spread) * (theta - theta[0]) / (end - theta[0]))
            phi = phi0 - up * eye * theta
            arc_x, arc_y = mac_x + radius * np.cos(phi), mac_y + radius * np.sin(phi)
            pieces.append(_curve(arc_x, arc_y, calibre, calibre * 0.5))
            for at in rng.uniform(0.3, 0.8, 2):
                i = int(at * (count - 1))
                heading = math.atan2(arc_y[i + 1] - arc_y[i], arc_x[i + 1] - arc_x[i])
                heading += rng.choice([-1, 1]) * rng.uniform(0.5, 0.9)
                length = rng.uniform(0.2, 0.4)
                s = np.linspace(0, length, int(length * px / 0.4) + 2)
                turn = heading + rng.uniform(-1.0, 1.0) * s
                pieces.append(
                    _curve(arc_x[i] + s * np.cos(turn), arc_y[i] + s * np.sin(turn), calibre * 0.6, calibre * 0.35)
                )
    for _ in range(rng.integers(2, 5)):  # nasal vessels run straighter, away from the macula
        heading = rng.uniform(0.25, 1.1) * rng.choice([-1, 1])
        length = rng.uniform(0.45, 0.75)
        s = np.linspace(start, length, int(length * px / 0.4) + 2)
        bend = rng.uniform(-0.5, 0.5)
        pieces.append(
            _curve(disc_x + eye * s * np.cos(heading + bend * s), disc_y + s * np.sin(heading + bend * s), 0.024, 0.012)
        )
    return (np.concatenate(parts) for parts in zip(*pieces, strict=True))


def _render_ophthalmology(findings: Sequence[str], size: int, rng: np.random.Generator) -> Image.Image:
    # The camera's circular field stays put in the frame; the eye behind it moves.
    frame_x, frame_y = _Pose(size, 0.0, 1.0, 0.0, 0.0).grid()
    pose = _random_pose(rng, size, degrees=10, scale=(0.95, 1.05), shift=0.03)
    x, y, px = *pose.grid(), pose.px
    eye = int(rng.choice([-1, 1]))  # +1: a right eye, optic disc on the image's right
    rim = np.hypot(frame_x, frame_y)
    tint = np.array([0.84, 0.36, 0.13]) * rng.uniform(0.92, 1.08, 3)
    light = (1 - 0.55 * rim**2) * rng.uniform(0.85, 1.08) * (1 + 0.06 * _smooth_noise(rng, size, 0.04))
    rgb = tint * light[..., None]

    disc_x, disc_y = eye * rng.uniform(0.36, 0.44), rng.uniform(-0.08, 0.04)
    mac_x, mac_y = disc_x - eye * rng.uniform(0.7, 0.8), disc_y + rng.uniform(0.02, 0.08)
    to_macula = np.hypot(x - mac_x, y - mac_y)
    rgb *= (1 - 0.38 * np.exp(-((to_macula / 0.2) ** 2)) - 0.2 * np.exp(-((to_macula / 0.05) ** 2)))[..., None]

    if "drusen" in findings:  # small yellow deposits scattered round the fovea, under the vessels
        drusen = np.zeros((size, size))
        count = rng.integers(10, 20)
        dx, dy = pose.to_pixels(mac_x + rng.normal(0, 0.15, count), mac_y + rng.normal(0, 0.13, count))
        radius = rng.uniform(0.028, 0.045, count) * px
        _stamp(drusen, dx, dy, radius, radius, 0.0, rng.uniform(0.7, 0.95, count))
        rgb = _blend(rgb, (1.0, 0.88, 0.42), drusen)

    disc_r = rng.uniform(0.14, 0.165)
    # Glaucoma: the pale cup widens until only a thin rim of the disc is left.
    cup_ratio = rng.uniform(0.68, 0.82) if "glaucoma" in findings else rng.uniform(0.22, 0.4)
    rgb = _blend(rgb, (0.98, 0.72, 0.45), 0.92 * _ellipse(x, y, disc_x, disc_y, 0.92 * disc_r, disc_r, px))
    cup_r = disc_r * cup_ratio
    rgb = _blend(rgb, (1.0, 0.95, 0.8), _ellipse(x, y, disc_x, disc_y, 0.92 * cup_r, cup_r, px))

    vessels = np.zeros((size, size))
    # Vessels leave at the edge of the cup, so a wide cup stays visible between them.
    vx, vy, vr = _vessel_tree(rng, (disc_x, disc_y), (mac_x, mac_y), eye, disc_r * max(0.5, cup_ratio + 0.1), px)
    _stamp(vessels, *pose.to_pixels(vx, vy), vr * px, vr * px)
    rgb = _blend(rgb, (0.45, 0.07, 0.05), 0.8 * vessels)

    if "haemorrhage" in findings:  # dark red blots in the posterior pole, away from the disc
        blots = np.zeros((size, size))
        count = rng.integers(3, 8)
        angle, distance = rng.uniform(0, 2 * math.pi, 4 * count), rng.uniform(0.12, 0.7, 4 * count)
        bx, by = distance * np.cos(angle), distance * np.sin(angle)
        far = np.hypot(bx - disc_x, by - disc_y) > 1.6 * disc_r
        bx, by = bx[far][:count], by[far][:count]
        radius = rng.uniform(0.045, 0.08, bx.size) * px
        _stamp(
            blots,
            *pose.to_pixels(bx, by),
            radius,
            radius * rng.uniform(0.45, 0.9, bx.size),
            rng.uniform(0, math.pi, bx.size),
            rng.uniform(0.8, 0.95, bx.size),
            0.08,
            rng.uniform(0, 6.3, bx.size),
        )
        rgb = _blend(rgb, (0.3, 0.02, 0.02), blots)

    rgb += 0.012 * rng.standard_normal((size, size, 3))
    rgb *= _inside(rim - 0.95, size / 2)[..., None]
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), mode="RGB")


_RENDERERS = {"radiology": _render_radiology, "pathology": _render_pathology, "ophthalmology": _render_ophthalmology}


def render_phantom(
    modality: str,
    findings: Sequence[str],
    size: int,
    rng: np.random.Generator,
    placement: Mapping[str, Placement] | None = None,
) -> Image.Image:
    """Draw one ``size`` x ``size`` image of ``modality`` showing ``findings`` (empty: a normal study).

    Radiology comes back as an 8-bit grayscale ``L`` image, pathology and ophthalmology as ``RGB``. Pure: the
    image depends only on the arguments and the state of ``rng``. ``placement`` (radiology only) fixes a finding's
    side and size (:class:`Placement`).
    """
    if modality not in FINDINGS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(FINDINGS)}")
    unknown = sorted(set(findings) - set(FINDINGS[modality]))
    if unknown:
        raise ValueError(f"unknown {modality} finding(s) {unknown}; expected some of {', '.join(FINDINGS[modality])}")
    if modality != "radiology":
        if placement:
            raise ValueError(f"placement is drawn for radiology findings only, not {modality}")
        return _RENDERERS[modality](findings, size, rng)
    unplaced = sorted(set(placement or {}) - set(findings))
    if unplaced:
        raise ValueError(f"placement for finding(s) {unplaced} that the film does not show")
    return _render_radiology(findings, size, rng, placement or {})


# -- reports and questions -----------------------------------------------------------------------------------
# Every finding has ways to say it is present and ways to say it is absent; absent ones are always reported
# too, as radiologists do, so a report never leaves a finding unsaid. Present-sentences avoid negation words
# ("no", "not", "normal", "without") and absent-sentences use one, which keeps the two easy to tell apart.

_SENTENCES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "radiology": {
        "cardiomegaly": (
            (
                "The heart is enlarged.",
                "Cardiomegaly is present.",
                "The cardiac silhouette is enlarged.",
                "There is cardiomegaly.",
                "Moderate cardiomegaly.",
            ),
            (
                "Heart size is normal.",
                "The heart is normal in size.",
                "The cardiac silhouette is within normal limits.",
                "No cardiomegaly.",
                "Heart size is within normal limits.",
            ),
        ),
        "effusion": (
            (
                "There is a pleural effusion.",
                "A small pleural effusion is present.",
                "Blunting of the costophrenic angle is consistent with a pleural effusion.",
                "Basilar opacity with a meniscus compatible with pleural effusion.",
            ),
            (
                "No pleural effusion.",
                "There is no pleural effusion.",
                "No pleural effusion is seen.",
                "The costophrenic angles are sharp without effusion.",
            ),
        ),
        "pneumothorax": (
            (
                "There is a pneumothorax.",
                "A pneumothorax is present.",
                "Apical pneumothorax with a visible pleural line.",
                "Pneumothorax is seen.",
            ),
            ("No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."),
        ),
        "nodule": (
            (
                "There is a nodule in the lung.",
                "A pulmonary nodule is present.",
                "A small rounded nodular opacity is noted.",
                "There is a focal nodular density in the lung.",
            ),
            ("No pulmonary nodules.", "No focal nodule or mass.", "There is no suspicious pulmonary nodule."),
        ),
    },
    "pathology": {
        "carcinoma": (
            (
                "Sheets of large atypical cells with hyperchromatic, pleomorphic nuclei are seen.",
                "The nuclei are enlarged, crowded and irregular, consistent with carcinoma.",
                "Invasive carcinoma with marked nuclear atypia is present.",
                "There is a dense proliferation of atypical nuclei.",
            ),
            (
                "No nuclear atypia is seen.",
                "There is no evidence of malignancy.",
                "Nuclei are small and uniform without atypia.",
                "The glands are normal and regularly spaced.",
            ),
        ),
        "inflammation": (
            (
                "There is a dense lymphocytic infiltrate.",
                "Numerous small round inflammatory cells are present.",
                "Chronic inflammation with many lymphocytes is seen.",
                "The stroma is infiltrated by inflammatory cells.",
            ),
            (
                "No significant inflammation is seen.",
                "There is no inflammatory infiltrate.",
                "Inflammatory cells are not increased.",
            ),
        ),
        "necrosis": (
            (
                "There is an area of necrosis with pale eosinophilic debris.",
                "Necrosis is present.",
                "A focus of coagulative necrosis with nuclear debris is seen.",
                "Part of the tissue shows pale acellular necrotic material.",
            ),
            ("No necrosis is identified.", "There is no necrosis.", "Necrosis is not seen."),
        ),
    },
    "ophthalmology": {
        "glaucoma": (
            (
                "The optic disc shows an enlarged cup-to-disc ratio.",
                "Increased cupping of the optic nerve head, suspicious for glaucoma.",
                "Glaucomatous optic disc cupping is present.",
                "The cup is large with a thin neuroretinal rim.",
            ),
            (
                "The cup-to-disc ratio is normal.",
                "The optic disc appears healthy with a normal cup.",
                "No glaucomatous cupping.",
                "No signs of glaucoma.",
            ),
        ),
        "haemorrhage": (
            (
                "There are scattered retinal haemorrhages.",
                "Dot and blot haemorrhages are seen in the posterior pole.",
                "Several intraretinal haemorrhages are present.",
            ),
            ("No retinal haemorrhages.", "There are no haemorrhages.", "No haemorrhage is seen."),
        ),
        "drusen": (
            (
                "Drusen are present near the macula.",
                "Multiple small yellow drusen are seen around the fovea.",
                "There are macular drusen consistent with early AMD.",
            ),
            ("No drusen are seen.", "The macula is clear without drusen.", "No macular drusen."),
        ),
    },
}
# Absences radiologists habitually report in one breath, used instead of two sentences half of the time.
_JOINT_ABSENCES = {
    "radiology": {
        ("effusion", "pneumothorax"): (
            "There is no pleural effusion or pneumothorax.",
            "No pneumothorax or pleural effusion.",
        )
    },
}
# Sentences about what no finding touches, so reports vary beyond their findings.
_FILLER = {
    "radiology": (
        "No acute bony abnormality.",
        "The visualized osseous structures are intact.",
        "There is no focal consolidation.",
        "Pulmonary vascularity is within normal limits.",
        "The trachea is midline.",
        "No free air under the diaphragm.",
    ),
    "pathology": (
        "Hematoxylin and eosin stain, original magnification ×200.",
        "The section shows glandular tissue within a fibrous stroma.",
        "Representative micrograph of the lesion.",
        "The fibrous stroma is unremarkable.",
    ),
    "ophthalmology": (
        "The retina is attached.",
        "The fundus is well visualised.",
        "The vitreous is clear.",
        "Fundus photograph of the posterior pole.",
    ),
}
# Per finding: questions whose answer is yes when it is present, and ones whose answer is yes when it is absent.
_QUESTIONS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "radiology": {
        "cardiomegaly": (
            (
                "Is there evidence of cardiomegaly in this chest X-ray?",
                "Is the heart enlarged on this chest X-ray?",
                "Does the chest X-ray show an enlarged cardiac silhouette?",
            ),
            (
                "Is the heart size within normal limits on this chest X-ray?",
                "Does the cardiac silhouette appear normal in size?",
            ),
        ),
        "effusion": (
            (
                "Is there a pleural effusion on the chest X-ray?",
                "Does the chest X-ray show blunting of a costophrenic angle?",
                "Can a pleural effusion be seen in this image?",
            ),
            ("Are the costophrenic angles sharp on this chest X-ray?", "Are the pleural spaces clear of fluid?"),
        ),
        "pneumothorax": (
            (
                "Is a pneumothorax present on this chest X-ray?",
                "Does the chest X-ray show a pneumothorax?",
                "Is there a visible pleural line suggesting pneumothorax?",
            ),
            ("Are both lungs fully expanded on this chest X-ray?", "Is the chest X-ray free of pneumothorax?"),
        ),
        "nodule": (
            (
                "Is there a pulmonary nodule on this chest X-ray?",
                "Does the chest X-ray show a focal nodular opacity?",
                "Can a lung nodule be seen in this image?",
            ),
            ("Are the lungs free of nodules on this chest X-ray?",),
        ),
    },
    "pathology": {
        "carcinoma": (
            (
                "Does the image show atypical nuclei consistent with carcinoma?",
                "Are there crowded, enlarged, hyperchromatic nuclei in this section?",
                "Is carcinoma present in this tissue?",
            ),
            ("Are the nuclei small and uniform in this section?", "Is the tissue free of malignancy?"),
        ),
        "inflammation": (
            (
                "Is there a dense inflammatory infiltrate in this section?",
                "Are numerous lymphocytes present in the image?",
                "Does the tissue show chronic inflammation?",
            ),
            ("Is the stroma free of inflammatory cells?",),
        ),
        "necrosis": (
            (
                "Is there necrosis in this tissue?",
                "Does the image show a pale acellular necrotic area?",
                "Is coagulative necrosis present?",
            ),
            ("Is the tissue free of necrosis?",),
        ),
    },
    "ophthalmology": {
        "glaucoma": (
            (
                "Does the fundus image show an enlarged cup-to-disc ratio?",
                "Is there glaucomatous cupping of the optic disc?",
                "Does the patient show signs of glaucoma on this fundus photograph?",
            ),
            ("Is the cup-to-disc ratio normal in this fundus image?",),
        ),
        "haemorrhage": (
            (
                "Are retinal haemorrhages visible in this fundus image?",
                "Does the fundus photograph show dot and blot haemorrhages?",
                "Is there retinal bleeding in this image?",
            ),
            ("Is the retina free of haemorrhages?",),
        ),
        "drusen": (
            (
                "Are drusen present near the macula?",
                "Does the fundus image show yellow drusen deposits?",
                "Is there evidence of drusen in this fundus photograph?",
            ),
            ("Is the macula free of drusen?",),
        ),
    },
}
# (question suffix, yes, no) as in each modality's release test set: IU-Xray for radiology (Harvard-FairVLMed
# has no public VQA test file, so ophthalmology follows IU-Xray too), PMC-OA for pathology.
_VQA_STYLE = {
    "radiology": (" \n<image>", "Yes.", "No."),
    "pathology": ("\n<image>", "Yes", "No"),
    "ophthalmology": (" \n<image>", "Yes.", "No."),
}
_OPTIONS = " Please choose from the following two options: [yes, no]\n<image>"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def compose_report(modality: str, findings: Sequence[str], rng: np.random.Generator, wording: str = "varied") -> str:
    """A report stating each finding of ``modality`` as present or absent, plus a filler or two, shuffled.

    ``wording="fixed"``: each finding's first sentence for its state, in the modality's finding order, then one
    or two fillers: what a report says of the findings is a function of them, as a retriever trained from scratch
    on a few hundred pairs needs (with varied wording it memorises the wording of its pairs instead of the
    findings); the fillers keep reports with the same findings apart.
    """
    if wording == "fixed":
        stated = [_SENTENCES[modality][f][0 if f in findings else 1][0] for f in FINDINGS[modality]]
        filler = _FILLER[modality]
        return " ".join(
            stated + [filler[i] for i in sorted(rng.choice(len(filler), size=rng.integers(1, 3), replace=False))]
        )
    sentences = [_pick(rng, _SENTENCES[modality][f][0]) for f in FINDINGS[modality] if f in findings]
    absent = [f for f in FINDINGS[modality] if f not in findings]
    for joint, options in _JOINT_ABSENCES.get(modality, {}).items():
        if set(joint) <= set(absent) and rng.random() < 0.5:
            sentences.append(_pick(rng, options))
            absent = [f for f in absent if f not in joint]
    sentences += [_pick(rng, _SENTENCES[modality][f][1]) for f in absent]
    filler = _FILLER[modality]
    sentences += [filler[i] for i in rng.choice(len(filler), size=rng.integers(1, 3), replace=False)]
    return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


def compose_questions(
    modality: str, findings: Sequence[str], n: int, rng: np.random.Generator, style: str = "balanced"
) -> list[dict]:
    """``n`` yes/no questions ``{"question", "answer": bool, "finding"}`` about distinct findings.

    ``balanced``: answers alternate yes/no within an image, starting at random, so a set of images is balanced
    whatever its findings: a "yes" about an absent finding is asked as "is it free of ...?".
    ``presence``: every question asks whether a finding is there; answers still alternate where the image allows
    (a "yes" needs a present finding, so an image without findings gets only "no"). The answer then follows from
    the finding alone, not from the finding and the wording together, which a small model learns far sooner.
    """
    names = FINDINGS[modality]
    order = rng.permutation(len(names))
    first_yes = bool(rng.random() < 0.5)
    questions = []
    if style == "presence":
        present = [names[i] for i in order if names[i] in findings]
        absent = [names[i] for i in order if names[i] not in findings]
        for k in range(n):
            wants_yes = (k % 2 == 0) == first_yes
            pool = present if (wants_yes and present) or not absent else absent
            finding = pool.pop(0) if len(pool) > 1 else pool[0]
            questions.append(
                {
                    "question": _pick(rng, _QUESTIONS[modality][finding][False]),
                    "answer": finding in findings,
                    "finding": finding,
                }
            )
        return questions
    for k in range(n):
        finding = names[order[k % len(names)]]
        answer = (k % 2 == 0) == first_yes
        asks_for_absence = (finding in findings) != answer
        questions.append(
            {
                "question": _pick(rng, _QUESTIONS[modality][finding][asks_for_absence]),
                "answer": answer,
                "finding": finding,
            }
        )
    return questions


def _sample_findings(modality: str, probability: float, rng: np.random.Generator) -> list[str]:
    """Each finding independently; beyond :data:`MAX_FINDINGS`, a random subset is kept (in canonical order)."""
    names = FINDINGS[modality]
    drawn = [name for name, hit in zip(names, rng.random(len(names)) < probability, strict=True) if hit]
    if len(drawn) > MAX_FINDINGS:
        keep = set(rng.choice(len(drawn), size=MAX_FINDINGS, replace=False).tolist())
        drawn = [name for i, name in enumerate(drawn) if i in keep]
    return drawn


# -- writing the data set ------------------------------------------------------------------------------------


def _json_list(records: list[dict]) -> str:
    return json.dumps(records, indent=4, ensure_ascii=False)


def _retriever_record(modality: str, index: int, record_id: str, image: str, report: str, split: str, findings):
    """One retriever pair in its modality's release form."""
    extra = {"split": split, "modality": modality, "findings": list(findings)}
    if modality == "pathology":  # PMC-OA: integer ids, "image" as a string
        return {"id": index, "image": image, "report": report, "metadata": {}, **extra}
    if modality == "ophthalmology":  # Harvard-FairVLMed: "image_path" as a string
        return {"id": record_id, "report": report, "image_path": image, **extra}
    return {"id": record_id, "report": report, "image_path": [image], **extra}  # IU-Xray: a list of views


def make_phantoms(config: PhantomConfig) -> dict:
    """Write the phantom data set of ``config`` under ``config.out``; return its manifest.

    Layout (image paths in every file are relative to ``out/images``)::

        images/{radiology,pathology,ophthalmology}/{rad,path,oph}_00000.png
        training/retriever/<modality>/<modality>_{train,val}.json
        test/report/<modality>_test.json
        test/vqa/<modality>_test.jsonl
        training/vqa/<modality>_{train,val}.jsonl   (only with train_questions_per_image > 0)
        manifest.json
    """
    with claim_outputs("make-phantoms", directories=[config.out]):
        return _make_phantoms(config)


def _make_phantoms(config: PhantomConfig) -> dict:
    out = Path(config.out)
    counts = config.split_counts()
    width = max(5, len(str(config.n)))
    started = time.perf_counter()
    progress = progress_bar(total=config.n, desc="phantoms", unit="img")
    for modality in config.modalities:
        # The modality's place in FINDINGS, not in the config, seeds it: a subset of modalities draws the same images.
        modality_seed = list(FINDINGS).index(modality)
        splits = [split for split in SPLITS for _ in range(counts[modality][split])]
        by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
        questions: dict[str, list[dict]] = {split: [] for split in SPLITS}
        style = _VQA_STYLE[modality]
        for index, split in enumerate(splits):
            # Separate streams, so a change in drawing does not reword the reports, nor the reverse.
            finding_seed, image_seed, text_seed = np.random.SeedSequence([config.seed, modality_seed, index]).spawn(3)
            findings = _sample_findings(modality, config.finding_probability, np.random.default_rng(finding_seed))
            image = render_phantom(modality, findings, config.size, np.random.default_rng(image_seed))
            record_id = f"{_PREFIX[modality]}_{index:0{width}d}"
            relative = f"{modality}/{record_id}.png"
            with atomic_path(out / "images" / relative) as tmp:
                image.save(tmp, format="PNG")
            text_rng = np.random.default_rng(text_seed)
            report = compose_report(modality, findings, text_rng, config.report_wording)
            if split == "test":
                by_split[split].append(
                    {
                        "id": record_id,
                        "report": report,
                        "image_path": [relative],
                        "split": split,
                        "modality": modality,
                        "findings": findings,
                    }
                )
            else:
                by_split[split].append(_retriever_record(modality, index, record_id, relative, report, split, findings))
            asked = config.questions_per_image if split == "test" else config.train_questions_per_image
            for question in (
                compose_questions(modality, findings, asked, text_rng, config.question_style) if asked else ()
            ):
                questions[split].append(
                    {
                        "question_id": len(questions[split]) + 1,
                        "question": question["question"] + style[0],
                        "answer": style[1] if question["answer"] else style[2],
                        "image": relative,
                        "report": report,
                        "text": question["question"] + _OPTIONS,
                        "modality": modality,
                        "finding": question["finding"],
                    }
                )
            progress.update()
        for split in ("train", "val"):
            path = out / "training" / "retriever" / modality / f"{modality}_{split}.json"
            atomic_write_text(path, _json_list(by_split[split]))
        atomic_write_text(out / "test" / "report" / f"{modality}_test.json", _json_list(by_split["test"]))
        atomic_write_text(out / "test" / "vqa" / f"{modality}_test.jsonl", jsonl_text(questions["test"]))
        if config.train_questions_per_image:
            for split in ("train", "val"):
                atomic_write_text(out / "training" / "vqa" / f"{modality}_{split}.jsonl", jsonl_text(questions[split]))
    progress.close()

    config_dict = asdict(config)
    config_dict["modalities"] = list(config.modalities)
    manifest = {
        "generator": __name__,
        "version": PHANTOM_VERSION,
        "config": config_dict,
        "image_root": "images",
        "counts": counts,
        "findings": {modality: list(FINDINGS[modality]) for modality in config.modalities},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=4, ensure_ascii=False))
    logger.info(
        "wrote %d phantom images (%s) of %d px to %s in %.1f s",
        config.n,
        ", ".join(f"{m}: {sum(c.values())}" for m, c in counts.items()),
        config.size,
        out,
        time.perf_counter() - started,
    )
    return manifest


def image_of(record: Mapping) -> str:
    """The (first) image of a record in any of the release forms."""
    image = record.get("image_path", record.get("image"))
    return image[0] if isinstance(image, list) else image


def write_grid(
    out_png: str | Path,
    image_root: str | Path,
    records_by_modality: Mapping[str, Sequence[Mapping]],
    per_modality: int = 8,
    reports: bool = False,
) -> Path:
    """A contact sheet PNG: one row per modality, its first ``per_modality`` images titled with their findings;
    with ``reports``, each image's report printed under it (wider cells; use fewer images)."""
    # matplotlib is needed only here; importing it lazily keeps data generation light. Figure + Agg canvas
    # draws without touching pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [(modality, list(records)[:per_modality]) for modality, records in records_by_modality.items()]
    columns = max((len(records) for _, records in rows), default=0)
    if columns == 0:
        raise ValueError("write_grid: no records to draw")
    width, height = (2.3, 3.2) if reports else (1.5, 1.7)
    figure = Figure(figsize=(width * columns + 0.4, height * len(rows)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, (modality, records) in enumerate(rows):
        axes[row][0].text(
            -0.12, 0.5, modality, rotation=90, ha="right", va="center", transform=axes[row][0].transAxes, fontsize=9
        )
        for column, axis in enumerate(axes[row]):
            axis.set_axis_off()
            if column >= len(records):
                continue
            pixels = np.asarray(load_image(image_root, image_of(records[column])))
            axis.imshow(pixels, interpolation="nearest")
            axis.set_title(", ".join(records[column].get("findings") or ["normal"]), fontsize=7)
            if reports:
                text = textwrap.fill(records[column]["report"], width=44)
                axis.text(0.5, -0.04, text, ha="center", va="top", transform=axis.transAxes, fontsize=5.5)
    figure.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png")
    return out_png


def wording() -> list[str]:
    """Every sentence and question the phantoms can write: the vocabulary a model trained on them meets."""
    lines = [
        sentence
        for table in (_SENTENCES, _QUESTIONS)
        for by_finding in table.values()
        for options in by_finding.values()
        for side in options
        for sentence in side
    ]
    lines += [sentence for fillers in _FILLER.values() for sentence in fillers]
    lines += [sentence for joint in _JOINT_ABSENCES.values() for options in joint.values() for sentence in options]
    return lines


def findings_in_report(modality: str, report: str) -> dict[str, bool]:
    """What a phantom report says of each finding of ``modality``: True present, False absent (sentence lookup).

    Every phantom report states every finding, so this reads a report back exactly; the demo uses it to ask how
    often the retrieved reports are right about the finding a question asks of, and what a written report says.
    Whole sentences are compared, case ignored: a model whose tokenizer lower-cases writes "no pneumothorax."
    for "No pneumothorax.", and "Pneumothorax is seen." must not be read inside "No pneumothorax is seen.".
    """
    stated = {sentence.strip().lower() for sentence in re.split(r"(?<=[.!?])\s+", report)}
    said: dict[str, bool] = {}
    for finding, (present, absent) in _SENTENCES[modality].items():
        if any(sentence.lower() in stated for sentence in present):
            said[finding] = True
        elif any(sentence.lower() in stated for sentence in absent):
            said[finding] = False
    for joint, options in _JOINT_ABSENCES.get(modality, {}).items():
        if any(sentence.lower() in stated for sentence in options):
            said.update({finding: False for finding in joint})
    return said
